//! The broker's side of the handler protocol: any bytes a peer sends must
//! decode to a well-formed upcall or to None, never panic; whatever decodes
//! must re-encode to the same bytes; and the handler's /proc/keys scanner
//! must cope with any input split anywhere, counting every line with the
//! serial (a forged one included) wherever the split falls.
//!
//! Each input is also tried with its first byte made the current protocol
//! version, so that a corpus grown under an older version still reaches
//! past the version check to the fields.
#![no_main]

use derived_keys_core::proc_keys::KeysLine;
use derived_keys::wire::{
    Answer, Hello, Progress, Upcall, ANSWER_HEADER, MAX_HELLO, MAX_UPCALL, VERSION,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    messages(data);
    if let Some((_, rest)) = data.split_first() {
        let mut current = Vec::with_capacity(data.len());
        current.push(VERSION);
        current.extend_from_slice(rest);
        messages(&current);
    }
    proc_keys(data);
});

/// The upcall, hello and answer decoders.
fn messages(data: &[u8]) {
    if let Some(up) = Upcall::decode(data) {
        let mut buf = vec![0u8; MAX_UPCALL];
        let n = up.encode(&mut buf).expect("a decoded upcall re-encodes");
        assert_eq!(&buf[..n], data);
        assert_eq!(Upcall::progress(data), Progress::Complete(n));
    }
    match Upcall::progress(data) {
        Progress::Need(n) => assert!(n > data.len()),
        Progress::Complete(n) => assert!(n <= MAX_UPCALL),
        Progress::Invalid => {}
    }
    if let Some(h) = Hello::decode(data) {
        assert_eq!(Hello::len(data), Some(data.len()));
        let mut buf = [0u8; MAX_HELLO];
        let n = h.encode(&mut buf).expect("a decoded hello re-encodes");
        assert_eq!(&buf[..n], data);
    }
    if let Ok(head) = <&[u8; ANSWER_HEADER]>::try_from(data.get(..ANSWER_HEADER).unwrap_or(&[])) {
        if let Some(a) = Answer::decode(head) {
            assert_eq!(&a.encode(), head);
        }
    }
}

/// The handler's /proc/keys scanner and the broker's parser agree.
fn proc_keys(data: &[u8]) {
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let mut scan = KeysLine::new(0x1234_5678);
    let mut out = [0u8; 64];
    scan.feed(&data[..split], &mut out);
    scan.feed(&data[split..], &mut out);
    let found = scan.finish(&out);
    assert!(found.len == 0 || out[..found.len].starts_with(b"12345678 "));
    // The same count as the broker's parser, and as one unsplit feed.
    let lines = data
        .split(|&b| b == b'\n')
        .filter(|l| l.starts_with(b"12345678 "))
        .count();
    assert_eq!(found.count as usize, lines);
    let mut whole = KeysLine::new(0x1234_5678);
    let mut out2 = [0u8; 64];
    whole.feed(data, &mut out2);
    assert_eq!(whole.finish(&out2), found);
    assert_eq!(
        derived_keys::requester::count_auth_lines(data, 0x1234_5678),
        lines
    );
}
