//! One node of the cluster, as a state machine.
//!
//! The engine decides everything that is protocol: which links a node wants, whether a
//! handshake is accepted, how the node table is synchronised, how a message is routed, what the
//! failure detectors conclude and how the topology is reported. It never performs I/O:
//!
//! - inputs: `handle_*` methods, each taking `now` ([`Time`]);
//! - outputs: [`Engine::poll_output`] until it returns `None`, then sleep until
//!   [`Engine::poll_timeout`] (or the next input) and call [`Engine::handle_timeout`].
//!
//! The runtime (`clusterctl-node`) maps outputs to QUIC connections, streams and datagrams; the
//! simulator (`clusterctl-sim`) maps them to a seeded virtual network. Both run this same code.
//!
//! ## Invariants
//! - a member never asks to dial a node of another site; a gateway dials other sites' gateways
//!   only along contract links;
//! - our own record's clock only rises. At start the raised clock is on disk before the node
//!   talks to anyone; later changes are persisted on [`Output::Persist`] (the runtime writes
//!   asynchronously, coalescing bursts). A crash can lose the last few bumps: the restarted node
//!   then learns its higher clock back from its peers (the ack's `last_clock_for_you`, or its
//!   own newer record arriving in a sync) and comes back above it;
//! - every map a peer can grow is bounded (`MAX_*` constants).

use crate::contract::Contract;
use crate::health::{LocalHealth, DEFAULT_MAX_SCORE};
use crate::name::{ClusterName, Ident, NodeName, SiteName};
use crate::routing;
use crate::secret::{KeyId, Keyring, ProofRole, Secret, SecretError};
use crate::swim::{RingTiming, Swim, SwimId};
use crate::table::{
    CertSummary, LinkReport, Liveness, Merge, NodeRecord, NodeTable, RecordState, Summary,
};
use crate::verdict;
use crate::wire::{
    decode_swim, encode_swim, Body, Call, CallReply, Envelope, Frame, Hello, HelloAck, Hop,
    LoadSpec, Refusal, RefusalCode, Ring, HOP_LIMIT, MAX_RECORDS_PER_FRAME,
};
use crate::Time;
use clusterctl_api::{
    EventKind, LinkKind, LinkState, LinkView, LoadReport, MemberView, Members, NodeStatus,
    NodeView, PingAttempt, PingFailure, PingReport, ProbeResult, Role, SinkCount, SinkReport,
    SiteView, Topology,
};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// Most outstanding echo probes.
pub const MAX_PENDING_ECHOES: usize = 4096;
/// Most outstanding calls (remote pings and link probes).
pub const MAX_PENDING_CALLS: usize = 1024;
/// Most ping sessions run at once.
pub const MAX_PING_SESSIONS: usize = 256;
/// Most pings one request may ask for.
pub const MAX_PING_COUNT: u32 = 1000;
/// Most remembered refusals.
pub const MAX_REFUSALS: usize = 1024;
/// Most queued outputs before new sends are dropped (counted).
pub const MAX_OUTBOX: usize = 1 << 20;
/// Most senders the `sink` process counts separately (later ones are counted together).
pub const MAX_SINK_SENDERS: usize = 1024;
/// Name of the built-in process that counts the data messages it receives.
pub const SINK: &str = "sink";
/// How long after our site ring saw a node come back from the dead a newer record of it still
/// counts as its return (its connections to the old instance are closed and it is dialed at
/// once). The record normally follows within a second.
pub const REVIVED_WINDOW: Duration = Duration::from_secs(5);

/// Timing of an engine. Presets: [`Timing::lan`].
#[derive(Debug, Clone)]
pub struct Timing {
    /// Housekeeping period: dials, status diffs, record refresh.
    pub tick: Duration,
    /// Anti-entropy: our table summary to a random peer this often while the table is moving.
    pub sync_every: Duration,
    /// Once our table summary has not changed for this long, and no peer has shown us a
    /// different one, the anti-entropy rounds go out this often instead (the first change or
    /// differing summary brings back `sync_every`). Pushes deliver every change; the rounds
    /// repair what a push missed, and a node that missed one is found by the nodes that did
    /// not, whose tables just moved. Longer: fewer summaries at idle (each a frame and an ack),
    /// a later repair of a table that diverged without any change in sight. Default 30 s.
    pub sync_idle: Duration,
    /// First redial delay; doubles up to `dial_backoff_max`.
    pub dial_backoff_min: Duration,
    pub dial_backoff_max: Duration,
    /// Our own record is rewritten at most this often just to refresh RTTs, and only for a
    /// link whose RTT estimate stayed away from the published one (see
    /// [`RTT_REPORT_MIN_CHANGE_US`]) for a whole window of this length: a lasting change is
    /// published within two windows, a spike never.
    pub rtt_refresh: Duration,
    /// New links that come up are published in our record only once no other link has come
    /// up for this long plus a random share of it, drawn per node (at the latest four times
    /// that after the first, or with the next other change): a cold start, where every link
    /// comes up within a second or two, then costs every node one or two versions of each
    /// record instead of one per tick, and the nodes' settled records go out spread over a
    /// second instead of all at once. Links going down, refusals and every other change are
    /// published at the next tick. Longer: fewer versions, a topology that lags more.
    /// Default 1 s (so 1-2 s).
    pub link_settle: Duration,
    pub site_ring: RingTiming,
    pub wan_ring: RingTiming,
    /// A failure-detector timer this late counts against local health.
    pub late_timer: Duration,
}

impl Timing {
    /// Defaults for sites on a LAN and a WAN between them.
    pub fn lan() -> Self {
        Timing {
            tick: Duration::from_millis(250),
            sync_every: Duration::from_secs(2),
            sync_idle: Duration::from_secs(30),
            dial_backoff_min: Duration::from_millis(250),
            dial_backoff_max: Duration::from_secs(5),
            rtt_refresh: Duration::from_secs(30),
            link_settle: Duration::from_secs(1),
            site_ring: RingTiming::lan(),
            wan_ring: RingTiming::wan(),
            late_timer: Duration::from_millis(250),
        }
    }
}

/// Smallest change of a link's RTT (besides a factor of 1.5) that makes a node publish its record
/// again at the next RTT refresh, if every estimate of the refresh window differs that much.
/// Record RTTs are for display (a node's own links show live ones); the jitter of a busy host
/// and of delayed acks (a loopback link reads 0.8-2.6 ms) would otherwise make every node
/// rewrite its record every refresh and send it to the whole cluster (on loopback that was ~45%
/// of idle traffic with no minimum change, and still most of a gateway's with a 1 ms minimum
/// checked against the latest estimate alone).
pub const RTT_REPORT_MIN_CHANGE_US: u32 = 1000;

/// Everything an engine is built from.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub cluster: ClusterName,
    pub me: Ident,
    /// Our advertised cluster address.
    pub addr: String,
    /// Gateways on two networks: the address other sites' gateways dial (`advertise-wan`).
    pub wan_addr: Option<String>,
    pub contract: Contract,
    /// False when running `insecure`.
    pub secure: bool,
    pub version: String,
    /// Nodes to introduce ourselves to: `(name, addr)`.
    pub seeds: Vec<(NodeName, String)>,
    /// Come back even over a tombstone (`agent --rejoin`).
    pub rejoin: bool,
    pub timing: Timing,
    /// Wall-clock milliseconds since the Unix epoch at `now == 0` (for reports only).
    pub wall_base_ms: u64,
    /// Seed of the engine's random choices.
    pub seed: u64,
    /// The cluster secrets this node holds.
    pub keyring: Keyring,
    /// The certificate this node presents (None when insecure).
    pub cert: Option<CertSummary>,
    /// Warn when a certificate has less than this fraction of its lifetime left (e.g. 1/3).
    pub cert_warn_fraction: f64,
}

/// Why an engine cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("this node was forgotten by an operator (tombstone at clock {0}); start it with `--rejoin` to bring it back")]
    Forgotten(u64),
    #[error("the contract does not allow this node: {0}")]
    Contract(String),
}

/// An event for the operator's stream.
#[derive(Debug, Clone, PartialEq)]
pub struct EventOut {
    pub kind: EventKind,
    pub node: Option<NodeName>,
    pub peer: Option<NodeName>,
    pub reason: String,
    /// Wall-clock milliseconds.
    pub at_ms: u64,
}

/// The answer to a local request.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Ping(PingReport),
    Probes(Vec<ProbeResult>),
    /// The counters of a node's `sink`, or why they could not be read.
    Sink(Result<SinkReport, String>),
    /// A load run on another node, or why it could not run.
    Load(Result<LoadReport, String>),
}

/// What the engine asks its driver to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Open a link to `peer` at `addr` (the TLS layer checks the certificate names `peer`).
    Dial {
        peer: NodeName,
        addr: String,
    },
    /// Send a frame on the link to `to` (reliable).
    Send {
        to: NodeName,
        frame: Frame,
    },
    /// Send a datagram on the link to `to` (unreliable).
    Datagram {
        to: NodeName,
        bytes: Vec<u8>,
    },
    /// Close the link to `peer`.
    Close {
        peer: NodeName,
        reason: String,
    },
    /// The table changed: write the snapshot ([`Engine::records`]).
    Persist,
    Event(EventOut),
    /// A local request finished.
    Reply {
        token: u64,
        reply: Reply,
    },
    /// This node must stop (it was forgotten by an operator).
    Fatal(String),
    /// Another node asked this one to send a load (`Call::Load`): run it on the data path and
    /// hand the result to [`Engine::load_done`] with `handle`.
    RunLoad {
        handle: u64,
        spec: LoadSpec,
    },
}

/// What the transport reports about an established link.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkInfo {
    pub peer: Ident,
    pub contract_hash: String,
    pub secure: bool,
    /// For example `tls1.3` or `insecure`.
    pub protocol: String,
    pub rtt_us: u32,
    /// The cluster secret both ends proved.
    pub key: Option<KeyId>,
}

/// Builds a dialer's hello once the TLS session (and so the binding of the secret proof) exists.
#[derive(Debug, Clone)]
pub struct HelloMaker {
    cluster: ClusterName,
    ident: Ident,
    contract_hash: String,
    clock: u64,
    addr: String,
    rejoin: bool,
    version: String,
    keyring: Keyring,
}

impl HelloMaker {
    /// The hello for the session identified by `binding` (the TLS exporter value).
    pub fn make(&self, binding: &[u8]) -> Hello {
        Hello {
            cluster: self.cluster.clone(),
            ident: self.ident.clone(),
            contract_hash: self.contract_hash.clone(),
            clock: self.clock,
            addr: self.addr.clone(),
            rejoin: self.rejoin,
            version: self.version.clone(),
            secret: self
                .keyring
                .prove_primary(ProofRole::Hello, &self.ident.name, binding),
        }
    }
}

#[derive(Debug, Clone)]
struct Link {
    ident: Ident,
    kind: LinkKind,
    up: bool,
    since: Time,
    rtt_us: u32,
    secure: bool,
    protocol: String,
    contract_hash: String,
    reason: Option<String>,
    /// RTT written into our record the last time it was refreshed.
    reported_rtt_us: u32,
    /// Lowest and highest RTT estimate since the current RTT window began (see
    /// [`Timing::rtt_refresh`]): a change is published only if it held for a whole window.
    rtt_low_us: u32,
    rtt_high_us: u32,
    key: Option<KeyId>,
}

impl Link {
    /// Starts a new RTT window from the current estimate.
    fn reset_rtt_window(&mut self) {
        self.rtt_low_us = self.rtt_us;
        self.rtt_high_us = self.rtt_us;
    }

    /// Whether every RTT estimate of the window differs from the reported one by more than
    /// half again and by more than [`RTT_REPORT_MIN_CHANGE_US`], all in the same direction: a
    /// lasting change, not the jitter of delayed acks and a busy host.
    fn rtt_moved(&self) -> bool {
        let moved = |a: u32, b: u32| {
            f64::from(a.max(1)) / f64::from(b.max(1)) > 1.5
                && a.abs_diff(b) > RTT_REPORT_MIN_CHANGE_US
        };
        self.up
            && (moved(self.rtt_low_us, self.reported_rtt_us)
                || moved(self.reported_rtt_us, self.rtt_high_us))
    }
}

/// How long a stalled inbound handshake or a timed-out dial counts as evidence.
pub const ONE_WAY_EVIDENCE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Default)]
struct Direction {
    inbound_stalled: Option<Time>,
    dial_failed: Option<Time>,
    one_way_since: Option<Time>,
}

/// How the runtime starts the reason of a link down or a dial failed because this node's own
/// kernel refused the send (`local send error: EPERM (timed out)`).
pub const LOCAL_SEND_ERROR: &str = "local send error";

/// How long a refused second instance of a node's name keeps reports unhealthy after its last
/// attempt (it retries every `dial_backoff_max`, 5 s by default).
pub const DUPLICATE_EVIDENCE: Duration = Duration::from_secs(30);

/// A second instance of a node's name refused at handshake ([`crate::instance`]).
#[derive(Debug, Clone)]
struct Duplicate {
    reason: String,
    last: Time,
}

#[derive(Debug, Clone)]
struct Refused {
    reason: String,
    since: Time,
    /// The latest refusal with this reason.
    last: Time,
}

#[derive(Debug, Clone)]
struct Dialing {
    next: Time,
    backoff: Duration,
    in_flight: bool,
}

/// Where an echo answer goes.
#[derive(Debug, Clone)]
enum EchoOwner {
    Ping {
        session: u64,
    },
    /// Traceroute-style echo to an intermediate hop of a ping's path.
    Segment {
        session: u64,
        index: usize,
    },
    Probe {
        call: CallFrom,
        peer: NodeName,
    },
}

#[derive(Debug, Clone)]
struct PendingEcho {
    seq: u32,
    target: NodeName,
    sent: Time,
    deadline: Time,
    owner: EchoOwner,
}

/// Who asked for a piece of work: a local request (token) or a remote node (call id).
#[derive(Debug, Clone, PartialEq)]
enum CallFrom {
    Local {
        token: u64,
    },
    Remote {
        node: NodeName,
        id: u64,
    },
    /// Part of a local `probe_links` request.
    ProbeSet {
        set: u64,
    },
}

#[derive(Debug, Clone)]
struct PingSession {
    from: CallFrom,
    target: NodeName,
    count: u32,
    timeout: Duration,
    attempts: Vec<PingAttempt>,
    next_seq: u32,
    /// The attempt whose intermediate hops are being measured.
    measuring: Option<Measuring>,
}

/// A successful probe waiting for its per-hop measurements: `cum[i]` is the round trip from
/// the origin to node `i` of the path.
#[derive(Debug, Clone)]
struct Measuring {
    attempt: PingAttempt,
    cum: Vec<Option<f64>>,
    waiting: usize,
}

#[derive(Debug, Clone)]
struct PendingCall {
    from: CallFrom,
    deadline: Time,
    /// For timeouts: what to report.
    what: PendingWhat,
}

#[derive(Debug, Clone)]
enum PendingWhat {
    Ping {
        from: NodeName,
        target: NodeName,
    },
    Probe {
        from: NodeName,
        to: NodeName,
        kind: LinkKind,
    },
    Sink {
        target: NodeName,
    },
    Load {
        from: NodeName,
    },
}

#[derive(Debug, Clone)]
struct ProbeSet {
    token: u64,
    expected: usize,
    results: Vec<ProbeResult>,
}

/// Counters an operator may want (exported as metrics by the runtime).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub refused_in: u64,
    pub refused_out: u64,
    pub frames_in: u64,
    pub bad_frames: u64,
    pub records_merged: u64,
    pub records_refused: u64,
    pub routed_forwarded: u64,
    pub routed_undeliverable: u64,
    pub datagrams_dropped: u64,
    pub outbox_dropped: u64,
    /// Data messages the `sink` process counted, and their payload bytes.
    pub sink_messages: u64,
    pub sink_bytes: u64,
    /// Data messages to a process this node does not run (bounced).
    pub messages_refused: u64,
}

/// The built-in `sink` process: counts data messages and payload bytes per sender.
#[derive(Debug, Clone, Default)]
struct Sink {
    per_sender: BTreeMap<NodeName, (u64, u64)>,
    unattributed: u64,
}

/// Per-site facts shared by the statuses of that site's nodes.
#[derive(Debug)]
struct SiteFacts {
    reachable: bool,
    views: BTreeMap<NodeName, Liveness>,
}

/// Site facts computed during one pass over the table.
#[derive(Debug, Default)]
struct SiteCache(BTreeMap<SiteName, SiteFacts>);

/// What the statuses were last computed from (see [`Engine::diff_statuses`]).
#[derive(Debug, Default)]
struct StatusBasis {
    /// False until the first computation.
    valid: bool,
    /// Table generation.
    table: u64,
    left_peers: u64,
    leaving: bool,
    /// Remote sites this node had a path to.
    reachable: BTreeSet<SiteName>,
    /// Nodes of our site whose liveness in the site ring changed since (bounded by the ring).
    ring: BTreeSet<NodeName>,
}

/// One node.
pub struct Engine {
    cfg: EngineConfig,
    table: NodeTable,
    links: BTreeMap<NodeName, Link>,
    refused: BTreeMap<NodeName, Refused>,
    /// Second instances of live nodes refused lately (at most [`MAX_REFUSALS`]).
    duplicates: BTreeMap<NodeName, Duplicate>,
    dialing: BTreeMap<NodeName, Dialing>,
    announced: BTreeMap<NodeName, Time>,
    /// Evidence about each direction of links that do not come up (one-way detection).
    direction: BTreeMap<NodeName, Direction>,
    /// Peers that told us they are leaving (until they come back with a newer alive record).
    left_peers: BTreeSet<NodeName>,
    /// Nodes of our site that linked to us while we held them dead, until their new record
    /// arrives (passed into the site like a newcomer's).
    returning: BTreeSet<NodeName>,
    /// Nodes of our site that our site ring saw come back from the dead (a new identity), and
    /// when, until their new record arrives: the ring's news can beat the record, which then
    /// finds them alive, yet still comes from a node back from the dead ([`REVIVED_WINDOW`]).
    revived: BTreeMap<NodeName, Time>,
    site_ring: Swim,
    wan_ring: Option<Swim>,
    rng: StdRng,
    outbox: VecDeque<Output>,
    next_tick: Time,
    next_sync: Time,
    /// Earliest time this node starts another full digest exchange (one per sync period, so a
    /// cold start with a hundred links coming up does not move the table a hundred times).
    next_full_sync: Time,
    /// Our table summary at the last tick, and when it last changed (or a peer showed us a
    /// different one): the anti-entropy period follows from it.
    last_summary: Summary,
    table_moved_at: Time,
    last_rtt_refresh: Time,
    statuses: BTreeMap<NodeName, NodeStatus>,
    /// The links the contract wants (peer, address) and the table generation they were read at.
    wanted: (u64, BTreeMap<NodeName, String>),
    /// Rises whenever a link is added, goes up or down, or is removed.
    links_generation: u64,
    /// Rises whenever `left_peers` changes.
    left_peers_generation: u64,
    /// The status inputs of the last diff (None: never diffed).
    status_basis: StatusBasis,
    echoes: BTreeMap<u64, PendingEcho>,
    calls: BTreeMap<u64, PendingCall>,
    sessions: BTreeMap<u64, PingSession>,
    probe_sets: BTreeMap<u64, ProbeSet>,
    next_id: u64,
    leaving: bool,
    forgotten: bool,
    /// Our record changed since it was last sent to peers.
    own_unsent: bool,
    /// When a gateway last sent its record at once on a change of its site's view.
    view_flushed: Time,
    /// New links our record does not list yet (see [`Timing::link_settle`]): how many links
    /// there were when the last one came up, when the first came up, when the last did, and how
    /// long this node waits for them to settle (the settle time plus a random share of it).
    links_grown: Option<(usize, Time, Time, Duration)>,
    keyring: Keyring,
    cert: Option<CertSummary>,
    sink: Sink,
    /// Loads other nodes asked for, running on the data path: handle -> who to answer.
    loads: BTreeMap<u64, CallFrom>,
    /// When this engine started.
    started: Time,
    /// Counters for metrics.
    pub counters: Counters,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("me", &self.cfg.me)
            .field("clock", &self.clock())
            .field("links", &self.links.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Whether `new` is `old` plus links in state `Up` (RTTs aside). Both are sorted by peer, one
/// report per peer, as [`Engine`] writes them.
/// Capacity of the output queue kept once it is empty again.
const OUTBOX_KEPT: usize = 256;

/// The address `me` dials `r` at, when the contract wants a link to it.
fn wanted_addr(cfg: &EngineConfig, r: &NodeRecord) -> Option<String> {
    if r.name == cfg.me.name || r.state != RecordState::Alive || r.addr.is_empty() {
        return None;
    }
    match cfg.contract.check_link(&cfg.me, &r.ident()) {
        Ok(LinkKind::Wan) => Some(r.wan_addr.clone().unwrap_or_else(|| r.addr.clone())),
        Ok(LinkKind::Site) => Some(r.addr.clone()),
        Err(_) => None,
    }
}

fn only_new_up(old: &[LinkReport], new: &[LinkReport]) -> bool {
    let same = |a: &LinkReport, b: &LinkReport| {
        a.peer == b.peer
            && a.state == b.state
            && a.since_ms == b.since_ms
            && a.secure == b.secure
            && a.reason == b.reason
            && a.key == b.key
    };
    let mut old = old.iter().peekable();
    for n in new {
        match old.peek() {
            Some(o) if o.peer == n.peer => {
                if !same(o, n) {
                    return false;
                }
                old.next();
            }
            Some(o) if o.peer < n.peer => return false,
            _ => {
                if n.state != LinkState::Up {
                    return false;
                }
            }
        }
    }
    old.next().is_none()
}

fn short(s: &str) -> String {
    let mut s = s.to_string();
    if s.len() > crate::table::MAX_TEXT_LEN {
        let mut cut = crate::table::MAX_TEXT_LEN;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Rendezvous hashing: a deterministic, spread-out choice among candidates that fails over
/// without reshuffling the others.
fn rendezvous<'a>(key: &str, candidates: impl Iterator<Item = &'a NodeName>) -> Option<NodeName> {
    fn h(a: &str, b: &str) -> u64 {
        // FNV-1a over "a|b": stable across builds and platforms.
        let mut x: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in a.bytes().chain(std::iter::once(b'|')).chain(b.bytes()) {
            x ^= u64::from(byte);
            x = x.wrapping_mul(0x0000_0100_0000_01b3);
        }
        x
    }
    candidates
        .max_by_key(|c| (h(key, c.as_str()), (*c).clone()))
        .cloned()
}

impl Engine {
    /// Builds an engine from its config and the records restored from disk (empty for a new
    /// node). A restarted node comes back with its clock raised by one.
    pub fn new(
        cfg: EngineConfig,
        restored: Vec<NodeRecord>,
        now: Time,
    ) -> Result<Engine, EngineError> {
        cfg.contract
            .check_node(&cfg.me)
            .map_err(|e| EngineError::Contract(e.to_string()))?;
        let mut table = NodeTable::from_records(restored);
        let prev = table.get(cfg.me.name.as_str()).cloned();
        let mut events = Vec::new();
        let clock = match &prev {
            Some(p) if p.is_tombstone() && !cfg.rejoin => {
                return Err(EngineError::Forgotten(p.clock))
            }
            Some(p) => {
                events.push(format!("restarted: clock {} -> {}", p.clock, p.clock + 1));
                p.clock + 1
            }
            None => 1,
        };
        let mut own = NodeRecord::new(
            &cfg.me,
            clock,
            cfg.addr.clone(),
            cfg.contract.hash().to_string(),
            cfg.version.clone(),
            cfg.secure,
        );
        own.wan_addr = cfg.wan_addr.clone();
        table.put_own(own);
        let health = LocalHealth::new(DEFAULT_MAX_SCORE, cfg.timing.late_timer);
        let site_size = table
            .live()
            .filter(|r| r.site == cfg.me.site)
            .count()
            .max(2);
        let swim_id = SwimId {
            name: cfg.me.name.clone(),
            gen: clock,
        };
        let site_ring = Swim::new(
            Ring::Site,
            swim_id.clone(),
            &cfg.timing.site_ring,
            site_size,
            cfg.seed ^ 0x5173,
            health.clone(),
        );
        let wan_ring = (cfg.me.role == Role::Gateway).then(|| {
            let n: usize = cfg.contract.sites().map(|s| s.gateways.len()).sum();
            Swim::new(
                Ring::Wan,
                swim_id,
                &cfg.timing.wan_ring,
                n.max(2),
                cfg.seed ^ 0x3a4e,
                health,
            )
        });
        let cfg_keyring = cfg.keyring.clone();
        let cfg_cert = cfg.cert.clone();
        let mut e = Engine {
            rng: StdRng::seed_from_u64(cfg.seed),
            cfg,
            table,
            links: BTreeMap::new(),
            refused: BTreeMap::new(),
            duplicates: BTreeMap::new(),
            started: now,
            dialing: BTreeMap::new(),
            announced: BTreeMap::new(),
            direction: BTreeMap::new(),
            left_peers: BTreeSet::new(),
            returning: BTreeSet::new(),
            revived: BTreeMap::new(),
            site_ring,
            wan_ring,
            outbox: VecDeque::new(),
            next_tick: now,
            next_sync: now,
            next_full_sync: now,
            last_summary: Summary::default(),
            table_moved_at: now,
            last_rtt_refresh: now,
            statuses: BTreeMap::new(),
            wanted: (0, BTreeMap::new()),
            links_generation: 0,
            left_peers_generation: 0,
            status_basis: StatusBasis::default(),
            echoes: BTreeMap::new(),
            calls: BTreeMap::new(),
            sessions: BTreeMap::new(),
            probe_sets: BTreeMap::new(),
            next_id: 1,
            leaving: false,
            forgotten: false,
            own_unsent: false,
            view_flushed: now,
            links_grown: None,
            keyring: cfg_keyring,
            cert: cfg_cert,
            sink: Sink::default(),
            loads: BTreeMap::new(),
            counters: Counters::default(),
        };
        e.outbox.push_back(Output::Persist);
        for reason in events {
            e.event(
                now,
                EventKind::ClockRaised,
                Some(e.cfg.me.name.clone()),
                None,
                reason,
            );
        }
        Ok(e)
    }

    // ----- accessors -------------------------------------------------------------------------

    /// Who this node is.
    pub fn me(&self) -> &Ident {
        &self.cfg.me
    }

    /// The engine's configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Our own record's clock.
    pub fn clock(&self) -> u64 {
        self.table
            .get(self.cfg.me.name.as_str())
            .map_or(0, |r| r.clock)
    }

    /// The node table.
    pub fn table(&self) -> &NodeTable {
        &self.table
    }

    /// Every record, for the snapshot.
    pub fn records(&self) -> Vec<NodeRecord> {
        self.table.iter().cloned().collect()
    }

    /// Whether a link to `peer` is up.
    pub fn is_linked(&self, peer: &NodeName) -> bool {
        self.links.get(peer).is_some_and(|l| l.up)
    }

    /// A number that rises whenever a link is added, goes up or down, or is removed: equal
    /// numbers, same set of links.
    pub fn links_generation(&self) -> u64 {
        self.links_generation
    }

    /// Names of peers with a link up.
    pub fn linked_peers(&self) -> Vec<NodeName> {
        self.links
            .iter()
            .filter(|(_, l)| l.up)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Local-health score of the site ring (0 = healthy).
    pub fn health_score(&self) -> u32 {
        self.site_ring.health_score()
    }

    /// What one failure-detection ring currently says about its members.
    pub fn ring_view(&self, ring: Ring) -> Vec<(NodeName, Liveness)> {
        let r = match ring {
            Ring::Site => Some(&self.site_ring),
            Ring::Wan => self.wan_ring.as_ref(),
        };
        r.map(|r| r.members().map(|(n, l)| (n.clone(), l)).collect())
            .unwrap_or_default()
    }

    /// Whether the node is leaving.
    pub fn is_leaving(&self) -> bool {
        self.leaving
    }

    fn wall_ms(&self, now: Time) -> u64 {
        self.cfg.wall_base_ms + now.as_millis() as u64
    }

    fn push(&mut self, o: Output) {
        if self.outbox.len() >= MAX_OUTBOX {
            self.counters.outbox_dropped += 1;
            return;
        }
        self.outbox.push_back(o);
    }

    fn event(
        &mut self,
        now: Time,
        kind: EventKind,
        node: Option<NodeName>,
        peer: Option<NodeName>,
        reason: String,
    ) {
        let at_ms = self.wall_ms(now);
        self.push(Output::Event(EventOut {
            kind,
            node,
            peer,
            reason: short(&reason),
            at_ms,
        }));
    }

    fn fresh_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    // ----- driver interface -------------------------------------------------------------------

    /// Next thing to do, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        let out = self.outbox.pop_front();
        if out.is_none() && self.outbox.capacity() > OUTBOX_KEPT {
            // A burst (a cold start reports a status per node of the cluster) must not keep its
            // queue allocated for the life of the node.
            self.outbox.shrink_to(OUTBOX_KEPT);
        }
        out
    }

    /// When [`Engine::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Time {
        let mut t = self.next_tick;
        if let Some(d) = self.site_ring.next_deadline() {
            t = t.min(d);
        }
        if let Some(d) = self.wan_ring.as_ref().and_then(Swim::next_deadline) {
            t = t.min(d);
        }
        t
    }

    /// Runs timers due at `now`.
    pub fn handle_timeout(&mut self, now: Time) {
        self.site_ring.handle_timeout(now);
        if let Some(w) = self.wan_ring.as_mut() {
            w.handle_timeout(now);
        }
        self.drain_rings(now);
        if now >= self.next_tick {
            self.next_tick = now + self.cfg.timing.tick;
            self.tick(now);
        }
    }

    fn tick(&mut self, now: Time) {
        if self.forgotten {
            return;
        }
        self.revived
            .retain(|_, t| now.saturating_sub(*t) <= REVIVED_WINDOW);
        self.expire_requests(now);
        self.expire_directions(now);
        self.refresh_own(now, false);
        self.flush_own();
        self.diff_statuses(now);
        if self.leaving {
            return;
        }
        self.dial_wanted(now);
        self.reannounce(now);
        self.suspect_unheard_gateways(now);
        let mine = self.table.summary();
        if mine != self.last_summary {
            self.last_summary = mine;
            self.table_moving(now);
        }
        if now >= self.next_sync {
            let idle = now.saturating_sub(self.table_moved_at) >= self.cfg.timing.sync_idle;
            self.next_sync = now
                + if idle {
                    self.cfg.timing.sync_idle
                } else {
                    self.cfg.timing.sync_every
                };
            let up: Vec<NodeName> = self.linked_peers();
            if !up.is_empty() {
                let i = self.rng.random_range(0..up.len());
                self.push(Output::Send {
                    to: up[i].clone(),
                    frame: Frame::Summary(self.table.summary()),
                });
            }
        }
    }

    /// Gateways of our site that the table holds alive but our site ring never heard of, once
    /// the ring had time to learn of every live member: handed to the ring as suspects, so a
    /// gateway that crashed while we were down is declared dead (and our view, which the other
    /// sites read, says so) instead of staying `unknown` here and `alive` in its own last record.
    fn suspect_unheard_gateways(&mut self, now: Time) {
        if now.saturating_sub(self.started) < self.cfg.timing.site_ring.suspect_to_down * 2 {
            return;
        }
        let unheard: Vec<NodeName> = self
            .table
            .gateways_of(&self.cfg.me.site)
            .filter(|r| {
                r.name != self.cfg.me.name
                    && r.site == self.cfg.me.site
                    && r.state == RecordState::Alive
                    && r.clock > 0
                    && !self.left_peers.contains(&r.name)
                    && self.site_ring.liveness(&r.name).is_none()
                    && !self.links.get(&r.name).is_some_and(|l| l.up)
            })
            .map(|r| r.name.clone())
            .collect();
        if unheard.is_empty() {
            return;
        }
        for g in unheard {
            self.site_ring.suspect_unheard(now, &g);
        }
        self.drain_rings(now);
    }

    /// Our table moved, or a peer's differs: anti-entropy rounds every `sync_every` again.
    fn table_moving(&mut self, now: Time) {
        self.table_moved_at = now;
        self.next_sync = self.next_sync.min(now + self.cfg.timing.sync_every);
    }

    /// A peer we have a live link to but that a ring still holds dead (for example after a healed
    /// partition, when both sides declared each other down): announce again, once per probe
    /// period. The peer answers either by taking us in or by telling us we are down, upon which
    /// foca renews our identity and the next announce gets us in.
    fn reannounce(&mut self, now: Time) {
        let every = self.cfg.timing.site_ring.probe_period;
        let stale: Vec<(NodeName, LinkKind)> = self
            .links
            .iter()
            .filter(|(_, l)| l.up)
            .filter(|(n, l)| {
                let ring = match l.kind {
                    LinkKind::Site => Some(&self.site_ring),
                    LinkKind::Wan => self.wan_ring.as_ref(),
                };
                ring.is_some_and(|r| r.liveness(n) == Some(Liveness::Dead))
            })
            .filter(|(n, _)| {
                self.announced
                    .get(*n)
                    .is_none_or(|t| now.saturating_sub(*t) >= every)
            })
            .map(|(n, l)| (n.clone(), l.kind))
            .collect();
        for (peer, kind) in stale {
            self.announced.insert(peer.clone(), now);
            self.announce(now, &peer, kind);
        }
        self.drain_rings(now);
    }

    /// Asks `peer` into the ring of the link kind (site ring, or WAN ring for gateways).
    fn announce(&mut self, now: Time, peer: &NodeName, kind: LinkKind) {
        match kind {
            LinkKind::Site => self.site_ring.announce(now, peer),
            LinkKind::Wan => {
                if let Some(w) = self.wan_ring.as_mut() {
                    w.announce(now, peer);
                }
            }
        }
    }

    // ----- links ------------------------------------------------------------------------------

    /// Peers this node wants links to, with their addresses (computed from the whole table;
    /// the engine itself keeps the same answer up to date from the table's changes).
    pub fn wanted_links(&self) -> Vec<(NodeName, String)> {
        let mut out: BTreeMap<NodeName, String> = self
            .table
            .live()
            .filter_map(|r| wanted_addr(&self.cfg, r).map(|a| (r.name.clone(), a)))
            .collect();
        self.add_wanted_seeds(&mut out);
        out.into_iter().collect()
    }

    /// Seeds we have not learned a record for yet (their site is unknown until they answer).
    fn add_wanted_seeds(&self, out: &mut BTreeMap<NodeName, String>) {
        for (name, addr) in &self.cfg.seeds {
            if *name != self.cfg.me.name
                && self.table.get(name.as_str()).is_none()
                && !self.refused.contains_key(name)
            {
                out.entry(name.clone()).or_insert_with(|| addr.clone());
            }
        }
    }

    /// Brings [`Engine::wanted`] up to date with the records stored since it was last read: a
    /// tick costs the changes, not the table (a member wants its site, of any size; a gateway
    /// also the other sites' gateways).
    fn refresh_wanted(&mut self) {
        let gen = self.table.generation();
        if self.wanted.0 == gen {
            return;
        }
        for r in self.table.changed_since(self.wanted.0) {
            match wanted_addr(&self.cfg, r) {
                Some(addr) => {
                    self.wanted.1.insert(r.name.clone(), addr);
                }
                None => {
                    self.wanted.1.remove(&r.name);
                }
            }
        }
        self.wanted.0 = gen;
    }

    fn dial_wanted(&mut self, now: Time) {
        let min = self.cfg.timing.dial_backoff_min;
        self.refresh_wanted();
        let mut seeds = BTreeMap::new();
        self.add_wanted_seeds(&mut seeds);
        let wanted = std::mem::take(&mut self.wanted.1);
        // Seeds are never in the table, so the two never name the same peer.
        for (peer, addr) in wanted.iter().chain(&seeds) {
            if self.links.get(peer).is_some_and(|l| l.up) {
                continue;
            }
            let grace = self.dial_grace(peer);
            let d = self.dialing.entry(peer.clone()).or_insert(Dialing {
                next: now + grace,
                backoff: min,
                in_flight: false,
            });
            if d.in_flight || now < d.next {
                continue;
            }
            d.in_flight = true;
            self.push(Output::Dial {
                peer: peer.clone(),
                addr: addr.clone(),
            });
        }
        self.wanted.1 = wanted;
    }

    /// Both ends want a link; the lower name dials first and the higher one only after a grace
    /// period, so that simultaneous dials (and the duplicate connection one of them must close)
    /// are rare.
    fn dial_grace(&self, peer: &NodeName) -> Duration {
        if self.cfg.me.name > *peer {
            self.cfg.timing.dial_backoff_min * 4
        } else {
            Duration::ZERO
        }
    }

    fn backoff(&mut self, now: Time, peer: &NodeName, long: bool) {
        let max = self.cfg.timing.dial_backoff_max;
        let min = self.cfg.timing.dial_backoff_min;
        let d = self.dialing.entry(peer.clone()).or_insert(Dialing {
            next: now,
            backoff: min,
            in_flight: false,
        });
        d.in_flight = false;
        d.backoff = if long { max } else { (d.backoff * 2).min(max) };
        d.next = now + d.backoff;
    }

    /// A dial of ours ended without a new link because a link to `peer` already exists (both
    /// ends dialed at once; the transport keeps one connection).
    pub fn handle_dial_superseded(&mut self, peer: &NodeName) {
        if let Some(d) = self.dialing.get_mut(peer) {
            d.in_flight = false;
        }
    }

    /// A dial of ours failed before any handshake (unreachable, TLS refused, timeout).
    pub fn handle_dial_failed(&mut self, now: Time, peer: &NodeName, reason: &str, refused: bool) {
        if self.is_linked(peer) {
            // A stale dial (one started before the peer came back, which then linked by
            // another dial) says nothing about a link that is up.
            return;
        }
        self.backoff(now, peer, refused);
        if refused {
            self.counters.refused_out += 1;
            self.note_refusal(now, peer.clone(), reason.to_string(), false);
            return;
        }
        if let Some(l) = self.links.get_mut(peer) {
            l.reason = Some(short(reason));
        }
        let e = self.direction.entry(peer.clone()).or_default();
        e.dial_failed = Some(now);
        self.judge_direction(now, peer);
    }

    /// A handshake from `addr` reached us and then stalled (our answers never got through):
    /// evidence that packets flow from that peer to us but not back.
    pub fn handle_inbound_stalled(&mut self, now: Time, addr: &str) {
        let Some(peer) = self
            .table
            .live()
            .find(|r| {
                (r.addr == addr || r.wan_addr.as_deref() == Some(addr))
                    && r.name != self.cfg.me.name
            })
            .map(|r| r.name.clone())
        else {
            return;
        };
        let e = self.direction.entry(peer.clone()).or_default();
        e.inbound_stalled = Some(now);
        self.judge_direction(now, &peer);
    }

    /// One-way verdict for `peer`: its handshakes reach us and stall, and ours time out.
    fn judge_direction(&mut self, now: Time, peer: &NodeName) {
        let window = ONE_WAY_EVIDENCE;
        let fresh = |t: Option<Time>| t.is_some_and(|t| now.saturating_sub(t) <= window);
        let Some(e) = self.direction.get(peer) else {
            return;
        };
        let one_way = fresh(e.inbound_stalled) && fresh(e.dial_failed);
        let was = e.one_way_since.is_some();
        if one_way && !was {
            if let Some(e) = self.direction.get_mut(peer) {
                e.one_way_since = Some(now);
            }
            let me = self.cfg.me.name.clone();
            self.event(
                now,
                EventKind::LinkDown,
                Some(me.clone()),
                Some(peer.clone()),
                format!("one-way: {peer} -> {me} gets through, {me} -> {peer} does not ({peer}'s handshakes reach {me} and stall; {me}'s dials time out)"),
            );
            self.refresh_own(now, false);
        }
    }

    fn expire_directions(&mut self, now: Time) {
        let window = ONE_WAY_EVIDENCE;
        let mut changed = false;
        self.direction.retain(|peer, e| {
            let fresh = |t: Option<Time>| t.is_some_and(|t| now.saturating_sub(t) <= window);
            let linked = self.links.get(peer).is_some_and(|l| l.up);
            if e.one_way_since.is_some()
                && (linked || !(fresh(e.inbound_stalled) && fresh(e.dial_failed)))
            {
                e.one_way_since = None;
                changed = true;
            }
            !linked && (fresh(e.inbound_stalled) || fresh(e.dial_failed))
        });
        if changed {
            self.refresh_own(now, false);
        }
    }

    /// Checks the protocol version of a dialer's hello (or of an acceptor's answer), read
    /// before the rest of it ([`crate::wire::Handshake::version_of`]): another version is refused with
    /// [`RefusalCode::Version`], naming both. The caller reports a refusal with
    /// [`Engine::handle_refused`], as for [`Engine::check_hello`].
    pub fn check_hello_version(&self, version: u8) -> Result<(), Refusal> {
        if version == crate::wire::PROTOCOL_VERSION {
            Ok(())
        } else {
            Err(Refusal::version(version))
        }
    }

    /// Checks a dialer's hello on the accepting side. `cert` is the identity and cluster proven
    /// by the peer's certificate (None when running insecure).
    pub fn check_hello(
        &self,
        hello: &Hello,
        cert: Option<(&ClusterName, &Ident)>,
        binding: &[u8],
    ) -> Result<HelloAck, Refusal> {
        let refuse = |code, reason: String| Refusal { code, reason };
        if hello.cluster != self.cfg.cluster {
            return Err(refuse(
                RefusalCode::Cluster,
                format!(
                    "peer belongs to cluster {}, this is cluster {}",
                    hello.cluster, self.cfg.cluster
                ),
            ));
        }
        match cert {
            Some((cluster, ident)) if cluster != &hello.cluster || ident != &hello.ident => {
                return Err(refuse(
                    RefusalCode::Identity,
                    format!(
                        "certificate names {} of site {} ({}) in cluster {}, but the peer claims {} of site {} ({})",
                        ident.name, ident.site, ident.role, cluster, hello.ident.name, hello.ident.site, hello.ident.role
                    ),
                ));
            }
            Some(_) => {}
            None if self.cfg.secure => {
                return Err(refuse(
                    RefusalCode::SecurityMode,
                    "peer presented no certificate; this node requires mutual TLS".into(),
                ))
            }
            None => {}
        }
        let key = self
            .keyring
            .verify(&hello.secret, ProofRole::Hello, &hello.ident.name, binding)
            .map_err(|e| refuse(RefusalCode::Secret, e.to_string()))?;
        if let Err(e) = self.cfg.contract.check_link(&self.cfg.me, &hello.ident) {
            return Err(refuse(RefusalCode::Contract, e.to_string()));
        }
        let last = self.table.get(hello.ident.name.as_str());
        if let Some(r) = last {
            if r.is_tombstone() && !hello.rejoin {
                return Err(refuse(
                    RefusalCode::Forgotten,
                    format!(
                        "{} was forgotten by an operator (tombstone at clock {}); restart it with --rejoin to bring it back",
                        hello.ident.name, r.clock
                    ),
                ));
            }
        }
        if let Some(reason) = self.second_instance(hello) {
            return Err(refuse(RefusalCode::Identity, reason));
        }
        let secret = self
            .keyring
            .prove_with(key, ProofRole::Ack, &self.cfg.me.name, binding)
            .ok_or_else(|| {
                refuse(
                    RefusalCode::Secret,
                    format!("key {key} vanished from the keyring"),
                )
            })?;
        Ok(HelloAck {
            ident: self.cfg.me.clone(),
            contract_hash: self.cfg.contract.hash().to_string(),
            clock: self.clock(),
            last_clock_for_you: last.map_or(0, |r| r.clock),
            secret,
        })
    }

    /// The [`crate::instance`] rule for `hello`: refused when the table's instance of the name
    /// answers at another address.
    fn second_instance(&self, hello: &Hello) -> Option<String> {
        let name = &hello.ident.name;
        let incumbent = self
            .table
            .get(name.as_str())
            .map(|r| crate::instance::Incumbent {
                addr: &r.addr,
                answers: r.state == RecordState::Alive
                    && r.clock > 0
                    && self.status_of(name) == NodeStatus::Alive,
            });
        crate::instance::second_instance(name.as_str(), &hello.addr, incumbent)
    }

    /// What a dial needs to build its hello once the TLS session exists (the proof of the
    /// cluster secret is bound to that session).
    pub fn hello_maker(&self) -> HelloMaker {
        HelloMaker {
            cluster: self.cfg.cluster.clone(),
            ident: self.cfg.me.clone(),
            contract_hash: self.cfg.contract.hash().to_string(),
            clock: self.clock(),
            addr: self.cfg.addr.clone(),
            rejoin: self.cfg.rejoin,
            version: self.cfg.version.clone(),
            keyring: self.keyring.clone(),
        }
    }

    /// Checks the acceptor's ack on the dialing side (after the TLS layer verified that the
    /// certificate names the node we dialed). Raises our clock when the acceptor remembers us
    /// with a higher one (a re-deployed node with an empty data directory).
    pub fn check_ack(
        &mut self,
        now: Time,
        expected: &NodeName,
        ack: &HelloAck,
        cert: Option<(&ClusterName, &Ident)>,
        binding: &[u8],
    ) -> Result<KeyId, Refusal> {
        if let Some((cluster, ident)) = cert {
            if cluster != &self.cfg.cluster || ident != &ack.ident {
                return Err(Refusal {
                    code: RefusalCode::Identity,
                    reason: format!(
                        "certificate names {} of site {} ({}), but the peer claims {} of site {} ({})",
                        ident.name, ident.site, ident.role, ack.ident.name, ack.ident.site, ack.ident.role
                    ),
                });
            }
        }
        if &ack.ident.name != expected {
            return Err(Refusal {
                code: RefusalCode::Identity,
                reason: format!("dialed {expected} but {} answered", ack.ident.name),
            });
        }
        let key = self
            .keyring
            .verify(&ack.secret, ProofRole::Ack, &ack.ident.name, binding)
            .map_err(|e| Refusal {
                code: RefusalCode::Secret,
                reason: e.to_string(),
            })?;
        if let Err(e) = self.cfg.contract.check_link(&self.cfg.me, &ack.ident) {
            return Err(Refusal {
                code: RefusalCode::Contract,
                reason: e.to_string(),
            });
        }
        if ack.last_clock_for_you >= self.clock() {
            let from = self.clock();
            self.raise_clock(now, ack.last_clock_for_you + 1);
            self.event(
                now,
                EventKind::ClockRaised,
                Some(self.cfg.me.name.clone()),
                Some(ack.ident.name.clone()),
                format!(
                    "{} remembered this node at clock {}: clock {} -> {}",
                    ack.ident.name,
                    ack.last_clock_for_you,
                    from,
                    self.clock()
                ),
            );
        }
        Ok(key)
    }

    /// A handshake was refused: by us (`by_us`) or by the peer. `peer` is the claimed name;
    /// `code` is known when the refusal came from the application handshake (not from TLS).
    pub fn handle_refused(
        &mut self,
        now: Time,
        peer: Option<NodeName>,
        code: Option<RefusalCode>,
        reason: &str,
        by_us: bool,
    ) {
        if by_us {
            self.counters.refused_in += 1;
        } else {
            self.counters.refused_out += 1;
        }
        if !by_us && code == Some(RefusalCode::Forgotten) && !self.cfg.rejoin && !self.forgotten {
            self.forgotten = true;
            let reason = format!(
                "{reason} (told by {})",
                peer.as_ref().map_or("a peer", |p| p.as_str())
            );
            self.event(
                now,
                EventKind::NodeForgotten,
                Some(self.cfg.me.name.clone()),
                None,
                reason.clone(),
            );
            self.push(Output::Fatal(reason));
            return;
        }
        if let (true, Some(p)) = (by_us, &peer) {
            if code == Some(RefusalCode::Identity)
                && reason.starts_with(crate::instance::SECOND_INSTANCE)
            {
                self.note_duplicate(now, p.clone(), reason);
                return;
            }
        }
        match peer {
            Some(p) => {
                if !by_us {
                    self.backoff(now, &p, true);
                }
                self.note_refusal(now, p, reason.to_string(), by_us);
            }
            None => {
                let who = if by_us {
                    "refused a peer"
                } else {
                    "refused by a peer"
                };
                self.event(
                    now,
                    EventKind::LinkRefused,
                    Some(self.cfg.me.name.clone()),
                    None,
                    format!("{who}: {reason}"),
                );
            }
        }
    }

    /// We refused a second instance of `name`: an event when it starts (or its reason changes),
    /// and reports stay unhealthy while it keeps trying ([`DUPLICATE_EVIDENCE`]). The incumbent's
    /// link and record are left alone.
    fn note_duplicate(&mut self, now: Time, name: NodeName, reason: &str) {
        let fresh = self
            .duplicates
            .get(&name)
            .is_none_or(|d| d.reason != reason || now.saturating_sub(d.last) >= DUPLICATE_EVIDENCE);
        if self.duplicates.len() >= MAX_REFUSALS && !self.duplicates.contains_key(&name) {
            if let Some(oldest) = self
                .duplicates
                .iter()
                .min_by_key(|(_, d)| d.last)
                .map(|(n, _)| n.clone())
            {
                self.duplicates.remove(&oldest);
            }
        }
        self.duplicates.insert(
            name.clone(),
            Duplicate {
                reason: short(reason),
                last: now,
            },
        );
        if fresh {
            self.event(
                now,
                EventKind::LinkRefused,
                Some(self.cfg.me.name.clone()),
                Some(name),
                format!("refused by {}: {reason}", self.cfg.me.name),
            );
        }
    }

    fn note_refusal(&mut self, now: Time, peer: NodeName, reason: String, by_us: bool) {
        let text = if by_us {
            format!("refused by {}: {reason}", self.cfg.me.name)
        } else {
            format!("refused by {peer}: {reason}")
        };
        let changed = self
            .refused
            .get(&peer)
            .is_none_or(|r| r.reason != short(&text));
        if let Some(r) = self.refused.get_mut(&peer) {
            r.last = now;
        }
        if self.refused.len() >= MAX_REFUSALS && !self.refused.contains_key(&peer) {
            // Forget the oldest refusal to make room.
            if let Some(oldest) = self
                .refused
                .iter()
                .min_by_key(|(_, r)| r.since)
                .map(|(n, _)| n.clone())
            {
                self.refused.remove(&oldest);
            }
        }
        if changed {
            self.refused.insert(
                peer.clone(),
                Refused {
                    reason: short(&text),
                    since: now,
                    last: now,
                },
            );
            self.event(
                now,
                EventKind::LinkRefused,
                Some(self.cfg.me.name.clone()),
                Some(peer),
                text,
            );
            self.refresh_own(now, false);
        }
    }

    /// A link completed its hello/ack.
    pub fn handle_link_up(&mut self, now: Time, info: LinkInfo) {
        let peer = info.peer.name.clone();
        let Ok(kind) = self.cfg.contract.check_link(&self.cfg.me, &info.peer) else {
            // The driver only reports links that passed check_hello/check_ack.
            debug_assert!(false, "link up that the contract does not allow");
            return;
        };
        if info.peer.site == self.cfg.me.site
            && (self.status_of(&peer) == NodeStatus::Dead || self.revived.contains_key(&peer))
        {
            self.returning.insert(peer.clone());
        }
        self.dialing.remove(&peer);
        self.refused.remove(&peer);
        if self.left_peers.remove(&peer) {
            self.left_peers_generation += 1;
        }
        self.links_generation += 1;
        let drift = info.contract_hash != self.cfg.contract.hash();
        let reason = drift.then(|| {
            format!(
                "contract drift: {} runs contract {}, this node runs {}",
                peer,
                info.contract_hash,
                self.cfg.contract.hash()
            )
        });
        self.links.insert(
            peer.clone(),
            Link {
                ident: info.peer.clone(),
                kind,
                up: true,
                since: now,
                rtt_us: info.rtt_us,
                secure: info.secure,
                protocol: info.protocol.clone(),
                contract_hash: info.contract_hash,
                reason: reason.clone(),
                reported_rtt_us: info.rtt_us,
                rtt_low_us: info.rtt_us,
                rtt_high_us: info.rtt_us,
                key: info.key,
            },
        );
        self.event(
            now,
            EventKind::LinkUp,
            Some(self.cfg.me.name.clone()),
            Some(peer.clone()),
            format!("{} link up ({})", kind.as_str(), info.protocol),
        );
        if let Some(r) = reason {
            self.event(now, EventKind::Drift, Some(peer.clone()), None, r);
        }
        // Make sure we have a record for the peer before the table sync lands.
        if self.table.get(peer.as_str()).is_none() {
            let mut rec = NodeRecord::new(
                &info.peer,
                0,
                String::new(),
                String::new(),
                String::new(),
                info.secure,
            );
            rec.clock = 0;
            self.table.merge(rec);
        }
        self.refresh_own(now, false);
        // The new peer gets our record as it stands now (it may not have it, and no other
        // sync runs on this link); every peer gets the next version at the next tick.
        if let Some(own) = self.table.get_shared(self.cfg.me.name.as_str()) {
            self.push(Output::Send {
                to: peer.clone(),
                frame: Frame::Records(vec![own.clone()]),
            });
        }
        // The first link (or the first in a sync period) syncs the whole table; the others
        // only compare summaries, and a difference waits for the next period. A WAN link always
        // syncs: it is where a site's records cross (a gateway's first records of its site
        // arrive before its WAN links are up), and a gateway has few of them.
        if !self.start_full_sync(now, &peer, kind == LinkKind::Wan) {
            self.push(Output::Send {
                to: peer.clone(),
                frame: Frame::Summary(self.table.summary()),
            });
        }
        self.announce(now, &peer, kind);
        self.drain_rings(now);
    }

    /// A link closed.
    pub fn handle_link_down(&mut self, now: Time, peer: &NodeName, reason: &str) {
        let Some(l) = self.links.get_mut(peer) else {
            return;
        };
        if !l.up {
            return;
        }
        self.links_generation += 1;
        l.up = false;
        l.since = now;
        l.reason = Some(short(reason));
        let kind = l.kind;
        self.returning.remove(peer);
        self.backoff(now, peer, false);
        self.event(
            now,
            EventKind::LinkDown,
            Some(self.cfg.me.name.clone()),
            Some(peer.clone()),
            format!("{} link down: {reason}", kind.as_str()),
        );
        self.refresh_own(now, false);
    }

    /// The transport's latest RTT estimate for a link.
    pub fn handle_rtt(&mut self, peer: &NodeName, rtt_us: u32) {
        if let Some(l) = self.links.get_mut(peer) {
            l.rtt_us = rtt_us;
            l.rtt_low_us = l.rtt_low_us.min(rtt_us);
            l.rtt_high_us = l.rtt_high_us.max(rtt_us);
        }
    }

    // ----- frames -----------------------------------------------------------------------------

    /// Bytes of a frame arrived on the link to `from`.
    pub fn handle_frame_bytes(&mut self, now: Time, from: &NodeName, bytes: &[u8]) {
        match Frame::decode(bytes) {
            Ok(f) => self.handle_frame(now, from, f),
            Err(e) => {
                self.counters.bad_frames += 1;
                self.event(
                    now,
                    EventKind::Warning,
                    Some(from.clone()),
                    None,
                    format!("dropped a bad frame from {from}: {e}"),
                );
            }
        }
    }

    /// A decoded frame arrived on the link to `from`.
    pub fn handle_frame(&mut self, now: Time, from: &NodeName, frame: Frame) {
        let Some(kind) = self.links.get(from).filter(|l| l.up).map(|l| l.kind) else {
            return;
        };
        self.counters.frames_in += 1;
        match frame {
            Frame::Records(rs) => self.merge_records(now, from, kind, rs),
            Frame::Summary(theirs) => {
                let differs = theirs != self.table.summary();
                if differs {
                    self.table_moving(now);
                }
                // Differing tables: tell the sender which sites hold what, at most once per
                // sync period.
                if differs && now >= self.next_full_sync {
                    self.next_full_sync = now + self.cfg.timing.sync_every;
                    self.push(Output::Send {
                        to: from.clone(),
                        frame: Frame::Sites(self.table.site_summaries()),
                    });
                }
            }
            Frame::Sites(theirs) => {
                let sites = self.table.sites_differing(&theirs);
                if !sites.is_empty() {
                    let digest = self.table.digest_of(&sites);
                    self.push(Output::Send {
                        to: from.clone(),
                        frame: Frame::SiteDigest(sites, digest, true),
                    });
                }
            }
            Frame::SiteDigest(mut sites, d, want_reply) => {
                sites.sort();
                sites.dedup();
                let newer = self.table.newer_than_in(&d, Some(&sites));
                for chunk in newer.chunks(MAX_RECORDS_PER_FRAME) {
                    self.push(Output::Send {
                        to: from.clone(),
                        frame: Frame::Records(chunk.to_vec()),
                    });
                }
                if want_reply && self.table.behind(&d) {
                    let mine = self.table.digest_of(&sites);
                    self.push(Output::Send {
                        to: from.clone(),
                        frame: Frame::SiteDigest(sites, mine, false),
                    });
                }
            }
            Frame::Digest(d, want_reply) => {
                let newer = self.table.newer_than(&d);
                for chunk in newer.chunks(MAX_RECORDS_PER_FRAME) {
                    self.push(Output::Send {
                        to: from.clone(),
                        frame: Frame::Records(chunk.to_vec()),
                    });
                }
                if want_reply && self.table.behind(&d) {
                    let mine = self.table.digest();
                    self.push(Output::Send {
                        to: from.clone(),
                        frame: Frame::Digest(mine, false),
                    });
                }
            }
            Frame::Routed(env) => self.handle_routed(now, from, env),
            Frame::Leaving => {
                // Authoritative and immediate: the peer says it is going. Its `left` record
                // follows; until then (and if it is lost) this keeps the failure detector's
                // verdict from being reported as a death.
                self.left_peers.insert(from.clone());
                self.left_peers_generation += 1;
                self.diff_statuses(now);
            }
        }
        self.drain_rings(now);
    }

    /// Sends our full digest to `peer` (who answers with what we lack and, if it is behind, its
    /// own digest), unless a full exchange already started this sync period and `always` is
    /// false. Returns whether it sent.
    fn start_full_sync(&mut self, now: Time, peer: &NodeName, always: bool) -> bool {
        if now < self.next_full_sync && !always {
            return false;
        }
        self.next_full_sync = now + self.cfg.timing.sync_every;
        self.push(Output::Send {
            to: peer.clone(),
            frame: Frame::Digest(self.table.digest(), true),
        });
        true
    }

    /// A datagram arrived on the link to `from`.
    pub fn handle_datagram(&mut self, now: Time, from: &NodeName, bytes: &[u8]) {
        let Some(kind) = self.links.get(from).filter(|l| l.up).map(|l| l.kind) else {
            self.counters.datagrams_dropped += 1;
            return;
        };
        match decode_swim(bytes) {
            Ok((Ring::Site, data)) if kind == LinkKind::Site => {
                self.site_ring.handle_data(now, data)
            }
            Ok((Ring::Wan, data)) if kind == LinkKind::Wan => {
                if let Some(w) = self.wan_ring.as_mut() {
                    w.handle_data(now, data);
                }
            }
            _ => self.counters.datagrams_dropped += 1,
        }
        self.drain_rings(now);
    }

    fn merge_records(
        &mut self,
        now: Time,
        from: &NodeName,
        kind: LinkKind,
        rs: Vec<Arc<NodeRecord>>,
    ) {
        let mut changed = Vec::new();
        // Records of our own site's nodes we knew nothing about, or held dead (a node joining or
        // coming back links to its seeds first; the rest of its site learns of it, and dials
        // it, through its gateway).
        let mut newcomers = Vec::new();
        // Peers held dead whose new record we have: dialed again at once, not at the end of a
        // backoff grown while they were down.
        let mut returned = Vec::new();
        for r in rs {
            if r.name == self.cfg.me.name {
                self.handle_own_record(now, r);
                continue;
            }
            let prev = self.table.get(r.name.as_str());
            let was_tomb = prev.is_some_and(NodeRecord::is_tombstone);
            // A link-up placeholder (no address) does not count as knowing the node.
            let unknown = prev.is_none_or(|p| p.addr.is_empty());
            let same_site = r.site == self.cfg.me.site;
            let newer = prev.is_some_and(|p| p.clock < r.clock);
            let candidate = !unknown && same_site && r.state == RecordState::Alive && newer;
            // Linked to us since it came back (see `handle_link_up`), or held dead here.
            let relinked = candidate && self.returning.remove(&r.name);
            let revived = candidate
                && self
                    .revived
                    .remove(&r.name)
                    .is_some_and(|t| now.saturating_sub(t) <= REVIVED_WINDOW);
            let was_dead =
                candidate && (relinked || revived || self.status_of(&r.name) == NodeStatus::Dead);
            match self.table.merge(r.clone()) {
                m if m.changed() => {
                    self.counters.records_merged += 1;
                    if r.state == RecordState::Alive {
                        // A newer alive record: the node came back after leaving.
                        if self.left_peers.remove(&r.name) {
                            self.left_peers_generation += 1;
                        }
                    }
                    if r.is_tombstone() && !was_tomb {
                        self.on_forgotten(now, &r.name);
                    }
                    if (unknown || was_dead) && same_site && kind == LinkKind::Site {
                        newcomers.push(r.clone());
                    }
                    if was_dead {
                        // A record from the node itself came over a connection to its new
                        // instance: that one stays.
                        returned.push((r.name.clone(), relinked || r.name == *from));
                    }
                    changed.push(r);
                }
                Merge::Full | Merge::Invalid => self.counters.records_refused += 1,
                _ => {}
            }
        }
        if changed.is_empty() {
            return;
        }
        self.redial_returned(now, returned);
        self.push(Output::Persist);
        // Forward: the origin pushed to all of its links; a node passes updates on only across
        // a boundary (site -> WAN, WAN -> site, WAN -> other WAN links). Across a site
        // boundary, one gateway of the site per record passes it on ([`Engine::forwards`]), not
        // every gateway. Across the WAN, not to a gateway the sender reports a link to: the
        // sender forwarded to it already. A record missed either way (a stale link report, two
        // gateways that disagree on which of them is up) is repaired by anti-entropy.
        let gateway = self.cfg.me.role == Role::Gateway;
        let across: Vec<Arc<NodeRecord>> = if gateway {
            changed
                .iter()
                .filter(|r| self.forwards(&r.name))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        // The one exception to "not site -> site": a newcomer of our site, passed on by the
        // gateway that passes its record across.
        newcomers.retain(|r| gateway && across.iter().any(|a| Arc::ptr_eq(a, r)));
        let sender = self.table.get(from.as_str());
        let sender_links_to = |n: &NodeName| {
            sender.is_some_and(|r| {
                r.links
                    .iter()
                    .any(|x| x.peer == *n && x.state == LinkState::Up)
            })
        };
        // Each target with what it gets.
        let targets: Vec<(NodeName, Vec<Arc<NodeRecord>>)> = self
            .links
            .iter()
            .filter(|(n, l)| l.up && *n != from)
            .filter_map(|(n, l)| {
                let records = match (kind, l.kind) {
                    (LinkKind::Site, LinkKind::Site) => &newcomers,
                    (LinkKind::Wan, LinkKind::Wan) if sender_links_to(n) => return None,
                    (LinkKind::Wan, LinkKind::Wan) => &changed,
                    _ => &across,
                };
                (!records.is_empty()).then(|| (n.clone(), records.clone()))
            })
            .collect();
        for (to, records) in targets {
            self.push(Output::Send {
                to,
                frame: Frame::Records(records),
            });
        }
    }

    /// Peers back from the dead (with whether they linked to us since): a connection still open
    /// to the dead instance is closed, and each is dialed again at once, not at the end of a
    /// backoff grown while it was down.
    fn redial_returned(&mut self, now: Time, returned: Vec<(NodeName, bool)>) {
        if returned.is_empty() {
            return;
        }
        for (peer, relinked) in returned {
            if !relinked && self.is_linked(&peer) {
                // QUIC has not timed the old connection out yet: close it, so that the dial
                // below reaches the new instance.
                self.push(Output::Close {
                    peer: peer.clone(),
                    reason: "the peer restarted".into(),
                });
                self.handle_link_down(now, &peer, "the peer restarted");
            }
            let grace = self.dial_grace(&peer);
            let min = self.cfg.timing.dial_backoff_min;
            if let Some(d) = self.dialing.get_mut(&peer) {
                // A dial still in flight went to the dead instance and may hang until it times
                // out: dial again (the transport keeps one connection if both succeed).
                d.in_flight = false;
                d.backoff = min;
                d.next = d.next.min(now + grace);
            }
        }
        self.dial_wanted(now);
    }

    /// Whether this gateway is the one of its site that passes `name`'s record across the
    /// site boundary: the rendezvous choice among the site's gateways it sees up (itself, and
    /// those it is linked to that its site ring does not hold dead).
    fn forwards(&self, name: &NodeName) -> bool {
        let me = &self.cfg.me.name;
        let up = self
            .table
            .gateways_of(&self.cfg.me.site)
            .filter(|g| g.state == RecordState::Alive)
            .map(|g| &g.name)
            .filter(|g| {
                *g == me
                    || (self.is_linked(g) && self.site_ring.liveness(g) != Some(Liveness::Dead))
            });
        rendezvous(name.as_str(), up).is_none_or(|g| g == *me)
    }

    fn handle_own_record(&mut self, now: Time, r: Arc<NodeRecord>) {
        let mine = self.clock();
        if r.clock < mine {
            return;
        }
        if r.is_tombstone() && !self.cfg.rejoin {
            if self.forgotten {
                return;
            }
            self.forgotten = true;
            self.table.merge(r.clone());
            self.push(Output::Persist);
            let reason = format!(
                "this node was forgotten by an operator (tombstone at clock {}); restart it with --rejoin to bring it back",
                r.clock
            );
            self.event(
                now,
                EventKind::NodeForgotten,
                Some(self.cfg.me.name.clone()),
                None,
                reason.clone(),
            );
            let peers: Vec<NodeName> = self.links.keys().cloned().collect();
            for p in peers {
                self.push(Output::Close {
                    peer: p,
                    reason: "forgotten".into(),
                });
            }
            self.push(Output::Fatal(reason));
            return;
        }
        // A record of ours from an earlier life is at or above our clock: come back above it.
        let from = mine;
        self.raise_clock(now, r.clock + 1);
        self.event(
            now,
            EventKind::ClockRaised,
            Some(self.cfg.me.name.clone()),
            None,
            format!(
                "peers knew this node at clock {}: clock {} -> {}",
                r.clock,
                from,
                self.clock()
            ),
        );
    }

    fn on_forgotten(&mut self, now: Time, name: &NodeName) {
        self.event(
            now,
            EventKind::NodeForgotten,
            Some(name.clone()),
            None,
            format!("{name} was forgotten by an operator"),
        );
        self.dialing.remove(name);
        if self.links.get(name).is_some_and(|l| l.up) {
            self.push(Output::Close {
                peer: name.clone(),
                reason: "forgotten".into(),
            });
        }
        if self.links.remove(name).is_some() {
            self.links_generation += 1;
        }
        self.announced.remove(name);
    }

    // ----- our own record ---------------------------------------------------------------------

    fn own(&self) -> NodeRecord {
        self.table
            .get(self.cfg.me.name.as_str())
            .cloned()
            .unwrap_or_else(|| {
                NodeRecord::new(
                    &self.cfg.me,
                    1,
                    self.cfg.addr.clone(),
                    self.cfg.contract.hash().to_string(),
                    self.cfg.version.clone(),
                    self.cfg.secure,
                )
            })
    }

    fn raise_clock(&mut self, now: Time, to: u64) {
        let mut own = self.own();
        if to <= own.clock {
            return;
        }
        own.clock = to;
        self.write_own(now, own);
    }

    /// Our record changed: it is in the table (and persisted) at once; peers get it at the
    /// next tick, so a burst of changes (every link of a cold start coming up) goes out as one
    /// version instead of one per change.
    fn write_own(&mut self, now: Time, own: NodeRecord) {
        self.table.put_own(own);
        self.push(Output::Persist);
        self.last_rtt_refresh = now;
        for l in self.links.values_mut() {
            l.reported_rtt_us = l.rtt_us;
            l.reset_rtt_window();
        }
        self.own_unsent = true;
    }

    /// Sends our record to every linked peer if it changed since it was last sent.
    fn flush_own(&mut self) {
        if !self.own_unsent {
            return;
        }
        self.own_unsent = false;
        let own = match self.table.get_shared(self.cfg.me.name.as_str()) {
            Some(r) => r.clone(),
            None => Arc::new(self.own()),
        };
        let targets: Vec<NodeName> = self
            .links
            .iter()
            .filter(|(_, l)| l.up)
            .map(|(n, _)| n.clone())
            .collect();
        for t in targets {
            self.push(Output::Send {
                to: t,
                frame: Frame::Records(vec![own.clone()]),
            });
        }
    }

    /// Recomputes the dynamic parts of our record (links, reach, view) and publishes it with a
    /// higher clock if anything changed.
    fn refresh_own(&mut self, now: Time, force: bool) {
        if self.forgotten {
            return;
        }
        let mut own = self.own();
        let wall = |t: Time| self.cfg.wall_base_ms + t.as_millis() as u64;
        let mut links: Vec<LinkReport> = Vec::new();
        for (name, l) in &self.links {
            links.push(LinkReport {
                peer: name.clone(),
                state: if !l.up {
                    LinkState::Down
                } else if l.contract_hash != self.cfg.contract.hash() {
                    LinkState::Drift
                } else {
                    LinkState::Up
                },
                rtt_us: l.rtt_us,
                since_ms: wall(l.since),
                secure: l.secure,
                reason: l.reason.clone(),
                key: l.key,
            });
        }
        for (name, d) in &self.direction {
            let Some(since) = d.one_way_since else {
                continue;
            };
            if self.links.get(name).is_some_and(|l| l.up) || self.refused.contains_key(name) {
                continue;
            }
            // Our own kernel refusing our sends is the cause to show, not only its effect.
            let local = self
                .links
                .get(name)
                .and_then(|l| l.reason.as_deref())
                .filter(|r| r.starts_with(LOCAL_SEND_ERROR))
                .map_or_else(String::new, |r| format!(" ({r})"));
            links.retain(|x| &x.peer != name);
            links.push(LinkReport {
                peer: name.clone(),
                state: LinkState::OneWay,
                rtt_us: 0,
                since_ms: wall(since),
                secure: self.cfg.secure,
                reason: Some(format!(
                    "one-way: {name} -> {me} gets through, {me} -> {name} does not{local}",
                    me = self.cfg.me.name
                )),
                key: None,
            });
        }
        for (name, r) in &self.refused {
            if self.links.get(name).is_some_and(|l| l.up) {
                continue;
            }
            links.retain(|x| &x.peer != name);
            links.push(LinkReport {
                peer: name.clone(),
                state: LinkState::Refused,
                rtt_us: 0,
                since_ms: wall(r.since),
                secure: self.cfg.secure,
                reason: Some(r.reason.clone()),
                key: None,
            });
        }
        links.sort_by(|a, b| a.peer.cmp(&b.peer));
        links.truncate(crate::table::MAX_LINKS);
        let (reach, view) = if self.cfg.me.role == Role::Gateway {
            let reach: BTreeSet<SiteName> = self.wan_reach().cloned().collect();
            let mut view: Vec<(NodeName, Liveness)> = self
                .site_ring
                .members()
                .filter(|(n, _)| {
                    self.table
                        .get(n.as_str())
                        .is_some_and(|r| r.site == self.cfg.me.site)
                })
                .map(|(n, l)| (n.clone(), l))
                .collect();
            view.push((self.cfg.me.name.clone(), Liveness::Alive));
            view.sort();
            view.truncate(crate::table::MAX_VIEW);
            (reach.into_iter().collect::<Vec<_>>(), view)
        } else {
            (Vec::new(), Vec::new())
        };
        let state = if self.leaving {
            RecordState::Left
        } else {
            RecordState::Alive
        };
        // RTTs alone do not justify a new clock, unless they moved a lot and a while has passed.
        let strip = |v: &[LinkReport]| -> Vec<LinkReport> {
            v.iter()
                .map(|l| LinkReport {
                    rtt_us: 0,
                    ..l.clone()
                })
                .collect()
        };
        let keys = self.keyring.ids();
        let links_changed = strip(&own.links) != strip(&links);
        let others_changed = own.keys != keys
            || own.cert != self.cert
            || own.reach != reach
            || own.view != view
            || own.state != state;
        let structural = links_changed || others_changed;
        // Once per window: did some link's RTT move for the whole window? Then a new window.
        let rtt_moved = now.saturating_sub(self.last_rtt_refresh) >= self.cfg.timing.rtt_refresh
            && {
                self.last_rtt_refresh = now;
                let moved = self.links.values().any(Link::rtt_moved);
                for l in self.links.values_mut() {
                    l.reset_rtt_window();
                }
                moved
            };
        if !(structural || rtt_moved || force) {
            self.links_grown = None;
            return;
        }
        // A record never published yet (a first start) goes out at once.
        let published = self.table.get(self.cfg.me.name.as_str()).is_some();
        if published
            && links_changed
            && !others_changed
            && !rtt_moved
            && !force
            && only_new_up(&own.links, &links)
        {
            // Only new links: publish once they settle. Each node waits the settle time plus
            // its own random share of it, so that after a cold start the settled records of a
            // whole cluster do not all go out in the same instant (10,000 nodes publishing at
            // once put 10^8 record deliveries in flight together).
            let (first, last, settle) = match self.links_grown {
                Some((n, first, last, settle)) if n == links.len() => (first, last, settle),
                Some((_, first, _, settle)) => (first, now, settle),
                None => {
                    let base = self.cfg.timing.link_settle;
                    let jitter = base.mul_f64(self.rng.random::<f64>());
                    (now, now, base + jitter)
                }
            };
            self.links_grown = Some((links.len(), first, last, settle));
            if now.saturating_sub(last) < settle && now.saturating_sub(first) < settle * 4 {
                return;
            }
        }
        self.links_grown = None;
        own.links = links;
        own.keys = keys;
        own.cert = self.cert.clone();
        own.reach = reach;
        own.view = view;
        own.state = state;
        own.clock += 1;
        self.write_own(now, own);
    }

    // ----- failure detection ------------------------------------------------------------------

    fn drain_rings(&mut self, now: Time) {
        let mut changed = false;
        for ring in [Ring::Site, Ring::Wan] {
            let (sends, changes) = match ring {
                Ring::Site => (self.site_ring.take_sends(), self.site_ring.take_changes()),
                Ring::Wan => match self.wan_ring.as_mut() {
                    Some(w) => (w.take_sends(), w.take_changes()),
                    None => continue,
                },
            };
            if ring == Ring::Site {
                for c in &changes {
                    if c.from == Some(Liveness::Dead) && c.to == Liveness::Alive {
                        self.revived.insert(c.name.clone(), now);
                    } else if c.to == Liveness::Dead {
                        self.revived.remove(&c.name);
                    }
                }
            }
            for (to, data) in sends {
                let ok_kind = match ring {
                    Ring::Site => LinkKind::Site,
                    Ring::Wan => LinkKind::Wan,
                };
                if self
                    .links
                    .get(&to)
                    .is_some_and(|l| l.up && l.kind == ok_kind)
                {
                    self.push(Output::Datagram {
                        to,
                        bytes: encode_swim(ring, &data),
                    });
                } else {
                    self.counters.datagrams_dropped += 1;
                }
            }
            changed |= !changes.is_empty();
            if ring == Ring::Site {
                self.status_basis
                    .ring
                    .extend(changes.into_iter().map(|c| c.name));
            }
        }
        if changed {
            self.refresh_own(now, false);
            // A gateway's view is how other sites learn that a node of its site is alive or
            // dead: the first change in a tick goes out at once, later ones with the tick (so
            // a cold start, where the view changes with every member, still coalesces).
            if self.cfg.me.role == Role::Gateway
                && now.saturating_sub(self.view_flushed) >= self.cfg.timing.tick
            {
                self.view_flushed = now;
                self.flush_own();
            }
            self.diff_statuses(now);
        }
    }

    /// Whether this node currently has a path to site `site`.
    pub fn site_reachable(&self, site: &SiteName) -> bool {
        if *site == self.cfg.me.site {
            return true;
        }
        if self.wan_reach().any(|s| s == site) {
            return true;
        }
        self.local_gateways_reaching(site).next().is_some()
    }

    /// The sites a gateway reaches over its own WAN links: links up whose far gateway the WAN
    /// ring does not hold dead. A link the ring already declared dead still looks up until its
    /// transport times out (longer when only our sends are lost: the far end's packets keep it
    /// alive); the `reach` our record publishes, which our members go by, drops it at once, and so
    /// must our own view. Empty for a member.
    fn wan_reach(&self) -> impl Iterator<Item = &SiteName> + '_ {
        let gateway = self.cfg.me.role == Role::Gateway;
        self.links
            .values()
            .filter(move |l| gateway && l.up && l.kind == LinkKind::Wan)
            .filter(|l| {
                self.wan_ring
                    .as_ref()
                    .and_then(|w| w.liveness(&l.ident.name))
                    .is_none_or(|lv| lv != Liveness::Dead)
            })
            .map(|l| &l.ident.site)
    }

    /// Live gateways of our own site (other than us) that report reaching `site`.
    fn local_gateways_reaching<'a>(
        &'a self,
        site: &'a SiteName,
    ) -> impl Iterator<Item = &'a NodeName> + 'a {
        self.links
            .iter()
            .filter(move |(n, l)| {
                l.up && l.kind == LinkKind::Site
                    && l.ident.role == Role::Gateway
                    && self.site_ring.liveness(n) != Some(Liveness::Dead)
                    && self
                        .table
                        .get(n.as_str())
                        .is_some_and(|r| r.reach.contains(site))
            })
            .map(|(n, _)| n)
    }

    /// The status of `name` as this node last reported it (in events): [`Engine::status_of`]
    /// as of the last tick or failure-detector change, read without computing anything.
    pub fn reported_status(&self, name: &NodeName) -> Option<NodeStatus> {
        self.statuses.get(name).copied()
    }

    /// How many nodes this node last reported as `status`.
    pub fn reported_count(&self, status: NodeStatus) -> usize {
        self.statuses.values().filter(|s| **s == status).count()
    }

    /// The status of `name` as this node sees it.
    pub fn status_of(&self, name: &NodeName) -> NodeStatus {
        self.status_with(name, None)
    }

    /// Checks that what the engine keeps up to date incrementally (the statuses it reports
    /// events from, the links it wants) equals the same computed from scratch, wherever it is
    /// current. For simulations and tests: it costs a pass over the whole table.
    pub fn check_caches(&self) -> Result<(), String> {
        if self.statuses_current(&self.reachable_sites()) {
            for (name, s) in self.statuses() {
                let held = self.statuses.get(&name).copied();
                if held != Some(s) && !(held.is_none() && s == NodeStatus::Unknown) {
                    return Err(format!(
                        "{}: status of {name} held as {held:?}, computed {s:?}",
                        self.cfg.me.name
                    ));
                }
            }
        }
        if self.wanted.0 == self.table.generation() {
            let mut held = self.wanted.1.clone();
            self.add_wanted_seeds(&mut held);
            let computed: BTreeMap<NodeName, String> = self.wanted_links().into_iter().collect();
            if held != computed {
                return Err(format!(
                    "{}: wanted links held as {:?}, computed {:?}",
                    self.cfg.me.name,
                    held.keys().collect::<Vec<_>>(),
                    computed.keys().collect::<Vec<_>>()
                ));
            }
        }
        Ok(())
    }

    /// The status of every node in the table (but this one) as this node sees it: the same
    /// answers as [`Engine::status_of`], computed in one pass (each remote site's reachability
    /// and gateway views are read once, not once per node).
    pub fn statuses(&self) -> BTreeMap<NodeName, NodeStatus> {
        let mut cache = SiteCache::default();
        self.table
            .iter()
            .filter(|r| r.name != self.cfg.me.name)
            .map(|r| (r.name.clone(), self.status_with(&r.name, Some(&mut cache))))
            .collect()
    }

    fn status_with(&self, name: &NodeName, cache: Option<&mut SiteCache>) -> NodeStatus {
        if *name == self.cfg.me.name {
            return if self.leaving {
                NodeStatus::Left
            } else {
                NodeStatus::Alive
            };
        }
        let Some(r) = self.table.get(name.as_str()) else {
            return NodeStatus::Unknown;
        };
        match r.state {
            RecordState::Forgotten => return NodeStatus::Forgotten,
            RecordState::Left => return NodeStatus::Left,
            RecordState::Alive if self.left_peers.contains(name) => return NodeStatus::Left,
            RecordState::Alive => {}
        }
        if r.site == self.cfg.me.site {
            return match self.site_ring.liveness(name) {
                Some(Liveness::Alive) => NodeStatus::Alive,
                Some(Liveness::Suspect) => NodeStatus::Suspect,
                Some(Liveness::Dead) => NodeStatus::Dead,
                None => NodeStatus::Unknown,
            };
        }
        let view = match cache {
            Some(cache) => {
                let site = cache
                    .0
                    .entry(r.site.clone())
                    .or_insert_with(|| self.site_facts(&r.site));
                if !site.reachable {
                    return NodeStatus::Unreachable;
                }
                site.views.get(name).copied()
            }
            None => {
                if !self.site_reachable(&r.site) {
                    return NodeStatus::Unreachable;
                }
                self.remote_view(&r.site, name)
            }
        };
        match view {
            Some(Liveness::Alive) => NodeStatus::Alive,
            Some(Liveness::Suspect) => NodeStatus::Suspect,
            Some(Liveness::Dead) => NodeStatus::Dead,
            None => NodeStatus::Unknown,
        }
    }

    /// What the gateways of `site` report about `name`. Views of gateways that another gateway
    /// of the site reports dead are ignored (they are stale), unless that leaves none.
    fn remote_view(&self, site: &SiteName, name: &NodeName) -> Option<Liveness> {
        self.trusted_gateways(site)
            .iter()
            .filter_map(|g| g.view.iter().find(|(n, _)| n == name).map(|(_, l)| *l))
            .min()
    }

    /// The gateways of `site` whose views count (see [`Engine::remote_view`]).
    fn trusted_gateways(&self, site: &SiteName) -> Vec<&NodeRecord> {
        let gws: Vec<&NodeRecord> = self
            .table
            .gateways_of(site)
            .filter(|g| {
                !g.is_tombstone()
                    && g.site == *site
                    && g.role == Role::Gateway
                    && g.state == RecordState::Alive
            })
            .collect();
        let dead_by_peer = |g: &NodeRecord| {
            gws.iter().any(|o| {
                o.name != g.name
                    && o.view
                        .iter()
                        .any(|(n, l)| *n == g.name && *l == Liveness::Dead)
            })
        };
        let trusted: Vec<&NodeRecord> = gws.iter().copied().filter(|g| !dead_by_peer(g)).collect();
        if trusted.is_empty() {
            gws
        } else {
            trusted
        }
    }

    /// Reachability of `site` and what its trusted gateways report about each of its nodes (for
    /// each node, the first entry of each gateway's view, the worst across gateways: exactly
    /// what [`Engine::remote_view`] answers node by node).
    fn site_facts(&self, site: &SiteName) -> SiteFacts {
        let reachable = self.site_reachable(site);
        let mut views: BTreeMap<NodeName, Liveness> = BTreeMap::new();
        if reachable {
            for g in self.trusted_gateways(site) {
                let mut seen: BTreeSet<&NodeName> = BTreeSet::new();
                for (n, l) in &g.view {
                    if !seen.insert(n) {
                        continue;
                    }
                    views
                        .entry(n.clone())
                        .and_modify(|cur| *cur = (*cur).min(*l))
                        .or_insert(*l);
                }
            }
        }
        SiteFacts { reachable, views }
    }

    /// The remote sites this node has a path to: over its own WAN links (a gateway), or through
    /// a live gateway of its site that reports reaching them ([`Engine::site_reachable`] for
    /// every site at once).
    fn reachable_sites(&self) -> BTreeSet<SiteName> {
        let me = &self.cfg.me;
        let mut out: BTreeSet<SiteName> = self.wan_reach().cloned().collect();
        for (n, l) in self.links.iter().filter(|(_, l)| l.up) {
            if l.kind == LinkKind::Site
                && l.ident.role == Role::Gateway
                && self.site_ring.liveness(n) != Some(Liveness::Dead)
            {
                if let Some(r) = self.table.get(n.as_str()) {
                    out.extend(r.reach.iter().cloned());
                }
            }
        }
        out.remove(&me.site);
        out
    }

    /// Whether the statuses held are those of the current state, with `reachable` the current
    /// [`Engine::reachable_sites`].
    fn statuses_current(&self, reachable: &BTreeSet<SiteName>) -> bool {
        let b = &self.status_basis;
        b.valid
            && b.table == self.table.generation()
            && b.left_peers == self.left_peers_generation
            && b.leaving == self.leaving
            && b.ring.is_empty()
            && b.reachable == *reachable
    }

    /// The nodes whose status may have moved since the last computation, or None when any may
    /// have (or when so many may have that one pass over the table is cheaper).
    ///
    /// A status reads the node's record, the site ring (our site), and for a node of another
    /// site whether that site is reachable and what its gateways' records report. So it can
    /// move only for a node whose record changed, a node of our site whose ring liveness
    /// changed, and every node of a remote site whose reachability flipped or one of whose
    /// gateways' records changed. Left peers and our own leaving move everything (both rare).
    fn stale_statuses(&self, reachable: &BTreeSet<SiteName>) -> Option<BTreeSet<NodeName>> {
        let b = &self.status_basis;
        if !b.valid || b.left_peers != self.left_peers_generation || b.leaving != self.leaving {
            return None;
        }
        let changed = self.table.changed_since(b.table);
        if (changed.len() + b.ring.len()) * 4 > self.table.len() {
            return None;
        }
        let mut names: BTreeSet<NodeName> = b.ring.clone();
        let mut sites: BTreeSet<&SiteName> = b.reachable.symmetric_difference(reachable).collect();
        for r in changed {
            if r.role == Role::Gateway && r.site != self.cfg.me.site {
                sites.insert(&r.site);
            }
            names.insert(r.name.clone());
        }
        if !sites.is_empty() {
            names.extend(
                self.table
                    .iter()
                    .filter(|r| sites.contains(&r.site))
                    .map(|r| r.name.clone()),
            );
        }
        names.remove(&self.cfg.me.name);
        Some(names)
    }

    /// Brings the statuses up to date and emits an event for each that moved. Costs the nodes
    /// whose status may have moved ([`Engine::stale_statuses`]), not the table.
    fn diff_statuses(&mut self, now: Time) {
        let reachable = self.reachable_sites();
        if self.statuses_current(&reachable) {
            return;
        }
        let current: Vec<(NodeName, NodeStatus)> = match self.stale_statuses(&reachable) {
            Some(names) => {
                let mut cache = SiteCache::default();
                names
                    .into_iter()
                    .map(|n| {
                        let s = self.status_with(&n, Some(&mut cache));
                        (n, s)
                    })
                    .collect()
            }
            None => self.statuses().into_iter().collect(),
        };
        self.status_basis = StatusBasis {
            valid: true,
            table: self.table.generation(),
            left_peers: self.left_peers_generation,
            leaving: self.leaving,
            reachable,
            ring: BTreeSet::new(),
        };
        for (name, s) in current {
            let prev = self.statuses.insert(name.clone(), s);
            if prev == Some(s) || (prev.is_none() && s == NodeStatus::Unknown) {
                continue;
            }
            let kind = match s {
                NodeStatus::Alive => EventKind::NodeUp,
                NodeStatus::Suspect => EventKind::NodeSuspect,
                NodeStatus::Dead => EventKind::NodeDead,
                NodeStatus::Left => EventKind::NodeLeft,
                NodeStatus::Unreachable => EventKind::NodeUnreachable,
                NodeStatus::Forgotten => EventKind::NodeForgotten,
                // Never computed by `status_of` (only reports show it).
                NodeStatus::Unknown | NodeStatus::Refused => continue,
            };
            let site = self.table.get(name.as_str()).map(|r| r.site.clone());
            let why = match (s, &site) {
                (NodeStatus::Unreachable, Some(site)) => {
                    format!("no live path from {} to site {site}", self.cfg.me.name)
                }
                (NodeStatus::Dead, Some(site)) if *site == self.cfg.me.site => {
                    "failure detector of its site confirmed it dead".to_string()
                }
                (NodeStatus::Dead, Some(site)) => format!("gateways of site {site} report it dead"),
                (NodeStatus::Suspect, _) => "missed failure-detector probes".to_string(),
                _ => String::new(),
            };
            let reason = match prev {
                Some(p) => format!(
                    "{} -> {}{}{}",
                    p.as_str(),
                    s.as_str(),
                    if why.is_empty() { "" } else { ": " },
                    why
                ),
                None => format!(
                    "{}{}{}",
                    s.as_str(),
                    if why.is_empty() { "" } else { ": " },
                    why
                ),
            };
            self.event(now, kind, Some(name), None, reason);
        }
    }

    // ----- routing ----------------------------------------------------------------------------

    /// The next hop toward `dst`, or why there is none.
    pub fn next_hop(&self, dst: &NodeName) -> Result<NodeName, (PingFailure, String)> {
        if self.links.get(dst).is_some_and(|l| l.up) {
            return Ok(dst.clone());
        }
        let Some(r) = self.table.get(dst.as_str()).filter(|r| !r.is_tombstone()) else {
            return Err((
                PingFailure::UnknownNode,
                format!("{dst} is not in the node table"),
            ));
        };
        let me = &self.cfg.me;
        if r.site == me.site {
            let why = match self.links.get(dst) {
                Some(l) => l.reason.clone().unwrap_or_else(|| "link is down".into()),
                None => match self.refused.get(dst) {
                    Some(f) => f.reason.clone(),
                    None => "no link yet".into(),
                },
            };
            return Err((
                PingFailure::NoRoute,
                format!("no link from {} to {dst}: {why}", me.name),
            ));
        }
        if !self.contract_path_exists(&me.site, &r.site) {
            return Err((
                PingFailure::Refused,
                format!(
                    "the contract has no path from site {} to site {}",
                    me.site, r.site
                ),
            ));
        }
        if me.role == Role::Gateway {
            // A gateway of the target site we are linked to.
            let direct = self
                .links
                .iter()
                .filter(|(_, l)| l.up && l.kind == LinkKind::Wan && l.ident.site == r.site)
                .map(|(n, _)| n);
            if let Some(g) = self.best_hop(dst, direct) {
                return Ok(g);
            }
            // Another WAN gateway that reaches the target site.
            let via = self
                .links
                .iter()
                .filter(|(n, l)| {
                    l.up && l.kind == LinkKind::Wan
                        && self
                            .table
                            .get(n.as_str())
                            .is_some_and(|g| g.reach.contains(&r.site))
                })
                .map(|(n, _)| n);
            if let Some(g) = self.best_hop(dst, via) {
                return Ok(g);
            }
        }
        if let Some(g) = self.best_hop(dst, self.local_gateways_reaching(&r.site)) {
            return Ok(g);
        }
        Err((
            PingFailure::NoRoute,
            format!(
                "no live gateway of site {} reaches site {}",
                me.site, r.site
            ),
        ))
    }

    /// How healthy a candidate next hop looks from here, worst of every view we have: its site
    /// ring (same site), the view its own site's gateways publish (other sites) and the WAN
    /// ring (gateways). 0 alive, 1 suspect, 2 dead.
    fn hop_rank(&self, n: &NodeName) -> u8 {
        let Some(r) = self.table.get(n.as_str()) else {
            return 0;
        };
        let mut worst = Liveness::Alive;
        let mut consider = |l: Option<Liveness>| {
            if let Some(l) = l {
                worst = worst.max(l);
            }
        };
        if r.site == self.cfg.me.site {
            consider(self.site_ring.liveness(n));
        } else {
            consider(self.remote_view(&r.site, n));
        }
        if r.role == Role::Gateway {
            consider(self.wan_ring.as_ref().and_then(|w| w.liveness(n)));
        }
        match worst {
            Liveness::Alive => 0,
            Liveness::Suspect => 1,
            Liveness::Dead => 2,
        }
    }

    /// The next hop among `candidates`: never a dead one, alive ones before suspected ones, and
    /// among equals a rendezvous-hash choice on the destination (stable, spread, fails over).
    fn best_hop<'a>(
        &self,
        dst: &NodeName,
        candidates: impl Iterator<Item = &'a NodeName>,
    ) -> Option<NodeName> {
        let ranked: Vec<(u8, &NodeName)> = candidates
            .map(|n| (self.hop_rank(n), n))
            .filter(|(rank, _)| *rank < 2)
            .collect();
        let best = ranked.iter().map(|(rank, _)| *rank).min()?;
        rendezvous(
            dst.as_str(),
            ranked
                .iter()
                .filter(|(rank, _)| *rank == best)
                .map(|(_, n)| *n),
        )
    }

    fn contract_path_exists(&self, from: &SiteName, to: &SiteName) -> bool {
        let mut seen = BTreeSet::new();
        let mut queue = VecDeque::from([from.clone()]);
        while let Some(s) = queue.pop_front() {
            if s == *to {
                return true;
            }
            if !seen.insert(s.clone()) {
                continue;
            }
            for n in self.cfg.contract.neighbours(&s) {
                if !seen.contains(n) {
                    queue.push_back(n.clone());
                }
            }
        }
        false
    }

    fn link_rtt(&self, peer: &NodeName) -> u32 {
        self.links.get(peer).map_or(0, |l| l.rtt_us)
    }

    /// Sends a message we originate. Failures to route are answered locally.
    fn originate(&mut self, now: Time, dst: NodeName, id: u64, body: Body, direct_only: bool) {
        let env = Envelope {
            id,
            src: self.cfg.me.name.clone(),
            dst: dst.clone(),
            ttl: HOP_LIMIT,
            trace: Vec::new(),
            body,
        };
        if dst == self.cfg.me.name {
            self.deliver(now, env);
            return;
        }
        let hop = if direct_only {
            if self.links.get(&dst).is_some_and(|l| l.up) {
                Ok(dst.clone())
            } else {
                let why = self
                    .links
                    .get(&dst)
                    .and_then(|l| l.reason.clone())
                    .or_else(|| self.refused.get(&dst).map(|r| r.reason.clone()))
                    .unwrap_or_else(|| "no link".into());
                Err((
                    PingFailure::NoRoute,
                    format!("link {} -> {dst} is not up: {why}", self.cfg.me.name),
                ))
            }
        } else {
            self.next_hop(&dst)
        };
        self.forward_or_bounce(now, env, hop);
    }

    fn forward_or_bounce(
        &mut self,
        now: Time,
        mut env: Envelope,
        hop: Result<NodeName, (PingFailure, String)>,
    ) {
        match hop {
            Ok(next) => {
                let rtt = self.link_rtt(&next);
                env.trace.push(Hop {
                    node: self.cfg.me.name.clone(),
                    rtt_us: rtt,
                });
                self.send_routed(next, env);
            }
            Err((failure, reason)) => {
                self.counters.routed_undeliverable += 1;
                if matches!(env.body, Body::Undeliverable { .. }) {
                    return; // never bounce a bounce
                }
                let mut trace = env.trace.clone();
                trace.push(Hop {
                    node: self.cfg.me.name.clone(),
                    rtt_us: 0,
                });
                let bounce = Body::Undeliverable {
                    id: env.id,
                    at: self.cfg.me.name.clone(),
                    failure: failure.into(),
                    reason,
                    trace,
                };
                if env.src == self.cfg.me.name {
                    let b = Envelope {
                        id: env.id,
                        src: self.cfg.me.name.clone(),
                        dst: env.src.clone(),
                        ttl: 0,
                        trace: Vec::new(),
                        body: bounce,
                    };
                    self.deliver(now, b);
                } else {
                    let id = env.id;
                    self.originate(now, env.src, id, bounce, false);
                }
            }
        }
    }

    /// Sends a routed envelope on the link to `next` (counted as forwarded).
    fn send_routed(&mut self, next: NodeName, env: Envelope) {
        self.counters.routed_forwarded += 1;
        self.push(Output::Send {
            to: next,
            frame: Frame::Routed(env),
        });
    }

    /// A routed envelope reached this node: the forwarding rule ([`routing::transit`]) decides.
    fn handle_routed(&mut self, now: Time, _from: &NodeName, mut env: Envelope) {
        let me = self.cfg.me.name.clone();
        let verdict = routing::transit(&me, &env, |dst| {
            self.next_hop(dst).map(|hop| {
                let rtt = self.link_rtt(&hop);
                (hop, rtt)
            })
        });
        match verdict {
            routing::Verdict::Deliver => self.deliver(now, env),
            routing::Verdict::Forward { hop, rtt_us } => {
                routing::spend_hop(&me, &mut env, rtt_us);
                self.send_routed(hop, env);
            }
            routing::Verdict::Undeliverable(failure, reason) => {
                self.forward_or_bounce(now, env, Err((failure, reason)));
            }
        }
    }

    fn deliver(&mut self, now: Time, mut env: Envelope) {
        env.trace.push(Hop {
            node: self.cfg.me.name.clone(),
            rtt_us: 0,
        });
        match env.body {
            Body::EchoRequest { seq } => {
                // The built-in `echo` process.
                let id = env.id;
                self.originate(
                    now,
                    env.src.clone(),
                    id,
                    Body::EchoReply {
                        seq,
                        forward: env.trace,
                    },
                    false,
                );
            }
            Body::EchoReply { seq, forward } => self.echo_answered(now, env.id, seq, Ok(forward)),
            Body::Undeliverable {
                id,
                at,
                failure,
                reason,
                trace,
            } => {
                let failure = failure.into();
                if self.echoes.contains_key(&id) {
                    let seq = self.echoes.get(&id).map_or(0, |e| e.seq);
                    self.echo_answered(now, id, seq, Err((failure, at, reason, trace)));
                } else if self.calls.contains_key(&id) {
                    self.call_failed(now, id, failure, at.to_string(), reason);
                }
            }
            Body::Call { call } => self.handle_call(now, env.src, env.id, call),
            Body::CallReply { reply } => self.call_answered(now, env.id, reply),
            Body::Message { process, payload } => {
                if process == SINK {
                    self.sink_count(env.src, payload.len() as u64);
                } else {
                    self.counters.messages_refused += 1;
                    let me = self.cfg.me.name.clone();
                    let reason = format!("no process named {process:?} runs on {me}");
                    env.body = Body::Message {
                        process,
                        payload: Vec::new(),
                    };
                    self.forward_or_bounce(now, env, Err((PingFailure::Refused, short(&reason))));
                }
            }
        }
    }

    // ----- the sink process -------------------------------------------------------------------

    fn sink_count(&mut self, from: NodeName, bytes: u64) {
        self.counters.sink_messages += 1;
        self.counters.sink_bytes += bytes;
        let full = self.sink.per_sender.len() >= MAX_SINK_SENDERS;
        match self.sink.per_sender.get_mut(&from) {
            Some(c) => {
                c.0 += 1;
                c.1 += bytes;
            }
            None if full => self.sink.unattributed += 1,
            None => {
                self.sink.per_sender.insert(from, (1, bytes));
            }
        }
    }

    /// Sends a data message to `process` on `dst` along the routed path (bulk lane). A message
    /// that cannot be routed is counted in `routed_undeliverable`.
    pub fn send_message(&mut self, now: Time, dst: NodeName, process: String, payload: Vec<u8>) {
        let id = self.fresh_id();
        self.originate(now, dst, id, Body::Message { process, payload }, false);
    }

    /// Asks `from` to send a load to `target`'s sink, answered with [`Output::Reply`] carrying
    /// `token` and [`Reply::Load`] (a timeout after the load's own timeout and 10 s more).
    pub fn start_load_from(&mut self, now: Time, token: u64, from: NodeName, spec: LoadSpec) {
        let id = self.fresh_id();
        self.calls.insert(
            id,
            PendingCall {
                from: CallFrom::Local { token },
                deadline: now + Duration::from_millis(spec.timeout_ms) + Duration::from_secs(10),
                what: PendingWhat::Load { from: from.clone() },
            },
        );
        let call = Call::Load(spec);
        self.originate(now, from, id, Body::Call { call }, false);
    }

    /// A load asked for by another node ([`Output::RunLoad`]) finished.
    pub fn load_done(&mut self, now: Time, handle: u64, result: Result<LoadReport, String>) {
        if let Some(from) = self.loads.remove(&handle) {
            let result = result.map_err(|e| short(&e));
            self.finish(now, from, CallReply::Load(result.map(Into::into)));
        }
    }

    /// What this node's `sink` has counted; `reset` zeroes the counters after reading.
    pub fn sink_report(&mut self, reset: bool) -> SinkReport {
        let r = SinkReport {
            node: self.cfg.me.name.to_string(),
            senders: self
                .sink
                .per_sender
                .iter()
                .map(|(n, (m, b))| SinkCount {
                    from: n.to_string(),
                    messages: *m,
                    bytes: *b,
                })
                .collect(),
            unattributed: self.sink.unattributed,
        };
        if reset {
            self.sink = Sink::default();
        }
        r
    }

    /// Reads the `sink` counters of `target` (this node or another), answered with
    /// [`Output::Reply`] carrying `token` and [`Reply::Sink`].
    pub fn start_sink_read(
        &mut self,
        now: Time,
        token: u64,
        target: NodeName,
        reset: bool,
        timeout: Duration,
    ) {
        if target == self.cfg.me.name {
            let r = self.sink_report(reset);
            self.push(Output::Reply {
                token,
                reply: Reply::Sink(Ok(r)),
            });
            return;
        }
        let id = self.fresh_id();
        self.calls.insert(
            id,
            PendingCall {
                from: CallFrom::Local { token },
                deadline: now + timeout,
                what: PendingWhat::Sink {
                    target: target.clone(),
                },
            },
        );
        self.originate(
            now,
            target,
            id,
            Body::Call {
                call: Call::Sink { reset },
            },
            false,
        );
    }

    // ----- ping and probes --------------------------------------------------------------------

    /// Starts a ping from this node (`from` None or us) or from another node, answered with
    /// [`Output::Reply`] carrying `token`.
    pub fn start_ping(
        &mut self,
        now: Time,
        token: u64,
        from: Option<NodeName>,
        target: NodeName,
        count: u32,
        timeout: Duration,
    ) {
        let count = count.clamp(1, MAX_PING_COUNT);
        match from {
            Some(f) if f != self.cfg.me.name => {
                let id = self.fresh_id();
                let deadline = now + timeout * (count + 1) + Duration::from_secs(1);
                self.calls.insert(
                    id,
                    PendingCall {
                        from: CallFrom::Local { token },
                        deadline,
                        what: PendingWhat::Ping {
                            from: f.clone(),
                            target: target.clone(),
                        },
                    },
                );
                let timeout_ms = timeout.as_millis() as u64;
                self.originate(
                    now,
                    f,
                    id,
                    Body::Call {
                        call: Call::Ping {
                            target,
                            count,
                            timeout_ms,
                        },
                    },
                    false,
                );
            }
            _ => self.start_session(now, CallFrom::Local { token }, target, count, timeout),
        }
    }

    fn start_session(
        &mut self,
        now: Time,
        from: CallFrom,
        target: NodeName,
        count: u32,
        timeout: Duration,
    ) {
        if self.sessions.len() >= MAX_PING_SESSIONS {
            let me = self.cfg.me.name.clone();
            let report = self.failed_ping(
                &me,
                &target,
                PingFailure::NoRoute,
                me.to_string(),
                "too many pings in progress on this node".into(),
            );
            self.finish(now, from, CallReply::Ping(report.into()));
            return;
        }
        let id = self.fresh_id();
        self.sessions.insert(
            id,
            PingSession {
                from,
                target,
                count,
                timeout,
                attempts: Vec::new(),
                next_seq: 0,
                measuring: None,
            },
        );
        self.session_next(now, id);
    }

    fn session_next(&mut self, now: Time, session: u64) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        if s.next_seq >= s.count {
            let s = self.sessions.remove(&session).expect("present");
            let report = self.ping_report(&s);
            self.finish(now, s.from, CallReply::Ping(report.into()));
            return;
        }
        let seq = s.next_seq;
        s.next_seq += 1;
        let target = s.target.clone();
        let timeout = s.timeout;
        self.send_echo(
            now,
            target,
            seq,
            timeout,
            EchoOwner::Ping { session },
            false,
        );
    }

    fn send_echo(
        &mut self,
        now: Time,
        target: NodeName,
        seq: u32,
        timeout: Duration,
        owner: EchoOwner,
        direct: bool,
    ) {
        if self.echoes.len() >= MAX_PENDING_ECHOES {
            // Oldest first out: it will be reported as a timeout.
            if let Some((&oldest, _)) = self.echoes.iter().next() {
                self.expire_echo(now, oldest);
            }
        }
        let id = self.fresh_id();
        self.echoes.insert(
            id,
            PendingEcho {
                seq,
                target: target.clone(),
                sent: now,
                deadline: now + timeout,
                owner,
            },
        );
        self.originate(now, target, id, Body::EchoRequest { seq }, direct);
    }

    fn echo_answered(
        &mut self,
        now: Time,
        id: u64,
        seq: u32,
        result: Result<Vec<Hop>, (PingFailure, NodeName, String, Vec<Hop>)>,
    ) {
        let Some(p) = self.echoes.remove(&id) else {
            return;
        };
        let total_ms = now.saturating_sub(p.sent).as_secs_f64() * 1000.0;
        let attempt = match result {
            Ok(forward) => {
                let path: Vec<String> = forward.iter().map(|h| h.node.to_string()).collect();
                let hops_ms = forward[..forward.len().saturating_sub(1)]
                    .iter()
                    .map(|h| f64::from(h.rtt_us) / 1000.0)
                    .collect();
                PingAttempt {
                    seq,
                    ok: true,
                    path,
                    hops_ms,
                    total_ms,
                    failure: None,
                    broke_at: None,
                    reason: None,
                }
            }
            Err((failure, at, reason, trace)) => PingAttempt {
                seq,
                ok: false,
                path: trace.iter().map(|h| h.node.to_string()).collect(),
                hops_ms: trace[..trace.len().saturating_sub(1)]
                    .iter()
                    .map(|h| f64::from(h.rtt_us) / 1000.0)
                    .collect(),
                total_ms,
                failure: Some(failure),
                broke_at: Some(at.to_string()),
                reason: Some(reason),
            },
        };
        self.echo_done(now, p, attempt);
    }

    fn echo_done(&mut self, now: Time, p: PendingEcho, attempt: PingAttempt) {
        match p.owner {
            EchoOwner::Ping { session } => {
                let n = attempt.path.len();
                if attempt.ok && n > 2 {
                    // Measure each hop for real: echo every intermediate node of the path, then
                    // split the round trip into differences of cumulative round trips.
                    let Some(s) = self.sessions.get_mut(&session) else {
                        return;
                    };
                    let timeout = s.timeout;
                    let targets: Vec<(usize, String)> = attempt.path[1..n - 1]
                        .iter()
                        .cloned()
                        .enumerate()
                        .map(|(i, t)| (i + 1, t))
                        .collect();
                    let mut cum = vec![None; n];
                    cum[0] = Some(0.0);
                    cum[n - 1] = Some(attempt.total_ms);
                    s.measuring = Some(Measuring {
                        attempt,
                        cum,
                        waiting: targets.len(),
                    });
                    for (index, t) in targets {
                        match NodeName::new(t) {
                            Ok(t) => self.send_echo(
                                now,
                                t,
                                0,
                                timeout,
                                EchoOwner::Segment { session, index },
                                false,
                            ),
                            Err(_) => self.segment_done(now, session, index, None),
                        }
                    }
                } else {
                    let mut attempt = attempt;
                    if attempt.ok && n == 2 {
                        // One link: the hop is the measured round trip itself.
                        attempt.hops_ms = vec![attempt.total_ms];
                    }
                    if let Some(s) = self.sessions.get_mut(&session) {
                        s.attempts.push(attempt);
                    }
                    self.session_next(now, session);
                }
            }
            EchoOwner::Segment { session, index } => {
                self.segment_done(now, session, index, attempt.ok.then_some(attempt.total_ms));
            }
            EchoOwner::Probe { call, peer } => {
                let kind = self.link_kind_to(&peer);
                let result = ProbeResult {
                    from: self.cfg.me.name.to_string(),
                    to: peer.to_string(),
                    kind,
                    ok: attempt.ok,
                    rtt_ms: attempt.ok.then_some(attempt.total_ms),
                    error: attempt.reason,
                };
                self.finish(now, call, CallReply::Probe(result.into()));
            }
        }
    }

    fn segment_done(&mut self, now: Time, session: u64, index: usize, rtt_ms: Option<f64>) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let Some(m) = s.measuring.as_mut() else {
            return;
        };
        if let Some(slot) = m.cum.get_mut(index) {
            *slot = rtt_ms;
        }
        m.waiting = m.waiting.saturating_sub(1);
        if m.waiting > 0 {
            return;
        }
        let Some(mut m) = s.measuring.take() else {
            return;
        };
        // Hop k = RTT(origin -> node k+1) - RTT(origin -> node k). Measurements are taken a
        // moment apart, so a difference can come out slightly negative: clamp it at zero. A hop
        // whose end did not answer keeps the transport's RTT estimate of that link.
        for k in 0..m.attempt.hops_ms.len() {
            if let (Some(a), Some(b)) = (m.cum[k], m.cum[k + 1]) {
                m.attempt.hops_ms[k] = (b - a).max(0.0);
            }
        }
        s.attempts.push(m.attempt);
        self.session_next(now, session);
    }

    fn expire_echo(&mut self, now: Time, id: u64) {
        let Some(p) = self.echoes.remove(&id) else {
            return;
        };
        let path = vec![self.cfg.me.name.to_string()];
        let guess = self.next_hop(&p.target).ok();
        let reason = match &guess {
            Some(h) if *h == p.target => format!(
                "no answer from {} within {:?}",
                p.target,
                p.deadline - p.sent
            ),
            Some(h) => format!(
                "no answer within {:?}; the path leaves {} via {h}",
                p.deadline - p.sent,
                self.cfg.me.name
            ),
            None => format!("no answer within {:?}", p.deadline - p.sent),
        };
        let attempt = PingAttempt {
            seq: p.seq,
            ok: false,
            path,
            hops_ms: vec![],
            total_ms: now.saturating_sub(p.sent).as_secs_f64() * 1000.0,
            failure: Some(PingFailure::Timeout),
            broke_at: None,
            reason: Some(reason),
        };
        self.echo_done(now, p, attempt);
    }

    /// A ping that never got to send a probe: one failed attempt saying where and why.
    fn failed_ping(
        &self,
        from: &NodeName,
        target: &NodeName,
        failure: PingFailure,
        broke_at: String,
        reason: String,
    ) -> PingReport {
        PingReport {
            from: from.to_string(),
            target: target.to_string(),
            ok: false,
            secure: self.cfg.secure,
            sent: 0,
            received: 0,
            attempts: vec![PingAttempt {
                seq: 0,
                ok: false,
                path: vec![self.cfg.me.name.to_string()],
                hops_ms: vec![],
                total_ms: 0.0,
                failure: Some(failure),
                broke_at: Some(broke_at),
                reason: Some(reason),
            }],
            min_ms: None,
            p50_ms: None,
            max_ms: None,
        }
    }

    fn ping_report(&self, s: &PingSession) -> PingReport {
        let mut rtts: Vec<f64> = s
            .attempts
            .iter()
            .filter(|a| a.ok)
            .map(|a| a.total_ms)
            .collect();
        rtts.sort_by(f64::total_cmp);
        let received = rtts.len() as u32;
        PingReport {
            from: self.cfg.me.name.to_string(),
            target: s.target.to_string(),
            ok: received == s.count,
            secure: self.cfg.secure,
            sent: s.attempts.len() as u32,
            received,
            attempts: s.attempts.clone(),
            min_ms: rtts.first().copied(),
            p50_ms: rtts.get(rtts.len() / 2).copied(),
            max_ms: rtts.last().copied(),
        }
    }

    fn link_kind_to(&self, peer: &NodeName) -> LinkKind {
        match self.table.get(peer.as_str()) {
            Some(r) if r.site != self.cfg.me.site => LinkKind::Wan,
            _ => LinkKind::Site,
        }
    }

    /// Probes every expected link once (each from its lower-named end, directly over that link)
    /// and answers with [`Reply::Probes`].
    pub fn start_probe_links(&mut self, now: Time, token: u64, timeout: Duration) {
        let pairs = self.expected_links();
        let set = self.fresh_id();
        self.probe_sets.insert(
            set,
            ProbeSet {
                token,
                expected: pairs.len(),
                results: Vec::new(),
            },
        );
        if pairs.is_empty() {
            self.maybe_finish_probe_set(now, set);
            return;
        }
        for (a, b, kind) in pairs {
            if a == self.cfg.me.name {
                self.send_echo(
                    now,
                    b.clone(),
                    0,
                    timeout,
                    EchoOwner::Probe {
                        call: CallFrom::ProbeSet { set },
                        peer: b,
                    },
                    true,
                );
            } else {
                let id = self.fresh_id();
                self.calls.insert(
                    id,
                    PendingCall {
                        from: CallFrom::ProbeSet { set },
                        deadline: now + timeout * 2 + Duration::from_millis(500),
                        what: PendingWhat::Probe {
                            from: a.clone(),
                            to: b.clone(),
                            kind,
                        },
                    },
                );
                let timeout_ms = timeout.as_millis() as u64;
                self.originate(
                    now,
                    a,
                    id,
                    Body::Call {
                        call: Call::ProbeLink {
                            peer: b,
                            timeout_ms,
                        },
                    },
                    false,
                );
            }
        }
    }

    fn maybe_finish_probe_set(&mut self, now: Time, set: u64) {
        let done = self
            .probe_sets
            .get(&set)
            .is_some_and(|p| p.results.len() >= p.expected);
        if done {
            if let Some(mut p) = self.probe_sets.remove(&set) {
                p.results
                    .sort_by(|a, b| (&a.from, &a.to).cmp(&(&b.from, &b.to)));
                let _ = now;
                self.push(Output::Reply {
                    token: p.token,
                    reply: Reply::Probes(p.results),
                });
            }
        }
    }

    fn handle_call(&mut self, now: Time, src: NodeName, id: u64, call: Call) {
        let from = CallFrom::Remote { node: src, id };
        let cap = |ms: u64| Duration::from_millis(ms.clamp(1, 60_000));
        match call {
            Call::Ping {
                target,
                count,
                timeout_ms,
            } => self.start_session(now, from, target, count, cap(timeout_ms)),
            Call::ProbeLink { peer, timeout_ms } => self.send_echo(
                now,
                peer.clone(),
                0,
                cap(timeout_ms),
                EchoOwner::Probe { call: from, peer },
                true,
            ),
            Call::Sink { reset } => {
                let r = self.sink_report(reset);
                self.finish(now, from, CallReply::Sink(r.into()));
            }
            Call::Load(spec) => {
                if self.loads.len() >= MAX_PENDING_CALLS {
                    let why = format!("{} runs too many loads already", self.cfg.me.name);
                    self.finish(now, from, CallReply::Load(Err(why)));
                    return;
                }
                let handle = self.fresh_id();
                self.loads.insert(handle, from);
                self.push(Output::RunLoad { handle, spec });
            }
        }
    }

    fn finish(&mut self, now: Time, to: CallFrom, reply: CallReply) {
        match to {
            CallFrom::Local { token } => {
                let reply = match reply {
                    CallReply::Ping(p) => Reply::Ping(p.into()),
                    CallReply::Probe(p) => Reply::Probes(vec![p.into()]),
                    CallReply::Sink(r) => Reply::Sink(Ok(r.into())),
                    CallReply::Load(r) => Reply::Load(r.map(Into::into)),
                };
                self.push(Output::Reply { token, reply });
            }
            CallFrom::Remote { node, id } => {
                self.originate(now, node, id, Body::CallReply { reply }, false);
            }
            CallFrom::ProbeSet { set } => {
                if let (Some(p), CallReply::Probe(r)) = (self.probe_sets.get_mut(&set), reply) {
                    p.results.push(r.into());
                }
                self.maybe_finish_probe_set(now, set);
            }
        }
    }

    fn call_answered(&mut self, now: Time, id: u64, reply: CallReply) {
        if let Some(c) = self.calls.remove(&id) {
            self.finish(now, c.from, reply);
        }
    }

    fn call_failed(
        &mut self,
        now: Time,
        id: u64,
        failure: PingFailure,
        at: String,
        reason: String,
    ) {
        let Some(c) = self.calls.remove(&id) else {
            return;
        };
        let reply = match c.what {
            PendingWhat::Ping { from, target } => CallReply::Ping(
                self.failed_ping(
                    &from,
                    &target,
                    failure,
                    at,
                    format!("could not reach {from} to start the ping: {reason}"),
                )
                .into(),
            ),
            PendingWhat::Probe { from, to, kind } => CallReply::Probe(
                ProbeResult {
                    from: from.to_string(),
                    to: to.to_string(),
                    kind,
                    ok: false,
                    rtt_ms: None,
                    error: Some(format!(
                        "could not reach {from} to run the probe ({at}: {reason})"
                    )),
                }
                .into(),
            ),
            PendingWhat::Sink { target } => {
                if let CallFrom::Local { token } = c.from {
                    self.push(Output::Reply {
                        token,
                        reply: Reply::Sink(Err(format!(
                            "could not read the sink of {target} ({at}: {reason})"
                        ))),
                    });
                }
                return;
            }
            PendingWhat::Load { from } => {
                if let CallFrom::Local { token } = c.from {
                    self.push(Output::Reply {
                        token,
                        reply: Reply::Load(Err(format!(
                            "could not run the load on {from} ({at}: {reason})"
                        ))),
                    });
                }
                return;
            }
        };
        self.finish(now, c.from, reply);
    }

    fn expire_requests(&mut self, now: Time) {
        let due: Vec<u64> = self
            .echoes
            .iter()
            .filter(|(_, e)| e.deadline <= now)
            .map(|(i, _)| *i)
            .collect();
        for id in due {
            self.expire_echo(now, id);
        }
        let due: Vec<u64> = self
            .calls
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(i, _)| *i)
            .collect();
        for id in due {
            let me = self.cfg.me.name.to_string();
            self.call_failed(
                now,
                id,
                PingFailure::Timeout,
                me,
                "no answer in time".into(),
            );
        }
    }

    // ----- operator commands ------------------------------------------------------------------

    /// Writes a tombstone for `name` above every clock seen, and spreads it.
    /// Without `force`, a node this observer sees `alive` or `suspect` is not forgotten: the
    /// tombstone would make a running node exit and be refused everywhere.
    pub fn forget(&mut self, now: Time, name: &NodeName, force: bool) -> Result<u64, String> {
        if *name == self.cfg.me.name {
            return Err(format!(
                "{name} is the node answering this request: a node cannot forget itself; ask another node (--agent) to forget it"
            ));
        }
        let Some(r) = self.table.get(name.as_str()).cloned() else {
            return Err(format!("{name} is not in the node table"));
        };
        if r.is_tombstone() {
            return Ok(r.clock);
        }
        let status = self.status_of(name);
        if !force && matches!(status, NodeStatus::Alive | NodeStatus::Suspect) {
            return Err(format!(
                "{name} is {} as seen by {}: forgetting it would make the running node exit and be refused by every peer; stop it first, or pass --force if that is what you want",
                status.as_str(),
                self.cfg.me.name
            ));
        }
        let stone = Arc::new(NodeRecord::tombstone(&r, r.clock + 1));
        let clock = stone.clock;
        self.table.merge(stone.clone());
        self.push(Output::Persist);
        self.on_forgotten(now, name);
        self.statuses.insert(name.clone(), NodeStatus::Forgotten);
        let targets: Vec<NodeName> = self
            .links
            .iter()
            .filter(|(_, l)| l.up)
            .map(|(n, _)| n.clone())
            .collect();
        for t in targets {
            self.push(Output::Send {
                to: t,
                frame: Frame::Records(vec![stone.clone()]),
            });
        }
        self.refresh_own(now, false);
        Ok(clock)
    }

    /// Leaves gracefully: marks our record `left`, tells the rings and every peer.
    pub fn leave(&mut self, now: Time) {
        if self.leaving {
            return;
        }
        self.leaving = true;
        // The rings are not told: a failure-detector datagram would outrun the `left` record
        // (streams) and peers would report a death first. Peers learn from the record and the
        // `Leaving` frame; the rings then see us go quiet, and `left` wins over their verdict.
        self.refresh_own(now, true);
        // The `left` record goes out now, ahead of the `Leaving` frame.
        self.flush_own();
        let targets = self.linked_peers();
        for t in targets {
            self.push(Output::Send {
                to: t,
                frame: Frame::Leaving,
            });
        }
    }

    // ----- certificates -----------------------------------------------------------------------

    /// The certificate now in use changed (hot reload): publish it.
    pub fn set_cert(&mut self, now: Time, cert: Option<CertSummary>) {
        self.cert = cert;
        self.refresh_own(now, false);
    }

    fn days_left(&self, now: Time, not_after_ms: u64) -> i64 {
        let wall = self.wall_ms(now) as i64;
        (not_after_ms as i64 - wall).div_euclid(86_400_000)
    }

    /// Which certificate and CA every node presents, from the table.
    pub fn certs(&self, now: Time) -> clusterctl_api::CertsReport {
        let nodes: Vec<&NodeRecord> = self
            .table
            .live()
            .filter(|r| r.clock > 0 && r.state == RecordState::Alive)
            .collect();
        let view = |c: &CertSummary| clusterctl_api::CertSummaryView {
            leaf: c.leaf.clone(),
            issuer: c.issuer.clone(),
            trusts: c.trusts.clone(),
            not_before: format_rfc3339_ms(c.not_before_ms),
            not_after: format_rfc3339_ms(c.not_after_ms),
            days_left: self.days_left(now, c.not_after_ms),
        };
        let mut cas: BTreeSet<String> = BTreeSet::new();
        for r in &nodes {
            if let Some(c) = &r.cert {
                cas.extend(c.trusts.iter().cloned());
                cas.insert(c.issuer.clone());
            }
        }
        cas.remove("");
        clusterctl_api::CertsReport {
            observer: self.cfg.me.name.to_string(),
            nodes: nodes.len() as u32,
            node_certs: nodes
                .iter()
                .map(|r| clusterctl_api::NodeCertView {
                    name: r.name.to_string(),
                    site: r.site.to_string(),
                    role: r.role,
                    cert: r.cert.as_ref().map(view),
                })
                .collect(),
            cas: cas
                .into_iter()
                .map(|fp| clusterctl_api::CaView {
                    trusted_by: nodes
                        .iter()
                        .filter(|r| r.cert.as_ref().is_some_and(|c| c.trusts.contains(&fp)))
                        .count() as u32,
                    issued_for: nodes
                        .iter()
                        .filter(|r| r.cert.as_ref().is_some_and(|c| c.issuer == fp))
                        .count() as u32,
                    fingerprint: fp,
                })
                .collect(),
        }
    }

    /// Seeds whose configured address is not where the cluster knows that node to be: DNS drift
    /// (or a stale config). Nothing breaks while the table has the right address — links are
    /// dialed at the record's address — but a node starting with an empty table would dial the
    /// wrong host.
    pub fn seed_drift(&self) -> Vec<String> {
        self.cfg
            .seeds
            .iter()
            .filter_map(|(name, addr)| {
                let r = self.table.get(name.as_str()).filter(|r| r.clock > 0 && !r.is_tombstone())?;
                let known = r.addr == *addr || r.wan_addr.as_deref() == Some(addr.as_str());
                (!known).then(|| {
                    format!(
                        "DNS drift: seed {name} of {} resolves to {addr}, but the cluster knows {name} at {}: fix the name or the seed",
                        self.cfg.me.name, r.addr
                    )
                })
            })
            .collect()
    }

    /// Certificates in use that expire within the warning fraction of their lifetime, and
    /// those already expired.
    fn cert_warnings(&self, now: Time) -> (Vec<String>, Vec<String>) {
        let wall = self.wall_ms(now);
        let (mut warn, mut expired) = (Vec::new(), Vec::new());
        for r in self
            .table
            .live()
            .filter(|r| r.clock > 0 && r.state == RecordState::Alive)
        {
            let Some(c) = &r.cert else { continue };
            let life = c.not_after_ms.saturating_sub(c.not_before_ms);
            let left = c.not_after_ms.saturating_sub(wall);
            if c.not_after_ms <= wall {
                expired.push(format!(
                    "the certificate of {} expired on {}",
                    r.name,
                    format_rfc3339_ms(c.not_after_ms)
                ));
            } else if (left as f64) < life as f64 * self.cfg.cert_warn_fraction {
                warn.push(format!(
                    "the certificate of {} expires in {} days ({}), less than {:.0}% of its {}-day lifetime: issue a new one",
                    r.name,
                    self.days_left(now, c.not_after_ms),
                    format_rfc3339_ms(c.not_after_ms),
                    self.cfg.cert_warn_fraction * 100.0,
                    life / 86_400_000
                ));
            }
        }
        (warn, expired)
    }

    // ----- cluster secret ---------------------------------------------------------------------

    /// The secrets this node holds.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    fn keyring_changed(&mut self, now: Time, what: String) {
        self.event(
            now,
            EventKind::SecretChanged,
            Some(self.cfg.me.name.clone()),
            None,
            what,
        );
        self.refresh_own(now, false);
    }

    /// Adds a secret: accepted from peers from now on, not yet used to prove.
    pub fn install_key(&mut self, now: Time, secret: Secret) -> Result<bool, SecretError> {
        let id = secret.id();
        let changed = self.keyring.install(secret)?;
        if changed {
            self.keyring_changed(
                now,
                format!("installed key {id} (accepted, not yet in use)"),
            );
        }
        Ok(changed)
    }

    /// Proves with `id` from now on.
    pub fn use_key(&mut self, now: Time, id: KeyId) -> Result<bool, SecretError> {
        let changed = self.keyring.use_key(id)?;
        if changed {
            self.keyring_changed(now, format!("key {id} is now in use"));
        }
        Ok(changed)
    }

    /// Stops accepting `id` (it must not be the key in use).
    pub fn remove_key(&mut self, now: Time, id: KeyId) -> Result<(), SecretError> {
        self.keyring.remove(id)?;
        self.keyring_changed(now, format!("removed key {id}"));
        Ok(())
    }

    /// Which secrets the live nodes hold and use, from their records.
    pub fn secrets(&self) -> clusterctl_api::Secrets {
        let nodes: Vec<&NodeRecord> = self
            .table
            .live()
            .filter(|r| r.clock > 0 && r.state == RecordState::Alive)
            .collect();
        let mut ids: BTreeSet<KeyId> = BTreeSet::new();
        for r in &nodes {
            ids.extend(r.keys.iter().copied());
        }
        let keys = ids
            .into_iter()
            .map(|id| clusterctl_api::SecretKeyView {
                id: id.to_string(),
                holders: nodes.iter().filter(|r| r.keys.contains(&id)).count() as u32,
                in_use_by: nodes.iter().filter(|r| r.keys.first() == Some(&id)).count() as u32,
                missing_on: nodes
                    .iter()
                    .filter(|r| !r.keys.contains(&id))
                    .map(|r| r.name.to_string())
                    .collect(),
            })
            .collect();
        clusterctl_api::Secrets {
            observer: self.cfg.me.name.to_string(),
            nodes: nodes.len() as u32,
            keys,
        }
    }

    // ----- reports ----------------------------------------------------------------------------

    /// Links the contract expects, between known nodes: `(a, b, kind)` with `a < b`.
    pub fn expected_links(&self) -> Vec<(NodeName, NodeName, LinkKind)> {
        self.expected_links_with(&BTreeSet::new())
    }

    /// [`Engine::expected_links`], also with the `refused` nodes that left and came back (see
    /// [`crate::verdict`]).
    fn expected_links_with(
        &self,
        refused: &BTreeSet<NodeName>,
    ) -> Vec<(NodeName, NodeName, LinkKind)> {
        let mut nodes: BTreeMap<NodeName, Ident> = BTreeMap::new();
        for name in refused {
            if let Some(r) = self.table.get(name.as_str()) {
                if !r.is_tombstone() && r.clock > 0 {
                    nodes.insert(r.name.clone(), r.ident());
                }
            }
        }
        for r in self.table.live() {
            if r.state == RecordState::Alive && r.clock > 0 {
                nodes.insert(r.name.clone(), r.ident());
            }
        }
        for s in self.cfg.contract.sites() {
            for g in &s.gateways {
                let known = self.table.get(g.as_str());
                if known.is_none_or(|r| r.clock == 0) {
                    nodes.insert(
                        g.clone(),
                        Ident {
                            name: g.clone(),
                            site: s.name.clone(),
                            role: Role::Gateway,
                        },
                    );
                } else if known.is_some_and(|r| r.state != RecordState::Alive)
                    && !refused.contains(g)
                {
                    nodes.remove(g);
                }
            }
        }
        let list: Vec<&Ident> = nodes.values().collect();
        let mut out = Vec::new();
        for (i, a) in list.iter().enumerate() {
            for b in &list[i + 1..] {
                if let Ok(kind) = self.cfg.contract.check_link(a, b) {
                    out.push((a.name.clone(), b.name.clone(), kind));
                }
            }
        }
        out
    }

    fn report_of(&self, from: &NodeName, to: &NodeName) -> Option<LinkReport> {
        if *from == self.cfg.me.name {
            let own = self.own();
            let mut rep = own.links.into_iter().find(|l| l.peer == *to)?;
            if let Some(l) = self.links.get(to) {
                rep.rtt_us = l.rtt_us;
            }
            return Some(rep);
        }
        self.table
            .get(from.as_str())
            .and_then(|r| r.links.iter().find(|l| l.peer == *to).cloned())
    }

    fn format_ms(&self, ms: u64) -> String {
        format_rfc3339_ms(ms)
    }

    fn link_view(
        &self,
        now: Time,
        a: &NodeName,
        b: &NodeName,
        kind: LinkKind,
        expected: bool,
    ) -> LinkView {
        let ra = self.report_of(a, b);
        let rb = self.report_of(b, a);
        // Both ends' reports as published, before an unreachable end's is set aside.
        let (raw_a, raw_b) = (ra.clone(), rb.clone());
        let sa = self.status_of(a);
        let sb = self.status_of(b);
        let my_hash = self.cfg.contract.hash();
        let hash_of = |n: &NodeName| {
            self.table
                .get(n.as_str())
                .map(|r| r.contract_hash.clone())
                .unwrap_or_default()
        };
        let gone = |s: NodeStatus| {
            matches!(
                s,
                NodeStatus::Dead | NodeStatus::Left | NodeStatus::Forgotten
            )
        };
        let stale = |s: NodeStatus| s == NodeStatus::Unreachable;
        // The report of an end we cannot reach is old news: when the other end is reachable,
        // its report alone decides (a cut WAN is `down`, not `one-way` against a stale `up`).
        let (ra, rb) = match (stale(sa), stale(sb)) {
            (true, false) => (None, rb),
            (false, true) => (ra, None),
            _ => (ra, rb),
        };
        let is = |r: &Option<LinkReport>, st: LinkState| r.as_ref().is_some_and(|x| x.state == st);
        let mut reason = None;
        let state = if (stale(sa) != stale(sb)) && ra.is_none() && rb.is_none() {
            let far = if stale(sa) { a } else { b };
            reason = Some(format!("{far} is unreachable from {}", self.cfg.me.name));
            LinkState::Down
        } else if let Some(r) = [&ra, &rb]
            .into_iter()
            .flatten()
            .find(|r| r.state == LinkState::Refused)
        {
            reason = r.reason.clone();
            LinkState::Refused
        } else if let Some(r) = [&ra, &rb]
            .into_iter()
            .flatten()
            .find(|r| r.state == LinkState::OneWay)
        {
            reason = r.reason.clone();
            LinkState::OneWay
        } else if gone(sa) || gone(sb) {
            let who = if gone(sa) { (a, sa) } else { (b, sb) };
            reason = Some(format!("{} is {}", who.0, who.1));
            LinkState::Down
        } else if ra.is_none() && rb.is_none() {
            reason = Some("neither end has reported this link yet".into());
            LinkState::Missing
        } else {
            let up_a = is(&ra, LinkState::Up) || is(&ra, LinkState::Drift);
            let up_b = is(&rb, LinkState::Up) || is(&rb, LinkState::Drift);
            if up_a && up_b {
                let (ha, hb) = (hash_of(a), hash_of(b));
                if ha != my_hash
                    || hb != my_hash
                    || is(&ra, LinkState::Drift)
                    || is(&rb, LinkState::Drift)
                {
                    let odd: Vec<String> = [(a, &ha), (b, &hb)]
                        .into_iter()
                        .filter(|(_, h)| h.as_str() != my_hash)
                        .map(|(n, h)| format!("{n} runs contract {h}"))
                        .collect();
                    reason = Some(if odd.is_empty() {
                        "the two ends run different contracts".into()
                    } else {
                        format!("{} (observer runs {my_hash})", odd.join(", "))
                    });
                    LinkState::Drift
                } else {
                    LinkState::Up
                }
            } else if up_a || up_b {
                // Only one end says up: in our own view that is authoritative for our end.
                let (up_end, down_end) = if up_a { (a, b) } else { (b, a) };
                let (up_rep, down_raw) = if up_a { (&ra, &raw_b) } else { (&rb, &raw_a) };
                let up_since = up_rep.as_ref().map_or(0, |r| r.since_ms);
                // Its last word, unless that word is `up` too (set aside only because its end is
                // unreachable from here at this instant).
                let down_word = down_raw
                    .as_ref()
                    .filter(|r| !matches!(r.state, LinkState::Up | LinkState::Drift))
                    .map(|r| r.since_ms);
                if verdict::reported_since(down_word, up_since) {
                    reason = Some(format!("{up_end} reports the link up, {down_end} does not"));
                    LinkState::OneWay
                } else {
                    // The other end's last word predates the link (a link just up after a
                    // partition healed): nothing says one direction fails.
                    reason = Some(format!(
                        "{down_end} has not reported the link since it came up"
                    ));
                    LinkState::Up
                }
            } else {
                reason = [&ra, &rb]
                    .into_iter()
                    .flatten()
                    .find_map(|r| r.reason.clone());
                LinkState::Down
            }
        };
        if stale(sa) || stale(sb) {
            let note = "last report before the far site became unreachable";
            reason = Some(match reason {
                Some(r) => format!("{r}; {note}"),
                None => note.to_string(),
            });
        }
        let any = ra.as_ref().or(rb.as_ref());
        let secure = self.cfg.secure
            && [&ra, &rb].into_iter().flatten().all(|r| r.secure)
            && state != LinkState::Missing;
        let mine = if *a == self.cfg.me.name {
            self.links.get(b)
        } else if *b == self.cfg.me.name {
            self.links.get(a)
        } else {
            None
        };
        // Transport details only while a connection exists (an end reports it up); a one-way
        // link found from stalled handshakes has none.
        let connected = [&ra, &rb]
            .into_iter()
            .flatten()
            .any(|r| matches!(r.state, LinkState::Up | LinkState::Drift))
            && matches!(state, LinkState::Up | LinkState::Drift | LinkState::OneWay);
        let mine = mine.filter(|l| l.up);
        let rtt_us = match (connected, mine) {
            (true, Some(l)) => Some(l.rtt_us),
            (true, None) => any.map(|r| r.rtt_us),
            _ => None,
        };
        let protocol = match (connected, mine) {
            (true, Some(l)) => Some(l.protocol.clone()),
            (true, None) => Some(if secure {
                "tls1.3".to_string()
            } else {
                "insecure".to_string()
            }),
            _ => None,
        };
        LinkView {
            from: a.to_string(),
            to: b.to_string(),
            kind,
            state,
            secure,
            rtt_ms: rtt_us.map(|u| f64::from(u) / 1000.0),
            since: any.map(|r| self.format_ms(r.since_ms)),
            protocol,
            reason,
            expected,
            cipher_suite: (secure && connected).then(|| CIPHER_SUITE.to_string()),
            identities: [a, b]
                .iter()
                .filter_map(|n| self.table.get(n.as_str()))
                .filter_map(|r| {
                    r.cert.as_ref().map(|c| {
                        format!(
                            "{}.{}.{} ({}, cert {})",
                            r.name, r.site, self.cfg.cluster, r.role, c.leaf
                        )
                    })
                })
                .collect(),
            cert_days_left: [a, b]
                .iter()
                .filter_map(|n| self.table.get(n.as_str()).and_then(|r| r.cert.as_ref()))
                .map(|c| self.days_left(now, c.not_after_ms))
                .min(),
            secret_key: connected
                .then(|| mine.and_then(|l| l.key).or_else(|| any.and_then(|r| r.key)))
                .flatten()
                .map(|k| k.to_string()),
        }
    }

    /// Nodes refused at handshake, each with the first reason found: from this node's own
    /// refusals and every live record's refused link reports ([`verdict::refused_end`]).
    fn refused_nodes(&self) -> BTreeMap<NodeName, String> {
        let me = &self.cfg.me.name;
        let mut out: BTreeMap<NodeName, String> = BTreeMap::new();
        for (peer, r) in &self.refused {
            if !self.links.get(peer).is_some_and(|l| l.up) {
                let end = verdict::refused_end(me, peer, &r.reason);
                out.entry(end.clone()).or_insert_with(|| r.reason.clone());
            }
        }
        for r in self.table.live().filter(|r| r.name != *me) {
            for l in r.links.iter().filter(|l| l.state == LinkState::Refused) {
                let reason = l.reason.as_deref().unwrap_or("refused");
                let end = verdict::refused_end(&r.name, &l.peer, reason);
                out.entry(end.clone()).or_insert_with(|| reason.to_string());
            }
        }
        out
    }

    /// The status each node is shown with, and why the expected nodes that are at fault make
    /// the report unhealthy ([`crate::verdict`]).
    fn node_verdicts(&self, now: Time) -> (BTreeMap<NodeName, NodeStatus>, Vec<String>) {
        let refused = self.refused_nodes();
        let duplicates: BTreeMap<&NodeName, &str> = self
            .duplicates
            .iter()
            .filter(|(_, d)| now.saturating_sub(d.last) < DUPLICATE_EVIDENCE)
            .map(|(n, d)| (n, d.reason.as_str()))
            .collect();
        let mut names: BTreeSet<NodeName> = self
            .table
            .live()
            .filter(|r| r.clock > 0 || r.name == self.cfg.me.name)
            .map(|r| r.name.clone())
            .collect();
        let mut listed: BTreeSet<&NodeName> = BTreeSet::new();
        for s in self.cfg.contract.sites() {
            listed.extend(s.gateways.iter());
            listed.extend(s.nodes.iter().flatten());
        }
        names.extend(listed.iter().map(|n| (*n).clone()));
        names.extend(refused.keys().cloned());
        names.extend(duplicates.keys().map(|n| (*n).clone()));
        let mut out = BTreeMap::new();
        let mut problems = Vec::new();
        for name in &names {
            let in_contract = listed.contains(name);
            let status = self.status_of(name);
            // A forgotten node counts as refused only while it still knocks here.
            let refused = if status == NodeStatus::Forgotten {
                self.refused
                    .get(name)
                    .filter(|r| now.saturating_sub(r.last) < DUPLICATE_EVIDENCE)
                    .map(|r| r.reason.as_str())
            } else {
                refused.get(name).map(String::as_str)
            };
            let f = verdict::NodeFacts {
                name,
                status,
                in_contract,
                refused,
                duplicate: duplicates.get(name).copied(),
            };
            problems.extend(verdict::problem(&f));
            out.insert(name.clone(), verdict::shown_status(&f));
        }
        (out, problems)
    }

    /// The topology as this node sees it.
    pub fn topology(&self, now: Time) -> Topology {
        let my_hash = self.cfg.contract.hash().to_string();
        let mut sites: BTreeMap<SiteName, SiteView> = BTreeMap::new();
        for s in self.cfg.contract.sites() {
            sites.insert(
                s.name.clone(),
                SiteView {
                    name: s.name.to_string(),
                    nodes: Vec::new(),
                    gateways: s.gateways.iter().map(|g| g.to_string()).collect(),
                },
            );
        }
        let (facts, problems) = self.node_verdicts(now);
        for r in self.table.live() {
            if r.clock == 0 && r.name != self.cfg.me.name {
                continue;
            }
            let view = NodeView {
                name: r.name.to_string(),
                site: r.site.to_string(),
                role: r.role,
                status: facts
                    .get(&r.name)
                    .copied()
                    .unwrap_or_else(|| self.status_of(&r.name)),
                clock: r.clock,
                addr: r.addr.clone(),
                contract_hash: r.contract_hash.clone(),
                drift: r.contract_hash != my_hash,
            };
            sites
                .entry(r.site.clone())
                .or_insert_with(|| SiteView {
                    name: r.site.to_string(),
                    nodes: Vec::new(),
                    gateways: Vec::new(),
                })
                .nodes
                .push(view);
        }
        let refused_nodes: BTreeSet<NodeName> = facts
            .iter()
            .filter(|(_, s)| **s == NodeStatus::Refused)
            .map(|(n, _)| n.clone())
            .collect();
        let expected = self.expected_links_with(&refused_nodes);
        let mut links: Vec<LinkView> = expected
            .iter()
            .map(|(a, b, k)| self.link_view(now, a, b, *k, true))
            .collect();
        // Refused links the contract does not expect are shown too: they are what an operator
        // needs to see (a member dialing another site, a node of another cluster).
        let expected_set: BTreeSet<(NodeName, NodeName)> = expected
            .iter()
            .map(|(a, b, _)| (a.clone(), b.clone()))
            .collect();
        let mut extra: BTreeSet<(NodeName, NodeName)> = BTreeSet::new();
        for r in self.table.live() {
            for l in &r.links {
                if l.state == LinkState::Refused {
                    let pair = if r.name < l.peer {
                        (r.name.clone(), l.peer.clone())
                    } else {
                        (l.peer.clone(), r.name.clone())
                    };
                    if !expected_set.contains(&pair) {
                        extra.insert(pair);
                    }
                }
            }
        }
        for (a, b) in extra {
            let kind = match (self.table.get(a.as_str()), self.table.get(b.as_str())) {
                (Some(x), Some(y)) if x.site != y.site => LinkKind::Wan,
                _ => LinkKind::Site,
            };
            links.push(self.link_view(now, &a, &b, kind, false));
        }
        let mut problems: Vec<String> = problems;
        problems.extend(
            links
                .iter()
                .filter(|l| l.expected && l.state != LinkState::Up)
                .map(|l| {
                    format!(
                        "{} link {} - {} is {}{}",
                        l.kind.as_str(),
                        l.from,
                        l.to,
                        l.state.as_str(),
                        l.reason
                            .as_ref()
                            .map_or_else(String::new, |r| format!(": {r}"))
                    )
                }),
        );
        let healthy = problems.is_empty();
        let insecure_nodes: Vec<String> = self
            .table
            .live()
            .filter(|r| r.clock > 0 && !r.secure)
            .map(|r| r.name.to_string())
            .collect();
        let insecure_links = links
            .iter()
            .filter(|l| l.state == LinkState::Up && !l.secure)
            .count();
        let (mut warnings, expired) = self.cert_warnings(now);
        warnings.extend(self.seed_drift());
        let secure = self.cfg.secure
            && insecure_nodes.is_empty()
            && insecure_links == 0
            && expired.is_empty();
        let insecure_reason = (!secure).then(|| {
            if !expired.is_empty() {
                expired.join("; ")
            } else if !self.cfg.secure {
                format!(
                    "{} runs with insecure = true (no authentication)",
                    self.cfg.me.name
                )
            } else if !insecure_nodes.is_empty() {
                format!("nodes running insecure: {}", insecure_nodes.join(", "))
            } else {
                format!("{insecure_links} link(s) are not mutually authenticated")
            }
        });
        Topology {
            cluster: self.cfg.cluster.to_string(),
            observer: self.cfg.me.name.to_string(),
            contract_hash: my_hash,
            secure,
            insecure_reason,
            healthy,
            problems,
            sites: sites.into_values().collect(),
            links,
            probes: None,
            warnings: std::mem::take(&mut warnings),
            generated_at: self.format_ms(self.wall_ms(now)),
        }
    }

    /// Every node in the table with its status.
    pub fn members(&self) -> Members {
        let members = self
            .table
            .iter()
            .filter(|r| r.clock > 0 || r.name == self.cfg.me.name)
            .map(|r| MemberView {
                name: r.name.to_string(),
                site: r.site.to_string(),
                role: r.role,
                status: self.status_of(&r.name),
                clock: r.clock,
                addr: r.addr.clone(),
                contract_hash: r.contract_hash.clone(),
                version: r.version.clone(),
                links_up: if r.name == self.cfg.me.name {
                    self.links.values().filter(|l| l.up).count() as u32
                } else {
                    r.links.iter().filter(|l| l.state == LinkState::Up).count() as u32
                },
            })
            .collect();
        let secure = self.cfg.secure && self.table.live().all(|r| r.clock == 0 || r.secure);
        Members {
            cluster: self.cfg.cluster.to_string(),
            observer: self.cfg.me.name.to_string(),
            secure,
            members,
        }
    }
}

/// The TLS cipher suite every secure link uses (the transport allows no other).
pub const CIPHER_SUITE: &str = "TLS13_AES_128_GCM_SHA256";

/// Formats wall-clock milliseconds as RFC 3339 UTC (`2026-11-22T05:43:39.123Z`).
pub fn format_rfc3339_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let millis = ms % 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{millis:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cluster `c` with one site, `us`, whose gateway is `gw-us`.
    fn one_site_contract() -> crate::contract::Contract {
        crate::contract::Contract::parse(
            "cluster = \"c\"\n[[site]]\nname = \"us\"\ngateways = [\"gw-us\"]\n",
        )
        .unwrap()
    }

    /// Member `n` of site `us`.
    fn member_of_us(n: &str) -> Ident {
        Ident {
            name: NodeName::new(n).unwrap(),
            site: crate::name::SiteName::new("us").unwrap(),
            role: Role::Member,
        }
    }

    /// An engine config for unit tests: cluster `c`, LAN timing, a fixed secret and seed.
    fn test_config(contract: &crate::contract::Contract, me: Ident) -> EngineConfig {
        EngineConfig {
            cluster: ClusterName::new("c").unwrap(),
            me,
            addr: "10.0.0.1:7400".into(),
            wan_addr: None,
            contract: contract.clone(),
            secure: true,
            version: "t".into(),
            seeds: vec![],
            rejoin: false,
            timing: Timing::lan(),
            wall_base_ms: 0,
            seed: 1,
            keyring: crate::secret::Keyring::new(
                crate::secret::Secret::from_bytes(&[1; 32]).unwrap(),
            ),
            cert: None,
            cert_warn_fraction: 0.33,
        }
    }

    #[test]
    fn rfc3339_formatting() {
        assert_eq!(format_rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339_ms(1_795_325_819_123),
            "2026-11-22T05:36:59.123Z"
        );
        assert_eq!(
            format_rfc3339_ms(951_782_400_000),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn gateways_dial_each_other_at_their_wan_address_and_members_at_the_site_address() {
        use crate::contract::Contract;
        use crate::name::{Ident, SiteName};
        let contract = Contract::parse(
            "cluster = \"c\"\n[[site]]\nname = \"us\"\ngateways = [\"gw-us\"]\n[[site]]\nname = \"eu\"\ngateways = [\"gw-eu\"]\n[[link]]\nbetween = [\"us\", \"eu\"]\n",
        )
        .unwrap();
        let id = |n: &str, s: &str, r: Role| Ident {
            name: NodeName::new(n).unwrap(),
            site: SiteName::new(s).unwrap(),
            role: r,
        };
        let cfg = |me: Ident| test_config(&contract, me);

        let mut gw_us = NodeRecord::new(
            &id("gw-us", "us", Role::Gateway),
            3,
            "10.1.0.1:7400".into(),
            contract.hash().into(),
            "t".into(),
            true,
        );
        gw_us.wan_addr = Some("198.51.100.1:7400".into());
        let far = Engine::new(
            cfg(id("gw-eu", "eu", Role::Gateway)),
            vec![gw_us.clone()],
            Time::ZERO,
        )
        .unwrap();
        assert_eq!(
            far.wanted_links(),
            vec![(gw_us.name.clone(), "198.51.100.1:7400".to_string())]
        );
        let near = Engine::new(
            cfg(id("edge-us", "us", Role::Member)),
            vec![gw_us.clone()],
            Time::ZERO,
        )
        .unwrap();
        assert_eq!(
            near.wanted_links(),
            vec![(gw_us.name.clone(), "10.1.0.1:7400".to_string())]
        );
    }

    #[test]
    fn a_seed_pointing_elsewhere_than_the_table_is_flagged_as_dns_drift() {
        use crate::contract::Contract;
        use crate::name::{Ident, SiteName};
        let contract =
            Contract::parse("cluster = \"c\"\n[[site]]\nname = \"us\"\ngateways = [\"gw-us\"]\n")
                .unwrap();
        let id = |n: &str, r: Role| Ident {
            name: NodeName::new(n).unwrap(),
            site: SiteName::new("us").unwrap(),
            role: r,
        };
        let gw = NodeRecord::new(
            &id("gw-us", Role::Gateway),
            3,
            "10.1.0.1:7400".into(),
            contract.hash().into(),
            "t".into(),
            true,
        );
        let cfg = |seed: &str| EngineConfig {
            addr: "10.1.0.2:7400".into(),
            seeds: vec![(gw.name.clone(), seed.to_string())],
            ..test_config(&contract, id("edge-us", Role::Member))
        };

        let ok = Engine::new(cfg("10.1.0.1:7400"), vec![gw.clone()], Time::ZERO).unwrap();
        assert!(ok.seed_drift().is_empty());
        let drifted = Engine::new(cfg("10.1.0.9:7400"), vec![gw.clone()], Time::ZERO).unwrap();
        let w = drifted.topology(Time::ZERO).warnings;
        assert!(
            w.iter()
                .any(|w| w.contains("DNS drift: seed gw-us") && w.contains("10.1.0.1:7400")),
            "{w:?}"
        );
    }

    #[test]
    fn link_ups_and_differing_summaries_start_one_exchange_per_sync_period() {
        use crate::table::Summary;
        let contract = one_site_contract();
        let id = member_of_us;
        let cfg = test_config(&contract, id("edge-1"));

        let mut e = Engine::new(cfg, vec![], Time::ZERO).unwrap();
        let sent = |e: &mut Engine| {
            let mut out = Vec::new();
            while let Some(o) = e.poll_output() {
                if let Output::Send { to, frame } = o {
                    let kind = match frame {
                        Frame::Digest(_, true) => "digest",
                        Frame::Digest(_, false) => "digest-reply",
                        Frame::Summary(_) => "summary",
                        Frame::Sites(_) => "sites",
                        Frame::SiteDigest(_, _, true) => "site-digest",
                        Frame::Records(_) => "records",
                        _ => "other",
                    };
                    out.push(format!("{kind} -> {to}"));
                }
            }
            out
        };
        sent(&mut e);
        let up = |e: &mut Engine, at: Time, peer: &str| {
            e.handle_link_up(
                at,
                LinkInfo {
                    peer: id(peer),
                    contract_hash: contract.hash().to_string(),
                    secure: true,
                    protocol: "tls1.3".into(),
                    rtt_us: 100,
                    key: None,
                },
            )
        };
        let ms = Duration::from_millis;
        // The first link syncs the whole table; the next, in the same period, only a summary.
        up(&mut e, ms(1), "edge-2");
        let first = sent(&mut e);
        assert!(first.contains(&"digest -> edge-2".to_string()), "{first:?}");
        assert!(
            first.contains(&"records -> edge-2".to_string()),
            "{first:?}"
        );
        up(&mut e, ms(2), "edge-3");
        let second = sent(&mut e);
        assert!(
            second.contains(&"summary -> edge-3".to_string()),
            "{second:?}"
        );
        assert!(
            !second.iter().any(|s| s.starts_with("digest")),
            "{second:?}"
        );
        // A differing summary waits for the next period, then is answered with the per-site
        // summaries.
        let other = Summary {
            records: 99,
            hash: 7,
        };
        let edge3 = NodeName::new("edge-3").unwrap();
        e.handle_frame(ms(3), &edge3, Frame::Summary(other));
        assert!(sent(&mut e).is_empty());
        e.handle_frame(ms(2500), &edge3, Frame::Summary(other));
        assert_eq!(sent(&mut e), vec!["sites -> edge-3"]);
        // Per-site summaries that differ in one site get a digest of that site only.
        let mut theirs = e.table().site_summaries();
        assert_eq!(theirs.len(), 1);
        theirs[0].1.hash ^= 1;
        let other_site = SiteName::new("eu").unwrap();
        theirs.push((other_site.clone(), other));
        e.handle_frame(ms(2600), &edge3, Frame::Sites(theirs.clone()));
        let mut out = Vec::new();
        while let Some(o) = e.poll_output() {
            if let Output::Send { to, frame } = o {
                out.push((to, frame));
            }
        }
        match out.as_slice() {
            [(to, Frame::SiteDigest(sites, digest, true))] => {
                assert_eq!(to, &edge3);
                assert_eq!(sites, &vec![other_site, SiteName::new("us").unwrap()]);
                assert_eq!(digest.len(), e.table().len());
            }
            other => panic!("expected one site digest, got {other:?}"),
        }
        // Equal per-site summaries: nothing to compare.
        e.handle_frame(ms(2700), &edge3, Frame::Sites(e.table().site_summaries()));
        assert!(sent(&mut e).is_empty());
        // An equal summary costs nothing, whenever it comes.
        let mine = e.table().summary();
        e.handle_frame(ms(6000), &edge3, Frame::Summary(mine));
        assert!(sent(&mut e).is_empty());
    }

    #[test]
    fn rtt_jitter_below_a_millisecond_does_not_republish_the_record() {
        let contract = one_site_contract();
        let id = member_of_us;
        let cfg = test_config(&contract, id("edge-1"));

        let mut e = Engine::new(cfg, vec![], Time::ZERO).unwrap();
        let peer = NodeName::new("edge-2").unwrap();
        e.handle_link_up(
            Time::ZERO + Duration::from_millis(1),
            LinkInfo {
                peer: id("edge-2"),
                contract_hash: contract.hash().to_string(),
                secure: true,
                protocol: "tls1.3".into(),
                rtt_us: 100,
                key: None,
            },
        );
        // Runs the engine's timers up to `until` (at most one step per 50 ms of virtual time).
        let run = |e: &mut Engine, from: Duration, until: Duration| {
            let mut now = from;
            while now < until {
                now = (e.poll_timeout() - Time::ZERO).clamp(now, until);
                e.handle_timeout(Time::ZERO + now);
                while e.poll_output().is_some() {}
                now += Duration::from_millis(50);
            }
        };
        let refresh = Timing::lan().rtt_refresh;
        run(&mut e, Duration::ZERO, refresh);
        let settled = e.clock();
        // 100 us -> 600 us: six times slower, but half a millisecond: jitter, not news.
        e.handle_rtt(&peer, 600);
        run(&mut e, refresh, refresh * 3);
        assert_eq!(e.clock(), settled, "jitter republished the record");
        // 100 us -> 5 ms, for good: the record says so within two refresh windows (the window
        // in which it changed holds both values).
        e.handle_rtt(&peer, 5_000);
        run(&mut e, refresh * 3, refresh * 5 + Duration::from_secs(1));
        assert!(e.clock() > settled, "a real RTT change was not published");
        let own = e.table().get(e.me().name.as_str()).expect("own record");
        assert_eq!(
            own.links.iter().map(|l| l.rtt_us).collect::<Vec<_>>(),
            [5_000]
        );
    }

    /// A hello of another protocol version is refused with the `Version` code and a reason
    /// naming both versions; reported, it counts and raises `link-refused` like any refusal.
    #[test]
    fn a_hello_of_another_protocol_version_is_refused_with_the_version_reason() {
        let contract = one_site_contract();
        let mut e = Engine::new(
            test_config(&contract, member_of_us("edge-1")),
            vec![],
            Time::ZERO,
        )
        .unwrap();
        let ours = crate::wire::PROTOCOL_VERSION;
        assert_eq!(e.check_hello_version(ours), Ok(()));
        for theirs in [0, 1, ours + 1, u8::MAX] {
            let r = e.check_hello_version(theirs).unwrap_err();
            assert_eq!(r.code, RefusalCode::Version);
            assert!(
                r.reason.contains(&format!("protocol version {theirs},"))
                    && r.reason.contains(&format!("protocol version {ours};")),
                "{r}"
            );
        }
        // The bytes of a hello of another version: refused from the version byte alone.
        let mut hello = crate::wire::Handshake::Refuse(Refusal::version(0)).encode();
        hello[0] = ours + 1;
        let theirs = crate::wire::Handshake::version_of(&hello).unwrap();
        let refusal = e.check_hello_version(theirs).unwrap_err();
        let peer = NodeName::new("edge-2").unwrap();
        let t = Time::from_secs(1);
        while e.poll_output().is_some() {}
        e.handle_refused(
            t,
            Some(peer.clone()),
            Some(refusal.code),
            &refusal.reason,
            true,
        );
        assert_eq!(e.counters.refused_in, 1);
        let mut events = Vec::new();
        while let Some(o) = e.poll_output() {
            if let Output::Event(ev) = o {
                events.push(ev);
            }
        }
        assert!(
            events.iter().any(|ev| ev.kind == EventKind::LinkRefused
                && ev.peer.as_ref() == Some(&peer)
                && ev.reason.contains("protocol version")),
            "{events:?}"
        );
    }

    /// A refused second instance makes reports unhealthy while it retries, for
    /// [`DUPLICATE_EVIDENCE`] after its last attempt, without marking the name's link refused.
    #[test]
    fn a_second_instance_keeps_reports_unhealthy_while_it_retries_and_no_longer() {
        let contract = one_site_contract();
        let mut e = Engine::new(
            test_config(&contract, member_of_us("edge-1")),
            vec![],
            Time::ZERO,
        )
        .unwrap();
        let x = NodeName::new("edge-2").unwrap();
        let why = "second instance of edge-2: edge-2 answers at A, refused the instance at B";
        let dup = |t: &Topology| t.problems.iter().any(|p| p.contains("second instance"));
        let t0 = Time::from_secs(10);
        e.handle_refused(t0, Some(x.clone()), Some(RefusalCode::Identity), why, true);
        assert!(dup(&e.topology(t0)));
        assert!(
            !e.refused.contains_key(&x),
            "the incumbent's link is not refused"
        );
        assert_eq!(e.counters.refused_in, 1);
        let retry = t0 + Duration::from_secs(5);
        e.handle_refused(retry, Some(x), Some(RefusalCode::Identity), why, true);
        assert!(dup(
            &e.topology(retry + DUPLICATE_EVIDENCE - Duration::from_secs(1))
        ));
        assert!(!dup(&e.topology(retry + DUPLICATE_EVIDENCE)));
    }

    /// A busy host's RTT estimate jumps from 1 to 4 ms for one second in three. Either value
    /// alone is a change worth publishing against the other, but neither lasts a window.
    #[test]
    fn rtt_swinging_back_and_forth_does_not_republish_the_record() {
        let contract = one_site_contract();
        let id = member_of_us;
        let mut e = Engine::new(test_config(&contract, id("edge-1")), vec![], Time::ZERO).unwrap();
        let peer = NodeName::new("edge-2").unwrap();
        e.handle_link_up(
            Time::ZERO,
            LinkInfo {
                peer: id("edge-2"),
                contract_hash: contract.hash().to_string(),
                secure: true,
                protocol: "tls1.3".into(),
                rtt_us: 1_000,
                key: None,
            },
        );
        let refresh = Timing::lan().rtt_refresh;
        let mut settled = None;
        // One estimate a second, as the runtime hands them over; every engine timer in between.
        for second in 0..(refresh.as_secs() * 6) {
            if second == refresh.as_secs() {
                settled = Some(e.clock());
            }
            e.handle_rtt(&peer, if second % 3 == 0 { 4_000 } else { 1_000 });
            let end = Time::ZERO + Duration::from_secs(second + 1);
            while e.poll_timeout() < end {
                let at = e.poll_timeout();
                e.handle_timeout(at);
                while e.poll_output().is_some() {}
            }
        }
        let settled = settled.expect("ran past the first window");
        assert_eq!(e.clock(), settled, "RTT swings republished the record");
    }

    #[test]
    fn only_new_up_links_are_told_apart_from_other_link_changes() {
        let link = |peer: &str, state: LinkState, rtt_us: u32| LinkReport {
            peer: NodeName::new(peer).unwrap(),
            state,
            rtt_us,
            since_ms: 5,
            secure: true,
            reason: None,
            key: None,
        };
        let old = vec![link("b", LinkState::Up, 10), link("d", LinkState::Up, 10)];
        let grown = vec![
            link("a", LinkState::Up, 1),
            link("b", LinkState::Up, 99),
            link("c", LinkState::Up, 1),
            link("d", LinkState::Up, 10),
            link("e", LinkState::Up, 1),
        ];
        assert!(only_new_up(&old, &grown));
        assert!(only_new_up(&[], &grown));
        assert!(only_new_up(&old, &old));
        // A link lost, a new link that is not up, a link whose state changed: not only growth.
        assert!(!only_new_up(&old, &grown[..2]));
        assert!(!only_new_up(
            &old,
            &[
                old[0].clone(),
                link("c", LinkState::Refused, 0),
                old[1].clone()
            ]
        ));
        assert!(!only_new_up(
            &old,
            &[old[0].clone(), link("d", LinkState::Down, 10)]
        ));
    }

    #[test]
    fn rendezvous_is_deterministic_and_fails_over() {
        let g: Vec<NodeName> = ["gw-1", "gw-2", "gw-3"]
            .iter()
            .map(|s| NodeName::new(*s).unwrap())
            .collect();
        let pick = rendezvous("edge-9", g.iter()).unwrap();
        assert_eq!(rendezvous("edge-9", g.iter()).unwrap(), pick);
        let rest: Vec<NodeName> = g.iter().filter(|x| **x != pick).cloned().collect();
        let second = rendezvous("edge-9", rest.iter()).unwrap();
        assert_ne!(second, pick);
        assert!(rendezvous("x", std::iter::empty()).is_none());
    }
}
