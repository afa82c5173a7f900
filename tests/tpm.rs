//! Derivation v1 against a real TPM 2.0 (swtpm), cross-checked with tpm2-tools.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use common::{scratch_dir, Swtpm};
use derived_keys::derive::{self, Input, P256Key, Purpose, Subject, PRIMARY_UNIQUE};
use derived_keys::tpm::{Tcti, Tpm, TpmError};

fn input() -> Input<'static> {
    Input {
        purpose: Purpose::Symmetric(32),
        name: "db",
        subject: Subject::Path {
            uid: 1000,
            path: b"/usr/bin/app",
        },
        account: Some("alice"),
        client: Some("web"),
        epoch: 0,
    }
}

fn open(tpm: &Swtpm) -> Tpm {
    Tpm::open(&Tcti::parse(&tpm.tcti()).unwrap()).unwrap()
}

fn sym_key(tpm: &mut Tpm, i: &Input<'_>) -> Vec<u8> {
    let prk = tpm.prk(None, &i.message()).unwrap();
    let Purpose::Symmetric(n) = i.purpose else {
        return P256Key::from_prk(&prk).unwrap().spki_der().unwrap();
    };
    derive::symmetric_key(&prk, n.into())
        .unwrap()
        .as_ref()
        .to_vec()
}

#[test]
fn prf_output_matches_tpm2_tools_following_derivation_md() {
    let swtpm = Swtpm::start();
    let dir = scratch_dir();
    let msg = input().message();
    let ours = open(&swtpm).prk(None, &msg).unwrap().as_bytes().to_vec();

    // DERIVATION.md, "The TPM step", with tpm2-tools: -u takes a TPM2B
    // whose size field is little-endian.
    let mut unique = (PRIMARY_UNIQUE.len() as u16).to_le_bytes().to_vec();
    unique.extend_from_slice(PRIMARY_UNIQUE);
    let u = common::write(&dir.path().join("unique.bin"), &unique);
    let m = common::write(&dir.path().join("msg.bin"), &msg);
    let ctx = dir.path().join("primary.ctx");
    let out = dir.path().join("prk.bin");
    swtpm.tool(&[
        "tpm2_createprimary",
        "-C",
        "o",
        "-G",
        "hmac",
        "-g",
        "sha256",
        "-a",
        "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|sign",
        "-u",
        u.to_str().unwrap(),
        "-c",
        ctx.to_str().unwrap(),
    ]);
    swtpm.tool(&[
        "tpm2_hmac",
        "-c",
        ctx.to_str().unwrap(),
        "-g",
        "sha256",
        "-o",
        out.to_str().unwrap(),
        m.to_str().unwrap(),
    ]);
    swtpm.tool(&["tpm2_flushcontext", "-t"]);
    assert_eq!(hex::encode(std::fs::read(out).unwrap()), hex::encode(ours));
}

/// Set in the child this test runs: the TCTI of the parent's swtpm.
const CHILD_TCTI: &str = "DK_CHILD_TCTI";

/// One test in two roles: run plainly, it derives a key, then runs this
/// test binary again, filtered to this very test, with the child's
/// environment; the child derives the key in its own process and prints
/// it. A child that is skipped (the filter matched nothing), fails or
/// prints no key fails the parent.
#[test]
fn same_inputs_same_key_across_processes() {
    if let Ok(tcti) = std::env::var(CHILD_TCTI) {
        let mut tpm = Tpm::open(&Tcti::parse(&tcti).unwrap()).unwrap();
        println!("KEY={}", hex::encode(sym_key(&mut tpm, &input())));
        return;
    }
    let swtpm = Swtpm::start();
    let here = sym_key(&mut open(&swtpm), &input());
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "same_inputs_same_key_across_processes",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_TCTI, swtpm.tcti())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the child failed: {stdout}{stderr}");
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "the child ran no test: {stdout}"
    );
    let keys: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_once("KEY=").map(|(_, k)| k.trim()))
        .collect();
    assert_eq!(keys, [hex::encode(&here)], "{stdout}");
    // And a fresh connection in this process too.
    assert_eq!(sym_key(&mut open(&swtpm), &input()), here);
}

/// What a variant derives: the key of its length, or the P-256 scalar.
fn output(tpm: &mut Tpm, i: &Input<'_>) -> (Vec<u8>, Vec<u8>) {
    let prk = tpm.prk(None, &i.message()).unwrap();
    let out = match i.purpose {
        Purpose::Symmetric(n) => derive::symmetric_key(&prk, n.into())
            .unwrap()
            .as_ref()
            .to_vec(),
        Purpose::KernelSymmetric(n) => derive::kernel_symmetric_key(&prk, n.into())
            .unwrap()
            .as_ref()
            .to_vec(),
        Purpose::P256 => P256Key::from_prk(&prk)
            .unwrap()
            .secret_scalar()
            .unwrap()
            .as_ref()
            .to_vec(),
        // Its public key: the seed is private to derive.rs.
        Purpose::Ed25519 => derive::Ed25519Key::from_prk(&prk)
            .unwrap()
            .public_key()
            .unwrap()
            .to_vec(),
    };
    (prk.as_bytes().to_vec(), out)
}

/// Like with like: two outputs over the length they share (a 31-byte key
/// that is the first 31 bytes of the 32-byte one would be no new key).
fn same_prefix(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().min(b.len());
    a[..n] == b[..n]
}

#[test]
fn every_input_changes_the_key_and_clear_changes_all() {
    let swtpm = Swtpm::start();
    let mut tpm = open(&swtpm);
    let base = input();
    let digest = [9u8; 32];
    let variants = [
        base,
        Input {
            purpose: Purpose::Symmetric(31),
            ..base
        },
        Input {
            purpose: Purpose::P256,
            ..base
        },
        Input {
            purpose: Purpose::KernelSymmetric(32),
            ..base
        },
        Input {
            name: "db2",
            ..base
        },
        Input {
            subject: Subject::Path {
                uid: 1001,
                path: b"/usr/bin/app",
            },
            ..base
        },
        Input {
            subject: Subject::Path {
                uid: 1000,
                path: b"/usr/bin/app2",
            },
            ..base
        },
        Input {
            subject: Subject::Csum { uid: 1000, digest },
            ..base
        },
        Input {
            subject: Subject::User { uid: 1000 },
            ..base
        },
        Input {
            subject: Subject::Machine,
            ..base
        },
        Input {
            account: None,
            ..base
        },
        Input {
            account: Some("bob"),
            ..base
        },
        Input {
            client: None,
            ..base
        },
        Input { epoch: 1, ..base },
    ];
    let before: Vec<(Vec<u8>, Vec<u8>)> = variants.iter().map(|i| output(&mut tpm, i)).collect();
    assert_eq!(before[0].1.len(), 32);
    assert_eq!(before[1].1.len(), 31);
    assert_eq!(before[2].1.len(), 32);
    assert_eq!(before[3].1.len(), 32);
    for (i, (prk_a, a)) in before.iter().enumerate() {
        for (j, (prk_b, b)) in before.iter().enumerate().skip(i + 1) {
            // Every input reaches the TPM: 32 bytes against 32 bytes.
            assert_ne!(prk_a, prk_b, "variants {i} and {j} gave the same PRK");
            assert!(!same_prefix(a, b), "variants {i} and {j} gave the same key");
        }
    }
    drop(tpm);

    swtpm.clear();
    let mut tpm = open(&swtpm);
    for (i, v) in variants.iter().enumerate() {
        let (prk, key) = output(&mut tpm, v);
        assert_eq!(key.len(), before[i].1.len());
        assert_ne!(
            prk, before[i].0,
            "variant {i}: TPM2_Clear must change every PRK"
        );
        assert!(
            !same_prefix(&key, &before[i].1),
            "variant {i}: TPM2_Clear must change every key"
        );
    }
}

#[test]
fn hundred_derivations_leave_no_object_loaded() {
    let swtpm = Swtpm::start();
    let mut tpm = open(&swtpm);
    let first = sym_key(&mut tpm, &input());
    for i in 0..100u32 {
        let k = sym_key(
            &mut tpm,
            &Input {
                epoch: i % 2,
                ..input()
            },
        );
        if i % 2 == 0 {
            assert_eq!(k, first);
        }
    }
    assert_eq!(tpm.transient_count().unwrap(), 0);
    let caps = swtpm.tool(&["tpm2_getcap", "handles-transient"]);
    assert!(
        caps.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&caps.stdout)
    );
}

#[test]
fn full_object_memory_is_recovered_from() {
    let swtpm = Swtpm::start();
    let dir = scratch_dir();
    let reference = sym_key(&mut open(&swtpm), &input());
    // A crashed client's leftovers: fill all three slots of swtpm.
    for i in 0..3 {
        let ctx = dir.path().join(format!("o{i}.ctx"));
        swtpm.tool(&[
            "tpm2_createprimary",
            "-C",
            "o",
            "-G",
            "ecc",
            "-c",
            ctx.to_str().unwrap(),
        ]);
    }
    let mut tpm = open(&swtpm);
    assert_eq!(tpm.transient_count().unwrap(), 3);
    assert_eq!(sym_key(&mut tpm, &input()), reference);
    assert_eq!(tpm.transient_count().unwrap(), 0);
}

#[test]
fn restart_keeps_keys_and_stopped_tpm_is_unreachable() {
    let mut swtpm = Swtpm::start();
    let before = sym_key(&mut open(&swtpm), &input());
    swtpm.stop();
    // The swtpm TCTI connects when opened; a device TCTI opens the node.
    let err = Tpm::open(&Tcti::parse(&swtpm.tcti()).unwrap())
        .and_then(|mut t| t.prk(None, &input().message()).map(|_| ()))
        .unwrap_err();
    assert!(matches!(err, TpmError::Unreachable { .. }), "{err:?}");
    swtpm.restart();
    assert_eq!(sym_key(&mut open(&swtpm), &input()), before);
}

#[test]
fn owner_password_is_used_and_a_wrong_one_is_typed() {
    let swtpm = Swtpm::start();
    let plain = sym_key(&mut open(&swtpm), &input());
    swtpm.tool(&["tpm2_changeauth", "-c", "o", "s3cret"]);
    let pw = derived_keys::secret::SecretBuf::copy_from(b"s3cret").unwrap();
    let mut tpm = open(&swtpm);
    let with_pw = tpm.prk(Some(&pw), &input().message()).unwrap();
    let key = derive::symmetric_key(&with_pw, 32).unwrap();
    assert_eq!(
        key.as_ref(),
        plain.as_slice(),
        "the password authorizes; it is not an input"
    );
    let wrong = derived_keys::secret::SecretBuf::copy_from(b"wrong").unwrap();
    let err = tpm.prk(Some(&wrong), &input().message()).err().unwrap();
    assert!(matches!(err, TpmError::OwnerAuth { .. }), "{err:?}");
    assert_eq!(tpm.transient_count().unwrap(), 0);
    // The session that carried the wrong password: a refused command does
    // not end it, so it is flushed, not forgotten (nor left to a drop).
    assert_eq!(tpm.session_count().unwrap(), 0);
}

/// The broker gives libtss2-esys one OpenSSL library context instead of a
/// new one per hash, HMAC and nonce (src/bin/derived-keys-broker/libctx.rs,
/// ~4 ms per TPM2_HMAC otherwise): the dynamic linker must bind the TPM
/// stack's calls to the broker's own functions.
#[test]
fn the_broker_gives_the_tpm_stack_its_own_library_context() {
    let dir = scratch_dir();
    let log = dir.path().join("ld");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_derived-keys-broker"))
        .arg("--version")
        .env("LD_BIND_NOW", "1")
        .env("LD_DEBUG", "bindings")
        .env("LD_DEBUG_OUTPUT", &log)
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut text = String::new();
    for e in std::fs::read_dir(dir.path()).unwrap() {
        text += &std::fs::read_to_string(e.unwrap().path()).unwrap();
    }
    // libcrypto's own child contexts pass through the broker's wrapper of
    // OSSL_LIB_CTX_new_from_dispatch, which hands them fresh contexts.
    for (lib, sym) in [
        ("libtss2-esys", "OSSL_LIB_CTX_new"),
        ("libtss2-esys", "OSSL_LIB_CTX_free"),
        ("libcrypto", "OSSL_LIB_CTX_new_from_dispatch"),
    ] {
        let bound = text.lines().any(|l| {
            l.contains("binding file")
                && l.contains(lib)
                && l.contains("derived-keys-broker")
                && l.contains(&format!("`{sym}'"))
        });
        assert!(bound, "{lib}'s {sym} is not the broker's:\n{text}");
    }
}

/// Session handle numbers are reused as soon as a session ends. The salt
/// key's one-command session is ended by the TPM itself; a connection that
/// still counted it as open would flush its number when dropped, and with
/// it whichever session holds that number then: here another broker's.
#[test]
fn closing_a_connection_leaves_other_clients_sessions_alone() {
    let swtpm = Swtpm::start();
    let mut a = open(&swtpm);
    let pa = a.load_primary(None).unwrap();
    a.flush_primary(pa).unwrap();
    let mut b = open(&swtpm);
    let pb = b.load_primary(None).unwrap();
    drop(a);
    let prk = b.prk_with(&pb, &input().message()).map(|_| ());
    assert!(
        prk.is_ok(),
        "the other connection's session survives: {prk:?}"
    );
    b.flush_primary(pb).unwrap();
}
