//! The data path: the two lanes of a link, the route snapshot, and the load generator.
//!
//! ```text
//!  owner task ── control frames (try_send, 4096 frames) ─┬► control lane ─┐ long-lived uni
//!  control reader (forwarding, echo) ── try_send ────────┘                ├► streams, control
//!  owner task ── data frames (try_send) ─┐                                │  at higher priority
//!  load generator ── send().await ───────┼──► bulk lane (8 MiB budget) ──┘
//!  bulk reader (forwarding) ─ send().await┘
//! ```
//!
//! - **Lanes.** Every link has two long-lived unidirectional streams per direction: the control
//!   lane (table sync, digests, echo, calls, leave) and the bulk lane (data messages). Each has
//!   its own queue and writer task; the control stream has the higher QUIC priority, so its
//!   bytes go out before bulk bytes already buffered. On the receiving side each lane has its
//!   own reader, and the owner task serves control input before bulk input. SWIM datagrams are
//!   not on either lane.
//! - **Framing.** Frames are length-prefixed ([`FrameSplitter`]); a writer takes every frame
//!   already queued (up to [`BATCH_BYTES`]) and hands them to QUIC in one write.
//! - **Backpressure.** The bulk lane holds at most [`BULK_BUDGET`] bytes. The load generator and
//!   forwarding gateways wait for room (QUIC flow control then pushes back upstream); the owner
//!   task never waits, so a data frame it cannot queue is dropped and counted
//!   ([`DataStats::dropped`]), as is one a forwarder waited [`FORWARD_WAIT`] for in vain.
//! - **The route snapshot.** The owner publishes [`Routes`]: the next hop the engine chooses
//!   toward every node it can route to, and the lanes and connection of every link up. It is
//!   rebuilt when a link changes and every 250 ms otherwise; routing policy stays in the engine.
//! - **Forwarding without the owner.** A gateway's bulk reader looks the next hop up in the
//!   snapshot and queues the messages of one read, one batch per next hop, on that link's bulk
//!   lane itself (the load generator also sends 64 KiB batches). Messages for this node, and
//!   those without a route (the engine bounces them), go to the owner.
//! - **Control without the owner.** A control reader decodes each frame. A routed frame for
//!   another node (echo requests and replies, calls and their replies, bounces) goes straight
//!   onto the next hop's *control* lane, never waiting ([`DataPath::route_control`]: hop limit
//!   checked and decremented, this hop recorded in the trace, as the engine forwards); an echo
//!   request for this node is answered the same way. A full control lane drops the frame,
//!   counted ([`DataStats::control_dropped`]), as the owner drops its own. Everything else goes
//!   to the owner decoded: frames for this node, no hops left, no route, a link the snapshot
//!   does not hold up, data messages, frames over [`FAST_FRAME`] (a frame that does not decode
//!   goes as bytes; the engine counts it).

use crate::inbox::{Command, Net};
use bytes::Bytes;
use clusterctl_api::{LoadReport, LoadRequest, PingFailure};
use clusterctl_core::engine::Reply;
use clusterctl_core::name::NodeName;
use clusterctl_core::routing;
use clusterctl_core::wire::{
    Body, Envelope, Frame, FrameSplitter, Hop, Lane, HOP_LIMIT, MAX_FRAME, MAX_PAYLOAD,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Most control frames queued for one link before new ones are dropped.
pub const CONTROL_QUEUE: usize = 4096;
/// Most bytes queued on one link's bulk lane.
pub const BULK_BUDGET: usize = 8 * 1024 * 1024;
/// Most frames queued on one link's bulk lane (small messages; the byte budget binds first for
/// messages over 128 bytes).
pub const BULK_QUEUE: usize = 65_536;
/// Most bytes a lane writer hands to QUIC in one write.
pub const BATCH_BYTES: usize = 256 * 1024;
/// Most bytes read from a lane at once.
pub const READ_CHUNK: usize = 64 * 1024;
/// Largest routed control frame a control reader forwards itself; larger ones (big call
/// replies) go through the owner. Far below [`MAX_FRAME`], so that the hop a forwarder adds
/// can never push a frame over the limit.
pub const FAST_FRAME: usize = 64 * 1024;
const _: () = assert!(FAST_FRAME + 1024 <= MAX_FRAME);
/// Longest a forwarding gateway waits for room on the next hop's bulk lane before it drops the
/// message (counted).
pub const FORWARD_WAIT: Duration = Duration::from_secs(5);
/// Largest `count` of one `POST /v1/load`.
pub const MAX_LOAD_COUNT: u64 = 100_000_000;
/// How often the load generator asks the target's sink whether everything arrived.
const SINK_POLL: Duration = Duration::from_millis(5);
/// Time allowed for one sink read.
const SINK_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Counters of the data path (exported in `/metrics`).
#[derive(Debug, Default)]
pub struct DataStats {
    /// Data messages a gateway forwarded without the owner task.
    pub forwarded: AtomicU64,
    /// Data messages dropped because a bulk lane stayed full.
    pub dropped: AtomicU64,
    /// Data messages the load generator sent.
    pub load_sent: AtomicU64,
    /// Routed control frames for other nodes (echo, calls, their replies, bounces) a control
    /// reader forwarded without the owner task.
    pub control_forwarded: AtomicU64,
    /// Echo requests for this node a control reader answered without the owner task.
    pub echo_answered: AtomicU64,
    /// Routed control frames a control reader dropped because the next hop's control lane was
    /// full (the owner drops its own frames the same way).
    pub control_dropped: AtomicU64,
}

impl DataStats {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value of a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// A frame queued on a lane, with its share of the lane's byte budget.
#[derive(Debug)]
pub struct Queued {
    bytes: Bytes,
    _budget: Option<OwnedSemaphorePermit>,
}

impl Queued {
    /// A control frame (the control lane is bounded in frames, not bytes).
    pub fn control(bytes: Vec<u8>) -> Queued {
        Queued {
            bytes: Bytes::from(bytes),
            _budget: None,
        }
    }
}

/// The sending end of one link's bulk lane: bounded in bytes, waited on by producers that may
/// wait, tried by those that may not.
#[derive(Debug, Clone)]
pub struct BulkLane {
    tx: mpsc::Sender<Queued>,
    budget: Arc<Semaphore>,
}

/// Why a frame did not go on a bulk lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaneError {
    /// The lane stayed full.
    Full,
    /// The link is gone.
    Closed,
}

impl BulkLane {
    /// A lane and the receiver its writer drains.
    pub fn new() -> (BulkLane, mpsc::Receiver<Queued>) {
        let (tx, rx) = mpsc::channel(BULK_QUEUE);
        let budget = Arc::new(Semaphore::new(BULK_BUDGET));
        (BulkLane { tx, budget }, rx)
    }

    fn cost(len: usize) -> u32 {
        len.clamp(1, BULK_BUDGET) as u32
    }

    /// Queues a frame, waiting for room.
    pub async fn send(&self, bytes: Vec<u8>) -> Result<(), LaneError> {
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(Self::cost(bytes.len()))
            .await
            .map_err(|_| LaneError::Closed)?;
        let q = Queued {
            bytes: Bytes::from(bytes),
            _budget: Some(permit),
        };
        self.tx.send(q).await.map_err(|_| LaneError::Closed)
    }

    /// Queues a frame if there is room now.
    pub fn try_send(&self, bytes: Vec<u8>) -> Result<(), LaneError> {
        let permit = match self
            .budget
            .clone()
            .try_acquire_many_owned(Self::cost(bytes.len()))
        {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::NoPermits) => return Err(LaneError::Full),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(LaneError::Closed),
        };
        let q = Queued {
            bytes: Bytes::from(bytes),
            _budget: Some(permit),
        };
        self.tx.try_send(q).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => LaneError::Full,
            mpsc::error::TrySendError::Closed(_) => LaneError::Closed,
        })
    }

    /// Whether nothing is queued.
    pub fn is_idle(&self) -> bool {
        self.budget.available_permits() == BULK_BUDGET
    }
}

/// Drains one lane of a link into its long-lived stream, taking every frame already queued
/// into one write. Ends when the queue closes or the connection fails.
pub async fn lane_writer(conn: quinn::Connection, lane: Lane, mut rx: mpsc::Receiver<Queued>) {
    let mut stream: Option<quinn::SendStream> = None;
    let mut batch: Vec<Queued> = Vec::new();
    let mut chunks: Vec<Bytes> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut bytes = first.bytes.len();
        batch.push(first);
        while bytes < BATCH_BYTES {
            match rx.try_recv() {
                Ok(q) => {
                    bytes += q.bytes.len();
                    batch.push(q);
                }
                Err(_) => break,
            }
        }
        if stream.is_none() {
            let Ok(s) = conn.open_uni().await else {
                return;
            };
            // Control is served first: its bytes go out before bulk bytes already buffered.
            let _ = s.set_priority(match lane {
                Lane::Control => 1,
                Lane::Bulk => 0,
            });
            chunks.push(Bytes::from_static(match lane {
                Lane::Control => &[Lane::Control as u8],
                Lane::Bulk => &[Lane::Bulk as u8],
            }));
            stream = Some(s);
        }
        let Some(s) = stream.as_mut() else { return };
        chunks.extend(batch.iter().map(|q| q.bytes.clone()));
        if s.write_all_chunks(&mut chunks).await.is_err() {
            return;
        }
        chunks.clear();
        // Dropping the batch returns its bytes to the lane's budget.
        batch.clear();
    }
    if let Some(mut s) = stream {
        let _ = s.finish();
    }
}

/// The sending ends of one link up in the engine, as the data path uses them.
#[derive(Debug, Clone)]
pub struct LinkLanes {
    /// The connection the owner registered for this link: frames read from any other
    /// connection of the peer are left to the owner (which ignores them).
    pub conn_id: u64,
    /// The control lane (bounded in frames, never waited on).
    pub control: mpsc::Sender<Queued>,
    /// The bulk lane.
    pub bulk: BulkLane,
    /// Transport RTT of the link, recorded in the trace of what is forwarded on it.
    pub rtt_us: u32,
}

/// The next hop toward every node the owner can route to (as the engine chose it), and the
/// lanes of each link up.
#[derive(Debug, Default)]
pub struct Routes {
    hops: HashMap<NodeName, NodeName>,
    links: HashMap<NodeName, LinkLanes>,
}

impl Routes {
    /// A snapshot from next hops (`dst -> hop`) and the lanes of the links up (`peer -> lanes`).
    pub fn new(hops: HashMap<NodeName, NodeName>, links: HashMap<NodeName, LinkLanes>) -> Routes {
        Routes { hops, links }
    }

    /// The next hop toward `dst` and the lanes of the link to it, if there is a route.
    pub fn link_to(&self, dst: &NodeName) -> Option<(&NodeName, &LinkLanes)> {
        let hop = self.hops.get(dst)?;
        let link = self.links.get(hop)?;
        Some((hop, link))
    }

    /// The next hop toward `dst`, its bulk lane and the RTT of that link, if there is a route.
    pub fn lane_to(&self, dst: &NodeName) -> Option<(&NodeName, &BulkLane, u32)> {
        self.link_to(dst)
            .map(|(hop, link)| (hop, &link.bulk, link.rtt_us))
    }

    /// Whether connection `conn_id` of `peer` is the one of a link up in the engine (what the
    /// owner and the engine check before they take a frame).
    pub fn is_up(&self, peer: &NodeName, conn_id: u64) -> bool {
        self.links.get(peer).is_some_and(|l| l.conn_id == conn_id)
    }
}

/// The route snapshot, replaced whole by the owner and read by the data path.
#[derive(Debug, Clone, Default)]
pub struct SharedRoutes(Arc<RwLock<Arc<Routes>>>);

impl SharedRoutes {
    /// The current snapshot.
    pub fn get(&self) -> Arc<Routes> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Publishes a new snapshot.
    pub fn set(&self, r: Routes) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(r);
    }
}

/// What a bulk reader hands to the owner task.
#[derive(Debug)]
pub struct ToOwner {
    pub peer: NodeName,
    pub conn_id: u64,
    pub frames: Vec<Frame>,
}

/// What a control reader did with a routed frame it settled without the owner task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handled {
    /// Queued on the next hop's control lane.
    Forwarded,
    /// An echo request for this node: the reply is queued toward its source.
    Answered,
    /// The control lane it needed was full: dropped and counted.
    Dropped,
}

/// What the data path of one node needs.
#[derive(Debug, Clone)]
pub struct DataPath {
    pub me: NodeName,
    pub routes: SharedRoutes,
    pub stats: Arc<DataStats>,
}

/// Data messages to forward, encoded back to back for one next hop (order kept per hop).
#[derive(Debug)]
struct Batch {
    hop: NodeName,
    lane: BulkLane,
    bytes: Vec<u8>,
    messages: u64,
}

impl DataPath {
    /// Encodes a data message for another node into the batch of its next hop. Returns the
    /// message when this node cannot route it (the owner then routes or bounces it).
    fn stage(&self, routes: &Routes, out: &mut Vec<Batch>, mut env: Envelope) -> Option<Envelope> {
        // The engine's forwarding rule on the route snapshot; anything but a forward over a
        // link up is the owner's.
        let Some((hop, link)) = self.forward_link(routes, &env) else {
            return Some(env);
        };
        routing::spend_hop(&self.me, &mut env, link.rtt_us);
        let bytes = Frame::Routed(env).encode_prefixed();
        match out.iter_mut().find(|b| b.hop == *hop) {
            Some(b) => {
                b.bytes.extend_from_slice(&bytes);
                b.messages += 1;
            }
            None => out.push(Batch {
                hop: hop.clone(),
                lane: link.bulk.clone(),
                bytes,
                messages: 1,
            }),
        }
        None
    }

    /// The next hop and its link when the forwarding rule ([`routing::transit`]) forwards
    /// `env` on the route snapshot; `None` leaves it to the owner: an envelope for this node, one
    /// with no hops left, one the snapshot has no route for.
    fn forward_link<'r>(
        &self,
        routes: &'r Routes,
        env: &Envelope,
    ) -> Option<(&'r NodeName, &'r LinkLanes)> {
        let verdict = routing::transit(&self.me, env, |dst| {
            routes
                .link_to(dst)
                .map(|link| (link, link.1.rtt_us))
                .ok_or((PingFailure::NoRoute, String::new()))
        });
        match verdict {
            routing::Verdict::Forward { hop, .. } => Some(hop),
            routing::Verdict::Deliver | routing::Verdict::Undeliverable(..) => None,
        }
    }

    /// Settles a routed frame read from the control lane of `peer` (connection `conn_id`, `len`
    /// bytes on the wire) without the owner task, when the route snapshot decides it: a frame
    /// for another node goes on its next hop's control lane with the engine's checks (the hop
    /// limit, the next hop the engine chose, this hop recorded in the trace); an echo request
    /// for this node is answered toward its source. Anything else comes back for the owner, as
    /// received: a link the engine does not hold up, frames for this node (but echo requests),
    /// data messages, no hops left, no route, a next hop whose link just closed, frames over
    /// [`FAST_FRAME`].
    pub(crate) fn route_control(
        &self,
        routes: &Routes,
        peer: &NodeName,
        conn_id: u64,
        len: usize,
        mut env: Envelope,
    ) -> Result<Handled, Envelope> {
        if !routes.is_up(peer, conn_id)
            || len > FAST_FRAME
            || matches!(env.body, Body::Message { .. })
        {
            return Err(env);
        }
        if env.dst == self.me {
            return self.answer_echo(routes, env);
        }
        // A well-formed envelope has trace + ttl <= HOP_LIMIT + 1; one that does not is left
        // to the engine, which forwards it as it always did.
        if env.trace.len() > HOP_LIMIT as usize {
            return Err(env);
        }
        let Some((hop, link)) = self.forward_link(routes, &env) else {
            return Err(env);
        };
        if link.control.is_closed() {
            return Err(env);
        }
        routing::spend_hop(&self.me, &mut env, link.rtt_us);
        Ok(self.queue_control(
            hop,
            link,
            Frame::Routed(env),
            &self.stats.control_forwarded,
            Handled::Forwarded,
        ))
    }

    /// The built-in `echo` process, as the engine runs it: the reply carries the path the
    /// request took (this node last) and goes to the request's source by the engine's route.
    fn answer_echo(&self, routes: &Routes, env: Envelope) -> Result<Handled, Envelope> {
        let Body::EchoRequest { seq } = env.body else {
            return Err(env);
        };
        if env.src == self.me || env.trace.len() > HOP_LIMIT as usize {
            return Err(env);
        }
        let Some((hop, link)) = routes.link_to(&env.src) else {
            return Err(env);
        };
        if link.control.is_closed() {
            return Err(env);
        }
        let mut forward = env.trace;
        forward.push(Hop {
            node: self.me.clone(),
            rtt_us: 0,
        });
        let reply = Envelope {
            id: env.id,
            src: self.me.clone(),
            dst: env.src,
            ttl: HOP_LIMIT,
            trace: vec![Hop {
                node: self.me.clone(),
                rtt_us: link.rtt_us,
            }],
            body: Body::EchoReply { seq, forward },
        };
        Ok(self.queue_control(
            hop,
            link,
            Frame::Routed(reply),
            &self.stats.echo_answered,
            Handled::Answered,
        ))
    }

    /// Queues a routed frame on a link's control lane without waiting; a full lane drops it,
    /// counted.
    fn queue_control(
        &self,
        hop: &NodeName,
        link: &LinkLanes,
        frame: Frame,
        counter: &AtomicU64,
        done: Handled,
    ) -> Handled {
        match link
            .control
            .try_send(Queued::control(frame.encode_prefixed()))
        {
            Ok(()) => {
                DataStats::add(counter, 1);
                done
            }
            Err(_) => {
                DataStats::add(&self.stats.control_dropped, 1);
                tracing::warn!(peer = %hop, "control queue full: frame dropped");
                Handled::Dropped
            }
        }
    }

    /// Queues staged batches on their next hops' bulk lanes, waiting for room (at most
    /// [`FORWARD_WAIT`] each; then the batch is dropped and counted).
    async fn flush(&self, out: &mut Vec<Batch>) {
        for b in out.drain(..) {
            match tokio::time::timeout(FORWARD_WAIT, b.lane.send(b.bytes)).await {
                Ok(Ok(())) => DataStats::add(&self.stats.forwarded, b.messages),
                _ => DataStats::add(&self.stats.dropped, b.messages),
            }
        }
    }

    /// Reads one lane stream of a link. Control frames go to the owner as bytes (it decodes and
    /// counts bad ones); bulk frames are decoded here, forwarded when they are for another node,
    /// and handed to the owner in batches otherwise. A broken stream closes the connection.
    pub(crate) async fn read_lane(
        self,
        conn: quinn::Connection,
        mut recv: quinn::RecvStream,
        peer: NodeName,
        conn_id: u64,
        control: mpsc::Sender<Net>,
        bulk: mpsc::Sender<ToOwner>,
    ) {
        let lane = match recv.read_chunk(1, true).await {
            Ok(Some(c)) => c.bytes.first().copied().and_then(Lane::from_byte),
            _ => return,
        };
        let Some(lane) = lane else {
            tracing::warn!(peer = %peer, "closed a link whose peer opened a stream of no known lane");
            conn.close(4u32.into(), b"unknown lane");
            return;
        };
        let mut split = FrameSplitter::default();
        loop {
            let chunk = match recv.read_chunk(READ_CHUNK, true).await {
                Ok(Some(c)) => c.bytes,
                Ok(None) | Err(_) => return,
            };
            split.push(&chunk);
            let mut to_owner = Vec::new();
            let mut staged: Vec<Batch> = Vec::new();
            let mut routes: Option<Arc<Routes>> = None;
            loop {
                let frame = match split.next_frame() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(peer = %peer, "closed a link whose {lane:?} lane broke: {e}");
                        conn.close(4u32.into(), b"bad lane framing");
                        return;
                    }
                };
                if lane == Lane::Control {
                    let msg = match Frame::decode(frame) {
                        Ok(Frame::Routed(env)) => {
                            let r = routes.get_or_insert_with(|| self.routes.get());
                            match self.route_control(r, &peer, conn_id, frame.len(), env) {
                                Ok(_) => continue,
                                Err(env) => Net::Frame {
                                    peer: peer.clone(),
                                    conn_id,
                                    frame: Frame::Routed(env),
                                },
                            }
                        }
                        Ok(frame) => Net::Frame {
                            peer: peer.clone(),
                            conn_id,
                            frame,
                        },
                        // The owner counts and reports it.
                        Err(_) => Net::BadFrame {
                            peer: peer.clone(),
                            conn_id,
                            bytes: frame.to_vec(),
                        },
                    };
                    if control.send(msg).await.is_err() {
                        return;
                    }
                    continue;
                }
                match Frame::decode(frame) {
                    Ok(Frame::Routed(env))
                        if env.dst != self.me && matches!(env.body, Body::Message { .. }) =>
                    {
                        let r = routes.get_or_insert_with(|| self.routes.get());
                        if let Some(env) = self.stage(r, &mut staged, env) {
                            to_owner.push(Frame::Routed(env));
                        }
                    }
                    Ok(f) => to_owner.push(f),
                    // The owner counts and reports it.
                    Err(_) => {
                        let msg = Net::BadFrame {
                            peer: peer.clone(),
                            conn_id,
                            bytes: frame.to_vec(),
                        };
                        if control.send(msg).await.is_err() {
                            return;
                        }
                    }
                }
            }
            // Forwarded messages are batched per read (at most one read plus one frame each).
            self.flush(&mut staged).await;
            if !to_owner.is_empty() {
                let msg = ToOwner {
                    peer: peer.clone(),
                    conn_id,
                    frames: to_owner,
                };
                if bulk.send(msg).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Asks the owner for `target`'s sink counters and returns how many messages it counted from
/// `from`.
async fn sink_count(
    cmd: &mpsc::Sender<Command>,
    target: &NodeName,
    from: &NodeName,
) -> Result<u64, String> {
    let (tx, rx) = oneshot::channel();
    cmd.send(Command::Sink {
        target: target.clone(),
        reset: false,
        timeout: SINK_READ_TIMEOUT,
        reply: tx,
    })
    .await
    .map_err(|_| "the agent is shutting down".to_string())?;
    match tokio::time::timeout(SINK_READ_TIMEOUT + Duration::from_secs(1), rx).await {
        Ok(Ok(Reply::Sink(Ok(r)))) => Ok(r
            .senders
            .iter()
            .find(|s| s.from == from.as_str())
            .map_or(0, |s| s.messages)),
        Ok(Ok(Reply::Sink(Err(e)))) => Err(e),
        Ok(_) => Err("the agent gave no sink answer".into()),
        Err(_) => Err(format!("no answer from the sink of {target} in time")),
    }
}

/// Checks a load request from `me` (the sending node) before anything is sent.
pub fn check_load(me: &NodeName, req: &LoadRequest) -> Result<NodeName, String> {
    let target = NodeName::new(req.target.clone()).map_err(|e| format!("target: {e}"))?;
    if target == *me {
        return Err(format!(
            "{me} cannot load itself (nothing would cross a link); choose another node"
        ));
    }
    if req.count == 0 || req.count > MAX_LOAD_COUNT {
        return Err(format!("count must be between 1 and {MAX_LOAD_COUNT}"));
    }
    if req.size as usize > MAX_PAYLOAD {
        return Err(format!("size must be at most {MAX_PAYLOAD} bytes"));
    }
    Ok(target)
}

/// Sends `req.count` messages of `req.size` bytes to the `sink` of `req.target`, waiting for
/// room on the link rather than dropping, then polls the sink until it has counted them all (or
/// the timeout passes).
pub async fn run_load(
    data: DataPath,
    cmd: mpsc::Sender<Command>,
    req: LoadRequest,
) -> Result<LoadReport, String> {
    let target = check_load(&data.me, &req)?;
    let deadline = Instant::now() + Duration::from_millis(req.timeout_ms.clamp(1, 3_600_000));
    let before = sink_count(&cmd, &target, &data.me).await?;
    // Every message of one load is the same frame (the id only matters for bounces, which the
    // load does not track), so it is encoded once and copied.
    let frame = |rtt_us: u32| {
        Frame::Routed(Envelope {
            id: 0,
            src: data.me.clone(),
            dst: target.clone(),
            ttl: HOP_LIMIT,
            trace: vec![Hop {
                node: data.me.clone(),
                rtt_us,
            }],
            body: Body::Message {
                process: clusterctl_core::engine::SINK.into(),
                payload: vec![0xa5; req.size as usize],
            },
        })
        .encode_prefixed()
    };
    let mut sent = 0u64;
    let mut error = None;
    let started = Instant::now();
    // Small messages go to the lane a batch at a time: `per` frames back to back.
    let mut current: Option<(BulkLane, Vec<u8>, u64)> = None;
    while sent < req.count {
        let (lane, batch, per) = match &current {
            Some(c) => c,
            None => match data.routes.get().lane_to(&target) {
                Some((_, lane, rtt)) => {
                    let one = frame(rtt);
                    let per = (BATCH_BYTES / 4 / one.len()).clamp(1, 4096) as u64;
                    current.insert((lane.clone(), one.repeat(per as usize), per))
                }
                None => {
                    error = Some(format!("no route from {} to {target}", data.me));
                    break;
                }
            },
        };
        let n = (*per).min(req.count - sent);
        let bytes = batch[..batch.len() / *per as usize * n as usize].to_vec();
        match tokio::time::timeout_at(deadline, lane.send(bytes)).await {
            Ok(Ok(())) => sent += n,
            // The link went down: look the route up again (once per message).
            Ok(Err(_)) => {
                current = None;
                if data.routes.get().lane_to(&target).is_none() {
                    error = Some(format!("the route from {} to {target} went down", data.me));
                    break;
                }
            }
            Err(_) => {
                error = Some("the timeout passed while waiting for room on the link".into());
                break;
            }
        }
    }
    DataStats::add(&data.stats.load_sent, sent);
    let mut delivered = 0;
    loop {
        match sink_count(&cmd, &target, &data.me).await {
            Ok(n) => delivered = n.saturating_sub(before),
            Err(e) => {
                error.get_or_insert(e);
                break;
            }
        }
        if delivered >= sent || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(SINK_POLL).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let delivered = delivered.min(sent);
    if delivered < sent && error.is_none() {
        error = Some(format!(
            "the sink of {target} confirmed {delivered} of {sent} messages before the timeout"
        ));
    }
    let per_s = |n: f64| if elapsed > 0.0 { n / elapsed } else { 0.0 };
    Ok(LoadReport {
        from: data.me.to_string(),
        target: target.to_string(),
        size: req.size,
        sent,
        delivered,
        dropped: sent - delivered,
        unsent: req.count - sent,
        elapsed_ms: elapsed * 1000.0,
        msgs_per_s: per_s(delivered as f64),
        mb_per_s: per_s(delivered as f64 * f64::from(req.size)) / 1e6,
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> NodeName {
        NodeName::new(s).unwrap()
    }

    /// One link of the snapshot, and the receiving end of its control lane.
    fn link(conn_id: u64, rtt_us: u32, room: usize) -> (LinkLanes, mpsc::Receiver<Queued>) {
        let (control, rx) = mpsc::channel(room);
        let lanes = LinkLanes {
            conn_id,
            control,
            bulk: BulkLane::new().0,
            rtt_us,
        };
        (lanes, rx)
    }

    /// The data path of gw-us-1: linked to edge-us-1 (connection 1) and gw-eu-1 (connection
    /// 2), routing edge-eu-2 through gw-eu-1. Also returns the control lanes' receivers.
    fn gateway() -> (
        DataPath,
        Routes,
        mpsc::Receiver<Queued>,
        mpsc::Receiver<Queued>,
    ) {
        let (edge, edge_rx) = link(1, 70, 8);
        let (wan, wan_rx) = link(2, 400, 8);
        let hops = HashMap::from([
            (name("edge-us-1"), name("edge-us-1")),
            (name("gw-eu-1"), name("gw-eu-1")),
            (name("edge-eu-2"), name("gw-eu-1")),
        ]);
        let links = HashMap::from([(name("edge-us-1"), edge), (name("gw-eu-1"), wan)]);
        let data = DataPath {
            me: name("gw-us-1"),
            routes: SharedRoutes::default(),
            stats: Arc::default(),
        };
        (data, Routes::new(hops, links), edge_rx, wan_rx)
    }

    fn echo(src: &str, dst: &str, ttl: u8, trace: &[&str]) -> Envelope {
        Envelope {
            id: 42,
            src: name(src),
            dst: name(dst),
            ttl,
            trace: trace
                .iter()
                .map(|n| Hop {
                    node: name(n),
                    rtt_us: 70,
                })
                .collect(),
            body: Body::EchoRequest { seq: 3 },
        }
    }

    /// The envelope queued on a control lane, if any.
    fn queued(rx: &mut mpsc::Receiver<Queued>) -> Option<Envelope> {
        let q = rx.try_recv().ok()?;
        let len = u32::from_be_bytes(q.bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(len + 4, q.bytes.len(), "one length-prefixed frame");
        match Frame::decode(&q.bytes[4..]).unwrap() {
            Frame::Routed(env) => Some(env),
            f => panic!("not a routed frame: {f:?}"),
        }
    }

    #[test]
    fn a_routed_echo_is_forwarded_on_the_next_hops_control_lane_without_the_owner() {
        let (data, routes, mut edge_rx, mut wan_rx) = gateway();
        let req = echo("edge-us-1", "edge-eu-2", HOP_LIMIT, &["edge-us-1"]);
        let got = data.route_control(&routes, &name("edge-us-1"), 1, 100, req.clone());
        assert_eq!(got, Ok(Handled::Forwarded));
        let out = queued(&mut wan_rx).expect("queued toward gw-eu-1");
        // What the engine does: one hop less, this hop recorded with the RTT of the link used.
        let mut want = req;
        want.ttl -= 1;
        want.trace.push(Hop {
            node: name("gw-us-1"),
            rtt_us: 400,
        });
        assert_eq!(out, want);
        assert!(queued(&mut wan_rx).is_none() && queued(&mut edge_rx).is_none());
        assert!(routes.lane_to(&name("edge-eu-2")).unwrap().1.is_idle());

        // The reply comes back the other way, from the WAN link.
        let reply = Envelope {
            src: name("edge-eu-2"),
            dst: name("edge-us-1"),
            body: Body::EchoReply {
                seq: 3,
                forward: want.trace.clone(),
            },
            ..echo(
                "edge-eu-2",
                "edge-us-1",
                HOP_LIMIT - 1,
                &["edge-eu-2", "gw-eu-1"],
            )
        };
        let got = data.route_control(&routes, &name("gw-eu-1"), 2, 100, reply);
        assert_eq!(got, Ok(Handled::Forwarded));
        let out = queued(&mut edge_rx).expect("queued toward edge-us-1");
        assert_eq!(out.ttl, HOP_LIMIT - 2);
        assert_eq!(out.trace.last().unwrap().node, name("gw-us-1"));
        assert_eq!(DataStats::get(&data.stats.control_forwarded), 2);
    }

    #[test]
    fn frames_the_snapshot_cannot_settle_go_to_the_owner_unchanged() {
        let (data, routes, mut edge_rx, wan_rx) = gateway();
        let edge = name("edge-us-1");
        let cases = [
            // No hops left: the engine bounces it with `hop-limit`.
            (
                "no hops left",
                1,
                100,
                echo("edge-us-1", "edge-eu-2", 0, &["edge-us-1"]),
            ),
            // No route in the snapshot: the engine routes it or bounces it.
            (
                "no route",
                1,
                100,
                echo("edge-us-1", "edge-eu-9", 5, &["edge-us-1"]),
            ),
            // Another connection of the peer than the one the engine holds up.
            (
                "stale connection",
                7,
                100,
                echo("edge-us-1", "edge-eu-2", 5, &["edge-us-1"]),
            ),
            // Larger than the fast path takes.
            (
                "large",
                1,
                FAST_FRAME + 1,
                echo("edge-us-1", "edge-eu-2", 5, &["edge-us-1"]),
            ),
            // A trace longer than the hops left allow.
            (
                "long trace",
                1,
                100,
                echo("a", "edge-eu-2", 5, &["a"; HOP_LIMIT as usize + 1]),
            ),
            // For this node, but not an echo request.
            (
                "reply for me",
                1,
                100,
                Envelope {
                    body: Body::EchoReply {
                        seq: 1,
                        forward: Vec::new(),
                    },
                    ..echo("edge-us-1", "gw-us-1", 5, &["edge-us-1"])
                },
            ),
            // An echo request from this node itself.
            ("echo from me", 1, 100, echo("gw-us-1", "gw-us-1", 5, &[])),
            // A data message on the control lane: the engine puts it on the bulk lane.
            (
                "data",
                1,
                100,
                Envelope {
                    body: Body::Message {
                        process: "sink".into(),
                        payload: vec![1],
                    },
                    ..echo("edge-us-1", "edge-eu-2", 5, &["edge-us-1"])
                },
            ),
        ];
        for (what, conn_id, len, env) in cases {
            let got = data.route_control(&routes, &edge, conn_id, len, env.clone());
            assert_eq!(got, Err(env), "{what}");
        }
        // A peer that has no link up in the snapshot.
        let env = echo("edge-us-2", "edge-eu-2", 5, &["edge-us-2"]);
        let got = data.route_control(&routes, &name("edge-us-2"), 1, 100, env.clone());
        assert_eq!(got, Err(env));
        // A next hop whose link just closed: the owner learns of it and routes again.
        drop(wan_rx);
        let env = echo("edge-us-1", "edge-eu-2", 5, &["edge-us-1"]);
        assert_eq!(
            data.route_control(&routes, &edge, 1, 100, env.clone()),
            Err(env)
        );
        assert!(queued(&mut edge_rx).is_none());
        let s = &data.stats;
        assert_eq!(
            DataStats::get(&s.control_forwarded) + DataStats::get(&s.echo_answered),
            0
        );
    }

    #[test]
    fn an_echo_request_for_this_node_is_answered_toward_its_source() {
        let (data, routes, mut edge_rx, mut wan_rx) = gateway();
        let req = echo("edge-us-1", "gw-us-1", HOP_LIMIT, &["edge-us-1"]);
        let got = data.route_control(&routes, &name("edge-us-1"), 1, 100, req);
        assert_eq!(got, Ok(Handled::Answered));
        let reply = queued(&mut edge_rx).expect("the reply, toward edge-us-1");
        // What the engine's `echo` process sends.
        let want = Envelope {
            id: 42,
            src: name("gw-us-1"),
            dst: name("edge-us-1"),
            ttl: HOP_LIMIT,
            trace: vec![Hop {
                node: name("gw-us-1"),
                rtt_us: 70,
            }],
            body: Body::EchoReply {
                seq: 3,
                forward: vec![
                    Hop {
                        node: name("edge-us-1"),
                        rtt_us: 70,
                    },
                    Hop {
                        node: name("gw-us-1"),
                        rtt_us: 0,
                    },
                ],
            },
        };
        assert_eq!(reply, want);
        assert!(queued(&mut wan_rx).is_none());
        assert_eq!(DataStats::get(&data.stats.echo_answered), 1);

        // A source the snapshot has no route to: the engine answers (or bounces) it.
        let req = echo("edge-eu-9", "gw-us-1", 5, &["edge-eu-9", "gw-eu-1"]);
        let got = data.route_control(&routes, &name("gw-eu-1"), 2, 100, req.clone());
        assert_eq!(got, Err(req));
    }

    #[test]
    fn a_full_control_lane_drops_the_frame_and_counts_it() {
        let (data, _, _, _) = gateway();
        let (wan, mut wan_rx) = link(2, 400, 1);
        let (edge, _edge_rx) = link(1, 70, 1);
        let routes = Routes::new(
            HashMap::from([(name("edge-eu-2"), name("gw-eu-1"))]),
            HashMap::from([(name("edge-us-1"), edge), (name("gw-eu-1"), wan)]),
        );
        let edge = name("edge-us-1");
        for expect in [Handled::Forwarded, Handled::Dropped] {
            let env = echo("edge-us-1", "edge-eu-2", 5, &["edge-us-1"]);
            assert_eq!(data.route_control(&routes, &edge, 1, 100, env), Ok(expect));
        }
        assert!(queued(&mut wan_rx).is_some());
        assert_eq!(DataStats::get(&data.stats.control_forwarded), 1);
        assert_eq!(DataStats::get(&data.stats.control_dropped), 1);
    }
}
