#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fastvm_fuzz::targets::tar_unpack(data));
