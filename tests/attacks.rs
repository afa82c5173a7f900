//! Attacks, each shown refused (or unable to reach the victim's key),
//! through the real kernel.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use std::process::Command;
use std::time::Duration;

use common::{Got, KernelEnv};

#[test]
fn fake_binary_at_the_victims_path_in_a_private_mount_namespace() {
    let env = KernelEnv::new("");
    let victim = env.request("user", "db", "32 path").payload();
    // The attacker's own program, mounted over /usr/bin/keyctl in its own
    // mount namespace: the path looks like the victim's.
    let fake = env.dir.path().join("fake-keyctl");
    common::copy_executable("/usr/bin/keyctl", &fake, "attacker");
    let script = format!(
        "mount --bind {} /usr/bin/keyctl && exec \"$@\"",
        fake.display()
    );
    let got = env.request_with(
        &["unshare", "-m", "sh", "-c", &script, "sh"],
        "/usr/bin/keyctl",
        "user",
        "db",
        "32 path",
    );
    assert_eq!(got, Got::Err(libc::EACCES));
    // Outside any namespace trick, the victim still gets its key.
    assert_eq!(env.request("user", "db#again", "32 path").payload(), victim);
}

#[test]
fn another_uid_cannot_get_or_read_the_victims_user_key() {
    use std::io::{BufRead, Write};
    let env = KernelEnv::new("");
    let victim = env.request_as(4300, "user", "db", "32 user").payload();
    let attacker = env.request_as(4301, "user", "db", "32 user").payload();
    assert_eq!(victim.len(), 32);
    assert_ne!(
        victim, attacker,
        "the uid is an input: another uid gets another key"
    );
    // Nor can the attacker read the victim's key out of the victim's
    // keyring. The holder gets the key, shows it can read it, and keeps
    // its session (and so the key) alive until told, then reads it again:
    // the key was there, readable by its owner, all through the attempt.
    let script = r#"
        id=$(keyctl request2 user "$1" '32 user' @s) || exit 3
        echo "serial=$id"
        echo "key=$(keyctl pipe "$id" | od -An -v -tx1 | tr -d ' \n')"
        read -r _
        echo "key=$(keyctl pipe "$id" | od -An -v -tx1 | tr -d ' \n')"
    "#;
    let mut holder = Command::new("setpriv")
        .args([
            "--reuid=4300",
            "--regid=4300",
            "--clear-groups",
            "keyctl",
            "session",
            "-",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(env.desc("db#held"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut from_holder = std::io::BufReader::new(holder.stdout.take().unwrap());
    let mut field = |k: &str| {
        let mut line = String::new();
        from_holder.read_line(&mut line).unwrap();
        line.trim()
            .strip_prefix(&format!("{k}="))
            .unwrap_or_else(|| panic!("the holder said {line:?}, not {k}="))
            .to_owned()
    };
    let serial: i32 = field("serial").parse().unwrap();
    assert!(serial > 0);
    assert_eq!(field("key"), hex::encode(&victim), "the holder's own key");

    for op in ["pipe", "print", "read"] {
        let read = Command::new("setpriv")
            .args([
                "--reuid=4301",
                "--regid=4301",
                "--clear-groups",
                "keyctl",
                op,
                &serial.to_string(),
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&read.stdout);
        let stderr = String::from_utf8_lossy(&read.stderr);
        assert!(
            !read.status.success() && !stdout.contains(&hex::encode(&victim)),
            "another uid read the victim's key with keyctl {op}: {stdout}"
        );
        // Refused, not missing: the key is there, the attacker may not read it.
        assert!(
            stderr.contains("Permission denied"),
            "keyctl {op}: {stderr}"
        );
    }
    assert!(
        holder.try_wait().unwrap().is_none(),
        "the holder's session ended during the attempt"
    );
    holder.stdin.take().unwrap().write_all(b"done\n").unwrap();
    assert_eq!(
        field("key"),
        hex::encode(&victim),
        "the key outlived the attempt"
    );
    assert!(holder.wait().unwrap().success());
}

#[test]
fn unlisted_uid_cannot_get_machine_keys() {
    let env = KernelEnv::new("[bindings]\nmachine_uids = [0]\n");
    for uid in [1, 1000, 65534] {
        assert_eq!(
            env.request_as(uid, "user", "host", "32 machine"),
            Got::Err(libc::EACCES)
        );
    }
}

/// A requester whose second thread calls exec while the first is inside
/// request_key: the kernel makes the exec wait (the requester sleeps
/// uninterruptibly), so the handler always sees the program that asked.
/// Every one of the requests is in flight when exec is called (the script
/// waits until its thread is blocked in request_key), each reaches the
/// handler, and each is granted to python.
#[test]
fn exec_racing_the_request_cannot_change_the_requesters_identity() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};
    let sock_dir = common::scratch_dir();
    let sock = sock_dir.path().join("log");
    let rx = std::os::unix::net::UnixDatagram::bind(&sock).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // Read as lines arrive: a datagram socket queues only a few.
    let (lines_tx, lines) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = rx.recv(&mut buf) {
                    let line = String::from_utf8_lossy(&buf[..n]).to_string();
                    if lines_tx.send(line).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let env = KernelEnv::new(&format!(
        "[log]\ntarget = \"syslog\"\nsocket = \"{}\"\n",
        sock.display()
    ));
    // A request often ends before it is seen in flight: those are asked
    // again (under another tag) until one is raced; each is reported.
    let script = r#"
import ctypes, os, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
base, delay, nr = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
for attempt in range(100):
    tids = []
    def ask(desc=("%sa%d" % (base, attempt)).encode()):
        tids.append(threading.get_native_id())
        libc.syscall(nr, b"user", desc, b"32 path", -2)
    t = threading.Thread(target=ask)
    t.start()
    # Race the request itself, not its start: exec only once the thread
    # is blocked inside request_key(2).
    while t.is_alive():
        try:
            with open("/proc/self/task/%d/syscall" % tids[0]) as f:
                if f.read().split()[0] == str(nr):
                    print("raced=%d" % tids[0], flush=True)
                    time.sleep(delay)
                    os.execv("/bin/sleep", ["sleep", "0"])
        except (IndexError, OSError):
            pass
    t.join()
    print("asked=%d" % tids[0], flush=True)
sys.exit("no request was ever seen in flight")
"#;
    // The interpreter itself (python3 may be a shim script that execs it).
    let python = String::from_utf8(
        Command::new("python3")
            .args([
                "-c",
                "import os, sys; print(os.path.realpath(sys.executable))",
            ])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_owned();
    let runs = 12;
    let mut tids = Vec::new();
    for i in 0..runs {
        let delay = format!("{:.4}", (i % 6) as f64 * 0.0015);
        let out = Command::new("keyctl")
            .args(["session", "-", "python3", "-c", script])
            .arg(env.desc(&format!("race#r{i}")))
            .arg(delay)
            .arg(libc::SYS_request_key.to_string())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        // Exit 0 is sleep's: the exec happened, with a request in flight.
        assert!(
            out.status.success(),
            "run {i}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tid = |k: &str| -> Vec<u32> {
            stdout
                .lines()
                .filter_map(|l| l.strip_prefix(k))
                .map(|t| t.parse().unwrap())
                .collect()
        };
        assert_eq!(tid("raced=").len(), 1, "run {i}: {stdout}");
        tids.extend(tid("raced="));
        tids.extend(tid("asked="));
    }
    // Every request reached the handler: one audit line per requesting
    // thread, granted, naming python, never the program exec'd while the
    // request was in flight.
    let mut got: Vec<String> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while got.len() < tids.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) => got.push(l),
            Err(_) => break,
        }
    }
    stop.store(true, Ordering::Relaxed);
    drop(lines);
    reader.join().unwrap();
    for line in &got {
        assert!(
            !line.contains("/sleep"),
            "identity changed under the handler: {line}"
        );
    }
    assert_eq!(
        got.len(),
        tids.len(),
        "not every request reached the handler: {got:#?}"
    );
    for tid in tids {
        let mine: Vec<&String> = got
            .iter()
            .filter(|l| l.contains(&format!(" pid={tid} ")))
            .collect();
        assert_eq!(mine.len(), 1, "tid {tid}: {got:#?}");
        assert!(
            mine[0].contains(&format!(
                "derived-keys: granted uid=0 pid={tid} exe={python} name=race op="
            )),
            "{}",
            mine[0]
        );
    }
}

#[test]
fn hostile_bytes_through_the_kernel() {
    let env = KernelEnv::new("");
    // Non-UTF-8, oversized and NUL-laden inputs, straight through request_key(2).
    let script = r#"
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
def ask(desc, callout):
    r = libc.syscall(249, b"user", desc, callout, -2)
    return 0 if r >= 0 else ctypes.get_errno()
p = sys.argv[1].encode()
cases = [
    (p + b":\xff\xfe", b"32 user"),
    (p + b":ok", b"32 \xffuser"),
    (p + b":" + b"a" * 4000, b"32 user"),
    (p + b":ok2", b"32 user " + b"account=" + b"a" * 4000),
    (p + b":ok3", b"32 user" + b" " * 3000),
]
print(" ".join(str(ask(d, c)) for d, c in cases))
# A NUL ends a C string: the kernel passes only what comes before it.
print(ask(p + b":nul\x00tail", b"32 user\x00 account=x"))
"#;
    let out = Command::new("keyctl")
        .args(["session", "-", "python3", "-c", script])
        .arg(&env.prefix)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let codes: Vec<i32> = lines
        .next()
        .unwrap()
        .split(' ')
        .map(|c| c.parse().unwrap())
        .collect();
    assert_eq!(codes, vec![libc::EINVAL; 5], "{text}");
    assert_eq!(
        lines.next(),
        Some("0"),
        "truncated at the NUL: a valid request"
    );
}
