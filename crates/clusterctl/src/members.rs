//! `clusterctl members [--json]`: every node of the table with its status.

use crate::client::AgentArgs;
use crate::client::Client;
use crate::output::{out, out_json};
use clusterctl_api::Members;
use std::process::ExitCode;

/// List every node of the table with its status as seen by the agent.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the list as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args, agent: &AgentArgs) -> anyhow::Result<ExitCode> {
    let m: Members = Client::resolve(agent)?.get("/v1/members")?;
    if a.json {
        out_json(&m)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<[String; 7]> = m
        .members
        .iter()
        .map(|n| {
            [
                n.name.clone(),
                n.site.clone(),
                n.role.to_string(),
                n.status.to_string(),
                n.clock.to_string(),
                n.addr.clone(),
                n.links_up.to_string(),
            ]
        })
        .collect();
    let head = ["NAME", "SITE", "ROLE", "STATUS", "CLOCK", "ADDR", "LINKS"];
    let mut w = head.map(str::len);
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: &[String]| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:w$}", w = w[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    out(line(&head.map(String::from)));
    for r in &rows {
        out(line(r));
    }
    out(format!(
        "{} nodes, as seen by {} (cluster {})",
        m.members.len(),
        m.observer,
        m.cluster
    ));
    Ok(ExitCode::SUCCESS)
}
