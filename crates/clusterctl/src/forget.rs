//! `clusterctl forget NAME`: remove a node that is gone for good.

use crate::client::AgentArgs;
use crate::client::Client;
use crate::output::{out, out_json};
use clusterctl_api::{ForgetReport, ForgetRequest};
use std::process::ExitCode;

/// Remove a node for good: a tombstone keeps it from being gossiped back. The node itself is
/// refused from then on; restart it with `agent --rejoin` to bring it back.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Name of the node to forget.
    name: String,
    /// Forget the node even though the agent sees it alive (it will exit and be refused by
    /// every peer). Without it, forgetting a live node is refused.
    #[arg(long)]
    force: bool,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args, agent: &AgentArgs) -> anyhow::Result<ExitCode> {
    let r: ForgetReport = Client::resolve(agent)?.post(
        "/v1/forget",
        &ForgetRequest {
            name: a.name,
            force: a.force,
        },
    )?;
    if a.json {
        out_json(&r)?;
    } else {
        out(format!(
            "forgot {} (tombstone at clock {}): it will not be gossiped back; to bring it back, start it with `clusterctl agent --rejoin`",
            r.name, r.clock
        ));
    }
    Ok(ExitCode::SUCCESS)
}
