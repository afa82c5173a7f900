//! Through the real kernel: every request is accounted for in the audit
//! trail even when no syslog socket exists and the kernel log rate-limits,
//! and the broker (started by some request's handler) keeps none of that
//! requester's keys alive.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;

use std::process::Command;
use std::time::{Duration, Instant};

use common::KernelEnv;

/// The uid's key count (`nkeys` of /proc/key-users), 0 if it has none.
fn key_count(uid: u32) -> u32 {
    let text = std::fs::read_to_string("/proc/key-users").unwrap();
    text.lines()
        .find_map(|l| {
            let (u, rest) = l.trim_start().split_once(':')?;
            (u.parse::<u32>().ok()? == uid).then(|| {
                // `usage nkeys/nikeys qnkeys/maxkeys qnbytes/maxbytes`
                let nkeys = rest.split_whitespace().nth(1)?.split('/').next()?;
                nkeys.parse().ok()
            })?
        })
        .unwrap_or(0)
}

/// The broker serving `env`'s configuration, if it runs.
fn broker_pid(env: &KernelEnv) -> Option<u32> {
    let config = derived_keys::config::Config::load(&env.conf).ok()?;
    let pid: u32 = std::fs::read_to_string(derived_keys::broker::paths(&config).pid)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    std::path::Path::new(&format!("/proc/{pid}"))
        .exists()
        .then_some(pid)
}

/// /dev/kmsg opened at its current end: what is logged from now on.
fn kmsg_from_now() -> std::fs::File {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .unwrap();
    f.seek(SeekFrom::End(0)).unwrap();
    f
}

/// The messages logged since, without waiting for more.
fn kmsg_messages(f: &mut std::fs::File) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16384];
    loop {
        match f.read(&mut buf) {
            // `pri,seq,usec,flags;message`, then continuation lines.
            Ok(n) if n > 0 => {
                let rec = String::from_utf8_lossy(&buf[..n]);
                let first = rec.lines().next().unwrap_or_default();
                out.push(first.split_once(';').map_or("", |(_, m)| m).to_owned());
            }
            // Records overwritten before we read them: go on from the oldest.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            _ => return out,
        }
    }
}

/// `dkey status --json` for `env`'s configuration: its `audit` object.
fn audit_status(env: &KernelEnv) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_dkey"))
        .args(["status", "--json", "--config"])
        .arg(&env.conf)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    v["audit"].clone()
}

/// Kernel log lines of one test: its audit lines, and the drops its
/// broker reported.
#[derive(Debug, Default)]
struct Seen {
    written: u64,
    reported: u64,
    reports: u64,
}

impl Seen {
    fn read(&mut self, kmsg: &mut std::fs::File, env: &KernelEnv) {
        let ours = format!(" name={}-", env.prefix);
        let conf = format!(" config={}", env.conf.display());
        for m in kmsg_messages(kmsg) {
            if m.starts_with("derived-keys: granted ") && m.contains(&ours) {
                self.written += 1;
            } else if let Some((n, _)) = m
                .strip_prefix("derived-keys: ")
                .and_then(|r| r.split_once(" audit lines were dropped ("))
                .filter(|_| m.ends_with(&conf))
            {
                self.reported += n.parse::<u64>().unwrap();
                self.reports += 1;
            }
        }
    }
}

/// With no journal and no syslog socket, a burst of 100 requests: the
/// kernel log takes 10 lines per 5 s from the broker, and every other
/// line is counted. Lines in the kernel log, plus the drops counted (in
/// the report lines, and not yet reported in `dkey status`), are exactly
/// the requests made: none is lost unnoticed. Then, once the kernel takes
/// lines again, the next line is preceded by the report of the drops.
#[test]
fn every_request_is_accounted_for_without_syslog() {
    const BURST: u64 = 100;
    let journal = std::path::Path::new(derived_keys_core::audit_line::JOURNAL_SOCKET);
    if journal.exists() {
        eprintln!("skipped: journald runs here, and takes every line");
        return;
    }
    let env = KernelEnv::new(
        "[log]\ntarget = \"syslog\"\nsocket = \"/nonexistent/derived-keys-test/log\"\n",
    );
    let status = audit_status(&env);
    assert_eq!(status["sink"], "kmsg", "{status}");
    let mut kmsg = kmsg_from_now();
    let start = Instant::now();
    let mut requests = 0u64;
    let mut request = |env: &KernelEnv| {
        let name = format!("{}-{requests}", env.prefix);
        assert_eq!(env.request("user", &name, "32 user").payload().len(), 32);
        requests += 1;
    };
    for _ in 0..BURST {
        request(&env);
    }
    let burst_time = start.elapsed();
    let mut seen = Seen::default();
    // Lines in the log plus drops counted, once the broker is done (it
    // logs after it answers: its last lines may still be on their way).
    let account = |seen: &mut Seen, kmsg: &mut std::fs::File, want: u64| {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            seen.read(kmsg, &env);
            let status = audit_status(&env);
            let total = status["dropped_total"].as_u64().unwrap();
            if seen.written + total >= want || Instant::now() > end {
                assert_eq!(
                    status["dropped_since_broker_start"].as_u64(),
                    Some(total),
                    "one broker served every request, and counted every drop: {status}"
                );
                return (total, status["unreported"].as_u64().unwrap());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let (total, unreported) = account(&mut seen, &mut kmsg, BURST);
    eprintln!(
        "{BURST} requests in {burst_time:?}: {} lines in the kernel log, {total} dropped \
         ({} reported in later lines, {unreported} only in dkey status)",
        seen.written, seen.reported
    );
    assert_eq!(
        seen.written + total,
        BURST,
        "lines written plus lines counted"
    );
    assert_eq!(
        seen.reported + unreported,
        total,
        "every drop reported once"
    );
    if total == 0 {
        return; // printk_devkmsg=on: the kernel log took every line
    }

    // The kernel's window ends 5 s after the broker's first line: from
    // then on, the next line is preceded by the report of what was lost.
    let end = Instant::now() + Duration::from_secs(12);
    while seen.reports == 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(500));
        request(&env);
        seen.read(&mut kmsg, &env);
    }
    let (total, unreported) = account(&mut seen, &mut kmsg, requests);
    eprintln!(
        "after {requests} requests: {} lines in the kernel log, {total} dropped, {} of them \
         reported in {} later lines, {unreported} only in dkey status",
        seen.written, seen.reported, seen.reports
    );
    assert!(seen.reports > 0, "no report of the drops in the kernel log");
    assert_eq!(seen.written + total, requests);
    assert_eq!(seen.reported + unreported, total);
    assert_eq!(unreported, 0, "the report covered every drop");
    // The counter outlives brokers (by design); this configuration's goes.
    env.stop_broker();
    let paths =
        derived_keys::broker::paths(&derived_keys::config::Config::load(&env.conf).unwrap());
    let _ = std::fs::remove_file(paths.dropped);
    let _ = std::fs::remove_file(paths.audit);
}

/// A request by a plain user starts the broker; once that request is
/// over, the user's key count is back where it was, though the broker
/// (its handler's child) still runs: it holds neither the request's
/// session keyring (`_req.<serial>`) nor its authorization key.
#[test]
fn broker_keeps_no_key_of_the_requester_that_started_it() {
    const UID: u32 = 4360;
    let env = KernelEnv::new("");
    assert_eq!(broker_pid(&env), None);
    // The user's own keyrings (@u, @us) exist from here on, whatever
    // happens later: create them first, so they count in the baseline.
    let st = Command::new("setpriv")
        .args([
            &format!("--reuid={UID}"),
            &format!("--regid={UID}"),
            "--clear-groups",
            "keyctl",
            "describe",
            "@u",
        ])
        .output()
        .unwrap();
    assert!(st.status.success(), "{st:?}");
    let before = key_count(UID);

    let key = env.request_as(UID, "user", "db", "32 user").payload();
    assert_eq!(key.len(), 32);
    let pid = broker_pid(&env).expect("the request started a broker");

    // Keys the kernel no longer references go at its next garbage
    // collection, which it schedules at once: give it a moment.
    let end = Instant::now() + Duration::from_secs(10);
    let mut now = key_count(UID);
    while now != before && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
        now = key_count(UID);
    }
    let keys = common::proc_keys();
    let held: Vec<&str> = keys
        .lines()
        .filter(|l| l.split_whitespace().nth(5) == Some(&UID.to_string()))
        .collect();
    assert_eq!(broker_pid(&env), Some(pid), "the broker must still run");
    assert_eq!(
        now,
        before,
        "uid {UID} holds {now} keys after its request, {before} before; \
         broker {pid} session: {}; its keys:\n{}",
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("NSsid") || l.starts_with("Uid"))
            .collect::<Vec<_>>()
            .join(" "),
        held.join("\n")
    );
}

/// A log socket that stops taking lines (a syslog daemon that is stuck, or
/// the journal's socket, which takes anyone's datagrams, flooded by a
/// local user) holds up only the audit trail, never the requests: a burst
/// of 32 requests at once, with the configured syslog socket full and
/// nobody reading it, is answered within the 3 s bound. (Before, each line
/// waited out its send's 250 ms in turn, under the audit lock, in a
/// worker: 19 of the 32 timed out.) Once the socket is read again, every
/// line of the burst is accounted for: on the socket, in the kernel log
/// (where a line goes whose send gave up), or counted as dropped.
#[test]
fn a_stalled_log_socket_holds_up_no_request() {
    const BURST: usize = 32;
    let dir = common::scratch_dir();
    let path = dir.path().join("log");
    let stalled = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    let env = KernelEnv::new(&format!(
        "[log]\ntarget = \"syslog\"\nsocket = \"{}\"\n",
        path.display()
    ));
    if std::path::Path::new(derived_keys_core::audit_line::JOURNAL_SOCKET).exists() {
        eprintln!("skipped: journald runs here, and takes the lines first");
        return;
    }
    assert_eq!(env.request("user", "warm", "32 user").payload().len(), 32);
    let mut kmsg = kmsg_from_now();
    // Full: its queue holds net.unix.max_dgram_qlen datagrams (10 by
    // default), and nobody reads them.
    // (From new sockets until a fresh one has no room either: one
    // sender's own buffer may fill first, where that sysctl is large.)
    let mut fillers = Vec::new();
    loop {
        let filler = std::os::unix::net::UnixDatagram::unbound().unwrap();
        filler.set_nonblocking(true).unwrap();
        if filler.send_to(b"<13>filler", &path).is_err() {
            break;
        }
        while filler.send_to(b"<13>filler", &path).is_ok() {}
        fillers.push(filler);
    }
    let got: Vec<common::Got> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..BURST)
            .map(|i| {
                let env = &env;
                s.spawn(move || env.request("user", &format!("burst{i}"), "32 user"))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let failed: Vec<_> = got
        .iter()
        .enumerate()
        .filter(|(_, g)| !matches!(g, common::Got::Key { .. }))
        .collect();
    assert!(failed.is_empty(), "{} of {BURST}: {failed:?}", failed.len());

    // Read again, until the broker has nothing more to say.
    let burst_line = |l: &str| {
        l.contains("derived-keys: granted ")
            && l.split_whitespace().any(|f| {
                f.strip_prefix("name=")
                    .is_some_and(|n| n.starts_with("burst"))
            })
    };
    let mut buf = [0u8; 4096];
    stalled
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut on_socket = 0;
    while let Ok(n) = stalled.recv(&mut buf) {
        on_socket += usize::from(burst_line(&String::from_utf8_lossy(&buf[..n])));
    }
    let in_kernel_log = kmsg_messages(&mut kmsg)
        .iter()
        .filter(|m| burst_line(m))
        .count();
    let dropped = audit_status(&env)["dropped_total"].as_u64().unwrap();
    assert_eq!(
        on_socket + in_kernel_log + usize::try_from(dropped).unwrap(),
        BURST,
        "{on_socket} on the socket, {in_kernel_log} in the kernel log, {dropped} dropped"
    );
    env.stop_broker();
    let paths =
        derived_keys::broker::paths(&derived_keys::config::Config::load(&env.conf).unwrap());
    let _ = std::fs::remove_file(paths.dropped);
    let _ = std::fs::remove_file(paths.audit);
}
