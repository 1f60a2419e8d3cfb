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
//!
//! ## Where each concern lives
//! The state is the [`Engine`] struct's, here; its methods are grouped by concern, one file each
//! (this file keeps the types, construction, accessors and the driver interface):
//!
//! | file | concern |
//! |---|---|
//! | `engine/links.rs` | Links: dialing, handshake decisions, refusals, the links wanted and held. |
//! | `engine/frames.rs` | Frames from peers: records, digests, summaries, and what each one changes. |
//! | `engine/own_record.rs` | This node's own record: what it publishes about itself and when. |
//! | `engine/status.rs` | Failure detection: the site and WAN rings, node statuses and their basis. |
//! | `engine/route.rs` | Routing: next hops, the forwarding rule applied, originating and delivering. |
//! | `engine/sink.rs` | The built-in `sink` process and the data messages and loads it counts. |
//! | `engine/requests.rs` | Requests: ping, echo, probe sets, calls between nodes. |
//! | `engine/operator.rs` | Operator commands: forget, leave. |
//! | `engine/certs.rs` | Certificates: what each node presents and the reports about them. |
//! | `engine/secret.rs` | The cluster-secret keyring and its operations. |
//! | `engine/report.rs` | Reports: topology, members, secrets; the verdicts behind `healthy`. |
//! | `engine/tests.rs` | unit tests of the engine as a whole |
//!
//! Method families: `handle_*` (inputs), `poll_output`/`poll_timeout` (outputs, drained in that
//! order after every input), accessors and reports (`&self`), operator commands (`&mut self`,
//! answered at once or through [`Output::Reply`]).

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

mod certs;
mod frames;
mod links;
mod operator;
mod own_record;
mod report;
mod requests;
mod route;
mod secret;
mod sink;
mod status;

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
mod tests;
