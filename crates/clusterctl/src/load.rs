//! `clusterctl load TARGET --count N --size B [--from NODE] [--json]`: data messages to a node's
//! `sink` process, and the throughput the sink confirmed.

use crate::client::AgentArgs;
use crate::client::Client;
use crate::output::{out, out_json};
use clusterctl_api::{LoadReport, LoadRequest};
use std::process::ExitCode;
use std::time::Duration;

/// Send data messages to TARGET's `sink` process and report how many arrived and how fast.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Node whose `sink` receives the messages.
    target: String,
    /// Number of messages.
    #[arg(long, short, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    count: u64,
    /// Payload bytes per message (at most 1048576).
    #[arg(long, short, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=1_048_576))]
    size: u32,
    /// Node that sends (the request travels there through the cluster; default: the agent
    /// answering the CLI).
    #[arg(long)]
    from: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args, agent: &AgentArgs) -> anyhow::Result<ExitCode> {
    // --timeout bounds the whole run (sending and confirmation).
    let run = agent
        .timeout()?
        .unwrap_or(Duration::from_secs(60))
        .min(Duration::from_secs(3600));
    let timeout_ms = u64::try_from(run.as_millis()).unwrap_or(3_600_000).max(1);
    let client = Client::resolve_with(agent, run + Duration::from_secs(15))?;
    let r: LoadReport = client.post(
        "/v1/load",
        &LoadRequest {
            target: a.target,
            from: a.from,
            count: a.count,
            size: a.size,
            timeout_ms,
        },
    )?;
    if a.json {
        out_json(&r)?;
    } else {
        out(render(&r));
    }
    Ok(if r.delivered == r.sent && r.unsent == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn render(r: &LoadReport) -> String {
    let mut s = format!(
        "{} -> {} sink: {} of {} messages of {} bytes delivered in {:.1} ms  ({:.0} msgs/s, {:.1} MB/s)",
        r.from,
        r.target,
        r.delivered,
        r.sent + r.unsent,
        r.size,
        r.elapsed_ms,
        r.msgs_per_s,
        r.mb_per_s
    );
    if r.dropped > 0 || r.unsent > 0 {
        s.push_str(&format!(
            "\n  {} sent but not confirmed, {} never sent",
            r.dropped, r.unsent
        ));
    }
    if let Some(e) = &r.error {
        s.push_str(&format!("\n  {e}"));
    }
    s
}
