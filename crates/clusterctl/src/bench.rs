//! `clusterctl bench`: measure a lab on this machine and print a Markdown table.
//!
//! Starts its own lab (in a temporary directory, on its own loopback range), then measures:
//! - `lab up` until converged (whole command: certificates, agents, convergence);
//! - whole-command time of `topology`, `topology --probe` and `members` (process start to exit);
//! - ping round trips inside a site and across sites (through two gateways);
//! - agent resident memory when idle;
//! - membership figures (see [`crate::bench_membership`]): links per node, idle traffic sent per
//!   node (UDP payload and IP level) and idle CPU per agent over `--idle-window-secs`, failure
//!   detection after `kill -9`, join convergence and false suspicions over `--kills` runs, and
//!   the same on a second lab of `--membership-sites` when given.
//! - data messages to `sink`: throughput, ping RTT under a saturating load, memory under load
//!   (see `bench_load.rs`).
//!
//! Figures are meant for BENCHMARKS.md; run the release build (`cargo run --release -- bench`).

use crate::client::Client;
use crate::lab::LabState;
use clusterctl_api::{PingReport, PingRequest};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// Measure a lab on this machine (see BENCHMARKS.md).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Runs of each whole-command measurement.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    runs: u32,
    /// Pings per ping measurement.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pings: u32,
    /// First two octets of the lab's loopback range.
    #[arg(long, default_value = "127.78")]
    addr_prefix: String,
    /// Seconds the agents idle before memory is read.
    #[arg(long, default_value_t = 5)]
    idle_secs: u64,
    /// Skip the whole-command timings of `topology` and `members`.
    #[arg(long)]
    skip_commands: bool,
    #[command(flatten)]
    load: crate::bench_load::LoadArgs,
    #[command(flatten)]
    membership: crate::bench_membership::MembershipArgs,
}

/// One row of the table: its name (with the unit) and its samples.
pub(crate) struct Stats {
    pub(crate) name: String,
    pub(crate) samples: Vec<f64>,
}

impl Stats {
    fn row(&self) -> String {
        let mut v = self.samples.clone();
        v.sort_by(f64::total_cmp);
        // Nearest rank: the smallest sample with at least a fraction q of the samples at or
        // below it (the median of two samples is the lower one, not the maximum).
        let pick = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
        if v.is_empty() {
            return format!("| {} | - | - | - | 0 |", self.name);
        }
        format!(
            "| {} | {:.2} | {:.2} | {:.2} | {} |",
            self.name,
            pick(0.5),
            pick(0.99),
            v[v.len() - 1],
            v.len()
        )
    }
}

fn time_cmd(exe: &PathBuf, args: &[&str], dir: &PathBuf) -> anyhow::Result<f64> {
    let t = Instant::now();
    let st = Command::new(exe)
        .args(args)
        .env("CLUSTERCTL_LAB_DIR", dir)
        .env_remove("CLUSTERCTL_AGENT")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(
        st.success(),
        "`clusterctl {}` failed ({st})",
        args.join(" ")
    );
    Ok(ms)
}

/// `n` round trips of a 100-byte datagram to an echo thread over loopback, in ms: what the
/// operating system alone costs, for comparison with the pings between agents.
fn udp_round_trips(n: u32) -> anyhow::Result<Vec<f64>> {
    let echo = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let to = echo.local_addr()?;
    echo.set_read_timeout(Some(Duration::from_secs(2)))?;
    let count = n;
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        for _ in 0..count {
            let Ok((len, from)) = echo.recv_from(&mut buf) else {
                return;
            };
            if echo.send_to(&buf[..len], from).is_err() {
                return;
            }
        }
    });
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    let payload = [7u8; 100];
    let mut buf = [0u8; 256];
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let t = Instant::now();
        sock.send_to(&payload, to)?;
        sock.recv_from(&mut buf)?;
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = thread.join();
    Ok(out)
}

pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe()?;
    let tmp = std::env::temp_dir().join(format!("clusterctl-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let dir = tmp.join("lab");
    let dir_s = dir.to_string_lossy().to_string();
    eprintln!("bench: starting a lab in {dir_s}");
    let result = measure(&a, &exe, &dir, &dir_s);
    let _ = Command::new(&exe)
        .args(["lab", "down", "--dir", &dir_s])
        .stdout(Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(&tmp);
    let table = result?;
    crate::output::out(table.trim_end());
    // The second lab runs once the first is down, so the two never share the CPU; its rows
    // continue the same table.
    if let Some(rows) = crate::bench_membership::second_lab(&a.membership, &exe)? {
        crate::output::out(rows.iter().map(Stats::row).collect::<Vec<_>>().join("\n"));
    }
    Ok(ExitCode::SUCCESS)
}

fn measure(a: &Args, exe: &PathBuf, dir: &PathBuf, dir_s: &str) -> anyhow::Result<String> {
    let t = Instant::now();
    let st = Command::new(exe)
        .args([
            "lab",
            "up",
            "--dir",
            dir_s,
            "--addr-prefix",
            &a.addr_prefix,
            "--wait",
            "120",
        ])
        .stdout(Stdio::null())
        .status()?;
    let up_ms = t.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(st.success(), "lab up failed ({st})");
    let state = LabState::load(dir)?.ok_or_else(|| anyhow::anyhow!("no lab state after lab up"))?;
    let mut rows = vec![Stats {
        name: "`lab up` to converged (2 sites, 6 agents), ms".into(),
        samples: vec![up_ms],
    }];
    for (name, args) in [
        ("`clusterctl topology`, whole command, ms", vec!["topology"]),
        (
            "`clusterctl topology --probe`, whole command, ms",
            vec!["topology", "--probe"],
        ),
        ("`clusterctl members`, whole command, ms", vec!["members"]),
    ] {
        if a.skip_commands {
            break;
        }
        let mut s = Vec::new();
        for _ in 0..a.runs {
            s.push(time_cmd(exe, &args, dir)?);
        }
        rows.push(Stats {
            name: name.into(),
            samples: s,
        });
    }
    let control = |name: &str| {
        state
            .nodes
            .iter()
            .find(|n| n.name == name)
            .map(|n| n.endpoint().to_string())
            .ok_or_else(|| anyhow::anyhow!("no lab node {name}"))
    };
    let client = Client::with_timeout(&control("edge-us-1")?, Duration::from_secs(300));
    for (name, target) in [
        (
            "ping inside a site (edge-us-1 -> edge-us-2), RTT ms",
            "edge-us-2",
        ),
        (
            "ping across sites (edge-us-1 -> edge-eu-2, 4 hops), RTT ms",
            "edge-eu-2",
        ),
    ] {
        let r: PingReport = client.post(
            "/v1/ping",
            &PingRequest {
                target: target.into(),
                from: None,
                count: a.pings,
                timeout_ms: 2000,
            },
        )?;
        rows.push(Stats {
            name: name.into(),
            samples: r
                .attempts
                .iter()
                .filter(|x| x.ok)
                .map(|x| x.total_ms)
                .collect(),
        });
    }
    rows.push(Stats {
        name: "raw UDP round trip on loopback (a 100-byte datagram to an echo thread and back; the floor for the pings above), RTT ms".into(),
        samples: udp_round_trips(a.pings)?,
    });
    std::thread::sleep(Duration::from_secs(a.idle_secs));
    let rss: Vec<f64> = state
        .nodes
        .iter()
        .filter_map(|n| rss_kib(n.pid))
        .map(|k| k as f64 / 1024.0)
        .collect();
    rows.push(Stats {
        name: format!(
            "agent resident memory, idle {} s, MiB (one sample per agent)",
            a.idle_secs
        ),
        samples: rss,
    });
    let pids: Vec<u32> = state.nodes.iter().map(|n| n.pid).collect();
    rows.extend(crate::bench_load::rows(&a.load, &control, &pids)?);
    rows.extend(crate::bench_membership::measure(&a.membership, dir)?);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut out = format!(
        "Machine: {cores} cores, {cpu}; build: {}; clusterctl {}\n\n| measurement | p50 | p99 | max | samples |\n|---|---|---|---|---|\n",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        env!("CARGO_PKG_VERSION")
    );
    for r in rows {
        out.push_str(&r.row());
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::Stats;

    fn row(samples: &[f64]) -> String {
        Stats {
            name: "x".into(),
            samples: samples.to_vec(),
        }
        .row()
    }

    #[test]
    fn raw_udp_round_trips_are_measured_one_per_datagram() {
        let rtts = super::udp_round_trips(20).expect("loopback UDP works");
        assert_eq!(rtts.len(), 20);
        assert!(rtts.iter().all(|ms| *ms > 0.0 && *ms < 2000.0), "{rtts:?}");
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        assert_eq!(row(&[2.0, 1.0]), "| x | 1.00 | 2.00 | 2.00 | 2 |");
        assert_eq!(
            row(&[5.0, 1.0, 3.0, 2.0, 4.0]),
            "| x | 3.00 | 5.00 | 5.00 | 5 |"
        );
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(row(&hundred), "| x | 50.00 | 99.00 | 100.00 | 100 |");
        assert_eq!(row(&[]), "| x | - | - | - | 0 |");
    }
}
