//! The broker's view of /proc/keys through the real kernel, with a real
//! authorization key: the record the kernel prints for it is read alone,
//! after the view's own session keyring's record if that comes first, and
//! names the requesting thread; the whole-file scan finds the same line.
//! Needs root and request-key(8); runs in a process of its own (a fresh
//! anonymous session keyring, no other test's keys possessed).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use derived_keys::requester::keys::KeysView;
use derived_keys_core::proc_keys::AuthKey;

/// The outer test: runs the inner one in `keyctl session -`, a process with
/// a fresh anonymous session keyring.
#[test]
fn a_real_authorization_key_is_read_alone_from_a_view() {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let out = Command::new("keyctl")
        .args(["session", "-"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "inner_view_of_a_real_request",
            "--ignored",
            "--nocapture",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `keyctl` with `args`, its output trimmed.
fn keyctl(args: &[&str]) -> String {
    let out = Command::new("keyctl").args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
#[ignore = "run by a_real_authorization_key_is_read_alone_from_a_view"]
fn inner_view_of_a_real_request() {
    let ring: i32 = keyctl(&["id", "@s"]).parse().unwrap();
    assert_eq!(
        keyctl(&["rdescribe", &ring.to_string()]).rsplit(';').next(),
        Some("_ses")
    );
    // Linkable by its owner's other processes (root's request-key program),
    // as the broker makes its keyring (keyring::session_for_handlers).
    keyctl(&["setperm", &ring.to_string(), "0x3f3f0000"]);
    // The rule's program links its authorization key into our session
    // keyring, waits for the flag file, and instantiates.
    let dir = common::scratch_dir();
    let flag = dir.path().join("flag");
    let script = dir.path().join("link-and-wait");
    std::fs::write(
        &script,
        "#!/bin/sh\nset -- \"$1\" $2\nkeyctl link @a \"$2\" >/dev/null || exit 1\n\
         i=0\nwhile [ ! -e \"$3\" ] && [ $i -lt 1000 ]; do sleep 0.01; i=$((i+1)); done\n\
         exec keyctl instantiate \"$1\" done 0\n",
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let prefix = format!("dkv{}", std::process::id());
    let _rule = common::RuleFile::install(&prefix, &format!("{} %k %c", script.display()));
    let callout = format!("{ring} {}", flag.display());

    // The requester: another thread, its result into its thread keyring
    // (which the view does not hold).
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let requester = {
        let callout = callout.clone();
        let desc = format!("{prefix}:x");
        std::thread::spawn(move || {
            tid_tx.send(nix::unistd::gettid().as_raw()).unwrap();
            derived_keys::keyring::request("user", &desc, Some(&callout), -1)
        })
    };
    let tid = tid_rx.recv().unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    let (auth, target) = loop {
        let found = keyctl(&["rlist", &ring.to_string()])
            .split_whitespace()
            .find_map(|id| {
                let d = keyctl(&["rdescribe", id]);
                let desc = d.strip_prefix(".request_key_auth;")?;
                let target = desc.rsplit(';').next()?;
                Some((
                    id.parse::<i32>().ok()?,
                    i32::from_str_radix(target, 16).ok()?,
                ))
            });
        if let Some(f) = found {
            break f;
        }
        assert!(Instant::now() < end, "no authorization key linked");
        std::thread::sleep(Duration::from_millis(10));
    };
    let key = AuthKey {
        serial: auth,
        target,
        callout_len: callout.len(),
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let alone = KeysView::forking(Some(ring))
        .auth_line(0, &key, deadline)
        .unwrap();
    // Without the keyring named: read alone only if the key comes first;
    // either way the same record.
    let either = KeysView::forking(None)
        .auth_line(0, &key, deadline)
        .unwrap();
    std::fs::write(&flag, b"").unwrap();
    requester.join().unwrap().unwrap();

    let line = String::from_utf8(alone.line.clone()).unwrap();
    assert!((alone.alone, alone.count) == (true, 1), "{alone:?}");
    assert!(line.starts_with(&format!("{auth:08x} ")), "{line}");
    assert!(
        line.ends_with(&format!(
            " .request_ key:{target:x} pid:{tid} ci:{}",
            callout.len()
        )),
        "{line}"
    );
    // The same record but for its usage count (the third field), which
    // the kernel changes as references to the key come and go between the
    // two reads.
    let but_usage = |l: &[u8]| {
        let text = String::from_utf8(l.to_vec()).unwrap();
        let mut fields: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
        fields.remove(2);
        fields
    };
    assert_eq!(either.count, 1);
    assert_eq!(but_usage(&either.line), but_usage(&alone.line));
}
