#![no_main]
//! Frames as they arrive on a stream from a linked peer: must never panic; a decoded frame
//! must re-encode to something that decodes to the same frame.
use clusterctl_core::wire::Frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = Frame::decode(data) {
        let again = Frame::decode(&f.encode()).expect("a decoded frame re-encodes");
        assert_eq!(again, f);
    }
});
