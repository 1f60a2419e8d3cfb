//! (in progress)
#[derive(Debug, clap::Subcommand)]
pub enum LabCmd { Up }
pub fn run(_c: LabCmd) -> anyhow::Result<std::process::ExitCode> { anyhow::bail!("not built yet") }
