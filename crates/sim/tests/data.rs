//! Data messages over the real protocol core: routed across sites, counted by the target's
//! `sink`, bounced when no process of that name runs. Replay a failure with
//! `CLUSTERCTL_SIM_SEED=N cargo test -p clusterctl-sim --test data NAME -- --nocapture`.

use clusterctl_api::Role;
use clusterctl_core::name::NodeName;
use clusterctl_sim::{seed_from_env, Sim};
use std::time::Duration;

const CONVERGE: Duration = Duration::from_secs(60);

fn converged(seed: u64) -> Sim {
    let mut sim = Sim::two_sites(seed, 1);
    assert!(
        sim.run_until(CONVERGE, Sim::converged).is_some(),
        "two sites did not converge in {CONVERGE:?} (seed {seed})"
    );
    sim
}

fn send(sim: &mut Sim, from: &str, to: &str, process: &str, count: usize, size: usize) {
    let dst = NodeName::new(to).expect("name");
    sim.with_engine(from, |e, now| {
        for _ in 0..count {
            e.send_message(now, dst.clone(), process.into(), vec![1; size]);
        }
    });
}

#[test]
fn messages_across_sites_are_counted_per_sender_by_the_sink() {
    let seed = seed_from_env(11);
    let mut sim = converged(seed);
    let members: Vec<(String, String)> = sim
        .names()
        .into_iter()
        .filter(|n| sim.engine(n).me().role == Role::Member)
        .map(|n| (sim.engine(&n).me().site.to_string(), n))
        .collect();
    let (site, a) = members[0].clone();
    let far = members
        .iter()
        .find(|(s, _)| *s != site)
        .map(|(_, n)| n.clone())
        .expect("a member of the other site");
    send(&mut sim, &a, &far, "sink", 500, 100);
    send(&mut sim, &a, &far, "sink", 3, 64 * 1024);
    sim.run_for(Duration::from_secs(1));
    let r = sim
        .sink_read(&a, &far, Duration::from_secs(5))
        .expect("the sink answered")
        .unwrap_or_else(|e| panic!("sink read failed: {e} (seed {seed})"));
    assert_eq!(r.node, far);
    assert_eq!(r.senders.len(), 1, "{r:?} (seed {seed})");
    assert_eq!(r.senders[0].from, a);
    assert_eq!(r.senders[0].messages, 503, "seed {seed}");
    assert_eq!(r.senders[0].bytes, 500 * 100 + 3 * 64 * 1024, "seed {seed}");
    assert_eq!(sim.engine(&far).counters.sink_messages, 503);
}

#[test]
fn a_message_to_a_process_that_does_not_run_is_refused_not_counted() {
    let seed = seed_from_env(12);
    let mut sim = converged(seed);
    let names = sim.names();
    let (a, b) = (names[0].clone(), names[names.len() - 1].clone());
    send(&mut sim, &a, &b, "nobody", 4, 10);
    sim.run_for(Duration::from_secs(1));
    assert_eq!(sim.engine(&b).counters.messages_refused, 4, "seed {seed}");
    assert_eq!(sim.engine(&b).counters.sink_messages, 0, "seed {seed}");
}
