//! `clusterctl secret generate|install|use|remove|list`: the cluster-secret keyring.
//!
//! Rotation without one refused link: `install NEW --all`, then `use ID --all`, then
//! `remove OLD --all` (see docs/security.md). A secret never travels: `install` names a file
//! that the agent reads on its own machine, and reports show only fingerprints.

use crate::client::AgentArgs;
use crate::client::Client;
use crate::output::{out, out_json};
use clusterctl_api::{KeyringReport, SecretRequest, Secrets};
use clusterctl_core::secret::Secret;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

/// Manage the cluster secret keyring.
#[derive(Debug, clap::Subcommand)]
pub enum SecretCmd {
    /// Write a new random secret to FILE (mode 0600; never overwrites).
    Generate { file: PathBuf },
    /// Add a secret to a node's keyring: accepted from peers at once, not yet used.
    Install {
        /// Secret file on the agent's machine (mode 0600).
        file: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Make a held secret the one a node proves with.
    Use {
        /// Key id (see `secret list`).
        key: String,
        #[command(flatten)]
        target: Target,
    },
    /// Remove a secret a node no longer needs (not the one in use).
    Remove {
        key: String,
        #[command(flatten)]
        target: Target,
    },
    /// Which secrets the nodes hold and use, `[held/nodes]`.
    List {
        #[arg(long)]
        json: bool,
    },
}

/// Which nodes an operation applies to.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// Every running node of the lab (otherwise: the agent chosen by --agent).
    #[arg(long)]
    all: bool,
}

pub fn run(cmd: SecretCmd, agent: &AgentArgs) -> anyhow::Result<ExitCode> {
    match cmd {
        SecretCmd::Generate { file } => generate(&file),
        SecretCmd::Install { file, target } => {
            let file = std::path::absolute(&file)?;
            let req = SecretRequest {
                op: "install".into(),
                file: Some(file.to_string_lossy().into_owned()),
                key: None,
            };
            apply(&req, &target, agent)
        }
        SecretCmd::Use { key, target } => apply(
            &SecretRequest {
                op: "use".into(),
                file: None,
                key: Some(key),
            },
            &target,
            agent,
        ),
        SecretCmd::Remove { key, target } => apply(
            &SecretRequest {
                op: "remove".into(),
                file: None,
                key: Some(key),
            },
            &target,
            agent,
        ),
        SecretCmd::List { json } => list(json, agent),
    }
}

fn generate(file: &PathBuf) -> anyhow::Result<ExitCode> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("the system random number generator failed"))?;
    let secret = Secret::from_bytes(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot create {}: {e} (it is never overwritten)",
                file.display()
            )
        })?;
    f.write_all(secret.to_text().as_bytes())?;
    f.sync_all()?;
    out(format!(
        "wrote a new secret to {} (key id {})",
        file.display(),
        secret.id()
    ));
    Ok(ExitCode::SUCCESS)
}

fn apply(req: &SecretRequest, target: &Target, agent: &AgentArgs) -> anyhow::Result<ExitCode> {
    // A node that does not answer is reported and makes the command fail.
    let clients = Client::targets(target.all, agent)?;
    let mut failed = 0;
    for c in &clients {
        match c.post::<_, KeyringReport>("/v1/secret", req) {
            Ok(r) => out(format!(
                "{:12} {}  in use {}  holds {}",
                r.node,
                if r.changed { "changed  " } else { "unchanged" },
                r.primary,
                r.keys.join(",")
            )),
            // One agent that cannot be asked is a connection error (exit 2), as for every
            // command; with --all the others are still asked.
            Err(e) if !target.all => return Err(e),
            Err(e) => {
                failed += 1;
                eprintln!("clusterctl: {e:#}");
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn list(json: bool, agent: &AgentArgs) -> anyhow::Result<ExitCode> {
    let s: Secrets = Client::resolve(agent)?.get("/v1/secrets")?;
    if json {
        out_json(&s)?;
        return Ok(ExitCode::SUCCESS);
    }
    for k in &s.keys {
        let missing = if k.missing_on.is_empty() {
            String::new()
        } else {
            format!("  missing on {}", k.missing_on.join(","))
        };
        out(format!(
            "{}  held [{}/{}]  in use [{}/{}]{missing}",
            k.id, k.holders, s.nodes, k.in_use_by, s.nodes
        ));
    }
    out(format!("{} nodes, as seen by {}", s.nodes, s.observer));
    Ok(ExitCode::SUCCESS)
}
