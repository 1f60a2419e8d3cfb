//! `clusterctl`: the agent and the operator's CLI.
//!
//! One file per subcommand. Exit codes (documented in docs/cli.md):
//! - 0: success (for `topology`: every expected link is up);
//! - 1: the check ran and failed (a link is not up, a ping got no answer, a lab agent is down);
//! - 2: usage, configuration or connection error.

#![forbid(unsafe_code)]

mod agent;
mod bench;
mod bench_load;
mod bench_membership;
mod certs;
mod client;
mod events;
mod forget;
mod lab;
mod load;
mod members;
mod ping;
mod preflight;
mod reload;
mod secret;
mod token;
mod topology;

use std::io::Write;

/// Writes to stdout; a closed pipe (`clusterctl events | head`) ends the program quietly with 0.
pub fn out(text: impl std::fmt::Display) {
    let mut o = std::io::stdout().lock();
    if writeln!(o, "{text}").and_then(|_| o.flush()).is_err() {
        std::process::exit(0);
    }
}

/// Prints a value as pretty JSON (the `--json` output of every read command).
pub fn out_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    out(serde_json::to_string_pretty(v)?);
    Ok(())
}

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

/// Which agent a command talks to, with which token, and how long it waits.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AgentArgs {
    /// The agent to ask: unix:PATH (its control socket), HOST:PORT (its TCP control listener,
    /// with a token) or the name of a lab node.
    /// Default: $CLUSTERCTL_AGENT, else the first running node of the lab.
    #[arg(long, global = true, env = "CLUSTERCTL_AGENT")]
    pub agent: Option<String>,
    /// File holding the token for a TCP control listener (mode 0600). Default: $CLUSTERCTL_TOKEN,
    /// which holds the token itself.
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// How long to wait for the agent, e.g. 10s or 500ms. For every request: 10s. For `ping`
    /// and `topology --probe` it is the wait for each probe (default 2s and 1s); for `load` the
    /// whole run (default 60s).
    #[arg(long, global = true, value_name = "DURATION", value_parser = humantime::parse_duration, conflicts_with = "timeout_ms")]
    pub timeout: Option<std::time::Duration>,
    /// The same as --timeout, in milliseconds.
    #[arg(long, global = true, value_name = "MS")]
    pub timeout_ms: Option<u64>,
}

impl AgentArgs {
    /// `--timeout` (or `--timeout-ms`), when given.
    pub fn timeout(&self) -> anyhow::Result<Option<std::time::Duration>> {
        let t = match (self.timeout, self.timeout_ms) {
            (Some(t), _) => Some(t),
            (None, Some(ms)) => Some(std::time::Duration::from_millis(ms)),
            (None, None) => None,
        };
        if t.is_some_and(|t| t.is_zero() || t > std::time::Duration::from_secs(24 * 3600)) {
            anyhow::bail!("--timeout must be between 1ms and 24h");
        }
        Ok(t)
    }

    /// The token for a TCP listener: `--token-file`, else `$CLUSTERCTL_TOKEN`.
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        if let Some(path) = &self.token_file {
            return client::read_token_file(path).map(Some);
        }
        Ok(std::env::var("CLUSTERCTL_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty()))
    }
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
