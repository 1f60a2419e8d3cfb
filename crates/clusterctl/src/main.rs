//! `clusterctl`: the agent and the operator's CLI.
//!
//! One file per subcommand. Exit codes (documented in docs/cli.md):
//! - 0: success (for `topology`: every expected link is up);
//! - 1: the check ran and failed (a link is not up, a ping got no answer, a lab agent is down);
//! - 2: usage, configuration or connection error.

#![forbid(unsafe_code)]

use clusterctl::client::AgentArgs;
use clusterctl::{
    agent, bench, certs, events, forget, lab, load, members, ping, preflight, reload, secret,
    token, topology,
};

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// One logical cluster across isolated networks.
#[derive(Debug, Parser)]
#[command(name = "clusterctl", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run one node of the cluster.
    Agent(agent::Args),
    /// Show sites, nodes and every expected link (exit 1 if any expected link is not up).
    Topology(topology::Args),
    /// Send probes to a node's `echo` process along the real route.
    Ping(ping::Args),
    /// Send data messages to a node's `sink` process; report delivery and throughput.
    Load(load::Args),
    /// List every node of the table with its status as seen by the agent.
    Members(members::Args),
    /// Follow node and link events.
    Events(events::Args),
    /// Remove a node that is gone for good (writes a tombstone).
    Forget(forget::Args),
    /// Measure a lab on this machine and print a Markdown table (BENCHMARKS.md).
    ///
    /// Rows (each names its unit; samples are runs, pings or agents): `lab up` to converged;
    /// whole-command times of `topology`, `topology --probe` and `members`; ping round trips
    /// inside a site and across sites; agent resident memory at idle; data messages to `sink`
    /// (100-byte msgs/s and 64 KiB MB/s, same site and across sites, ping RTT while a 64 KiB load
    /// saturates the link, memory under load; --load-runs 0 skips them); links up per node beside a
    /// full mesh (N-1); bytes sent per node per second at idle over --idle-window-secs, as UDP
    /// payload and at IP level (+28 bytes of IPv4/UDP header per datagram); CPU per agent at idle
    /// (% of one core, utime+stime); over --kills runs of `kill -9` of a member: ms until a member
    /// of its site shows it `dead`, ms until a member of another site shows it `dead` or
    /// `unreachable`, ms from its restart until every node shows it `alive`, and false
    /// suspicions (suspect/dead events about live nodes). With --membership-sites, the membership
    /// rows again on a second lab of that shape.
    Bench(bench::Args),
    /// Re-read a node's certificate, key and CA bundle without a restart.
    Reload(reload::Args),
    /// Manage the cluster secret keyring (rotation without refused links).
    #[command(subcommand)]
    Secret(secret::SecretCmd),
    /// Cluster CA and node certificates: init, issue, inspect, status.
    #[command(subcommand)]
    Certs(certs::CertsCmd),
    /// Tokens for an agent's TCP control listener (read, app, admin).
    #[command(subcommand)]
    Token(token::TokenCmd),
    /// Check a node's config, files, ports and seeds before starting it (exit 1 on any FAIL).
    Preflight(preflight::Args),
    /// Build and run a cluster on this machine.
    #[command(subcommand)]
    Lab(lab::LabCmd),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Agent(a) => agent::run(a),
        Cmd::Topology(a) => topology::run(a, &cli.agent),
        Cmd::Ping(a) => ping::run(a, &cli.agent),
        Cmd::Load(a) => load::run(a, &cli.agent),
        Cmd::Members(a) => members::run(a, &cli.agent),
        Cmd::Events(a) => events::run(a, &cli.agent),
        Cmd::Forget(a) => forget::run(a, &cli.agent),
        Cmd::Lab(c) => lab::run(c),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Secret(c) => secret::run(c, &cli.agent),
        Cmd::Certs(c) => certs::run(c, &cli.agent),
        Cmd::Preflight(a) => preflight::run(a),
        Cmd::Token(c) => token::run(c),
        Cmd::Reload(a) => reload::run(a, &cli.agent),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("clusterctl: {e:#}");
            ExitCode::from(2)
        }
    }
}
