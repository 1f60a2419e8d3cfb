//! Sans-IO protocol core of clusterctl.
//!
//! Nothing here reads a clock, opens a socket or spawns a task: time and randomness are inputs,
//! and what to send, when to wake and what happened are outputs. The runtime (`clusterctl-node`)
//! and the simulator (`clusterctl-sim`) drive the very same code.
//!
//! | module | what it holds |
//! |---|---|
//! | [`name`] | validated node, site and cluster names; [`name::Ident`] |
//! | [`contract`] | the topology contract: sites, gateways, allowed links, canonical hash |
//! | [`table`] | the node table: records, clock rule, tombstones, caps |
//! | [`secret`] | the cluster secret keyring and handshake proofs (HMAC bound to the TLS session) |
//! | [`snapshot`] | the on-disk form of the table (magic, version, crc) |
//! | [`wire`] | handshake messages, frames, routed envelopes, datagrams |
//! | [`health`] | local health (Lifeguard-style) that slows down a slow observer's accusations |
//! | [`swim`] | failure detection rings (foca) with local-health-scaled timers |
//! | [`instance`] | one live instance per identity: the handshake rule against a copied identity |
//! | [`verdict`] | what `healthy` means: expected nodes, their problems, the refused end of a link |
//! | [`engine`] | one node: links wanted, handshake decisions, table sync, routing, status, reports |

#![forbid(unsafe_code)]

pub mod contract;
pub mod engine;
pub mod health;
pub mod instance;
pub mod name;
pub mod routing;
pub mod secret;
pub mod snapshot;
pub mod swim;
pub mod table;
pub mod verdict;
pub mod wire;

pub use clusterctl_api as api;

/// Monotonic time since the node (or simulation) started. The core never reads a clock: every
/// input carries `now`.
pub type Time = std::time::Duration;
