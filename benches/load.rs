//! Load: 16 parallel clients, 10,000 mixed requests through the real
//! kernel on a private swtpm. Reports a latency table per kind; checks
//! zero errors and zero TPM objects left once the broker has exited.
//! Run as root: `cargo bench --bench load` (DK_LOAD_N, DK_LOAD_CLIENTS).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "measure.rs"]
mod measure;

use std::time::{Duration, Instant};

use common::KernelEnv;
use measure::{raw_request, Row};

/// The mix: (label, key type, description suffix, callout).
const MIX: [(&str, &str, &str, &str); 8] = [
    ("symmetric path", "user", "db", "32 path"),
    ("symmetric csum", "user", "db", "32 csum"),
    ("symmetric user", "user", "db", "64 user account=a"),
    ("symmetric machine", "user", "disk", "64 machine epoch=2"),
    ("logon machine", "logon", "disk", "64 machine"),
    (":pub", "user", "host:pub", "p256 machine"),
    (
        ":sign:",
        "user",
        "host:sign:abababababababababababababababababababababababababababababababab",
        "p256 machine",
    ),
    ("1024 bytes", "user", "big", "1024 user"),
];

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("load bench: run as root");
        std::process::exit(1);
    }
    let smoke = !std::env::args().any(|a| a == "--bench");
    let total: usize = if smoke {
        64
    } else {
        std::env::var("DK_LOAD_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000)
    };
    let clients: usize = std::env::var("DK_LOAD_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let env = KernelEnv::new("[log]\ntarget = \"kmsg\"\n");
    let prefix = env.prefix.clone();
    let start = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let prefix = prefix.clone();
            std::thread::spawn(move || {
                let mut out: Vec<(usize, Result<Duration, i32>)> = Vec::new();
                let mut i = c;
                while i < total {
                    let (_, ty, rest, callout) = MIX[i % MIX.len()];
                    out.push((
                        i % MIX.len(),
                        raw_request(ty, &format!("{prefix}:{rest}#r{i}"), callout),
                    ));
                    i += clients;
                }
                out
            })
        })
        .collect();
    let mut rows: Vec<Row> = MIX.iter().map(|m| Row::new(m.0)).collect();
    let mut all = Row::new("all");
    let mut errnos = std::collections::BTreeMap::new();
    for h in handles {
        for (k, r) in h.join().unwrap() {
            if let Err(e) = r {
                *errnos.entry(e).or_insert(0) += 1;
            }
            rows[k].add(r);
            all.add(r);
        }
    }
    let wall = start.elapsed();
    rows.push(all);
    let tcti = derived_keys::tpm::Tcti::parse(&env.swtpm.tcti()).unwrap();
    env.stop_broker();
    let leftover = derived_keys::tpm::Tpm::open(&tcti)
        .unwrap()
        .transient_count()
        .unwrap();

    println!("\nmachine: {}", measure::machine());
    println!(
        "{total} requests, {clients} clients, {:.1} s, {:.0} requests/s",
        wall.as_secs_f64(),
        total as f64 / wall.as_secs_f64()
    );
    measure::print_table(&rows);
    println!("\nerrors by errno: {errnos:?}");
    println!("TPM transient objects left after the broker exited: {leftover}");
    let errors: usize = rows.last().map_or(0, |r| r.errors);
    assert_eq!(errors, 0, "load produced errors");
    assert_eq!(leftover, 0, "TPM objects leaked");
}
