//! Replays every input under `fuzz/regressions/TARGET/` through the decoder its fuzz target
//! exercises: inputs that once crashed (or that seed known edge cases) must decode or be
//! refused, never panic.

use clusterctl_core::contract::Contract;
use clusterctl_core::health::LocalHealth;
use clusterctl_core::name::NodeName;
use clusterctl_core::snapshot;
use clusterctl_core::swim::{RingTiming, Swim, SwimId};
use clusterctl_core::wire::{decode_swim, Frame, Handshake, Ring};
use std::path::PathBuf;
use std::time::Duration;

/// The saved inputs of fuzz target `target`. (A test of the core may read its fixtures; the core
/// itself does no IO, which crates/core/clippy.toml enforces.)
#[allow(clippy::disallowed_methods)]
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/regressions")
        .join(target);
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.expect("dir entry").path();
        if p.is_file() {
            let b = std::fs::read(&p).expect("read");
            out.push((p, b));
        }
    }
    assert!(!out.is_empty(), "no inputs in {}", dir.display());
    out
}

#[test]
fn frame_inputs() {
    for (p, b) in inputs("frame_decode") {
        if let Ok(f) = Frame::decode(&b) {
            assert_eq!(
                Frame::decode(&f.encode()).expect("re-encodes"),
                f,
                "{}",
                p.display()
            );
        }
    }
}

#[test]
fn handshake_inputs() {
    for (_, b) in inputs("handshake_decode") {
        let _ = Handshake::decode(&b);
    }
}

#[test]
fn swim_inputs() {
    for (_, b) in inputs("swim_decode") {
        if let Ok((_, packet)) = decode_swim(&b) {
            let me = SwimId {
                name: NodeName::new("fuzz").expect("valid"),
                gen: 1,
            };
            let mut ring = Swim::new(
                Ring::Site,
                me,
                &RingTiming::lan(),
                3,
                1,
                LocalHealth::new(8, Duration::from_millis(250)),
            );
            ring.handle_data(Duration::ZERO, packet);
        }
    }
}

#[test]
fn snapshot_inputs() {
    for (p, b) in inputs("snapshot_decode") {
        assert!(snapshot::decode(&b).is_err(), "{} decoded", p.display());
    }
}

#[test]
fn contract_inputs() {
    for (_, b) in inputs("contract_parse") {
        if let Ok(t) = std::str::from_utf8(&b) {
            assert!(Contract::parse(t).is_err());
        }
    }
}
