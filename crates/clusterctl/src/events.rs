//! `clusterctl events [--json] [--once]`: node and link events, followed live.

use crate::client::AgentArgs;
use crate::client::Client;
use crate::output::out;
use clusterctl_api::Event;
use std::process::ExitCode;

/// Follow node and link events (up, down, suspect, unreachable, refused, drift).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// Print the events recorded so far and exit instead of following.
    #[arg(long)]
    once: bool,
    /// Only events after this sequence number.
    #[arg(long, default_value_t = 0)]
    since: u64,
}

pub fn run(a: Args, agent: &AgentArgs) -> anyhow::Result<ExitCode> {
    let client = Client::resolve(agent)?;
    let path = format!("/v1/events?since={}&follow={}", a.since, !a.once);
    let mut bad = None;
    client.stream_lines(&path, |line| {
        if a.json {
            out(line);
            return true;
        }
        match serde_json::from_str::<Event>(line) {
            Ok(e) => {
                let who = match (&e.node, &e.peer) {
                    (Some(n), Some(p)) => format!("{n} -> {p}"),
                    (Some(n), None) => n.clone(),
                    (None, Some(p)) => p.clone(),
                    (None, None) => "-".into(),
                };
                out(format!(
                    "{}  {:16}  {:24}  {}",
                    e.at,
                    e.kind.as_str(),
                    who,
                    e.reason
                ));
                true
            }
            Err(err) => {
                bad = Some(format!(
                    "the agent sent an event that does not parse: {err}"
                ));
                false
            }
        }
    })?;
    if let Some(b) = bad {
        anyhow::bail!(b);
    }
    Ok(ExitCode::SUCCESS)
}
