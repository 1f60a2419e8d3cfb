#![no_main]
//! Contract files: any text gives a contract or an error naming the key, never a panic.
use clusterctl_core::contract::Contract;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Contract::parse(text);
    }
});
