//! The clusterctl agent runtime.
#![forbid(unsafe_code)]

pub mod pki;
pub mod config;
pub mod tls;
