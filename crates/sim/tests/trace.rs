//! Behaviour pinned by trace hashes: a fixed set of seeded scenarios, and for each the SHA-256
//! of every event every node emitted (time, kind, node, peer, reason) and of the frames sent, by
//! kind. A change that is meant to change no behaviour — moving state between modules, splitting
//! the engine — must leave every hash as it is. A change that is meant to change behaviour
//! updates `trace_hashes.txt` (run with `CLUSTERCTL_UPDATE_TRACES=1`) and says why in its commit.

use clusterctl_sim::Sim;
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

const HASHES: &str = "tests/trace_hashes.txt";

/// The trace of a finished run: events per node in node order, then frame counts by kind.
fn trace_hash(sim: &Sim) -> String {
    let mut h = Sha256::new();
    for n in &sim.nodes {
        h.update(format!("node {}\n", n.ident.name));
        for e in &n.events {
            let node = e.node.as_ref().map_or("-", |x| x.as_str());
            let peer = e.peer.as_ref().map_or("-", |x| x.as_str());
            h.update(format!(
                "{} {} {node} {peer} {}\n",
                e.at_ms,
                e.kind.as_str(),
                e.reason
            ));
        }
    }
    for (kind, (count, bytes)) in &sim.frame_kinds {
        h.update(format!("frames {kind} {count} {bytes}\n"));
    }
    h.finalize().iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Each scenario: a name, its seed, and what it does (from the simulator's start).
type Scenario = (&'static str, u64, fn(u64) -> Sim);

const SCENARIOS: [Scenario; 12] = [
    ("converge-one-gateway", 1, |seed| {
        let mut sim = Sim::two_sites(seed, 1);
        sim.run_for(secs(30));
        sim
    }),
    ("converge-two-gateways", 2, |seed| {
        let mut sim = Sim::two_sites(seed, 2);
        sim.run_for(secs(30));
        sim
    }),
    ("wan-cut-and-heal", 3, |seed| {
        let mut sim = Sim::two_sites(seed, 1);
        sim.run_for(secs(20));
        sim.cut_wan("us-east", "eu-west");
        sim.run_for(secs(25));
        sim.heal();
        sim.run_for(secs(20));
        sim
    }),
    ("one-way-and-heal", 4, |seed| {
        let mut sim = Sim::two_sites(seed, 1);
        sim.run_for(secs(20));
        sim.cut_one_way("us-east", "eu-west");
        sim.run_for(secs(40));
        sim.heal();
        sim.run_for(secs(20));
        sim
    }),
    ("member-crash", 5, |seed| {
        let mut sim = Sim::two_sites(seed, 1);
        sim.run_for(secs(20));
        sim.crash("edge-eu-2");
        sim.run_for(secs(20));
        sim
    }),
    ("gateway-crash-failover", 6, |seed| {
        let mut sim = Sim::two_sites(seed, 2);
        sim.run_for(secs(20));
        sim.crash("gw-eu-1");
        sim.run_for(secs(20));
        sim
    }),
    ("member-restart", 7, |seed| {
        let mut sim = Sim::two_sites(seed, 1);
        sim.run_for(secs(20));
        sim.crash("edge-us-2");
        sim.run_for(secs(10));
        sim.restart("edge-us-2");
        sim.run_for(secs(20));
        sim
    }),
    ("member-redeploy", 8, |seed| {
        let mut sim = Sim::two_sites(seed, 1);
        sim.run_for(secs(20));
        sim.crash("edge-us-2");
        sim.run_for(secs(10));
        sim.redeploy("edge-us-2");
        sim.run_for(secs(20));
        sim
    }),
    ("forget-a-dead-node", 9, |seed| {
        let mut sim = Sim::two_sites(seed, 1);
        sim.run_for(secs(20));
        sim.crash("edge-eu-2");
        sim.run_for(secs(15));
        sim.forget("edge-us-1", "edge-eu-2", false)
            .unwrap_or_else(|e| panic!("forget: {e} (seed {seed})"));
        sim.run_for(secs(15));
        sim
    }),
    ("graceful-leave", 10, |seed| {
        let mut sim = Sim::two_sites(seed, 1);
        sim.run_for(secs(20));
        sim.leave("edge-eu-1", secs(2));
        sim.run_for(secs(20));
        sim
    }),
    ("member-pause", 11, |seed| {
        let mut sim = Sim::two_sites(seed, 1);
        sim.run_for(secs(20));
        sim.pause("edge-us-1", secs(8));
        sim.run_for(secs(25));
        sim
    }),
    ("isolate-and-heal", 12, |seed| {
        let mut sim = Sim::two_sites(seed, 2);
        sim.run_for(secs(20));
        sim.isolate("edge-us-2");
        sim.run_for(secs(15));
        sim.heal();
        sim.run_for(secs(20));
        sim
    }),
];

fn hashes_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(HASHES)
}

#[test]
fn seeded_scenarios_keep_their_trace_hashes() {
    let computed: Vec<(String, String)> = SCENARIOS
        .iter()
        .map(|(name, seed, run)| (format!("{name} seed={seed}"), trace_hash(&run(*seed))))
        .collect();
    let text: String = computed.iter().map(|(k, h)| format!("{k} {h}\n")).collect();
    if std::env::var_os("CLUSTERCTL_UPDATE_TRACES").is_some() {
        std::fs::write(hashes_path(), &text).expect("write the trace hashes");
        return;
    }
    let committed = std::fs::read_to_string(hashes_path())
        .unwrap_or_else(|e| panic!("{HASHES}: {e} (create it with CLUSTERCTL_UPDATE_TRACES=1)"));
    let changed: Vec<String> = committed
        .lines()
        .zip(text.lines())
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("  was {a}\n  now {b}"))
        .collect();
    assert!(
        changed.is_empty() && committed.lines().count() == text.lines().count(),
        "behaviour changed in {} scenario(s) — if that is intended, run with CLUSTERCTL_UPDATE_TRACES=1 and say why in the commit:\n{}",
        changed.len(),
        changed.join("\n")
    );
}

#[test]
fn the_same_scenario_gives_the_same_hash_twice() {
    let (_, seed, run) = SCENARIOS[3];
    assert_eq!(
        trace_hash(&run(seed)),
        trace_hash(&run(seed)),
        "seed {seed}"
    );
}
