//! `clusterctl agent --config FILE`: run one node.

use clusterctl_node::agent::{self, AgentOptions};
use clusterctl_node::config::AgentConfig;
use std::path::PathBuf;
use std::process::ExitCode;

/// Run one node of the cluster.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The node's config file (see config.example.toml).
    #[arg(long, short)]
    config: PathBuf,
    /// Come back even though an operator forgot this node (`clusterctl forget`).
    #[arg(long)]
    rejoin: bool,
    /// Start with only this cluster secret (mode 0600), replacing the node's keyring; without
    /// it the keyring persisted in the data directory is used (the config's `secret` at first).
    #[arg(long, value_name = "FILE")]
    secret: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let cfg = match AgentConfig::load(&a.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("clusterctl agent: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CLUSTERCTL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn=warn,rustls=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .try_init();
    // The local preflight checks (no network, no ports: the agent binds those itself). Warnings
    // are logged; a failure the loader let through stops the agent here.
    for c in crate::preflight::local_checks(&a.config) {
        match c.status {
            crate::preflight::Status::Pass => {}
            // `--secret` replaces the persisted keyring, so its state does not matter.
            crate::preflight::Status::Fail if c.name == "keyring" && a.secret.is_some() => {}
            crate::preflight::Status::Warn => tracing::warn!("preflight: {}", c.line()),
            crate::preflight::Status::Fail => {
                eprintln!("clusterctl agent: preflight: {}", c.line());
                return Ok(ExitCode::from(2));
            }
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let opts = AgentOptions {
        rejoin: a.rejoin,
        secret: a.secret,
        ..AgentOptions::default()
    };
    let result = rt.block_on(async move {
        let shutdown = async {
            use tokio::signal::unix::{signal, SignalKind};
            match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => std::future::pending::<()>().await,
            }
        };
        agent::run(cfg, opts, shutdown).await
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("clusterctl agent: {e}");
            Ok(ExitCode::from(e.exit_code()))
        }
    }
}
