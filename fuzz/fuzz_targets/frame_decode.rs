#![no_main]
//! Frames as they arrive on a stream from a linked peer: must never panic; a decoded frame
//! must re-encode to bytes that decode and re-encode to the same bytes.
use clusterctl_core::wire::Frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = Frame::decode(data) {
        let bytes = f.encode();
        let again = Frame::decode(&bytes).expect("a decoded frame re-encodes");
        assert_eq!(again.encode(), bytes);
    }
});
