//! `clusterctl topology [--probe] [--json]`: sites, nodes and every expected link.

use crate::client::AgentArgs;
use crate::client::Client;
use crate::output::{out, out_json};
use clusterctl_api::{LinkKind, LinkState, NodeStatus, Role, Topology};
use std::fmt::Write;
use std::process::ExitCode;
use std::time::Duration;

/// Show sites, nodes and links; exit 1 unless healthy (every expected node alive, none refused
/// or duplicated, every expected link up).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the report as JSON (schema: docs/api.md).
    #[arg(long)]
    json: bool,
    /// Actively probe every expected link (one echo over each, from its lower-named end) before
    /// reporting; exit 1 if any probe fails.
    #[arg(long)]
    probe: bool,
}

pub fn run(a: Args, agent: &AgentArgs) -> anyhow::Result<ExitCode> {
    let (client, path) = if a.probe {
        // --timeout is the wait for each probe; probes run in parallel, in up to three rounds.
        let per_probe = agent
            .timeout()?
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(60));
        let ms = u64::try_from(per_probe.as_millis())
            .unwrap_or(60_000)
            .max(1);
        (
            Client::resolve_with(agent, per_probe * 3 + Duration::from_secs(10))?,
            format!("/v1/topology?probe=true&timeout_ms={ms}"),
        )
    } else {
        (Client::resolve(agent)?, "/v1/topology".to_string())
    };
    let t: Topology = client.get(&path)?;
    if a.json {
        out_json(&t)?;
    } else {
        out(render_text(&t).trim_end());
    }
    let probes_ok = t.probes.as_ref().is_none_or(|p| p.iter().all(|r| r.ok));
    Ok(if t.healthy && probes_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn with_status(name: &str, s: NodeStatus) -> String {
    if s == NodeStatus::Alive {
        name.to_string()
    } else {
        format!("{name}({})", s.as_str())
    }
}

/// Human rendering of a topology report. The first lines keep the form
/// `site=NAME nodes=[...] gateways=[...]` and `links=N secure=true|false`.
pub fn render_text(t: &Topology) -> String {
    let mut s = String::new();
    for site in &t.sites {
        let members: Vec<String> = site
            .nodes
            .iter()
            .filter(|n| n.role == Role::Member)
            .map(|n| with_status(&n.name, n.status))
            .collect();
        let gateways: Vec<String> = site
            .gateways
            .iter()
            .map(|g| match site.nodes.iter().find(|n| &n.name == g) {
                Some(n) => with_status(g, n.status),
                None => format!("{g}(missing)"),
            })
            .collect();
        let _ = writeln!(
            s,
            "site={} nodes=[{}] gateways=[{}]",
            site.name,
            members.join(","),
            gateways.join(",")
        );
    }
    let expected = t.links.iter().filter(|l| l.expected).count();
    let up = t
        .links
        .iter()
        .filter(|l| l.expected && l.state == LinkState::Up)
        .count();
    let _ = write!(s, "links={expected} secure={}", t.secure);
    if let Some(r) = &t.insecure_reason {
        let _ = write!(s, " ({r})");
    }
    let _ = writeln!(
        s,
        " up={up}/{expected} healthy={} contract={} observer={}",
        t.healthy, t.contract_hash, t.observer
    );
    let w = t.links.iter().map(|l| l.from.len()).max().unwrap_or(0);
    let w2 = t.links.iter().map(|l| l.to.len()).max().unwrap_or(0);
    for l in &t.links {
        let arrow = match l.kind {
            LinkKind::Site => "<->",
            LinkKind::Wan => "<=>",
        };
        let rtt = l.rtt_ms.map_or("-".to_string(), |r| format!("{r:.2}ms"));
        let proto = l.protocol.clone().unwrap_or_else(|| "-".into());
        let _ = write!(
            s,
            "  {:w$} {arrow} {:w2$}  {:4}  {:8} {:>9}  {:8}",
            l.from,
            l.to,
            l.kind.as_str(),
            l.state.as_str(),
            rtt,
            proto
        );
        if let Some(since) = &l.since {
            let _ = write!(s, "  since {since}");
        }
        if !l.expected {
            let _ = write!(s, "  (not in the contract)");
        }
        if let Some(k) = &l.secret_key {
            let _ = write!(s, "  secret {k}");
        }
        if let Some(d) = l.cert_days_left {
            let _ = write!(s, "  cert {d}d");
        }
        if let Some(r) = &l.reason {
            if l.state != LinkState::Up {
                let _ = write!(s, "  {r}");
            }
        }
        s.push('\n');
    }
    for p in &t.problems {
        let _ = writeln!(s, "NOT HEALTHY: {p}");
    }
    for w in &t.warnings {
        let _ = writeln!(s, "WARNING: {w}");
    }
    if let Some(probes) = &t.probes {
        let ok = probes.iter().filter(|p| p.ok).count();
        let _ = writeln!(s, "probes={ok}/{} ok", probes.len());
        for p in probes {
            if p.ok {
                let _ = writeln!(
                    s,
                    "  ok    {} -> {}  {}  {:.2}ms",
                    p.from,
                    p.to,
                    p.kind.as_str(),
                    p.rtt_ms.unwrap_or(0.0)
                );
            } else {
                let _ = writeln!(
                    s,
                    "  FAIL  {} -> {}  {}  {}",
                    p.from,
                    p.to,
                    p.kind.as_str(),
                    p.error.as_deref().unwrap_or("failed")
                );
            }
        }
    }
    s
}
