//! The SSH agent's own cost: p50 of a signature through the agent (an
//! OpenSSH agent client on its socket) against the keyring signature the
//! agent makes for it, side by side. Run as root: `cargo bench --bench
//! agent` (DK_AGENT_N). Goal: the agent adds at most 0.3 ms.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "measure.rs"]
mod measure;

use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Instant;

use common::KernelEnv;
use derived_keys::client::KeyRequest;
use derived_keys::request::Selector;
use measure::Row;
use ssh_agent_lib::blocking::Client;
use ssh_agent_lib::proto::{PublicCredential, SignRequest};

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("agent bench: run as root");
        std::process::exit(1);
    }
    let smoke = !std::env::args().any(|a| a == "--bench");
    let n: usize = if smoke {
        5
    } else {
        std::env::var("DK_AGENT_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200)
    };
    let env = KernelEnv::new("");
    let selectors = [
        "machine:agent-bench".to_owned(),
        "user:agent-ed,alg=ed25519".to_owned(),
    ];
    let agent = derived_keys::ssh::Agent::new(&selectors, &env.prefix).unwrap();
    let dir = common::scratch_dir();
    let sock = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let keys: Vec<_> = selectors
        .iter()
        .map(|s| derived_keys::ssh::SshKey::derive_with_prefix(s, &env.prefix).unwrap())
        .collect();
    // The agent thread blocks in accept until the process ends.
    std::thread::spawn(move || {
        let _ = derived_keys::ssh::serve(&agent, &listener);
    });
    {
        let mut rows = Vec::new();
        for (sel, key) in selectors.iter().zip(&keys) {
            let direct = KeyRequest::from_selector(&Selector::parse(sel).unwrap())
                .unwrap()
                .prefix(&env.prefix);
            let mut via_keyring = Row::new(&format!("{sel}: keyring signature (library)"));
            let mut via_agent = Row::new(&format!("{sel}: through the agent"));
            let mut client = Client::new(UnixStream::connect(&sock).unwrap());
            for i in 0..n {
                let data = format!("session data {i}").into_bytes();
                let t = Instant::now();
                let r = direct
                    .sign_message(&data)
                    .map(|_| t.elapsed())
                    .map_err(|_| -1);
                via_keyring.add(r);
                let t = Instant::now();
                let r = client
                    .sign(SignRequest {
                        credential: PublicCredential::Key(key.public.key_data().clone()),
                        data,
                        flags: 0,
                    })
                    .map(|_| t.elapsed())
                    .map_err(|_| -1);
                via_agent.add(r);
            }
            rows.push(via_keyring);
            rows.push(via_agent);
        }
        println!("\nmachine: {}", measure::machine());
        measure::print_table(&rows);
        for pair in rows.chunks(2) {
            println!(
                "agent overhead, p50: {:.2} ms (goal <= 0.3)",
                pair[1].pct(0.5) - pair[0].pct(0.5)
            );
        }
        let errors: usize = rows.iter().map(|r| r.errors).sum();
        assert_eq!(errors, 0, "signatures failed");
    }
    // Exiting skips destructors: clean up (rule, broker, swtpm) first.
    drop(env);
    drop(dir);
    std::process::exit(0);
}
