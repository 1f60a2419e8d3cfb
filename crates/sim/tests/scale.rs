//! The scale measurement at a small size: it runs, it is deterministic, and links per node stay
//! bounded by the site and the gateways (never the full mesh).

use clusterctl_sim::scale::{run, ScaleSpec};
use clusterctl_sim::seed_from_env;
use std::time::Duration;

fn small(seed: u64) -> ScaleSpec {
    let mut spec = ScaleSpec::new(3, 10, 2, seed);
    spec.window = Duration::from_secs(4);
    spec.phase_limit = Duration::from_secs(60);
    spec
}

#[test]
fn same_seed_gives_the_same_scale_figures() {
    let seed = seed_from_env(5);
    let a = run(&small(seed));
    let b = run(&small(seed));
    assert_eq!(a.figures, b.figures, "seed {seed}");
    println!("{}", a.markdown());
}

#[test]
fn scale_run_converges_and_links_grow_with_the_site_not_the_cluster() {
    let seed = seed_from_env(9);
    let spec = small(seed);
    let r = run(&spec);
    let f = &r.figures;
    assert!(f.converge.is_some(), "no convergence (seed {seed})");
    assert!(f.join.is_some(), "join not seen everywhere (seed {seed})");
    assert!(
        f.death_site.is_some() && f.death_all.is_some(),
        "death not seen (seed {seed})"
    );
    assert!(f.death_site <= f.death_all, "seed {seed}");
    // A member links to its site; a gateway also to every other site's gateways.
    let bound = (spec.per_site - 1) + (spec.sites - 1) * spec.gateways;
    assert!(
        f.links_max <= bound,
        "{} > {bound} (seed {seed})",
        f.links_max
    );
    assert!(f.links_max < f.nodes - 1, "seed {seed}");
    assert!(
        f.window_frame_bytes + f.window_datagram_bytes > 0,
        "seed {seed}"
    );
}
