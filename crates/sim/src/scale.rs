//! Measurements of a large simulated cluster, in virtual time.
//!
//! [`run`] builds `sites` sites of `per_site` nodes each (of which `gateways` are gateways; every
//! pair of sites linked), starting the first site one member short, and then:
//!
//! 1. runs until the cluster has converged: every running node has every link it should have,
//!    and sees every running node `alive`;
//! 2. **join**: starts the missing member and runs until every running node sees it `alive`;
//! 3. **steady state**: after a settling period, counts the bytes every node sends (encoded
//!    frames and failure-detector datagrams) over a window;
//! 4. **death**: crashes a member of the second site and runs until every node of its site, and
//!    then every node of the cluster, sees it `dead`.
//!
//! Every figure but the wall-clock ones and memory depends only on the seed: the same seed gives
//! the same report.

use crate::{Sim, SimConfig, SiteSpec};
use clusterctl_api::{NodeStatus, Role};
use clusterctl_core::name::NodeName;
use std::time::{Duration, Instant};

/// What to build and measure.
#[derive(Debug, Clone)]
pub struct ScaleSpec {
    pub sites: usize,
    /// Nodes per site, gateways included.
    pub per_site: usize,
    /// Gateways per site.
    pub gateways: usize,
    pub seed: u64,
    /// Longest virtual time any phase may take before the run gives up on it.
    pub phase_limit: Duration,
    /// Steady-state window over which bytes are counted.
    pub window: Duration,
    /// Print progress lines to stderr.
    pub progress: bool,
    /// Site-ring probe period instead of the default (the probe timeout is half of it).
    pub probe_period: Option<Duration>,
    /// Site-ring suspicion instead of the default.
    pub suspicion: Option<Duration>,
    /// [`clusterctl_core::engine::Timing::link_settle`] instead of the default.
    pub link_settle: Option<Duration>,
}

impl ScaleSpec {
    /// A spec with the default limits: 120 s per phase, 10 s byte window.
    pub fn new(sites: usize, per_site: usize, gateways: usize, seed: u64) -> Self {
        ScaleSpec {
            sites,
            per_site,
            gateways,
            seed,
            phase_limit: Duration::from_secs(120),
            window: Duration::from_secs(10),
            progress: false,
            probe_period: None,
            suspicion: None,
            link_settle: None,
        }
    }

    /// Total nodes once the joining member runs.
    pub fn nodes(&self) -> usize {
        self.sites * self.per_site
    }
}

/// Figures that depend only on the seed (virtual time, bytes, links, steps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Figures {
    pub nodes: usize,
    /// Virtual time from start to converged.
    pub converge: Option<Duration>,
    /// Frame bytes all nodes sent from the start until converged.
    pub converge_frame_bytes: u64,
    /// The same by kind of frame ([`crate::frame_kind`]): frames and bytes.
    pub converge_frame_kinds: Vec<(&'static str, u64, u64)>,
    /// Virtual time from the joining node's start until every running node sees it alive.
    pub join: Option<Duration>,
    /// Virtual time from the crash until every node of the dead node's site sees it dead.
    pub death_site: Option<Duration>,
    /// Virtual time from the crash until every running node sees it dead.
    pub death_all: Option<Duration>,
    /// Bytes sent over the window, all nodes: frames and datagrams.
    pub window_frame_bytes: u64,
    pub window_datagram_bytes: u64,
    /// The window's frame bytes by kind of frame ([`crate::frame_kind`]), all nodes.
    pub window_frame_kinds: Vec<(&'static str, u64)>,
    /// Largest bytes sent by one node over the window (frames + datagrams).
    pub window_max_node_bytes: u64,
    pub window: Duration,
    /// Links per node once converged: total link ends, max.
    pub link_ends: usize,
    pub links_max: usize,
    /// Simulator events executed, total virtual time simulated.
    pub steps: u64,
    pub virtual_total: Duration,
}

impl Figures {
    /// Mean bytes per node per second in the steady-state window.
    pub fn bytes_per_node_s(&self) -> f64 {
        let total = (self.window_frame_bytes + self.window_datagram_bytes) as f64;
        total / self.nodes.max(1) as f64 / self.window.as_secs_f64().max(1e-9)
    }

    /// Mean links per node.
    pub fn links_mean(&self) -> f64 {
        self.link_ends as f64 / self.nodes.max(1) as f64
    }
}

/// Figures plus what the machine did (not deterministic).
#[derive(Debug, Clone)]
pub struct ScaleReport {
    pub spec: ScaleSpec,
    pub figures: Figures,
    /// Wall time of the whole run.
    pub wall: Duration,
    /// Resident memory growth from before building to converged, per node (bytes); None where
    /// /proc/self/status is not available.
    pub rss_per_node: Option<u64>,
}

impl ScaleReport {
    /// Virtual seconds simulated per wall second.
    pub fn speed(&self) -> f64 {
        self.figures.virtual_total.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }

    /// The report as a Markdown table, followed by the replay line.
    pub fn markdown(&self) -> String {
        let f = &self.figures;
        let s = &self.spec;
        let t = |d: Option<Duration>| match d {
            Some(d) => format!("{:.1}", d.as_secs_f64()),
            None => format!("not within {} s", s.phase_limit.as_secs()),
        };
        let mut out = String::new();
        out.push_str(&format!(
            "{} nodes in {} sites ({} per site, {} gateways each), seed {}\n\n",
            f.nodes, s.sites, s.per_site, s.gateways, s.seed
        ));
        out.push_str("| measurement | value |\n|---|---|\n");
        let rows: Vec<(String, String)> = vec![
            (
                "cluster converged from cold start, virtual s".into(),
                t(f.converge),
            ),
            (
                "  frame bytes sent by all nodes until converged, MB".into(),
                format!("{:.1}", f.converge_frame_bytes as f64 / 1e6),
            ),
            (
                "  by kind: frames / MB".into(),
                f.converge_frame_kinds
                    .iter()
                    .map(|(k, n, b)| format!("{k} {n} / {:.1}", *b as f64 / 1e6))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            ("join known alive everywhere, virtual s".into(), t(f.join)),
            (
                "death seen dead in its site, virtual s".into(),
                t(f.death_site),
            ),
            (
                "death seen dead everywhere, virtual s".into(),
                t(f.death_all),
            ),
            (
                format!(
                    "bytes per node per second, steady state ({} s window)",
                    f.window.as_secs()
                ),
                format!("{:.0}", f.bytes_per_node_s()),
            ),
            (
                "  of which frames (table sync) / datagrams (failure detection)".into(),
                format!(
                    "{:.0} / {:.0}",
                    f.window_frame_bytes as f64 / f.nodes as f64 / f.window.as_secs_f64(),
                    f.window_datagram_bytes as f64 / f.nodes as f64 / f.window.as_secs_f64()
                ),
            ),
            (
                "  frames by kind, bytes per node per second".into(),
                f.window_frame_kinds
                    .iter()
                    .map(|(k, b)| {
                        format!(
                            "{k} {:.0}",
                            *b as f64 / f.nodes as f64 / f.window.as_secs_f64()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            (
                "busiest node, bytes per second".into(),
                format!(
                    "{:.0}",
                    f.window_max_node_bytes as f64 / f.window.as_secs_f64()
                ),
            ),
            (
                "links per node, mean / max".into(),
                format!("{:.1} / {}", f.links_mean(), f.links_max),
            ),
            (
                "links per node in a full mesh (N-1)".into(),
                format!("{}", f.nodes - 1),
            ),
            (
                "memory per simulated node (RSS growth / N), KiB".into(),
                self.rss_per_node
                    .map_or("n/a".into(), |b| format!("{:.0}", b as f64 / 1024.0)),
            ),
            (
                "virtual time simulated, s".into(),
                format!("{:.1}", f.virtual_total.as_secs_f64()),
            ),
            ("simulator events".into(), format!("{}", f.steps)),
            (
                "wall time, s".into(),
                format!("{:.1}", self.wall.as_secs_f64()),
            ),
            (
                "simulator speed, virtual s per wall s".into(),
                format!("{:.2}", self.speed()),
            ),
        ];
        for (k, v) in rows {
            out.push_str(&format!("| {k} | {v} |\n"));
        }
        out.push_str(&format!(
            "\nseed {seed} (replay: cargo run --release -p clusterctl-sim --bin scale -- --sites {} --per-site {} --gateways {} --seed {seed})\n",
            s.sites,
            s.per_site,
            s.gateways,
            seed = s.seed
        ));
        out
    }
}

/// Resident set size of this process, from /proc/self/status.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn site_name(k: usize) -> String {
    format!("s{k}-dc")
}

/// Whether every running node has every link it should and reports every running node alive.
/// Cheaper than [`Sim::converged`] at scale: links are counted (the invariant checks already
/// guarantee each is one the contract allows) and statuses are the ones each node reported.
pub fn converged(sim: &Sim) -> bool {
    let running: Vec<usize> = (0..sim.nodes.len())
        .filter(|&i| sim.nodes[i].is_up())
        .collect();
    // Running nodes and running gateways of each site.
    let mut per_site: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    let mut gateways = 0usize;
    for &i in &running {
        let id = &sim.nodes[i].ident;
        let e = per_site.entry(id.site.as_str()).or_default();
        e.0 += 1;
        if id.role == Role::Gateway {
            e.1 += 1;
            gateways += 1;
        }
    }
    running.iter().all(|&i| {
        let n = &sim.nodes[i];
        let Some(e) = n.engine() else { return false };
        let (site_nodes, site_gw) = per_site[n.ident.site.as_str()];
        let mut expected = site_nodes - 1;
        if n.ident.role == Role::Gateway {
            expected += gateways - site_gw;
        }
        if e.linked_peers().len() != expected {
            return false;
        }
        // What each node reports (its events), not a fresh computation: a pass over its
        // statuses to count, then a lookup per node only when the count can be right.
        e.reported_count(NodeStatus::Alive) >= running.len() - 1
            && running
                .iter()
                .filter(|&&j| j != i)
                .all(|&j| e.reported_status(&sim.nodes[j].ident.name) == Some(NodeStatus::Alive))
    })
}

fn all_see(sim: &Sim, target: &NodeName, status: NodeStatus, only_site: bool) -> bool {
    let site = &sim.nodes[sim.idx(target.as_str())].ident.site;
    sim.nodes
        .iter()
        .filter(|n| n.ident.name != *target && (!only_site || n.ident.site == *site))
        .filter_map(|n| n.engine())
        .all(|e| e.status_of(target) == status)
}

fn bytes_sent(sim: &Sim) -> Vec<(u64, u64)> {
    sim.nodes
        .iter()
        .map(|n| (n.frame_bytes_sent, n.datagram_bytes_sent))
        .collect()
}

/// Builds, converges and measures a cluster as described in the module documentation.
pub fn run(spec: &ScaleSpec) -> ScaleReport {
    let started = Instant::now();
    let say = |what: &str, sim: &Sim| {
        if spec.progress {
            eprintln!(
                "[{:>7.1}s wall] virtual {:>6.1}s, {} events, {} MiB resident: {what}",
                started.elapsed().as_secs_f64(),
                sim.now().as_secs_f64(),
                sim.steps,
                rss_bytes().unwrap_or(0) >> 20
            );
        }
    };
    assert!(
        spec.sites >= 2 && spec.per_site > spec.gateways + 1 && spec.gateways >= 1,
        "need at least 2 sites, 1 gateway and 2 members per site"
    );
    let rss_before = rss_bytes();
    let sites: Vec<SiteSpec> = (0..spec.sites)
        .map(|k| SiteSpec {
            name: site_name(k),
            gateways: spec.gateways,
            // The first site starts one member short: that member joins later.
            members: spec.per_site - spec.gateways - usize::from(k == 0),
        })
        .collect();
    let mut cfg = SimConfig::new(spec.seed);
    cfg.record_events = false;
    cfg.share_frames = true;
    cfg.check_caches = false;
    cfg.copy_persisted = false;
    if let Some(p) = spec.probe_period {
        cfg.timing.site_ring.probe_period = p;
        cfg.timing.site_ring.probe_rtt = p / 2;
    }
    if let Some(s) = spec.suspicion {
        cfg.timing.site_ring.suspect_to_down = s;
    }
    if let Some(s) = spec.link_settle {
        cfg.timing.link_settle = s;
    }
    let mut sim = Sim::new(cfg, &sites);
    say("built", &sim);
    let check = Duration::from_millis(500);
    // Converged or not, every 100 ms of virtual time (cheap until it is nearly true), with a
    // progress line saying what the queue holds.
    let converging = |s: &Sim| {
        let done = converged(s);
        if !done {
            let bytes: u64 = bytes_sent(s).iter().map(|(f, _)| f).sum();
            let q = s.queue_stats();
            say(
                &format!(
                    "converging, {:.1} MB of frames sent; queued: {} events, {} frames carrying {} records and {} digest entries",
                    bytes as f64 / 1e6,
                    q.events,
                    q.frames,
                    q.records,
                    q.digest_entries
                ),
                s,
            );
        }
        done
    };
    let converge = run_until_every(
        &mut sim,
        spec.phase_limit,
        Duration::from_millis(100),
        converging,
    );
    let converge_frame_bytes = bytes_sent(&sim).iter().map(|(f, _)| f).sum();
    let converge_frame_kinds = sim
        .frame_kinds
        .iter()
        .map(|(k, (n, b))| (*k, *n, *b))
        .collect();
    say("converged", &sim);
    let rss_per_node = match (rss_before, rss_bytes()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) / spec.nodes() as u64),
        _ => None,
    };

    // Join.
    let joiner = NodeName::new(sim.add_member(&site_name(0))).expect("valid name");
    let join = sim.run_until(spec.phase_limit, |s| {
        all_see(s, &joiner, NodeStatus::Alive, false)
    });
    say("join seen everywhere", &sim);
    // Let the join settle: every link up, every status alive.
    run_until_every(&mut sim, spec.phase_limit, check, converged);
    let (link_ends, links_max) = sim
        .nodes
        .iter()
        .filter_map(|n| n.engine())
        .map(|e| e.linked_peers().len())
        .fold((0, 0), |(sum, max), l| (sum + l, max.max(l)));

    // Steady state.
    sim.run_for(Duration::from_secs(5));
    let before = bytes_sent(&sim);
    let kinds_before = sim.frame_kinds.clone();
    sim.run_for(spec.window);
    let after = bytes_sent(&sim);
    let window_frame_kinds = sim
        .frame_kinds
        .iter()
        .map(|(k, (_, b))| (*k, b - kinds_before.get(k).map_or(0, |(_, b0)| *b0)))
        .filter(|(_, b)| *b > 0)
        .collect();
    let (mut fb, mut db, mut max_node) = (0u64, 0u64, 0u64);
    for ((f0, d0), (f1, d1)) in before.iter().zip(after.iter()) {
        fb += f1 - f0;
        db += d1 - d0;
        max_node = max_node.max(f1 - f0 + d1 - d0);
    }
    say("steady state measured", &sim);

    // Death of a member of the second site.
    let victim = sim
        .nodes
        .iter()
        .find(|n| n.ident.site.as_str() == site_name(1) && n.ident.role == Role::Member)
        .map(|n| n.ident.name.clone())
        .expect("the second site has members");
    sim.crash(victim.as_str());
    let t0 = sim.now();
    let mut death_site = None;
    let mut last_report = Duration::ZERO;
    let death_all = sim.run_until(spec.phase_limit, |s| {
        if spec.progress && s.now() - t0 >= last_report + Duration::from_secs(1) {
            last_report = s.now() - t0;
            let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
            for e in s.nodes.iter().filter_map(|n| n.engine()) {
                *counts.entry(e.status_of(&victim).to_string()).or_default() += 1;
            }
            eprintln!(
                "  {:>5.1}s after the crash: {counts:?}",
                last_report.as_secs_f64()
            );
        }
        if death_site.is_none() && all_see(s, &victim, NodeStatus::Dead, true) {
            death_site = Some(s.now() - t0);
        }
        death_site.is_some() && all_see(s, &victim, NodeStatus::Dead, false)
    });
    say("death seen everywhere", &sim);

    let figures = Figures {
        nodes: spec.nodes(),
        converge,
        converge_frame_bytes,
        converge_frame_kinds,
        join,
        death_site,
        death_all,
        window_frame_bytes: fb,
        window_datagram_bytes: db,
        window_frame_kinds,
        window_max_node_bytes: max_node,
        window: spec.window,
        link_ends,
        links_max,
        steps: sim.steps,
        virtual_total: sim.now(),
    };
    ScaleReport {
        spec: spec.clone(),
        figures,
        wall: started.elapsed(),
        rss_per_node,
    }
}

/// Like [`Sim::run_until`], checking `pred` every `every` (the convergence check is the costly
/// part of a large run).
fn run_until_every(
    sim: &mut Sim,
    max: Duration,
    every: Duration,
    pred: impl Fn(&Sim) -> bool,
) -> Option<Duration> {
    let start = sim.now();
    while sim.now() - start <= max {
        if pred(sim) {
            return Some(sim.now() - start);
        }
        sim.run_for(every);
    }
    pred(sim).then(|| sim.now() - start)
}
