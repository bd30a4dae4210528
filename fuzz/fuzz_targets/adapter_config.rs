#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lorakit::fuzzing::adapter_config(data));
