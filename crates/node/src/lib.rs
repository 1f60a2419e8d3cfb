//! The clusterctl agent runtime.
#![forbid(unsafe_code)]

pub mod agent;
pub mod auth;
pub mod config;
pub mod control;
pub mod data;
pub mod files;
pub mod keyring;
pub mod meter;
pub mod persist;
pub mod pki;
pub mod tls;
