//! Deterministic simulator over the clusterctl core.
//!
//! Many [`Engine`]s — the exact production protocol code — run on one virtual clock and a
//! seeded virtual network: sites, per-kind latency, random datagram loss, WAN cuts, isolated,
//! paused and crashed nodes, restarts from the last persisted table. Given the same seed, a run produces the
//! same result, event for event; every test prints the seed that replays it
//! (`CLUSTERCTL_SIM_SEED=N`).
//!
//! The network model follows what the runtime's transport does:
//! - a dial reaches its target only if neither end is crashed or cut off from the other; the
//!   handshake (hello, ack, contract and identity checks) runs through the same engine methods;
//! - frames and datagrams are delivered after the link's latency while the path is open, and
//!   lost while it is cut; datagrams may also be dropped at random;
//! - a connection whose path stays cut (or whose peer crashed) for the idle timeout closes at
//!   both ends, as QUIC's idle timeout does.
//!
//! After every step the simulator checks invariants (a member never links outside its site,
//! every link the contract allows, no node's own clock ever falls) and panics with the seed
//! when one breaks.

#![forbid(unsafe_code)]

pub mod scale;

use clusterctl_api::{NodeStatus, PingReport, Role, Topology};
use clusterctl_core::contract::Contract;
use clusterctl_core::engine::{Engine, EngineConfig, EventOut, LinkInfo, Output, Reply, Timing};
use clusterctl_core::name::{ClusterName, Ident, NodeName, SiteName};
use clusterctl_core::secret::{KeyId, Keyring, Secret};
use clusterctl_core::table::NodeRecord;
use clusterctl_core::wire::{record_encoded_len, Frame, RefusalCode};
use clusterctl_core::Time;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// See [`Sim::queue_stats`].
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueStats {
    pub events: usize,
    pub frames: usize,
    pub frame_bytes: usize,
    pub records: usize,
    pub digest_entries: usize,
    pub datagram_bytes: usize,
}

/// Network and fault parameters.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    /// One-way latency inside a site.
    pub site_latency: Duration,
    /// One-way latency between sites.
    pub wan_latency: Duration,
    /// A connection whose path stays broken this long closes.
    pub idle_timeout: Duration,
    /// A dial to an unreachable node fails after this long.
    pub connect_timeout: Duration,
    /// Percentage of datagrams lost at random (0-100).
    pub datagram_loss: u8,
    /// Keep every event each node emits in [`SimNode::events`] (turn off for large runs: the
    /// lists grow with nodes times events).
    pub record_events: bool,
    /// Hand frames to the receiver in memory instead of as encoded bytes: records stay shared
    /// between every node that holds them (one copy per version for the whole simulation), and
    /// bytes are still counted at their encoded length. Large runs turn it on to fit in memory;
    /// the default (off) also runs every frame through encoding and decoding.
    pub share_frames: bool,
    /// Timing of every engine (default [`Timing::lan`]).
    pub timing: Timing,
    /// After every step, check that each node handled keeps its statuses and wanted links equal
    /// to the same computed from scratch (a pass over its table: large runs turn it off).
    pub check_caches: bool,
    /// Keep each node's persisted table as a copy updated on every [`Output::Persist`]
    /// (default). Off, a crash takes the running table as the persisted one, which is the same
    /// as long as every change of the table is persisted in the step that made it (checked at
    /// each crash); large runs turn it off to save one table per node.
    pub copy_persisted: bool,
}

impl SimConfig {
    /// Defaults that match the runtime: 10 s idle timeout, 0.2 ms in a site, 20 ms across.
    pub fn new(seed: u64) -> Self {
        SimConfig {
            seed,
            site_latency: Duration::from_micros(200),
            wan_latency: Duration::from_millis(20),
            idle_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            datagram_loss: 0,
            record_events: true,
            share_frames: false,
            timing: Timing::lan(),
            check_caches: true,
            copy_persisted: true,
        }
    }
}

/// The seed to use: `CLUSTERCTL_SIM_SEED` when set, else `default`. Printed so a failing test
/// can be replayed.
pub fn seed_from_env(default: u64) -> u64 {
    let seed = std::env::var("CLUSTERCTL_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    println!("simulation seed {seed} (replay with CLUSTERCTL_SIM_SEED={seed})");
    seed
}

/// A deterministic cluster secret for simulations (`n` picks which).
pub fn sim_secret(n: u8) -> Secret {
    Secret::from_bytes(&[n; 32]).expect("32 bytes is a valid secret")
}

/// One site of a simulated cluster.
#[derive(Debug, Clone)]
pub struct SiteSpec {
    pub name: String,
    pub gateways: usize,
    pub members: usize,
}

/// A node of the simulation.
#[derive(Debug)]
pub struct SimNode {
    pub ident: Ident,
    pub addr: String,
    engine: Option<Engine>,
    cfg: EngineConfig,
    /// Last persisted table (what survives a crash), kept up to date incrementally.
    persisted: BTreeMap<NodeName, Arc<NodeRecord>>,
    /// Table generation of the running engine at its last persist.
    persisted_gen: u64,
    /// Links generation of the running engine at its last invariant check.
    checked_links_gen: Option<u64>,
    /// Every event the node emitted.
    pub events: Vec<EventOut>,
    replies: BTreeMap<u64, Reply>,
    wake: Option<Time>,
    isolated: bool,
    /// Stopped (like SIGSTOP) until then: everything addressed to it waits.
    paused_until: Option<Time>,
    /// Own clock observed over time (invariant: never falls within one life on disk).
    max_clock: u64,
    /// Frames this node sent on a connection, and their encoded bytes.
    pub frames_sent: u64,
    pub frame_bytes_sent: u64,
    /// Datagrams this node sent on a connection (after random loss), and their bytes.
    pub datagrams_sent: u64,
    pub datagram_bytes_sent: u64,
}

impl SimNode {
    /// A node not started yet, with no persisted table and zeroed counters.
    fn new(ident: Ident, addr: String, cfg: EngineConfig) -> SimNode {
        SimNode {
            ident,
            addr,
            engine: None,
            cfg,
            persisted: BTreeMap::new(),
            persisted_gen: 0,
            checked_links_gen: None,
            events: Vec::new(),
            replies: BTreeMap::new(),
            wake: None,
            isolated: false,
            paused_until: None,
            max_clock: 0,
            frames_sent: 0,
            frame_bytes_sent: 0,
            datagrams_sent: 0,
            datagram_bytes_sent: 0,
        }
    }

    /// Whether the node is running.
    pub fn is_up(&self) -> bool {
        self.engine.is_some()
    }

    /// The running engine.
    pub fn engine(&self) -> Option<&Engine> {
        self.engine.as_ref()
    }
}

/// A frame in flight.
#[derive(Debug, Clone)]
enum Payload {
    /// Encoded, as on the wire.
    Bytes(Vec<u8>),
    /// Decoded, sharing its records with the sender ([`SimConfig::share_frames`]).
    Shared(Box<Frame>),
}

#[derive(Debug, Clone)]
enum Ev {
    Wake(usize),
    Frame {
        to: usize,
        from: usize,
        payload: Payload,
    },
    Datagram {
        to: usize,
        from: usize,
        bytes: Vec<u8>,
    },
    Handshake {
        dialer: usize,
        acceptor: usize,
    },
    InboundStalled {
        at: usize,
        addr: String,
    },
    DialFailed {
        dialer: usize,
        peer: NodeName,
        reason: String,
    },
    Refused {
        at: usize,
        peer: NodeName,
        code: Option<RefusalCode>,
        reason: String,
        by_us: bool,
    },
    LinkUp {
        at: usize,
        peer: usize,
    },
    IdleCheck {
        a: usize,
        b: usize,
    },
    /// A connection closes at `at`; with `gen`, only if no newer connection replaced it.
    Close {
        at: usize,
        peer: usize,
        reason: String,
        gen: Option<u64>,
    },
}

/// An event in the queue: ordered by time, then by scheduling order (ties run first-in,
/// first-out, which keeps runs deterministic).
#[derive(Debug)]
struct Queued {
    at: Time,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Queued {}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// The simulator.
pub struct Sim {
    cfg: SimConfig,
    now: Time,
    seq: u64,
    queue: BinaryHeap<Reverse<Queued>>,
    /// Nodes handled since the last invariant check.
    touched: Vec<usize>,
    pub nodes: Vec<SimNode>,
    index: BTreeMap<NodeName, usize>,
    /// Open connections and their generation.
    conns: BTreeMap<(usize, usize), u64>,
    conn_keys: BTreeMap<(usize, usize), KeyId>,
    cuts: BTreeSet<(SiteName, SiteName)>,
    /// Directions dropped between sites: `(from, to)`.
    one_way: BTreeSet<(SiteName, SiteName)>,
    rng: StdRng,
    contract: Contract,
    next_token: u64,
    /// Datagrams dropped by the loss model.
    pub lost_datagrams: u64,
    /// Steps executed.
    pub steps: u64,
    /// Frames sent by all nodes, by kind ([`frame_kind`]): count and encoded bytes.
    pub frame_kinds: BTreeMap<&'static str, (u64, u64)>,
    /// Encoded length of each shared record sent, so a record sent to a hundred peers is
    /// measured once. The `Weak` keeps the allocation (not the record) alive, so an address is
    /// never reused while its entry exists.
    record_lens: HashMap<usize, (Weak<NodeRecord>, usize)>,
    /// `record_lens` is swept of dropped records when it grows past this.
    record_lens_sweep: usize,
}

/// A frame's kind, as counted in [`Sim::frame_kinds`].
pub fn frame_kind(f: &Frame) -> &'static str {
    match f {
        Frame::Records(_) => "records",
        Frame::Digest(..) => "digest",
        Frame::Summary(_) => "summary",
        Frame::Sites(_) => "sites",
        Frame::SiteDigest(..) => "site-digest",
        Frame::Routed(_) => "routed",
        Frame::Leaving => "leaving",
        #[allow(unreachable_patterns)]
        _ => "other",
    }
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("seed", &self.cfg.seed)
            .field("now", &self.now)
            .field("nodes", &self.nodes.len())
            .finish_non_exhaustive()
    }
}

fn short_code(site: &str) -> &str {
    site.split('-').next().unwrap_or(site)
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    if a < b {
        (a, b)
    } else {
        (b, a)
    }
}

impl Sim {
    /// Builds a cluster: every pair of sites is linked by the contract; members are named
    /// `edge-CODE-N`, gateways `gw-CODE-N` (CODE = site name up to the first '-').
    pub fn new(cfg: SimConfig, sites: &[SiteSpec]) -> Sim {
        let mut contract_text = String::from("cluster = \"sim\"\n");
        let mut idents: Vec<Ident> = Vec::new();
        for s in sites {
            let code = short_code(&s.name);
            let gws: Vec<String> = (1..=s.gateways).map(|i| format!("gw-{code}-{i}")).collect();
            contract_text.push_str(&format!(
                "[[site]]\nname = \"{}\"\ngateways = [{}]\n",
                s.name,
                gws.iter()
                    .map(|g| format!("\"{g}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            let site = SiteName::new(s.name.clone()).expect("valid site name");
            for g in gws {
                idents.push(Ident {
                    name: NodeName::new(g).expect("valid name"),
                    site: site.clone(),
                    role: Role::Gateway,
                });
            }
            for i in 1..=s.members {
                idents.push(Ident {
                    name: NodeName::new(format!("edge-{code}-{i}")).expect("valid name"),
                    site: site.clone(),
                    role: Role::Member,
                });
            }
        }
        for (i, a) in sites.iter().enumerate() {
            for b in &sites[i + 1..] {
                if a.gateways > 0 && b.gateways > 0 {
                    contract_text.push_str(&format!(
                        "[[link]]\nbetween = [\"{}\", \"{}\"]\n",
                        a.name, b.name
                    ));
                }
            }
        }
        let contract = Contract::parse(&contract_text).expect("generated contract is valid");
        let cluster = ClusterName::new("sim").expect("valid");
        let mut nodes = Vec::new();
        let mut index = BTreeMap::new();
        for (i, id) in idents.iter().enumerate() {
            let addr = format!("sim:{}", id.name);
            let seeds: Vec<(NodeName, String)> = idents
                .iter()
                .filter(|o| {
                    o.name != id.name
                        && (o.site == id.site
                            || (id.role == Role::Gateway && o.role == Role::Gateway))
                })
                .map(|o| (o.name.clone(), format!("sim:{}", o.name)))
                .collect();
            let ecfg = EngineConfig {
                cluster: cluster.clone(),
                me: id.clone(),
                addr: addr.clone(),
                wan_addr: None,
                contract: contract.clone(),
                secure: true,
                version: "sim".into(),
                seeds,
                rejoin: false,
                timing: cfg.timing.clone(),
                wall_base_ms: 0,
                seed: cfg.seed.wrapping_mul(31).wrapping_add(i as u64),
                keyring: Keyring::new(sim_secret(1)),
                cert: None,
                cert_warn_fraction: 1.0 / 3.0,
            };
            index.insert(id.name.clone(), i);
            nodes.push(SimNode::new(id.clone(), addr, ecfg));
        }
        let mut sim = Sim {
            rng: StdRng::seed_from_u64(cfg.seed),
            cfg,
            now: Duration::ZERO,
            seq: 0,
            queue: BinaryHeap::new(),
            touched: Vec::new(),
            nodes,
            index,
            conns: BTreeMap::new(),
            conn_keys: BTreeMap::new(),
            cuts: BTreeSet::new(),
            one_way: BTreeSet::new(),
            contract,
            next_token: 1,
            lost_datagrams: 0,
            steps: 0,
            frame_kinds: BTreeMap::new(),
            record_lens: HashMap::new(),
            record_lens_sweep: 1 << 16,
        };
        for i in 0..sim.nodes.len() {
            sim.start(i);
        }
        sim
    }

    /// The two-site cluster of the golden path: `us-east` and `eu-west`, `gateways` gateways
    /// and 2 members each.
    pub fn two_sites(seed: u64, gateways: usize) -> Sim {
        Sim::new(
            SimConfig::new(seed),
            &[
                SiteSpec {
                    name: "us-east".into(),
                    gateways,
                    members: 2,
                },
                SiteSpec {
                    name: "eu-west".into(),
                    gateways,
                    members: 2,
                },
            ],
        )
    }

    /// Current virtual time.
    pub fn now(&self) -> Time {
        self.now
    }

    /// The seed of this run.
    pub fn seed(&self) -> u64 {
        self.cfg.seed
    }

    /// Index of a node by name.
    pub fn idx(&self, name: &str) -> usize {
        *self
            .index
            .get(name)
            .unwrap_or_else(|| panic!("no node {name} (seed {})", self.cfg.seed))
    }

    /// What the event queue holds: events, frames, records carried in frames, `(name, clock)`
    /// entries carried in digests, and datagram bytes (for finding what a large run's memory
    /// is made of).
    pub fn queue_stats(&self) -> QueueStats {
        let mut q = QueueStats {
            events: self.queue.len(),
            ..QueueStats::default()
        };
        for Reverse(e) in self.queue.iter() {
            match &e.ev {
                Ev::Frame { payload, .. } => {
                    q.frames += 1;
                    match payload {
                        Payload::Bytes(b) => q.frame_bytes += b.len(),
                        Payload::Shared(f) => match &**f {
                            Frame::Records(rs) => q.records += rs.len(),
                            Frame::Digest(d, _) | Frame::SiteDigest(_, d, _) => {
                                q.digest_entries += d.len()
                            }
                            _ => {}
                        },
                    }
                }
                Ev::Datagram { bytes, .. } => q.datagram_bytes += bytes.len(),
                _ => {}
            }
        }
        q
    }

    /// A node's engine (panics if crashed).
    pub fn engine(&self, name: &str) -> &Engine {
        self.nodes[self.idx(name)]
            .engine
            .as_ref()
            .unwrap_or_else(|| panic!("{name} is not running (seed {})", self.cfg.seed))
    }

    fn start(&mut self, i: usize) {
        let restored: Vec<NodeRecord> = self.nodes[i]
            .persisted
            .values()
            .map(|r| NodeRecord::clone(r))
            .collect();
        if !self.cfg.copy_persisted {
            // The next crash takes the running table again.
            self.nodes[i].persisted.clear();
        }
        self.nodes[i].persisted_gen = 0;
        self.nodes[i].checked_links_gen = None;
        let cfg = self.nodes[i].cfg.clone();
        match Engine::new(cfg, restored, self.now) {
            Ok(e) => {
                self.nodes[i].engine = Some(e);
                self.nodes[i].wake = None;
                self.pump(i);
            }
            Err(e) => panic!(
                "node {} failed to start: {e} (seed {})",
                self.nodes[i].ident.name, self.cfg.seed
            ),
        }
    }

    fn schedule(&mut self, at: Time, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Queued {
            at,
            seq: self.seq,
            ev,
        }));
    }

    fn latency(&self, a: usize, b: usize) -> Duration {
        if self.nodes[a].ident.site == self.nodes[b].ident.site {
            self.cfg.site_latency
        } else {
            self.cfg.wan_latency
        }
    }

    /// Whether packets from `a` reach `b` right now (one direction).
    pub fn direction_open(&self, a: usize, b: usize) -> bool {
        let (sa, sb) = (&self.nodes[a].ident.site, &self.nodes[b].ident.site);
        self.path_both(a, b) && !self.one_way.contains(&(sa.clone(), sb.clone()))
    }

    /// Whether packets can flow both ways between `a` and `b` right now (what a connection needs).
    pub fn path_open(&self, a: usize, b: usize) -> bool {
        self.direction_open(a, b) && self.direction_open(b, a)
    }

    fn path_both(&self, a: usize, b: usize) -> bool {
        let (na, nb) = (&self.nodes[a], &self.nodes[b]);
        if na.engine.is_none() || nb.engine.is_none() || na.isolated || nb.isolated {
            return false;
        }
        let (sa, sb) = (&na.ident.site, &nb.ident.site);
        if sa == sb {
            return true;
        }
        let key = if sa < sb {
            (sa.clone(), sb.clone())
        } else {
            (sb.clone(), sa.clone())
        };
        !self.cuts.contains(&key)
    }

    /// Drains a node's outputs into the event queue.
    fn pump(&mut self, i: usize) {
        self.touched.push(i);
        while let Some(out) = self.nodes[i].engine.as_mut().and_then(Engine::poll_output) {
            self.apply(i, out);
        }
        if let Some((t, clock)) = self.nodes[i]
            .engine
            .as_ref()
            .map(|e| (e.poll_timeout().max(self.now), e.clock()))
        {
            if self.nodes[i].wake.is_none_or(|w| t < w || w < self.now) {
                self.nodes[i].wake = Some(t);
                self.schedule(t, Ev::Wake(i));
            }
            let node = &mut self.nodes[i];
            assert!(
                clock >= node.max_clock,
                "{}: own clock fell from {} to {clock} (seed {})",
                node.ident.name,
                node.max_clock,
                self.cfg.seed
            );
            node.max_clock = clock;
        }
    }

    fn apply(&mut self, i: usize, out: Output) {
        let now = self.now;
        match out {
            Output::Dial { peer, .. } => {
                let Some(&j) = self.index.get(&peer) else {
                    let reason = "no such host".to_string();
                    self.schedule(
                        now + self.cfg.connect_timeout,
                        Ev::DialFailed {
                            dialer: i,
                            peer,
                            reason,
                        },
                    );
                    return;
                };
                if self.conns.contains_key(&pair(i, j)) {
                    // Already connected (the other end dialed first): the runtime would keep one
                    // connection; report it up to this end too.
                    self.schedule(now, Ev::LinkUp { at: i, peer: j });
                    return;
                }
                if self.path_open(i, j) {
                    let lat = self.latency(i, j);
                    self.schedule(
                        now + lat * 2,
                        Ev::Handshake {
                            dialer: i,
                            acceptor: j,
                        },
                    );
                } else {
                    if self.direction_open(i, j) && self.nodes[j].engine.is_some() {
                        // Our packets reach the acceptor, its answers do not come back: it sees
                        // a handshake that stalls.
                        let addr = self.nodes[i].addr.clone();
                        self.schedule(
                            now + self.cfg.connect_timeout,
                            Ev::InboundStalled { at: j, addr },
                        );
                    }
                    let reason = "timed out".to_string();
                    self.schedule(
                        now + self.cfg.connect_timeout,
                        Ev::DialFailed {
                            dialer: i,
                            peer,
                            reason,
                        },
                    );
                }
            }
            Output::Send { to, frame } => {
                let Some(&j) = self.index.get(&to) else {
                    return;
                };
                if self.conns.contains_key(&pair(i, j)) && self.path_open(i, j) {
                    let lat = self.latency(i, j);
                    let kind = frame_kind(&frame);
                    let (len, payload) = if self.cfg.share_frames {
                        (self.frame_len(&frame), Payload::Shared(Box::new(frame)))
                    } else {
                        let bytes = frame.encode();
                        (bytes.len(), Payload::Bytes(bytes))
                    };
                    self.nodes[i].frames_sent += 1;
                    self.nodes[i].frame_bytes_sent += len as u64;
                    let k = self.frame_kinds.entry(kind).or_default();
                    k.0 += 1;
                    k.1 += len as u64;
                    self.schedule(
                        now + lat,
                        Ev::Frame {
                            to: j,
                            from: i,
                            payload,
                        },
                    );
                }
            }
            Output::Datagram { to, bytes } => {
                let Some(&j) = self.index.get(&to) else {
                    return;
                };
                if self.cfg.datagram_loss > 0
                    && self.rng.random_range(0..100u8) < self.cfg.datagram_loss
                {
                    self.lost_datagrams += 1;
                    return;
                }
                if self.conns.contains_key(&pair(i, j)) && self.path_open(i, j) {
                    let lat = self.latency(i, j);
                    self.nodes[i].datagrams_sent += 1;
                    self.nodes[i].datagram_bytes_sent += bytes.len() as u64;
                    self.schedule(
                        now + lat,
                        Ev::Datagram {
                            to: j,
                            from: i,
                            bytes,
                        },
                    );
                }
            }
            Output::Close { peer, reason } => {
                let Some(&j) = self.index.get(&peer) else {
                    return;
                };
                if self.conns.remove(&pair(i, j)).is_some() {
                    self.schedule(
                        now,
                        Ev::Close {
                            at: i,
                            peer: j,
                            reason: reason.clone(),
                            gen: None,
                        },
                    );
                    let lat = self.latency(i, j);
                    self.schedule(
                        now + lat,
                        Ev::Close {
                            at: j,
                            peer: i,
                            reason,
                            gen: None,
                        },
                    );
                }
            }
            Output::Persist => {
                // The whole table as it stands, as if written now; only records stored since
                // the last write are copied.
                let node = &mut self.nodes[i];
                if let Some(e) = node.engine.as_ref() {
                    let gen = e.table().generation();
                    if !self.cfg.copy_persisted {
                        node.persisted_gen = gen;
                    } else if gen != node.persisted_gen {
                        for r in e.table().changed_since(node.persisted_gen) {
                            node.persisted.insert(r.name.clone(), r.clone());
                        }
                        node.persisted_gen = gen;
                    }
                }
            }
            Output::Event(ev) => {
                if self.cfg.record_events {
                    self.nodes[i].events.push(ev);
                }
            }
            Output::Reply { token, reply } => {
                self.nodes[i].replies.insert(token, reply);
            }
            // The simulator has no data path: a load asked of a simulated node fails, saying so.
            Output::RunLoad { handle, .. } => {
                if let Some(e) = self.nodes[i].engine.as_mut() {
                    e.load_done(now, handle, Err("the simulator has no data path".into()));
                }
            }
            Output::Fatal(reason) => {
                let name = self.nodes[i].ident.name.clone();
                self.nodes[i].events.push(EventOut {
                    kind: clusterctl_api::EventKind::Warning,
                    node: Some(name),
                    peer: None,
                    reason: format!("fatal: {reason}"),
                    at_ms: now.as_millis() as u64,
                });
                self.crash_idx(i);
            }
        }
    }

    /// [`Frame::encoded_len`], measuring each shared record once.
    fn frame_len(&mut self, frame: &Frame) -> usize {
        let Frame::Records(rs) = frame else {
            return frame.encoded_len();
        };
        let mut total = 0;
        for r in rs {
            let key = Arc::as_ptr(r) as usize;
            let len = match self.record_lens.get(&key) {
                Some((w, len)) if w.strong_count() > 0 => *len,
                _ => {
                    let len = record_encoded_len(r);
                    self.record_lens.insert(key, (Arc::downgrade(r), len));
                    len
                }
            };
            total += len;
        }
        if self.record_lens.len() > self.record_lens_sweep {
            self.record_lens.retain(|_, (w, _)| w.strong_count() > 0);
            self.record_lens_sweep = (self.record_lens.len() * 2).max(1 << 16);
        }
        Frame::records_encoded_len(rs.len(), total)
    }

    fn link_info(&self, at: usize, peer: usize, rtt: Duration) -> LinkInfo {
        LinkInfo {
            key: self.conn_keys.get(&pair(at, peer)).copied(),
            peer: self.nodes[peer].ident.clone(),
            contract_hash: self.nodes[peer].cfg.contract.hash().to_string(),
            secure: true,
            protocol: "tls1.3".into(),
            rtt_us: rtt.as_micros() as u32,
        }
    }

    fn step_event(&mut self, ev: Ev) {
        let now = self.now;
        match ev {
            Ev::Wake(i) => {
                if self.nodes[i].wake.is_some_and(|w| w <= now) {
                    self.nodes[i].wake = None;
                    if let Some(e) = self.nodes[i].engine.as_mut() {
                        e.handle_timeout(now);
                    }
                    self.pump(i);
                }
            }
            Ev::Frame { to, from, payload } => {
                if self.conns.contains_key(&pair(to, from)) {
                    let name = self.nodes[from].ident.name.clone();
                    if let Some(e) = self.nodes[to].engine.as_mut() {
                        match payload {
                            Payload::Bytes(bytes) => e.handle_frame_bytes(now, &name, &bytes),
                            Payload::Shared(frame) => e.handle_frame(now, &name, *frame),
                        }
                    }
                    self.pump(to);
                }
            }
            Ev::Datagram { to, from, bytes } => {
                if self.conns.contains_key(&pair(to, from)) {
                    let name = self.nodes[from].ident.name.clone();
                    if let Some(e) = self.nodes[to].engine.as_mut() {
                        e.handle_datagram(now, &name, &bytes);
                    }
                    self.pump(to);
                }
            }
            Ev::Handshake { dialer, acceptor } => self.handshake(dialer, acceptor),
            Ev::InboundStalled { at, addr } => {
                if let Some(e) = self.nodes[at].engine.as_mut() {
                    e.handle_inbound_stalled(now, &addr);
                }
                self.pump(at);
            }
            Ev::DialFailed {
                dialer,
                peer,
                reason,
            } => {
                if let Some(e) = self.nodes[dialer].engine.as_mut() {
                    e.handle_dial_failed(now, &peer, &reason, false);
                }
                self.pump(dialer);
            }
            Ev::Refused {
                at,
                peer,
                code,
                reason,
                by_us,
            } => {
                if let Some(e) = self.nodes[at].engine.as_mut() {
                    e.handle_refused(now, Some(peer), code, &reason, by_us);
                }
                self.pump(at);
            }
            Ev::LinkUp { at, peer } => {
                if self.conns.contains_key(&pair(at, peer)) {
                    let rtt = self.latency(at, peer) * 2;
                    let info = self.link_info(at, peer, rtt);
                    if let Some(e) = self.nodes[at].engine.as_mut() {
                        if !e.is_linked(&info.peer.name) {
                            e.handle_link_up(now, info);
                        }
                    }
                    self.pump(at);
                }
            }
            Ev::IdleCheck { a, b } => {
                if self.conns.contains_key(&pair(a, b)) && !self.path_open(a, b) {
                    self.conns.remove(&pair(a, b));
                    for (x, y) in [(a, b), (b, a)] {
                        let peer = self.nodes[y].ident.name.clone();
                        if let Some(e) = self.nodes[x].engine.as_mut() {
                            e.handle_link_down(now, &peer, "idle timeout");
                        }
                        self.pump(x);
                    }
                }
            }
            Ev::Close {
                at,
                peer,
                reason,
                gen,
            } => {
                if gen.is_some_and(|g| self.conns.get(&pair(at, peer)).is_some_and(|cur| *cur != g))
                {
                    return;
                }
                let name = self.nodes[peer].ident.name.clone();
                if let Some(e) = self.nodes[at].engine.as_mut() {
                    e.handle_link_down(now, &name, &format!("closed: {reason}"));
                }
                self.pump(at);
            }
        }
    }

    fn handshake(&mut self, i: usize, j: usize) {
        let now = self.now;
        if !self.path_open(i, j) {
            let peer = self.nodes[j].ident.name.clone();
            self.schedule(
                now + self.cfg.connect_timeout,
                Ev::DialFailed {
                    dialer: i,
                    peer,
                    reason: "timed out".into(),
                },
            );
            return;
        }
        if self.conns.contains_key(&pair(i, j)) {
            self.schedule(now, Ev::LinkUp { at: i, peer: j });
            return;
        }
        let (Some(ei), Some(ej)) = (self.nodes[i].engine.as_ref(), self.nodes[j].engine.as_ref())
        else {
            return;
        };
        // Stands in for the TLS exporter: unique per connection attempt.
        let binding = format!("sim-session-{i}-{j}-{}", self.seq).into_bytes();
        let hello = ei.hello_maker().make(&binding);
        let cluster = self.nodes[i].cfg.cluster.clone();
        // In the simulation every node holds an honest certificate for its own identity.
        let cert_i = self.nodes[i].ident.clone();
        let cert_j = self.nodes[j].ident.clone();
        let name_i = cert_i.name.clone();
        let name_j = cert_j.name.clone();
        match ej.check_hello(&hello, Some((&cluster, &cert_i)), &binding) {
            Err(refusal) => {
                let reason = refusal.to_string();
                let code = Some(refusal.code);
                self.schedule(
                    now,
                    Ev::Refused {
                        at: j,
                        peer: name_i,
                        code,
                        reason: reason.clone(),
                        by_us: true,
                    },
                );
                let lat = self.latency(i, j);
                self.schedule(
                    now + lat,
                    Ev::Refused {
                        at: i,
                        peer: name_j,
                        code,
                        reason,
                        by_us: false,
                    },
                );
            }
            Ok(ack) => {
                let res = self.nodes[i]
                    .engine
                    .as_mut()
                    .map(|e| e.check_ack(now, &name_j, &ack, Some((&cluster, &cert_j)), &binding));
                self.pump(i);
                match res {
                    Some(Ok(key)) => {
                        self.conns.insert(pair(i, j), self.seq);
                        self.conn_keys.insert(pair(i, j), key);
                        self.schedule(now, Ev::LinkUp { at: i, peer: j });
                        let lat = self.latency(i, j);
                        self.schedule(now + lat, Ev::LinkUp { at: j, peer: i });
                    }
                    Some(Err(refusal)) => {
                        let code = Some(refusal.code);
                        self.schedule(
                            now,
                            Ev::Refused {
                                at: i,
                                peer: name_j,
                                code,
                                reason: refusal.to_string(),
                                by_us: true,
                            },
                        );
                    }
                    None => {}
                }
            }
        }
    }

    /// Runs one event. Returns false when nothing is queued.
    pub fn step(&mut self) -> bool {
        let Some(Reverse(Queued { at, ev, .. })) = self.queue.pop() else {
            return false;
        };
        self.now = self.now.max(at);
        if let Some(resume) = self.paused_until_for(&ev) {
            // The node is stopped: the event waits until it resumes (events keep their order,
            // since they are popped in order and pushed back in that order).
            self.schedule(resume, ev);
            return true;
        }
        self.step_event(ev);
        self.steps += 1;
        self.check_invariants();
        true
    }

    /// When the node an event is handled by resumes, if it is paused now.
    fn paused_until_for(&self, ev: &Ev) -> Option<Time> {
        let paused = |i: usize| self.nodes[i].paused_until.filter(|t| *t > self.now);
        match ev {
            Ev::Wake(i) => paused(*i),
            Ev::Frame { to, .. } | Ev::Datagram { to, .. } => paused(*to),
            Ev::Handshake { dialer, acceptor } => paused(*dialer).max(paused(*acceptor)),
            Ev::InboundStalled { at, .. }
            | Ev::Refused { at, .. }
            | Ev::LinkUp { at, .. }
            | Ev::Close { at, .. } => paused(*at),
            Ev::DialFailed { dialer, .. } => paused(*dialer),
            Ev::IdleCheck { .. } => None,
        }
    }

    /// Runs the simulation for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while let Some(Reverse(q)) = self.queue.peek() {
            if q.at > end {
                break;
            }
            self.step();
        }
        self.now = end;
    }

    /// Runs until `pred` holds (checked every 100 ms of virtual time) or `max` passes.
    /// Returns the virtual time it took, or None.
    pub fn run_until(
        &mut self,
        max: Duration,
        mut pred: impl FnMut(&Sim) -> bool,
    ) -> Option<Duration> {
        let start = self.now;
        while self.now - start <= max {
            if pred(self) {
                return Some(self.now - start);
            }
            self.run_for(Duration::from_millis(100));
        }
        pred(self).then(|| self.now - start)
    }

    /// Checks the invariants of every node handled since the last check (a node's links change
    /// only while it is handled).
    fn check_invariants(&mut self) {
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_unstable();
        touched.dedup();
        for &i in &touched {
            let n = &self.nodes[i];
            let Some(e) = n.engine.as_ref() else { continue };
            // The links are the same as at the last check.
            if n.checked_links_gen == Some(e.links_generation()) {
                continue;
            }
            for p in e.linked_peers() {
                let peer = &self.nodes[self.idx(p.as_str())].ident;
                if let Err(why) = self.contract.check_link(&n.ident, peer) {
                    panic!(
                        "invariant broken: {} has a link to {} that the contract forbids: {why} (seed {})",
                        n.ident.name, peer.name, self.cfg.seed
                    );
                }
            }
        }
        if self.cfg.check_caches {
            for &i in &touched {
                if let Some(Err(why)) = self.nodes[i].engine.as_ref().map(Engine::check_caches) {
                    panic!("invariant broken: {why} (seed {})", self.cfg.seed);
                }
            }
        }
        for &i in &touched {
            let gen = self.nodes[i].engine.as_ref().map(Engine::links_generation);
            self.nodes[i].checked_links_gen = gen;
        }
        touched.clear();
        self.touched = touched;
    }

    // ----- faults -----------------------------------------------------------------------------

    fn schedule_idle_checks(&mut self) {
        let conns: Vec<(usize, usize)> = self.conns.keys().copied().collect();
        let at = self.now + self.cfg.idle_timeout;
        for (a, b) in conns {
            if !self.path_open(a, b) {
                self.schedule(at, Ev::IdleCheck { a, b });
            }
        }
    }

    /// Cuts the WAN between two sites (both directions).
    pub fn cut_wan(&mut self, a: &str, b: &str) {
        let (a, b) = (
            SiteName::new(a).expect("site"),
            SiteName::new(b).expect("site"),
        );
        self.cuts.insert(if a < b { (a, b) } else { (b, a) });
        self.schedule_idle_checks();
    }

    /// Drops the packets from site `from` to site `to` only.
    pub fn cut_one_way(&mut self, from: &str, to: &str) {
        self.one_way.insert((
            SiteName::new(from).expect("site"),
            SiteName::new(to).expect("site"),
        ));
        self.schedule_idle_checks();
    }

    /// Removes every WAN cut and isolation.
    pub fn heal(&mut self) {
        self.cuts.clear();
        self.one_way.clear();
        for n in &mut self.nodes {
            n.isolated = false;
        }
    }

    /// Cuts a node off from everyone.
    pub fn isolate(&mut self, name: &str) {
        let i = self.idx(name);
        self.nodes[i].isolated = true;
        self.schedule_idle_checks();
    }

    /// Stops a node for `d` (like SIGSTOP, then SIGCONT): its connections stay open, and what
    /// reaches it and its own timers wait until it resumes, then run late, in order.
    pub fn pause(&mut self, name: &str, d: Duration) {
        let i = self.idx(name);
        self.nodes[i].paused_until = Some(self.now + d);
    }

    /// Stops a node abruptly (like `kill -9`): it keeps only what it persisted.
    pub fn crash(&mut self, name: &str) {
        let i = self.idx(name);
        self.crash_idx(i);
    }

    fn crash_idx(&mut self, i: usize) {
        let engine = self.nodes[i].engine.take();
        if let (false, Some(e)) = (self.cfg.copy_persisted, engine) {
            let node = &mut self.nodes[i];
            assert_eq!(
                e.table().generation(),
                node.persisted_gen,
                "{}: the table changed after its last persist (seed {})",
                node.ident.name,
                self.cfg.seed
            );
            node.persisted = e
                .table()
                .changed_since(0)
                .into_iter()
                .map(|r| (r.name.clone(), r.clone()))
                .collect();
        }
        self.nodes[i].wake = None;
        self.nodes[i].paused_until = None;
        // The crashed process's connections are gone; its peers notice at their idle timeout
        // (unless a new connection from its next life replaced them first).
        let mine: Vec<((usize, usize), u64)> = self
            .conns
            .iter()
            .filter(|((a, b), _)| *a == i || *b == i)
            .map(|(k, g)| (*k, *g))
            .collect();
        let at = self.now + self.cfg.idle_timeout;
        for ((a, b), gen) in mine {
            self.conns.remove(&(a, b));
            let peer = if a == i { b } else { a };
            self.schedule(
                at,
                Ev::Close {
                    at: peer,
                    peer: i,
                    reason: "idle timeout".into(),
                    gen: Some(gen),
                },
            );
        }
        // A fresh life starts from the persisted clock, which the invariant tracks.
        self.nodes[i].max_clock = 0;
        self.schedule_idle_checks();
    }

    /// Adds a member to an existing site at run time and starts it; it knows the nodes of its
    /// site as seeds (as an operator would configure it). Returns its name.
    pub fn add_member(&mut self, site: &str) -> String {
        let site = SiteName::new(site).expect("valid site name");
        let template = self
            .nodes
            .iter()
            .find(|n| n.ident.site == site)
            .unwrap_or_else(|| panic!("no site {site} (seed {})", self.cfg.seed));
        let code = short_code(site.as_str()).to_string();
        let mut k = 1 + self
            .nodes
            .iter()
            .filter(|n| n.ident.site == site && n.ident.role == Role::Member)
            .count();
        while self.index.contains_key(format!("edge-{code}-{k}").as_str()) {
            k += 1;
        }
        let name = NodeName::new(format!("edge-{code}-{k}")).expect("valid name");
        let ident = Ident {
            name: name.clone(),
            site: site.clone(),
            role: Role::Member,
        };
        let i = self.nodes.len();
        let mut ecfg = template.cfg.clone();
        ecfg.me = ident.clone();
        ecfg.addr = format!("sim:{name}");
        ecfg.seeds = self
            .nodes
            .iter()
            .filter(|n| n.ident.site == site)
            .map(|n| (n.ident.name.clone(), n.addr.clone()))
            .collect();
        ecfg.seed = self.cfg.seed.wrapping_mul(31).wrapping_add(i as u64);
        self.index.insert(name.clone(), i);
        let addr = ecfg.addr.clone();
        self.nodes.push(SimNode::new(ident, addr, ecfg));
        self.start(i);
        name.to_string()
    }

    /// Restarts a crashed node from its persisted table.
    pub fn restart(&mut self, name: &str) {
        let i = self.idx(name);
        assert!(self.nodes[i].engine.is_none(), "{name} is running");
        self.start(i);
    }

    /// Restarts a crashed node with an empty data directory (a re-deploy).
    pub fn redeploy(&mut self, name: &str) {
        let i = self.idx(name);
        assert!(self.nodes[i].engine.is_none(), "{name} is running");
        self.nodes[i].persisted.clear();
        self.nodes[i].persisted_gen = 0;
        self.start(i);
    }

    /// Makes a node leave gracefully (as on SIGTERM): it announces `left`, then its process
    /// ends `linger` later.
    pub fn leave(&mut self, name: &str, linger: Duration) {
        let i = self.idx(name);
        let now = self.now;
        if let Some(e) = self.nodes[i].engine.as_mut() {
            e.leave(now);
        }
        self.pump(i);
        self.run_for(linger);
        self.crash_idx(i);
    }

    /// Restarts a crashed node from its persisted table with only `keyring` (an operator
    /// restarting it with another secret file).
    pub fn restart_with_keyring(&mut self, name: &str, keyring: Keyring) {
        let i = self.idx(name);
        self.nodes[i].cfg.keyring = keyring;
        self.restart(name);
    }

    /// Runs a keyring operation on a running node (`clusterctl secret install|use|remove`); the
    /// change survives restarts, as the agent persists it.
    pub fn keyring_op(
        &mut self,
        name: &str,
        op: impl FnOnce(&mut Engine, Time) -> Result<(), String>,
    ) -> Result<(), String> {
        let i = self.idx(name);
        let now = self.now;
        let e = self.nodes[i].engine.as_mut().ok_or("node is down")?;
        op(e, now)?;
        self.nodes[i].cfg.keyring = e.keyring().clone();
        self.pump(i);
        Ok(())
    }

    /// Asks `observer` to forget `name` (with `force`, even while it is alive).
    pub fn forget(&mut self, observer: &str, name: &str, force: bool) -> Result<u64, String> {
        let i = self.idx(observer);
        let now = self.now;
        let target = NodeName::new(name).map_err(|e| e.to_string())?;
        let r = self.nodes[i]
            .engine
            .as_mut()
            .ok_or("observer is down")?
            .forget(now, &target, force);
        self.pump(i);
        r
    }

    // ----- queries ----------------------------------------------------------------------------

    /// Status of `node` as `observer` sees it.
    pub fn status(&self, observer: &str, node: &str) -> NodeStatus {
        self.engine(observer)
            .status_of(&NodeName::new(node).expect("name"))
    }

    /// Topology as `observer` sees it.
    pub fn topology(&self, observer: &str) -> Topology {
        self.engine(observer).topology(self.now)
    }

    /// Names of all nodes.
    pub fn names(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| n.ident.name.to_string())
            .collect()
    }

    /// Names of the nodes of one site.
    pub fn site_nodes(&self, site: &str) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.ident.site.as_str() == site)
            .map(|n| n.ident.name.to_string())
            .collect()
    }

    /// Whether every running node sees every expected link up and every running node alive.
    pub fn converged(&self) -> bool {
        let running: Vec<&SimNode> = self.nodes.iter().filter(|n| n.is_up()).collect();
        running.iter().all(|n| {
            let e = n.engine.as_ref().expect("running");
            let t = e.topology(self.now);
            t.healthy
                && running
                    .iter()
                    .all(|m| e.status_of(&m.ident.name) == NodeStatus::Alive)
        })
    }

    /// Pings `to` from `from` and runs the simulation until the report arrives (or `max`).
    pub fn ping(&mut self, from: &str, to: &str, max: Duration) -> Option<PingReport> {
        let i = self.idx(from);
        let token = self.next_token;
        self.next_token += 1;
        let now = self.now;
        let target = NodeName::new(to).expect("name");
        self.nodes[i].engine.as_mut()?.start_ping(
            now,
            token,
            None,
            target,
            1,
            Duration::from_secs(2),
        );
        self.pump(i);
        let start = self.now;
        while self.now - start <= max {
            if let Some(Reply::Ping(r)) = self.nodes[i].replies.remove(&token) {
                return Some(r);
            }
            if !self.step() {
                break;
            }
        }
        None
    }

    /// Runs `f` on a running node's engine at the current virtual time, then delivers what it
    /// produced.
    pub fn with_engine<R>(&mut self, name: &str, f: impl FnOnce(&mut Engine, Time) -> R) -> R {
        let i = self.idx(name);
        let now = self.now;
        let seed = self.cfg.seed;
        let e = self.nodes[i]
            .engine
            .as_mut()
            .unwrap_or_else(|| panic!("{name} is not running (seed {seed})"));
        let r = f(e, now);
        self.pump(i);
        r
    }

    /// Reads the `sink` counters of `target` from `from` and runs the simulation until the
    /// answer arrives (or `max`).
    pub fn sink_read(
        &mut self,
        from: &str,
        target: &str,
        max: Duration,
    ) -> Option<Result<clusterctl_api::SinkReport, String>> {
        let i = self.idx(from);
        let token = self.next_token;
        self.next_token += 1;
        let target = NodeName::new(target).expect("name");
        self.with_engine(from, |e, now| {
            e.start_sink_read(now, token, target, false, Duration::from_secs(5))
        });
        let start = self.now;
        while self.now - start <= max {
            if let Some(Reply::Sink(r)) = self.nodes[i].replies.remove(&token) {
                return Some(r);
            }
            if !self.step() {
                break;
            }
        }
        None
    }
}
