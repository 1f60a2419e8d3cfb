#![no_main]
//! The first message on a new connection (hello / ack / refuse), before any check has run.
use clusterctl_core::wire::Handshake;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Handshake::decode(data);
});
