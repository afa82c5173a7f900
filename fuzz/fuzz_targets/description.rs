#![no_main]
//! Descriptions: never panic; whatever parses prints back to the same bytes.
use derived_keys::request::{Description, DEFAULT_PREFIX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = Description::parse(data, DEFAULT_PREFIX) {
        assert_eq!(d.to_string().as_bytes(), data);
    }
});
