#![no_main]
//! Key selectors: never panic; what parses round-trips through its
//! canonical form to the same selector.
use derived_keys::request::Selector;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(sel) = Selector::parse(s) {
        let again = Selector::parse(&sel.to_string()).expect("canonical form parses");
        assert_eq!(again, sel);
    }
});
