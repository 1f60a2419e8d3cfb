#![no_main]
//! Failure-detector datagrams: the envelope, then foca's own decoder on the packet.
use clusterctl_core::health::LocalHealth;
use clusterctl_core::name::NodeName;
use clusterctl_core::swim::{RingTiming, Swim, SwimId};
use clusterctl_core::wire::{decode_swim, Ring};
use libfuzzer_sys::fuzz_target;
use std::time::Duration;

fuzz_target!(|data: &[u8]| {
    if let Ok((_, packet)) = decode_swim(data) {
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
});
