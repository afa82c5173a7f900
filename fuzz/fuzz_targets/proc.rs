#![no_main]
//! The /proc parsers (keys, syscall, status) and the keyctl describe
//! record: never panic on any bytes. (The IMA list parser is gone: `csum`
//! hashes the running file and never reads IMA's list.)
use derived_keys::keyring::KeyRecord;
use derived_keys::requester::{parse_groups, parse_proc_keys, parse_syscall};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let serial = data.first().map_or(0, |b| i32::from(*b));
    if let Some(r) = parse_proc_keys(data, serial) {
        assert!(r.tid > 0);
    }
    let _ = parse_syscall(data);
    let _ = parse_groups(data);
    let _ = KeyRecord::parse(data);
});
