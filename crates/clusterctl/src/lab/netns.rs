//! `lab up --netns`: the lab on networks that really are separate.
//!
//! Layout (names carry the lab's prefix `ccXXXX`, 4 random hex digits):
//!
//! - a hub namespace `PREFIX-hub` holds one bridge per site (`PREFIX-sK`) and the WAN bridge
//!   (`PREFIX-wan`); it has no address and forwards nothing but bridged frames;
//! - every node runs in its own namespace `PREFIX-NODE`, with one veth on its site bridge
//!   (`10.77.K.I/24`); a gateway has a second veth on the WAN bridge (`10.77.250.G/24`);
//! - no namespace forwards IP and none has a default route, so a member cannot reach another
//!   site whatever it tries;
//! - each node has a point-to-point management veth to the root namespace (`10.254.x.y/30`);
//!   the node's control API binds there, and the node's nftables table accepts on it only TCP
//!   to the control port from the root side, so the CLI works unchanged.
//!
//! Gateways listen on `0.0.0.0:7400`, advertise their site address (`advertise`, which the
//! members of their site dial) and their WAN address (`advertise-wan`, which the gateways of
//! other sites dial). No packet of a member ever leaves its site network, and no node needs a
//! route it would not have on a real network.
//!
//! Everything is recorded in `lab.json` before it is created, so `lab down` removes exactly what
//! was created, also after a crash, and deleting what is already gone is not an error.

use super::state::STATE_FORMAT_NETNS;
use super::{
    generate, refuse_running_lab, start_agents, LabPlan, LabState, UpArgs, CONTROL_PORT,
    MAX_WAIT_SECS, QUIC_PORT,
};
use anyhow::{anyhow, bail, Context};
use clusterctl_api::Role;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// First two octets of the cluster networks inside the lab's namespaces: site K is
/// `10.77.K.0/24`, the WAN `10.77.250.0/24`.
const NET: [u8; 2] = [10, 77];
const WAN_OCTET: u8 = 250;
/// Management networks in the root namespace: `10.254.0.0/16`, one /22 per running lab.
const MGMT: [u8; 2] = [10, 254];
/// Most netns labs running at once on a machine (one management /22 each).
const MGMT_SLOTS: u32 = 64;
/// Where management-slot claims live (one file per slot in use).
const CLAIM_DIR: &str = "/run/clusterctl-lab";
/// Longest any single `ip` or `nft` command may run.
const CMD_TIMEOUT: Duration = Duration::from_secs(20);
/// Commands run for the lab, appended for operators to read.
pub(super) const NET_LOG: &str = "netns.log";

/// What `up --netns` created, recorded in `lab.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsState {
    /// `cc` and 4 hex digits: the start of every name this lab creates.
    pub prefix: String,
    /// The namespace holding the bridges.
    pub hub: String,
    /// Management slot: this lab's root-side addresses are in `10.254.(4*slot).0/22`.
    pub slot: u32,
    /// The file claiming `slot`.
    pub claim: PathBuf,
    /// Namespaces, recorded before each was created.
    pub namespaces: Vec<String>,
    /// Links in the root namespace, recorded before each was created.
    pub root_links: Vec<String>,
    /// Per node: its namespace, addresses and bridge ports.
    pub nodes: Vec<NetnsNode>,
    /// Faults in force (`lab fault`).
    #[serde(default)]
    pub faults: Vec<super::fault::ActiveFault>,
}

/// One node of a netns lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsNode {
    pub name: String,
    pub site: String,
    pub role: Role,
    pub netns: String,
    /// Address on the site network.
    pub site_addr: Ipv4Addr,
    /// Address on the WAN network (gateways).
    pub wan_addr: Option<Ipv4Addr>,
    /// Hub-side port of its site veth (on the site bridge).
    pub site_port: String,
    /// Hub-side port of its WAN veth (gateways, on the WAN bridge).
    pub wan_port: Option<String>,
    /// Root-side end of its management veth.
    pub mgmt_link: String,
    /// Root-side and node-side management addresses.
    pub mgmt_root: Ipv4Addr,
    pub mgmt_node: Ipv4Addr,
}

impl NetnsState {
    /// Checks that every recorded name carries the prefix, so a damaged file cannot make
    /// `down` remove anything else.
    pub fn validate(&self) -> anyhow::Result<()> {
        let p = &self.prefix;
        let prefix_ok =
            p.len() == 6 && p.starts_with("cc") && p[2..].bytes().all(|b| b.is_ascii_hexdigit());
        if !prefix_ok {
            bail!("netns prefix {p:?} is not cc followed by 4 hex digits");
        }
        let dash = format!("{p}-");
        let names = self
            .namespaces
            .iter()
            .chain(std::iter::once(&self.hub))
            .chain(self.nodes.iter().map(|n| &n.netns));
        for n in names {
            if !n.starts_with(&dash) || n.contains('/') {
                bail!("namespace {n:?} does not belong to lab {p}");
            }
        }
        for l in self
            .root_links
            .iter()
            .chain(self.nodes.iter().map(|n| &n.mgmt_link))
        {
            if !l.starts_with(p.as_str()) || l.len() > 15 {
                bail!("link {l:?} does not belong to lab {p}");
            }
        }
        Ok(())
    }

    /// The namespace of node `name` (which must be a node of the lab).
    pub fn node_netns(&self, name: &str) -> String {
        self.node(name)
            .map(|n| n.netns.clone())
            .unwrap_or_else(|| format!("{}-{name}", self.prefix))
    }

    pub fn node(&self, name: &str) -> Option<&NetnsNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// One line for `lab status`.
    pub fn status_line(&self) -> String {
        let present = list_netns().unwrap_or_default();
        let up = self
            .namespaces
            .iter()
            .filter(|n| present.contains(n))
            .count();
        format!(
            "netns lab {}: {up}/{} namespaces present (hub {}), {} fault{} active (clusterctl lab fault list)",
            self.prefix,
            self.namespaces.len(),
            self.hub,
            self.faults.len(),
            if self.faults.len() == 1 { "" } else { "s" }
        )
    }

    /// The table name used in every namespace of the lab.
    pub fn table(&self) -> &str {
        &self.prefix
    }
}

/// Whether this process runs with effective uid 0 (read from /proc/self/status).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Why a netns lab cannot be built here (not root, `ip` or `nft` missing), if it cannot.
pub fn missing_requirements() -> Option<String> {
    if !is_root() {
        return Some(
            "lab up --netns needs root (it creates network namespaces, veths and nftables rules): run it as root, or use the loopback lab without --netns".into(),
        );
    }
    for (tool, pkg) in [("ip", "iproute2"), ("nft", "nftables")] {
        let ok = Command::new(tool)
            .arg("-V")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Some(format!(
                "lab up --netns needs the `{tool}` command: install {pkg} (apt-get install {pkg})"
            ));
        }
    }
    None
}

/// Plans the addresses of a netns lab on top of `plan`'s names: node I of site K gets
/// `10.77.K.I`, gateway G (counted over the whole lab) `10.77.250.G`, node N the management
/// pair of /30 number N in the slot's /22.
pub fn netns_plan(plan: &mut LabPlan, prefix: &str, slot: u32) -> Vec<NetnsNode> {
    let mut out = Vec::with_capacity(plan.nodes.len());
    let mut gateway = 0u8;
    let mut site_index = 0u8;
    let mut last_site = None;
    let mut in_site = 0u8;
    for (i, n) in plan.nodes.iter().enumerate() {
        if last_site.as_ref() != Some(&n.ident.site) {
            site_index += 1;
            in_site = 0;
            last_site = Some(n.ident.site.clone());
        }
        in_site += 1;
        let site_addr = Ipv4Addr::new(NET[0], NET[1], site_index, in_site);
        let wan_addr = (n.ident.role == Role::Gateway).then(|| {
            gateway += 1;
            Ipv4Addr::new(NET[0], NET[1], WAN_OCTET, gateway)
        });
        let i32_ = i as u32;
        let third = (slot * 4 + i32_ / 64) as u8;
        let fourth = ((i32_ % 64) * 4) as u8;
        out.push(NetnsNode {
            name: n.ident.name.to_string(),
            site: n.ident.site.to_string(),
            role: n.ident.role,
            netns: format!("{prefix}-{}", n.ident.name),
            site_addr,
            wan_addr,
            site_port: format!("{prefix}-{i}s"),
            wan_port: wan_addr.map(|_| format!("{prefix}-{i}w")),
            mgmt_link: format!("{prefix}m{i}"),
            mgmt_root: Ipv4Addr::new(MGMT[0], MGMT[1], third, fourth + 1),
            mgmt_node: Ipv4Addr::new(MGMT[0], MGMT[1], third, fourth + 2),
        });
    }
    plan.readdress(|i, _| {
        let n = &out[i];
        let sock = |ip: Ipv4Addr, port| SocketAddr::V4(SocketAddrV4::new(ip, port));
        match n.wan_addr {
            Some(wan) => (
                sock(n.site_addr, QUIC_PORT),
                sock(Ipv4Addr::UNSPECIFIED, QUIC_PORT),
                sock(n.mgmt_node, CONTROL_PORT),
                Some(sock(wan, QUIC_PORT)),
            ),
            None => (
                sock(n.site_addr, QUIC_PORT),
                sock(n.site_addr, QUIC_PORT),
                sock(n.mgmt_node, CONTROL_PORT),
                None,
            ),
        }
    });
    out
}

/// `lab up --netns`.
pub fn up(args: &UpArgs, dir: &Path) -> anyhow::Result<ExitCode> {
    if let Some(why) = missing_requirements() {
        bail!("{why}");
    }
    if args.wait > MAX_WAIT_SECS {
        bail!("--wait {}: at most {MAX_WAIT_SECS} seconds", args.wait);
    }
    let mut plan = LabPlan::new(&args.sites, args.gateways, "127.77")?;
    refuse_running_lab(dir)?;
    let prefix = new_prefix()?;
    let (slot, claim) = claim_slot(&prefix, dir)?;
    let nodes = netns_plan(&mut plan, &prefix, slot);
    let generated = generate(&plan, dir);
    let mut state = LabState {
        format: STATE_FORMAT_NETNS,
        cluster: plan.cluster.to_string(),
        dir: dir.to_path_buf(),
        nodes: Vec::new(),
        netns: Some(NetnsState {
            hub: format!("{prefix}-hub"),
            prefix,
            slot,
            claim: claim.clone(),
            namespaces: Vec::new(),
            root_links: Vec::new(),
            nodes,
            faults: Vec::new(),
        }),
    };
    if let Err(e) = generated.and_then(|()| state.save(dir)) {
        let _ = std::fs::remove_file(&claim);
        return Err(e);
    }
    if let Err(e) = build(dir, &mut state) {
        eprintln!("building the lab networks failed; removing what was created");
        if let Err(down) = super::down(dir) {
            eprintln!("clusterctl: {down:#}");
        }
        return Err(e);
    }
    let exe = std::env::current_exe().context("cannot find the clusterctl executable")?;
    start_agents(args, &plan, dir, &exe, &mut state)
}

/// Four random hex digits after `cc`, not used by any namespace of this machine.
fn new_prefix() -> anyhow::Result<String> {
    let existing = list_netns()?;
    for _ in 0..32 {
        let mut b = [0u8; 2];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .context("cannot read /dev/urandom")?;
        let p = format!("cc{:02x}{:02x}", b[0], b[1]);
        let dash = format!("{p}-");
        if !existing.iter().any(|n| n.starts_with(&dash)) && !link_exists_with_prefix(&p) {
            return Ok(p);
        }
    }
    bail!("no free lab prefix after 32 tries: remove old labs with `clusterctl lab down --dir DIR`")
}

fn link_exists_with_prefix(prefix: &str) -> bool {
    run("ip", &["-o", "link", "show"], None)
        .map(|out| {
            out.lines().any(|l| {
                l.split(": ")
                    .nth(1)
                    .is_some_and(|name| name.starts_with(prefix))
            })
        })
        .unwrap_or(false)
}

/// Claims a management /22 not claimed by another lab and not overlapping any route of the
/// root namespace. The claim is a file created with O_EXCL; `down` removes it.
fn claim_slot(prefix: &str, dir: &Path) -> anyhow::Result<(u32, PathBuf)> {
    let claims = PathBuf::from(CLAIM_DIR);
    std::fs::create_dir_all(&claims)
        .with_context(|| format!("cannot create {}", claims.display()))?;
    let routes = run("ip", &["-o", "-4", "route", "show"], None)?;
    for slot in 0..MGMT_SLOTS {
        let lo = u32::from(Ipv4Addr::new(MGMT[0], MGMT[1], (slot * 4) as u8, 0));
        let hi = lo + (1 << 10) - 1;
        let overlaps = routes.lines().any(|l| {
            let Some(dst) = l.split_whitespace().next() else {
                return false;
            };
            let (ip, len) = match dst.split_once('/') {
                Some((ip, len)) => (ip, len.parse::<u32>().unwrap_or(32)),
                None => (dst, 32),
            };
            let Ok(ip) = ip.parse::<Ipv4Addr>() else {
                return false; // `default`, `broadcast` ...
            };
            if len == 0 {
                return false;
            }
            let mask = u32::MAX.checked_shl(32 - len.min(32)).unwrap_or(0);
            let start = u32::from(ip) & mask;
            let end = start | !mask;
            start <= hi && lo <= end
        });
        if overlaps {
            continue;
        }
        let path = claims.join(format!("mgmt-slot-{slot}"));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                writeln!(f, "{prefix} {}", dir.display())
                    .with_context(|| format!("cannot write {}", path.display()))?;
                return Ok((slot, path));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(anyhow!("cannot create {}: {e}", path.display())),
        }
    }
    bail!(
        "no free management range in 10.254.0.0/16 ({MGMT_SLOTS} labs at most, claims in {CLAIM_DIR}): stop other netns labs with `clusterctl lab down --dir DIR`"
    )
}

/// Creates the namespaces, bridges, veths, addresses, routes and base nftables tables.
fn build(dir: &Path, state: &mut LabState) -> anyhow::Result<()> {
    let ns = state.netns.clone().expect("a netns lab");
    let p = ns.prefix.clone();
    let log = dir.join(NET_LOG);
    let ip = |args: &[&str]| -> anyhow::Result<()> { logged(&log, "ip", args, None).map(|_| ()) };
    let record_ns = |state: &mut LabState, name: &str| -> anyhow::Result<()> {
        state
            .netns
            .as_mut()
            .expect("a netns lab")
            .namespaces
            .push(name.to_string());
        state.save(dir)
    };

    // The hub: bridges only.
    record_ns(state, &ns.hub)?;
    ip(&["netns", "add", &ns.hub])?;
    let wan_bridge = format!("{p}-wan");
    let mut sites: Vec<&str> = Vec::new();
    for n in &ns.nodes {
        if !sites.contains(&n.site.as_str()) {
            sites.push(&n.site);
        }
    }
    let site_bridge = |site: &str| -> String {
        let k = sites.iter().position(|s| *s == site).unwrap_or(0) + 1;
        format!("{p}-s{k}")
    };
    for br in sites
        .iter()
        .map(|s| site_bridge(s))
        .chain(std::iter::once(wan_bridge.clone()))
    {
        ip(&["-n", &ns.hub, "link", "add", &br, "type", "bridge"])?;
        ip(&["-n", &ns.hub, "link", "set", &br, "up"])?;
    }
    let hub_tables = super::fault::hub_ruleset(&ns, &[]);
    nft(&log, &ns.hub, &hub_tables)?;
    ip(&["-n", &ns.hub, "link", "set", "lo", "up"])?;

    let site_if = format!("{p}-site");
    let wan_if = format!("{p}-wan");
    let mgmt_if = format!("{p}-mgmt");
    for n in &ns.nodes {
        record_ns(state, &n.netns)?;
        ip(&["netns", "add", &n.netns])?;
        ip(&["-n", &n.netns, "link", "set", "lo", "up"])?;
        // Site veth: hub end on the site bridge, node end in the node.
        ip(&[
            "-n",
            &ns.hub,
            "link",
            "add",
            &n.site_port,
            "type",
            "veth",
            "peer",
            "name",
            &site_if,
            "netns",
            &n.netns,
        ])?;
        ip(&[
            "-n",
            &ns.hub,
            "link",
            "set",
            &n.site_port,
            "master",
            &site_bridge(&n.site),
            "up",
        ])?;
        ip(&[
            "-n",
            &n.netns,
            "addr",
            "add",
            &format!("{}/24", n.site_addr),
            "dev",
            &site_if,
        ])?;
        ip(&["-n", &n.netns, "link", "set", &site_if, "up"])?;
        if let (Some(port), Some(addr)) = (&n.wan_port, n.wan_addr) {
            ip(&[
                "-n", &ns.hub, "link", "add", port, "type", "veth", "peer", "name", &wan_if,
                "netns", &n.netns,
            ])?;
            ip(&[
                "-n",
                &ns.hub,
                "link",
                "set",
                port,
                "master",
                &wan_bridge,
                "up",
            ])?;
            ip(&[
                "-n",
                &n.netns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &wan_if,
            ])?;
            ip(&["-n", &n.netns, "link", "set", &wan_if, "up"])?;
        }
        // Management veth: root end here, node end in the node.
        {
            let s = state.netns.as_mut().expect("a netns lab");
            s.root_links.push(n.mgmt_link.clone());
            state.save(dir)?;
        }
        ip(&[
            "link",
            "add",
            &n.mgmt_link,
            "type",
            "veth",
            "peer",
            "name",
            &mgmt_if,
            "netns",
            &n.netns,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", n.mgmt_root),
            "dev",
            &n.mgmt_link,
        ])?;
        ip(&["link", "set", &n.mgmt_link, "up"])?;
        ip(&[
            "-n",
            &n.netns,
            "addr",
            "add",
            &format!("{}/30", n.mgmt_node),
            "dev",
            &mgmt_if,
        ])?;
        ip(&["-n", &n.netns, "link", "set", &mgmt_if, "up"])?;
        nft(&log, &n.netns, &node_ruleset(&p, &mgmt_if, n))?;
    }
    Ok(())
}

/// The node's table: its management interface carries the control API and nothing else.
fn node_ruleset(table: &str, mgmt_if: &str, n: &NetnsNode) -> String {
    format!(
        "table inet {table} {{\n\
         \tchain mgmt-in {{\n\
         \t\ttype filter hook input priority 0; policy accept;\n\
         \t\tiifname \"{mgmt_if}\" ip saddr {root} tcp dport {CONTROL_PORT} accept\n\
         \t\tiifname \"{mgmt_if}\" drop\n\
         \t}}\n\
         \tchain mgmt-out {{\n\
         \t\ttype filter hook output priority 0; policy accept;\n\
         \t\toifname \"{mgmt_if}\" ip daddr {root} tcp sport {CONTROL_PORT} accept\n\
         \t\toifname \"{mgmt_if}\" drop\n\
         \t}}\n\
         }}\n",
        root = n.mgmt_root
    )
}

/// Removes what the lab created: every recorded namespace (with the links and nftables tables
/// inside), every recorded root link, the slot claim. Things already gone are skipped.
/// Returns a summary for `down`.
pub fn teardown(dir: &Path, ns: &NetnsState) -> anyhow::Result<String> {
    ns.validate()?;
    let log = dir.join(NET_LOG);
    let mut errors = Vec::new();
    // Root links first (deleting one end of a veth deletes the other), then the namespaces
    // with everything inside them.
    let link_exists = |link: &str| run("ip", &["link", "show", "dev", link], None).is_ok();
    let mut links = 0;
    for link in &ns.root_links {
        if !link_exists(link) {
            continue;
        }
        match logged(&log, "ip", &["link", "del", link], None) {
            Ok(_) => links += 1,
            Err(_) if !link_exists(link) => {} // gone meanwhile
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    let present = list_netns()?;
    let mut removed = 0;
    for name in ns.namespaces.iter().rev() {
        if !present.contains(name) {
            continue;
        }
        match logged(&log, "ip", &["netns", "del", name], None) {
            Ok(_) => removed += 1,
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if !errors.is_empty() {
        bail!(
            "could not remove everything ({}); lab.json is kept: run lab down again",
            errors.join("; ")
        );
    }
    // Only our own claim: the file names this lab's prefix.
    if std::fs::read_to_string(&ns.claim)
        .is_ok_and(|c| c.split_whitespace().next() == Some(ns.prefix.as_str()))
    {
        let _ = std::fs::remove_file(&ns.claim);
    }
    Ok(format!(
        "removed {removed} network namespace{} ({}-*){}",
        if removed == 1 { "" } else { "s" },
        ns.prefix,
        if links > 0 {
            format!(
                " and {links} management link{}",
                if links == 1 { "" } else { "s" }
            )
        } else {
            String::new()
        }
    ))
}

/// Names of the named network namespaces (`ip netns list`).
pub fn list_netns() -> anyhow::Result<Vec<String>> {
    let out = run("ip", &["netns", "list"], None)?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Applies an nftables ruleset file inside namespace `ns` (`ip netns exec NS nft -f -`), in one
/// transaction.
pub fn nft(log: &Path, ns: &str, ruleset: &str) -> anyhow::Result<()> {
    logged(
        log,
        "ip",
        &["netns", "exec", ns, "nft", "-f", "-"],
        Some(ruleset),
    )
    .map(|_| ())
}

/// [`run`], with the command (and its input) appended to `log`.
pub fn logged(
    log: &Path,
    prog: &str,
    args: &[&str],
    input: Option<&str>,
) -> anyhow::Result<String> {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        let _ = writeln!(f, "{prog} {}", args.join(" "));
        if let Some(i) = input {
            let _ = writeln!(f, "<<EOF\n{}EOF", i);
        }
    }
    run(prog, args, input)
}

/// Runs `prog args` with `input` on stdin, within [`CMD_TIMEOUT`]; its stdout, or an error
/// quoting the command and its stderr.
pub fn run(prog: &str, args: &[&str], input: Option<&str>) -> anyhow::Result<String> {
    let shown = format!("{prog} {}", args.join(" "));
    let mut child = Command::new(prog)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{shown}`"))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .with_context(|| format!("writing to `{shown}`"))?;
    }
    let deadline = Instant::now() + CMD_TIMEOUT;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`{shown}` did not finish within {} s",
                CMD_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_plan_gives_members_site_addresses_and_gateways_wan_addresses() {
        let mut plan = LabPlan::new("us-east=2,eu-west=2", 2, "127.77").unwrap();
        let nodes = netns_plan(&mut plan, "cc00ff", 3);
        let gw = &plan.nodes[0];
        assert_eq!(gw.ident.name.as_str(), "gw-us-1");
        assert_eq!(gw.addr, "10.77.1.1:7400".parse().unwrap());
        assert_eq!(gw.wan, Some("10.77.250.1:7400".parse().unwrap()));
        assert_eq!(gw.listen, "0.0.0.0:7400".parse().unwrap());
        assert_eq!(gw.control, "10.254.12.2:7401".parse().unwrap());
        let eu_gw2 = &plan.nodes[5];
        assert_eq!(eu_gw2.ident.name.as_str(), "gw-eu-2");
        assert_eq!(eu_gw2.wan, Some("10.77.250.4:7400".parse().unwrap()));
        let edge = &plan.nodes[2];
        assert_eq!(edge.ident.name.as_str(), "edge-us-1");
        assert_eq!(edge.addr, "10.77.1.3:7400".parse().unwrap());
        assert_eq!(edge.listen, edge.addr);
        assert_eq!(edge.wan, None);
        assert_eq!(
            edge.seeds,
            [
                "gw-us-1@10.77.1.1:7400",
                "gw-us-2@10.77.1.2:7400",
                "edge-us-2@10.77.1.4:7400"
            ]
        );
        // Gateways seed each other at their WAN addresses, and their own site at site addresses.
        assert_eq!(
            gw.seeds,
            [
                "gw-us-2@10.77.1.2:7400",
                "edge-us-1@10.77.1.3:7400",
                "edge-us-2@10.77.1.4:7400",
                "gw-eu-1@10.77.250.3:7400",
                "gw-eu-2@10.77.250.4:7400"
            ]
        );
        assert_eq!(nodes[2].site_addr, Ipv4Addr::new(10, 77, 1, 3));
        assert_eq!(nodes[2].wan_addr, None);
        assert_eq!(nodes[2].netns, "cc00ff-edge-us-1");
        assert_eq!(nodes[2].mgmt_link, "cc00ffm2");
        assert_eq!(nodes[2].mgmt_root, Ipv4Addr::new(10, 254, 12, 9));
        let text = plan.config_toml(gw);
        assert!(text.contains(
            "listen = \"0.0.0.0:7400\"\nadvertise = \"10.77.1.1:7400\"\nadvertise-wan = \"10.77.250.1:7400\"\n"
        ));
        assert!(!plan.config_toml(edge).contains("advertise"));
    }

    #[test]
    fn netns_state_refuses_names_outside_the_prefix() {
        let mut plan = LabPlan::new("a=1", 1, "127.77").unwrap();
        let nodes = netns_plan(&mut plan, "cc12ab", 0);
        let mut s = NetnsState {
            prefix: "cc12ab".into(),
            hub: "cc12ab-hub".into(),
            slot: 0,
            claim: "/run/clusterctl-lab/mgmt-slot-0".into(),
            namespaces: vec!["cc12ab-hub".into(), "cc12ab-gw-a-1".into()],
            root_links: vec!["cc12abm0".into()],
            nodes,
            faults: Vec::new(),
        };
        s.validate().unwrap();
        s.namespaces.push("default".into());
        assert!(s.validate().is_err());
        s.namespaces.pop();
        s.root_links.push("eth0".into());
        assert!(s.validate().is_err());
        s.root_links.pop();
        s.prefix = "xx12ab".into();
        assert!(s.validate().is_err());
    }

    #[test]
    fn node_ruleset_opens_only_the_control_port_on_management() {
        let mut plan = LabPlan::new("a=1", 1, "127.77").unwrap();
        let nodes = netns_plan(&mut plan, "cc12ab", 0);
        let r = node_ruleset("cc12ab", "cc12ab-mgmt", &nodes[0]);
        assert!(r.contains("iifname \"cc12ab-mgmt\" ip saddr 10.254.0.1 tcp dport 7401 accept"));
        assert!(r.contains("iifname \"cc12ab-mgmt\" drop"));
    }
}
