//! dkey's key selectors and `--out`, through the real kernel: a selector
//! names the same key as the equivalent description and callout; a
//! malformed one is exit 3 with nothing on stdout; key material goes only
//! to a file dkey creates itself.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use common::KernelEnv;

const DKEY: &str = env!("CARGO_BIN_EXE_dkey");

fn dkey(env: &KernelEnv, args: &[&str]) -> Output {
    Command::new("keyctl")
        .args(["session", "-", DKEY])
        .args(args)
        .args(["--prefix", &env.prefix])
        .output()
        .unwrap()
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
fn a_selector_names_the_key_of_its_description_and_callout() {
    let env = KernelEnv::new("");
    let by_selector = ok(&dkey(
        &env,
        &["pub", "machine:host,epoch=2", "--format", "der"],
    ));
    let by_options = ok(&dkey(
        &env,
        &[
            "pub",
            "host",
            "--binding",
            "machine",
            "--epoch",
            "2",
            "--format",
            "der",
        ],
    ));
    let by_kernel = env
        .request("user", "host:pub", "p256 machine epoch=2")
        .payload();
    assert_eq!(by_selector, by_kernel);
    assert_eq!(by_options, by_kernel);
    // Another epoch, another key: the options are really read.
    let other = ok(&dkey(
        &env,
        &["pub", "machine:host,epoch=3", "--format", "der"],
    ));
    assert_ne!(other, by_kernel);
    // A default binding is `user`.
    let user = ok(&dkey(&env, &["pub", "host,account=a", "--format", "der"]));
    assert_eq!(
        user,
        env.request("user", "host:pub", "p256 user account=a")
            .payload()
    );
}

/// `alg=ed25519` names the Ed25519 key of the same description and
/// callout (spec `ed25519`), another key than the P-256 one.
#[test]
fn an_ed25519_selector_names_the_ed25519_key() {
    let env = KernelEnv::new("");
    let by_selector = ok(&dkey(&env, &["pub", "host,alg=ed25519", "--format", "der"]));
    let by_kernel = env.request("user", "host:pub", "ed25519 user").payload();
    assert_eq!(by_selector, by_kernel);
    assert_eq!(by_selector.len(), 44, "RFC 8410 SubjectPublicKeyInfo");
    let p256 = ok(&dkey(&env, &["pub", "host,alg=p256", "--format", "der"]));
    assert_eq!(p256, env.request("user", "host:pub", "p256 user").payload());
    assert_ne!(p256, by_selector);
    // The options are read for Ed25519 too.
    let machine = ok(&dkey(
        &env,
        &["pub", "machine:host,epoch=2,alg=ed25519", "--format", "der"],
    ));
    assert_eq!(
        machine,
        env.request("user", "host:pub", "ed25519 machine epoch=2")
            .payload()
    );
    assert_ne!(machine, by_selector);
}

#[test]
fn a_malformed_selector_is_exit_3_with_nothing_on_stdout() {
    let env = KernelEnv::new("");
    for bad in [
        "bogus:host",
        "machine:host,epoch=01",
        "host,color=red",
        "host,account=a,account=b",
        "machine:",
        "host,alg=rsa",
        "host,alg=ed25519,alg=ed25519",
        "host,alg=Ed25519",
    ] {
        let out = dkey(&env, &["pub", bad]);
        assert_eq!(out.status.code(), Some(3), "{bad}: {:?}", out);
        assert!(out.stdout.is_empty(), "{bad}: stdout {:?}", out.stdout);
        assert!(!out.stderr.is_empty(), "{bad}: no message");
    }
    // A selector with the options beside it is a usage error (exit 2).
    let out = dkey(&env, &["pub", "machine:host", "--epoch", "2"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty());
}

#[test]
fn key_material_goes_only_to_a_file_dkey_creates() {
    let env = KernelEnv::new("");
    let dir = env.dir.path();
    // A new path: created 0600, holding the key.
    let fresh = dir.join("fresh.key");
    let out = dkey(
        &env,
        &["derive", "db", "--out", fresh.to_str().unwrap(), "--hex"],
    );
    ok(&out);
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let key = std::fs::read_to_string(&fresh).unwrap();
    assert_eq!(key.trim().len(), 64);

    // An existing 0644 file: refused, untouched.
    let existing = dir.join("existing");
    std::fs::write(&existing, b"keep me").unwrap();
    std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = dkey(&env, &["derive", "db", "--out", existing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists"));
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");

    // A symlink planted at the path, to a file or to nowhere: refused,
    // nothing written through it.
    let target = dir.join("target");
    std::fs::write(&target, b"victim").unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let dangling = dir.join("dangling");
    std::os::unix::fs::symlink(dir.join("nowhere"), &dangling).unwrap();
    for l in [&link, &dangling] {
        let out = dkey(&env, &["derive", "db", "--out", l.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
    }
    assert_eq!(std::fs::read(&target).unwrap(), b"victim");
    assert!(!dir.join("nowhere").exists());

    // A request that fails leaves no file behind.
    let failed = dir.join("failed.key");
    let out = dkey(
        &env,
        &[
            "derive",
            "db",
            "--binding",
            "machine",
            "--len",
            "2000",
            "--out",
            failed.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(!failed.exists());
}
