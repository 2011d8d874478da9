#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nvidia_sidecar::fuzz_targets::token_fields(data);
});
