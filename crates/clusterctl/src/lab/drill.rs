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
    Event, EventKind, LinkState, Members, NodeStatus, PingReport, PingRequest, Role, Topology,
};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
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
}

impl DrillName {
    fn as_str(self) -> &'static str {
        match self {
            DrillName::GoldenPath => "golden-path",
            DrillName::WanPartition => "wan-partition",
            DrillName::GatewayFailover => "gateway-failover",
            DrillName::LossyWan => "lossy-wan",
        }
    }

    /// Seconds the fault (or, for golden-path, the ping phase) lasts by default.
    fn default_duration(self) -> u64 {
        match self {
            DrillName::GoldenPath => 10,
            DrillName::WanPartition | DrillName::GatewayFailover => 20,
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
        Client::with_timeout(&self.node(name).control, API_TIMEOUT)
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
            &self.node(from).control,
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

#[cfg(test)]
mod tests {
    use super::*;

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
        v.check(false, "b");
        assert!(!v.pass());
        assert!(v.render(DrillName::LossyWan, "", 1).contains("  FAIL  b"));
    }
}
