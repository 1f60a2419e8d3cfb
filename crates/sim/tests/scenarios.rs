//! Seeded scenarios over the real protocol core. Each prints its seed; replay a failure with
//! `CLUSTERCTL_SIM_SEED=N cargo test -p clusterctl-sim --test scenarios NAME -- --nocapture`.

use clusterctl_api::{EventKind, LinkState, NodeStatus};
use clusterctl_core::engine::Timing;
use clusterctl_sim::{seed_from_env, Sim, SimConfig, SiteSpec};
use std::time::Duration;

const CONVERGE: Duration = Duration::from_secs(60);

fn converged(seed: u64, gateways: usize) -> Sim {
    let mut sim = Sim::two_sites(seed, gateways);
    let took = sim.run_until(CONVERGE, Sim::converged);
    assert!(
        took.is_some(),
        "two sites did not converge in {CONVERGE:?} (seed {seed})"
    );
    sim
}

fn suspicions_of(sim: &Sim, observer: &str, about: &[String], since_ms: u64) -> usize {
    let i = sim.idx(observer);
    sim.nodes[i]
        .events
        .iter()
        .filter(|e| e.at_ms >= since_ms)
        .filter(|e| matches!(e.kind, EventKind::NodeSuspect | EventKind::NodeDead))
        .filter(|e| {
            e.node
                .as_ref()
                .is_some_and(|n| about.iter().any(|a| a == n.as_str()))
        })
        .count()
}

#[test]
fn two_sites_converge_with_seven_secure_links() {
    let seed = seed_from_env(7);
    let sim = converged(seed, 1);
    for observer in sim.names() {
        let t = sim.topology(&observer);
        assert_eq!(t.links.len(), 7, "{observer}: {:#?} (seed {seed})", t.links);
        assert!(t.healthy && t.secure, "{observer} (seed {seed})");
        let wan: Vec<_> = t
            .links
            .iter()
            .filter(|l| l.kind == clusterctl_api::LinkKind::Wan)
            .collect();
        assert_eq!(wan.len(), 1);
        assert_eq!(
            (wan[0].from.as_str(), wan[0].to.as_str()),
            ("gw-eu-1", "gw-us-1")
        );
        assert_eq!(t.sites.iter().map(|s| s.nodes.len()).sum::<usize>(), 6);
    }
}

#[test]
fn ping_crosses_sites_through_both_gateways() {
    let seed = seed_from_env(11);
    let mut sim = converged(seed, 1);
    let r = sim
        .ping("edge-us-1", "edge-eu-2", Duration::from_secs(10))
        .expect("answer");
    assert!(r.ok, "{r:#?} (seed {seed})");
    assert_eq!(
        r.attempts[0].path,
        ["edge-us-1", "gw-us-1", "gw-eu-1", "edge-eu-2"],
        "seed {seed}"
    );
    assert_eq!(r.attempts[0].hops_ms.len(), 3);
    // 0.2 ms + 20 ms + 0.2 ms each way in the model, and the hops are measured, not estimated:
    // the WAN hop carries the 40 ms, and the hops add up to the total.
    let a = &r.attempts[0];
    assert!(a.total_ms >= 40.0, "{r:#?}");
    assert!(
        a.hops_ms[1] >= 39.0 && a.hops_ms[0] < 2.0 && a.hops_ms[2] < 2.0,
        "{r:#?} (seed {seed})"
    );
    let sum: f64 = a.hops_ms.iter().sum();
    assert!((sum - a.total_ms).abs() < 0.01, "{r:#?}");
}

#[test]
fn member_never_links_outside_its_site() {
    let seed = seed_from_env(3);
    let sim = converged(seed, 2);
    for n in &sim.nodes {
        let e = n.engine().expect("running");
        for p in e.linked_peers() {
            let peer = &sim.nodes[sim.idx(p.as_str())].ident;
            if n.ident.role == clusterctl_api::Role::Member {
                assert_eq!(
                    peer.site, n.ident.site,
                    "{} linked to {} (seed {seed})",
                    n.ident.name, p
                );
            }
        }
    }
}

#[test]
fn gateway_death_fails_over_to_the_other_gateway() {
    let seed = seed_from_env(21);
    let mut sim = converged(seed, 2);
    let r = sim
        .ping("edge-us-1", "edge-eu-2", Duration::from_secs(10))
        .expect("answer");
    assert!(r.ok, "{r:#?} (seed {seed})");
    let used = r.attempts[0].path[1].clone();
    assert!(used.starts_with("gw-us-"), "{used}");
    let start_ms = sim.now().as_millis() as u64;
    sim.crash(&used);
    // Cross-site pings resume through the other gateway.
    let mut resumed = None;
    for _ in 0..60 {
        sim.run_for(Duration::from_millis(500));
        if let Some(r) = sim.ping("edge-us-1", "edge-eu-2", Duration::from_secs(5)) {
            if r.ok {
                resumed = Some(r);
                break;
            }
        }
    }
    let r = resumed.unwrap_or_else(|| panic!("pings did not resume (seed {seed})"));
    assert_ne!(r.attempts[0].path[1], used, "seed {seed}");
    // The dead gateway is dead in its own site, and nobody else was suspected.
    sim.run_until(Duration::from_secs(30), |s| {
        s.status("edge-us-1", &used) == NodeStatus::Dead
    })
    .unwrap_or_else(|| panic!("{used} not declared dead (seed {seed})"));
    let healthy: Vec<String> = sim.names().into_iter().filter(|n| *n != used).collect();
    for observer in &healthy {
        assert_eq!(
            suspicions_of(&sim, observer, &healthy, start_ms),
            0,
            "{observer} suspected a healthy node (seed {seed})"
        );
    }
}

#[test]
fn wan_cut_makes_far_site_unreachable_never_dead_and_heals() {
    let seed = seed_from_env(42);
    let mut sim = converged(seed, 1);
    let us = sim.site_nodes("us-east");
    let eu = sim.site_nodes("eu-west");
    let start_ms = sim.now().as_millis() as u64;
    sim.cut_wan("us-east", "eu-west");
    // Throughout the cut: each site sees its own nodes alive, pings inside sites succeed, and
    // the far site is never declared dead.
    for step in 0..40 {
        sim.run_for(Duration::from_secs(1));
        for (mine, far) in [(&us, &eu), (&eu, &us)] {
            for o in mine.iter() {
                for n in mine.iter().filter(|n| *n != o) {
                    assert_eq!(
                        sim.status(o, n),
                        NodeStatus::Alive,
                        "{o} sees {n} (step {step}, seed {seed})"
                    );
                }
                for n in far.iter() {
                    let s = sim.status(o, n);
                    assert!(
                        matches!(s, NodeStatus::Alive | NodeStatus::Unreachable),
                        "{o} sees {n} {s} (seed {seed})"
                    );
                }
            }
        }
        if step % 10 == 0 {
            let r = sim
                .ping("edge-us-1", "edge-us-2", Duration::from_secs(5))
                .expect("answer");
            assert!(
                r.ok,
                "ping inside us-east failed during the cut (seed {seed})"
            );
        }
    }
    for o in &us {
        for n in &eu {
            assert_eq!(
                sim.status(o, n),
                NodeStatus::Unreachable,
                "{o} sees {n} (seed {seed})"
            );
        }
    }
    for o in us.iter().chain(eu.iter()) {
        let i = sim.idx(o);
        let dead: Vec<_> = sim.nodes[i]
            .events
            .iter()
            .filter(|e| e.at_ms >= start_ms && e.kind == EventKind::NodeDead)
            .collect();
        assert!(
            dead.is_empty(),
            "{o} declared nodes dead during a WAN cut: {dead:?} (seed {seed})"
        );
        let mine = if us.contains(o) { &us } else { &eu };
        assert_eq!(
            suspicions_of(&sim, o, mine, start_ms),
            0,
            "{o} suspected its own site (seed {seed})"
        );
    }
    // The WAN link is reported down, and a cross-site ping says where it broke.
    let t = sim.topology("edge-us-1");
    let wan = t
        .links
        .iter()
        .find(|l| l.kind == clusterctl_api::LinkKind::Wan)
        .expect("wan link");
    assert_eq!(wan.state, LinkState::Down, "{wan:#?} (seed {seed})");
    let r = sim
        .ping("edge-us-1", "edge-eu-1", Duration::from_secs(10))
        .expect("answer");
    assert!(!r.ok);
    assert_eq!(
        r.attempts[0].broke_at.as_deref(),
        Some("edge-us-1"),
        "{r:#?}"
    );
    // Heal: every link returns and the tables agree.
    sim.heal();
    sim.run_until(Duration::from_secs(90), Sim::converged)
        .unwrap_or_else(|| panic!("did not reconverge after heal (seed {seed})"));
    let digests: Vec<_> = sim
        .names()
        .iter()
        .map(|n| {
            let e = sim.engine(n);
            e.table()
                .iter()
                .map(|r| (r.name.clone(), r.clock))
                .collect::<Vec<_>>()
        })
        .collect();
    sim.run_for(Duration::from_secs(5));
    let clocks = |sim: &Sim| -> Vec<Vec<(String, u64)>> {
        sim.names()
            .iter()
            .map(|n| {
                sim.engine(n)
                    .table()
                    .iter()
                    .map(|r| (r.name.to_string(), r.clock))
                    .collect()
            })
            .collect()
    };
    let c = clocks(&sim);
    assert!(
        c.windows(2).all(|w| w[0] == w[1]),
        "tables differ after heal: {c:?} (seed {seed})"
    );
    drop(digests);
}

#[test]
fn restart_keeps_the_table_and_raises_the_clock() {
    let seed = seed_from_env(5);
    let mut sim = converged(seed, 1);
    let before = sim.engine("edge-eu-1").clock();
    let known = sim.engine("edge-eu-1").table().len();
    sim.crash("edge-eu-1");
    sim.run_for(Duration::from_secs(2));
    sim.restart("edge-eu-1");
    assert!(sim.engine("edge-eu-1").clock() > before, "seed {seed}");
    assert_eq!(sim.engine("edge-eu-1").table().len(), known, "seed {seed}");
    sim.run_until(CONVERGE, Sim::converged)
        .unwrap_or_else(|| panic!("no reconvergence (seed {seed})"));
    let c = sim.engine("edge-eu-1").clock();
    for n in sim.names() {
        let seen = sim
            .engine(&n)
            .table()
            .get("edge-eu-1")
            .expect("record")
            .clock;
        assert_eq!(seen, c, "{n} (seed {seed})");
    }
}

#[test]
fn redeployed_node_learns_its_clock_from_peers() {
    let seed = seed_from_env(9);
    let mut sim = converged(seed, 1);
    let before = sim.engine("edge-us-2").clock();
    assert!(before > 1);
    sim.crash("edge-us-2");
    sim.redeploy("edge-us-2");
    assert_eq!(sim.engine("edge-us-2").clock(), 1);
    sim.run_until(CONVERGE, Sim::converged)
        .unwrap_or_else(|| panic!("no reconvergence (seed {seed})"));
    assert!(sim.engine("edge-us-2").clock() > before, "seed {seed}");
}

#[test]
fn a_live_node_is_forgotten_only_with_force() {
    let seed = seed_from_env(17);
    let mut sim = converged(seed, 1);
    let e = sim
        .forget("edge-us-1", "edge-eu-2", false)
        .expect_err("forgetting a live node without force");
    assert!(
        e.contains("is alive") && e.contains("--force"),
        "{e} (seed {seed})"
    );
    assert!(
        !sim.engine("edge-us-1")
            .table()
            .get("edge-eu-2")
            .is_some_and(|r| r.is_tombstone()),
        "nothing was written (seed {seed})"
    );
    let e = sim
        .forget("edge-us-1", "edge-us-1", true)
        .expect_err("a node forgetting itself");
    assert!(e.contains("cannot forget itself"), "{e} (seed {seed})");
    sim.forget("edge-us-1", "edge-eu-2", true)
        .unwrap_or_else(|e| panic!("forced forget: {e} (seed {seed})"));
}

#[test]
fn forgotten_node_stays_out() {
    let seed = seed_from_env(13);
    let mut sim = converged(seed, 1);
    sim.crash("edge-eu-2");
    sim.run_for(Duration::from_secs(15));
    let clock = sim.forget("edge-us-1", "edge-eu-2", false).expect("forget");
    sim.run_for(Duration::from_secs(10));
    for n in sim.names().into_iter().filter(|n| n != "edge-eu-2") {
        let r = sim
            .engine(&n)
            .table()
            .get("edge-eu-2")
            .cloned()
            .expect("tombstone");
        assert!(
            r.is_tombstone() && r.clock >= clock,
            "{n}: {r:?} (seed {seed})"
        );
        assert_eq!(sim.status(&n, "edge-eu-2"), NodeStatus::Forgotten);
    }
    // The old node comes back with its old table: it is refused, and stays out.
    sim.restart("edge-eu-2");
    sim.run_for(Duration::from_secs(20));
    for n in sim.names().into_iter().filter(|n| n != "edge-eu-2") {
        assert_eq!(
            sim.status(&n, "edge-eu-2"),
            NodeStatus::Forgotten,
            "{n} (seed {seed})"
        );
        assert!(!sim
            .engine(&n)
            .linked_peers()
            .iter()
            .any(|p| p.as_str() == "edge-eu-2"));
    }
    // Healthy again without it.
    assert!(
        sim.topology("edge-us-1").healthy,
        "{:#?}",
        sim.topology("edge-us-1").links
    );
}

#[test]
fn same_seed_same_run() {
    let seed = seed_from_env(99);
    let run = |seed| {
        let mut sim = Sim::two_sites(seed, 2);
        sim.run_for(Duration::from_secs(20));
        sim.crash("gw-eu-1");
        sim.run_for(Duration::from_secs(20));
        sim.nodes
            .iter()
            .map(|n| {
                n.events
                    .iter()
                    .map(|e| format!("{}:{:?}:{}", e.at_ms, e.kind, e.reason))
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(run(seed), run(seed), "seed {seed}");
}

#[test]
fn graceful_leave_is_reported_left_never_dead() {
    let seed = seed_from_env(17);
    let mut sim = converged(seed, 1);
    let start_ms = sim.now().as_millis() as u64;
    sim.leave("edge-us-2", Duration::from_millis(200));
    sim.run_for(Duration::from_secs(30));
    for o in sim.names().into_iter().filter(|n| n != "edge-us-2") {
        assert_eq!(
            sim.status(&o, "edge-us-2"),
            NodeStatus::Left,
            "{o} (seed {seed})"
        );
        let i = sim.idx(&o);
        let bad: Vec<_> = sim.nodes[i]
            .events
            .iter()
            .filter(|e| {
                e.at_ms >= start_ms && e.node.as_ref().is_some_and(|n| n.as_str() == "edge-us-2")
            })
            .filter(|e| matches!(e.kind, EventKind::NodeDead | EventKind::NodeSuspect))
            .collect();
        assert!(
            bad.is_empty(),
            "{o} reported a graceful leave as a failure: {bad:?} (seed {seed})"
        );
    }
    // Its links are no longer expected: the cluster is healthy without it.
    assert!(sim.topology("edge-us-1").healthy, "seed {seed}");
}

fn refusals(sim: &Sim) -> u64 {
    sim.nodes
        .iter()
        .filter_map(|n| n.engine())
        .map(|e| e.counters.refused_in + e.counters.refused_out)
        .sum()
}

#[test]
fn node_restarted_with_only_a_new_secret_is_refused_as_secret_mismatch() {
    use clusterctl_core::secret::Keyring;
    use clusterctl_sim::sim_secret;
    let seed = seed_from_env(23);
    let mut sim = converged(seed, 1);
    sim.crash("edge-us-2");
    sim.restart_with_keyring("edge-us-2", Keyring::new(sim_secret(2)));
    sim.run_for(Duration::from_secs(15));
    let t = sim.topology("edge-us-1");
    let link = t
        .links
        .iter()
        .find(|l| l.from == "edge-us-1" && l.to == "edge-us-2")
        .expect("link");
    assert_eq!(link.state, LinkState::Refused, "{link:#?} (seed {seed})");
    assert!(
        link.reason
            .as_deref()
            .unwrap_or("")
            .contains("secret mismatch"),
        "{link:#?} (seed {seed})"
    );
    assert!(!t.healthy);
}

#[test]
fn install_use_remove_rotates_the_secret_with_zero_refused_links() {
    use clusterctl_sim::sim_secret;
    let seed = seed_from_env(29);
    let mut sim = converged(seed, 2);
    let before = refusals(&sim);
    let new = sim_secret(2);
    let (old_id, new_id) = (sim_secret(1).id(), new.id());
    let names = sim.names();
    for n in &names {
        let s = new.clone();
        sim.keyring_op(n, |e, now| {
            e.install_key(now, s).map(drop).map_err(|e| e.to_string())
        })
        .expect("install");
        sim.run_for(Duration::from_millis(300));
    }
    let s = sim.engine("edge-us-1").secrets();
    let v = s
        .keys
        .iter()
        .find(|k| k.id == new_id.to_string())
        .expect("new key listed");
    let n = names.len() as u32;
    assert_eq!((v.holders, v.in_use_by, s.nodes), (n, 0, n), "{s:#?}");
    for n in &names {
        sim.keyring_op(n, |e, now| {
            e.use_key(now, new_id).map(drop).map_err(|e| e.to_string())
        })
        .expect("use");
        // Roll: restart the node so every one of its links is handshaken again.
        sim.crash(n);
        sim.restart(n);
        sim.run_until(CONVERGE, Sim::converged)
            .unwrap_or_else(|| panic!("no convergence after rolling {n} (seed {seed})"));
    }
    for n in &names {
        sim.keyring_op(n, |e, now| {
            e.remove_key(now, old_id).map_err(|e| e.to_string())
        })
        .expect("remove");
        sim.crash(n);
        sim.restart(n);
        sim.run_until(CONVERGE, Sim::converged)
            .unwrap_or_else(|| panic!("no convergence after rolling {n} (seed {seed})"));
    }
    assert_eq!(
        refusals(&sim),
        before,
        "a link was refused during the rotation (seed {seed})"
    );
    let s = sim.engine("gw-eu-1").secrets();
    assert_eq!(s.keys.len(), 1, "{s:#?}");
    assert_eq!(
        (s.keys[0].id.clone(), s.keys[0].holders),
        (new_id.to_string(), n)
    );
    let t = sim.topology("edge-us-1");
    assert!(
        t.links
            .iter()
            .all(|l| l.secret_key.as_deref() == Some(new_id.to_string().as_str())),
        "seed {seed}"
    );
}

#[test]
fn one_way_wan_is_reported_with_its_direction_and_nobody_flaps() {
    let seed = seed_from_env(31);
    let mut sim = converged(seed, 1);
    let us = sim.site_nodes("us-east");
    let eu = sim.site_nodes("eu-west");
    let start_ms = sim.now().as_millis() as u64;
    sim.cut_one_way("us-east", "eu-west");
    let mut last: std::collections::BTreeMap<(String, String), NodeStatus> = Default::default();
    let mut flips = 0;
    for _ in 0..60 {
        sim.run_for(Duration::from_secs(1));
        for (mine, far) in [(&us, &eu), (&eu, &us)] {
            for o in mine.iter() {
                for n in mine.iter().filter(|n| *n != o) {
                    assert_eq!(
                        sim.status(o, n),
                        NodeStatus::Alive,
                        "{o} sees {n} (seed {seed})"
                    );
                }
                for n in far.iter() {
                    let s = sim.status(o, n);
                    assert!(
                        matches!(s, NodeStatus::Alive | NodeStatus::Unreachable),
                        "{o} sees {n} {s} (seed {seed})"
                    );
                    if let Some(prev) = last.insert((o.clone(), n.clone()), s) {
                        if prev != s {
                            flips += 1;
                        }
                    }
                }
            }
        }
    }
    // Each observer turns the far site unreachable once and stays there: no flapping.
    assert!(
        flips <= us.len() * eu.len() * 2,
        "{flips} status flips (seed {seed})"
    );
    for observer in ["gw-us-1", "edge-us-1"] {
        let t = sim.topology(observer);
        let wan = t
            .links
            .iter()
            .find(|l| l.kind == clusterctl_api::LinkKind::Wan)
            .expect("wan");
        assert_eq!(
            wan.state,
            LinkState::OneWay,
            "{observer}: {wan:#?} (seed {seed})"
        );
        let why = wan.reason.as_deref().unwrap_or("");
        assert!(
            why.contains("gw-eu-1 -> gw-us-1 gets through, gw-us-1 -> gw-eu-1 does not"),
            "{why}"
        );
    }
    for o in sim.names() {
        let i = sim.idx(&o);
        assert!(
            !sim.nodes[i]
                .events
                .iter()
                .any(|e| e.at_ms >= start_ms && e.kind == EventKind::NodeDead),
            "{o} declared a node dead during a one-way cut (seed {seed})"
        );
    }
    sim.heal();
    sim.run_until(Duration::from_secs(90), Sim::converged)
        .unwrap_or_else(|| panic!("no reconvergence after heal (seed {seed})"));
    let t = sim.topology("edge-us-1");
    assert!(
        t.links.iter().all(|l| l.state == LinkState::Up),
        "seed {seed}"
    );
}

/// Tables that agree cost one 12-byte summary per node per idle sync period (30 s) once
/// nothing has changed for that long: no digest and no record moves. A change (here a crash,
/// which rewrites records) brings back a summary per node every 2 s, and the tables agree
/// anew.
#[test]
fn agreeing_tables_exchange_a_summary_per_node_only_every_idle_period() {
    let seed = seed_from_env(4);
    let mut sim = converged(seed, 2);
    let idle = Timing::lan().sync_idle;
    // Let link reports settle and every record reach every node, then stay unchanged for
    // a whole idle period.
    sim.run_for(Duration::from_secs(10) + idle);
    let nodes = sim.names().len() as u64;
    let summaries = |sim: &Sim| -> Vec<_> {
        sim.names()
            .iter()
            .filter(|n| n.as_str() != "edge-eu-2")
            .map(|n| sim.engine(n).table().summary())
            .collect()
    };
    let s = summaries(&sim);
    assert!(
        s.windows(2).all(|w| w[0] == w[1]),
        "tables differ after settling: {s:?} (seed {seed})"
    );
    let sent = |sim: &Sim, before: &std::collections::BTreeMap<&str, (u64, u64)>, k: &str| {
        sim.frame_kinds.get(k).map_or(0, |c| c.0) - before.get(k).map_or(0, |c| c.0)
    };
    let before = sim.frame_kinds.clone();
    // A minute: two idle periods (30 s), where rounds every `sync_every` would be thirty.
    sim.run_for(Duration::from_secs(60));
    let quiet = sent(&sim, &before, "summary");
    assert!(quiet > 0, "no anti-entropy round at idle (seed {seed})");
    assert!(
        quiet <= nodes * 2,
        "{quiet} summaries from {nodes} nodes in a quiet minute (seed {seed})"
    );
    assert_eq!(
        sent(&sim, &before, "digest"),
        0,
        "a digest moved (seed {seed})"
    );
    assert_eq!(
        sent(&sim, &before, "records"),
        0,
        "a record moved (seed {seed})"
    );

    let before = sim.frame_kinds.clone();
    sim.crash("edge-eu-2");
    sim.run_for(Duration::from_secs(10));
    let busy = sent(&sim, &before, "summary");
    assert!(
        busy >= nodes * 2,
        "only {busy} summaries from {nodes} nodes in 10 s after a change (seed {seed})"
    );
    sim.run_until(Duration::from_secs(30), |sim| {
        summaries(sim).windows(2).all(|w| w[0] == w[1])
    })
    .unwrap_or_else(|| panic!("tables never agreed after the change (seed {seed})"));
}

/// A record that a node missed while it was cut off (its links stayed up, so no link-up sync
/// follows) reaches it by anti-entropy alone: differing summaries, then per-site summaries,
/// then a digest of the site that differs.
#[test]
fn a_record_missed_while_cut_off_is_repaired_by_anti_entropy() {
    let seed = seed_from_env(6);
    let mut sim = converged(seed, 1);
    sim.crash("edge-eu-2");
    sim.run_for(Duration::from_secs(15));
    // Shorter than the idle timeout: edge-us-2's connections survive, it misses the pushes.
    sim.isolate("edge-us-2");
    let clock = sim.forget("edge-us-1", "edge-eu-2", false).expect("forget");
    sim.run_for(Duration::from_secs(1));
    sim.heal();
    let before = sim.frame_kinds.clone();
    let has_tombstone = |s: &Sim| {
        s.engine("edge-us-2")
            .table()
            .get("edge-eu-2")
            .is_some_and(|r| r.is_tombstone() && r.clock >= clock)
    };
    assert!(
        !has_tombstone(&sim),
        "the tombstone got through the cut (seed {seed})"
    );
    sim.run_until(Duration::from_secs(30), has_tombstone)
        .unwrap_or_else(|| panic!("edge-us-2 never got the tombstone (seed {seed})"));
    let sent =
        |k: &str| sim.frame_kinds.get(k).map_or(0, |c| c.0) - before.get(k).map_or(0, |c| c.0);
    assert!(
        sent("site-digest") > 0,
        "repaired without a site digest (seed {seed})"
    );
}

#[test]
fn a_node_back_from_dead_is_dialed_by_its_site_at_once() {
    let seed = seed_from_env(11);
    let mut sim = converged(seed, 1);
    // edge-eu-2 is the higher name of the pair: on its own it would dial edge-eu-1 only after
    // its dial grace (1 s), and edge-eu-1's redial backoff grew while edge-eu-2 was down.
    sim.crash("edge-eu-2");
    sim.run_until(Duration::from_secs(30), |s| {
        s.names()
            .iter()
            .filter(|n| n.as_str() != "edge-eu-2")
            .all(|n| s.status(n, "edge-eu-2") == NodeStatus::Dead)
    })
    .unwrap_or_else(|| panic!("edge-eu-2 not dead everywhere (seed {seed})"));
    // Restarted at once: edge-eu-1 still holds its connection to the dead instance (QUIC has
    // not timed it out), which must not keep it from dialing the new one.
    let stale = clusterctl_core::name::NodeName::new("edge-eu-2").expect("a name");
    assert!(sim.engine("edge-eu-1").is_linked(&stale), "seed {seed}");
    sim.restart("edge-eu-2");
    let peer = clusterctl_core::name::NodeName::new("edge-eu-2").expect("a name");
    let took = sim
        .run_until(Duration::from_secs(30), |s| {
            s.engine("edge-eu-1").is_linked(&peer)
        })
        .unwrap_or_else(|| panic!("edge-eu-1 never linked to edge-eu-2 again (seed {seed})"));
    // Its gateway passes the new record into the site, and edge-eu-1 (the lower name) dials at
    // once: well within the 1 s the returning node would wait.
    assert!(
        took < Duration::from_millis(800),
        "edge-eu-1 linked to the returning edge-eu-2 only after {took:?} (seed {seed})"
    );
    sim.run_until(CONVERGE, Sim::converged)
        .unwrap_or_else(|| panic!("no reconvergence (seed {seed})"));
    // Once more, restarted after every connection to the dead instance has timed out: the other
    // site learns it is alive from its gateway's view, which goes out at once on a change (not
    // at the gateway's next tick): one WAN crossing, not a tick.
    sim.crash("edge-eu-2");
    sim.run_until(Duration::from_secs(60), |s| {
        !s.engine("edge-eu-1").is_linked(&peer) && !s.engine("gw-eu-1").is_linked(&peer)
    })
    .unwrap_or_else(|| panic!("connections to the dead edge-eu-2 never closed (seed {seed})"));
    sim.restart("edge-eu-2");
    let far = sim
        .run_until(Duration::from_secs(30), |s| {
            s.status("edge-us-1", "edge-eu-2") == NodeStatus::Alive
        })
        .unwrap_or_else(|| panic!("edge-us-1 never saw edge-eu-2 alive again (seed {seed})"));
    assert!(
        far < Duration::from_millis(200),
        "edge-us-1 saw the returning edge-eu-2 alive only after {far:?} (seed {seed})"
    );
    sim.run_until(CONVERGE, Sim::converged)
        .unwrap_or_else(|| panic!("no reconvergence (seed {seed})"));
}

/// Two sites of one gateway and `members` members each, converged.
fn converged_sites(seed: u64, members: usize) -> Sim {
    let site = |name: &str| SiteSpec {
        name: name.into(),
        gateways: 1,
        members,
    };
    let mut sim = Sim::new(SimConfig::new(seed), &[site("us-east"), site("eu-west")]);
    let took = sim.run_until(CONVERGE, Sim::converged);
    assert!(
        took.is_some(),
        "two sites of {} did not converge in {CONVERGE:?} (seed {seed})",
        members + 1
    );
    sim
}

/// `dead`/`suspect` events, anywhere, about nodes other than `except`, since `since_ms`.
fn suspicions_of_others(sim: &Sim, except: &[String], since_ms: u64) -> Vec<String> {
    let mut out = Vec::new();
    for n in &sim.nodes {
        for e in n.events.iter().filter(|e| e.at_ms >= since_ms) {
            if !matches!(e.kind, EventKind::NodeSuspect | EventKind::NodeDead) {
                continue;
            }
            if let Some(about) = e
                .node
                .as_ref()
                .filter(|a| !except.iter().any(|x| x == a.as_str()))
            {
                out.push(format!("{} {:?} {about}", n.ident.name, e.kind));
            }
        }
    }
    out
}

/// Events of `kind` about `about`, recorded by any node since `since_ms`.
fn events_about(sim: &Sim, kind: EventKind, about: &str, since_ms: u64) -> usize {
    sim.nodes
        .iter()
        .flat_map(|n| n.events.iter())
        .filter(|e| e.at_ms >= since_ms && e.kind == kind)
        .filter(|e| e.node.as_ref().is_some_and(|n| n.as_str() == about))
        .count()
}

#[test]
fn crash_confirmed_by_several_probers_is_dead_sooner_than_one_long_suspicion() {
    // Before dynamic suspicion, every death took the full 2.5 s suspicion plus at least the
    // probe period in which the member was found unresponsive: 3 s at the very least. Other
    // members' failed probes now confirm the suspicion and shorten it (down to 0.75 s).
    let seed = seed_from_env(29);
    let mut sim = converged_sites(seed, 7);
    let floor_before = Duration::from_millis(3000);
    let since = sim.now().as_millis() as u64;
    let victims: Vec<String> = (1..=4).map(|k| format!("edge-eu-{k}")).collect();
    let mut took = Vec::new();
    for v in &victims {
        sim.crash(v);
        let t = sim.run_until(Duration::from_secs(30), |s| {
            s.names()
                .iter()
                .filter(|o| !victims.contains(o))
                .all(|o| matches!(s.status(o, v), NodeStatus::Dead | NodeStatus::Unreachable))
        });
        let t = t.unwrap_or_else(|| panic!("{v} not seen dead everywhere in 30 s (seed {seed})"));
        took.push(t);
        sim.run_for(Duration::from_secs(3));
    }
    let mean = took.iter().sum::<Duration>() / took.len() as u32;
    println!("deaths seen everywhere after {took:?}, mean {mean:?} (seed {seed})");
    assert!(
        mean < floor_before,
        "mean death {mean:?} not below {floor_before:?}: {took:?} (seed {seed})"
    );
    let others = suspicions_of_others(&sim, &victims, since);
    assert!(
        others.is_empty(),
        "live nodes suspected: {others:?} (seed {seed})"
    );
}

#[test]
fn member_paused_for_less_than_the_shortest_suspicion_is_never_declared_dead() {
    // A member stopped for 0.7 s (the shortest suspicion is 0.75 s) is often suspected, and
    // confirmed by every prober that meets it stopped, but refutes in time: never dead.
    let seed = seed_from_env(31);
    let mut sim = converged_sites(seed, 7);
    let victim = "edge-eu-7".to_string();
    let since = sim.now().as_millis() as u64;
    let mut noticed = 0;
    let mut pauses = 0;
    while noticed < 3 && pauses < 60 {
        let before = events_about(&sim, EventKind::NodeSuspect, &victim, since);
        sim.pause(&victim, Duration::from_millis(700));
        pauses += 1;
        // 6.07 s apart, so the pauses start at every phase of the probe periods.
        sim.run_for(Duration::from_millis(6070));
        if events_about(&sim, EventKind::NodeSuspect, &victim, since) > before {
            noticed += 1;
        }
    }
    println!("{pauses} pauses of 0.7 s, {noticed} suspected (seed {seed})");
    assert!(
        noticed >= 3,
        "only {noticed} of {pauses} pauses led to a suspicion (seed {seed})"
    );
    let dead = events_about(&sim, EventKind::NodeDead, &victim, since);
    assert_eq!(dead, 0, "{victim} declared dead {dead} times (seed {seed})");
    let others = suspicions_of_others(&sim, std::slice::from_ref(&victim), since);
    assert!(
        others.is_empty(),
        "live nodes suspected: {others:?} (seed {seed})"
    );
    assert!(
        sim.names()
            .iter()
            .filter(|o| **o != victim)
            .all(|o| sim.status(o, &victim) == NodeStatus::Alive),
        "(seed {seed})"
    );
}

#[test]
fn member_paused_for_longer_than_the_longest_suspicion_is_dead_then_back() {
    let seed = seed_from_env(37);
    let mut sim = converged_sites(seed, 7);
    let victim = "edge-eu-7".to_string();
    let since = sim.now().as_millis() as u64;
    sim.pause(&victim, Duration::from_secs(5));
    let dead = sim.run_until(Duration::from_secs(5), |s| {
        s.status("edge-eu-1", &victim) == NodeStatus::Dead
    });
    assert!(
        dead.is_some(),
        "{victim} paused 5 s never seen dead (seed {seed})"
    );
    let back = sim.run_until(Duration::from_secs(30), |s| {
        s.names()
            .iter()
            .filter(|o| **o != victim)
            .all(|o| s.status(o, &victim) == NodeStatus::Alive)
    });
    assert!(
        back.is_some(),
        "{victim} not alive again everywhere (seed {seed})"
    );
    let others = suspicions_of_others(&sim, std::slice::from_ref(&victim), since);
    assert!(
        others.is_empty(),
        "live nodes suspected: {others:?} (seed {seed})"
    );
}

/// Both gateways of a site crash; one comes back once the site's ring stopped gossiping the
/// other's death. The one still down is `dead` everywhere within the detection bound, never
/// `alive` (its own last record) nor `unknown` (its twin's ring never heard of it).
#[test]
fn of_two_crashed_gateways_the_one_still_down_is_dead_everywhere() {
    let seed = seed_from_env(31);
    let mut sim = converged(seed, 2);
    sim.crash("gw-us-1");
    sim.crash("gw-us-2");
    sim.run_for(Duration::from_secs(40));
    sim.restart("gw-us-1");
    let observers: Vec<String> = sim.names().into_iter().filter(|n| n != "gw-us-2").collect();
    let took = sim.run_until(Duration::from_secs(15), |s| {
        observers
            .iter()
            .all(|o| s.status(o, "gw-us-2") == NodeStatus::Dead)
    });
    let seen: Vec<(String, NodeStatus)> = observers
        .iter()
        .map(|o| (o.clone(), sim.status(o, "gw-us-2")))
        .collect();
    assert!(took.is_some(), "{seen:?} (seed {seed})");
}

/// Right after a two-way WAN cut heals, no observer reports a link `one-way`: the evidence
/// gathered while both directions were cut says nothing about one direction.
#[test]
fn no_one_way_is_reported_after_a_two_way_cut_heals() {
    let seed = seed_from_env(41);
    let mut sim = converged(seed, 1);
    sim.cut_wan("us-east", "eu-west");
    sim.run_for(Duration::from_secs(30));
    sim.heal();
    for _ in 0..200 {
        sim.run_for(Duration::from_millis(100));
        for o in sim.names() {
            let t = sim.topology(&o);
            let one_way: Vec<_> = t
                .links
                .iter()
                .filter(|l| l.state == clusterctl_api::LinkState::OneWay)
                .collect();
            if !one_way.is_empty() {
                let e = sim.engine(&o);
                let recs: Vec<String> = ["gw-us-1", "gw-eu-1"]
                    .iter()
                    .filter_map(|n| e.table().get(n))
                    .map(|r| format!("{}: {:?}", r.name, r.links))
                    .collect();
                panic!(
                    "{o} at {:?}: {one_way:#?} {recs:#?} (seed {seed})",
                    sim.now()
                );
            }
        }
    }
}
