//! The embedded software TPM, attacked as a plain local user: it must be
//! reachable by root alone, on every channel; a loaded primary must be
//! useless to anyone but the broker that made it; the hierarchies stay
//! locked; an install of the previous release keeps its keys.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};

use common::{KernelEnv, Swtpm};
use derived_keys::setup::{self, Layout, SWTPM_PORT};
use derived_keys::tpm::{Tcti, Tpm};

const ATTACKER: &str = "4330";

fn as_attacker(args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={ATTACKER}"),
            &format!("--regid={ATTACKER}"),
            "--clear-groups",
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Socket inodes of a process's open descriptors.
fn socket_inodes(pid: i32) -> BTreeSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// (local port, inode) of the listening TCP sockets in /proc/<pid>/net/tcp{,6}.
fn tcp_listeners(pid: i32) -> Vec<(u16, u64)> {
    let mut out = Vec::new();
    for file in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(3) != Some(&"0A") {
                continue; // not LISTEN
            }
            let port = u16::from_str_radix(f[1].rsplit(':').next().unwrap(), 16).unwrap();
            out.push((port, f[9].parse().unwrap()));
        }
    }
    out
}

fn netns_inode(pid: &str) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .unwrap()
        .ino()
}

#[test]
fn a_plain_user_reaches_no_channel_of_the_embedded_tpm() {
    let env = KernelEnv::embedded("");
    let machine = env.request("user", "host", "32 machine").payload();
    let layout = env.swtpm.layout().unwrap().clone();
    let netns = layout.tpm_netns();
    let pid = env.swtpm.pid();
    assert!(pid > 0, "the embedded swtpm runs and wrote its pid file");

    // Every socket swtpm holds is a TCP listener in a namespace that is not
    // the host's; it holds no unix socket anyone could open.
    assert_ne!(netns_inode(&pid.to_string()), netns_inode("self"));
    let held = socket_inodes(pid);
    let listeners = tcp_listeners(pid);
    let ports: BTreeSet<u16> = listeners
        .iter()
        .filter(|(_, ino)| held.contains(ino))
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(ports, BTreeSet::from([SWTPM_PORT, SWTPM_PORT + 1]));
    let unix = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap();
    for line in unix.lines().skip(1) {
        let ino: u64 = line.split_whitespace().nth(6).unwrap().parse().unwrap();
        assert!(!held.contains(&ino), "swtpm holds a unix socket: {line}");
    }

    // The attacker: the host's ports are closed (commands and control) ...
    for port in [SWTPM_PORT, SWTPM_PORT + 1] {
        let probe = format!("exec 3<>/dev/tcp/127.0.0.1/{port}");
        let out = as_attacker(&["bash", "-c", &probe]);
        assert!(
            !out.status.success(),
            "uid {ATTACKER} connected to port {port}"
        );
    }
    // ... and the namespace cannot be entered, neither directly nor with
    // every capability of a user namespace of its own, nor even opened.
    let ns_arg = format!("--net={}", netns.display());
    for cmd in [
        vec!["nsenter", &ns_arg, "true"],
        vec!["unshare", "-Ur", "nsenter", &ns_arg, "true"],
        vec!["cat", netns.to_str().unwrap()],
    ] {
        let out = as_attacker(&cmd);
        assert!(!out.status.success(), "uid {ATTACKER} ran {cmd:?}");
    }
    let rundir = std::fs::metadata(layout.run_dir()).unwrap();
    assert_eq!((rundir.uid(), rundir.mode() & 0o777), (0, 0o700));

    // Even root, inside the namespace, cannot use the broker's loaded
    // primary without its random authValue.
    let list = env.swtpm.tool(&["tpm2_getcap", "handles-transient"]);
    let handles: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- ").map(str::to_owned))
        .collect();
    assert!(!handles.is_empty(), "the broker keeps its primary loaded");
    for h in &handles {
        let out = env
            .swtpm
            .command(&["tpm2_hmac", "-c", h, "--hex"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(&[7; 32])?;
                c.wait_with_output()
            })
            .unwrap();
        assert!(!out.status.success(), "TPM2_HMAC on {h} was answered");
    }
    // Nor clear the TPM or take a hierarchy without the password files.
    for args in [
        vec!["tpm2_clear", "-c", "p"],
        vec!["tpm2_clear", "-c", "l"],
        vec!["tpm2_changeauth", "-c", "o", "mine"],
        vec!["tpm2_changeauth", "-c", "e", "mine"],
        vec!["tpm2_changeauth", "-c", "p", "mine"],
    ] {
        let out = env.swtpm.command(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
    }

    // The broker still derives the same key.
    assert_eq!(
        env.request("user", "host#again", "32 machine").payload(),
        machine
    );
}

#[test]
fn a_restarted_embedded_tpm_is_locked_again_and_keeps_its_keys() {
    let mut env = KernelEnv::embedded("");
    let before = env.request("user", "db", "32 user").payload();
    env.stop_broker();
    env.swtpm.restart();
    for args in [
        vec!["tpm2_clear", "-c", "p"],
        vec!["tpm2_changeauth", "-c", "p", "mine"],
    ] {
        let out = env.swtpm.command(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded after a restart");
    }
    assert_eq!(env.request("user", "db#again", "32 user").payload(), before);
}

/// The embedded TPM as the previous release ran it: on the host's loopback,
/// started by that release's install (same state directory, pid file and
/// password files).
fn start_previous_release_swtpm(layout: &Layout) -> String {
    let (port, ctrl) = common::free_port_pair();
    for d in [layout.swtpm_state(), layout.run_dir()] {
        std::fs::create_dir_all(d).unwrap();
    }
    let st = Command::new("swtpm")
        .args(["socket", "--tpm2", "--server"])
        .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
        .arg("--ctrl")
        .arg(format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"))
        .arg("--tpmstate")
        .arg(format!("dir={}", layout.swtpm_state().display()))
        .args([
            "--flags",
            "not-need-init,startup-clear",
            "--daemon",
            "--pid",
        ])
        .arg(format!("file={}", layout.swtpm_pid().display()))
        .status()
        .unwrap();
    assert!(st.success());
    let tcti = format!("swtpm:host=127.0.0.1,port={port}");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < end, "old swtpm did not listen");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(20));
    setup::lockdown(layout, &Tcti::parse(&tcti).unwrap(), None).unwrap();
    tcti
}

fn prks(tcti: &Tcti, netns: Option<&std::path::Path>, layout: &Layout) -> Vec<[u8; 32]> {
    let pw = std::fs::read(layout.owner_auth()).unwrap();
    let pw = derived_keys::secret::SecretBuf::copy_from(&pw).unwrap();
    derived_keys::tpm::netns::run_in(netns, || {
        let mut tpm = Tpm::open(tcti).unwrap();
        (0u8..3)
            .map(|i| {
                let prk = tpm.prk(Some(&pw), &[i; 32]).unwrap();
                let mut out = [0u8; 32];
                out.copy_from_slice(prk.as_bytes());
                out
            })
            .collect()
    })
    .unwrap()
}

#[test]
fn an_install_of_the_previous_release_moves_into_the_namespace_with_its_keys() {
    let root = common::scratch_dir();
    let layout = Layout {
        root: root.path().to_path_buf(),
    };
    let old_tcti = start_previous_release_swtpm(&layout);
    let old_port: u16 = old_tcti.rsplit('=').next().unwrap().parse().unwrap();
    let before = prks(&Tcti::parse(&old_tcti).unwrap(), None, &layout);

    // The new release's install step: the old swtpm is stopped, the same
    // state is served from the namespace, and locked down again.
    let step = setup::start_embedded_swtpm(&layout).unwrap();
    assert_eq!(step.change, setup::Change::Updated, "{step:?}");
    setup::lockdown_embedded(&layout).unwrap();
    let gone = as_attacker(&[
        "bash",
        "-c",
        &format!("exec 3<>/dev/tcp/127.0.0.1/{old_port}"),
    ]);
    assert!(!gone.status.success(), "the host port is still open");

    let netns = layout.tpm_netns();
    let tcti = Tcti::parse(setup::SWTPM_TCTI).unwrap();
    let after = prks(&tcti, Some(&netns), &layout);
    setup::stop_embedded_swtpm(&layout).unwrap();
    assert_eq!(before, after, "every key stays the same");
}

#[test]
fn status_says_who_can_reach_the_tpm() {
    let env = KernelEnv::embedded("");
    let dkey = env!("CARGO_BIN_EXE_dkey");
    let out = Command::new(dkey)
        .args(["status", "--json", "--config"])
        .arg(&env.conf)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tpm_open_to_all_users"], false, "{v}");
    assert!(
        v["tpm_access"].as_str().unwrap().starts_with("root only"),
        "{v}"
    );
    assert_eq!(v["derivation_ok"], true, "{v}");

    let tcp = KernelEnv::new("");
    let out = Command::new(dkey)
        .args(["status", "--json", "--config"])
        .arg(&tcp.conf)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tpm_open_to_all_users"], true, "{v}");
    assert!(
        v["tpm_access"]
            .as_str()
            .unwrap()
            .starts_with("every local user"),
        "{v}"
    );
    let human = Command::new(dkey)
        .args(["status", "--config"])
        .arg(&tcp.conf)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&human.stdout)
        .contains("reachable by:   WARNING: every local user"));
}

#[test]
fn a_swtpm_harness_reaches_its_own_tpm() {
    // The harness itself: an embedded TPM is reached through its namespace
    // by tools, and not on the host.
    let s = Swtpm::start_embedded();
    s.tool(&["tpm2_getrandom", "--hex", "8"]);
    let direct = Command::new("tpm2_getrandom")
        .args(["--hex", "8"])
        .env("TPM2TOOLS_TCTI", s.tcti())
        .output()
        .unwrap();
    assert!(!direct.status.success());
}
