//! The data-path rows of `clusterctl bench`: throughput of data messages to a `sink`, ping RTT
//! while a bulk load saturates the same link, and agent memory under load.

use crate::bench::Stats;
use crate::client::Client;
use clusterctl_api::{LoadReport, LoadRequest, PingReport, PingRequest};
use std::time::{Duration, Instant};

/// Options of the data-path measurements.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// Runs of each throughput measurement (0 skips every data-path row).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=1000))]
    load_runs: u32,
    /// Messages per run of the 100-byte throughput measurement.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    small_count: u64,
    /// Messages per run of the 64 KiB throughput measurement.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    large_count: u64,
    /// Ping samples taken while a 64 KiB load saturates the link.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    loaded_pings: u32,
}

const SMALL: u32 = 100;
const LARGE: u32 = 64 * 1024;
/// Longest one load run may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// Pings per ping request while a load runs (several requests, so samples stop with the load).
const PINGS_PER_REQUEST: u32 = 20;

fn load(client: &Client, target: &str, count: u64, size: u32) -> anyhow::Result<LoadReport> {
    let r: LoadReport = client.post(
        "/v1/load",
        &LoadRequest {
            target: target.into(),
            from: None,
            count,
            size,
            timeout_ms: RUN_TIMEOUT.as_millis() as u64,
        },
    )?;
    anyhow::ensure!(
        r.delivered == count,
        "load {} -> {target}: {} of {count} messages delivered ({})",
        r.from,
        r.delivered,
        r.error.as_deref().unwrap_or("no error reported")
    );
    Ok(r)
}

/// Ping RTTs `from -> target` taken while a 64 KiB load `from -> load_target` runs, and the
/// resident memory of every agent at the end of the pings.
fn loaded_pings(
    client: &Client,
    target: &str,
    load_target: &str,
    a: &LoadArgs,
    pids: &[u32],
) -> anyhow::Result<(Vec<f64>, Vec<f64>, LoadReport)> {
    // Long enough to outlast the pings: the load is sized, not cut short.
    let count = a.large_count * 4;
    let loader = Client::with_timeout(client.addr(), RUN_TIMEOUT + Duration::from_secs(15));
    let target_s = load_target.to_string();
    let handle = std::thread::spawn(move || load(&loader, &target_s, count, LARGE));
    // Let the load fill the link first.
    std::thread::sleep(Duration::from_millis(300));
    let mut rtts = Vec::new();
    let started = Instant::now();
    while rtts.len() < a.loaded_pings as usize
        && !handle.is_finished()
        && started.elapsed() < RUN_TIMEOUT
    {
        let r: PingReport = client.post(
            "/v1/ping",
            &PingRequest {
                target: target.into(),
                from: None,
                count: PINGS_PER_REQUEST,
                timeout_ms: 2000,
            },
        )?;
        rtts.extend(r.attempts.iter().filter(|x| x.ok).map(|x| x.total_ms));
        let failed = r.attempts.iter().filter(|x| !x.ok).count();
        anyhow::ensure!(
            failed == 0,
            "{failed} pings {} -> {target} failed under load",
            r.from
        );
    }
    let rss = pids
        .iter()
        .filter_map(|p| crate::bench::rss_kib(*p))
        .map(|k| k as f64 / 1024.0)
        .collect();
    let report = handle
        .join()
        .map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
    Ok((rtts, rss, report))
}

/// The data-path rows. `control(name)` is the control address of a lab node; `pids` are the
/// agents' process ids.
pub(crate) fn rows(
    a: &LoadArgs,
    control: &dyn Fn(&str) -> anyhow::Result<String>,
    pids: &[u32],
) -> anyhow::Result<Vec<Stats>> {
    let mut rows = Vec::new();
    if a.load_runs == 0 {
        return Ok(rows);
    }
    let client = Client::with_timeout(
        &control("edge-us-1")?,
        RUN_TIMEOUT + Duration::from_secs(15),
    );
    for (place, target) in [
        ("same site, edge-us-1 -> edge-us-2", "edge-us-2"),
        ("across sites, edge-us-1 -> edge-eu-2", "edge-eu-2"),
    ] {
        let mut small = Vec::new();
        let mut large = Vec::new();
        for _ in 0..a.load_runs {
            small.push(load(&client, target, a.small_count, SMALL)?.msgs_per_s);
            large.push(load(&client, target, a.large_count, LARGE)?.mb_per_s);
        }
        rows.push(Stats {
            name: format!(
                "100-byte messages to `sink`, {place}, msgs/s (one sample per run of {})",
                a.small_count
            ),
            samples: small,
        });
        rows.push(Stats {
            name: format!(
                "64 KiB messages to `sink`, {place}, MB/s (one sample per run of {})",
                a.large_count
            ),
            samples: large,
        });
    }
    let (rtts, rss, r) = loaded_pings(&client, "edge-us-2", "edge-us-2", a, pids)?;
    rows.push(Stats {
        name: format!(
            "ping edge-us-1 -> edge-us-2 while a 64 KiB load saturates that link ({:.0} MB/s), RTT ms",
            r.mb_per_s
        ),
        samples: rtts,
    });
    rows.push(Stats {
        name: "agent resident memory under a 64 KiB load, MiB (one sample per agent)".into(),
        samples: rss,
    });
    let (rtts, _, r) = loaded_pings(&client, "edge-eu-2", "edge-eu-2", a, pids)?;
    rows.push(Stats {
        name: format!(
            "ping edge-us-1 -> edge-eu-2 while a 64 KiB load saturates that path, gateways included ({:.0} MB/s), RTT ms",
            r.mb_per_s
        ),
        samples: rtts,
    });
    Ok(rows)
}
