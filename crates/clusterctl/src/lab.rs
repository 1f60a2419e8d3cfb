//! `clusterctl lab up|down|status`: a whole cluster on this machine.
//!
//! `up` plans the lab from its arguments ([`LabPlan::new`]), writes a CA, a topology contract and
//! one directory per node ([`generate`]), starts one agent process per node and waits until the
//! cluster has converged. Every site gets its own loopback range (`PREFIX.K.0/24`), so addresses
//! tell sites apart; isolation is by policy (members never dial out of their site).
//!
//! The processes started are recorded in `DIR/lab.json` ([`LabState`]) after each start, and a
//! process counts as this lab's only while its pid, its start time and its command line all
//! match the record: `down` never signals a process it did not start.
//!
//! Submodules: [`netns`] (`up --netns`: namespaces, bridges, veths; its teardown), [`fault`]
//! (`lab fault`: nftables rules and signals against a netns lab), [`drill`] (`lab drill`:
//! scripted failure drills with a verdict and figures).

pub mod drill;
pub mod fault;
pub mod netns;
pub mod state;

use crate::client::Client;
use anyhow::{anyhow, bail, Context};
use clusterctl_api::{LinkState, NodeStatus, Role, Topology};
use clusterctl_core::contract::Contract;
use clusterctl_core::name::{ClusterName, Ident, NodeName, SiteName};
use clusterctl_node::pki::{self, Validity};
use state::{proc_start_time, STATE_FILE, STATE_FORMAT};
pub use state::{LabNode, LabState};
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// Name of the lab's cluster.
pub const CLUSTER: &str = "lab";
/// UDP port of every lab node's QUIC endpoint.
pub const QUIC_PORT: u16 = 7400;
/// TCP port of every lab node's control API.
pub const CONTROL_PORT: u16 = 7401;
/// Most members per site.
pub const MAX_MEMBERS: u32 = 50;
/// Most gateways per site.
pub const MAX_GATEWAYS: u32 = 8;
/// Most sites in a lab.
pub const MAX_SITES: usize = 16;
/// Most nodes (agent processes) in a lab.
pub const MAX_NODES: usize = 200;
/// Longest `--wait`, in seconds.
pub const MAX_WAIT_SECS: u64 = 3600;

/// Written into every directory `lab up` generates; `up` only ever deletes inside such a directory.
const MARKER: &str = ".clusterctl-lab";
const CA_DAYS: u32 = 365;
const NODE_DAYS: u32 = 30;
const POLL: Duration = Duration::from_millis(200);
const STOP_GRACE: Duration = Duration::from_secs(10);
const LOG_TAIL_LINES: usize = 20;

/// Build and run a cluster on this machine.
#[derive(Debug, clap::Subcommand)]
pub enum LabCmd {
    /// Generate a lab (CA, contract, certificates, configs) and start one agent per node.
    ///
    /// Exit 0 once every node is alive and every expected link is up, 1 when an agent exits or
    /// the cluster does not converge within --wait, 2 on bad arguments.
    Up(UpArgs),
    /// Stop exactly the agents this lab started; keep its files and logs.
    Down(DirArgs),
    /// One line per lab node and whether its agent runs (exit 1 if any is stopped, 2 if no lab).
    Status(DirArgs),
    /// Inject or remove a fault in a netns lab (nftables rules, signals to agents).
    #[command(subcommand)]
    Fault(fault::FaultCmd),
    /// Run a scripted failure drill against a fresh netns lab and print a verdict with figures.
    Drill(drill::DrillArgs),
}

/// Arguments of `lab up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Sites and their member counts, in order: NAME=MEMBERS,... (1-50 members per site,
    /// at most 16 sites). Gateways come on top of the members.
    #[arg(long, value_name = "SITE=N,...", default_value = "us-east=2,eu-west=2")]
    pub sites: String,
    /// Gateways per site (1-8).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub gateways: u32,
    #[command(flatten)]
    pub dir: DirArgs,
    /// First two octets of the loopback addresses: site K uses PREFIX.K.0/24.
    #[arg(long, value_name = "127.N", default_value = "127.77")]
    pub addr_prefix: String,
    /// Seconds to wait for the cluster to converge (0: start the agents and return).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub wait: u64,
    /// Real isolation (needs root, `ip` and `nft`): one network namespace per node, a bridge
    /// per site, gateways dual-homed on a WAN bridge, no route between sites. --addr-prefix
    /// does not apply.
    #[arg(long)]
    pub netns: bool,
}

/// Where the lab lives.
#[derive(Debug, clap::Args)]
pub struct DirArgs {
    /// Lab directory. Default: $CLUSTERCTL_LAB_DIR, else $XDG_STATE_HOME/clusterctl/lab, else
    /// $HOME/.local/state/clusterctl/lab.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

impl DirArgs {
    fn resolve(&self) -> anyhow::Result<PathBuf> {
        let dir = self.dir.clone().unwrap_or_else(default_dir);
        std::path::absolute(&dir).with_context(|| format!("lab directory {}", dir.display()))
    }
}

/// Runs a `lab` subcommand.
pub fn run(cmd: LabCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        LabCmd::Up(args) => up(&args),
        LabCmd::Down(args) => down(&args.resolve()?),
        LabCmd::Status(args) => status(&args.resolve()?),
        LabCmd::Fault(cmd) => fault::run(cmd),
        LabCmd::Drill(args) => drill::run(&args),
    }
}

/// The default lab directory: `$CLUSTERCTL_LAB_DIR`, else `$XDG_STATE_HOME/clusterctl/lab`, else
/// `$HOME/.local/state/clusterctl/lab`.
pub fn default_dir() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("CLUSTERCTL_LAB_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(state) = var("XDG_STATE_HOME").map(PathBuf::from) {
        if state.is_absolute() {
            return state.join("clusterctl").join("lab");
        }
    }
    match var("HOME") {
        Some(home) => PathBuf::from(home).join(".local/state/clusterctl/lab"),
        None => std::env::temp_dir().join("clusterctl-lab"),
    }
}

// ---------------------------------------------------------------------------------------------
// Plan: names, addresses, seeds.

/// One node of a planned lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    pub ident: Ident,
    /// Cluster address (QUIC, UDP) other nodes dial (`advertise`).
    pub addr: SocketAddr,
    /// Address the QUIC endpoint binds (`listen`); `addr` except for netns gateways.
    pub listen: SocketAddr,
    /// Address the gateways of other sites dial (`advertise-wan`), when it is not `addr`: a
    /// netns gateway is on its site network and on the WAN.
    pub wan: Option<SocketAddr>,
    /// Control API address (HTTP, TCP).
    pub control: SocketAddr,
    /// `NAME@IP:PORT` of each seed.
    pub seeds: Vec<String>,
}

/// A lab as it will be generated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabPlan {
    pub cluster: ClusterName,
    /// Sites in the order given, each with its gateways.
    pub sites: Vec<(SiteName, Vec<NodeName>)>,
    /// Every node, site by site, gateways first.
    pub nodes: Vec<NodePlan>,
}

impl LabPlan {
    /// Plans a lab from `--sites`, `--gateways` and `--addr-prefix`.
    pub fn new(sites: &str, gateways: u32, addr_prefix: &str) -> anyhow::Result<LabPlan> {
        let sites = parse_sites(sites)?;
        if !(1..=MAX_GATEWAYS).contains(&gateways) {
            bail!("--gateways {gateways}: each site needs 1 to {MAX_GATEWAYS} gateways");
        }
        let prefix = parse_prefix(addr_prefix)?;
        let total: usize = sites.iter().map(|(_, m)| (m + gateways) as usize).sum();
        if total > MAX_NODES {
            bail!("--sites and --gateways ask for {total} agents; a lab runs at most {MAX_NODES}: use fewer sites or members");
        }
        let cluster =
            ClusterName::new(CLUSTER).map_err(|e| anyhow!("cluster name {CLUSTER:?} {e}"))?;
        let codes = site_codes(sites.iter().map(|(s, _)| s));

        let mut nodes: Vec<NodePlan> = Vec::with_capacity(total);
        let mut plan_sites = Vec::with_capacity(sites.len());
        for (k, ((site, members), code)) in sites.iter().zip(&codes).enumerate() {
            let third = u8::try_from(k + 1).map_err(|_| anyhow!("too many sites"))?;
            let mut names = Vec::new();
            let mut site_gateways = Vec::new();
            for g in 1..=gateways {
                let name = node_name(&format!("gw-{code}-{g}"), site)?;
                site_gateways.push(name.clone());
                names.push((name, Role::Gateway));
            }
            for m in 1..=*members {
                names.push((node_name(&format!("edge-{code}-{m}"), site)?, Role::Member));
            }
            for (i, (name, role)) in names.into_iter().enumerate() {
                let fourth =
                    u8::try_from(i + 1).map_err(|_| anyhow!("too many nodes in site {site}"))?;
                let ip = Ipv4Addr::new(prefix[0], prefix[1], third, fourth);
                nodes.push(NodePlan {
                    ident: Ident {
                        name,
                        site: site.clone(),
                        role,
                    },
                    addr: SocketAddr::V4(SocketAddrV4::new(ip, QUIC_PORT)),
                    listen: SocketAddr::V4(SocketAddrV4::new(ip, QUIC_PORT)),
                    wan: None,
                    control: SocketAddr::V4(SocketAddrV4::new(ip, CONTROL_PORT)),
                    seeds: Vec::new(),
                });
            }
            plan_sites.push((site.clone(), site_gateways));
        }
        let mut unique = BTreeSet::new();
        for n in &nodes {
            if !unique.insert(n.ident.name.clone()) {
                bail!(
                    "two lab nodes would both be named {}: give the sites more distinct names",
                    n.ident.name
                );
            }
        }
        assign_seeds(&mut nodes);
        Ok(LabPlan {
            cluster,
            sites: plan_sites,
            nodes,
        })
    }

    /// Renumbers the cluster and control addresses with `addrs(index, node) -> (advertise,
    /// listen, control, advertise-wan)` and seeds again from the new addresses.
    pub fn readdress(
        &mut self,
        mut addrs: impl FnMut(
            usize,
            &NodePlan,
        ) -> (SocketAddr, SocketAddr, SocketAddr, Option<SocketAddr>),
    ) {
        for (i, n) in self.nodes.iter_mut().enumerate() {
            (n.addr, n.listen, n.control, n.wan) = addrs(i, n);
        }
        assign_seeds(&mut self.nodes);
    }

    /// The topology contract: every site with its gateways and nodes, a link between every pair.
    pub fn contract_toml(&self) -> String {
        let mut s =
            String::from("# Topology contract of the lab, generated by `clusterctl lab up`.\n");
        let _ = writeln!(s, "cluster = \"{}\"", self.cluster);
        for (site, gateways) in &self.sites {
            let nodes: Vec<String> = self
                .nodes
                .iter()
                .filter(|n| n.ident.site == *site)
                .map(|n| format!("\"{}\"", n.ident.name))
                .collect();
            let gateways: Vec<String> = gateways.iter().map(|g| format!("\"{g}\"")).collect();
            let _ = write!(
                s,
                "\n[[site]]\nname = \"{site}\"\ngateways = [{}]\nnodes = [{}]\n",
                gateways.join(", "),
                nodes.join(", ")
            );
        }
        for (i, (a, _)) in self.sites.iter().enumerate() {
            for (b, _) in &self.sites[i + 1..] {
                let _ = write!(s, "\n[[link]]\nbetween = [\"{a}\", \"{b}\"]\n");
            }
        }
        s
    }

    /// The agent config of `node`; paths are relative to the node's directory.
    pub fn config_toml(&self, node: &NodePlan) -> String {
        let seeds: Vec<String> = node.seeds.iter().map(|s| format!("\"{s}\"")).collect();
        format!(
            "# Agent config of lab node {name}, generated by `clusterctl lab up`.\n\
             # Reference: docs/config.md. Relative paths are relative to this file's directory.\n\
             cluster = \"{cluster}\"\n\
             name = \"{name}\"\n\
             site = \"{site}\"\n\
             role = \"{role}\"\n\
             listen = \"{listen}\"\n\
             {advertise}\
             {advertise_wan}\
             seeds = [{seeds}]\n\
             data-dir = \"data\"\n\
             control = \"{control}\"\n\
             control-tokens = \"../../tokens\"\n\
             contract = \"../../contract.toml\"\n\
             secret = \"../../secret.key\"\n\
             \n\
             [tls]\n\
             ca = \"../../ca.pem\"\n\
             cert = \"cert.pem\"\n\
             key = \"key.pem\"\n",
            cluster = self.cluster,
            name = node.ident.name,
            site = node.ident.site,
            role = node.ident.role,
            listen = node.listen,
            advertise = if node.listen == node.addr {
                String::new()
            } else {
                format!("advertise = \"{}\"\n", node.addr)
            },
            advertise_wan = node
                .wan
                .map(|w| format!("advertise-wan = \"{w}\"\n"))
                .unwrap_or_default(),
            seeds = seeds.join(", "),
            control = node.control,
        )
    }
}

/// Members seed their whole site; gateways also seed the gateways of every other site. Seeds
/// name the address the seeding node dials: `addr` inside a site, the WAN address (`wan`, when
/// there is one) between sites.
fn assign_seeds(nodes: &mut [NodePlan]) {
    let seed = |me: &NodePlan, o: &NodePlan| {
        let addr = match o.wan {
            Some(wan) if o.ident.site != me.ident.site => wan,
            _ => o.addr,
        };
        format!("{}@{addr}", o.ident.name)
    };
    let seeds: Vec<Vec<String>> = nodes
        .iter()
        .map(|me| {
            nodes
                .iter()
                .filter(|o| o.ident.name != me.ident.name)
                .filter(|o| {
                    o.ident.site == me.ident.site
                        || (me.ident.role == Role::Gateway && o.ident.role == Role::Gateway)
                })
                .map(|o| seed(me, o))
                .collect()
        })
        .collect();
    for (n, s) in nodes.iter_mut().zip(seeds) {
        n.seeds = s;
    }
}

/// Parses `NAME=MEMBERS,...` (a bare `NAME` means 2 members).
fn parse_sites(text: &str) -> anyhow::Result<Vec<(SiteName, u32)>> {
    let mut out: Vec<(SiteName, u32)> = Vec::new();
    for part in text.split(',').map(str::trim) {
        if part.is_empty() {
            bail!("--sites {text:?}: empty entry; write SITE=MEMBERS,... e.g. us-east=2,eu-west=2");
        }
        let (name, count) = match part.split_once('=') {
            Some((n, c)) => (n.trim(), Some(c.trim())),
            None => (part, None),
        };
        let site = SiteName::new(name).map_err(|e| {
            anyhow!("--sites: site name {name:?} {e}; site names are DNS labels such as us-east")
        })?;
        let members = match count {
            None => 2,
            Some(c) => c.parse::<u32>().map_err(|_| {
                anyhow!("--sites: {part:?}: {c:?} is not a member count; write e.g. {name}=2")
            })?,
        };
        if !(1..=MAX_MEMBERS).contains(&members) {
            bail!("--sites: {part:?}: each site needs 1 to {MAX_MEMBERS} members");
        }
        if out.iter().any(|(s, _)| *s == site) {
            bail!("--sites: site {site} is listed twice");
        }
        out.push((site, members));
    }
    if out.len() > MAX_SITES {
        bail!(
            "--sites lists {} sites; a lab has at most {MAX_SITES}",
            out.len()
        );
    }
    Ok(out)
}

/// Parses `127.N`.
fn parse_prefix(text: &str) -> anyhow::Result<[u8; 2]> {
    let bad = || {
        anyhow!("--addr-prefix {text:?}: write the first two octets of a loopback range, 127.N with N 0-255 (e.g. 127.77)")
    };
    let (a, b) = text.trim().split_once('.').ok_or_else(bad)?;
    if a != "127" {
        return Err(bad());
    }
    let b: u8 = b.parse().map_err(|_| bad())?;
    Ok([127, b])
}

/// Short code per site for node names: the part before the first '-', or the whole name when
/// two sites share that part.
fn site_codes<'a>(sites: impl Iterator<Item = &'a SiteName> + Clone) -> Vec<String> {
    let short = |s: &SiteName| {
        s.as_str()
            .split('-')
            .next()
            .unwrap_or(s.as_str())
            .to_string()
    };
    sites
        .clone()
        .map(|s| {
            let code = short(s);
            let shared = sites.clone().filter(|o| short(o) == code).count() > 1;
            if shared {
                s.as_str().to_string()
            } else {
                code
            }
        })
        .collect()
}

fn node_name(name: &str, site: &SiteName) -> anyhow::Result<NodeName> {
    NodeName::new(name).map_err(|e| {
        anyhow!("lab node name {name:?} (for site {site}) {e}: use a shorter site name")
    })
}

// ---------------------------------------------------------------------------------------------
// Generation: files on disk.

/// Writes the lab into `dir`: `ca.pem`, `ca.key`, `contract.toml` and per node
/// `nodes/NAME/{config.toml, cert.pem, key.pem, data/}`. A previous lab's `nodes/` is removed
/// first, so data directories start empty. Refuses a non-empty directory that holds no lab.
pub fn generate(plan: &LabPlan, dir: &Path) -> anyhow::Result<()> {
    prepare_dir(dir)?;
    let ca = pki::generate_ca(&plan.cluster, Validity::days_from_now(CA_DAYS))
        .context("generating the lab CA")?;
    write_file(&dir.join("ca.pem"), &ca.cert_pem)?;
    write_private(&dir.join("ca.key"), &ca.key_pem)?;
    let contract = plan.contract_toml();
    Contract::parse(&contract).map_err(|e| anyhow!("generated contract is invalid: {e}"))?;
    write_file(&dir.join("contract.toml"), &contract)?;
    write_private(&dir.join("secret.key"), &new_secret()?.to_text())?;
    write_tokens(&dir.join(TOKENS_DIR))?;
    for node in &plan.nodes {
        let nd = node_dir(dir, &node.ident.name);
        std::fs::create_dir_all(nd.join("data"))
            .with_context(|| format!("cannot create {}", nd.join("data").display()))?;
        let pair = pki::issue_node_cert(
            &ca,
            &plan.cluster,
            &node.ident,
            Validity::days_from_now(NODE_DAYS),
        )
        .with_context(|| format!("issuing the certificate of {}", node.ident.name))?;
        write_file(&nd.join("cert.pem"), &pair.cert_pem)?;
        write_private(&nd.join("key.pem"), &pair.key_pem)?;
        write_file(&nd.join("config.toml"), &plan.config_toml(node))?;
    }
    Ok(())
}

/// Directory of the lab's control tokens (`DIR/tokens/{read,app,admin}.token`).
pub const TOKENS_DIR: &str = "tokens";

/// Writes `dir/{read,app,admin}.token` (0600, in a 0700 directory), keeping tokens that exist.
pub fn write_tokens(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
    for (_, file) in clusterctl_node::auth::TOKEN_FILES {
        let path = dir.join(file);
        clusterctl_node::auth::ensure_token_file(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// A fresh random cluster secret for a lab.
fn new_secret() -> anyhow::Result<clusterctl_core::secret::Secret> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow!("the system random number generator failed"))?;
    clusterctl_core::secret::Secret::from_bytes(&bytes).map_err(|e| anyhow!("{e}"))
}

/// The control socket of lab node `name` (the agent's default, `data/control.sock`).
fn socket_path(dir: &Path, name: &NodeName) -> PathBuf {
    node_dir(dir, name).join("data").join("control.sock")
}

/// [`socket_path`] as an `--agent` value.
fn socket_endpoint(dir: &Path, name: &NodeName) -> String {
    format!("unix:{}", socket_path(dir, name).display())
}

fn node_dir(dir: &Path, name: &NodeName) -> PathBuf {
    dir.join("nodes").join(name.as_str())
}

/// Creates `dir` (mode 0700) or checks that it is empty or a previous lab; removes old `nodes/`.
fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create lab directory {}", dir.display()))?;
    } else if !dir.join(MARKER).exists() {
        let mut entries = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read lab directory {}", dir.display()))?;
        if entries.next().is_some() {
            bail!(
                "{} is not empty and holds no lab: pass --dir with a new or empty directory",
                dir.display()
            );
        }
    }
    write_file(
        &dir.join(MARKER),
        "This directory was generated by `clusterctl lab up`; `lab up` replaces its nodes/.\n",
    )?;
    let nodes = dir.join("nodes");
    match std::fs::remove_dir_all(&nodes) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow!(
            "cannot remove the previous lab's {}: {e}",
            nodes.display()
        )),
    }
}

fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Writes a private key readable by its owner only (mode 0600 from creation on).
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(anyhow!("cannot replace {}: {e}", path.display())),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// up

fn up(args: &UpArgs) -> anyhow::Result<ExitCode> {
    let dir = args.dir.resolve()?;
    if args.netns {
        return netns::up(args, &dir);
    }
    let plan = LabPlan::new(&args.sites, args.gateways, &args.addr_prefix)?;
    if args.wait > MAX_WAIT_SECS {
        bail!("--wait {}: at most {MAX_WAIT_SECS} seconds", args.wait);
    }
    refuse_running_lab(&dir)?;
    check_addresses_free(&plan)?;
    generate(&plan, &dir)?;

    let exe = std::env::current_exe().context("cannot find the clusterctl executable")?;
    let mut state = LabState {
        format: STATE_FORMAT,
        cluster: plan.cluster.to_string(),
        dir: dir.clone(),
        nodes: Vec::with_capacity(plan.nodes.len()),
        netns: None,
    };
    state.save(&dir)?;
    start_agents(args, &plan, &dir, &exe, &mut state)
}

/// Exit 2 (an error) when a lab in `dir` still has running agents.
fn refuse_running_lab(dir: &Path) -> anyhow::Result<()> {
    if let Some(state) = LabState::load(dir)? {
        if !state.running_nodes().is_empty() {
            bail!(
                "a lab is already running in {}: run `clusterctl lab down{}` first",
                dir.display(),
                dir_flag(dir)
            );
        }
        if state.netns.is_some() {
            bail!(
                "{} still records the networks of a netns lab: remove them with `clusterctl lab down{}` first",
                dir.display(),
                dir_flag(dir)
            );
        }
    }
    Ok(())
}

/// Starts one agent per planned node (recording each in `state`), then waits per `--wait`.
fn start_agents(
    args: &UpArgs,
    plan: &LabPlan,
    dir: &Path,
    exe: &Path,
    state: &mut LabState,
) -> anyhow::Result<ExitCode> {
    let dir = dir.to_path_buf();
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(plan.nodes.len());
    for (i, node) in plan.nodes.iter().enumerate() {
        let netns = state
            .netns
            .as_ref()
            .map(|s| s.node_netns(node.ident.name.as_str()));
        let (child, record) = spawn_agent(exe, &dir, node, netns.as_deref()).with_context(|| {
            format!(
                "starting the agent of {} (agents already started: clean up with `clusterctl lab down{}`)",
                node.ident.name,
                dir_flag(&dir)
            )
        })?;
        state.nodes.push(record);
        state.save(&dir)?;
        children.push((i, child));
    }
    eprintln!("started {} agents in {}", plan.nodes.len(), dir.display());
    if args.wait == 0 {
        eprintln!(
            "not waiting for the cluster (--wait 0); see `clusterctl lab status{}`",
            dir_flag(&dir)
        );
        return Ok(ExitCode::SUCCESS);
    }
    wait_for_convergence(plan, &dir, &mut children, Duration::from_secs(args.wait))
}

/// ` --dir DIR` when `dir` is not the default, so printed commands work as typed.
fn dir_flag(dir: &Path) -> String {
    let default = std::path::absolute(default_dir()).unwrap_or_else(|_| default_dir());
    if dir == default {
        String::new()
    } else {
        format!(" --dir {}", dir.display())
    }
}

/// Binds every lab address for a moment, so a busy port is reported before anything is touched.
fn check_addresses_free(plan: &LabPlan) -> anyhow::Result<()> {
    for n in &plan.nodes {
        let hint = "another lab may be running: stop it with `clusterctl lab down --dir ITS_DIR`, or pass another --addr-prefix such as 127.78";
        std::net::UdpSocket::bind(n.addr).map_err(|e| {
            anyhow!(
                "cannot use {} (UDP) for {}: {e}; {hint}",
                n.addr,
                n.ident.name
            )
        })?;
        std::net::TcpListener::bind(n.control).map_err(|e| {
            anyhow!(
                "cannot use {} (TCP) for {}: {e}; {hint}",
                n.control,
                n.ident.name
            )
        })?;
    }
    Ok(())
}

/// Starts the agent of `node` (inside network namespace `netns` when given).
fn spawn_agent(
    exe: &Path,
    dir: &Path,
    node: &NodePlan,
    netns: Option<&str>,
) -> anyhow::Result<(Child, LabNode)> {
    let nd = node_dir(dir, &node.ident.name);
    let config = nd.join("config.toml");
    let (pid, pid_start, child) = spawn_process(exe, &nd, &config, netns)?;
    let record = LabNode {
        name: node.ident.name.to_string(),
        site: node.ident.site.to_string(),
        role: node.ident.role,
        addr: node.addr.to_string(),
        control: node.control.to_string(),
        socket: socket_path(dir, &node.ident.name),
        config,
        pid,
        pid_start,
    };
    Ok((child, record))
}

/// Starts the agent of lab node `name` again, as `up` started it (same config, same log, same
/// network namespace), once its previous agent has stopped; records the new process in
/// `DIR/lab.json` so that `down` stops it. The caller reaps the returned child.
pub(crate) fn start_again(dir: &Path, name: &str) -> anyhow::Result<Child> {
    let mut state = LabState::load(dir)?
        .ok_or_else(|| anyhow!("no lab in {}: run `clusterctl lab up` first", dir.display()))?;
    let node = state
        .nodes
        .iter()
        .find(|n| n.name == name)
        .cloned()
        .ok_or_else(|| anyhow!("the lab in {} has no node {name}", dir.display()))?;
    if node.is_running() {
        bail!(
            "the agent of {name} (pid {}) still runs: stop it before starting it again",
            node.pid
        );
    }
    let exe = std::env::current_exe().context("cannot find the clusterctl executable")?;
    let nd = node
        .config
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| dir.join("nodes").join(name));
    let netns = state.netns.as_ref().map(|s| s.node_netns(name));
    let (pid, pid_start, child) = spawn_process(&exe, &nd, &node.config, netns.as_deref())?;
    if let Some(rec) = state.nodes.iter_mut().find(|r| r.name == name) {
        rec.pid = pid;
        rec.pid_start = pid_start;
    }
    state.save(dir)?;
    Ok(child)
}

/// Runs `clusterctl agent --config CONFIG` (through `ip netns exec NS` when `netns` is given,
/// which execs into the agent, so the pid is the agent's) with its output appended to
/// `NODE_DIR/agent.log`, in its own process group. Returns the pid and its start time.
fn spawn_process(
    exe: &Path,
    nd: &Path,
    config: &Path,
    netns: Option<&str>,
) -> anyhow::Result<(u32, u64, Child)> {
    spawn_process_with_secret(exe, nd, config, netns, None)
}

/// Starts an agent as [`spawn_process`] does; with `secret`, as `agent --secret FILE` (only
/// that cluster secret, replacing the node's keyring).
fn spawn_process_with_secret(
    exe: &Path,
    nd: &Path,
    config: &Path,
    netns: Option<&str>,
    secret: Option<&Path>,
) -> anyhow::Result<(u32, u64, Child)> {
    let log_path = nd.join("agent.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let log2 = log.try_clone()?;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let child = cmd
        .arg("agent")
        .arg("--config")
        .arg(config)
        .args(
            secret
                .map(|f| [std::ffi::OsStr::new("--secret"), f.as_os_str()])
                .into_iter()
                .flatten(),
        )
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Its own process group: a Ctrl-C in this terminal does not reach the agents.
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot run {}", exe.display()))?;
    let pid = child.id();
    let pid_start = proc_start_time(pid)
        .ok_or_else(|| anyhow!("cannot read /proc/{pid}/stat of the agent just started"))?;
    Ok((pid, pid_start, child))
}

/// How far the cluster is, as seen by one node.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Progress {
    links_up: usize,
    links: usize,
    alive: usize,
    nodes: usize,
    healthy: bool,
}

impl Progress {
    fn of(t: &Topology, expected: &[NodePlan]) -> Progress {
        let expected_links = t.links.iter().filter(|l| l.expected);
        let alive = expected
            .iter()
            .filter(|n| {
                t.sites
                    .iter()
                    .flat_map(|s| &s.nodes)
                    .any(|v| v.name == n.ident.name.as_str() && v.status == NodeStatus::Alive)
            })
            .count();
        Progress {
            links_up: expected_links
                .clone()
                .filter(|l| l.state == LinkState::Up)
                .count(),
            links: expected_links.count(),
            alive,
            nodes: expected.len(),
            healthy: t.healthy,
        }
    }

    fn done(&self) -> bool {
        self.healthy && self.alive == self.nodes && self.links_up == self.links
    }

    fn line(&self) -> String {
        format!(
            "{}/{} links up, {}/{} nodes alive",
            self.links_up, self.links, self.alive, self.nodes
        )
    }
}

fn wait_for_convergence(
    plan: &LabPlan,
    dir: &Path,
    children: &mut [(usize, Child)],
    wait: Duration,
) -> anyhow::Result<ExitCode> {
    let Some(observer) = plan.nodes.first() else {
        bail!("the lab has no nodes");
    };
    let probe = Client::with_timeout(
        &socket_endpoint(dir, &observer.ident.name),
        Duration::from_secs(2),
    );
    let deadline = Instant::now() + wait;
    let mut shown = String::new();
    let mut last: Option<(Topology, Progress)> = None;
    let mut last_error = String::new();
    loop {
        for (i, child) in children.iter_mut() {
            if let Some(status) = child.try_wait()? {
                let node = &plan.nodes[*i];
                let log = node_dir(dir, &node.ident.name).join("agent.log");
                eprintln!(
                    "agent {} exited early ({status}); last lines of {}:",
                    node.ident.name,
                    log.display()
                );
                for line in log_tail(&log, LOG_TAIL_LINES) {
                    eprintln!("  {line}");
                }
                eprintln!(
                    "stop the other agents with `clusterctl lab down{}`",
                    dir_flag(dir)
                );
                return Ok(ExitCode::from(1));
            }
        }
        let line = match probe.get::<Topology>("/v1/topology") {
            Ok(t) => {
                let p = Progress::of(&t, &plan.nodes);
                let line = if p.done() {
                    // One node seeing the whole cluster is not enough: a ping from a node whose
                    // table lags behind would find no route. Done when every node sees it all.
                    match lagging(plan, dir) {
                        None => {
                            println!("{}", crate::topology::render_text(&t));
                            eprintln!("{}", hint(plan, dir));
                            return Ok(ExitCode::SUCCESS);
                        }
                        Some(behind) => format!("{}; {behind}", p.line()),
                    }
                } else {
                    p.line()
                };
                last = Some((t, p));
                line
            }
            Err(e) => {
                last_error = format!("{e:#}");
                format!(
                    "no answer from {} at {} yet",
                    observer.ident.name, observer.control
                )
            }
        };
        if line != shown {
            eprintln!("waiting for the cluster: {line}");
            shown = line;
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(POLL);
    }
    let logs = dir.join("nodes/*/agent.log");
    match last {
        Some((t, p)) => {
            println!("{}", crate::topology::render_text(&t));
            eprintln!(
                "the cluster did not converge in {} s ({}); agent logs: {}",
                wait.as_secs(),
                p.line(),
                logs.display()
            );
        }
        None => eprintln!(
            "no topology from {} in {} s ({last_error}); see {}",
            observer.ident.name,
            wait.as_secs(),
            node_dir(dir, &observer.ident.name)
                .join("agent.log")
                .display()
        ),
    }
    eprintln!(
        "the agents keep running; stop them with `clusterctl lab down{}`",
        dir_flag(dir)
    );
    Ok(ExitCode::from(1))
}

/// The first node (after the observer) that does not yet see every expected link up and every
/// node alive, with how far it is; `None` when every node sees the whole cluster.
fn lagging(plan: &LabPlan, dir: &Path) -> Option<String> {
    for node in plan.nodes.iter().skip(1) {
        let client = Client::with_timeout(
            &socket_endpoint(dir, &node.ident.name),
            Duration::from_secs(2),
        );
        let behind = match client.get::<Topology>("/v1/topology") {
            Ok(t) => {
                let p = Progress::of(&t, &plan.nodes);
                if p.done() {
                    continue;
                }
                p.line()
            }
            Err(_) => "no answer".to_string(),
        };
        return Some(format!("{} sees {behind}", node.ident.name));
    }
    None
}

fn hint(plan: &LabPlan, dir: &Path) -> String {
    let members: Vec<&NodePlan> = plan
        .nodes
        .iter()
        .filter(|n| n.ident.role == Role::Member)
        .collect();
    let flag = dir_flag(dir);
    // Outside the default lab directory the CLI cannot find the lab by itself: name the agent.
    let agent = match (flag.is_empty(), plan.nodes.first()) {
        (false, Some(n)) => format!(" --agent {}", socket_endpoint(dir, &n.ident.name)),
        _ => String::new(),
    };
    let ping = match (members.first(), members.last()) {
        (Some(from), Some(to)) if from.ident.name != to.ident.name => format!(
            " | clusterctl ping {} --from {}{agent}",
            to.ident.name, from.ident.name
        ),
        _ => String::new(),
    };
    format!(
        "lab is up in {}; try: clusterctl topology{agent}{ping} | clusterctl lab down{flag}",
        dir.display()
    )
}

/// The last `n` lines of a log file (reads at most its last 64 KiB).
fn log_tail(path: &Path, n: usize) -> Vec<String> {
    const TAIL_BYTES: u64 = 64 << 10;
    let Ok(mut f) = std::fs::File::open(path) else {
        return vec![format!("(cannot read {})", path.display())];
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
    let mut bytes = Vec::new();
    let _ = f.take(TAIL_BYTES).read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return vec!["(the log is empty)".to_string()];
    }
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// down, status

fn down(dir: &Path) -> anyhow::Result<ExitCode> {
    let Some(state) = LabState::load(dir)? else {
        println!("no lab running in {}", dir.display());
        return Ok(ExitCode::SUCCESS);
    };
    let mut stopping: Vec<&LabNode> = state.running_nodes();
    let count = stopping.len();
    for n in &stopping {
        if state.netns.is_some() {
            // A paused agent (`lab fault pause`) handles SIGTERM only once continued.
            signal("CONT", n.pid);
        }
        signal("TERM", n.pid);
    }
    let deadline = Instant::now() + STOP_GRACE;
    while !stopping.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        stopping.retain(|n| n.is_running());
    }
    let mut killed = Vec::new();
    for n in stopping {
        // Checked again right before the signal: only the process this lab started.
        if n.is_running() {
            signal("KILL", n.pid);
            killed.push(n);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while killed.iter().any(|n| n.is_running()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for n in &killed {
        eprintln!(
            "agent {} (pid {}) did not stop within {} s of SIGTERM and was killed",
            n.name,
            n.pid,
            STOP_GRACE.as_secs()
        );
    }
    if let Some(n) = killed.iter().find(|n| n.is_running()) {
        bail!(
            "agent {} (pid {}) is still running after SIGKILL; {} is kept",
            n.name,
            n.pid,
            dir.join(STATE_FILE).display()
        );
    }
    let removed = match &state.netns {
        Some(ns) => format!("; {}", netns::teardown(dir, ns)?),
        None => String::new(),
    };
    let path = dir.join(STATE_FILE);
    std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    println!(
        "stopped {count} agent{} of the lab in {}{removed}; files and logs are kept (agent logs: {})",
        if count == 1 { "" } else { "s" },
        dir.display(),
        dir.join("nodes/*/agent.log").display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Sends `SIG` to `pid` with kill(1); a process that is already gone is not an error.
pub(crate) fn signal(sig: &str, pid: u32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn status(dir: &Path) -> anyhow::Result<ExitCode> {
    let Some(state) = LabState::load(dir)? else {
        eprintln!(
            "no lab in {}: start one with `clusterctl lab up{}`",
            dir.display(),
            dir_flag(dir)
        );
        return Ok(ExitCode::from(2));
    };
    let rows: Vec<[String; 7]> = state
        .nodes
        .iter()
        .map(|n| {
            [
                n.name.clone(),
                n.site.clone(),
                n.role.to_string(),
                n.addr.clone(),
                n.control.clone(),
                n.pid.to_string(),
                if n.is_running() { "running" } else { "stopped" }.to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["NAME", "SITE", "ROLE", "ADDR", "CONTROL", "PID", "STATE"],
            &rows
        )
    );
    if let Some(ns) = &state.netns {
        println!("{}", ns.status_line());
    }
    let stopped = rows.iter().filter(|r| r[6] == "stopped").count();
    if stopped == 0 && !rows.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "{stopped} of {} agents stopped; logs: {}",
            rows.len(),
            dir.join("nodes/*/agent.log").display()
        );
        Ok(ExitCode::from(1))
    }
}

/// Left-aligned columns separated by two spaces.
fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == N {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clusterctl_node::config::AgentConfig;
    use std::os::unix::fs::PermissionsExt;

    fn default_plan() -> LabPlan {
        LabPlan::new("us-east=2,eu-west=2", 1, "127.77").unwrap()
    }

    fn names(plan: &LabPlan) -> Vec<&str> {
        plan.nodes.iter().map(|n| n.ident.name.as_str()).collect()
    }

    #[test]
    fn lab_plan_names_and_addresses_follow_the_plan() {
        let plan = default_plan();
        assert_eq!(
            names(&plan),
            [
                "gw-us-1",
                "edge-us-1",
                "edge-us-2",
                "gw-eu-1",
                "edge-eu-1",
                "edge-eu-2"
            ]
        );
        let eu2 = &plan.nodes[5];
        assert_eq!(eu2.addr, "127.77.2.3:7400".parse().unwrap());
        assert_eq!(eu2.control, "127.77.2.3:7401".parse().unwrap());
        assert_eq!(plan.nodes[0].addr, "127.77.1.1:7400".parse().unwrap());
        assert_eq!(plan.nodes[0].ident.role, Role::Gateway);
    }

    #[test]
    fn lab_seeds_stay_in_the_site_except_between_gateways() {
        let plan = default_plan();
        let seeds = |i: usize| plan.nodes[i].seeds.clone();
        assert_eq!(
            seeds(1),
            ["gw-us-1@127.77.1.1:7400", "edge-us-2@127.77.1.3:7400"]
        );
        assert_eq!(
            seeds(0),
            [
                "edge-us-1@127.77.1.2:7400",
                "edge-us-2@127.77.1.3:7400",
                "gw-eu-1@127.77.2.1:7400"
            ]
        );
    }

    #[test]
    fn lab_site_codes_fall_back_to_full_names_when_shared() {
        let plan = LabPlan::new("us-east=1,us-west=1,eu=1", 2, "127.78").unwrap();
        assert_eq!(
            names(&plan),
            [
                "gw-us-east-1",
                "gw-us-east-2",
                "edge-us-east-1",
                "gw-us-west-1",
                "gw-us-west-2",
                "edge-us-west-1",
                "gw-eu-1",
                "gw-eu-2",
                "edge-eu-1"
            ]
        );
        assert_eq!(plan.nodes[8].addr, "127.78.3.3:7400".parse().unwrap());
    }

    #[test]
    fn lab_args_are_validated() {
        for (sites, gateways, prefix, needle) in [
            ("US=2", 1, "127.77", "site name"),
            ("a=0", 1, "127.77", "1 to 50"),
            ("a=51", 1, "127.77", "1 to 50"),
            ("a=x", 1, "127.77", "not a member count"),
            ("a=1,a=2", 1, "127.77", "twice"),
            ("a=1,", 1, "127.77", "empty entry"),
            ("a=1", 0, "127.77", "1 to 8"),
            ("a=1", 9, "127.77", "1 to 8"),
            ("a=1", 1, "10.0", "127.N"),
            ("a=1", 1, "127.300", "127.N"),
            ("a=1", 1, "127", "127.N"),
            ("a=50,b=50,c=50,d=50", 8, "127.77", "at most 200"),
        ] {
            let e = LabPlan::new(sites, gateways, prefix).unwrap_err();
            assert!(
                e.to_string().contains(needle),
                "{sites} {gateways} {prefix}: {e}"
            );
        }
        let many: Vec<String> = (0..17).map(|i| format!("s{i}=1")).collect();
        let e = LabPlan::new(&many.join(","), 1, "127.77").unwrap_err();
        assert!(e.to_string().contains("at most 16"), "{e}");
        let plan = LabPlan::new("a,b=3", 1, "127.77").unwrap();
        assert_eq!(plan.nodes.len(), 3 + 4, "a bare site name means 2 members");
    }

    #[test]
    fn lab_generated_configs_load_with_their_seeds_and_addresses() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("lab");
        let plan = default_plan();
        generate(&plan, &dir).unwrap();
        let contract =
            Contract::parse(&std::fs::read_to_string(dir.join("contract.toml")).unwrap()).unwrap();
        assert_eq!(contract.sites().count(), 2);
        assert_eq!(contract.links().count(), 1);
        let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir.join("ca.key")), 0o600);
        assert_eq!(mode(dir.join("tokens")), 0o700);
        for scope in ["read", "app", "admin"] {
            assert_eq!(mode(dir.join(format!("tokens/{scope}.token"))), 0o600);
        }
        for node in &plan.nodes {
            let nd = dir.join("nodes").join(node.ident.name.as_str());
            assert_eq!(mode(nd.join("key.pem")), 0o600);
            let c = AgentConfig::load(&nd.join("config.toml"))
                .unwrap_or_else(|e| panic!("{}: {e}", node.ident.name));
            assert_eq!(c.ident, node.ident);
            assert_eq!(c.cluster.as_str(), CLUSTER);
            assert_eq!(c.listen, node.addr);
            assert_eq!(c.advertise, node.addr);
            assert_eq!(c.control, Some(node.control));
            assert!(c.control_tokens.is_some(), "the TCP listener has tokens");
            assert_eq!(c.control_socket, socket_path(&dir, &node.ident.name));
            assert_eq!(c.data_dir, nd.join("data"));
            assert!(c.data_dir.is_dir());
            assert!(!c.insecure && c.tls.is_some());
            assert_eq!(c.contract.hash(), contract.hash());
            let seeds: Vec<String> = c.seeds.iter().map(|s| s.to_string()).collect();
            assert_eq!(seeds, node.seeds, "{}", node.ident.name);
            for s in &c.seeds {
                let peer = plan.nodes.iter().find(|n| n.ident.name == s.name).unwrap();
                assert_eq!(s.addr, peer.addr);
                if node.ident.role == Role::Member {
                    assert_eq!(
                        peer.ident.site, node.ident.site,
                        "members seed their own site"
                    );
                }
            }
        }
    }

    #[test]
    fn lab_regeneration_replaces_nodes_and_refuses_foreign_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("lab");
        generate(&default_plan(), &dir).unwrap();
        let stale = dir.join("nodes/edge-us-1/data/table.snapshot");
        std::fs::write(&stale, "old").unwrap();
        std::fs::write(dir.join("nodes/edge-us-1/agent.log"), "old log").unwrap();
        generate(&LabPlan::new("us-east=1", 1, "127.77").unwrap(), &dir).unwrap();
        assert!(!stale.exists(), "a new lab starts with empty data dirs");
        assert!(!dir.join("nodes/edge-us-2").exists());

        let foreign = tmp.path().join("foreign");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::write(foreign.join("precious"), "x").unwrap();
        let e = generate(&default_plan(), &foreign).unwrap_err();
        assert!(e.to_string().contains("holds no lab"), "{e}");
        assert!(foreign.join("precious").exists());
    }

    #[test]
    fn lab_status_table_aligns_columns() {
        let t = table(
            &["NAME", "STATE"],
            &[
                ["gw-us-1".to_string(), "running".to_string()],
                ["a".to_string(), "stopped".to_string()],
            ],
        );
        assert_eq!(t, "NAME     STATE\ngw-us-1  running\na        stopped\n");
    }

    #[test]
    fn lab_log_tail_keeps_the_last_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("agent.log");
        let text: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, text).unwrap();
        let tail = log_tail(&log, 20);
        assert_eq!(tail.len(), 20);
        assert_eq!(tail[0], "line 11");
        assert_eq!(tail[19], "line 30");
    }

    #[test]
    fn lab_progress_counts_expected_links_and_alive_nodes() {
        use clusterctl_api::{LinkKind, LinkView, NodeView, SiteView};
        let plan = LabPlan::new("us-east=1", 1, "127.77").unwrap();
        let node = |name: &str, role, status| NodeView {
            name: name.into(),
            site: "us-east".into(),
            role,
            status,
            clock: 1,
            addr: String::new(),
            contract_hash: String::new(),
            drift: false,
        };
        let link = |state, expected| LinkView {
            from: "edge-us-1".into(),
            to: "gw-us-1".into(),
            kind: LinkKind::Site,
            state,
            secure: true,
            rtt_ms: None,
            since: None,
            protocol: None,
            reason: None,
            expected,
            secret_key: None,
            cert_days_left: None,
            cipher_suite: None,
            identities: Vec::new(),
        };
        let mut t = Topology {
            cluster: CLUSTER.into(),
            observer: "gw-us-1".into(),
            contract_hash: String::new(),
            secure: true,
            insecure_reason: None,
            healthy: false,
            problems: Vec::new(),
            sites: vec![SiteView {
                name: "us-east".into(),
                nodes: vec![
                    node("gw-us-1", Role::Gateway, NodeStatus::Alive),
                    node("edge-us-1", Role::Member, NodeStatus::Suspect),
                ],
                gateways: vec!["gw-us-1".into()],
            }],
            links: vec![link(LinkState::Down, true), link(LinkState::Refused, false)],
            probes: None,
            warnings: Vec::new(),
            generated_at: String::new(),
        };
        let p = Progress::of(&t, &plan.nodes);
        assert_eq!(p.line(), "0/1 links up, 1/2 nodes alive");
        assert!(!p.done());
        t.sites[0].nodes[1].status = NodeStatus::Alive;
        t.links[0].state = LinkState::Up;
        t.healthy = true;
        let p = Progress::of(&t, &plan.nodes);
        assert_eq!(p.line(), "1/1 links up, 2/2 nodes alive");
        assert!(p.done());
    }
}
