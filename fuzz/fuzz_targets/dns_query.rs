#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fastvm_fuzz::targets::dns_query(data));
