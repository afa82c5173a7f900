//! The handler end to end through the real kernel: request_key(2) from
//! keyctl, the upcall through /sbin/request-key, our rule, our handler, a
//! private swtpm. Each test has its own description prefix, rule file,
//! configuration and session keyrings.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{request_described, Got, KernelEnv};
use sha2::{Digest, Sha256};

const EINVAL: i32 = libc::EINVAL;
const EACCES: i32 = libc::EACCES;
const ENODEV: i32 = libc::ENODEV;
const EIO: i32 = libc::EIO;
const ETIMEDOUT: i32 = libc::ETIMEDOUT;

#[test]
fn symmetric_keys_per_binding_and_option() {
    let env = KernelEnv::new("");
    let k = env.request("user", "db", "32 path").payload();
    assert_eq!(k.len(), 32);
    // Same request, new session, new process: same key. The tag is no input.
    assert_eq!(env.request("user", "db", "32 path").payload(), k);
    assert_eq!(env.request("user", "db#k3x9", "32 path").payload(), k);
    let mut seen = vec![k];
    for (rest, callout) in [
        ("db", "32 csum"),
        ("db", "32 user"),
        ("db", "32 machine"),
        ("db", "31 path"),
        ("db2", "32 path"),
        ("db", "32 path account=alice"),
        ("db", "32 path client=web"),
        ("db", "32 path epoch=1"),
        ("db", "32 path account=alice client=web epoch=4294967295"),
    ] {
        let key = env.request("user", rest, callout).payload();
        // Like with like: over the length both have (a 31-byte key that
        // is the first 31 bytes of a 32-byte one would be no new key).
        let repeats = |k: &Vec<u8>| {
            let n = k.len().min(key.len());
            k[..n] == key[..n]
        };
        assert!(!seen.iter().any(repeats), "{rest} {callout} repeats a key");
        seen.push(key);
    }
    assert_eq!(
        env.request("user", "big", "1024 user").payload().len(),
        1024
    );
    assert_eq!(env.request("user", "small", "1 user").payload().len(), 1);
}

#[test]
fn every_malformed_request_is_einval() {
    let env = KernelEnv::new("");
    let digest = "ab".repeat(32);
    for (ty, rest, callout) in [
        ("user", "bad/name", "32 user"),
        ("user", &"n".repeat(65), "32 user"),
        ("user", "x:sign:ABCD", "p256 user"),
        ("user", &format!("x:sign:{}", &digest[..62]), "p256 user"),
        ("user", "x:frob", "p256 user"),
        ("user", "x#bad-tag", "32 user"),
        ("user", "x", "0 user"),
        ("user", "x", "1025 user"),
        ("user", "x", "32 group"),
        ("user", "x", "32 user colour=blue"),
        ("user", "x", "32 user epoch=1 epoch=2"),
        ("user", "x", "32 user account=a account=b"),
        ("user", "x", "32  user"),
        ("user", "x", "p256 user"),
        ("user", "x:pub", "32 user"),
        ("logon", "x:pub", "p256 user"),
        ("logon", &format!("x:sign:{digest}"), "p256 user"),
    ] {
        assert_eq!(
            env.request(ty, rest, callout),
            Got::Err(EINVAL),
            "{ty} {rest} {callout}"
        );
    }
}

/// The longest description and callout the kernel passes on (4,095 bytes
/// each) are refused as malformed (EINVAL), not lost on the way: a field
/// too large for the handler's message would be EIO (E2BIG from the
/// kernel). That they arrive byte for byte is
/// `the_longest_description_and_callout_arrive_whole` (tests/faults.rs).
#[test]
fn the_longest_description_and_callout_reach_the_broker() {
    let env = KernelEnv::new("");
    let (longest_name, longest_callout) = env.longest_name_and_callout();
    for (rest, callout) in [
        (longest_name.as_str(), "32 user"),
        ("x", longest_callout.as_str()),
        (longest_name.as_str(), longest_callout.as_str()),
    ] {
        assert_eq!(
            env.request("user", rest, callout),
            Got::Err(EINVAL),
            "{} and {} bytes",
            rest.len(),
            callout.len()
        );
    }
}

#[test]
fn public_key_and_signature_verify_with_openssl() {
    let env = KernelEnv::new("");
    let dir = env.dir.path();
    let spki = env.request("user", "host:pub", "p256 machine").payload();
    std::fs::write(dir.join("pub.der"), &spki).unwrap();
    let out = Command::new("openssl")
        .args(["pkey", "-pubin", "-inform", "DER", "-in"])
        .arg(dir.join("pub.der"))
        .args(["-text", "-noout"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("prime256v1"),
        "{text}"
    );

    let message = b"enroll me\n";
    std::fs::write(dir.join("msg"), message).unwrap();
    let digest = hex::encode(Sha256::digest(message));
    let got = env.request("user", &format!("host:sign:{digest}"), "p256 machine");
    let sig = got.payload();
    std::fs::write(dir.join("sig.der"), &sig).unwrap();
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(dir.join("pub.der"))
        .args(["-keyform", "DER", "-signature"])
        .arg(dir.join("sig.der"))
        .arg(dir.join("msg"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A signature by another key does not verify.
    let other = env
        .request("user", &format!("other:sign:{digest}"), "p256 machine")
        .payload();
    std::fs::write(dir.join("sig2.der"), &other).unwrap();
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(dir.join("pub.der"))
        .args(["-keyform", "DER", "-signature"])
        .arg(dir.join("sig2.der"))
        .arg(dir.join("msg"))
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// The expiry column of /proc/keys for a key ("perm" when none).
fn expiry(serial: i32) -> String {
    let keys = common::proc_keys();
    let id = format!("{:08x}", serial as u32);
    keys.lines()
        .find(|l| l.starts_with(&id))
        .map(|l| l.split_whitespace().nth(3).unwrap_or_default().to_owned())
        .unwrap_or_else(|| panic!("key {id} not in /proc/keys"))
}

#[test]
fn signatures_expire_and_results_belong_to_the_requester() {
    // Not the default (30 s): the configured time is the one used.
    let env = KernelEnv::new("[results]\nsignature_timeout_s = 20\n");
    let digest = "cd".repeat(32);
    // Keep the session alive, until told, while we look at the keys from
    // outside. The signature comes last, so that little of its time has
    // gone when we look.
    let script = format!(
        "p=$(keyctl request2 user {1} 'p256 user' @s) && k=$(keyctl request2 user {2} '32 user' @s) && \
         s=$(keyctl request2 user {0} 'p256 user' @s) && echo $s $p $k && {{ read -r _ || :; }}",
        env.desc(&format!("n:sign:{digest}")),
        env.desc("n:pub"),
        env.desc("n")
    );
    let mut child = Command::new("keyctl")
        .args(["session", "-", "sh", "-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let ids: Vec<i32> = line
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "{line}");
    let sig_expiry = expiry(ids[0]);
    assert!(
        sig_expiry.ends_with('s') && sig_expiry != "perm",
        "{sig_expiry}"
    );
    let secs: u32 = sig_expiry.trim_end_matches('s').parse().unwrap();
    // Configured 20 s; the kernel is given 21 (whole seconds, at least 20).
    // The lower end leaves a loaded machine seconds to get here.
    assert!((15..=21).contains(&secs), "{sig_expiry}");
    assert_eq!(expiry(ids[1]), "perm");
    assert_eq!(expiry(ids[2]), "perm");
    // Owned by the requester (root here); readable only by possessors:
    // this test process, outside the session, cannot read the secret.
    let desc = Command::new("keyctl")
        .args(["rdescribe", &ids[2].to_string()])
        .output()
        .unwrap();
    let desc = String::from_utf8_lossy(&desc.stdout);
    assert!(desc.starts_with("user;0;0;3f010000;"), "{desc}");
    let read = Command::new("keyctl")
        .args(["pipe", &ids[2].to_string()])
        .output()
        .unwrap();
    assert!(!read.status.success(), "a non-possessor read the key");
    assert!(
        child.try_wait().unwrap().is_none(),
        "the session ended before the checks"
    );
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
}

#[test]
fn path_and_csum_with_a_copied_binary() {
    let env = KernelEnv::new("");
    let copy = env.dir.path().join("keyctl-copy");
    common::copy_executable("/usr/bin/keyctl", &copy, "");
    let copy = copy.to_str().unwrap();
    let path_orig = env.request("user", "app", "32 path").payload();
    let path_copy = env
        .request_with(&[], copy, "user", "app", "32 path")
        .payload();
    assert_ne!(
        path_orig, path_copy,
        "path binding: another path, another key"
    );
    let csum_orig = env.request("user", "app", "32 csum").payload();
    let csum_copy = env
        .request_with(&[], copy, "user", "app", "32 csum")
        .payload();
    assert_eq!(csum_orig, csum_copy, "csum binding: same content, same key");
    // A changed program gets another key.
    let changed = env.dir.path().join("keyctl-changed");
    common::copy_executable("/usr/bin/keyctl", &changed, "changed");
    let csum_changed = env
        .request_with(&[], changed.to_str().unwrap(), "user", "app", "32 csum")
        .payload();
    assert_ne!(csum_changed, csum_orig);
}

#[test]
fn a_second_uid_gets_its_own_keys_and_no_machine_key() {
    let env = KernelEnv::new("");
    let root_user = env.request("user", "db", "32 user").payload();
    let other_user = env.request_as(4242, "user", "db", "32 user").payload();
    assert_ne!(root_user, other_user, "user binding mixes in the uid");
    assert_eq!(
        env.request_as(4242, "user", "db", "32 user").payload(),
        other_user
    );
    let root_path = env.request("user", "db", "32 path").payload();
    let other_path = env.request_as(4242, "user", "db", "32 path").payload();
    assert_ne!(root_path, other_path, "path binding mixes in the uid");
    assert_eq!(
        env.request_as(4242, "user", "host", "32 machine"),
        Got::Err(EACCES)
    );
    assert!(matches!(
        env.request("user", "host", "32 machine"),
        Got::Key { .. }
    ));
}

#[test]
fn machine_allowed_by_configured_uid_and_gid() {
    let env = KernelEnv::new("[bindings]\nmachine_uids = [4243]\nmachine_gids = [4300]\n");
    let by_uid = env.request_as(4243, "user", "host", "32 machine").payload();
    let u = "--reuid=4244";
    let by_gid = env
        .request_with(
            &["setpriv", u, "--regid=4300", "--clear-groups"],
            "keyctl",
            "user",
            "host",
            "32 machine",
        )
        .payload();
    assert_eq!(by_uid, by_gid, "machine keys do not depend on who asks");
    assert_eq!(
        env.request("user", "host", "32 machine"),
        Got::Err(EACCES),
        "root is not listed"
    );
}

#[test]
fn disabled_binding_is_eacces() {
    let env = KernelEnv::new("[bindings]\ncsum = false\n");
    assert_eq!(env.request("user", "db", "32 csum"), Got::Err(EACCES));
    assert!(matches!(
        env.request("user", "db", "32 path"),
        Got::Key { .. }
    ));
}

#[test]
fn logon_keys_exist_but_cannot_be_read() {
    let env = KernelEnv::new("");
    match env.request("logon", "disk", "64 machine") {
        Got::Unreadable { read_errno, .. } => assert_eq!(read_errno, libc::EOPNOTSUPP),
        other => panic!("{other:?}"),
    }
}

#[test]
fn foreign_mount_namespace_is_refused_for_path_only() {
    let env = KernelEnv::new("");
    let got = env.request_with(&["unshare", "-m"], "keyctl", "user", "db", "32 path");
    assert_eq!(got, Got::Err(EACCES));
    let inside = env.request_with(&["unshare", "-m"], "keyctl", "user", "db", "32 csum");
    assert_eq!(
        inside.payload(),
        env.request("user", "db", "32 csum").payload()
    );
}

/// Longer than any request takes, and far shorter than a hang: a request
/// that took this long did not merely run slowly on a loaded machine.
const HANG: Duration = Duration::from_secs(10);

#[test]
fn stopped_tpm_is_enodev_quickly_and_keys_return_after_restart() {
    let mut env = KernelEnv::new("");
    // A TPM bound well above HANG: a request that waited it out, rather
    // than failing at once on the refused connection, would take longer.
    env.write_conf(&format!(
        "[tpm]\ntcti = \"{}\"\ntimeout_ms = 30000\nhot_key_s = 0\n",
        env.swtpm.tcti()
    ));
    let before = env.request("user", "db", "32 user").payload();
    env.swtpm.stop();
    let t = Instant::now();
    assert_eq!(env.request("user", "db#a", "32 user"), Got::Err(ENODEV));
    assert!(t.elapsed() < HANG, "{:?}", t.elapsed());
    env.swtpm.restart();
    assert_eq!(env.request("user", "db#b", "32 user").payload(), before);
}

#[test]
fn hung_tpm_is_etimedout_within_the_bound() {
    let tcti = common::hung_tpm();
    let swtpm = common::Swtpm::start(); // unused by this env; keeps the harness uniform
    let env = KernelEnv::with_tcti(swtpm, &tcti, "");
    env.write_conf(&format!("[tpm]\ntcti = \"{tcti}\"\ntimeout_ms = 1000\n"));
    let t = Instant::now();
    // ETIMEDOUT: the bound fired; well under HANG (ten times the bound):
    // it is the configured bound that fired, not some other one.
    assert_eq!(env.request("user", "db", "32 user"), Got::Err(ETIMEDOUT));
    assert!(t.elapsed() < HANG, "{:?}", t.elapsed());
}

#[test]
fn missing_configuration_is_enodev_and_wrong_owner_password_is_eio() {
    let env = KernelEnv::new("");
    std::fs::remove_file(&env.conf).unwrap();
    assert_eq!(env.request("user", "db", "32 user"), Got::Err(ENODEV));

    env.swtpm.tool(&["tpm2_changeauth", "-c", "o", "right"]);
    let auth = env.dir.path().join("owner-auth");
    std::fs::write(&auth, "wrong\n").unwrap();
    std::fs::set_permissions(&auth, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let tcti = env.swtpm.tcti();
    env.write_conf(&format!(
        "[tpm]\ntcti = \"{tcti}\"\nowner_auth_file = \"{}\"\n",
        auth.display()
    ));
    assert_eq!(env.request("user", "db", "32 user"), Got::Err(EIO));
    std::fs::write(&auth, "right\n").unwrap();
    assert!(matches!(
        env.request("user", "db#2", "32 user"),
        Got::Key { .. }
    ));
}

/// Audit lines sent to a private syslog socket, read as they arrive.
struct Syslog {
    rx: std::os::unix::net::UnixDatagram,
    _dir: tempfile::TempDir,
    conf: String,
}

impl Syslog {
    fn start() -> Syslog {
        let dir = common::scratch_dir();
        let sock = dir.path().join("log");
        let rx = std::os::unix::net::UnixDatagram::bind(&sock).unwrap();
        let conf = format!(
            "[log]\ntarget = \"syslog\"\nsocket = \"{}\"\n",
            sock.display()
        );
        Syslog {
            rx,
            _dir: dir,
            conf,
        }
    }

    /// Every line that arrives until none has for `quiet`.
    fn drain(&self, quiet: Duration) -> Vec<String> {
        self.rx.set_read_timeout(Some(quiet)).unwrap();
        let mut lines = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(n) = self.rx.recv(&mut buf) {
            lines.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        lines
    }
}

#[test]
fn refusal_is_cached_only_briefly() {
    // Configured 1 s (the default): the kernel keeps the refusal 1 to 2 s
    // (see kernel_timeout).
    let log = Syslog::start();
    let env = KernelEnv::new(&log.conf);
    // Same session for all three requests, so the negative key is found.
    // The second, at once and now well-formed, must get the cached
    // refusal without the handler running; the third, once the refusal
    // has expired, must reach the handler and be granted.
    let script = format!(
        "e=$(keyctl request2 user {0} '32 nobinding' @s 2>&1); echo \"first=$? $e\"
         e=$(keyctl request2 user {0} '32 user' @s 2>&1); echo \"second=$? $e\"
         sleep 2.2
         e=$(keyctl request2 user {0} '32 user' @s 2>&1); echo \"third=$? $e\"",
        env.desc("neg")
    );
    let out = Command::new("keyctl")
        .args(["session", "-", "sh", "-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let step = |k: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k}: {stdout}"))
            .to_owned()
    };
    let (first, second, third) = (step("first"), step("second"), step("third"));
    assert!(
        first.starts_with("1 ") && first.contains("Invalid argument"),
        "{first}"
    );
    assert!(
        second.starts_with("1 ") && second.contains("Invalid argument"),
        "the well-formed retry got the cached refusal: {second}"
    );
    let serial = third
        .strip_prefix("0 ")
        .unwrap_or_else(|| panic!("{third}"));
    assert!(serial.trim().parse::<i32>().unwrap() > 0, "{third}");
    // The handler ran twice: the refusal, and the request after it expired
    // (this socket hears this test's requests alone).
    let ours = log.drain(Duration::from_secs(1));
    assert_eq!(ours.len(), 2, "{ours:#?}");
    assert!(
        ours[0].contains("derived-keys: EINVAL uid=0 "),
        "{}",
        ours[0]
    );
    assert!(
        ours[1].contains("derived-keys: granted uid=0 ")
            && ours[1].contains(" name=neg ")
            && ours[1].contains(" binding=user "),
        "{}",
        ours[1]
    );
}

#[test]
fn audit_lines_go_to_syslog_without_key_material() {
    let sock_dir = common::scratch_dir();
    let sock = sock_dir.path().join("log");
    let rx = std::os::unix::net::UnixDatagram::bind(&sock).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let env = KernelEnv::new(&format!(
        "[log]\ntarget = \"syslog\"\nsocket = \"{}\"\n",
        sock.display()
    ));
    let key = env.request("user", "db", "32 path").payload();
    assert_eq!(
        env.request_as(4242, "user", "m", "32 machine"),
        Got::Err(EACCES)
    );
    let mut lines = Vec::new();
    let mut buf = [0u8; 2048];
    for _ in 0..2 {
        let n = rx.recv(&mut buf).unwrap();
        lines.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    assert!(lines[0].starts_with("<86>"), "authpriv.info: {}", lines[0]);
    assert!(
        lines[0].contains("derived-keys: granted uid=0 pid=")
            && lines[0]
                .contains("exe=/usr/bin/keyctl name=db op=symmetric:32 binding=path type=user"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with("<85>"),
        "authpriv.notice: {}",
        lines[1]
    );
    assert!(
        lines[1].contains("derived-keys: EACCES uid=4242"),
        "{}",
        lines[1]
    );
    assert!(lines[1].contains("binding=machine"), "{}", lines[1]);
    for l in &lines {
        assert!(!l.contains(&hex::encode(&key)), "key material in the log");
    }
}

#[test]
fn eight_concurrent_requests_all_succeed_and_agree() {
    let env = std::sync::Arc::new(KernelEnv::new(""));
    let reference = env.request("user", "db", "32 user").payload();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let env = env.clone();
            std::thread::spawn(move || env.request("user", &format!("db#c{i}"), "32 user"))
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().payload(), reference);
    }
    let tcti = derived_keys::tpm::Tcti::parse(&env.swtpm.tcti()).unwrap();
    // Exactly one object: the broker's primary, shared by all requests...
    let loaded = derived_keys::tpm::Tpm::open(&tcti)
        .unwrap()
        .transient_count()
        .unwrap();
    assert_eq!(loaded, 1);
    // ...and none once the broker has gone.
    env.stop_broker();
    let loaded = derived_keys::tpm::Tpm::open(&tcti)
        .unwrap()
        .transient_count()
        .unwrap();
    assert_eq!(loaded, 0);
}

/// The handler is the one program every request starts: it must stay a
/// static binary without the TPM stack (docs/SPEED.md says why).
#[test]
fn handler_binary_is_small_static_and_without_the_tpm_stack() {
    let exe = env!("CARGO_BIN_EXE_derived-key-helper");
    let elf = std::fs::read(exe).unwrap();
    let u16_at = |o: usize| usize::from(u16::from_le_bytes([elf[o], elf[o + 1]]));
    let phoff = usize::try_from(u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap())).unwrap();
    let (entsize, count) = (u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    let interp = (0..count).any(|i| {
        let o = phoff + i * entsize;
        u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) == PT_INTERP
    });
    if std::path::Path::new("/usr/lib/x86_64-linux-musl/libc.a").is_file() {
        assert!(!interp, "built against musl, the handler must be static");
    }
    let has = |needle: &[u8]| elf.windows(needle.len()).any(|w| w == needle);
    assert!(!has(b"Esys_Initialize") && !has(b"libtss2"));
    assert!(elf.len() < 2 << 20, "{} bytes", elf.len());

    // By hand: usage errors exit 2 without touching any key; --version works.
    let run = |args: &[&str]| std::process::Command::new(exe).args(args).output().unwrap();
    assert_eq!(run(&[]).status.code(), Some(2));
    assert_eq!(run(&["1", "2"]).status.code(), Some(2));
    assert_eq!(run(&["x", "0", "0"]).status.code(), Some(2));
    let v = run(&["--version"]);
    assert_eq!(v.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&v.stderr).starts_with("derived-key-helper "));
}

/// The handler never executes CPUID. On a VM the instruction traps to the
/// hypervisor, tens of microseconds on this one: a crate that probes the
/// CPU at first use (RustCrypto's `chacha20`, tried for an answer's seal in
/// session 11) made every request 3 to 4% slower (docs/SPEED.md). The
/// disassembly is binutils' objdump (scripts/install-deps.sh installs it).
#[test]
fn the_handler_never_executes_cpuid() {
    let exe = env!("CARGO_BIN_EXE_derived-key-helper");
    let out = std::process::Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", exe])
        .output()
        .expect("objdump (binutils)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // The disassembly is there, and has none.
    assert!(text.contains("<main>:"), "no main in the disassembly");
    let cpuid: Vec<&str> = text
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("cpuid"))
        .collect();
    assert!(cpuid.is_empty(), "{cpuid:?}");
}

/// `csum` is bound to the file the process runs, not to a path name: the
/// two spoofs of an IMA list matched by path (issue 19). The running file
/// is a copy of keyctl with one byte appended; under both spoofs its path
/// name says the original, and the key must be the copy's. Run with the
/// deprecated `csum_source = "ima"`, which now hashes the running file.
/// Before, that setting looked the path name up in IMA's measurement list:
/// the original's digest where IMA runs, EACCES on this kernel (no IMA).
#[test]
fn csum_binds_the_running_file_not_its_path_name() {
    let env = KernelEnv::new("[bindings]\ncsum_source = \"ima\"\n");
    let dir = env.dir.path();
    let copy = dir.join("keyctl-plus-one");
    common::copy_executable("/usr/bin/keyctl", &copy, "x");
    let copy_str = copy.to_str().unwrap();
    let original = env.request("user", "app", "32 csum").payload();
    let own = env
        .request_with(&[], copy_str, "user", "app", "32 csum")
        .payload();
    assert_ne!(own, original, "one byte more is another program");

    // 1. A private mount namespace: the copy mounted over /usr/bin/keyctl,
    //    so the requester's exe path is the host's path of the original.
    let bind = format!("mount --bind {copy_str} /usr/bin/keyctl && exec \"$@\"");
    let wrapper = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        &bind,
        "sh",
    ];
    let in_ns = env.request_with(&wrapper, "/usr/bin/keyctl", "user", "app", "32 csum");
    assert_eq!(in_ns.payload(), own, "mount namespace: the copy's key");

    // 2. A file literally named `p (deleted)` holding the original, and
    //    the copy run as `p` after `p` is unlinked: the requester's exe
    //    link reads `<dir>/p (deleted)`, the other file's name.
    let p = dir.join("p");
    common::copy_executable(copy_str, &p, "");
    common::copy_executable("/usr/bin/keyctl", &dir.join("p (deleted)"), "");
    let exec_unlinked = "exec 3<\"$0\" && rm -f \"$0\" && exec \"$@\"";
    let p_str = p.to_str().unwrap();
    let wrapper = ["bash", "-c", exec_unlinked, p_str];
    let deleted = env.request_with(&wrapper, "/proc/self/fd/3", "user", "app", "32 csum");
    assert!(!p.exists());
    assert_eq!(deleted.payload(), own, "unlinked binary: the copy's key");
    // The file named like the unlinked one still has the original's key.
    let named = dir.join("p (deleted)");
    let by_name = env
        .request_with(&[], named.to_str().unwrap(), "user", "app", "32 csum")
        .payload();
    assert_eq!(by_name, original);
}

/// Through the kernel, a `user` key is exactly derivation v1's purpose 01
/// for its request (HKDF over the TPM's PRK), and the `logon` key of the
/// same name and callout is served and stays unreadable. Comparing the two
/// payloads needs a consumer of `logon` keys that shows them, which keyctl
/// and encrypted keys are not: the pipeline's unit test
/// (`a_logon_key_is_not_the_user_key_of_the_same_request`) compares them.
#[test]
fn user_keys_stay_v1_and_logon_keys_stay_in_the_kernel() {
    use derived_keys::derive::{self, Input, Purpose, Subject};
    let env = KernelEnv::new("");
    let user = env.request("user", "disk", "64 user").payload();
    match env.request("logon", "disk", "64 user") {
        Got::Unreadable { read_errno, .. } => assert_eq!(read_errno, libc::EOPNOTSUPP),
        other => panic!("{other:?}"),
    }
    env.stop_broker(); // swtpm serves one client at a time
    let input = Input {
        purpose: Purpose::Symmetric(64),
        name: "disk",
        subject: Subject::User { uid: 0 },
        account: None,
        client: None,
        epoch: 0,
    };
    let tcti = derived_keys::tpm::Tcti::parse(&env.swtpm.tcti()).unwrap();
    let prk = derived_keys::tpm::Tpm::open(&tcti)
        .unwrap()
        .prk(None, &input.message())
        .unwrap();
    assert_eq!(user, derive::symmetric_key(&prk, 64).unwrap().as_ref());
}

/// A second rule file with its own prefix and a looser configuration
/// against the same TPM hands out the very keys of the first (neither the
/// prefix nor the configuration is a derivation input), so `dkey status`
/// lists both rules and warns.
#[test]
fn a_second_rule_against_the_same_tpm_shares_its_keys_and_status_warns() {
    let env = KernelEnv::new("");
    let status = |conf: &std::path::Path| -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_dkey"))
            .args(["status", "--json", "--config"])
            .arg(conf)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let s = status(&env.conf);
    assert_eq!(s["key_space_shared"], false, "{s}");
    assert_eq!(s["key_space_rules"].as_array().unwrap().len(), 2, "{s}");

    let loose = env.dir.path().join("loose.conf");
    std::fs::write(
        &loose,
        format!(
            "[tpm]\ntcti = \"{}\"\n[bindings]\nmachine_uids = [0, 4242]\n",
            env.swtpm.tcti()
        ),
    )
    .unwrap();
    let (prefix, rule) = env.rule_for("b", &loose);

    let ours = env.request("user", "db", "32 user").payload();
    let script = format!("keyctl request2 user {prefix}:db '32 user' @s | xargs keyctl pipe | od -An -v -tx1 | tr -d ' \\n'");
    let out = Command::new("keyctl")
        .args(["session", "-", "sh", "-c", &script])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        hex::encode(&ours),
        "another prefix, the same key"
    );

    let s = status(&env.conf);
    assert_eq!(s["key_space_shared"], true, "{s}");
    let files: Vec<&str> = s["key_space_rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["file"].as_str().unwrap())
        .collect();
    assert!(files.contains(&rule.path.to_str().unwrap()), "{files:?}");
    assert_eq!(files.len(), 3, "{files:?}");
    let human = Command::new(env!("CARGO_BIN_EXE_dkey"))
        .args(["status", "--config"])
        .arg(&env.conf)
        .output()
        .unwrap();
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("key space:      WARNING"), "{human}");
    assert!(human.contains(&format!("user {prefix}:*")), "{human}");
}

/// The handler links its authorization key into the keyring the broker's
/// hello names (the broker's view of /proc/keys lists the key's line only
/// then). When the link fails, here because that keyring was revoked, the
/// handler refuses the request itself with EIO: it never sends an upcall
/// whose real line the broker could not see.
#[test]
fn a_request_whose_authorization_key_cannot_be_linked_is_eio() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let env = KernelEnv::new("");
    assert_eq!(env.request("user", "db", "32 user").payload().len(), 32);
    // The broker's hello, as a handler gets it.
    let config = derived_keys::config::Config::load(&env.conf).unwrap();
    let mut s = UnixStream::connect(derived_keys::broker::paths(&config).socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut hello = [0u8; derived_keys_core::wire::MAX_HELLO];
    let mut have = 0;
    let len = loop {
        have += s.read(&mut hello[have..]).unwrap();
        if have >= derived_keys_core::wire::Hello::FIXED {
            let n = derived_keys_core::wire::Hello::len(&hello[..have]).unwrap();
            if have >= n {
                break n;
            }
        }
    };
    let ring = derived_keys_core::wire::Hello::decode(&hello[..len])
        .unwrap()
        .keys_ring;
    drop(s);
    assert_ne!(ring, 0);
    linux_keyutils::Key::from_id(linux_keyutils::KeySerialId::new(ring))
        .revoke()
        .unwrap();
    assert_eq!(env.request("user", "db#2", "32 user"), Got::Err(EIO));
}

/// The handler's program headers: no segment both writable and
/// executable, and where it is linked statically (no interpreter), the two
/// loadable segments build.rs asks for (each more is an area exec maps
/// and a page fault per request).
#[test]
fn the_handler_maps_no_writable_code_and_two_segments() {
    const PT_LOAD: u32 = 1;
    const PT_INTERP: u32 = 3;
    const PF_X: u32 = 1;
    const PF_W: u32 = 2;
    let elf = std::fs::read(env!("CARGO_BIN_EXE_derived-key-helper")).unwrap();
    assert_eq!(&elf[..5], b"\x7fELF\x02", "a 64-bit ELF file");
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (size, count) = (usize::from(u16_at(0x36)), usize::from(u16_at(0x38)));
    let headers: Vec<(u32, u32)> = (0..count)
        .map(|i| (u32_at(phoff + i * size), u32_at(phoff + i * size + 4)))
        .collect();
    let loads: Vec<u32> = headers
        .iter()
        .filter(|(kind, _)| *kind == PT_LOAD)
        .map(|(_, flags)| *flags)
        .collect();
    for flags in &loads {
        assert!(
            flags & (PF_W | PF_X) != PF_W | PF_X,
            "a W+X segment: {headers:x?}"
        );
    }
    if headers.iter().all(|(kind, _)| *kind != PT_INTERP) {
        assert_eq!(loads.len(), 2, "loadable segments: {headers:x?}");
    }
}

/// A rule whose prefix is longer than the protocol carries (64 bytes) is a
/// misconfiguration of the rule file: the handler refuses at once, EINVAL,
/// before it reads the key, the authorization key or the callout. One
/// byte shorter is served.
#[test]
fn a_prefix_longer_than_the_protocol_carries_is_einval() {
    use derived_keys_core::wire::MAX_PREFIX;
    let env = KernelEnv::new("");
    let long = "p".repeat(MAX_PREFIX + 1 - env.prefix.len());
    let (prefix, _long_rule) = env.rule_for(&long, &env.conf);
    assert_eq!(prefix.len(), MAX_PREFIX + 1);
    let ask =
        |prefix: &str| request_described(&[], "keyctl", "user", &format!("{prefix}:db"), "32 user");
    assert_eq!(ask(&prefix).errno(), EINVAL);
    let (prefix, _rule) = env.rule_for(&long[1..], &env.conf);
    assert_eq!(prefix.len(), MAX_PREFIX);
    assert_eq!(ask(&prefix).payload().len(), 32);
}
