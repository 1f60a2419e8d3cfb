//! `clusterctl reload [--all]`: re-read a node's certificate, key and CA bundle without a
//! restart (the same as SIGHUP, or changing the files: the agent checks them every 2 s).

use crate::client::AgentArgs;
use crate::client::Client;
use crate::output::{out, out_json};
use clusterctl_api::ReloadReport;
use std::process::ExitCode;

/// Re-read certificate, key and CA bundle; open links stay up, new handshakes use the new files.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Every node of the lab (otherwise: the agent chosen by --agent).
    #[arg(long)]
    all: bool,
    /// Print the answers as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args, agent: &AgentArgs) -> anyhow::Result<ExitCode> {
    // A node that does not answer is reported and makes the command fail.
    let clients = Client::targets(a.all, agent)?;
    let mut failed = 0;
    let mut reports = Vec::new();
    for c in &clients {
        match c.post::<_, ReloadReport>("/v1/reload", &serde_json::json!({})) {
            Ok(r) => {
                if !r.reloaded {
                    failed += 1;
                }
                reports.push(r);
            }
            // One agent that cannot be asked is a connection error (exit 2), as for every
            // command; with --all the others are still asked.
            Err(e) if !a.all => return Err(e),
            Err(e) => {
                failed += 1;
                eprintln!("clusterctl: {e:#}");
            }
        }
    }
    if a.json {
        out_json(&reports)?;
    } else {
        for r in &reports {
            match (&r.cert, r.reloaded) {
                (Some(c), true) => out(format!(
                    "{:12} reloaded  certificate {} issued by {}  trusts {}  {} days left",
                    r.node,
                    c.leaf,
                    c.issuer,
                    c.trusts.join(","),
                    c.days_left
                )),
                _ => out(format!(
                    "{:12} REFUSED   {} (the material in use stays)",
                    r.node,
                    r.reason.as_deref().unwrap_or("unknown reason")
                )),
            }
            if let Some(c) = &r.contract_changed {
                out(format!("{:12} contract  {c}", r.node));
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
