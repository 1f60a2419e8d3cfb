//! `clusterctl lab fault`: faults injected into a netns lab.
//!
//! Network faults are nftables rules in one chain, `bridge PREFIX faults`, of the lab's hub
//! namespace, where every packet between two nodes crosses a bridge: the whole rule set is
//! rewritten from the list of active faults and applied with one `nft -f` (one transaction),
//! so `heal` and `down` remove every rule at once. Process faults are signals to the agents the
//! lab started (checked by pid, start time and command line, as `down` does).

use super::netns::{self, NetnsNode, NetnsState};
use super::{signal, spawn_process_with_secret, DirArgs, LabNode, LabState, STOP_GRACE};
use crate::client::Client;
use anyhow::{anyhow, bail, Context};
use clusterctl_api::{Role, Topology};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Longest `pause`, in seconds.
pub const MAX_PAUSE_SECS: u64 = 3600;
/// How long `restart` waits for the agent's control API to answer.
const RESTART_WAIT: Duration = Duration::from_secs(30);
/// The ruleset last applied, kept for operators.
const RULES_FILE: &str = "faults.nft";

/// Inject or remove a fault in a netns lab.
#[derive(Debug, clap::Subcommand)]
pub enum FaultCmd {
    /// Drop all traffic between two sites' gateways on the WAN (or between two nodes).
    Partition {
        /// A site, or a node.
        a: String,
        /// A site, or a node.
        b: String,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// Drop IP traffic in one direction only: from FROM to TO (sites on the WAN, or nodes).
    /// ARP passes both ways, so the fault stays one-way for as long as it is held.
    Oneway {
        from: String,
        to: String,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// Drop everything to and from a node's cluster interfaces (its control API stays reachable).
    Isolate {
        node: String,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// Drop PERCENT of the packets entering TARGET: `wan`, a site network, or a node (both ways).
    Loss {
        target: String,
        #[arg(value_parser = clap::value_parser!(u8).range(1..=100))]
        percent: u8,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// SIGKILL a node's agent (a crash); `restart` or `heal` starts it again.
    Kill {
        node: String,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// SIGSTOP a node's agent for SECONDS, then SIGCONT (the command waits).
    Pause {
        node: String,
        #[arg(value_parser = clap::value_parser!(u64).range(1..=MAX_PAUSE_SECS))]
        seconds: u64,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// Stop a node's agent (SIGTERM, SIGKILL after 10 s) if it runs, and start it again with the
    /// same config and data directory.
    Restart {
        node: String,
        /// Start it with only this cluster secret (`agent --secret FILE`), replacing its keyring.
        #[arg(long, value_name = "FILE")]
        secret: Option<PathBuf>,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// Remove every fault: drop rules, continue paused agents, restart killed ones.
    Heal {
        #[command(flatten)]
        dir: DirArgs,
    },
    /// Show the faults in force.
    List {
        #[command(flatten)]
        dir: DirArgs,
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// One fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Fault {
    Partition { a: String, b: String },
    Oneway { from: String, to: String },
    Isolate { node: String },
    Loss { target: String, percent: u8 },
    Kill { node: String },
    Pause { node: String, seconds: u64 },
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Partition { a, b } => write!(f, "partition {a} {b}"),
            Fault::Oneway { from, to } => write!(f, "oneway {from} {to}"),
            Fault::Isolate { node } => write!(f, "isolate {node}"),
            Fault::Loss { target, percent } => write!(f, "loss {target} {percent}"),
            Fault::Kill { node } => write!(f, "kill {node}"),
            Fault::Pause { node, seconds } => write!(f, "pause {node} {seconds}"),
        }
    }
}

/// A fault in force, with when it started (RFC 3339).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveFault {
    #[serde(flatten)]
    pub fault: Fault,
    pub since: String,
}

/// Runs a `lab fault` subcommand.
pub fn run(cmd: FaultCmd) -> anyhow::Result<ExitCode> {
    let (fault, dir) = match cmd {
        FaultCmd::Partition { a, b, dir } => (Fault::Partition { a, b }, dir),
        FaultCmd::Oneway { from, to, dir } => (Fault::Oneway { from, to }, dir),
        FaultCmd::Isolate { node, dir } => (Fault::Isolate { node }, dir),
        FaultCmd::Loss {
            target,
            percent,
            dir,
        } => (Fault::Loss { target, percent }, dir),
        FaultCmd::Kill { node, dir } => (Fault::Kill { node }, dir),
        FaultCmd::Pause { node, seconds, dir } => (Fault::Pause { node, seconds }, dir),
        FaultCmd::Restart { node, secret, dir } => {
            let dir = dir.resolve()?;
            let secret = secret.map(std::path::absolute).transpose()?;
            println!("{}", restart_with(&dir, &node, secret.as_deref())?);
            return Ok(ExitCode::SUCCESS);
        }
        FaultCmd::Heal { dir } => {
            println!("{}", heal(&dir.resolve()?)?);
            return Ok(ExitCode::SUCCESS);
        }
        FaultCmd::List { dir, json } => {
            let (state, ns) = load(&dir.resolve()?)?;
            let _ = state;
            if json {
                crate::output::out_json(&ns.faults)?;
            } else if ns.faults.is_empty() {
                crate::output::out(format!("no faults active in lab {}", ns.prefix));
            } else {
                for f in &ns.faults {
                    crate::output::out(format!("{:<40}  since {}", f.fault.to_string(), f.since));
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    println!("{}", inject(&dir.resolve()?, fault)?);
    Ok(ExitCode::SUCCESS)
}

/// Loads a netns lab from `dir`, or explains why there is none.
fn load(dir: &Path) -> anyhow::Result<(LabState, NetnsState)> {
    let Some(state) = LabState::load(dir)? else {
        bail!(
            "no lab in {}: start one with `clusterctl lab up --netns`",
            dir.display()
        );
    };
    let Some(ns) = state.netns.clone() else {
        bail!(
            "the lab in {} runs on loopback: faults need a lab started with `clusterctl lab up --netns`",
            dir.display()
        );
    };
    Ok((state, ns))
}

fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Injects `fault` into the netns lab in `dir`; returns a line saying what was done. `pause`
/// returns once the agent runs again.
pub fn inject(dir: &Path, fault: Fault) -> anyhow::Result<String> {
    let (mut state, ns) = load(dir)?;
    match &fault {
        Fault::Kill { node } => {
            let n = running_node(&state, node)?;
            signal("KILL", n.pid);
            wait_stopped(&n, Duration::from_secs(5))?;
            add_fault(&mut state, fault.clone());
            state.save(dir)?;
            Ok(format!("killed {node} (pid {}) with SIGKILL", n.pid))
        }
        Fault::Pause { node, seconds } => {
            let n = running_node(&state, node)?;
            add_fault(&mut state, fault.clone());
            state.save(dir)?;
            signal("STOP", n.pid);
            std::thread::sleep(Duration::from_secs(*seconds));
            // Continue only the very process paused, if it is still this lab's agent.
            if n.is_running() {
                signal("CONT", n.pid);
            }
            if let Some(mut now) = LabState::load(dir)? {
                if let Some(s) = now.netns.as_mut() {
                    s.faults.retain(|f| f.fault != fault);
                }
                now.save(dir)?;
            }
            Ok(format!(
                "paused {node} (pid {}) for {seconds} s; it runs again",
                n.pid
            ))
        }
        _ => {
            rules(&ns, &fault)?; // checks the targets before anything changes
            let mut next = ns.clone();
            next.faults.push(ActiveFault {
                fault: fault.clone(),
                since: now(),
            });
            apply_rules(dir, &next)?;
            state.netns = Some(next);
            state.save(dir)?;
            Ok(format!("{fault}: in force ({} active)", count(&state)))
        }
    }
}

fn count(state: &LabState) -> usize {
    state.netns.as_ref().map_or(0, |n| n.faults.len())
}

fn add_fault(state: &mut LabState, fault: Fault) {
    if let Some(ns) = state.netns.as_mut() {
        ns.faults.push(ActiveFault {
            fault,
            since: now(),
        });
    }
}

fn lab_node<'a>(state: &'a LabState, name: &str) -> anyhow::Result<&'a LabNode> {
    state.nodes.iter().find(|n| n.name == name).ok_or_else(|| {
        let names: Vec<&str> = state.nodes.iter().map(|n| n.name.as_str()).collect();
        anyhow!(
            "the lab has no node {name:?}; its nodes: {}",
            names.join(", ")
        )
    })
}

fn running_node(state: &LabState, name: &str) -> anyhow::Result<LabNode> {
    let n = lab_node(state, name)?;
    if !n.is_running() {
        bail!("the agent of {name} is not running: start it with `clusterctl lab fault restart {name}`");
    }
    Ok(n.clone())
}

fn wait_stopped(n: &LabNode, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while n.is_running() {
        if Instant::now() >= deadline {
            bail!("the agent of {} (pid {}) is still running", n.name, n.pid);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Stops the agent of `name` if it runs, starts it again and waits until its control API
/// answers.
pub fn restart(dir: &Path, name: &str) -> anyhow::Result<String> {
    restart_with(dir, name, None)
}

/// [`restart`]; with `secret`, the agent starts as `agent --secret FILE`: with only that
/// cluster secret, replacing its persisted keyring.
pub fn restart_with(dir: &Path, name: &str, secret: Option<&Path>) -> anyhow::Result<String> {
    if let Some(f) = secret {
        if !f.is_file() {
            bail!("restart {name} --secret {}: no such file", f.display());
        }
    }
    let (mut state, ns) = load(dir)?;
    let n = lab_node(&state, name)?.clone();
    if n.is_running() {
        signal("CONT", n.pid);
        signal("TERM", n.pid);
        if wait_stopped(&n, STOP_GRACE).is_err() && n.is_running() {
            signal("KILL", n.pid);
            wait_stopped(&n, Duration::from_secs(5))?;
        }
    }
    let exe = std::env::current_exe().context("cannot find the clusterctl executable")?;
    let nd = n
        .config
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| dir.join("nodes").join(name));
    let netns = ns.node_netns(name);
    let (pid, pid_start, mut child) =
        spawn_process_with_secret(&exe, &nd, &n.config, Some(&netns), secret)?;
    if let Some(rec) = state.nodes.iter_mut().find(|r| r.name == name) {
        rec.pid = pid;
        rec.pid_start = pid_start;
    }
    if let Some(s) = state.netns.as_mut() {
        s.faults.retain(|f| {
            !matches!(&f.fault, Fault::Kill { node } | Fault::Pause { node, .. } if node == name)
        });
    }
    state.save(dir)?;
    let client = Client::with_timeout(&n.endpoint().to_string(), Duration::from_secs(2));
    let deadline = Instant::now() + RESTART_WAIT;
    while client.get::<Topology>("/v1/topology").is_err() {
        // The child handle, not /proc: right after the spawn `ip netns exec` is still
        // exec'ing into the agent.
        let exited = child.try_wait().ok().flatten();
        if exited.is_some() || Instant::now() >= deadline {
            let log = nd.join("agent.log");
            bail!(
                "restarted {name} (pid {pid}) but {}; last lines of {}:\n{}",
                if let Some(status) = exited {
                    format!("the agent exited ({status})")
                } else {
                    format!(
                        "its control API at {} did not answer within {} s",
                        n.control,
                        RESTART_WAIT.as_secs()
                    )
                },
                log.display(),
                super::log_tail(&log, 10).join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(match secret {
        Some(f) => format!(
            "restarted {name} (pid {pid}) with only the secret in {}",
            f.display()
        ),
        None => format!("restarted {name} (pid {pid})"),
    })
}

/// Removes every fault: rules flushed in one transaction, paused agents continued, killed
/// agents started again.
pub fn heal(dir: &Path) -> anyhow::Result<String> {
    let (mut state, ns) = load(dir)?;
    let mut cleared = ns.clone();
    cleared.faults.clear();
    apply_rules(dir, &cleared)?;
    let mut restarted = Vec::new();
    for f in &ns.faults {
        match &f.fault {
            Fault::Pause { node, .. } => {
                if let Ok(n) = lab_node(&state, node) {
                    if n.is_running() {
                        signal("CONT", n.pid);
                    }
                }
            }
            Fault::Kill { node } => restarted.push(node.clone()),
            _ => {}
        }
    }
    state.netns = Some(cleared);
    state.save(dir)?;
    for node in &restarted {
        restart(dir, node)?;
    }
    Ok(format!(
        "healed lab {}: {} fault{} removed{}",
        ns.prefix,
        ns.faults.len(),
        if ns.faults.len() == 1 { "" } else { "s" },
        if restarted.is_empty() {
            String::new()
        } else {
            format!(", restarted {}", restarted.join(", "))
        }
    ))
}

/// Writes the rule set of `ns.faults` to `DIR/faults.nft` and applies it in the hub.
fn apply_rules(dir: &Path, ns: &NetnsState) -> anyhow::Result<()> {
    let text = hub_ruleset(ns, &ns.faults);
    let _ = std::fs::write(dir.join(RULES_FILE), &text);
    netns::nft(&dir.join(netns::NET_LOG), &ns.hub, &text)
        .context("applying the fault rules (nothing was changed)")
}

/// The hub's whole rule set for `faults`: declares the table and chain (a no-op when they
/// exist), flushes the chain and adds one group of rules per network fault.
pub fn hub_ruleset(ns: &NetnsState, faults: &[ActiveFault]) -> String {
    let t = ns.table();
    let mut s = format!(
        "table bridge {t} {{\n\tchain faults {{\n\t\ttype filter hook forward priority 0; policy accept;\n\t}}\n}}\nflush chain bridge {t} faults\n"
    );
    for f in faults {
        // Targets were checked when the fault was added; a rule that cannot be built is skipped.
        for rule in rules(ns, &f.fault).unwrap_or_default() {
            s.push_str(&format!(
                "add rule bridge {t} faults {rule} comment \"{}\"\n",
                f.fault
            ));
        }
    }
    s
}

/// The bridge ports of TARGET: for a site, the WAN ports of its gateways (`wan_side`) or the
/// site ports of all its nodes; for a node, all its ports; `wan`: every WAN port.
fn ports(ns: &NetnsState, target: &str, wan_side: bool) -> anyhow::Result<Vec<String>> {
    let all_ports = |n: &NetnsNode| {
        let mut p = vec![n.site_port.clone()];
        p.extend(n.wan_port.clone());
        p
    };
    if target == "wan" {
        return Ok(ns.nodes.iter().filter_map(|n| n.wan_port.clone()).collect());
    }
    if let Some(n) = ns.node(target) {
        return Ok(all_ports(n));
    }
    let site: Vec<&NetnsNode> = ns.nodes.iter().filter(|n| n.site == target).collect();
    if site.is_empty() {
        let mut sites: Vec<&str> = ns.nodes.iter().map(|n| n.site.as_str()).collect();
        sites.dedup();
        bail!(
            "{target:?} is neither a site ({}) nor a node of the lab (see `clusterctl lab status`)",
            sites.join(", ")
        );
    }
    Ok(if wan_side {
        site.iter()
            .filter(|n| n.role == Role::Gateway)
            .filter_map(|n| n.wan_port.clone())
            .collect()
    } else {
        site.iter().map(|n| n.site_port.clone()).collect()
    })
}

fn set(ports: &[String]) -> String {
    let quoted: Vec<String> = ports.iter().map(|p| format!("\"{p}\"")).collect();
    format!("{{ {} }}", quoted.join(", "))
}

/// The nftables rules (without `add rule ...` and comment) of one network fault.
fn rules(ns: &NetnsState, fault: &Fault) -> anyhow::Result<Vec<String>> {
    Ok(match fault {
        Fault::Partition { a, b } => {
            if a == b {
                bail!("partition {a} {b}: name two different sites or nodes");
            }
            let (pa, pb) = (set(&ports(ns, a, true)?), set(&ports(ns, b, true)?));
            vec![
                format!("iifname {pa} oifname {pb} drop"),
                format!("iifname {pb} oifname {pa} drop"),
            ]
        }
        Fault::Oneway { from, to } => {
            if from == to {
                bail!("oneway {from} {to}: name two different sites or nodes");
            }
            let (pf, pt) = (set(&ports(ns, from, true)?), set(&ports(ns, to, true)?));
            // IPv4 only: ARP must still get through, or FROM soon cannot resolve TO's address
            // (nor TO answer FROM's requests) and the fault turns into a full partition once
            // the neighbour entries expire. (`meta nfproto` does not exist in a bridge chain:
            // the ethertype is the match.)
            vec![format!("iifname {pf} oifname {pt} ether type ip drop")]
        }
        Fault::Isolate { node } => {
            if ns.node(node).is_none() {
                bail!("isolate {node}: the lab has no node {node:?} (see `clusterctl lab status`)");
            }
            let p = set(&ports(ns, node, false)?);
            vec![format!("iifname {p} drop"), format!("oifname {p} drop")]
        }
        Fault::Loss { target, percent } => {
            if !(1..=100).contains(percent) {
                bail!("loss {target} {percent}: the percentage is 1 to 100");
            }
            let p = set(&ports(ns, target, false)?);
            // `numgen random mod 100` is 0-99: 100% is a plain drop.
            let drop = if *percent >= 100 {
                "drop".to_string()
            } else {
                format!("numgen random mod 100 < {percent} drop")
            };
            if ns.node(target).is_some() {
                vec![format!("iifname {p} {drop}"), format!("oifname {p} {drop}")]
            } else {
                vec![format!("iifname {p} {drop}")]
            }
        }
        Fault::Kill { .. } | Fault::Pause { .. } => Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::netns::netns_plan;
    use crate::lab::LabPlan;

    fn lab() -> NetnsState {
        let mut plan = LabPlan::new("us-east=2,eu-west=2", 1, "127.77").unwrap();
        let nodes = netns_plan(&mut plan, "cc0001", 0);
        NetnsState {
            prefix: "cc0001".into(),
            hub: "cc0001-hub".into(),
            slot: 0,
            claim: "/nonexistent".into(),
            namespaces: Vec::new(),
            root_links: Vec::new(),
            nodes,
            faults: Vec::new(),
        }
    }

    fn active(fault: Fault) -> ActiveFault {
        ActiveFault {
            fault,
            since: String::new(),
        }
    }

    #[test]
    fn fault_rules_name_the_bridge_ports_of_their_targets() {
        let ns = lab();
        let text = hub_ruleset(
            &ns,
            &[
                active(Fault::Partition {
                    a: "us-east".into(),
                    b: "eu-west".into(),
                }),
                active(Fault::Oneway {
                    from: "gw-us-1".into(),
                    to: "gw-eu-1".into(),
                }),
                active(Fault::Loss {
                    target: "wan".into(),
                    percent: 5,
                }),
                active(Fault::Isolate {
                    node: "edge-eu-2".into(),
                }),
            ],
        );
        let want = [
            "flush chain bridge cc0001 faults",
            "add rule bridge cc0001 faults iifname { \"cc0001-0w\" } oifname { \"cc0001-3w\" } drop comment \"partition us-east eu-west\"",
            "add rule bridge cc0001 faults iifname { \"cc0001-3w\" } oifname { \"cc0001-0w\" } drop comment \"partition us-east eu-west\"",
            "add rule bridge cc0001 faults iifname { \"cc0001-0s\", \"cc0001-0w\" } oifname { \"cc0001-3s\", \"cc0001-3w\" } ether type ip drop comment \"oneway gw-us-1 gw-eu-1\"",
            "add rule bridge cc0001 faults iifname { \"cc0001-0w\", \"cc0001-3w\" } numgen random mod 100 < 5 drop comment \"loss wan 5\"",
            "add rule bridge cc0001 faults iifname { \"cc0001-5s\" } drop comment \"isolate edge-eu-2\"",
            "add rule bridge cc0001 faults oifname { \"cc0001-5s\" } drop comment \"isolate edge-eu-2\"",
        ];
        for w in want {
            assert!(text.contains(w), "missing {w}\n{text}");
        }
        assert!(hub_ruleset(&ns, &[]).ends_with("flush chain bridge cc0001 faults\n"));
        let all = rules(
            &ns,
            &Fault::Loss {
                target: "wan".into(),
                percent: 100,
            },
        )
        .unwrap();
        assert_eq!(all, ["iifname { \"cc0001-0w\", \"cc0001-3w\" } drop"]);
    }

    #[test]
    fn a_oneway_fault_drops_ip_only_never_arp() {
        let ns = lab();
        let r = rules(
            &ns,
            &Fault::Oneway {
                from: "us-east".into(),
                to: "eu-west".into(),
            },
        )
        .unwrap();
        assert_eq!(
            r,
            ["iifname { \"cc0001-0w\" } oifname { \"cc0001-3w\" } ether type ip drop"]
        );
    }

    #[test]
    fn fault_targets_are_checked() {
        let ns = lab();
        for (f, needle) in [
            (
                Fault::Partition {
                    a: "us-east".into(),
                    b: "mars".into(),
                },
                "neither a site",
            ),
            (
                Fault::Partition {
                    a: "us-east".into(),
                    b: "us-east".into(),
                },
                "two different",
            ),
            (
                Fault::Isolate {
                    node: "us-east".into(),
                },
                "no node",
            ),
        ] {
            let e = rules(&ns, &f).unwrap_err();
            assert!(e.to_string().contains(needle), "{f}: {e}");
        }
    }

    #[test]
    fn active_faults_round_trip_as_json() {
        let f = active(Fault::Loss {
            target: "wan".into(),
            percent: 5,
        });
        let text = serde_json::to_string(&f).unwrap();
        assert_eq!(
            text,
            r#"{"kind":"loss","target":"wan","percent":5,"since":""}"#
        );
        assert_eq!(serde_json::from_str::<ActiveFault>(&text).unwrap(), f);
    }
}
