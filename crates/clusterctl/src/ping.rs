//! `clusterctl ping NODE [--from NODE] [--count N] [--json]`: probes to a node's `echo` process.

use crate::client::AgentArgs;
use crate::client::Client;
use crate::output::{out, out_json};
use clusterctl_api::{PingAttempt, PingReport, PingRequest};
use std::process::ExitCode;
use std::time::Duration;

/// Default wait for each probe's answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for one probe the agent accepts.
const MAX_PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// Send probes along the real route and show the hop path with per-hop and total RTT.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Node to ping.
    node: String,
    /// Node that sends the probes (default: the agent answering the CLI).
    #[arg(long)]
    from: Option<String>,
    /// Number of probes, one after the other.
    #[arg(long, short, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    count: u32,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args, agent: &AgentArgs) -> anyhow::Result<ExitCode> {
    // --timeout is the wait for each probe; the request may take all of them, and then some.
    let per_probe = agent
        .timeout()?
        .unwrap_or(PROBE_TIMEOUT)
        .min(MAX_PROBE_TIMEOUT);
    let client = Client::resolve_with(agent, per_probe * (a.count + 1) + Duration::from_secs(5))?;
    let req = PingRequest {
        target: a.node,
        from: a.from,
        count: a.count,
        timeout_ms: u64::try_from(per_probe.as_millis())
            .unwrap_or(u64::MAX)
            .max(1),
    };
    let r: PingReport = client.post("/v1/ping", &req)?;
    if a.json {
        out_json(&r)?;
    } else {
        for at in &r.attempts {
            out(render_attempt(&r, at));
        }
        if !r.secure {
            out(format!(
                "secure=false: {} runs with insecure = true (no authentication)",
                r.from
            ));
        }
        if r.attempts.len() > 1 {
            let f = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.2}ms"));
            out(format!(
                "{}/{} ok  min {}  p50 {}  max {}",
                r.received,
                r.sent,
                f(r.min_ms),
                f(r.p50_ms),
                f(r.max_ms)
            ));
        }
    }
    Ok(if r.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn render_attempt(r: &PingReport, a: &PingAttempt) -> String {
    let hops = a
        .hops_ms
        .iter()
        .map(|h| format!("{h:.2}"))
        .collect::<Vec<_>>()
        .join(" / ");
    if a.ok {
        format!(
            "{}   ok  total {:.2}ms  (hops {hops})",
            a.path.join(" -> "),
            a.total_ms
        )
    } else {
        let failure = a.failure.map_or("failed", |f| match f {
            clusterctl_api::PingFailure::NoRoute => "no-route",
            clusterctl_api::PingFailure::Refused => "refused",
            clusterctl_api::PingFailure::Timeout => "timeout",
            clusterctl_api::PingFailure::HopLimit => "hop-limit",
            clusterctl_api::PingFailure::UnknownNode => "unknown-node",
        });
        let path = if a.path.is_empty() {
            r.from.clone()
        } else {
            a.path.join(" -> ")
        };
        let at = a
            .broke_at
            .as_deref()
            .map_or(String::new(), |b| format!(" at {b}"));
        format!(
            "{path} -x-> {}   FAIL {failure}{at}: {}",
            r.target,
            a.reason.as_deref().unwrap_or("")
        )
    }
}
