//! The clusterctl agent runtime.
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
