//! `clusterctl` as a library: every subcommand of the binary (one module per subcommand), the
//! control API client ([`client`]), the lab and its state file ([`lab`], [`lab::state`]) and the
//! output helpers ([`output`]). The binary (src/main.rs) only parses the command line and
//! dispatches; the test kit reads a lab's `lab.json` through [`lab::state`].

#![forbid(unsafe_code)]

pub mod agent;
pub mod bench;
pub mod bench_load;
pub mod bench_membership;
pub mod certs;
pub mod client;
pub mod events;
pub mod forget;
pub mod lab;
pub mod load;
pub mod members;
pub mod output;
pub mod ping;
pub mod preflight;
pub mod reload;
pub mod secret;
pub mod token;
pub mod topology;
