//! The scale measurement at a small size: it runs, it is deterministic, links per node stay
//! bounded by the site and the gateways (never the full mesh), and frames handed over in memory
//! (as large runs do) behave and count exactly as encoded ones.

use clusterctl_sim::scale::{run, ScaleSpec};
use clusterctl_sim::{seed_from_env, Sim, SimConfig, SiteSpec};
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

/// Everything a run leaves that frames could change: per-node frames and bytes, bytes by kind,
/// steps, and each node's table summary.
fn trace(share_frames: bool, seed: u64) -> String {
    let mut cfg = SimConfig::new(seed);
    cfg.share_frames = share_frames;
    let sites: Vec<SiteSpec> = (0..3)
        .map(|k| SiteSpec {
            name: format!("s{k}-dc"),
            gateways: 2,
            members: 5,
        })
        .collect();
    let mut sim = Sim::new(cfg, &sites);
    sim.run_for(Duration::from_secs(8));
    let victim = sim.names()[3].clone();
    sim.crash(&victim);
    sim.run_for(Duration::from_secs(8));
    let mut out = format!("steps {}\nkinds {:?}\n", sim.steps, sim.frame_kinds);
    for n in &sim.nodes {
        out.push_str(&format!(
            "{} {} {} {} {:?}\n",
            n.ident.name,
            n.frames_sent,
            n.frame_bytes_sent,
            n.datagram_bytes_sent,
            n.engine().map(|e| e.table().summary())
        ));
    }
    out
}

#[test]
fn shared_frames_run_exactly_as_encoded_frames() {
    let seed = seed_from_env(3);
    let encoded = trace(false, seed);
    let shared = trace(true, seed);
    assert!(encoded.contains("records"), "no records sent (seed {seed})");
    assert_eq!(encoded, shared, "seed {seed}");
}
