#![no_main]
//! Callouts and whole requests: never panic; what parses round-trips
//! through the canonical form to the same typed request; an Ed25519
//! signature's description names the SHA-256 of the message it carries.
use derived_keys::request::{Callout, Request, Want, DEFAULT_PREFIX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Callout::parse(data) {
        let again = Callout::parse(c.to_string().as_bytes()).expect("canonical form parses");
        assert_eq!(again, c);
    }
    // Split the input into type, description and callout at NUL bytes.
    let mut parts = data.splitn(3, |&b| b == 0);
    let (t, d, c) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    if let Ok(r) = Request::parse(t, d, c, DEFAULT_PREFIX) {
        let back = Request::parse(
            r.key_type.as_str().as_bytes(),
            r.description(DEFAULT_PREFIX).as_bytes(),
            r.callout().as_bytes(),
            DEFAULT_PREFIX,
        )
        .expect("canonical request parses");
        assert_eq!(back, r);
        if let Want::SignEd25519(m) = &r.want {
            let d = r.description(DEFAULT_PREFIX);
            assert!(d.contains(&format!(":sign:{}", m.digest())));
            assert!(!m.as_bytes().is_empty() && m.as_bytes().len() <= 1024);
        }
    }
});
