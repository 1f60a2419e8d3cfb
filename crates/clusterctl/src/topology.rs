//! (in progress)

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_a: Args) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("not built yet")
}

/// Human rendering of a topology report.
pub fn render_text(t: &clusterctl_api::Topology) -> String {
    format!("{t:?}")
}
