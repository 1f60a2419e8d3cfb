//! `clusterctl lab drill NAME`: a scripted failure drill against a fresh netns lab.
//!
//! Each drill starts its own netns lab (own prefix, own directory), injects its fault with the
//! same code as `lab fault`, watches the cluster through the agents' control APIs (members,
//! events, ping, topology), heals, waits for recovery, tears the lab down and prints a verdict
//! with its figures:
//!
//! - detection: fault injected -> the expected state seen (by the nodes the drill names);
//! - recovery: heal -> every expected link up, every node alive everywhere, node tables agree;
//! - false suspicions: `node-suspect`/`node-dead` events about nodes that were healthy;
//! - lost probes: pings that failed during the drill, of those sent.

use super::fault::{self, Fault};
use super::netns;
use super::{DirArgs, LabNode, LabState, UpArgs};
use crate::client::Client;
use anyhow::{bail, Context};
use clusterctl_api::{
    Event, EventKind, LinkState, Members, NodeStatus, PingReport, PingRequest, Role, Secrets,
    Topology,
};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Longest `--duration`, in seconds.
const MAX_DURATION: u64 = 3600;
/// How long the lab may take to converge, and the cluster to recover after a heal.
const CONVERGE_LIMIT: Duration = Duration::from_secs(90);
/// Time allowed for each control API request.
const API_TIMEOUT: Duration = Duration::from_secs(5);

/// The drills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DrillName {
    /// Converge, cross-site pings, no route out of a site, no suspicion (10 s of pings).
    GoldenPath,
    /// Cut the WAN (20 s): sites keep working inside, the far site is unreachable, never dead.
    WanPartition,
    /// Two gateways per site, kill the one in use (20 s): pings resume through the other.
    GatewayFailover,
    /// 5% loss on the WAN (120 s): no node declared dead anywhere, lost probes counted.
    LossyWan,
    /// Restart a node with only a new secret (refused, 20 s), then rotate with the keyring
    /// procedure and a rolling restart: zero refused links, zero lost probes.
    RollingRestartSecret,
    /// Pause one member 3 s every 20 s (60 s): nobody declared dead, its accusations counted.
    SlowNode,
    /// Re-point a seed's host name to another node (20 s): preflight reports DNS drift, the
    /// agent's refusals are shown as they are.
    DnsDrift,
    /// Drop IP from gw-us to gw-eu only (90 s): the link is reported one-way with its direction
    /// at every poll of the last 45 s (at most 3 s apart), and no node flaps between alive and
    /// dead.
    OneWay,
}

impl DrillName {
    fn as_str(self) -> &'static str {
        match self {
            DrillName::GoldenPath => "golden-path",
            DrillName::WanPartition => "wan-partition",
            DrillName::GatewayFailover => "gateway-failover",
            DrillName::LossyWan => "lossy-wan",
            DrillName::RollingRestartSecret => "rolling-restart-secret",
            DrillName::SlowNode => "slow-node",
            DrillName::DnsDrift => "dns-drift",
            DrillName::OneWay => "one-way",
        }
    }

    /// Seconds the fault (or, for golden-path, the ping phase) lasts by default.
    fn default_duration(self) -> u64 {
        match self {
            DrillName::GoldenPath => 10,
            DrillName::WanPartition
            | DrillName::GatewayFailover
            | DrillName::RollingRestartSecret
            | DrillName::DnsDrift => 20,
            DrillName::SlowNode => 60,
            DrillName::OneWay => 90,
            DrillName::LossyWan => 120,
        }
    }
}

/// Arguments of `lab drill`.
#[derive(Debug, clap::Args)]
pub struct DrillArgs {
    /// The drill to run.
    #[arg(value_enum)]
    pub name: DrillName,
    /// Seconds the fault is held (golden-path: seconds of pings). Default: per drill.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=MAX_DURATION))]
    pub duration: Option<u64>,
    /// Directory of the drill's lab. Default: a new directory under the temporary directory,
    /// removed after a PASS.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Keep the lab directory (configs, agent logs, netns.log) after a PASS too.
    #[arg(long)]
    pub keep: bool,
}

/// The result of a drill.
#[derive(Debug, Default)]
struct Verdict {
    checks: Vec<(bool, String)>,
    convergence: Option<Duration>,
    detection: Option<Duration>,
    failover: Option<Duration>,
    recovery: Option<Duration>,
    false_suspicions: usize,
    lost: u32,
    probes: u32,
    /// Figures of one drill only, printed after the common ones and appended to the
    /// `figures:` line as `key=value`.
    extra: Vec<(&'static str, String)>,
    notes: Vec<String>,
}

impl Verdict {
    fn check(&mut self, ok: bool, what: impl Into<String>) {
        self.checks.push((ok, what.into()));
    }

    fn pass(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|(ok, _)| *ok)
    }

    fn render(&self, name: DrillName, lab: &str, held: u64) -> String {
        let secs =
            |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.2}", d.as_secs_f64()));
        let mut s = String::new();
        let _ = writeln!(
            s,
            "drill {}: {}   ({lab}, fault held {held} s)",
            name.as_str(),
            if self.pass() { "PASS" } else { "FAIL" }
        );
        let _ = writeln!(s, "  convergence       {} s", secs(self.convergence));
        let _ = writeln!(s, "  detection         {} s", secs(self.detection));
        if name == DrillName::GatewayFailover {
            let _ = writeln!(s, "  failover          {} s", secs(self.failover));
        }
        let _ = writeln!(s, "  recovery          {} s", secs(self.recovery));
        let _ = writeln!(s, "  false suspicions  {}", self.false_suspicions);
        let _ = writeln!(s, "  lost probes       {}/{}", self.lost, self.probes);
        for (k, val) in &self.extra {
            let _ = writeln!(s, "  {:<17} {val}", k.replace('_', " "));
        }
        for (ok, what) in &self.checks {
            let _ = writeln!(s, "  {}  {what}", if *ok { "ok  " } else { "FAIL" });
        }
        for n in &self.notes {
            let _ = writeln!(s, "  note  {n}");
        }
        let _ = write!(
            s,
            "figures: drill={} verdict={} convergence_s={} detection_s={} failover_s={} recovery_s={} false_suspicions={} lost_probes={} probes={}",
            name.as_str(),
            if self.pass() { "PASS" } else { "FAIL" },
            secs(self.convergence),
            secs(self.detection),
            secs(self.failover),
            secs(self.recovery),
            self.false_suspicions,
            self.lost,
            self.probes
        );
        for (k, val) in &self.extra {
            let _ = write!(s, " {k}={val}");
        }
        s
    }
}

/// Stops the drill's lab however the drill ends.
struct LabGuard {
    dir: PathBuf,
    armed: bool,
}

impl LabGuard {
    fn down(&mut self) -> anyhow::Result<()> {
        self.armed = false;
        super::down(&self.dir).map(|_| ())
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = super::down(&self.dir) {
                eprintln!("clusterctl: stopping the drill's lab: {e:#}");
            }
        }
    }
}

/// Runs `lab drill`.
pub fn run(args: &DrillArgs) -> anyhow::Result<ExitCode> {
    if let Some(why) = netns::missing_requirements() {
        bail!("{}", why.replace("lab up --netns", "lab drill"));
    }
    let held = args.duration.unwrap_or(args.name.default_duration());
    let (dir, temporary) = match &args.dir {
        Some(d) => (std::path::absolute(d)?, false),
        None => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let d = std::env::temp_dir().join(format!(
                "clusterctl-drill-{}-{}-{nanos:08x}",
                args.name.as_str(),
                std::process::id()
            ));
            (d, true)
        }
    };
    let gateways = if args.name == DrillName::GatewayFailover {
        2
    } else {
        1
    };
    let up = UpArgs {
        sites: "us-east=2,eu-west=2".into(),
        gateways,
        dir: DirArgs {
            dir: Some(dir.clone()),
        },
        addr_prefix: "127.77".into(),
        wait: 0,
        netns: true,
    };
    eprintln!(
        "drill {}: starting a netns lab in {}",
        args.name.as_str(),
        dir.display()
    );
    let t0 = Instant::now();
    let mut guard = LabGuard {
        dir: dir.clone(),
        armed: true,
    };
    let code = netns::up(&up, &dir)?;
    if code != ExitCode::SUCCESS {
        bail!("the drill's lab did not start; logs in {}", dir.display());
    }
    let state = LabState::load(&dir)?.context("the drill's lab left no lab.json")?;
    let lab = state
        .netns
        .as_ref()
        .map(|n| format!("lab {}, {} nodes", n.prefix, state.nodes.len()))
        .unwrap_or_default();
    let ctx = Ctx {
        dir: dir.clone(),
        nodes: state.nodes.clone(),
    };
    let mut v = Verdict::default();
    match ctx.wait(CONVERGE_LIMIT, || ctx.converged()) {
        Some(_) => v.convergence = Some(t0.elapsed()),
        None => v.check(
            false,
            format!("the lab converges within {} s", CONVERGE_LIMIT.as_secs()),
        ),
    }
    if v.convergence.is_some() {
        let held_for = Duration::from_secs(held);
        let result = match args.name {
            DrillName::GoldenPath => golden_path(&ctx, &state, held_for, &mut v),
            DrillName::WanPartition => wan_partition(&ctx, held_for, &mut v),
            DrillName::GatewayFailover => gateway_failover(&ctx, held_for, &mut v),
            DrillName::LossyWan => lossy_wan(&ctx, held_for, &mut v),
            DrillName::RollingRestartSecret => rolling_restart_secret(&ctx, held_for, &mut v),
            DrillName::SlowNode => slow_node(&ctx, held_for, &mut v),
            DrillName::DnsDrift => dns_drift(&ctx, &state, held_for, &mut v),
            DrillName::OneWay => one_way(&ctx, held_for, &mut v),
        };
        if let Err(e) = result {
            v.check(false, format!("the drill ran to its end: {e:#}"));
        }
    }
    let pass = v.pass();
    if let Err(e) = guard.down() {
        v.check(false, format!("lab down removed the lab: {e:#}"));
    }
    println!("{}", v.render(args.name, &lab, held));
    if v.pass() {
        if temporary && !args.keep {
            let _ = std::fs::remove_dir_all(&dir);
        } else {
            println!("lab files and agent logs kept in {}", dir.display());
        }
    } else {
        println!("lab files and agent logs kept in {}", dir.display());
    }
    Ok(if pass && v.pass() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The drill's view of its lab.
struct Ctx {
    dir: PathBuf,
    nodes: Vec<LabNode>,
}

impl Ctx {
    fn node(&self, name: &str) -> &LabNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .expect("a node of the drill's lab")
    }

    fn client(&self, name: &str) -> Client {
        Client::with_timeout(&self.node(name).endpoint().to_string(), API_TIMEOUT)
    }

    fn site_of(&self, name: &str) -> Option<&str> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .map(|n| n.site.as_str())
    }

    fn sites(&self) -> Vec<String> {
        let mut s: Vec<String> = Vec::new();
        for n in &self.nodes {
            if !s.contains(&n.site) {
                s.push(n.site.clone());
            }
        }
        s
    }

    fn members(&self, observer: &str) -> Option<Members> {
        self.client(observer).get("/v1/members").ok()
    }

    /// Status of every node as seen by `observer`.
    fn statuses(&self, observer: &str) -> Option<BTreeMap<String, NodeStatus>> {
        self.members(observer)
            .map(|m| m.members.into_iter().map(|r| (r.name, r.status)).collect())
    }

    /// One probe from `from` to `to` along the real route.
    fn ping(&self, from: &str, to: &str, timeout_ms: u64) -> Option<PingReport> {
        let client = Client::with_timeout(
            &self.node(from).endpoint().to_string(),
            Duration::from_millis(timeout_ms) + API_TIMEOUT,
        );
        client
            .post(
                "/v1/ping",
                &PingRequest {
                    target: to.into(),
                    from: None,
                    count: 1,
                    timeout_ms,
                },
            )
            .ok()
    }

    /// Every event `observer` recorded after `since`.
    fn events(&self, observer: &str, since: u64) -> Vec<Event> {
        let mut out = Vec::new();
        let _ = self.client(observer).stream_lines(
            &format!("/v1/events?since={since}&follow=false"),
            |line| {
                if let Ok(e) = serde_json::from_str::<Event>(line) {
                    out.push(e);
                }
                true
            },
        );
        out
    }

    /// The highest event sequence number of every node.
    fn seqs(&self) -> BTreeMap<String, u64> {
        self.nodes
            .iter()
            .map(|n| {
                let last = self.events(&n.name, 0).iter().map(|e| e.seq).max();
                (n.name.clone(), last.unwrap_or(0))
            })
            .collect()
    }

    /// Suspect/dead events recorded by any node since `seqs`.
    fn suspicions(&self, seqs: &BTreeMap<String, u64>) -> Vec<Event> {
        self.nodes
            .iter()
            .flat_map(|n| self.events(&n.name, seqs.get(&n.name).copied().unwrap_or(0)))
            .filter(|e| matches!(e.kind, EventKind::NodeSuspect | EventKind::NodeDead))
            .collect()
    }

    /// Polls `f` every 200 ms for at most `limit`; how long it took, if it became true.
    fn wait(&self, limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
        let start = Instant::now();
        loop {
            if f() {
                return Some(start.elapsed());
            }
            if start.elapsed() >= limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every node sees every node alive, and the first node sees every expected link up.
    fn converged(&self) -> bool {
        let all_alive = self.nodes.iter().all(|o| {
            self.statuses(&o.name).is_some_and(|s| {
                self.nodes
                    .iter()
                    .all(|n| s.get(&n.name) == Some(&NodeStatus::Alive))
            })
        });
        all_alive
            && self.nodes.first().is_some_and(|first| {
                self.client(&first.name)
                    .get::<Topology>("/v1/topology")
                    .is_ok_and(|t| {
                        t.healthy
                            && t.links
                                .iter()
                                .filter(|l| l.expected)
                                .all(|l| l.state == LinkState::Up)
                    })
            })
    }

    /// Every node holds the same table: the same names with the same clocks, all alive.
    fn tables_agree(&self) -> bool {
        let mut first: Option<Vec<(String, u64)>> = None;
        for o in &self.nodes {
            let Some(m) = self.members(&o.name) else {
                return false;
            };
            if m.members.iter().any(|r| r.status != NodeStatus::Alive) {
                return false;
            }
            let mut rows: Vec<(String, u64)> =
                m.members.into_iter().map(|r| (r.name, r.clock)).collect();
            rows.sort();
            match &first {
                None => first = Some(rows),
                Some(f) if *f != rows => return false,
                Some(_) => {}
            }
        }
        true
    }

    /// Heals and measures the time until the cluster has recovered.
    fn heal_and_recover(&self, v: &mut Verdict) -> anyhow::Result<()> {
        fault::heal(&self.dir)?;
        let r = self.wait(CONVERGE_LIMIT, || self.converged() && self.tables_agree());
        v.recovery = r;
        v.check(
            r.is_some(),
            "after heal every expected link is up, every node alive everywhere, node tables agree",
        );
        Ok(())
    }

    fn members_of(&self, site: &str, role: Option<Role>) -> Vec<&LabNode> {
        self.nodes
            .iter()
            .filter(|n| n.site == site && role.is_none_or(|r| n.role == r))
            .collect()
    }
}

fn golden_path(ctx: &Ctx, state: &LabState, held: Duration, v: &mut Verdict) -> anyhow::Result<()> {
    let seqs = ctx.seqs();
    // Isolation: a member has no route to another site's network, nor to a remote gateway.
    let ns = state.netns.as_ref().context("a netns lab")?;
    let mut routes_out = Vec::new();
    for m in ns.nodes.iter().filter(|n| n.role == Role::Member) {
        for other in ns.nodes.iter().filter(|o| o.site != m.site) {
            for addr in std::iter::once(other.site_addr).chain(other.wan_addr) {
                let routed = netns::run(
                    "ip",
                    &["-n", &m.netns, "route", "get", &addr.to_string()],
                    None,
                )
                .is_ok();
                if routed {
                    routes_out.push(format!("{} -> {} ({addr})", m.name, other.name));
                }
            }
        }
    }
    v.check(
        routes_out.is_empty(),
        if routes_out.is_empty() {
            "no member has a route to another site's nodes".to_string()
        } else {
            format!("members route out of their site: {}", routes_out.join(", "))
        },
    );
    let members: Vec<&LabNode> = ctx
        .nodes
        .iter()
        .filter(|n| n.role == Role::Member)
        .collect();
    let pairs: Vec<(&str, &str)> = members
        .iter()
        .flat_map(|a| {
            members
                .iter()
                .filter(|b| b.site != a.site)
                .map(|b| (a.name.as_str(), b.name.as_str()))
        })
        .collect();
    let start = Instant::now();
    let mut rtts = Vec::new();
    let mut i = 0;
    while start.elapsed() < held || i < pairs.len() {
        let (a, b) = pairs[i % pairs.len()];
        i += 1;
        v.probes += 1;
        match ctx.ping(a, b, 2000) {
            Some(r) if r.ok => rtts.extend(r.attempts.iter().map(|at| at.total_ms)),
            _ => v.lost += 1,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    v.check(
        v.lost == 0,
        format!(
            "every cross-site ping between members answered ({}/{})",
            v.probes - v.lost,
            v.probes
        ),
    );
    rtts.sort_by(|a, b| a.total_cmp(b));
    if let (Some(min), Some(max)) = (rtts.first(), rtts.last()) {
        v.notes.push(format!(
            "cross-site ping rtt min {min:.2} ms, p50 {:.2} ms, max {max:.2} ms",
            rtts[rtts.len() / 2]
        ));
    }
    let sus = ctx.suspicions(&seqs);
    v.false_suspicions = sus.len();
    v.check(sus.is_empty(), "no node suspected or declared dead");
    let agree = ctx.wait(Duration::from_secs(10), || ctx.tables_agree());
    v.check(agree.is_some(), "node tables agree on every node");
    Ok(())
}

fn wan_partition(ctx: &Ctx, held: Duration, v: &mut Verdict) -> anyhow::Result<()> {
    let sites = ctx.sites();
    let seqs = ctx.seqs();
    let t_fault = Instant::now();
    for (i, a) in sites.iter().enumerate() {
        for b in &sites[i + 1..] {
            fault::inject(
                &ctx.dir,
                Fault::Partition {
                    a: a.clone(),
                    b: b.clone(),
                },
            )?;
        }
    }
    let mut own_site_trouble = Vec::new();
    let mut dead_seen = Vec::new();
    while t_fault.elapsed() < held {
        // Inside each site, pings keep succeeding.
        for site in &sites {
            let nodes = ctx.members_of(site, None);
            if let (Some(a), Some(b)) = (nodes.last(), nodes.first()) {
                v.probes += 1;
                if !ctx.ping(&a.name, &b.name, 1000).is_some_and(|r| r.ok) {
                    v.lost += 1;
                }
            }
        }
        // Everyone sees the far site unreachable; nobody sees anybody dead.
        let mut all_unreachable = true;
        for o in &ctx.nodes {
            let Some(s) = ctx.statuses(&o.name) else {
                all_unreachable = false;
                continue;
            };
            for n in &ctx.nodes {
                let st = s.get(&n.name).copied();
                if st == Some(NodeStatus::Dead) {
                    dead_seen.push(format!("{} sees {} dead", o.name, n.name));
                }
                if n.site == o.site {
                    if st != Some(NodeStatus::Alive) {
                        own_site_trouble.push(format!("{} sees {} {st:?}", o.name, n.name));
                    }
                } else if st != Some(NodeStatus::Unreachable) {
                    all_unreachable = false;
                }
            }
        }
        if all_unreachable && v.detection.is_none() {
            v.detection = Some(t_fault.elapsed());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    v.check(
        v.detection.is_some(),
        "every node saw every node of the far site unreachable",
    );
    v.check(
        v.lost == 0,
        format!(
            "pings inside each site kept succeeding ({}/{})",
            v.probes - v.lost,
            v.probes
        ),
    );
    own_site_trouble.dedup();
    v.check(
        own_site_trouble.is_empty(),
        if own_site_trouble.is_empty() {
            "every node saw its own site alive throughout".to_string()
        } else {
            format!("own site not alive: {}", own_site_trouble.join("; "))
        },
    );
    dead_seen.dedup();
    let sus = ctx.suspicions(&seqs);
    let own_site_sus: Vec<String> = sus
        .iter()
        .filter(|e| e.node.as_deref().and_then(|n| ctx.site_of(n)) == ctx.site_of(&e.observer))
        .map(|e| {
            format!(
                "{} {} {}",
                e.observer,
                e.kind.as_str(),
                e.node.as_deref().unwrap_or("-")
            )
        })
        .collect();
    let dead_events = sus.iter().filter(|e| e.kind == EventKind::NodeDead).count();
    v.false_suspicions = sus.len();
    v.check(
        own_site_sus.is_empty(),
        if own_site_sus.is_empty() {
            "no node of its own site suspected".to_string()
        } else {
            format!("suspected inside a site: {}", own_site_sus.join("; "))
        },
    );
    v.check(
        dead_seen.is_empty() && dead_events == 0,
        if dead_seen.is_empty() && dead_events == 0 {
            "the far site was unreachable, never dead".to_string()
        } else {
            format!(
                "declared dead: {} ({dead_events} node-dead events)",
                dead_seen.join("; ")
            )
        },
    );
    ctx.heal_and_recover(v)
}

/// Drops the first site's gateway -> the second site's gateway only. The detecting gateway (the
/// one whose packets are dropped) must report the WAN link `one-way` with the direction that
/// still works; statuses must settle once (alive -> unreachable across the WAN) and never flap
/// or turn dead.
fn one_way(ctx: &Ctx, held: Duration, v: &mut Verdict) -> anyhow::Result<()> {
    let sites = ctx.sites();
    let (Some(here), Some(there)) = (sites.first(), sites.get(1)) else {
        bail!("the drill needs two sites");
    };
    let gw = |site: &str| {
        ctx.members_of(site, Some(Role::Gateway))
            .first()
            .map(|n| n.name.clone())
    };
    let (Some(from), Some(to)) = (gw(here), gw(there)) else {
        bail!("the drill needs a gateway in each site");
    };
    let seqs = ctx.seqs();
    let t_fault = Instant::now();
    fault::inject(
        &ctx.dir,
        Fault::Oneway {
            from: from.clone(),
            to: to.clone(),
        },
    )?;
    let expect = format!("{to} -> {from} gets through, {from} -> {to} does not");
    let mut last: BTreeMap<(String, String), NodeStatus> = BTreeMap::new();
    let mut flips: Vec<String> = Vec::new();
    let mut dead_seen = Vec::new();
    let mut reported = None;
    // Every look at FROM's topology: when, and whether the link showed one-way that way.
    let mut polls: Vec<(Duration, bool)> = Vec::new();
    while t_fault.elapsed() < held {
        for o in &ctx.nodes {
            let Some(s) = ctx.statuses(&o.name) else {
                continue;
            };
            for (n, st) in s {
                if st == NodeStatus::Dead {
                    dead_seen.push(format!("{} sees {n} dead", o.name));
                }
                if let Some(prev) = last.insert((o.name.clone(), n.clone()), st) {
                    if prev != st {
                        flips.push(format!(
                            "{} saw {n} {} -> {}",
                            o.name,
                            prev.as_str(),
                            st.as_str()
                        ));
                    }
                }
            }
        }
        let topology = ctx.topology(&from);
        let at = t_fault.elapsed();
        let link = topology.as_ref().and_then(|t| {
            t.links.iter().find(|l| {
                l.state == clusterctl_api::LinkState::OneWay
                    && l.reason.as_deref().is_some_and(|r| r.contains(&expect))
            })
        });
        polls.push((at, link.is_some()));
        if let (None, Some(l)) = (v.detection, link) {
            v.detection = Some(at);
            reported = Some(format!(
                "{} <=> {}: {}",
                l.from,
                l.to,
                l.reason.clone().unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    v.check(
        v.detection.is_some(),
        format!("{from} reports the WAN link one-way, {to} -> {from} only"),
    );
    if let Some(r) = reported {
        v.notes.push(r);
    }
    // The fault stays one-way for as long as it is held (a fault that also dropped ARP would
    // turn into a full partition within a minute): FROM shows it, with its direction, at every poll
    // of the last part of the hold.
    let steady = steady_window(held);
    let judged = steady_polls(&polls, held - steady);
    v.extra
        .push(("steady_window_s", steady.as_secs().to_string()));
    v.extra
        .push(("steady_polls", format!("{}/{}", judged.shown, judged.polls)));
    v.extra.push((
        "max_poll_gap_s",
        format!("{:.2}", judged.max_gap.as_secs_f64()),
    ));
    v.check(
        judged.polls > 0 && judged.shown == judged.polls && judged.max_gap <= MAX_POLL_GAP,
        format!(
            "{from} shows the link one-way, {to} -> {from} only, at every poll of the last {} s \
             ({}/{} polls, largest gap {:.1} s, at most {} s allowed)",
            steady.as_secs(),
            judged.shown,
            judged.polls,
            judged.max_gap.as_secs_f64(),
            MAX_POLL_GAP.as_secs()
        ),
    );
    // Each observer changes its view of a far node once (alive -> unreachable); more is a flap.
    let mut per_pair: BTreeMap<String, usize> = BTreeMap::new();
    for f in &flips {
        let key = f
            .split(" -> ")
            .next()
            .unwrap_or(f)
            .rsplit_once(' ')
            .map_or(f.clone(), |(k, _)| k.to_string());
        *per_pair.entry(key).or_default() += 1;
    }
    let flapping: Vec<&String> = per_pair
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| k)
        .collect();
    v.check(
        flapping.is_empty(),
        if flapping.is_empty() {
            format!("no status flapped ({} single changes)", flips.len())
        } else {
            format!("statuses flapped: {flapping:?}")
        },
    );
    dead_seen.dedup();
    let sus = ctx.suspicions(&seqs);
    let dead_events = sus.iter().filter(|e| e.kind == EventKind::NodeDead).count();
    v.false_suspicions = sus.len();
    v.check(
        dead_seen.is_empty() && dead_events == 0,
        if dead_seen.is_empty() && dead_events == 0 {
            "no node declared dead".to_string()
        } else {
            format!(
                "declared dead: {} ({dead_events} node-dead events)",
                dead_seen.join("; ")
            )
        },
    );
    ctx.heal_and_recover(v)
}

/// Longest pause between two looks at the one-way link in the judged window.
const MAX_POLL_GAP: Duration = Duration::from_secs(3);
/// Longest judged window of the one-way drill (the last part of the hold).
const MAX_STEADY: Duration = Duration::from_secs(45);

/// The judged window of a one-way drill held `held`: the last 45 s, or the last half of a
/// shorter hold.
fn steady_window(held: Duration) -> Duration {
    MAX_STEADY.min(held / 2)
}

/// What the polls from `start` on (times since the fault) showed.
#[derive(Debug, PartialEq, Eq)]
struct Steady {
    polls: usize,
    shown: usize,
    /// Largest time between `start` and the first poll or between two polls.
    max_gap: Duration,
}

fn steady_polls(polls: &[(Duration, bool)], start: Duration) -> Steady {
    let judged: Vec<&(Duration, bool)> = polls.iter().filter(|(t, _)| *t >= start).collect();
    let mut max_gap = Duration::ZERO;
    let mut prev = start;
    for (t, _) in &judged {
        max_gap = max_gap.max(t.saturating_sub(prev));
        prev = *t;
    }
    Steady {
        polls: judged.len(),
        shown: judged.iter().filter(|(_, shown)| *shown).count(),
        max_gap,
    }
}

fn gateway_failover(ctx: &Ctx, held: Duration, v: &mut Verdict) -> anyhow::Result<()> {
    let sites = ctx.sites();
    let (Some(here), Some(there)) = (sites.first(), sites.get(1)) else {
        bail!("the drill needs two sites");
    };
    let src = ctx.members_of(here, Some(Role::Member))[0].name.clone();
    let dst = ctx.members_of(there, Some(Role::Member))[0].name.clone();
    let path = ctx
        .ping(&src, &dst, 2000)
        .filter(|r| r.ok)
        .and_then(|r| r.attempts.first().map(|a| a.path.clone()))
        .context("no cross-site ping before the fault")?;
    let victim = path
        .get(1)
        .filter(|g| ctx.site_of(g) == Some(here.as_str()))
        .cloned()
        .context("the path does not start through a gateway of the source site")?;
    v.notes.push(format!(
        "path before the fault: {}; killed {victim}",
        path.join(" -> ")
    ));
    let seqs = ctx.seqs();
    let t_fault = Instant::now();
    fault::inject(
        &ctx.dir,
        Fault::Kill {
            node: victim.clone(),
        },
    )?;
    let same_site: Vec<String> = ctx
        .members_of(here, None)
        .iter()
        .filter(|n| n.name != victim)
        .map(|n| n.name.clone())
        .collect();
    let mut via_victim = 0;
    let mut lost_after_resume = 0;
    let mut new_path = None;
    while t_fault.elapsed() < held {
        v.probes += 1;
        match ctx.ping(&src, &dst, 1000) {
            Some(r) if r.ok => {
                if v.failover.is_none() {
                    v.failover = Some(t_fault.elapsed());
                }
                if let Some(a) = r.attempts.first() {
                    if a.path.contains(&victim) {
                        via_victim += 1;
                    }
                    new_path = Some(a.path.join(" -> "));
                }
            }
            _ => {
                v.lost += 1;
                if v.failover.is_some() {
                    lost_after_resume += 1;
                }
            }
        }
        if v.detection.is_none()
            && same_site.iter().all(|o| {
                ctx.statuses(o)
                    .is_some_and(|s| s.get(&victim) == Some(&NodeStatus::Dead))
            })
        {
            v.detection = Some(t_fault.elapsed());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    if let Some(p) = new_path {
        v.notes.push(format!("path after failover: {p}"));
    }
    v.check(
        v.failover.is_some() && via_victim == 0,
        "cross-site pings resumed through the other gateway",
    );
    v.check(
        lost_after_resume == 0,
        format!("no ping lost once they resumed ({lost_after_resume} lost)"),
    );
    v.check(
        v.detection.is_some(),
        format!("{victim} shows dead to every other node of its site"),
    );
    let sus = ctx.suspicions(&seqs);
    let false_sus: Vec<String> = sus
        .iter()
        .filter(|e| e.node.as_deref() != Some(victim.as_str()))
        .map(|e| {
            format!(
                "{} {} {}",
                e.observer,
                e.kind.as_str(),
                e.node.as_deref().unwrap_or("-")
            )
        })
        .collect();
    v.false_suspicions = false_sus.len();
    v.check(
        false_sus.is_empty(),
        if false_sus.is_empty() {
            "no false suspicion of any other node".to_string()
        } else {
            format!("false suspicions: {}", false_sus.join("; "))
        },
    );
    ctx.heal_and_recover(v)
}

fn lossy_wan(ctx: &Ctx, held: Duration, v: &mut Verdict) -> anyhow::Result<()> {
    let sites = ctx.sites();
    let members: Vec<String> = sites
        .iter()
        .filter_map(|s| {
            ctx.members_of(s, Some(Role::Member))
                .first()
                .map(|n| n.name.clone())
        })
        .collect();
    let seqs = ctx.seqs();
    let t_fault = Instant::now();
    fault::inject(
        &ctx.dir,
        Fault::Loss {
            target: "wan".into(),
            percent: 5,
        },
    )?;
    let mut dead_seen = Vec::new();
    let mut round = 0usize;
    while t_fault.elapsed() < held {
        let a = &members[round % members.len()];
        let b = &members[(round + 1) % members.len()];
        round += 1;
        v.probes += 1;
        if !ctx.ping(a, b, 2000).is_some_and(|r| r.ok) {
            v.lost += 1;
        }
        if round % 4 == 0 {
            for o in &ctx.nodes {
                if let Some(s) = ctx.statuses(&o.name) {
                    for (n, st) in s {
                        if st == NodeStatus::Dead {
                            dead_seen.push(format!("{} sees {n} dead", o.name));
                        }
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let sus = ctx.suspicions(&seqs);
    let dead_events: Vec<String> = sus
        .iter()
        .filter(|e| e.kind == EventKind::NodeDead)
        .map(|e| {
            format!(
                "{} declared {} dead",
                e.observer,
                e.node.as_deref().unwrap_or("-")
            )
        })
        .collect();
    v.false_suspicions = sus.len();
    dead_seen.dedup();
    v.check(
        dead_seen.is_empty() && dead_events.is_empty(),
        if dead_seen.is_empty() && dead_events.is_empty() {
            "no node declared dead anywhere".to_string()
        } else {
            format!(
                "declared dead: {}",
                [dead_seen, dead_events].concat().join("; ")
            )
        },
    );
    v.check(
        v.probes > v.lost,
        format!(
            "cross-site pings kept getting through ({}/{} answered)",
            v.probes - v.lost,
            v.probes
        ),
    );
    ctx.heal_and_recover(v)
}

impl Ctx {
    /// Runs `clusterctl ARGS` against the drill's lab, as an operator would; its exit code and
    /// output (stdout, then stderr).
    fn cli(&self, args: &[&str]) -> anyhow::Result<(bool, String)> {
        let exe = std::env::current_exe().context("cannot find the clusterctl executable")?;
        let out = std::process::Command::new(exe)
            .args(args)
            .env("CLUSTERCTL_LAB_DIR", &self.dir)
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("running clusterctl {}", args.join(" ")))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.success(), text))
    }

    fn secrets(&self, observer: &str) -> Option<Secrets> {
        self.client(observer).get("/v1/secrets").ok()
    }

    fn topology(&self, observer: &str) -> Option<Topology> {
        self.client(observer).get("/v1/topology").ok()
    }

    /// `link-refused` events recorded by any node since `seqs`.
    fn refusals(&self, seqs: &BTreeMap<String, u64>) -> Vec<Event> {
        self.nodes
            .iter()
            .flat_map(|n| self.events(&n.name, seqs.get(&n.name).copied().unwrap_or(0)))
            .filter(|e| e.kind == EventKind::LinkRefused)
            .collect()
    }
}

fn show_event(e: &Event) -> String {
    format!(
        "{} {} {}{}",
        e.observer,
        e.kind.as_str(),
        e.node.as_deref().or(e.peer.as_deref()).unwrap_or("-"),
        if e.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", e.reason)
        }
    )
}

/// Probes from `from` to `to` every 500 ms until `stop`; a probe sent or answered while
/// `excused` is set (a node is restarting) is counted apart. Returns (sent, lost, excused
/// sent, excused lost).
fn probe_loop(
    ctx: &Ctx,
    from: &str,
    to: &str,
    stop: &AtomicBool,
    excused: &AtomicBool,
) -> (u32, u32, u32, u32) {
    let (mut sent, mut lost, mut ex_sent, mut ex_lost) = (0, 0, 0, 0);
    while !stop.load(Ordering::SeqCst) {
        let before = excused.load(Ordering::SeqCst);
        let ok = ctx.ping(from, to, 2000).is_some_and(|r| r.ok);
        if before || excused.load(Ordering::SeqCst) {
            ex_sent += 1;
            ex_lost += u32::from(!ok);
        } else {
            sent += 1;
            lost += u32::from(!ok);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    (sent, lost, ex_sent, ex_lost)
}

fn rolling_restart_secret(ctx: &Ctx, held: Duration, v: &mut Verdict) -> anyhow::Result<()> {
    let sites = ctx.sites();
    let (Some(here), Some(there)) = (sites.first(), sites.get(1)) else {
        bail!("the drill needs two sites");
    };
    let here_members = ctx.members_of(here, Some(Role::Member));
    let victim = here_members
        .last()
        .map(|n| n.name.clone())
        .context("a member in the first site")?;
    // An observer that keeps the old secret: a gateway of the victim's site.
    let observer = ctx
        .members_of(here, Some(Role::Gateway))
        .first()
        .map(|n| n.name.clone())
        .context("a gateway in the first site")?;
    let first = ctx.nodes[0].name.clone();
    let old_file = ctx.dir.join("secret.key");
    let new_file = ctx.dir.join("next.secret");
    let old_id = ctx
        .secrets(&first)
        .and_then(|s| s.keys.into_iter().find(|k| k.in_use_by == s.nodes))
        .map(|k| k.id)
        .context("no secret in use by every node before the drill")?;
    let (ok, out) = ctx.cli(&["secret", "generate", &new_file.display().to_string()])?;
    if !ok {
        bail!("secret generate: {out}");
    }

    // (a) Without the procedure: the victim restarts with only the new secret.
    let victim_links: Vec<(String, String)> = ctx
        .topology(&observer)
        .map(|t| {
            t.links
                .into_iter()
                .filter(|l| l.expected && (l.from == victim || l.to == victim))
                .map(|l| (l.from, l.to))
                .collect()
        })
        .unwrap_or_default();
    if victim_links.is_empty() {
        bail!("{observer}'s topology lists no link of {victim}");
    }
    let seqs = ctx.seqs();
    fault::restart_with(&ctx.dir, &victim, Some(&new_file))?;
    let t_up = Instant::now();
    let mut refused_links: Vec<String> = Vec::new();
    let mut wrong_links: Vec<String> = Vec::new();
    while t_up.elapsed() < held {
        if let Some(t) = ctx.topology(&observer) {
            let refused: Vec<&clusterctl_api::LinkView> = t
                .links
                .iter()
                .filter(|l| {
                    l.state == LinkState::Refused
                        && l.reason
                            .as_deref()
                            .is_some_and(|r| r.contains("secret mismatch"))
                })
                .collect();
            for l in &refused {
                if l.from != victim && l.to != victim {
                    let w = format!("{} <-> {}", l.from, l.to);
                    if !wrong_links.contains(&w) {
                        wrong_links.push(w);
                    }
                }
            }
            let all_refused = victim_links
                .iter()
                .all(|(a, b)| refused.iter().any(|l| &l.from == a && &l.to == b));
            if all_refused && v.detection.is_none() {
                v.detection = Some(t_up.elapsed());
                refused_links = refused
                    .iter()
                    .map(|l| format!("{} <-> {}", l.from, l.to))
                    .collect();
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if let Some(t) = ctx.topology(&observer) {
        for l in t
            .links
            .iter()
            .filter(|l| l.from == victim || l.to == victim)
        {
            v.notes.push(format!(
                "(a) {observer}'s topology after {} s: {} <-> {} {}{}",
                held.as_secs(),
                l.from,
                l.to,
                l.state.as_str(),
                l.reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ));
        }
    }
    let refused_events: Vec<Event> = ctx
        .refusals(&seqs)
        .into_iter()
        .filter(|e| e.reason.contains("secret mismatch"))
        .collect();
    let on_observer = refused_events
        .iter()
        .filter(|e| e.observer == observer)
        .count();
    v.extra
        .push(("refused_links", refused_links.len().to_string()));
    v.extra
        .push(("refused_events", refused_events.len().to_string()));
    v.check(
        v.detection.is_some(),
        format!(
            "(a) {observer} shows every link of {victim} refused for secret mismatch ({} links)",
            refused_links.len()
        ),
    );
    v.check(
        wrong_links.is_empty(),
        if wrong_links.is_empty() {
            "(a) no other link refused".to_string()
        } else {
            format!(
                "(a) links refused that do not touch {victim}: {}",
                wrong_links.join(", ")
            )
        },
    );
    v.check(
        on_observer > 0,
        format!(
            "(a) link-refused events with reason `secret mismatch`: {} ({on_observer} on {observer})",
            refused_events.len()
        ),
    );
    let t_restore = Instant::now();
    fault::restart_with(&ctx.dir, &victim, Some(&old_file))?;
    v.recovery = ctx.wait(CONVERGE_LIMIT, || ctx.converged() && ctx.tables_agree());
    v.recovery = v.recovery.map(|_| t_restore.elapsed());
    v.check(
        v.recovery.is_some(),
        format!("(a) {victim} restarted with the old secret: every link up, tables agree"),
    );
    if v.recovery.is_none() {
        return Ok(());
    }

    // (b) With the procedure: install, use, rolling restart, remove; probes all along.
    let seqs = ctx.seqs();
    let src = ctx
        .members_of(here, Some(Role::Member))
        .first()
        .map(|n| n.name.clone())
        .context("a member in the first site")?;
    let dst = ctx
        .members_of(there, Some(Role::Member))
        .first()
        .map(|n| n.name.clone())
        .context("a member in the second site")?;
    let stop = AtomicBool::new(false);
    let restarting = AtomicBool::new(false);
    let t_b = Instant::now();
    let (steps, probes) = std::thread::scope(|scope| {
        let prober = scope.spawn(|| probe_loop(ctx, &src, &dst, &stop, &restarting));
        let steps = rotate(ctx, &new_file, &old_id, &restarting);
        // A few more probes once the old secret is gone.
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::SeqCst);
        (steps, prober.join())
    });
    let (sent, lost, ex_sent, ex_lost) = probes.unwrap_or((0, 0, 0, 0));
    v.probes = sent;
    v.lost = lost;
    v.extra
        .push(("rotation_s", format!("{:.2}", t_b.elapsed().as_secs_f64())));
    match steps {
        Ok(new_id) => {
            v.check(
                true,
                format!(
                    "(b) install, use, rolling restart of {} nodes, remove: done",
                    ctx.nodes.len()
                ),
            );
            let only_new = ctx.secrets(&first).is_some_and(|s| {
                s.keys.len() == 1
                    && s.keys[0].id == new_id
                    && s.keys[0].holders == s.nodes
                    && s.keys[0].in_use_by == s.nodes
            });
            v.check(
                only_new,
                format!("(b) every node holds and uses only the new secret {new_id}"),
            );
        }
        Err(e) => v.check(false, format!("(b) the rotation: {e:#}")),
    }
    let refusals = ctx.refusals(&seqs);
    v.extra.push(("refusals_b", refusals.len().to_string()));
    v.check(
        refusals.is_empty(),
        if refusals.is_empty() {
            "(b) no link-refused event on any node".to_string()
        } else {
            format!(
                "(b) link-refused events: {}",
                refusals
                    .iter()
                    .map(show_event)
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        },
    );
    v.check(
        lost == 0 && sent > 0,
        format!(
            "(b) cross-site pings {src} -> {dst} answered between restarts ({}/{sent})",
            sent - lost
        ),
    );
    v.notes.push(format!(
        "(b) pings sent while a node was restarting (not counted): {ex_sent}, of which {ex_lost} failed"
    ));
    let sus = ctx.suspicions(&seqs);
    let dead: Vec<String> = sus
        .iter()
        .filter(|e| e.kind == EventKind::NodeDead)
        .map(show_event)
        .collect();
    v.false_suspicions = sus.len();
    v.check(
        dead.is_empty(),
        if dead.is_empty() {
            "(b) no node declared dead during the rolling restart".to_string()
        } else {
            format!("(b) declared dead: {}", dead.join("; "))
        },
    );
    if !sus.is_empty() {
        v.notes.push(format!(
            "(b) suspicions during the restarts: {}",
            sus.iter().map(show_event).collect::<Vec<_>>().join("; ")
        ));
    }
    Ok(())
}

/// The rotation procedure of docs/security.md, with a rolling restart between `use` and
/// `remove`; returns the new key id.
fn rotate(
    ctx: &Ctx,
    new_file: &std::path::Path,
    old_id: &str,
    restarting: &AtomicBool,
) -> anyhow::Result<String> {
    let first = ctx.nodes[0].name.clone();
    let file = new_file.display().to_string();
    let (ok, out) = ctx.cli(&["secret", "install", &file, "--all"])?;
    if !ok {
        bail!("secret install --all: {out}");
    }
    let mut new_id = None;
    ctx.wait(Duration::from_secs(30), || {
        new_id = ctx.secrets(&first).and_then(|s| {
            s.keys
                .into_iter()
                .find(|k| k.id != old_id && k.holders == s.nodes)
                .map(|k| k.id)
        });
        new_id.is_some()
    })
    .context("secret list never showed the new secret held by every node")?;
    let new_id = new_id.context("the new key id")?;
    let (ok, out) = ctx.cli(&["secret", "use", &new_id, "--all"])?;
    if !ok {
        bail!("secret use {new_id} --all: {out}");
    }
    ctx.wait(Duration::from_secs(30), || {
        ctx.secrets(&first).is_some_and(|s| {
            s.keys
                .iter()
                .any(|k| k.id == new_id && k.in_use_by == s.nodes)
        })
    })
    .context("secret list never showed the new secret in use by every node")?;
    for n in &ctx.nodes {
        restarting.store(true, Ordering::SeqCst);
        fault::restart(&ctx.dir, &n.name)?;
        let back = ctx.wait(CONVERGE_LIMIT, || ctx.converged() && ctx.tables_agree());
        restarting.store(false, Ordering::SeqCst);
        if back.is_none() {
            bail!("the cluster did not converge after restarting {}", n.name);
        }
    }
    let (ok, out) = ctx.cli(&["secret", "remove", old_id, "--all"])?;
    if !ok {
        bail!("secret remove {old_id} --all: {out}");
    }
    ctx.wait(Duration::from_secs(30), || {
        ctx.secrets(&first)
            .is_some_and(|s| s.keys.iter().all(|k| k.id != old_id))
    })
    .context("secret list still shows the old secret")?;
    Ok(new_id)
}

/// Length of each pause of `slow-node`, and the period of the bursts.
const SLOW_PAUSE_SECS: u64 = 3;
const SLOW_PERIOD: Duration = Duration::from_secs(20);
/// Most accusations the paused node may make per burst (see docs/lab.md).
const SLOW_ACCUSATIONS_PER_BURST: usize = 1;

fn slow_node(ctx: &Ctx, held: Duration, v: &mut Verdict) -> anyhow::Result<()> {
    let sites = ctx.sites();
    let (Some(here), Some(there)) = (sites.first(), sites.get(1)) else {
        bail!("the drill needs two sites");
    };
    // The paused node: the last member of the second site; probes run between the other sites'
    // members and a member of its own site that is not paused.
    let there_members = ctx.members_of(there, Some(Role::Member));
    let victim = there_members
        .last()
        .map(|n| n.name.clone())
        .context("a member in the second site")?;
    let src = ctx
        .members_of(here, Some(Role::Member))
        .first()
        .map(|n| n.name.clone())
        .context("a member in the first site")?;
    let dst = there_members
        .iter()
        .find(|n| n.name != victim)
        .map(|n| n.name.clone())
        .context("two members in the second site")?;
    let seqs = ctx.seqs();
    let bursts = held.as_secs().div_ceil(SLOW_PERIOD.as_secs()).max(1);
    let stop = AtomicBool::new(false);
    let never = AtomicBool::new(false);
    let t0 = Instant::now();
    let wall0 = std::time::SystemTime::now();
    let mut dead_seen: Vec<String> = Vec::new();
    let (paused, probes) = std::thread::scope(|scope| {
        let prober = scope.spawn(|| probe_loop(ctx, &src, &dst, &stop, &never));
        let pauser = scope.spawn(|| -> anyhow::Result<Vec<Duration>> {
            let mut starts = Vec::new();
            for k in 0..bursts {
                let at = SLOW_PERIOD * u32::try_from(k).unwrap_or(u32::MAX);
                if let Some(wait) = at.checked_sub(t0.elapsed()) {
                    std::thread::sleep(wait);
                }
                starts.push(t0.elapsed());
                fault::inject(
                    &ctx.dir,
                    Fault::Pause {
                        node: victim.clone(),
                        seconds: SLOW_PAUSE_SECS,
                    },
                )?;
            }
            Ok(starts)
        });
        // Everyone's member list, once a second, until the fault time is over and the last
        // burst has ended.
        while t0.elapsed() < held || !pauser.is_finished() {
            for o in &ctx.nodes {
                if o.name == victim {
                    continue;
                }
                if let Some(s) = ctx.statuses(&o.name) {
                    for (n, st) in s {
                        let w = format!("{} sees {n} dead", o.name);
                        if st == NodeStatus::Dead && !dead_seen.contains(&w) {
                            dead_seen.push(w);
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        let paused = pauser.join();
        stop.store(true, Ordering::SeqCst);
        (paused, prober.join())
    });
    let t_last = Instant::now();
    let starts = match paused {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => bail!("pausing {victim}: {e:#}"),
        Err(_) => bail!("the thread pausing {victim} panicked"),
    };
    let (sent, lost, _, _) = probes.unwrap_or((0, 0, 0, 0));
    v.probes = sent;
    v.lost = lost;
    v.notes.push(format!(
        "{victim} paused {SLOW_PAUSE_SECS} s at {} s",
        starts
            .iter()
            .map(|d| format!("{:.1}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    // Let the last burst's consequences land before the events are read.
    v.recovery = ctx
        .wait(CONVERGE_LIMIT, || ctx.converged() && ctx.tables_agree())
        .map(|_| t_last.elapsed());
    let sus = ctx.suspicions(&seqs);
    let about_victim: Vec<&Event> = sus
        .iter()
        .filter(|e| e.observer != victim && e.node.as_deref() == Some(victim.as_str()))
        .collect();
    let by_healthy_about_healthy: Vec<String> = sus
        .iter()
        .filter(|e| e.observer != victim && e.node.as_deref() != Some(victim.as_str()))
        .map(show_event)
        .collect();
    let accusations: Vec<String> = sus
        .iter()
        .filter(|e| e.observer == victim && e.node.as_deref() != Some(victim.as_str()))
        .map(show_event)
        .collect();
    let dead: Vec<String> = sus
        .iter()
        .filter(|e| e.kind == EventKind::NodeDead && e.node.as_deref() != Some(victim.as_str()))
        .map(show_event)
        .collect();
    let victim_dead = sus
        .iter()
        .filter(|e| e.kind == EventKind::NodeDead && e.node.as_deref() == Some(victim.as_str()))
        .count();
    dead_seen.retain(|w| !w.ends_with(&format!(" {victim} dead")));
    // Detection: a burst's start -> the first suspicion of the victim by a peer after it; the
    // shortest over the bursts.
    v.detection = about_victim
        .iter()
        .filter(|e| e.kind == EventKind::NodeSuspect)
        .filter_map(|e| humantime::parse_rfc3339_weak(&e.at).ok())
        .filter_map(|t| t.duration_since(wall0).ok())
        .filter_map(|d| {
            starts
                .iter()
                .rev()
                .find(|s| **s <= d)
                .and_then(|s| d.checked_sub(*s))
        })
        .min();
    v.false_suspicions = by_healthy_about_healthy.len() + accusations.len();
    v.extra.push(("bursts", starts.len().to_string()));
    v.extra
        .push(("suspected_paused", about_victim.len().to_string()));
    v.extra
        .push(("paused_accusations", accusations.len().to_string()));
    v.extra
        .push(("paused_declared_dead", victim_dead.to_string()));
    if victim_dead > 0 {
        v.notes.push(format!(
            "{victim} itself was declared dead {victim_dead} time(s) by nodes of its site during or right after its {SLOW_PAUSE_SECS} s pauses"
        ));
    }
    v.check(
        dead.is_empty() && dead_seen.is_empty(),
        if dead.is_empty() && dead_seen.is_empty() {
            "no healthy node declared dead by anyone (events and member lists)".to_string()
        } else {
            format!("declared dead: {}", [dead, dead_seen].concat().join("; "))
        },
    );
    v.check(
        by_healthy_about_healthy.is_empty(),
        if by_healthy_about_healthy.is_empty() {
            "no healthy node suspected a healthy node".to_string()
        } else {
            format!(
                "healthy nodes suspected: {}",
                by_healthy_about_healthy.join("; ")
            )
        },
    );
    let limit = SLOW_ACCUSATIONS_PER_BURST * starts.len();
    v.check(
        accusations.len() <= limit,
        format!(
            "{victim}'s own accusations after its pauses: {} (at most {limit}: {SLOW_ACCUSATIONS_PER_BURST} per burst){}",
            accusations.len(),
            if accusations.is_empty() {
                String::new()
            } else {
                format!(": {}", accusations.join("; "))
            }
        ),
    );
    v.notes.push(format!(
        "suspect events about {victim} by its peers (expected): {}",
        about_victim.len()
    ));
    v.check(
        lost == 0 && sent > 0,
        format!(
            "cross-site pings {src} -> {dst} between healthy members answered ({}/{sent})",
            sent - lost
        ),
    );
    v.check(
        v.recovery.is_some(),
        "after the last burst every expected link is up, every node alive everywhere, node tables agree",
    );
    Ok(())
}

/// The host name `dns-drift` gives the seed.
const DRIFT_HOST: &str = "lab.test";

/// A namespace's own hosts file, `/etc/netns/NS/hosts` (bind-mounted over `/etc/hosts` by
/// `ip netns exec NS`); removed, with the directories it created, however the drill ends.
struct NetnsHosts {
    file: PathBuf,
    created: Vec<PathBuf>,
}

impl NetnsHosts {
    fn new(netns: &str) -> anyhow::Result<NetnsHosts> {
        let top = PathBuf::from("/etc/netns");
        let dir = top.join(netns);
        let mut created = Vec::new();
        for d in [&top, &dir] {
            if !d.exists() {
                std::fs::create_dir(d).with_context(|| format!("creating {}", d.display()))?;
                created.push(d.clone());
            }
        }
        Ok(NetnsHosts {
            file: dir.join("hosts"),
            created,
        })
    }

    fn point(&self, host: &str, addr: std::net::Ipv4Addr) -> anyhow::Result<()> {
        std::fs::write(
            &self.file,
            format!("127.0.0.1\tlocalhost\n{addr}\t{host}\n"),
        )
        .with_context(|| format!("writing {}", self.file.display()))
    }
}

impl Drop for NetnsHosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
        for d in self.created.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Puts a node's config back however the drill ends.
struct ConfigBackup {
    path: PathBuf,
    text: String,
}

impl Drop for ConfigBackup {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, &self.text);
    }
}

/// `preflight --config FILE --json` inside `netns`; the check named `check`.
fn preflight_check(
    netns: &str,
    config: &std::path::Path,
    check: &str,
) -> anyhow::Result<(crate::preflight::Status, String)> {
    let exe = std::env::current_exe().context("cannot find the clusterctl executable")?;
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(exe)
        .args(["preflight", "--json", "--config"])
        .arg(config)
        .stdin(std::process::Stdio::null())
        .output()
        .context("running preflight in the node's namespace")?;
    let report: crate::preflight::PreflightReport = serde_json::from_slice(&out.stdout)
        .with_context(|| {
            format!(
                "preflight printed no report: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let c = report
        .checks
        .into_iter()
        .find(|c| c.name == check)
        .with_context(|| format!("preflight has no check {check:?}"))?;
    Ok((c.status, c.detail))
}

fn dns_drift(ctx: &Ctx, state: &LabState, held: Duration, v: &mut Verdict) -> anyhow::Result<()> {
    let ns = state.netns.as_ref().context("a netns lab")?;
    let sites = ctx.sites();
    let here = sites.first().context("a site")?;
    // The node whose seed is named: the first member of the first site; the seed: its site's
    // gateway; the name is re-pointed to the other member of the site.
    let members = ctx.members_of(here, Some(Role::Member));
    let (Some(node), Some(wrong)) = (members.first(), members.get(1)) else {
        bail!("the drill needs two members in the first site");
    };
    let (node, wrong) = (node.name.clone(), wrong.name.clone());
    let seed = ctx
        .members_of(here, Some(Role::Gateway))
        .first()
        .map(|n| n.name.clone())
        .context("a gateway in the first site")?;
    let seed_addr = ns
        .node(&seed)
        .map(|n| n.site_addr)
        .context("the gateway's address")?;
    let wrong_addr = ns
        .node(&wrong)
        .map(|n| n.site_addr)
        .context("the other member's address")?;
    let host = format!("{seed}.{DRIFT_HOST}");
    let netns_name = ns.node_netns(&node);
    let config = ctx.node(&node).config.clone();
    let original = std::fs::read_to_string(&config)
        .with_context(|| format!("reading {}", config.display()))?;
    let by_ip = format!("\"{seed}@{seed_addr}:");
    if !original.contains(&by_ip) {
        bail!("{} has no seed {by_ip}...", config.display());
    }
    let by_name = original.replace(&by_ip, &format!("\"{seed}@{host}:"));
    let drift_config = config.with_file_name("config-dns.toml");
    std::fs::write(&drift_config, &by_name)
        .with_context(|| format!("writing {}", drift_config.display()))?;
    let hosts = NetnsHosts::new(&netns_name)?;
    let check = format!("seed {seed}");

    // The name resolves right: the seed check passes.
    hosts.point(&host, seed_addr)?;
    let (st, detail) = preflight_check(&netns_name, &drift_config, &check)?;
    v.check(
        st == crate::preflight::Status::Pass,
        format!(
            "{host} -> {seed_addr}: preflight `{check}` {}: {detail}",
            st.as_str()
        ),
    );

    // Re-pointed: preflight reports the drift.
    hosts.point(&host, wrong_addr)?;
    let t_fault = Instant::now();
    let (st, detail) = preflight_check(&netns_name, &drift_config, &check)?;
    let reported = st != crate::preflight::Status::Pass && detail.contains("DNS drift");
    if reported {
        v.detection = Some(t_fault.elapsed());
    }
    v.check(
        reported,
        format!(
            "{host} -> {wrong_addr}: preflight `{check}` {}: {detail}",
            st.as_str()
        ),
    );

    // The agent restarted with that config: what the cluster shows.
    let seqs = ctx.seqs();
    let backup = ConfigBackup {
        path: config.clone(),
        text: original.clone(),
    };
    std::fs::write(&config, &by_name).with_context(|| format!("writing {}", config.display()))?;
    fault::restart(&ctx.dir, &node)?;
    let t_up = Instant::now();
    let mut refused_seen: Vec<String> = Vec::new();
    let mut t_refused = None;
    let mut seed_link_up_at = None;
    let mut flagged: Option<(Duration, String)> = None;
    while t_up.elapsed() < held {
        for o in [&node, &seed, &wrong] {
            let Some(t) = ctx.topology(o) else { continue };
            for l in t.links.iter().filter(|l| l.state == LinkState::Refused) {
                let w = format!(
                    "{o} shows {} <-> {} refused: {}",
                    l.from,
                    l.to,
                    l.reason.as_deref().unwrap_or("-")
                );
                if t_refused.is_none() {
                    t_refused = Some(t_up.elapsed());
                }
                if !refused_seen.contains(&w) {
                    refused_seen.push(w);
                }
            }
            if o == &node && flagged.is_none() {
                if let Some(w) = t.warnings.iter().find(|w| w.contains("DNS drift")) {
                    flagged = Some((t_up.elapsed(), w.clone()));
                }
            }
            if o == &node && seed_link_up_at.is_none() {
                let up = t.links.iter().any(|l| {
                    l.state == LinkState::Up
                        && ((l.from == node && l.to == seed) || (l.from == seed && l.to == node))
                });
                if up {
                    seed_link_up_at = Some(t_up.elapsed());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let refusals = ctx.refusals(&seqs);
    v.check(
        flagged.is_some(),
        match &flagged {
            Some((d, w)) => format!(
                "{node}'s topology flags it after {:.2} s: {w}",
                d.as_secs_f64()
            ),
            None => format!("{node}'s topology never flagged the drifted seed"),
        },
    );
    v.extra
        .push(("refused_links", refused_seen.len().to_string()));
    v.extra.push(("refused_events", refusals.len().to_string()));
    for w in &refused_seen {
        v.notes.push(format!("topology: {w}"));
    }
    for e in &refusals {
        v.notes.push(format!("event: {}", show_event(e)));
    }
    if refused_seen.is_empty() {
        v.notes.push(format!(
            "topology showed no refused link in {} s after {node} restarted with the drifted seed",
            held.as_secs()
        ));
    }
    if refusals.is_empty() {
        v.notes
            .push("no link-refused event was recorded".to_string());
    }
    v.check(
        seed_link_up_at.is_some(),
        match seed_link_up_at {
            Some(d) => format!(
                "{node} restarted with the drifted seed: {node} <-> {seed} up after {:.2} s",
                d.as_secs_f64()
            ),
            None => {
                format!("{node} restarted with the drifted seed: {node} <-> {seed} never came up")
            }
        },
    );
    if let Some(d) = t_refused {
        v.extra
            .push(("refused_after_s", format!("{:.2}", d.as_secs_f64())));
    }

    // Restore the config and the name, then recovery.
    drop(backup);
    hosts.point(&host, seed_addr)?;
    let t_heal = Instant::now();
    fault::restart(&ctx.dir, &node)?;
    v.recovery = ctx
        .wait(CONVERGE_LIMIT, || ctx.converged() && ctx.tables_agree())
        .map(|_| t_heal.elapsed());
    v.check(
        v.recovery.is_some(),
        "with the seed's address restored every expected link is up, every node alive everywhere, node tables agree",
    );
    let _ = std::fs::remove_file(&drift_config);
    drop(hosts);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_one_way_drill_judges_every_poll_of_the_last_45_s() {
        assert_eq!(DrillName::OneWay.default_duration(), 90);
        assert_eq!(steady_window(Duration::from_secs(90)), MAX_STEADY);
        assert_eq!(
            steady_window(Duration::from_secs(30)),
            Duration::from_secs(15)
        );
        let s = |ms: u64| Duration::from_millis(ms);
        // Lost at 40 s (before the window), shown from 44 s on, every 2 s.
        let mut polls: Vec<(Duration, bool)> = vec![(s(40_000), false)];
        polls.extend((0..24).map(|i| (s(44_000 + 2_000 * i), true)));
        let ok = steady_polls(&polls, s(45_000));
        assert_eq!(ok.polls, 23);
        assert_eq!(ok.shown, 23);
        assert_eq!(ok.max_gap, s(2_000));
        // One poll in the window without it (the fault became a partition) is counted.
        polls.push((s(91_000), false));
        assert_eq!(steady_polls(&polls, s(45_000)).shown, 23);
        assert_eq!(steady_polls(&polls, s(45_000)).polls, 24);
        // A hole in the polling shows as the largest gap.
        let sparse = [(s(46_000), true), (s(52_000), true)];
        assert_eq!(steady_polls(&sparse, s(45_000)).max_gap, s(6_000));
    }

    #[test]
    fn drill_verdict_needs_every_check_and_prints_its_figures() {
        let mut v = Verdict::default();
        assert!(!v.pass(), "a drill that checked nothing did not pass");
        v.check(true, "a");
        v.detection = Some(Duration::from_millis(2410));
        v.probes = 40;
        let text = v.render(DrillName::WanPartition, "lab cc0001, 6 nodes", 20);
        assert!(text.starts_with("drill wan-partition: PASS"), "{text}");
        assert!(text.contains("  detection         2.41 s"), "{text}");
        assert!(
            text.ends_with("false_suspicions=0 lost_probes=0 probes=40"),
            "{text}"
        );
        v.extra.push(("refused_links", "2".into()));
        let text = v.render(DrillName::RollingRestartSecret, "", 10);
        assert!(text.contains("  refused links     2\n"), "{text}");
        assert!(text.ends_with("probes=40 refused_links=2"), "{text}");
        v.check(false, "b");
        assert!(!v.pass());
        assert!(v.render(DrillName::LossyWan, "", 1).contains("  FAIL  b"));
    }
}
