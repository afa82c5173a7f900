#![no_main]
//! The /proc parsers (keys, syscall, status) and the keyctl describe
//! record: never panic on any bytes. The reader of a view's first record
//! never asks for nothing, nor for more than a line holds, and what it
//! takes is in the bytes read. (The IMA list parser is gone: `csum`
//! hashes the running file and never reads IMA's list.)
use derived_keys::keyring::KeyRecord;
use derived_keys::requester::{parse_groups, parse_proc_keys, parse_syscall};
use derived_keys_core::proc_keys::{AuthKey, FirstRecord, Step, MAX_LINE};
use libfuzzer_sys::fuzz_target;

/// Follows the first-record reader over `data` as over the file, and
/// checks what it takes: a record that starts at 0 or right after one
/// whole record of the ring, of which no newline was read, and which
/// parses as the authorization key of the target asked for.
fn first_record(data: &[u8], serial: i32) {
    let key = AuthKey {
        serial,
        target: i32::from(data.get(1).copied().unwrap_or(0xb)),
        callout_len: usize::from(data.get(2).copied().unwrap_or(7)),
    };
    let ring = data.get(3).map(|&b| i32::from(b) << 8);
    let reader = FirstRecord::new(&key, ring);
    let mut seen = 0;
    loop {
        match reader.step(&data[..seen]) {
            Step::Read(n) => {
                assert!(n > 0 && n <= MAX_LINE);
                if seen + n > data.len() {
                    return;
                }
                seen += n;
            }
            Step::Done { at, len } => {
                assert!(at + len <= seen);
                let newline = |from: usize| data[from..].iter().position(|&b| b == b'\n');
                if at > 0 {
                    let ring = format!("{:08x} ", ring.unwrap() as u32);
                    assert!(data.starts_with(ring.as_bytes()));
                    assert_eq!(newline(0), Some(at - 1));
                }
                // Its newline not read (nor any other).
                assert!(!data[at..seen].contains(&b'\n'));
                let mut line = data[at..at + len].to_vec();
                line.extend_from_slice(reader.unread());
                let rec = parse_proc_keys(&line, serial).expect("parses");
                assert_eq!(rec.target, key.target);
                return;
            }
            Step::NotFirst => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let serial = data.first().map_or(0, |b| i32::from(*b));
    if let Some(r) = parse_proc_keys(data, serial) {
        assert!(r.tid > 0);
    }
    first_record(data, serial);
    let _ = parse_syscall(data);
    let _ = parse_groups(data);
    let _ = KeyRecord::parse(data);
});
