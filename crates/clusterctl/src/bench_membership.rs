//! Membership figures of `clusterctl bench`, measured on a running loopback lab. Every row names
//! its unit and the lab's size; every sample is one agent or one run.
//!
//! - **links per node** (count): links up at each node in the first node's topology, beside the
//!   N-1 of a full mesh.
//! - **idle traffic sent per node** (bytes/s): each agent's wire counters (`/metrics`:
//!   `clusterctl_wire_tx_bytes`, `clusterctl_wire_tx_datagrams`, the UDP traffic of its QUIC
//!   connections: failure detector, node table, everything) read twice, `--idle-window-secs`
//!   apart with nothing polling in between. Reported as UDP payload and at IP level (28 bytes of
//!   IPv4 + UDP header added per datagram: what an nftables counter on the port shows).
//! - **idle CPU per agent** (% of one core): utime + stime of /proc/PID/stat over the same window.
//! - **failure detection** (ms): a member (the last of the last site) is killed with SIGKILL; the
//!   time until a member of its own site shows it `dead`, and until a member of another site
//!   shows it `dead` or `unreachable`. Both are polled (`/v1/members`) every 20 ms.
//! - **join convergence** (ms): the killed agent is started again as `lab up` started it (same
//!   config and data directory); the time from that process start until every node, itself
//!   included, shows it `alive` at its new clock (every node polled in turn, every 20 ms).
//! - **false suspicions** (count per run): `node-suspect` and `node-dead` events about any node
//!   but the victim, recorded by any node during a kill-and-join run (from its event log).
//!
//! Before each run every node must show every node alive; a phase that does not end within
//! 60 s is left out of the figures (with a message on stderr), so a row may hold fewer samples
//! than `--kills`.

use crate::bench::Stats;
use crate::client::Client;
use crate::lab::{self, LabNode, LabState};
use anyhow::{anyhow, bail, Context};
use clusterctl_api::{Event, EventKind, LinkState, Members, NodeStatus, Role, Topology};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// IPv4 (20) + UDP (8) header bytes per datagram, for the IP-level figure.
const IP_UDP_HEADER: u64 = 28;
/// Pause between two polls while waiting for a status change.
const POLL: Duration = Duration::from_millis(20);
/// Longest wait for any one phase (settling, detection, join).
const PHASE_LIMIT: Duration = Duration::from_secs(60);
/// Timeout of one control-API request.
const API_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest `lab up --wait` for the lab of `--membership-sites`, in seconds.
const LAB_UP_WAIT_SECS: u64 = 600;

/// Options of the membership figures (flattened into `clusterctl bench`).
#[derive(Debug, Clone, clap::Args)]
pub struct MembershipArgs {
    /// Kill-and-join runs (failure detection, join convergence, false suspicions); 0 skips them.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=100))]
    kills: u32,
    /// Seconds between the two reads of the wire counters and CPU times at idle.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(5..=600))]
    idle_window_secs: u64,
    /// Also measure the membership figures on a second lab of these sites (e.g.
    /// us-east=11,eu-west=11 for 24 agents), started and stopped by the bench.
    #[arg(long, value_name = "SITE=N,...")]
    membership_sites: Option<String>,
    /// First two octets of the second lab's loopback range.
    #[arg(long, default_value = "127.79")]
    membership_addr_prefix: String,
}

/// With `--membership-sites`: the rows of a second lab of that shape, which this starts in a
/// temporary directory and stops (also on error).
pub(crate) fn second_lab(a: &MembershipArgs, exe: &Path) -> anyhow::Result<Option<Vec<Stats>>> {
    match &a.membership_sites {
        Some(sites) => measure_own_lab(a, exe, sites).map(Some),
        None => Ok(None),
    }
}

/// Starts a lab of `sites` in a temporary directory, measures it and stops it (also on error).
fn measure_own_lab(a: &MembershipArgs, exe: &Path, sites: &str) -> anyhow::Result<Vec<Stats>> {
    let tmp = std::env::temp_dir().join(format!(
        "clusterctl-bench-membership-{}",
        std::process::id()
    ));
    let dir = tmp.join("lab");
    let dir_s = dir.to_string_lossy().to_string();
    eprintln!("bench: starting a lab of {sites} in {dir_s}");
    let result = (|| {
        let t = Instant::now();
        let st = Command::new(exe)
            .args(["lab", "up", "--dir", &dir_s, "--sites", sites])
            .args(["--addr-prefix", &a.membership_addr_prefix])
            .args(["--wait", &LAB_UP_WAIT_SECS.to_string()])
            .stdout(Stdio::null())
            .status()?;
        let up_ms = t.elapsed().as_secs_f64() * 1000.0;
        anyhow::ensure!(st.success(), "lab up --sites {sites} failed ({st})");
        let nodes = load(&dir)?.nodes.len();
        let mut rows = vec![Stats {
            name: format!("`lab up` to converged ({nodes} agents), ms"),
            samples: vec![up_ms],
        }];
        rows.extend(measure(a, &dir)?);
        Ok(rows)
    })();
    let _ = Command::new(exe)
        .args(["lab", "down", "--dir", &dir_s])
        .stdout(Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn load(dir: &Path) -> anyhow::Result<LabState> {
    LabState::load(dir)?.ok_or_else(|| anyhow!("no lab state in {}", dir.display()))
}

/// Every membership row for the running lab in `dir`.
pub(crate) fn measure(a: &MembershipArgs, dir: &Path) -> anyhow::Result<Vec<Stats>> {
    let state = load(dir)?;
    let n = state.nodes.len();
    let of = format!("{n} agents");
    let mut rows = Vec::new();
    wait_all_alive(&state.nodes).context("before the idle window")?;
    rows.push(links_per_node(&state.nodes, &of)?);
    rows.extend(idle_window(
        &state.nodes,
        Duration::from_secs(a.idle_window_secs),
        &of,
    )?);
    if a.kills > 0 {
        rows.extend(kill_runs(dir, &state, a.kills, &of)?);
    }
    Ok(rows)
}

fn client(n: &LabNode) -> Client {
    Client::with_timeout(&n.endpoint().to_string(), API_TIMEOUT)
}

fn members(n: &LabNode) -> Option<Members> {
    client(n).get("/v1/members").ok()
}

fn status_of(m: &Members, name: &str) -> Option<NodeStatus> {
    m.members.iter().find(|r| r.name == name).map(|r| r.status)
}

// ---------------------------------------------------------------------------------------------
// Links, traffic and CPU at idle.

fn links_per_node(nodes: &[LabNode], of: &str) -> anyhow::Result<Stats> {
    let first = nodes
        .first()
        .ok_or_else(|| anyhow!("the lab has no nodes"))?;
    let t: Topology = client(first).get("/v1/topology")?;
    let mut count: BTreeMap<&str, f64> = nodes.iter().map(|n| (n.name.as_str(), 0.0)).collect();
    for l in t.links.iter().filter(|l| l.state == LinkState::Up) {
        for end in [&l.from, &l.to] {
            if let Some(c) = count.get_mut(end.as_str()) {
                *c += 1.0;
            }
        }
    }
    let samples: Vec<f64> = count.into_values().collect();
    let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
    Ok(Stats {
        name: format!(
            "links per node, up ({of}; mean {mean:.2}, full mesh {}), count",
            nodes.len().saturating_sub(1)
        ),
        samples,
    })
}

/// What one agent's counters showed at one moment.
struct Reading {
    at: Instant,
    tx_bytes: u64,
    tx_datagrams: u64,
    cpu_ticks: Option<u64>,
}

fn read(n: &LabNode) -> anyhow::Result<Reading> {
    let text = client(n)
        .get_text("/metrics")
        .with_context(|| format!("reading /metrics of {}", n.name))?;
    let at = Instant::now();
    let metric = |name: &str| {
        metric(&text, name).ok_or_else(|| {
            anyhow!(
                "{} has no {name} in /metrics: is it a clusterctl agent of this version?",
                n.name
            )
        })
    };
    Ok(Reading {
        at,
        tx_bytes: metric("clusterctl_wire_tx_bytes")?,
        tx_datagrams: metric("clusterctl_wire_tx_datagrams")?,
        cpu_ticks: std::fs::read_to_string(format!("/proc/{}/stat", n.pid))
            .ok()
            .and_then(|s| cpu_ticks(&s)),
    })
}

fn idle_window(nodes: &[LabNode], window: Duration, of: &str) -> anyhow::Result<Vec<Stats>> {
    eprintln!("bench: idle window of {} s ({of})", window.as_secs());
    let before: Vec<Reading> = nodes.iter().map(read).collect::<anyhow::Result<_>>()?;
    std::thread::sleep(window);
    let after: Vec<Reading> = nodes.iter().map(read).collect::<anyhow::Result<_>>()?;
    let hz = clock_ticks_per_second();
    let (mut udp, mut ip, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    for (b, a) in before.iter().zip(&after) {
        let secs = a.at.duration_since(b.at).as_secs_f64();
        let bytes = a.tx_bytes.saturating_sub(b.tx_bytes);
        let datagrams = a.tx_datagrams.saturating_sub(b.tx_datagrams);
        udp.push(bytes as f64 / secs);
        ip.push((bytes + IP_UDP_HEADER * datagrams) as f64 / secs);
        if let (Some(t0), Some(t1)) = (b.cpu_ticks, a.cpu_ticks) {
            cpu.push(t1.saturating_sub(t0) as f64 / hz / secs * 100.0);
        }
    }
    let w = window.as_secs();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (mu, mi, mc) = (mean(&udp), mean(&ip), mean(&cpu));
    Ok(vec![
        Stats {
            name: format!(
                "idle traffic sent per node, UDP payload ({of}, {w} s; mean {mu:.0}), bytes/s"
            ),
            samples: udp,
        },
        Stats {
            name: format!(
                "idle traffic sent per node, IP level (+{IP_UDP_HEADER} B/datagram; {of}, {w} s; mean {mi:.0}), bytes/s"
            ),
            samples: ip,
        },
        Stats {
            name: format!("idle CPU per agent ({of}, {w} s; mean {mc:.2}), % of one core"),
            samples: cpu,
        },
    ])
}

/// The value of the sample `name` (no labels) in Prometheus text, as a whole number.
pub(crate) fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let mut parts = l.split_whitespace();
            (parts.next()? == name).then(|| parts.next())?
        })
        .and_then(|v| {
            v.parse::<u64>().ok().or_else(|| {
                v.parse::<f64>()
                    .ok()
                    .filter(|f| *f >= 0.0)
                    .map(|f| f as u64)
            })
        })
}

/// utime + stime (fields 14 and 15 of /proc/PID/stat), in clock ticks.
pub(crate) fn cpu_ticks(stat: &str) -> Option<u64> {
    // Field 2 is the command name in parentheses and may itself hold spaces and ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts with field 3 (state).
    let mut fields = rest.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `getconf CLK_TCK`, else 100 (the value on every Linux this runs on).
fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|hz| *hz > 0.0)
        .unwrap_or(100.0)
}

// ---------------------------------------------------------------------------------------------
// Kill and join.

/// The figures of one kill-and-join run.
#[derive(Debug, Default)]
struct Run {
    dead_in_site_ms: Option<f64>,
    dead_elsewhere_ms: Option<f64>,
    join_ms: Option<f64>,
    false_suspicions: usize,
}

fn kill_runs(dir: &Path, state: &LabState, kills: u32, of: &str) -> anyhow::Result<Vec<Stats>> {
    let members: Vec<&LabNode> = state
        .nodes
        .iter()
        .filter(|n| n.role == Role::Member)
        .collect();
    let victim = members
        .last()
        .ok_or_else(|| anyhow!("the lab has no members to kill"))?;
    let same = members
        .iter()
        .find(|n| n.site == victim.site && n.name != victim.name)
        .ok_or_else(|| {
            anyhow!(
                "site {} has one member: the kill runs need two (e.g. --sites us-east=2,eu-west=2)",
                victim.site
            )
        })?;
    let other = members
        .iter()
        .find(|n| n.site != victim.site)
        .ok_or_else(|| anyhow!("the kill runs need members in two sites"))?;
    let (v, s, o) = (&victim.name, &same.name, &other.name);
    let mut runs = Vec::new();
    let mut child: Option<Child> = None;
    for i in 1..=kills {
        eprintln!("bench: kill run {i}/{kills}: kill -9 {v} ({of})");
        let run = kill_and_join(dir, &state.nodes, v, s, o, &mut child);
        match run {
            Ok(r) => runs.push(r),
            Err(e) => {
                reap(&mut child);
                return Err(e.context(format!("kill run {i} of {v}")));
            }
        }
    }
    // The agent started last stays under `lab down`; it is only reaped here if it exits.
    let rows = vec![
        Stats {
            name: format!("failure detection, kill -9 {v} -> `dead` at {s} (same site; {of}), ms"),
            samples: runs.iter().filter_map(|r| r.dead_in_site_ms).collect(),
        },
        Stats {
            name: format!(
                "failure detection, kill -9 {v} -> `dead`/`unreachable` at {o} (other site; {of}), ms"
            ),
            samples: runs.iter().filter_map(|r| r.dead_elsewhere_ms).collect(),
        },
        Stats {
            name: format!(
                "join convergence, {v} process start -> `alive` at every node ({of}), ms"
            ),
            samples: runs.iter().filter_map(|r| r.join_ms).collect(),
        },
        Stats {
            name: format!(
                "false suspicions per kill-and-join run (suspect/dead of a live node, any observer; {of}), count"
            ),
            samples: runs.iter().map(|r| r.false_suspicions as f64).collect(),
        },
    ];
    Ok(rows)
}

/// Waits for a killed child of ours, so it does not linger as a zombie.
fn reap(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.wait();
    }
}

fn kill_and_join(
    dir: &Path,
    nodes: &[LabNode],
    victim: &str,
    same: &str,
    other: &str,
    child: &mut Option<Child>,
) -> anyhow::Result<Run> {
    let by_name = |name: &str| {
        nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| anyhow!("no lab node {name}"))
    };
    let (same, other) = (by_name(same)?, by_name(other)?);
    wait_all_alive(nodes)?;
    let live: Vec<&LabNode> = nodes.iter().filter(|n| n.name != victim).collect();
    let seqs: Vec<u64> = live.iter().map(|n| last_seq(n)).collect();

    // The record as it is now: the victim may have been started again by an earlier run.
    let target = load(dir)?
        .nodes
        .into_iter()
        .find(|n| n.name == victim)
        .ok_or_else(|| anyhow!("no lab node {victim}"))?;
    if !target.is_running() {
        bail!("the agent of {victim} is not running");
    }
    lab::signal("KILL", target.pid);
    let killed = Instant::now();
    let mut run = Run::default();
    while run.dead_in_site_ms.is_none() || run.dead_elsewhere_ms.is_none() {
        if killed.elapsed() > PHASE_LIMIT {
            eprintln!(
                "bench: {victim} not seen dead within {} s (at {}: {}, at {}: {}): left out",
                PHASE_LIMIT.as_secs(),
                same.name,
                seen(run.dead_in_site_ms),
                other.name,
                seen(run.dead_elsewhere_ms)
            );
            break;
        }
        if run.dead_in_site_ms.is_none() {
            let st = members(same).and_then(|m| status_of(&m, victim));
            if st == Some(NodeStatus::Dead) {
                run.dead_in_site_ms = Some(ms(killed));
            }
        }
        if run.dead_elsewhere_ms.is_none() {
            let st = members(other).and_then(|m| status_of(&m, victim));
            if matches!(st, Some(NodeStatus::Dead | NodeStatus::Unreachable)) {
                run.dead_elsewhere_ms = Some(ms(killed));
            }
        }
        std::thread::sleep(POLL);
    }
    reap(child);
    wait_stopped(&target)?;
    // Every node has noticed before the agent comes back, so the join starts from `dead`.
    let noticed = wait_until(PHASE_LIMIT, || {
        live.iter().all(|n| {
            members(n)
                .and_then(|m| status_of(&m, victim))
                .is_some_and(|s| s != NodeStatus::Alive)
        })
    });
    if !noticed {
        eprintln!(
            "bench: some node still shows {victim} alive after {} s; starting it anyway",
            PHASE_LIMIT.as_secs()
        );
    }

    let started = Instant::now();
    *child = Some(lab::start_again(dir, victim)?);
    let restarted = by_name(victim)?;
    run.join_ms = join(restarted, nodes, started);
    if run.join_ms.is_none() {
        eprintln!(
            "bench: {victim} not alive at every node within {} s of its start: left out",
            PHASE_LIMIT.as_secs()
        );
    }

    let mut suspicions: Vec<Event> = live
        .iter()
        .zip(&seqs)
        .flat_map(|(n, since)| events(n, *since))
        .collect();
    suspicions.extend(events(restarted, 0));
    suspicions.retain(|e| {
        matches!(e.kind, EventKind::NodeSuspect | EventKind::NodeDead)
            && e.node.as_deref() != Some(victim)
    });
    for e in &suspicions {
        eprintln!(
            "bench: false suspicion: {} saw {} {} ({})",
            e.observer,
            e.node.as_deref().unwrap_or("?"),
            e.kind.as_str(),
            e.reason
        );
    }
    run.false_suspicions = suspicions.len();
    eprintln!(
        "bench: dead at {} after {} ms, at {} after {} ms; alive everywhere {} ms after the start",
        same.name,
        seen(run.dead_in_site_ms),
        other.name,
        seen(run.dead_elsewhere_ms),
        seen(run.join_ms)
    );
    Ok(run)
}

/// Milliseconds from `start` to now, until every node (`victim` included) shows `victim` alive
/// at the clock it announced after its start; `None` past the phase limit.
fn join(victim: &LabNode, nodes: &[LabNode], started: Instant) -> Option<f64> {
    let mut clock: Option<u64> = None;
    let mut pending: Vec<&LabNode> = nodes.iter().collect();
    while started.elapsed() <= PHASE_LIMIT {
        if clock.is_none() {
            clock = members(victim).and_then(|m| {
                m.members
                    .iter()
                    .find(|r| r.name == victim.name)
                    .map(|r| r.clock)
            });
        }
        if let Some(clock) = clock {
            pending.retain(|n| {
                !members(n).is_some_and(|m| {
                    m.members.iter().any(|r| {
                        r.name == victim.name && r.status == NodeStatus::Alive && r.clock >= clock
                    })
                })
            });
            if pending.is_empty() {
                return Some(ms(started));
            }
        }
        std::thread::sleep(POLL);
    }
    None
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn seen(v: Option<f64>) -> String {
    v.map_or_else(|| "never".into(), |ms| format!("{ms:.0}"))
}

/// Polls `f` every [`POLL`] for at most `limit`; whether it became true.
fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// Every node answers and shows every node alive, within the phase limit.
fn wait_all_alive(nodes: &[LabNode]) -> anyhow::Result<()> {
    let settled = wait_until(PHASE_LIMIT, || {
        nodes.iter().all(|o| {
            members(o).is_some_and(|m| {
                nodes
                    .iter()
                    .all(|n| status_of(&m, &n.name) == Some(NodeStatus::Alive))
            })
        })
    });
    if !settled {
        bail!(
            "the lab did not show every node alive at every node within {} s; see its agent logs",
            PHASE_LIMIT.as_secs()
        );
    }
    Ok(())
}

fn wait_stopped(n: &LabNode) -> anyhow::Result<()> {
    if wait_until(Duration::from_secs(10), || !n.is_running()) {
        Ok(())
    } else {
        bail!(
            "the agent of {} (pid {}) still runs 10 s after SIGKILL",
            n.name,
            n.pid
        )
    }
}

/// Every event `n` recorded after `since` (none when it does not answer).
fn events(n: &LabNode, since: u64) -> Vec<Event> {
    let mut out = Vec::new();
    let _ = client(n).stream_lines(&format!("/v1/events?since={since}&follow=false"), |line| {
        if let Ok(e) = serde_json::from_str::<Event>(line) {
            out.push(e);
        }
        true
    });
    out
}

fn last_seq(n: &LabNode) -> u64 {
    events(n, 0).iter().map(|e| e.seq).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_sum_utime_and_stime_past_a_command_name_with_spaces_and_parens() {
        // A real line of /proc/PID/stat, with the command name changed to hold ") (" and spaces.
        let stat = "4242 (clus (ter) ctl) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    157 43 0 0 20 0 9 0 987654 123456789 4321 18446744073709551615 1 1 0 0 0 0 0 \
                    4096 17663 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(cpu_ticks(stat), Some(157 + 43));
        assert_eq!(cpu_ticks("4242 (x) S 1 2"), None);
        assert_eq!(cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn cpu_ticks_of_this_process_grow_with_work() {
        let read = || {
            let s = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat on Linux");
            cpu_ticks(&s).expect("this process's stat parses")
        };
        let before = read();
        let start = Instant::now();
        let mut x: u64 = 0;
        while read() == before && start.elapsed() < Duration::from_secs(30) {
            for i in 0..1_000_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            std::hint::black_box(x);
        }
        assert!(
            read() > before,
            "30 s of busy work did not show in utime+stime"
        );
    }

    #[test]
    fn metric_reads_the_sample_and_skips_comments_and_prefixes() {
        let text = "# HELP clusterctl_wire_tx_bytes UDP payload bytes sent.\n\
                    # TYPE clusterctl_wire_tx_bytes gauge\n\
                    clusterctl_wire_tx_bytes 123456\n\
                    clusterctl_wire_tx_bytes_extra 7\n\
                    # TYPE clusterctl_wire_tx_datagrams gauge\n\
                    clusterctl_wire_tx_datagrams 1.5e3\n\
                    # EOF\n";
        assert_eq!(metric(text, "clusterctl_wire_tx_bytes"), Some(123_456));
        assert_eq!(metric(text, "clusterctl_wire_tx_datagrams"), Some(1500));
        assert_eq!(metric(text, "clusterctl_wire_tx_bytes_extra"), Some(7));
        assert_eq!(metric(text, "clusterctl_wire_rx_bytes"), None);
        assert_eq!(metric("clusterctl_x not-a-number\n", "clusterctl_x"), None);
    }
}
