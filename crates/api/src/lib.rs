//! Types of the clusterctl control API.
//!
//! The agent serves these as JSON on its control address (loopback by default); the CLI's
//! `--json` output prints the very same values. Field names are part of the public contract and
//! are documented in `docs/api.md`; add fields, never rename them.
//!
//! Timestamps are RFC 3339 strings in UTC with millisecond precision. Optional fields are always
//! present (as `null` when empty): these types also travel inside cluster messages, whose
//! encoding (postcard) is not self-describing.

#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

/// Version of this API. Bumped only on incompatible changes.
pub const API_VERSION: u32 = 1;

/// The role a node plays in its site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Links only inside its own site.
    Member,
    /// Also links to the gateways of contract-allowed sites.
    Gateway,
}

impl Role {
    /// The lower-case name used in configs, certificates and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Gateway => "gateway",
        }
    }

    /// Parses `member` or `gateway`.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "member" => Some(Role::Member),
            "gateway" => Some(Role::Gateway),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A node's status as seen by one observer. Never collapsed: `dead` is confirmed by the node's own
/// site, `unreachable` means only that this observer has no path to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeStatus {
    /// Answering failure-detector probes.
    Alive,
    /// Missed probes; its site is waiting for it to refute the suspicion.
    Suspect,
    /// Confirmed dead by the failure detector of its own site.
    Dead,
    /// Left the cluster gracefully.
    Left,
    /// This observer has no live path to the node (for example its site is behind a cut WAN
    /// link); the node's own site may still see it alive.
    Unreachable,
    /// Removed by an operator (`clusterctl forget`): a tombstone keeps it out.
    Forgotten,
    /// Known from the node table but never yet seen by the failure detector.
    Unknown,
    /// Its handshakes are refused (a wrong secret, say) while it tries to (re)join: it runs,
    /// but is kept out. Shown instead of `left`, `dead` or `unknown`.
    Refused,
}

impl NodeStatus {
    /// The lower-case name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Alive => "alive",
            NodeStatus::Suspect => "suspect",
            NodeStatus::Dead => "dead",
            NodeStatus::Left => "left",
            NodeStatus::Unreachable => "unreachable",
            NodeStatus::Forgotten => "forgotten",
            NodeStatus::Unknown => "unknown",
            NodeStatus::Refused => "refused",
        }
    }
}

impl std::fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a link stays inside a site or joins two sites' gateways.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkKind {
    /// Between two nodes of the same site.
    Site,
    /// Between gateways of two contract-linked sites.
    Wan,
}

impl LinkKind {
    /// The lower-case name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkKind::Site => "site",
            LinkKind::Wan => "wan",
        }
    }
}

/// The state of one expected (or observed) link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkState {
    /// Both ends report an authenticated connection that completed the hello/ack.
    Up,
    /// No connection (an end is dead, unreachable or still dialing).
    Down,
    /// Only one end reports the link up.
    OneWay,
    /// A handshake was refused; `reason` says why.
    Refused,
    /// Expected by the contract but neither end has reported on it.
    Missing,
    /// Up, but the two ends hold different topology contracts.
    Drift,
}

impl LinkState {
    /// The lower-case name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Up => "up",
            LinkState::Down => "down",
            LinkState::OneWay => "one-way",
            LinkState::Refused => "refused",
            LinkState::Missing => "missing",
            LinkState::Drift => "drift",
        }
    }
}

/// `GET /v1/status`: who answers on this control address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub api_version: u32,
    pub cluster: String,
    pub name: String,
    pub site: String,
    pub role: Role,
    /// Cluster address (QUIC, UDP) this node advertises.
    pub addr: String,
    /// Software version of the agent.
    pub version: String,
    /// False only when the operator wrote `insecure = true`.
    pub secure: bool,
    /// The clock of this node's own record in the node table.
    pub clock: u64,
    pub contract_hash: String,
    pub started_at: String,
}

/// `GET /v1/topology`: sites, nodes and every expected link, as seen from `observer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Topology {
    pub cluster: String,
    /// The node that produced this report.
    pub observer: String,
    /// Hash of the observer's topology contract (hex, 16 chars).
    pub contract_hash: String,
    /// True only when every link is mutually authenticated and encrypted.
    pub secure: bool,
    /// Why `secure` is false, when it is.
    #[serde(default)]
    pub insecure_reason: Option<String>,
    /// True when every expected node is `alive` (none refused, none with a second instance
    /// trying to join) and every expected link is `up` (docs/security.md, "What healthy means").
    pub healthy: bool,
    /// Why `healthy` is false, one line per expected node or link at fault.
    #[serde(default)]
    pub problems: Vec<String>,
    pub sites: Vec<SiteView>,
    pub links: Vec<LinkView>,
    /// Present when the report was made with `--probe`: one result per expected link.
    #[serde(default)]
    pub probes: Option<Vec<ProbeResult>>,
    /// Things to act on before they break: certificates close to expiry.
    #[serde(default)]
    pub warnings: Vec<String>,
    pub generated_at: String,
}

impl Topology {
    /// Number of links that are expected by the contract and not `up`.
    pub fn unhealthy_links(&self) -> usize {
        self.links
            .iter()
            .filter(|l| l.expected && l.state != LinkState::Up)
            .count()
    }
}

/// One site of the topology.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteView {
    pub name: String,
    /// Every known node of the site, gateways included.
    pub nodes: Vec<NodeView>,
    /// Gateways the contract lists for this site.
    pub gateways: Vec<String>,
}

/// One node as seen by the observer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub site: String,
    pub role: Role,
    pub status: NodeStatus,
    /// Clock of the node's record (only ever rises).
    pub clock: u64,
    pub addr: String,
    /// Hash of the contract this node runs with.
    pub contract_hash: String,
    /// True when `contract_hash` differs from the observer's.
    pub drift: bool,
}

/// One link. `from` < `to` by name, so each pair appears once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkView {
    pub from: String,
    pub to: String,
    pub kind: LinkKind,
    pub state: LinkState,
    /// Mutually authenticated and encrypted (TLS 1.3 with client certificates).
    pub secure: bool,
    /// Latest smoothed round-trip time measured by the transport.
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    /// When the link entered its current state.
    #[serde(default)]
    pub since: Option<String>,
    /// Protocol of the link, for example `tls1.3`, or `plaintext` when insecure.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Why the link is not up (refusal reason, drift, which end reports what).
    #[serde(default)]
    pub reason: Option<String>,
    /// Whether the contract expects this link. Unexpected links are listed only when refused.
    pub expected: bool,
    /// Fingerprint of the cluster secret both ends proved on this link (null when not up).
    #[serde(default)]
    pub secret_key: Option<String>,
    /// Days until the first of the two ends' certificates expires (null when unknown).
    #[serde(default)]
    pub cert_days_left: Option<i64>,
    /// TLS cipher suite of the link (null when not up or insecure).
    #[serde(default)]
    pub cipher_suite: Option<String>,
    /// The identity each end's certificate proves, `from` first: `NAME.SITE.CLUSTER (ROLE,
    /// cert FINGERPRINT)`, as published in the node table.
    #[serde(default)]
    pub identities: Vec<String>,
}

/// `GET /v1/members`: every node in the table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Members {
    pub cluster: String,
    pub observer: String,
    /// False when the observer runs `insecure` or any node in the table does.
    pub secure: bool,
    pub members: Vec<MemberView>,
}

/// One row of `members`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberView {
    pub name: String,
    pub site: String,
    pub role: Role,
    pub status: NodeStatus,
    pub clock: u64,
    pub addr: String,
    pub contract_hash: String,
    pub version: String,
    /// Number of links this node reports up.
    pub links_up: u32,
}

/// The kind of an [`Event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A node became alive (joined, or recovered from suspicion).
    NodeUp,
    /// A node is suspected by its site's failure detector.
    NodeSuspect,
    /// A node was confirmed dead by its own site.
    NodeDead,
    /// A node left gracefully.
    NodeLeft,
    /// A node (or a whole site) became unreachable from this observer.
    NodeUnreachable,
    /// An operator removed a node (tombstone).
    NodeForgotten,
    /// A link completed its hello/ack.
    LinkUp,
    /// A link closed.
    LinkDown,
    /// A handshake was refused (by this node or by the peer).
    LinkRefused,
    /// A peer runs with a different topology contract.
    Drift,
    /// This node raised its own clock (restart, re-deploy, change).
    ClockRaised,
    /// This node's cluster-secret keyring changed (install, use, remove).
    SecretChanged,
    /// This node's certificate, key or CA bundle was reloaded (or a reload was refused).
    TlsReloaded,
    /// A call to the control API that changes something (or was refused): who made it, what
    /// it asked, and the answer's status.
    ControlCall,
    /// `reload` found a topology contract on disk that differs from the one in use.
    ContractChanged,
    /// Anything else worth an operator's eye (bad frames, caps hit).
    Warning,
}

impl EventKind {
    /// The kebab-case name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::NodeUp => "node-up",
            EventKind::NodeSuspect => "node-suspect",
            EventKind::NodeDead => "node-dead",
            EventKind::NodeLeft => "node-left",
            EventKind::NodeUnreachable => "node-unreachable",
            EventKind::NodeForgotten => "node-forgotten",
            EventKind::LinkUp => "link-up",
            EventKind::LinkDown => "link-down",
            EventKind::LinkRefused => "link-refused",
            EventKind::Drift => "drift",
            EventKind::ClockRaised => "clock-raised",
            EventKind::SecretChanged => "secret-changed",
            EventKind::TlsReloaded => "tls-reloaded",
            EventKind::ControlCall => "control-call",
            EventKind::ContractChanged => "contract-changed",
            EventKind::Warning => "warning",
        }
    }
}

/// One entry of `GET /v1/events` (newline-delimited JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Sequence number on the observer, rising by one per event.
    pub seq: u64,
    pub at: String,
    /// The node that recorded the event.
    pub observer: String,
    pub kind: EventKind,
    /// The node the event is about.
    #[serde(default)]
    pub node: Option<String>,
    /// The other end, for link events.
    #[serde(default)]
    pub peer: Option<String>,
    pub reason: String,
}

/// `POST /v1/ping`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingRequest {
    pub target: String,
    /// Node that sends the probes; the answering agent when absent.
    #[serde(default)]
    pub from: Option<String>,
    pub count: u32,
    /// Time to wait for each answer.
    pub timeout_ms: u64,
}

/// Why a probe failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PingFailure {
    /// A hop had no live next hop toward the target.
    NoRoute,
    /// The contract forbids the path.
    Refused,
    /// No answer in time.
    Timeout,
    /// The hop limit ran out.
    HopLimit,
    /// The target (or `from`) is not in the node table.
    UnknownNode,
}

/// One probe of a ping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingAttempt {
    pub seq: u32,
    pub ok: bool,
    /// Nodes the probe went through, origin first, target last (when it arrived).
    pub path: Vec<String>,
    /// Transport RTT of each link of `path`, in order.
    pub hops_ms: Vec<f64>,
    /// Measured round trip, origin to target and back.
    pub total_ms: f64,
    #[serde(default)]
    pub failure: Option<PingFailure>,
    /// Node where the path broke.
    #[serde(default)]
    pub broke_at: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

/// `POST /v1/ping` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingReport {
    pub from: String,
    pub target: String,
    pub ok: bool,
    /// False when the probing node runs `insecure` (links unauthenticated).
    pub secure: bool,
    pub sent: u32,
    pub received: u32,
    pub attempts: Vec<PingAttempt>,
    #[serde(default)]
    pub min_ms: Option<f64>,
    #[serde(default)]
    pub p50_ms: Option<f64>,
    #[serde(default)]
    pub max_ms: Option<f64>,
}

/// The result of probing one expected link (`topology --probe`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub from: String,
    pub to: String,
    pub kind: LinkKind,
    pub ok: bool,
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    #[serde(default)]
    pub error: Option<String>,
}

/// `POST /v1/forget`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForgetRequest {
    pub name: String,
    /// Forget the node even though this observer sees it alive or suspect (it will be refused
    /// everywhere and exit).
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/forget` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForgetReport {
    pub name: String,
    /// Clock of the tombstone that now stands for the node.
    pub clock: u64,
}

/// `POST /v1/secret`: change this node's keyring.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretRequest {
    /// `install`, `use` or `remove`.
    pub op: String,
    /// For `install`: path of the secret file on the agent's machine (mode 0600).
    #[serde(default)]
    pub file: Option<String>,
    /// For `use` and `remove`: the key id (16 hex characters).
    #[serde(default)]
    pub key: Option<String>,
}

/// One node's keyring (never the secrets, only their fingerprints).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyringReport {
    pub node: String,
    /// The key this node proves with.
    pub primary: String,
    /// Every key it accepts, `primary` first.
    pub keys: Vec<String>,
    /// Whether the request changed anything.
    pub changed: bool,
}

/// `GET /v1/secrets`: which cluster secrets the nodes hold, from the node table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Secrets {
    pub observer: String,
    /// Live nodes counted (the `m` of `n/m`).
    pub nodes: u32,
    pub keys: Vec<SecretKeyView>,
}

/// One cluster secret, by fingerprint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretKeyView {
    pub id: String,
    /// Nodes that hold it (accept it).
    pub holders: u32,
    /// Nodes that use it (prove with it).
    pub in_use_by: u32,
    /// Nodes that do not hold it.
    pub missing_on: Vec<String>,
}

/// The certificate a node presents, as published in its record (`GET /v1/certs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertSummaryView {
    /// SHA-256 fingerprint of the node's certificate (DER), first 16 hex characters.
    pub leaf: String,
    /// Fingerprint (same form) of the CA certificate in its bundle that issued it.
    pub issuer: String,
    /// Fingerprints of every CA certificate in the node's bundle (what it trusts).
    pub trusts: Vec<String>,
    pub not_before: String,
    pub not_after: String,
    /// Whole days until `not_after` (negative once expired).
    pub days_left: i64,
}

/// One node of `GET /v1/certs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeCertView {
    pub name: String,
    pub site: String,
    pub role: Role,
    /// Null for nodes running `insecure`, or not yet known.
    pub cert: Option<CertSummaryView>,
}

/// One CA seen in the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaView {
    pub fingerprint: String,
    /// Nodes whose bundle holds it.
    pub trusted_by: u32,
    /// Nodes whose certificate it issued.
    pub issued_for: u32,
}

/// `GET /v1/certs`: which CA and certificate every node presents, from the node table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertsReport {
    pub observer: String,
    /// Live nodes counted.
    pub nodes: u32,
    pub node_certs: Vec<NodeCertView>,
    pub cas: Vec<CaView>,
}

/// `POST /v1/reload`: re-read the certificate, key and CA bundle files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadReport {
    pub node: String,
    /// True when the new files were taken into use; false when they were refused (the old
    /// material stays in use) — `reason` says why.
    pub reloaded: bool,
    pub reason: Option<String>,
    /// The certificate in use after the request.
    pub cert: Option<CertSummaryView>,
    /// Set when the topology contract on disk differs from the one in use: a change to the
    /// contract needs a restart; this says so instead of ignoring it.
    #[serde(default)]
    pub contract_changed: Option<String>,
}

/// Body of every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_serialize_in_kebab_case() {
        assert_eq!(
            serde_json::to_string(&LinkState::OneWay).unwrap(),
            "\"one-way\""
        );
        assert_eq!(
            serde_json::to_string(&EventKind::LinkRefused).unwrap(),
            "\"link-refused\""
        );
        assert_eq!(
            serde_json::to_string(&Role::Gateway).unwrap(),
            "\"gateway\""
        );
    }

    #[test]
    fn optional_fields_survive_a_non_self_describing_encoding() {
        let p = ProbeResult {
            from: "a".into(),
            to: "b".into(),
            kind: LinkKind::Site,
            ok: false,
            rtt_ms: None,
            error: Some("x".into()),
        };
        let json = serde_json::to_string(&p).unwrap();
        assert!(json.contains("\"rtt_ms\":null"), "{json}");
        let back: ProbeResult = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn as_str_matches_serde_names() {
        for s in [
            LinkState::Up,
            LinkState::Down,
            LinkState::OneWay,
            LinkState::Refused,
            LinkState::Missing,
            LinkState::Drift,
        ] {
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
    }
}

/// What a node's built-in `sink` process has received from one sender.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkCount {
    /// The sending node.
    pub from: String,
    /// Messages counted.
    pub messages: u64,
    /// Payload bytes counted.
    pub bytes: u64,
}

/// The counters of a node's `sink` process (carried in cluster messages and `POST /v1/load`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkReport {
    /// The node whose sink this is.
    pub node: String,
    /// One entry per sender, sorted by name.
    pub senders: Vec<SinkCount>,
    /// Messages from senders beyond the sink's per-sender limit (counted, not attributed).
    pub unattributed: u64,
}

/// `POST /v1/load`: send `count` messages of `size` payload bytes to the `sink` process of
/// `target`, from the answering agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadRequest {
    pub target: String,
    /// Node that sends (the request travels there through the cluster); the answering agent
    /// when absent.
    #[serde(default)]
    pub from: Option<String>,
    pub count: u64,
    /// Payload bytes per message.
    pub size: u32,
    /// How long to wait for the sink to confirm every message (sending included).
    #[serde(default = "default_load_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_load_timeout_ms() -> u64 {
    60_000
}

/// `POST /v1/load` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub from: String,
    pub target: String,
    /// Payload bytes per message.
    pub size: u32,
    /// Messages handed to the link (after waiting for queue space when the link was busy).
    pub sent: u64,
    /// Messages the target's sink confirmed.
    pub delivered: u64,
    /// Messages that were sent but not confirmed (`sent - delivered`): lost on the way or not
    /// arrived before the timeout.
    pub dropped: u64,
    /// Messages never sent (no route, the link went down, or the timeout passed while waiting
    /// for queue space).
    pub unsent: u64,
    /// From the first message sent to the sink's confirmation.
    pub elapsed_ms: f64,
    /// Delivered messages per second.
    pub msgs_per_s: f64,
    /// Delivered payload megabytes (10^6 bytes) per second.
    pub mb_per_s: f64,
    /// Why the run ended early, if it did.
    #[serde(default)]
    pub error: Option<String>,
}
