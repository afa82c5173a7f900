//! Fairness: other uids' request latency while one uid floods the broker
//! with `csum` requests for a 40 GB executable (hashed until each
//! request's deadline: the size limit is raised so that the flood really
//! costs). Reports p50/p99 for root (in process) and for another uid
//! (through `setpriv keyctl`, process start included), without and with
//! the flood. Run as root: `cargo bench --bench fairness` (DK_FAIR_N).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "measure.rs"]
mod measure;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::KernelEnv;
use measure::{raw_request, Row};

const FLOODER: u32 = 4350;
const OTHER: u32 = 4351;

fn other_uid_request(desc: &str) -> Result<Duration, i32> {
    let start = Instant::now();
    let ok = Command::new("setpriv")
        .args([
            &format!("--reuid={OTHER}"),
            &format!("--regid={OTHER}"),
            "--clear-groups",
            "keyctl",
            "request2",
            "user",
            desc,
            "32 user",
            "@p",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    if ok {
        Ok(start.elapsed())
    } else {
        Err(-1)
    }
}

fn measure(env: &KernelEnv, label: &str, n: usize, rows: &mut Vec<Row>) {
    let mut root = Row::new(&format!("root, user key, {label}"));
    let mut other = Row::new(&format!("uid {OTHER} via setpriv keyctl, {label}"));
    for i in 0..n {
        root.add(raw_request(
            "user",
            &env.desc(&format!("calm#r{label}{i}").replace(' ', "")),
            "32 user",
        ));
        other.add(other_uid_request(
            &env.desc(&format!("calm#o{label}{i}").replace(' ', "")),
        ));
    }
    rows.push(root);
    rows.push(other);
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("fairness bench: run as root");
        std::process::exit(1);
    }
    let smoke = !std::env::args().any(|a| a == "--bench");
    let n: usize = if smoke {
        5
    } else {
        std::env::var("DK_FAIR_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200)
    };
    let env = KernelEnv::new("[bindings]\ncsum_max_mib = 1048576\n[log]\ntarget = \"kmsg\"\n");
    let big = env.dir.path().join("huge-keyctl");
    common::copy_executable("/usr/bin/keyctl", &big, "");
    assert!(Command::new("truncate")
        .args(["-s", "40G"])
        .arg(&big)
        .status()
        .unwrap()
        .success());
    let mut rows = Vec::new();
    measure(&env, "no flood", n, &mut rows);

    let stop = env.dir.path().join("stop");
    let script = r#"while [ ! -e "$3" ]; do "$1" request2 user "$2#$$$RANDOM" "32 csum" @p >/dev/null 2>&1; done"#;
    let flooders: Vec<_> = (0..4)
        .map(|_| {
            Command::new("setpriv")
                .args([
                    &format!("--reuid={FLOODER}"),
                    &format!("--regid={FLOODER}"),
                    "--clear-groups",
                    "bash",
                    "-c",
                    script,
                    "sh",
                    big.to_str().unwrap(),
                    &env.desc("flood"),
                ])
                .arg(&stop)
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    measure(&env, "4 csum flooders", n, &mut rows);
    std::fs::write(&stop, b"").unwrap();
    for mut f in flooders {
        let _ = f.wait();
    }

    println!("\nmachine: {}", measure::machine());
    measure::print_table(&rows);
    let errors: usize = rows.iter().map(|r| r.errors).sum();
    assert_eq!(errors, 0, "other uids' requests failed during the flood");
}
