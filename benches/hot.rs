//! Hot keys on a slow TPM: a proxy holds every TPM answer back 5 ms (a
//! discrete TPM's HMAC takes 1 to 5 ms). Reports the p50 of 200 signatures
//! by one key (fresh digests) with hot keys on and off, against the same on
//! swtpm without the delay, and what the first request after the broker
//! starts costs there. Run as root: `cargo bench --bench hot` (DK_HOT_N).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "measure.rs"]
mod measure;

use std::time::{Duration, Instant};

use common::{KernelEnv, Swtpm};
use measure::{raw_request, Row};

fn run(label: &str, delay: Duration, hot_s: u32, n: usize, rows: &mut Vec<Row>) {
    let swtpm = Swtpm::start();
    let (tcti, _log) = common::proxy(&swtpm, delay);
    let env = KernelEnv::with_tcti(swtpm, &tcti, &format!("hot_key_s = {hot_s}\n"));
    let sign = |i: usize| {
        let digest = format!("{:064x}", i + 1);
        raw_request(
            "user",
            &env.desc(&format!("hot:sign:{digest}")),
            "p256 machine",
        )
    };
    let mut first = Row::new(&format!("{label}: first request (broker start)"));
    first.add(sign(0));
    let mut rest = Row::new(&format!("{label}: signatures by one key"));
    for i in 1..=n {
        rest.add(sign(i));
    }
    rows.push(first);
    rows.push(rest);
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("hot bench: run as root");
        std::process::exit(1);
    }
    let smoke = !std::env::args().any(|a| a == "--bench");
    let n: usize = if smoke {
        5
    } else {
        std::env::var("DK_HOT_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200)
    };
    let slow = Duration::from_millis(5);
    let mut rows = Vec::new();
    let start = Instant::now();
    run("swtpm, hot keys on", Duration::ZERO, 60, n, &mut rows);
    run("swtpm, hot keys off", Duration::ZERO, 0, n, &mut rows);
    run("swtpm +5 ms, hot keys on", slow, 60, n, &mut rows);
    run("swtpm +5 ms, hot keys off", slow, 0, n, &mut rows);
    println!("\nmachine: {}", measure::machine());
    measure::print_table(&rows);
    let ratio = rows[5].pct(0.5) / rows[1].pct(0.5);
    println!(
        "\nslow TPM with hot keys / fast TPM: p50 ratio {ratio:.2} (goal <= 1.5); {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let errors: usize = rows.iter().map(|r| r.errors).sum();
    assert_eq!(errors, 0, "requests failed");
}
