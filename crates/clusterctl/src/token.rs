//! `clusterctl token init DIR`: the tokens of an agent's TCP control listener.

use crate::output::out;
use std::path::PathBuf;
use std::process::ExitCode;

/// Tokens for a TCP control listener (`control-tokens` in the agent's config).
#[derive(Debug, clap::Subcommand)]
pub enum TokenCmd {
    /// Write DIR/read.token, DIR/app.token and DIR/admin.token (mode 0600, DIR 0700); existing
    /// token files are kept.
    Init {
        /// Directory to write the tokens into (created if missing).
        dir: PathBuf,
    },
}

pub fn run(cmd: TokenCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCmd::Init { dir } => {
            crate::lab::write_tokens(&dir)?;
            let tokens = clusterctl_node::auth::Tokens::load(&dir)
                .map_err(|e| anyhow::anyhow!("{} ({})", e.problem, e.fix))?;
            for (scope, file) in clusterctl_node::auth::TOKEN_FILES {
                let path = dir.join(file);
                let value = std::fs::read_to_string(&path)?;
                let id = tokens
                    .check(value.trim())
                    .map(|(_, id)| id)
                    .unwrap_or_default();
                out(format!("{scope:5}  {id}  {}", path.display()));
            }
            out(format!(
                "set control-tokens = \"{}\" in the agent's config; give each client only the token it needs",
                dir.display()
            ));
            Ok(ExitCode::SUCCESS)
        }
    }
}
