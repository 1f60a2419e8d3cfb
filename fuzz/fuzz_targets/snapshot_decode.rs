#![no_main]
//! The persisted node table, as read back from disk after any kind of corruption.
use clusterctl_core::snapshot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = snapshot::decode(data);
});
