//! The broker's queues when every place is taken, through the real
//! kernel: a test of its own, since it holds about 1,500 processes for a
//! few seconds (a requester, request-key and a handler per request).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::KernelEnv;

/// Four uids with two requests each: every worker holds one of them,
/// waiting for the TPM (stopped; two running at once is a uid's most).
const BLOCKERS: std::ops::Range<u32> = 4390..4394;
/// Sixteen uids with 32 requests waiting each: 512, every place. (Not
/// four with 128 each, the most one share may have waiting: the kernel's
/// key quota, 200 keys a uid by default, holds a uid to 99 requests under
/// way, each a key and a session keyring, and to 66 here, where each has a
/// process keyring too.)
const FILLERS: std::ops::Range<u32> = 4370..4386;
const PER_FILLER: usize = 32;
const NEWCOMER: u32 = 4386;

/// One request as `uid`, in a process of its own whose keyring takes the
/// key (gone with the process: no run leaves keys in a uid's quota).
fn ask(env: &KernelEnv, uid: u32, rest: &str) -> Child {
    env.keyctl_as(uid, rest, "32 user")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// How many handlers are running (each waits for its broker's answer).
fn handlers() -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.trim_end() == "derived-key-hel")
        })
        .count()
}

/// Waits until at least `n` handlers run (or 20 s have passed), then a
/// moment more, for the broker to take their upcalls into its queues.
fn until_handlers(n: usize) {
    let end = Instant::now() + Duration::from_secs(20);
    while handlers() < n && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
}

/// Every queue place taken, behind workers that all wait for a stopped
/// TPM: a uid with nothing waiting still gets a place. Its request
/// displaces the newest request of a uid with the most waiting (among
/// equals, the highest uid), which is refused at once with ETIMEDOUT and
/// an audit line naming the uid it made room for. Once the TPM is back,
/// every other request is answered, the newcomer's too.
#[test]
fn with_every_place_taken_a_new_uid_displaces_the_newest_of_the_longest_queue() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let env = KernelEnv::new("");
    let sock = env.dir.path().join("log.sock");
    let rx = UnixDatagram::bind(&sock).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // The audit lines, read as they come (a socket left unread would fill,
    // and delay them past the test's end).
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let log = std::thread::spawn({
        let done = done.clone();
        move || {
            let mut lines = Vec::new();
            let mut buf = [0u8; 4096];
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(n) = rx.recv(&mut buf) {
                    lines.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
            lines
        }
    });
    let text = std::fs::read_to_string(&env.conf).unwrap();
    env.write_conf(&format!(
        "{}[log]\ntarget = \"syslog\"\nsocket = \"{}\"\n",
        text.replace("timeout_ms = 3000", "timeout_ms = 120000"),
        sock.display()
    ));
    // The broker up, its session with the TPM made.
    assert_eq!(env.request("user", "warm", "32 user").payload().len(), 32);
    let swtpm = Pid::from_raw(env.swtpm.pid());
    let before = handlers();

    kill(swtpm, Signal::SIGSTOP).unwrap();
    let mut blockers: Vec<Child> = BLOCKERS
        .flat_map(|uid| [0, 1].map(|i| (uid, i)))
        .map(|(uid, i)| ask(&env, uid, &format!("block{i}")))
        .collect();
    until_handlers(before + blockers.len());
    let mut waiting: Vec<(u32, usize, Child)> = Vec::new();
    let last = (FILLERS.end - 1, PER_FILLER - 1);
    for i in 0..PER_FILLER {
        for uid in FILLERS.filter(|&u| (u, i) != last) {
            waiting.push((uid, i, ask(&env, uid, &format!("fill{i}"))));
        }
    }
    until_handlers(before + blockers.len() + waiting.len());
    // The highest uid's last request, surely its newest.
    waiting.push((last.0, last.1, ask(&env, last.0, "last")));
    until_handlers(before + blockers.len() + waiting.len());
    let early: Vec<_> = waiting
        .iter_mut()
        .filter_map(|(uid, i, c)| c.try_wait().unwrap().map(|st| (*uid, *i, st)))
        .collect();

    let newcomer = ask(&env, NEWCOMER, "new");
    // The displaced request: refused at once, the TPM still stopped.
    let end = Instant::now() + Duration::from_secs(5);
    let mut refused = Vec::new();
    while early.is_empty() && refused.is_empty() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
        for (uid, i, c) in waiting.iter_mut() {
            if c.try_wait().unwrap().is_some() {
                refused.push((*uid, *i));
            }
        }
    }
    kill(swtpm, Signal::SIGCONT).unwrap();
    let results: Vec<(u32, usize, std::process::Output)> = waiting
        .into_iter()
        .map(|(uid, i, c)| (uid, i, c.wait_with_output().unwrap()))
        .collect();
    let new = newcomer.wait_with_output().unwrap();
    let blocked: Vec<_> = blockers
        .iter_mut()
        .map(|c| c.wait().unwrap().success())
        .collect();

    assert!(early.is_empty(), "not every request waited: {early:?}");
    assert_eq!(
        refused,
        [(FILLERS.end - 1, PER_FILLER - 1)],
        "the newest of the highest uid"
    );
    let failed: Vec<_> = results
        .iter()
        .filter(|(_, _, o)| !o.status.success())
        .map(|(u, n, o)| (*u, *n, String::from_utf8_lossy(&o.stderr).into_owned()))
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!((failed[0].0, failed[0].1), refused[0]);
    assert!(failed[0].2.contains("Connection timed out"), "{failed:?}");
    assert!(
        new.status.success(),
        "{}",
        String::from_utf8_lossy(&new.stderr)
    );
    assert!(blocked.iter().all(|&ok| ok), "{blocked:?}");

    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let lines = log.join().unwrap();
    let why = format!(r"and\x20its\x20newest\x20made\x20room\x20for\x20uid\x20{NEWCOMER}");
    let line = lines
        .iter()
        .find(|l| l.contains(&why))
        .expect("the displaced request's audit line");
    assert!(
        line.contains(&format!("uid={} ", FILLERS.end - 1)) && line.contains("ETIMEDOUT"),
        "{line}"
    );
}
