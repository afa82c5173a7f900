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
    let env = KernelEnv::new("");
    let victim = env.request_as(4300, "user", "db", "32 user").payload();
    let attacker = env.request_as(4301, "user", "db", "32 user").payload();
    assert_ne!(
        victim, attacker,
        "the uid is an input: another uid gets another key"
    );
    // Nor can the attacker read the victim's key out of the victim's keyring.
    let script = "id=$(keyctl request2 user \"$1\" '32 user' @s) && echo $id && sleep 2";
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
        .arg(env.desc("held"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let serial = line.trim().to_owned();
    let read = Command::new("setpriv")
        .args([
            "--reuid=4301",
            "--regid=4301",
            "--clear-groups",
            "keyctl",
            "pipe",
            &serial,
        ])
        .output()
        .unwrap();
    assert!(!read.status.success(), "another uid read the victim's key");
    holder.wait().unwrap();
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
#[test]
fn exec_racing_the_request_cannot_change_the_requesters_identity() {
    let sock_dir = common::scratch_dir();
    let sock = sock_dir.path().join("log");
    let rx = std::os::unix::net::UnixDatagram::bind(&sock).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    // Read as lines arrive: a datagram socket queues only a few.
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(n) = rx.recv(&mut buf) {
            lines.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
        lines
    });
    let env = KernelEnv::new(&format!(
        "[log]\ntarget = \"syslog\"\nsocket = \"{}\"\n",
        sock.display()
    ));
    let script = r#"
import ctypes, os, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
desc, delay = sys.argv[1].encode(), float(sys.argv[2])
def ask():
    libc.syscall(249, b"user", desc, b"32 path", -2)
t = threading.Thread(target=ask)
t.start()
time.sleep(delay)
os.execv("/bin/sleep", ["sleep", "0"])
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
    for i in 0..runs {
        let delay = format!("{:.4}", (i % 6) as f64 * 0.0015);
        let st = Command::new("keyctl")
            .args(["session", "-", "python3", "-c", script])
            .arg(env.desc(&format!("race#r{i}")))
            .arg(delay)
            .status()
            .unwrap();
        assert!(st.success());
    }
    // Every request the handler answered names python as the requester,
    // never the program exec'd while the request was in flight.
    let lines = reader.join().unwrap();
    for line in &lines {
        assert!(
            !line.contains("/sleep"),
            "identity changed under the handler: {line}"
        );
        assert!(line.contains(&format!("exe={python} ")), "{line}");
    }
    assert!(!lines.is_empty(), "no request reached the handler");
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
