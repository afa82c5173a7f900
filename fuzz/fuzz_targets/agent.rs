#![no_main]
//! SSH agent messages from a peer: decoding any bytes never panics, and a
//! keyless agent answers whatever decodes (with failure for anything it
//! does not do) without asking the kernel.
use derived_keys::ssh::Agent;
use libfuzzer_sys::fuzz_target;
use ssh_agent_lib::proto::{Request, Response};
use ssh_encoding::{Decode, Encode};

fuzz_target!(|data: &[u8]| {
    let agent = Agent::new(&[], "derived").expect("no selectors, no requests");
    if let Ok(req) = Request::decode(&mut &data[..]) {
        let answer = agent.handle(req);
        let mut out = Vec::new();
        answer.encode(&mut out).expect("every answer encodes");
        assert!(matches!(
            answer,
            Response::Failure | Response::IdentitiesAnswer(_)
        ));
    }
});
