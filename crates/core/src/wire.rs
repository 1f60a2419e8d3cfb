//! Wire messages. Every frame and datagram starts with [`PROTOCOL_VERSION`]; the rest is postcard.
//!
//! Transport mapping (see docs/PROTOCOL.md):
//! - the dialer opens one bidirectional stream and sends a [`Handshake::Hello`]; the acceptor
//!   answers [`Handshake::Ack`] or [`Handshake::Refuse`]. Only after the ack is the link `up`;
//! - every later [`Frame`] travels on one of two long-lived unidirectional streams per
//!   direction, the lanes: the stream opens with its [`Lane`] byte, then carries frames, each
//!   prefixed by its length (`u32`, big-endian). Data messages ([`Frame::is_data`]) take the
//!   bulk lane, everything else the control lane, so control never waits behind bulk;
//! - failure-detector packets travel as QUIC datagrams: `[version][ring][foca packet]`.
//!
//! Decoding is bounded: frames over [`MAX_FRAME`] are refused before they are read, names are
//! validated while decoding and every record is checked against the table's caps.

use crate::name::{ClusterName, Ident, NodeName, SiteName};
use crate::secret::SecretProof;
use crate::table::{NodeRecord, RecordError, Summary};
use clusterctl_api as api;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Version byte in front of every frame and datagram. 2: frames travel length-prefixed on two
/// long-lived lanes (1 sent one frame per stream).
pub const PROTOCOL_VERSION: u8 = 2;
/// Largest frame accepted on a stream.
pub const MAX_FRAME: usize = 4 * 1024 * 1024;
/// Largest payload of one data message ([`Body::Message`]).
pub const MAX_PAYLOAD: usize = 1024 * 1024;
/// Longest process name a data message may address.
pub const MAX_PROCESS_NAME: usize = 64;
/// Bytes of the length prefix in front of each frame on a lane.
pub const LENGTH_PREFIX: usize = 4;

/// The two lanes of a link. Each is one long-lived unidirectional stream per direction, opened
/// with this byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// Table sync, digests, echo, calls, leave: small and latency-sensitive. Served first.
    Control = 0,
    /// Data messages to processes: large or many, flow-controlled.
    Bulk = 1,
}

impl Lane {
    /// The lane named by a stream's first byte.
    pub fn from_byte(b: u8) -> Option<Lane> {
        match b {
            0 => Some(Lane::Control),
            1 => Some(Lane::Bulk),
            _ => None,
        }
    }
}
/// Largest handshake message accepted.
pub const MAX_HANDSHAKE: usize = 16 * 1024;
/// Largest failure-detector packet: fits a QUIC datagram at the minimum MTU.
pub const MAX_SWIM_PACKET: usize = 1100;
/// Most hops a routed message may take.
pub const HOP_LIMIT: u8 = 8;
/// Most records in one `Records` frame (a full table is sent in chunks).
pub const MAX_RECORDS_PER_FRAME: usize = 2048;

/// What the dialer says first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub cluster: ClusterName,
    pub ident: Ident,
    pub contract_hash: String,
    /// The dialer's own record clock (0 for a node with an empty data directory).
    pub clock: u64,
    pub addr: String,
    /// Set by `agent --rejoin`: come back even over a tombstone.
    pub rejoin: bool,
    pub version: String,
    /// Proof of the dialer's cluster secret, bound to this TLS session.
    pub secret: SecretProof,
}

/// The acceptor's answer when it takes the link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelloAck {
    pub ident: Ident,
    pub contract_hash: String,
    pub clock: u64,
    /// The highest clock the acceptor has seen for the dialer's name (0 if none): a re-deployed
    /// node with an empty disk comes back above it.
    pub last_clock_for_you: u64,
    /// Proof that the acceptor holds the secret the dialer proved, bound to this session.
    pub secret: SecretProof,
}

/// Why a handshake was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RefusalCode {
    /// The topology contract does not allow this link.
    Contract,
    /// The claimed identity does not match the certificate.
    Identity,
    /// Another cluster.
    Cluster,
    /// The node was forgotten by an operator.
    Forgotten,
    /// Incompatible protocol version.
    Version,
    /// One side is `insecure` and the other is not.
    SecurityMode,
    /// The acceptor is at its connection limit.
    Overloaded,
    /// The peer proved no cluster secret this node holds.
    Secret,
}

impl RefusalCode {
    /// Short name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::Contract => "contract",
            RefusalCode::Identity => "identity",
            RefusalCode::Cluster => "cluster",
            RefusalCode::Forgotten => "forgotten",
            RefusalCode::Version => "version",
            RefusalCode::SecurityMode => "security-mode",
            RefusalCode::Overloaded => "overloaded",
            RefusalCode::Secret => "secret",
        }
    }
}

/// A refusal with its reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub code: RefusalCode,
    pub reason: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refused ({}): {}", self.code.as_str(), self.reason)
    }
}

/// Messages of the handshake stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Handshake {
    Hello(Hello),
    Ack(HelloAck),
    Refuse(Refusal),
}

/// One hop of a routed message: the node and the transport RTT of the link it forwarded on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hop {
    pub node: NodeName,
    pub rtt_us: u32,
}

/// A request one node asks another to carry out and answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Call {
    /// Probe the direct link to `peer` with one echo.
    ProbeLink { peer: NodeName, timeout_ms: u64 },
    /// Ping `target` from the called node.
    Ping {
        target: NodeName,
        count: u32,
        timeout_ms: u64,
    },
    /// Read (and, with `reset`, zero after reading) the called node's `sink` counters.
    Sink { reset: bool },
    /// Send a load from the called node (`POST /v1/load` with `from`).
    Load(LoadSpec),
}

/// `count` data messages of `size` bytes to `target`'s `sink`, within `timeout_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadSpec {
    pub target: NodeName,
    pub count: u64,
    pub size: u32,
    pub timeout_ms: u64,
}

/// The answer to a [`Call`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CallReply {
    Probe(ProbeResult),
    Ping(PingReport),
    Sink(SinkReport),
    /// The load's report, or why it could not run.
    Load(Result<LoadReport, String>),
}

// Reports that travel inside frames. Each is the wire's own type, converted to and from its
// `clusterctl_api` twin at the edge: the API types may grow (JSON is self-describing), these
// change only with the protocol version (postcard is not). Field order is the encoding: never
// reorder, and add a field only with a protocol version bump.

/// Why a probe failed (the wire form of [`api::PingFailure`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PingFailure {
    NoRoute,
    Refused,
    Timeout,
    HopLimit,
    UnknownNode,
}

/// Whether a probed link stays inside a site (the wire form of [`api::LinkKind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LinkKind {
    Site,
    Wan,
}

/// One probe of a ping (the wire form of [`api::PingAttempt`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingAttempt {
    pub seq: u32,
    pub ok: bool,
    pub path: Vec<String>,
    pub hops_ms: Vec<f64>,
    pub total_ms: f64,
    pub failure: Option<PingFailure>,
    pub broke_at: Option<String>,
    pub reason: Option<String>,
}

/// A ping's result (the wire form of [`api::PingReport`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingReport {
    pub from: String,
    pub target: String,
    pub ok: bool,
    pub secure: bool,
    pub sent: u32,
    pub received: u32,
    pub attempts: Vec<PingAttempt>,
    pub min_ms: Option<f64>,
    pub p50_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

/// The result of probing one link (the wire form of [`api::ProbeResult`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub from: String,
    pub to: String,
    pub kind: LinkKind,
    pub ok: bool,
    pub rtt_ms: Option<f64>,
    pub error: Option<String>,
}

/// A sink's count for one sender (the wire form of [`api::SinkCount`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkCount {
    pub from: String,
    pub messages: u64,
    pub bytes: u64,
}

/// A node's `sink` counters (the wire form of [`api::SinkReport`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkReport {
    pub node: String,
    pub senders: Vec<SinkCount>,
    pub unattributed: u64,
}

/// A load's result (the wire form of [`api::LoadReport`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub from: String,
    pub target: String,
    pub size: u32,
    pub sent: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub unsent: u64,
    pub elapsed_ms: f64,
    pub msgs_per_s: f64,
    pub mb_per_s: f64,
    pub error: Option<String>,
}

/// A node's role as records and hellos carry it (the wire form of [`api::Role`]; the
/// in-memory [`crate::name::Ident`] and [`NodeRecord`] keep the API type and encode through
/// [`role_on_wire`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Member,
    Gateway,
}

/// A link's state as a record's link report carries it (the wire form of [`api::LinkState`],
/// encoded through [`link_state_on_wire`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkState {
    Up,
    Down,
    OneWay,
    Refused,
    Missing,
    Drift,
}

/// Serde `with` modules that encode an API type through its wire form: a field keeps the API
/// type in memory and the wire's on the wire.
macro_rules! on_wire {
    ($module:ident, $wire:ty, $api:ty) => {
        #[doc = concat!("`#[serde(with = \"crate::wire::", stringify!($module), "\")]`: [`", stringify!($api), "`] encoded as [`", stringify!($wire), "`].")]
        pub mod $module {
            use serde::{Deserialize, Deserializer, Serialize, Serializer};

            pub fn serialize<S: Serializer>(v: &$api, s: S) -> Result<S::Ok, S::Error> {
                <$wire>::from(*v).serialize(s)
            }

            pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<$api, D::Error> {
                <$wire>::deserialize(d).map(Into::into)
            }
        }
    };
}
on_wire!(role_on_wire, super::Role, clusterctl_api::Role);
on_wire!(
    link_state_on_wire,
    super::LinkState,
    clusterctl_api::LinkState
);

/// `From` both ways between a wire enum and its API twin, variant by variant.
macro_rules! same_variants {
    ($wire:ident, $api:ty, $($v:ident),+) => {
        impl From<$api> for $wire {
            fn from(v: $api) -> $wire {
                match v {
                    $(<$api>::$v => $wire::$v,)+
                }
            }
        }
        impl From<$wire> for $api {
            fn from(v: $wire) -> $api {
                match v {
                    $($wire::$v => <$api>::$v,)+
                }
            }
        }
    };
}

/// `From` both ways between a wire struct and its API twin, field by field. A field added to
/// the API type stops this compiling until its conversion is written by hand, saying what the
/// wire carries for it.
macro_rules! same_fields {
    ($wire:ident, $api:path, $($f:ident),+) => {
        impl From<$api> for $wire {
            fn from(v: $api) -> $wire {
                $wire { $($f: Convert::convert(v.$f),)+ }
            }
        }
        impl From<$wire> for $api {
            fn from(v: $wire) -> $api {
                $api { $($f: Convert::convert(v.$f),)+ }
            }
        }
    };
}

/// Field conversion for [`same_fields`]: plain values as they are, nested wire types through
/// their `From`.
trait Convert<T> {
    fn convert(self) -> T;
}

macro_rules! convert_as_is {
    ($($t:ty),+) => { $(impl Convert<$t> for $t { fn convert(self) -> $t { self } })+ };
}
convert_as_is!(String, bool, u32, u64, f64);

impl<A: Convert<B>, B> Convert<Option<B>> for Option<A> {
    fn convert(self) -> Option<B> {
        self.map(Convert::convert)
    }
}

impl<A: Convert<B>, B> Convert<Vec<B>> for Vec<A> {
    fn convert(self) -> Vec<B> {
        self.into_iter().map(Convert::convert).collect()
    }
}

macro_rules! convert_nested {
    ($(($wire:ty, $api:ty)),+) => {
        $(
            impl Convert<$api> for $wire { fn convert(self) -> $api { self.into() } }
            impl Convert<$wire> for $api { fn convert(self) -> $wire { self.into() } }
        )+
    };
}
convert_nested!(
    (PingFailure, api::PingFailure),
    (LinkKind, api::LinkKind),
    (PingAttempt, api::PingAttempt),
    (SinkCount, api::SinkCount)
);

same_variants!(
    PingFailure,
    api::PingFailure,
    NoRoute,
    Refused,
    Timeout,
    HopLimit,
    UnknownNode
);
same_variants!(LinkKind, api::LinkKind, Site, Wan);
same_variants!(Role, api::Role, Member, Gateway);
same_variants!(
    LinkState,
    api::LinkState,
    Up,
    Down,
    OneWay,
    Refused,
    Missing,
    Drift
);
same_fields!(
    PingAttempt,
    api::PingAttempt,
    seq,
    ok,
    path,
    hops_ms,
    total_ms,
    failure,
    broke_at,
    reason
);
same_fields!(
    PingReport,
    api::PingReport,
    from,
    target,
    ok,
    secure,
    sent,
    received,
    attempts,
    min_ms,
    p50_ms,
    max_ms
);
same_fields!(
    ProbeResult,
    api::ProbeResult,
    from,
    to,
    kind,
    ok,
    rtt_ms,
    error
);
same_fields!(SinkCount, api::SinkCount, from, messages, bytes);
same_fields!(SinkReport, api::SinkReport, node, senders, unattributed);
same_fields!(
    LoadReport,
    api::LoadReport,
    from,
    target,
    size,
    sent,
    delivered,
    dropped,
    unsent,
    elapsed_ms,
    msgs_per_s,
    mb_per_s,
    error
);

/// What a routed message carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Body {
    /// To the target's `echo` process.
    EchoRequest {
        seq: u32,
    },
    /// From the target's `echo` process; `forward` is the path the request took.
    EchoReply {
        seq: u32,
        forward: Vec<Hop>,
    },
    /// A hop could not forward message `id`.
    Undeliverable {
        id: u64,
        at: NodeName,
        failure: PingFailure,
        reason: String,
        trace: Vec<Hop>,
    },
    Call {
        call: Call,
    },
    CallReply {
        reply: CallReply,
    },
    /// A data message to the process named `process` on the target (the built-in one is
    /// `sink`). At most [`MAX_PAYLOAD`] bytes; it travels on the bulk lane.
    Message {
        process: String,
        #[serde(with = "payload_bytes")]
        payload: Vec<u8>,
    },
}

/// Payloads as one byte string (postcard: length, then the bytes) rather than a sequence of
/// separately encoded `u8`s.
mod payload_bytes {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    struct Visitor;

    impl serde::de::Visitor<'_> for Visitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a byte string of at most {} bytes", super::MAX_PAYLOAD)
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            if v.len() > super::MAX_PAYLOAD {
                return Err(E::custom(format!(
                    "payload of {} bytes is over the limit of {}",
                    v.len(),
                    super::MAX_PAYLOAD
                )));
            }
            Ok(v.to_vec())
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_bytes(Visitor)
    }
}

/// A message routed hop by hop: member -> gateway -> gateway -> member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Chosen by `src`; replies carry it back.
    pub id: u64,
    pub src: NodeName,
    pub dst: NodeName,
    /// Hops left.
    pub ttl: u8,
    /// Nodes passed so far, `src` first.
    pub trace: Vec<Hop>,
    pub body: Body,
}

/// Frames on unidirectional streams, after the handshake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    /// Node-table records (pushes and answers to digests). Shared: the same record goes to
    /// many peers without a copy; on the wire it is the record itself.
    Records(#[serde(with = "shared_records")] Vec<Arc<NodeRecord>>),
    /// `(name, clock)` of every record the sender holds: anti-entropy. The receiver answers with
    /// the records it holds newer, and, when the flag is set and it is behind, with its own digest.
    Digest(Vec<(NodeName, u64)>, bool),
    /// A routed message.
    Routed(Envelope),
    /// The sender is leaving the cluster gracefully.
    Leaving,
    /// The sender's table in 12 bytes (record count and a hash of every `(name, clock)`): the
    /// periodic anti-entropy round. A receiver whose own summary differs answers with its
    /// [`Frame::Sites`] (at most once per sync period); equal summaries cost nothing more.
    Summary(Summary),
    /// The sender's summary of each site's records, in site order (the answer to a differing
    /// [`Frame::Summary`]). The receiver sends a [`Frame::SiteDigest`] of the sites whose
    /// summaries differ, if any.
    Sites(Vec<(SiteName, Summary)>),
    /// `(name, clock)` of the sender's records of the listed sites: a digest of part of the
    /// table. The receiver answers with its records of those sites that are newer or missing
    /// here and, when the flag is set and it is behind, with its own `SiteDigest` of the same
    /// sites (flag clear).
    SiteDigest(Vec<SiteName>, Vec<(NodeName, u64)>, bool),
}

/// `Vec<Arc<NodeRecord>>` on the wire is a sequence of records.
mod shared_records {
    use super::{Arc, NodeRecord};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(rs: &[Arc<NodeRecord>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(rs.iter().map(|r| &**r))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Arc<NodeRecord>>, D::Error> {
        Ok(Vec::<NodeRecord>::deserialize(d)?
            .into_iter()
            .map(Arc::new)
            .collect())
    }
}

/// Failure-detector rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Ring {
    /// Every node of one site.
    Site = 0,
    /// The gateways of all sites.
    Wan = 1,
}

/// Bytes from a peer that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("empty message")]
    Empty,
    #[error("protocol version {0} is not supported (this build speaks {PROTOCOL_VERSION})")]
    Version(u8),
    #[error("message of {0} bytes is over the limit of {1}")]
    TooLarge(usize, usize),
    #[error("message does not decode: {0}")]
    Decode(String),
    #[error("record breaks a bound: {0}")]
    Record(#[from] RecordError),
    #[error("{0} has {1} entries, over the limit of {2}")]
    TooMany(&'static str, usize, usize),
    #[error("unknown ring {0}")]
    Ring(u8),
    #[error("{0}")]
    Message(&'static str),
}

fn encode_versioned<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![PROTOCOL_VERSION];
    // Serializing our own in-memory values into a Vec cannot fail.
    out.extend(postcard::to_allocvec(value).unwrap_or_default());
    out
}

fn decode_versioned<'a, T: Deserialize<'a>>(bytes: &'a [u8], max: usize) -> Result<T, WireError> {
    if bytes.len() > max {
        return Err(WireError::TooLarge(bytes.len(), max));
    }
    let (&v, rest) = bytes.split_first().ok_or(WireError::Empty)?;
    if v != PROTOCOL_VERSION {
        return Err(WireError::Version(v));
    }
    postcard::from_bytes(rest).map_err(|e| WireError::Decode(e.to_string()))
}

impl Handshake {
    /// Encodes with the version byte.
    pub fn encode(&self) -> Vec<u8> {
        encode_versioned(self)
    }

    /// Decodes a handshake message (at most [`MAX_HANDSHAKE`] bytes).
    pub fn decode(bytes: &[u8]) -> Result<Handshake, WireError> {
        decode_versioned(bytes, MAX_HANDSHAKE)
    }

    /// The protocol version of a handshake message: its first byte, read alone before the
    /// rest, so a hello of another version is refused with [`RefusalCode::Version`] rather
    /// than failing to decode.
    pub fn version_of(bytes: &[u8]) -> Result<u8, WireError> {
        if bytes.len() > MAX_HANDSHAKE {
            return Err(WireError::TooLarge(bytes.len(), MAX_HANDSHAKE));
        }
        bytes.first().copied().ok_or(WireError::Empty)
    }

    /// Encodes a refusal under the version byte `version` (the dialer's). The layout of
    /// [`Handshake::Refuse`] (variant 2, then the code's index and the reason) is the same in
    /// every protocol version from 2 on, so a dialer of another version reads why it was
    /// refused.
    pub fn encode_refusal(refusal: &Refusal, version: u8) -> Vec<u8> {
        let mut out = vec![version];
        // Serializing our own in-memory values into a Vec cannot fail.
        out.extend(postcard::to_allocvec(&Handshake::Refuse(refusal.clone())).unwrap_or_default());
        out
    }

    /// Decodes the acceptor's answer to our hello: a refusal in any protocol version (see
    /// [`Handshake::encode_refusal`]), anything else only in ours ([`WireError::Version`]
    /// otherwise).
    pub fn decode_answer(bytes: &[u8]) -> Result<Handshake, WireError> {
        match Handshake::decode(bytes) {
            Err(WireError::Version(v)) => match postcard::from_bytes(&bytes[1..]) {
                Ok(Handshake::Refuse(r)) => Ok(Handshake::Refuse(r)),
                _ => Err(WireError::Version(v)),
            },
            other => other,
        }
    }
}

impl Refusal {
    /// The refusal of a peer that speaks protocol version `theirs`.
    pub fn version(theirs: u8) -> Refusal {
        Refusal {
            code: RefusalCode::Version,
            reason: format!(
                "peer speaks protocol version {theirs}, this node speaks protocol version {PROTOCOL_VERSION}; upgrade every node of a cluster together"
            ),
        }
    }
}

impl Frame {
    /// Encodes with the version byte.
    pub fn encode(&self) -> Vec<u8> {
        encode_versioned(self)
    }

    /// The length of [`Frame::encode`]'s output, without building it.
    pub fn encoded_len(&self) -> usize {
        1 + postcard::serialize_with_flavor(self, postcard::ser_flavors::Size::default())
            .unwrap_or(0)
    }

    /// The length of an encoded `Records` frame of `count` records that encode to `total`
    /// bytes together (see [`record_encoded_len`]): lets a caller that sends the same records
    /// many times measure each record once.
    pub fn records_encoded_len(count: usize, total: usize) -> usize {
        // Version byte, variant index (Records is the first variant), then the length as a
        // varint (7 bits per byte).
        let mut varint = 1;
        let mut n = count >> 7;
        while n > 0 {
            varint += 1;
            n >>= 7;
        }
        1 + 1 + varint + total
    }
}

/// The encoded length of one record, as inside a [`Frame::Records`].
pub fn record_encoded_len(r: &NodeRecord) -> usize {
    postcard::serialize_with_flavor(r, postcard::ser_flavors::Size::default()).unwrap_or(0)
}

impl Frame {
    /// Encodes with the length prefix of a lane, then the version byte.
    pub fn encode_prefixed(&self) -> Vec<u8> {
        let head = || vec![0, 0, 0, 0, PROTOCOL_VERSION];
        // Serializing our own in-memory values into a Vec cannot fail.
        let mut out = postcard::to_extend(self, head()).unwrap_or_else(|_| head());
        let len = u32::try_from(out.len() - LENGTH_PREFIX).unwrap_or(u32::MAX);
        out[..LENGTH_PREFIX].copy_from_slice(&len.to_be_bytes());
        out
    }

    /// Whether this frame is a data message (bulk lane) rather than control.
    pub fn is_data(&self) -> bool {
        matches!(
            self,
            Frame::Routed(Envelope {
                body: Body::Message { .. },
                ..
            })
        )
    }

    /// The lane this frame travels on.
    pub fn lane(&self) -> Lane {
        if self.is_data() {
            Lane::Bulk
        } else {
            Lane::Control
        }
    }

    /// Decodes and validates a frame (at most [`MAX_FRAME`] bytes).
    pub fn decode(bytes: &[u8]) -> Result<Frame, WireError> {
        let f: Frame = decode_versioned(bytes, MAX_FRAME)?;
        match &f {
            Frame::Records(rs) => {
                if rs.len() > MAX_RECORDS_PER_FRAME {
                    return Err(WireError::TooMany(
                        "records",
                        rs.len(),
                        MAX_RECORDS_PER_FRAME,
                    ));
                }
                for r in rs {
                    r.validate()?;
                }
            }
            Frame::Digest(d, _) => {
                if d.len() > crate::table::MAX_RECORDS {
                    return Err(WireError::TooMany(
                        "digest",
                        d.len(),
                        crate::table::MAX_RECORDS,
                    ));
                }
            }
            Frame::Routed(e) => {
                if e.trace.len() > HOP_LIMIT as usize + 1 {
                    return Err(WireError::TooMany(
                        "trace",
                        e.trace.len(),
                        HOP_LIMIT as usize + 1,
                    ));
                }
                if let Body::Message { process, .. } = &e.body {
                    if process.is_empty() || process.len() > MAX_PROCESS_NAME {
                        return Err(WireError::Message(
                            "a data message needs a process name of 1 to 64 bytes",
                        ));
                    }
                }
                if !numbers_are_finite(&e.body) {
                    return Err(WireError::Decode(
                        "a non-finite number (NaN or infinity)".into(),
                    ));
                }
            }
            Frame::Sites(s) => {
                if s.len() > crate::table::MAX_RECORDS {
                    return Err(WireError::TooMany(
                        "sites",
                        s.len(),
                        crate::table::MAX_RECORDS,
                    ));
                }
            }
            Frame::SiteDigest(s, d, _) => {
                for (what, len) in [("sites", s.len()), ("digest", d.len())] {
                    if len > crate::table::MAX_RECORDS {
                        return Err(WireError::TooMany(what, len, crate::table::MAX_RECORDS));
                    }
                }
            }
            Frame::Leaving | Frame::Summary(_) => {}
        }
        Ok(f)
    }
}

/// Splits the byte stream of a lane into frames (each `[u32 big-endian length][frame]`).
///
/// Bounded: a length over [`MAX_FRAME`] is an error (the stream cannot be resynchronised, so
/// the caller closes it), and at most one frame plus one read is buffered.
#[derive(Debug, Default)]
pub struct FrameSplitter {
    buf: Vec<u8>,
    start: usize,
}

impl FrameSplitter {
    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame (without its length prefix), if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, WireError> {
        let rest = &self.buf[self.start..];
        let Some(prefix) = rest.get(..LENGTH_PREFIX) else {
            return Ok(None);
        };
        let mut len = [0u8; LENGTH_PREFIX];
        len.copy_from_slice(prefix);
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(WireError::TooLarge(len, MAX_FRAME));
        }
        if rest.len() < LENGTH_PREFIX + len {
            return Ok(None);
        }
        let begin = self.start + LENGTH_PREFIX;
        self.start = begin + len;
        Ok(Some(&self.buf[begin..begin + len]))
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// Reports carried between nodes hold only finite numbers: a NaN or infinity from a peer would
/// turn into `null` in the control API's JSON and break every client reading it.
fn numbers_are_finite(body: &Body) -> bool {
    let ok = |v: &[f64]| v.iter().all(|x| x.is_finite());
    let opt = |v: &Option<f64>| v.is_none_or(f64::is_finite);
    match body {
        Body::CallReply {
            reply: CallReply::Ping(r),
        } => {
            opt(&r.min_ms)
                && opt(&r.p50_ms)
                && opt(&r.max_ms)
                && r.attempts
                    .iter()
                    .all(|a| a.total_ms.is_finite() && ok(&a.hops_ms))
        }
        Body::CallReply {
            reply: CallReply::Probe(p),
        } => opt(&p.rtt_ms),
        Body::CallReply {
            reply: CallReply::Load(Ok(r)),
        } => ok(&[r.elapsed_ms, r.msgs_per_s, r.mb_per_s]),
        _ => true,
    }
}

/// Encodes a failure-detector packet for a datagram.
pub fn encode_swim(ring: Ring, packet: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(packet.len() + 2);
    out.push(PROTOCOL_VERSION);
    out.push(ring as u8);
    out.extend_from_slice(packet);
    out
}

/// Splits a datagram into its ring and failure-detector packet.
pub fn decode_swim(bytes: &[u8]) -> Result<(Ring, &[u8]), WireError> {
    if bytes.len() > MAX_SWIM_PACKET + 2 {
        return Err(WireError::TooLarge(bytes.len(), MAX_SWIM_PACKET + 2));
    }
    match bytes {
        [] | [_] => Err(WireError::Empty),
        [v, ..] if *v != PROTOCOL_VERSION => Err(WireError::Version(*v)),
        [_, 0, rest @ ..] => Ok((Ring::Site, rest)),
        [_, 1, rest @ ..] => Ok((Ring::Wan, rest)),
        [_, r, ..] => Err(WireError::Ring(*r)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::tests::rec;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip() {
        let f = Frame::Records(vec![Arc::new(rec("a", "s", 1))]);
        assert_eq!(Frame::decode(&f.encode()).unwrap(), f);
        let e = Frame::Routed(Envelope {
            id: 7,
            src: NodeName::new("a").unwrap(),
            dst: NodeName::new("b").unwrap(),
            ttl: HOP_LIMIT,
            trace: vec![],
            body: Body::EchoRequest { seq: 1 },
        });
        assert_eq!(Frame::decode(&e.encode()).unwrap(), e);
        let s = Frame::Summary(Summary {
            records: 1000,
            hash: u64::MAX,
        });
        assert_eq!(Frame::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn encoded_len_matches_encode() {
        let frames = [
            Frame::Records(vec![
                Arc::new(rec("a", "s", 1)),
                Arc::new(rec("bb", "s", 300)),
            ]),
            Frame::Digest(vec![(NodeName::new("a").unwrap(), 70_000)], true),
            Frame::Summary(Summary {
                records: 3,
                hash: 12_345,
            }),
            Frame::Sites(vec![(
                SiteName::new("s").unwrap(),
                Summary {
                    records: 1,
                    hash: 9,
                },
            )]),
            Frame::SiteDigest(
                vec![SiteName::new("s").unwrap()],
                vec![(NodeName::new("a").unwrap(), 4)],
                true,
            ),
            Frame::Leaving,
        ];
        for f in frames {
            assert_eq!(f.encoded_len(), f.encode().len(), "{f:?}");
            assert_eq!(Frame::decode(&f.encode()).unwrap(), f);
        }
        for n in [0usize, 1, 127, 128, 300] {
            let rs: Vec<Arc<NodeRecord>> = (0..n)
                .map(|i| Arc::new(rec(&format!("n{i}"), "s", i as u64 * 1000)))
                .collect();
            let total = rs.iter().map(|r| record_encoded_len(r)).sum();
            assert_eq!(
                Frame::records_encoded_len(n, total),
                Frame::Records(rs).encode().len(),
                "{n} records"
            );
        }
    }

    #[test]
    fn wrong_version_and_oversize_are_refused() {
        let mut b = Frame::Leaving.encode();
        b[0] = 99;
        assert_eq!(Frame::decode(&b), Err(WireError::Version(99)));
        let big = vec![PROTOCOL_VERSION; MAX_FRAME + 1];
        assert!(matches!(Frame::decode(&big), Err(WireError::TooLarge(..))));
        assert_eq!(Frame::decode(&[]), Err(WireError::Empty));
    }

    #[test]
    fn invalid_names_inside_frames_are_refused() {
        let mut r = rec("a", "s", 1);
        r.addr = "x".repeat(crate::table::MAX_ADDR_LEN + 1);
        let bytes = Frame::Records(vec![Arc::new(r)]).encode();
        assert!(matches!(Frame::decode(&bytes), Err(WireError::Record(_))));
    }

    fn message(payload: Vec<u8>) -> Frame {
        Frame::Routed(Envelope {
            id: 9,
            src: NodeName::new("a").unwrap(),
            dst: NodeName::new("b").unwrap(),
            ttl: HOP_LIMIT,
            trace: vec![],
            body: Body::Message {
                process: "sink".into(),
                payload,
            },
        })
    }

    #[test]
    fn data_messages_round_trip_on_the_bulk_lane() {
        for len in [0, 100, 65_536, MAX_PAYLOAD] {
            let f = message(vec![7; len]);
            assert!(f.is_data());
            assert_eq!(f.lane(), Lane::Bulk);
            let bytes = f.encode();
            // The payload is one byte string: a few bytes of overhead, not one per byte.
            assert!(bytes.len() < len + 32, "{len} -> {}", bytes.len());
            assert_eq!(Frame::decode(&bytes).unwrap(), f);
        }
        assert_eq!(Frame::Leaving.lane(), Lane::Control);
    }

    #[test]
    fn oversized_payloads_and_bad_process_names_are_refused() {
        let f = message(vec![0; MAX_PAYLOAD + 1]);
        assert!(matches!(
            Frame::decode(&f.encode()),
            Err(WireError::Decode(_))
        ));
        let Frame::Routed(mut e) = message(vec![1]) else {
            unreachable!()
        };
        e.body = Body::Message {
            process: String::new(),
            payload: vec![1],
        };
        assert!(matches!(
            Frame::decode(&Frame::Routed(e.clone()).encode()),
            Err(WireError::Message(_))
        ));
        e.body = Body::Message {
            process: "p".repeat(MAX_PROCESS_NAME + 1),
            payload: vec![1],
        };
        assert!(matches!(
            Frame::decode(&Frame::Routed(e).encode()),
            Err(WireError::Message(_))
        ));
    }

    #[test]
    fn load_reports_round_trip_and_non_finite_figures_are_refused() {
        let report = |mb_per_s: f64| LoadReport {
            from: "a".into(),
            target: "b".into(),
            size: 100,
            sent: 10,
            delivered: 10,
            dropped: 0,
            unsent: 0,
            elapsed_ms: 1.5,
            msgs_per_s: 6666.0,
            mb_per_s,
            error: None,
        };
        let frame = |reply: CallReply| {
            let Frame::Routed(mut e) = message(vec![]) else {
                unreachable!()
            };
            e.body = Body::CallReply { reply };
            Frame::Routed(e)
        };
        for reply in [
            CallReply::Load(Ok(report(0.6))),
            CallReply::Load(Err("no route".into())),
        ] {
            let f = frame(reply);
            assert_eq!(Frame::decode(&f.encode()).unwrap(), f);
        }
        let f = frame(CallReply::Load(Ok(report(f64::NAN))));
        assert!(matches!(
            Frame::decode(&f.encode()),
            Err(WireError::Decode(_))
        ));
    }

    /// Every report that rides a frame converts to its API twin and back unchanged, and encodes
    /// to the same bytes as the API type did when it rode the wire itself (so the protocol
    /// version did not change).
    #[test]
    fn wire_reports_convert_both_ways_and_keep_the_bytes_of_their_api_twins() {
        fn check<W, A>(api: A)
        where
            A: Clone + PartialEq + std::fmt::Debug + Serialize + From<W>,
            W: Clone + PartialEq + std::fmt::Debug + Serialize + From<A>,
        {
            let wire = W::from(api.clone());
            assert_eq!(
                postcard::to_allocvec(&wire).unwrap(),
                postcard::to_allocvec(&api).unwrap(),
                "{api:?}"
            );
            assert_eq!(A::from(wire.clone()), api);
            assert_eq!(W::from(A::from(wire.clone())), wire);
        }
        let attempt = |failure: Option<api::PingFailure>| api::PingAttempt {
            seq: 7,
            ok: failure.is_none(),
            path: vec!["a".into(), "b".into()],
            hops_ms: vec![0.25, 1.5],
            total_ms: 1.75,
            failure,
            broke_at: failure.map(|_| "b".into()),
            reason: failure.map(|_| "why".into()),
        };
        check::<PingReport, _>(api::PingReport {
            from: "a".into(),
            target: "c".into(),
            ok: false,
            secure: true,
            sent: 2,
            received: 1,
            attempts: [
                None,
                Some(api::PingFailure::NoRoute),
                Some(api::PingFailure::Refused),
                Some(api::PingFailure::Timeout),
                Some(api::PingFailure::HopLimit),
                Some(api::PingFailure::UnknownNode),
            ]
            .into_iter()
            .map(attempt)
            .collect(),
            min_ms: Some(1.0),
            p50_ms: None,
            max_ms: Some(3.0),
        });
        for (kind, rtt_ms, error) in [
            (api::LinkKind::Site, Some(0.5), None),
            (api::LinkKind::Wan, None, Some("down".to_string())),
        ] {
            check::<ProbeResult, _>(api::ProbeResult {
                from: "a".into(),
                to: "b".into(),
                kind,
                ok: error.is_none(),
                rtt_ms,
                error,
            });
        }
        check::<SinkReport, _>(api::SinkReport {
            node: "b".into(),
            senders: vec![api::SinkCount {
                from: "a".into(),
                messages: 3,
                bytes: 300,
            }],
            unattributed: 9,
        });
        check::<LoadReport, _>(api::LoadReport {
            from: "a".into(),
            target: "b".into(),
            size: 100,
            sent: 10,
            delivered: 9,
            dropped: 1,
            unsent: 2,
            elapsed_ms: 1.5,
            msgs_per_s: 6000.0,
            mb_per_s: 0.6,
            error: Some("timeout".into()),
        });
        for role in [api::Role::Member, api::Role::Gateway] {
            check::<Role, _>(role);
            assert_eq!(
                serde_json::to_string(&Role::from(role)).unwrap(),
                serde_json::to_string(&role).unwrap()
            );
        }
        for state in [
            api::LinkState::Up,
            api::LinkState::Down,
            api::LinkState::OneWay,
            api::LinkState::Refused,
            api::LinkState::Missing,
            api::LinkState::Drift,
        ] {
            check::<LinkState, _>(state);
            assert_eq!(
                serde_json::to_string(&LinkState::from(state)).unwrap(),
                serde_json::to_string(&state).unwrap()
            );
        }
    }

    /// A refusal is sent under the dialer's version byte and read by a dialer of any version;
    /// any other answer of another version is a version mismatch, never a misread.
    #[test]
    fn refusals_are_read_across_versions_and_other_answers_are_not() {
        let ours = PROTOCOL_VERSION;
        let refusal = Refusal::version(ours + 1);
        for v in [ours, ours + 1, 1] {
            let bytes = Handshake::encode_refusal(&refusal, v);
            assert_eq!(Handshake::version_of(&bytes), Ok(v));
            assert_eq!(
                Handshake::decode_answer(&bytes),
                Ok(Handshake::Refuse(refusal.clone()))
            );
        }
        assert_eq!(
            Handshake::encode_refusal(&refusal, ours),
            Handshake::Refuse(refusal.clone()).encode()
        );
        let mut other = Handshake::Hello(Hello {
            cluster: ClusterName::new("c").unwrap(),
            ident: crate::name::Ident {
                name: NodeName::new("a").unwrap(),
                site: SiteName::new("s").unwrap(),
                role: api::Role::Member,
            },
            contract_hash: "h".into(),
            clock: 1,
            addr: "x".into(),
            rejoin: false,
            version: "v".into(),
            secret: crate::secret::Keyring::new(
                crate::secret::Secret::from_bytes(&[1; 32]).unwrap(),
            )
            .prove_primary(
                crate::secret::ProofRole::Hello,
                &NodeName::new("a").unwrap(),
                &[0; 32],
            ),
        })
        .encode();
        other[0] = ours + 1;
        assert_eq!(
            Handshake::decode_answer(&other),
            Err(WireError::Version(ours + 1))
        );
        assert_eq!(Handshake::version_of(&[]), Err(WireError::Empty));
    }

    #[test]
    fn a_lane_splits_back_into_its_frames_whatever_the_read_sizes() {
        let frames = [
            message(vec![3; 100]),
            Frame::Leaving,
            message(vec![4; 70_000]),
        ];
        let stream: Vec<u8> = frames.iter().flat_map(Frame::encode_prefixed).collect();
        for read in [1, 3, 4, 5, 1000, stream.len()] {
            let mut s = FrameSplitter::default();
            let mut got = Vec::new();
            for chunk in stream.chunks(read) {
                s.push(chunk);
                while let Some(f) = s.next_frame().unwrap() {
                    got.push(Frame::decode(f).unwrap());
                }
            }
            assert_eq!(got, frames, "reads of {read} bytes");
            assert_eq!(s.buffered(), 0);
        }
    }

    #[test]
    fn a_lane_length_over_the_frame_limit_is_an_error() {
        let mut s = FrameSplitter::default();
        s.push(&(MAX_FRAME as u32 + 1).to_be_bytes());
        assert!(matches!(s.next_frame(), Err(WireError::TooLarge(..))));
    }

    #[test]
    fn swim_datagrams() {
        let d = encode_swim(Ring::Wan, b"xyz");
        assert_eq!(decode_swim(&d).unwrap(), (Ring::Wan, &b"xyz"[..]));
        assert_eq!(
            decode_swim(&[PROTOCOL_VERSION, 7, 0]),
            Err(WireError::Ring(7))
        );
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Frame::decode(&bytes);
            let _ = Handshake::decode(&bytes);
            let _ = decode_swim(&bytes);
            let mut v = vec![PROTOCOL_VERSION];
            v.extend_from_slice(&bytes);
            let _ = Frame::decode(&v);
            let _ = Handshake::decode(&v);
        }

        #[test]
        fn answers_of_any_version_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = Handshake::version_of(&bytes);
            let _ = Handshake::decode_answer(&bytes);
        }

        #[test]
        fn truncated_frames_never_panic(cut in 0usize..200) {
            let f = Frame::Records(vec![Arc::new(rec("node-a", "site-a", 42)), Arc::new(rec("node-b", "site-a", 43))]);
            let b = f.encode();
            let _ = Frame::decode(&b[..cut.min(b.len())]);
        }
    }
}
