//! One uid cannot delay another: a flood of `csum` requests for a huge
//! executable by one uid leaves other uids' requests answered in their
//! usual time, and an executable over the configured size is refused at
//! once. Through the real kernel.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Got, KernelEnv};

const FLOODER: u32 = 4340;
const OTHER: u32 = 4341;

/// keyctl with 40 GB of holes after it: exec maps only its segments.
fn huge_executable(dir: &Path) -> String {
    let big = dir.join("huge-keyctl");
    common::copy_executable("/usr/bin/keyctl", &big, "");
    let st = Command::new("truncate")
        .args(["-s", "40G"])
        .arg(&big)
        .status()
        .unwrap();
    assert!(st.success());
    big.to_str().unwrap().to_owned()
}

/// `n` processes of the flooding uid, each asking for csum keys with the
/// huge executable again and again until `stop` exists; each prints how
/// long each request took and how it ended.
fn flood(env: &KernelEnv, big: &str, n: usize, stop: &Path) -> Vec<Child> {
    flood_as(env, FLOODER, big, n, stop)
}

/// [`flood`] by `uid`.
fn flood_as(env: &KernelEnv, uid: u32, big: &str, n: usize, stop: &Path) -> Vec<Child> {
    let script = r#"
        big=$1; desc=$2; stop=$3; i=0
        while [ ! -e "$stop" ] && [ $i -lt 200 ]; do
            s=$(date +%s%N)
            if "$big" request2 user "$desc#f$i$$" "32 csum" @p >/dev/null 2>/tmp/.dk-flood-$$; then r=ok
            else r=$(cat /tmp/.dk-flood-$$); fi
            e=$(date +%s%N)
            echo "$(( (e - s) / 1000000 )) $r"
            i=$((i + 1))
        done
        rm -f /tmp/.dk-flood-$$
    "#;
    (0..n)
        .map(|_| {
            Command::new("setpriv")
                .args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={uid}"),
                    "--clear-groups",
                    "bash",
                    "-c",
                    script,
                    "sh",
                    big,
                    &env.desc("flood"),
                ])
                .arg(stop)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// One request as `uid` in its own process keyring, timed.
fn timed(env: &KernelEnv, uid: u32, rest: &str, callout: &str) -> (Duration, bool) {
    let start = Instant::now();
    let st = env
        .keyctl_as(uid, rest, callout)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    (start.elapsed(), st.success())
}

#[test]
fn a_csum_flood_by_one_uid_leaves_others_answered_in_time() {
    // A limit above the file's size: the flood really hashes.
    let env = KernelEnv::new("[bindings]\ncsum_max_mib = 1048576\n");
    let big = huge_executable(env.dir.path());
    // Warm up: the broker runs, the signing table is built.
    assert!(timed(&env, 0, "warm", "32 user").1);
    let stop = env.dir.path().join("stop-flood");
    let flooders = flood(&env, &big, 4, &stop);
    std::thread::sleep(Duration::from_millis(500)); // the flood is in flight

    let mut times = Vec::new();
    for i in 0..40 {
        for (uid, binding) in [(0, "user"), (OTHER, "user")] {
            let (t, ok) = timed(
                &env,
                uid,
                &format!("calm#{uid}x{i}"),
                &format!("32 {binding}"),
            );
            assert!(ok, "uid {uid} request {i} failed during the flood");
            times.push(t);
        }
    }
    std::fs::write(&stop, b"").unwrap();
    let mut flood_lines = Vec::new();
    for f in flooders {
        let out = f.wait_with_output().unwrap();
        flood_lines.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>(),
        );
    }
    times.sort();
    let worst = *times.last().unwrap();
    eprintln!(
        "others during the flood: p50 {:?}, max {:?}; {} flood requests",
        times[times.len() / 2],
        worst,
        flood_lines.len()
    );
    // Starvation is what this looks for: with one shared queue, other
    // uids waited ~3 s behind the flood. The bounds leave room for a busy
    // 2-core machine's scheduling (a 72 ms outlier at the end of one CI
    // run), not for queueing behind another uid's work.
    let p50 = times[times.len() / 2];
    assert!(
        p50 <= Duration::from_millis(20),
        "other uids' p50 was {p50:?} during the flood"
    );
    assert!(
        worst <= Duration::from_millis(250),
        "another uid waited {worst:?} during the flood"
    );
    // The flood itself: every request ended with a contract errno (its
    // executable cannot be hashed within the bound), none after the bound.
    assert!(!flood_lines.is_empty());
    for l in &flood_lines {
        let (ms, result) = l.split_once(' ').unwrap();
        let ms: u64 = ms.parse().unwrap();
        assert!(ms <= 3000 + 1000, "a flood request took {ms} ms: {l}");
        assert!(
            result.contains("Connection timed out") || result.contains("Permission denied"),
            "{l}"
        );
    }
}

/// Every worker busy for longer than the handler's own default bound
/// (5 s), by four uids hashing a huge executable twice each: a request
/// that arrives meanwhile is greeted at once (the hello carries the
/// configured bound, here 8 s), waits for a worker and is answered.
/// Without the greeter its handler gave up at its default 5 s.
#[test]
fn with_every_worker_busy_a_new_request_keeps_the_configured_bound() {
    let env = KernelEnv::new("[bindings]\ncsum_max_mib = 1048576\n");
    let text = std::fs::read_to_string(&env.conf).unwrap();
    env.write_conf(&text.replace("timeout_ms = 3000", "timeout_ms = 8000"));
    let big = huge_executable(env.dir.path());
    assert!(timed(&env, 0, "warm", "32 user").1);
    let stop = env.dir.path().join("stop-flood");
    let flooders: Vec<Child> = (4350..4354)
        .flat_map(|uid| flood_as(&env, uid, &big, 2, &stop))
        .collect();
    std::thread::sleep(Duration::from_millis(500)); // all eight in flight
    let (took, ok) = timed(&env, 0, "busy", "32 user");
    std::fs::write(&stop, b"").unwrap();
    for mut f in flooders {
        let _ = f.kill();
        let _ = f.wait();
    }
    assert!(ok, "the request failed after {took:?}");
    // It did wait for a worker: the test saw every worker busy.
    assert!(
        took > Duration::from_secs(5),
        "answered after {took:?}: not every worker was busy"
    );
}

#[test]
fn an_executable_over_the_limit_is_refused_at_once_and_said_why() {
    let env = KernelEnv::new("");
    let sock = env.dir.path().join("log.sock");
    let rx = UnixDatagram::bind(&sock).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let text = std::fs::read_to_string(&env.conf).unwrap();
    env.write_conf(&format!(
        "{text}[log]\ntarget = \"syslog\"\nsocket = \"{}\"\n",
        sock.display()
    ));
    let big = huge_executable(env.dir.path());
    let got = env.request_with(&[], &big, "user", "big", "32 csum");
    assert_eq!(got, Got::Err(libc::EACCES));
    let mut buf = [0u8; 4096];
    let line = loop {
        let n = rx.recv(&mut buf).unwrap();
        let line = String::from_utf8_lossy(&buf[..n]).into_owned();
        if line.contains("big") {
            break line;
        }
    };
    assert!(line.contains(r"over\x20the\x20csum\x20limit"), "{line}");
}
