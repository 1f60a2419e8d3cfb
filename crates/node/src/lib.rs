//! The clusterctl agent runtime.
//!
//! [`agent`] runs the owner task that drives the engine; [`inbox`] holds every message it
//! receives; [`control`] serves the control API and [`data`] the lanes of each link, and both
//! reach the owner only through [`inbox`]. The rest are leaves: [`auth`], [`config`], [`files`],
//! [`keyring`], [`meter`], [`persist`], [`pki`], [`tls`]. The map is in docs/DESIGN.md ("Rooms").
#![forbid(unsafe_code)]

/// Software version reported in records and `status`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub mod agent;
pub mod auth;
pub mod config;
pub mod control;
pub mod data;
pub mod files;
pub mod inbox;
pub mod keyring;
pub mod meter;
pub mod persist;
pub mod pki;
pub mod tls;
