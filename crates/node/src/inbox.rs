//! The owner task's inbox: every message the owner of the engine receives, from connection tasks
//! (`Net`) and from the control API and the load generator ([`Command`]), and its answers.

use crate::meter::WireTotals;
use crate::pki::CertIdentity;
use bytes::Bytes;
use clusterctl_api::{
    CertsReport, KeyringReport, LoadReport, LoadRequest, Members, PingRequest, ReloadReport,
    SecretRequest, Secrets, Topology,
};
use clusterctl_core::engine::{Counters, Reply};
use clusterctl_core::name::NodeName;
use clusterctl_core::wire::{Frame, Hello, HelloAck, Refusal};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::oneshot;

/// Messages from connection tasks to the owner.
pub(crate) enum Net {
    /// Dialer side: the acceptor answered with an ack; the owner checks it.
    Ack {
        conn: quinn::Connection,
        expected: NodeName,
        ack: HelloAck,
        cert: Option<CertIdentity>,
        binding: Vec<u8>,
    },
    /// Acceptor side: a hello to check; the answer goes back on `reply`.
    Hello {
        conn: quinn::Connection,
        hello: Hello,
        cert: Option<CertIdentity>,
        binding: Vec<u8>,
        reply: oneshot::Sender<Result<HelloAck, Refusal>>,
    },
    /// Dialer side: the acceptor refused us.
    PeerRefused { peer: NodeName, refusal: Refusal },
    /// Either side: the first handshake message of the other end is of another protocol
    /// version (read before the rest, see `Handshake::version_of`). The owner checks it with
    /// `Engine::check_hello_version`, reports the refusal and, on the accepting side, sends
    /// it back on `reply` for the dialer to read.
    OtherVersion {
        /// The dialed node (dialer side), else the certificate's identity if any.
        peer: Option<NodeName>,
        cert: Option<CertIdentity>,
        from: SocketAddr,
        version: u8,
        reply: Option<oneshot::Sender<Refusal>>,
    },
    /// Dialer side: the dial failed before any hello was answered.
    DialFailed {
        peer: NodeName,
        reason: String,
        kind: DialFail,
    },
    /// A handshake from this address reached us and stalled.
    InboundStalled { from: SocketAddr },
    /// The TLS layer rejected a certificate.
    TlsRejected {
        claimed: Option<String>,
        reason: String,
    },
    /// A control frame, decoded by the lane reader.
    Frame {
        peer: NodeName,
        conn_id: u64,
        frame: Frame,
    },
    /// A frame that did not decode: the engine counts and reports it.
    BadFrame {
        peer: NodeName,
        conn_id: u64,
        bytes: Vec<u8>,
    },
    Datagram {
        peer: NodeName,
        conn_id: u64,
        bytes: Bytes,
    },
    Closed {
        peer: NodeName,
        conn_id: u64,
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DialFail {
    /// The peer kept another connection to us (both ends dialed at once).
    Duplicate,
    Unreachable,
    RefusedByPeer,
    RefusedByUs,
}

/// Requests from the control API to the owner task.
#[derive(Debug)]
pub enum Command {
    Topology {
        reply: oneshot::Sender<Topology>,
    },
    Members {
        reply: oneshot::Sender<Members>,
    },
    Clock {
        reply: oneshot::Sender<u64>,
    },
    Ping {
        req: PingRequest,
        reply: oneshot::Sender<Reply>,
    },
    Probe {
        timeout_ms: u64,
        reply: oneshot::Sender<Reply>,
    },
    Forget {
        name: String,
        force: bool,
        reply: oneshot::Sender<Result<u64, String>>,
    },
    Metrics {
        reply: oneshot::Sender<MetricsSnapshot>,
    },
    Secret {
        req: SecretRequest,
        reply: oneshot::Sender<Result<KeyringReport, String>>,
    },
    Secrets {
        reply: oneshot::Sender<Secrets>,
    },
    Certs {
        reply: oneshot::Sender<CertsReport>,
    },
    Reload {
        reply: oneshot::Sender<ReloadReport>,
    },
    /// Read (and with `reset`, zero) the `sink` counters of `target`; answered with
    /// [`Reply::Sink`].
    Sink {
        target: NodeName,
        reset: bool,
        timeout: Duration,
        reply: oneshot::Sender<Reply>,
    },
    /// Ask `from` to run a load (answered with [`Reply::Load`]).
    LoadFrom {
        from: NodeName,
        target: NodeName,
        req: LoadRequest,
        reply: oneshot::Sender<Reply>,
    },
    /// A load another node asked for finished.
    LoadDone {
        handle: u64,
        result: Result<LoadReport, String>,
    },
}

/// Numbers for `/metrics`.
#[derive(Debug, Clone)]
pub struct MetricsSnapshot {
    pub counters: Counters,
    pub links_up: u64,
    pub table_records: u64,
    pub clock: u64,
    pub health_score: u64,
    /// UDP traffic of this node's connections (see [`crate::meter`]).
    pub wire: WireTotals,
    /// Data messages forwarded by the data path without the owner task.
    pub data_forwarded: u64,
    /// Data messages dropped because a bulk lane stayed full.
    pub data_dropped: u64,
    /// Data messages sent by the load generator.
    pub load_sent: u64,
    /// Routed control frames forwarded by the data path without the owner task.
    pub control_forwarded: u64,
    /// Echo requests answered by the data path without the owner task.
    pub echo_answered: u64,
    /// Routed control frames the data path dropped on a full control lane.
    pub control_dropped: u64,
}
