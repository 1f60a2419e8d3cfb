//! Simulation at scale: builds a large cluster in the deterministic simulator, measures join
//! convergence, death dissemination, steady-state bytes, links and memory per node, and prints
//! a Markdown table and the seed that replays the run.
//!
//! ```text
//! cargo run --release -p clusterctl-sim --bin scale -- --sites 10 --per-site 100 --gateways 2 --seed 1
//! ```

use clusterctl_sim::scale::{run, ScaleSpec};
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage: scale [--sites N] [--per-site N] [--gateways N] [--seed N] \
[--phase-limit SECS] [--window SECS] [--probe-ms MS] [--suspicion-ms MS] [--link-settle-ms MS] [--quiet]
  --sites       number of sites (default 10)
  --per-site    nodes per site, gateways included (default 100)
  --gateways    gateways per site (default 2)
  --seed        seed of the run (default 1; the same seed gives the same virtual-time figures)
  --phase-limit longest virtual time a phase may take, seconds (default 120)
  --window      steady-state window over which bytes are counted, seconds (default 10)
  --probe-ms    site-ring probe period, ms (default: the production timing; timeout half of it)
  --suspicion-ms site-ring suspicion before dead, ms (default: the production timing)
  --link-settle-ms how long new links wait before they are published, ms (default: production)
  --quiet       no progress lines on stderr";

fn parse(args: &[String]) -> Result<ScaleSpec, String> {
    let mut spec = ScaleSpec::new(10, 100, 2, 1);
    spec.progress = true;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--quiet" {
            spec.progress = false;
            continue;
        }
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let n: u64 = value
            .parse()
            .map_err(|_| format!("{flag}: {value:?} is not a whole number"))?;
        let n_usize = usize::try_from(n).map_err(|_| format!("{flag}: {n} is too large"))?;
        match flag.as_str() {
            "--sites" => spec.sites = n_usize,
            "--per-site" => spec.per_site = n_usize,
            "--gateways" => spec.gateways = n_usize,
            "--seed" => spec.seed = n,
            "--phase-limit" => spec.phase_limit = Duration::from_secs(n),
            "--window" => spec.window = Duration::from_secs(n.max(1)),
            "--probe-ms" => spec.probe_period = Some(Duration::from_millis(n.max(10))),
            "--suspicion-ms" => spec.suspicion = Some(Duration::from_millis(n.max(10))),
            "--link-settle-ms" => spec.link_settle = Some(Duration::from_millis(n)),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if spec.sites < 2 || spec.gateways < 1 || spec.per_site < spec.gateways + 2 {
        return Err(
            "need --sites >= 2, --gateways >= 1 and --per-site >= gateways + 2".to_string(),
        );
    }
    Ok(spec)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let spec = match parse(&args) {
        Ok(s) => s,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("scale: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    println!(
        "simulation seed {} (replay with --seed {})",
        spec.seed, spec.seed
    );
    let report = run(&spec);
    println!(
        "machine: {} cores; build: {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    print!("{}", report.markdown());
    ExitCode::SUCCESS
}
