//! dkey through the real kernel, against a private swtpm and rule. Each
//! invocation runs in its own session keyring (`keyctl session -`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use std::process::{Command, Output};

use common::{Got, KernelEnv};

const DKEY: &str = env!("CARGO_BIN_EXE_dkey");

fn dkey(env: &KernelEnv, args: &[&str]) -> Output {
    dkey_as(env, None, args)
}

/// A copy of dkey that every uid can run, in the environment's scratch
/// directory (which others may enter): the build tree may sit under a
/// 0700 directory (a clone under /root, or made by mktemp -d) that other
/// uids cannot enter.
fn dkey_for_all(env: &KernelEnv) -> String {
    use std::os::unix::fs::PermissionsExt;
    let copy = env.dir.path().join("dkey");
    if !copy.exists() {
        common::copy_executable(DKEY, &copy, "");
    }
    let mode = std::fs::metadata(env.dir.path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o001, 0o001, "others can enter {:?}", env.dir.path());
    copy.to_str().unwrap().to_owned()
}

fn dkey_as(env: &KernelEnv, uid: Option<u32>, args: &[&str]) -> Output {
    let mut cmd = Vec::<String>::new();
    let exe = match uid {
        None => DKEY.to_owned(),
        Some(u) => {
            cmd.extend([
                "setpriv".into(),
                format!("--reuid={u}"),
                format!("--regid={u}"),
                "--clear-groups".into(),
            ]);
            dkey_for_all(env)
        }
    };
    cmd.extend(["keyctl".into(), "session".into(), "-".into(), exe]);
    cmd.extend(args.iter().map(|s| s.to_string()));
    // Key commands take the test prefix; others do not know it.
    if matches!(args[0], "derive" | "pub" | "sign") {
        cmd.extend(["--prefix".into(), env.prefix.clone()]);
    }
    Command::new(&cmd[0]).args(&cmd[1..]).output().unwrap()
}

fn ok(out: &Output) -> Vec<u8> {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout.clone()
}

#[test]
fn derive_matches_keyctl_and_leaves_nothing_by_default_on_stdout() {
    let env = KernelEnv::new("");
    let via_keyctl = env.request("user", "db", "32 user").payload();
    let hex_out = ok(&dkey(&env, &["derive", "db", "--stdout", "--hex"]));
    assert_eq!(
        String::from_utf8(hex_out).unwrap().trim(),
        hex::encode(&via_keyctl)
    );
    let raw = ok(&dkey(&env, &["derive", "db", "--stdout"]));
    assert_eq!(raw, via_keyctl);
    // Without --out/--stdout, no key bytes are printed: only serial and description.
    let kept = String::from_utf8(ok(&dkey(&env, &["derive", "db"]))).unwrap();
    let (serial, desc) = kept.trim().split_once(' ').unwrap();
    serial.parse::<i32>().unwrap();
    assert!(
        desc.starts_with(&format!("user:{}:db#", env.prefix)),
        "{kept}"
    );
    assert!(!kept.contains(&hex::encode(&via_keyctl)));
}

#[test]
fn derive_to_a_file_is_private_and_logon_stays_in_the_kernel() {
    let env = KernelEnv::new("");
    let file = env.dir.path().join("key.bin");
    ok(&dkey(
        &env,
        &[
            "derive",
            "disk",
            "--len",
            "64",
            "--binding",
            "machine",
            "--out",
            file.to_str().unwrap(),
        ],
    ));
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(bytes, env.request("user", "disk", "64 machine").payload());
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let logon = String::from_utf8(ok(&dkey(
        &env,
        &["derive", "disk", "--type", "logon", "--binding", "machine"],
    )))
    .unwrap();
    assert!(
        logon.contains(&format!("logon:{}:disk#", env.prefix)),
        "{logon}"
    );
    let refused = dkey(&env, &["derive", "disk", "--type", "logon", "--stdout"]);
    assert_eq!(refused.status.code(), Some(2));
}

#[test]
fn pub_sign_verify_with_dkey_and_openssl() {
    let env = KernelEnv::new("");
    let d = env.dir.path();
    let p = |n: &str| d.join(n).to_str().unwrap().to_owned();
    std::fs::write(d.join("msg"), b"firmware image\n").unwrap();
    ok(&dkey(&env, &["pub", "fw", "--out", &p("fw.pem")]));
    ok(&dkey(
        &env,
        &["pub", "fw", "--format", "der", "--out", &p("fw.der")],
    ));
    assert!(std::fs::read_to_string(d.join("fw.pem"))
        .unwrap()
        .starts_with("-----BEGIN PUBLIC KEY-----"));
    assert_eq!(
        std::fs::read(d.join("fw.der")).unwrap(),
        env.request("user", "fw:pub", "p256 user").payload()
    );
    ok(&dkey(
        &env,
        &["sign", "fw", "--file", &p("msg"), "--out", &p("sig.der")],
    ));
    ok(&dkey(
        &env,
        &[
            "sign",
            "fw",
            "--file",
            &p("msg"),
            "--format",
            "raw",
            "--out",
            &p("sig.raw"),
        ],
    ));
    assert_eq!(std::fs::read(d.join("sig.raw")).unwrap().len(), 64);
    let verified = Command::new("openssl")
        .args([
            "dgst",
            "-sha256",
            "-verify",
            &p("fw.pem"),
            "-signature",
            &p("sig.der"),
            &p("msg"),
        ])
        .output()
        .unwrap();
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    for sig in ["sig.der", "sig.raw"] {
        ok(&dkey(
            &env,
            &[
                "verify",
                "--pub",
                &p("fw.der"),
                "--file",
                &p("msg"),
                "--sig",
                &p(sig),
            ],
        ));
    }
    // A digest given directly signs the same thing.
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"firmware image\n"));
    ok(&dkey(
        &env,
        &["sign", "fw", "--digest", &digest, "--out", &p("sig2.der")],
    ));
    ok(&dkey(
        &env,
        &[
            "verify",
            "--pub",
            &p("fw.pem"),
            "--digest",
            &digest,
            "--sig",
            &p("sig2.der"),
        ],
    ));
    std::fs::write(d.join("msg"), b"tampered\n").unwrap();
    let bad = dkey(
        &env,
        &[
            "verify",
            "--pub",
            &p("fw.pem"),
            "--file",
            &p("msg"),
            "--sig",
            &p("sig.der"),
        ],
    );
    assert_eq!(bad.status.code(), Some(8));
}

#[test]
fn exit_codes_follow_the_contract_errnos() {
    let mut env = KernelEnv::new("");
    let code = |o: Output| o.status.code();
    assert_eq!(
        code(dkey(&env, &["derive", "bad/name", "--stdout"])),
        Some(3)
    );
    assert_eq!(
        code(dkey_as(
            &env,
            Some(4242),
            &["derive", "host", "--binding", "machine", "--stdout"]
        )),
        Some(4)
    );
    let denied = dkey_as(
        &env,
        Some(4242),
        &["derive", "host", "--binding", "machine", "--stdout"],
    );
    assert!(String::from_utf8_lossy(&denied.stderr).contains("refused by policy (EACCES)"));
    env.swtpm.stop();
    let out = dkey(&env, &["derive", "db", "--stdout"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("dkey status"),
        "says what to do"
    );
    env.swtpm.restart();
    assert!(matches!(
        env.request("user", "db", "32 user"),
        Got::Key { .. }
    ));
    assert_eq!(
        code(dkey(&env, &["derive", "db", "--len", "0", "--stdout"])),
        Some(3)
    );
    assert_eq!(code(dkey(&env, &["sign", "x", "--digest", "zz"])), Some(2));
}

#[test]
fn status_json_describes_the_tpm_and_secret_memory() {
    let env = KernelEnv::new("");
    let out = Command::new(DKEY)
        .args(["status", "--json", "--config", env.conf.to_str().unwrap()])
        .output()
        .unwrap();
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["config_valid"], true);
    assert_eq!(s["tpm_reachable"], true);
    assert_eq!(s["tpm_kind"], "software");
    assert_eq!(s["derivation_ok"], true);
    assert!(s["protection"]
        .as_str()
        .unwrap()
        .starts_with("software only"));
    assert_eq!(s["secret_memory"], "memfd_secret");
    assert_eq!(s["ima_available"], false);
    assert!(s["handler_path"]
        .as_str()
        .unwrap()
        .ends_with("derived-key-helper"));
    // No request yet: no broker. After one, status names it.
    assert_eq!(s["broker_pid"], serde_json::Value::Null);
    assert!(matches!(
        env.request("user", "db", "32 user"),
        Got::Key { .. }
    ));
    let out = Command::new(DKEY)
        .args(["status", "--json", "--config", env.conf.to_str().unwrap()])
        .output()
        .unwrap();
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(s["broker_pid"].as_u64().is_some_and(|p| p > 1), "{s}");
    // Human form names the same things.
    let human = Command::new(DKEY)
        .args(["status", "--config", env.conf.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("software TPM")
            && text.contains("secret memory:  memfd_secret")
            && text.contains("running, pid "),
        "{text}"
    );

    // A configuration that does not parse is reported with the key's name.
    // (Stop the broker first: once the file changes, nothing can name it.)
    env.stop_broker();
    env.write_conf("[tpm]\ntcit = \"x\"\n");
    let out = Command::new(DKEY)
        .args(["status", "--json", "--config", env.conf.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(9));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["config_valid"], false);
    assert!(s["config_error"].as_str().unwrap().contains("tcit"));
}
