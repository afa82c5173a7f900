//! Ed25519 keys (derivation v1 purpose 04) through the real kernel:
//! request_key(2) from keyctl, the upcall, our rule and handler, a private
//! swtpm. `:pub` is RFC 8410 DER that OpenSSL reads as ED25519; `:sign:`
//! with `msg=` is a 64-byte RFC 8032 signature OpenSSL verifies; every
//! malformed request is EINVAL; dkey and the library serve the same key; it
//! is neither the P-256 key nor the symmetric key of the same request.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::KernelEnv;
use derived_keys::client::KeyRequest;
use derived_keys::request::{Algorithm, Binding};
use sha2::{Digest, Sha256};

const DKEY: &str = env!("CARGO_BIN_EXE_dkey");
/// The RFC 8410 SubjectPublicKeyInfo header of an Ed25519 key.
const SPKI_PREFIX: &str = "302a300506032b6570032100";

/// The description and callout of an Ed25519 signature over `msg`.
fn sign_request(name: &str, msg: &[u8], callout: &str) -> (String, String) {
    (
        format!("{name}:sign:{}", hex::encode(Sha256::digest(msg))),
        format!("{callout} msg={}", hex::encode(msg)),
    )
}

fn openssl(args: &[&str]) -> Output {
    Command::new("openssl").args(args).output().unwrap()
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn pub_is_rfc8410_der_that_openssl_reads_as_ed25519() {
    let env = KernelEnv::new("");
    let der = env.request("user", "git:pub", "ed25519 user").payload();
    assert_eq!(der.len(), 44);
    assert!(hex::encode(&der).starts_with(SPKI_PREFIX), "{der:02x?}");
    let file = common::write(&env.dir.path().join("pub.der"), &der);
    let out = openssl(&[
        "pkey",
        "-pubin",
        "-inform",
        "DER",
        "-in",
        path_str(&file),
        "-text",
        "-noout",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("ED25519 Public-Key"), "{text}");
    // OpenSSL's own re-encoding is the same DER, and it names the 32 bytes.
    let again = openssl(&[
        "pkey",
        "-pubin",
        "-inform",
        "DER",
        "-in",
        path_str(&file),
        "-outform",
        "DER",
    ]);
    assert_eq!(again.stdout, der);
    // The same request again (a new session, the tag no input) is the same key.
    assert_eq!(
        env.request("user", "git:pub#again", "ed25519 user")
            .payload(),
        der
    );
}

#[test]
fn sign_gives_64_bytes_that_openssl_verifies() {
    let env = KernelEnv::new("");
    let dir = env.dir.path();
    let public = env
        .request("user", "git:pub", "ed25519 user epoch=2")
        .payload();
    let pub_file = common::write(&dir.join("pub.der"), &public);
    let long = "a".repeat(128);
    let cases: Vec<(Vec<u8>, String)> = vec![
        (b"hello, ed25519".to_vec(), "ed25519 user epoch=2".into()),
        (vec![0], "ed25519 user epoch=2".into()),
        // The longest message beside the longest options: the callout the
        // kernel, the handler and the wire protocol must all carry.
        (
            (0..1024).map(|i| (i * 7) as u8).collect(),
            "ed25519 user epoch=2".into(),
        ),
        (
            vec![0x5a; 1024],
            format!("ed25519 user account={long} client={long} epoch=4294967295"),
        ),
    ];
    for (i, (msg, callout)) in cases.iter().enumerate() {
        let (desc, callout) = sign_request("git", msg, callout);
        let sig = env.request("user", &desc, &callout).payload();
        assert_eq!(sig.len(), 64, "{callout:.40}");
        let msg_file = common::write(&dir.join(format!("msg{i}")), msg);
        let sig_file = common::write(&dir.join(format!("sig{i}")), &sig);
        let key = if callout.contains("account=") {
            let other = env
                .request(
                    "user",
                    "git:pub",
                    &format!("ed25519 user account={long} client={long} epoch=4294967295"),
                )
                .payload();
            common::write(&dir.join("other.der"), &other)
        } else {
            pub_file.clone()
        };
        let verify = |m: &Path| {
            openssl(&[
                "pkeyutl",
                "-verify",
                "-pubin",
                // OpenSSL 3.0's pkeyutl names the key's format -keyform.
                "-keyform",
                "DER",
                "-inkey",
                path_str(&key),
                "-rawin",
                "-in",
                path_str(m),
                "-sigfile",
                path_str(&sig_file),
            ])
        };
        let out = verify(&msg_file);
        assert!(
            out.status.success(),
            "{callout:.60}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Deterministic: the same message signs to the same bytes.
        let (desc2, callout2) = (format!("{desc}#t{i}"), callout.clone());
        assert_eq!(env.request("user", &desc2, &callout2).payload(), sig);
        // And it is a signature over this message only.
        let mut other = msg.clone();
        other[0] ^= 1;
        let other_file = common::write(&dir.join(format!("other{i}")), &other);
        assert!(!verify(&other_file).status.success(), "{callout:.40}");
    }
}

#[test]
fn every_malformed_ed25519_request_is_einval() {
    let env = KernelEnv::new("");
    let hello = hex::encode(b"hello");
    let hello_digest = hex::encode(Sha256::digest(b"hello"));
    let big = "ab".repeat(1025);
    let big_digest = hex::encode(Sha256::digest([0xab; 1025]));
    let empty_digest = hex::encode(Sha256::digest(b""));
    let cases: Vec<(&str, String, String)> = vec![
        // The digest is not SHA-256 of the message.
        (
            "user",
            format!("g:sign:{}", hex::encode(Sha256::digest(b"hellO"))),
            format!("ed25519 user msg={hello}"),
        ),
        (
            "user",
            format!("g:sign:{}", "00".repeat(32)),
            format!("ed25519 user msg={hello}"),
        ),
        // A message of 0 bytes, of 1025 bytes.
        (
            "user",
            format!("g:sign:{empty_digest}"),
            "ed25519 user msg=".into(),
        ),
        (
            "user",
            format!("g:sign:{big_digest}"),
            format!("ed25519 user msg={big}"),
        ),
        // Odd length, uppercase, not hex.
        (
            "user",
            format!("g:sign:{hello_digest}"),
            format!("ed25519 user msg={}", &hello[..9]),
        ),
        (
            "user",
            format!("g:sign:{hello_digest}"),
            format!("ed25519 user msg={}", hello.to_uppercase()),
        ),
        (
            "user",
            format!("g:sign:{hello_digest}"),
            "ed25519 user msg=68656c6c6z".into(),
        ),
        // msg on a P-256 or symmetric request, or on an Ed25519 :pub.
        (
            "user",
            format!("g:sign:{hello_digest}"),
            format!("p256 user msg={hello}"),
        ),
        ("user", "g:pub".into(), format!("p256 user msg={hello}")),
        ("user", "g:pub".into(), format!("ed25519 user msg={hello}")),
        ("user", "g".into(), format!("32 user msg={hello}")),
        ("logon", "g".into(), format!("32 user msg={hello}")),
        // No msg on an Ed25519 signature.
        (
            "user",
            format!("g:sign:{hello_digest}"),
            "ed25519 user".into(),
        ),
        // logon is for symmetric keys only.
        ("logon", "g:pub".into(), "ed25519 user".into()),
        (
            "logon",
            format!("g:sign:{hello_digest}"),
            format!("ed25519 user msg={hello}"),
        ),
        // ed25519 is no length.
        ("user", "g".into(), "ed25519 user".into()),
    ];
    for (i, (ty, desc, callout)) in cases.iter().enumerate() {
        // A tag of its own: no negative result cached for another case.
        let got = env.request(ty, &format!("{desc}#c{i}"), callout);
        assert_eq!(
            got.errno(),
            libc::EINVAL,
            "{ty} {desc} {:.60}: {got:?}",
            callout
        );
    }
    // The well-formed neighbours of those cases are granted.
    let ok = env
        .request(
            "user",
            &format!("g:sign:{hello_digest}"),
            &format!("ed25519 user msg={hello}"),
        )
        .payload();
    assert_eq!(ok.len(), 64);
}

#[test]
fn p256_ed25519_and_symmetric_keys_of_one_request_differ() {
    let env = KernelEnv::new("");
    for callout in ["user", "machine", "user account=a epoch=7"] {
        let p256 = env
            .request("user", "k:pub", &format!("p256 {callout}"))
            .payload();
        let ed = env
            .request("user", "k:pub", &format!("ed25519 {callout}"))
            .payload();
        assert_eq!((p256.len(), ed.len()), (91, 44), "{callout}");
        let ed_key: [u8; 32] = ed[12..].try_into().unwrap();
        // The 32-byte symmetric key of the same name and callout, used as
        // an RFC 8032 seed, is another key pair.
        let sym: [u8; 32] = env
            .request("user", "k", &format!("32 {callout}"))
            .payload()
            .try_into()
            .unwrap();
        let as_seed = ed25519_dalek::SigningKey::from_bytes(&sym);
        assert_ne!(as_seed.verifying_key().to_bytes(), ed_key, "{callout}");
        assert!(!p256.windows(32).any(|w| w == ed_key), "{callout}");
    }
    // Another epoch, another Ed25519 key.
    assert_ne!(
        env.request("user", "k:pub", "ed25519 user").payload(),
        env.request("user", "k:pub", "ed25519 user epoch=1")
            .payload()
    );
}

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
fn dkey_serves_the_same_key_by_selector_and_by_alg() {
    let env = KernelEnv::new("");
    let dir = env.dir.path();
    let kernel = env
        .request("user", "git:pub", "ed25519 machine epoch=2")
        .payload();
    let by_selector = ok(&dkey(
        &env,
        &["pub", "machine:git,epoch=2,alg=ed25519", "--format", "der"],
    ));
    let by_alg = ok(&dkey(
        &env,
        &[
            "pub",
            "git",
            "--binding",
            "machine",
            "--epoch",
            "2",
            "--alg",
            "ed25519",
            "--format",
            "der",
        ],
    ));
    assert_eq!(by_selector, kernel);
    assert_eq!(by_alg, kernel);
    // PEM that OpenSSL reads.
    let pem = ok(&dkey(&env, &["pub", "machine:git,epoch=2,alg=ed25519"]));
    let pem_file = common::write(&dir.join("pub.pem"), &pem);
    let out = openssl(&[
        "pkey",
        "-pubin",
        "-in",
        path_str(&pem_file),
        "-outform",
        "DER",
    ]);
    assert_eq!(out.stdout, kernel, "{}", String::from_utf8_lossy(&pem));

    // dkey sign --file signs the file's bytes; it is the kernel's signature.
    let msg = b"a message for dkey";
    let msg_file = common::write(&dir.join("msg"), msg);
    let sig = ok(&dkey(
        &env,
        &[
            "sign",
            "machine:git,epoch=2,alg=ed25519",
            "--file",
            path_str(&msg_file),
        ],
    ));
    let (desc, callout) = sign_request("git", msg, "ed25519 machine epoch=2");
    assert_eq!(sig, env.request("user", &desc, &callout).payload());
    let sig_file = common::write(&dir.join("sig"), &sig);
    let verify = |key: &Path, m: &Path, extra: &[&str]| {
        let mut args = vec![
            "verify",
            "--pub",
            path_str(key),
            "--file",
            path_str(m),
            "--sig",
            path_str(&sig_file),
        ];
        args.extend_from_slice(extra);
        Command::new(DKEY).args(args).output().unwrap()
    };
    // verify reads the algorithm from the key file, PEM or DER.
    let der_file = common::write(&dir.join("pub.der"), &kernel);
    for key in [&der_file, &pem_file] {
        let out = verify(key, &msg_file, &[]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert_eq!(ok(&out), b"signature ok\n");
        assert_eq!(
            verify(key, &msg_file, &["--alg", "ed25519"]).status.code(),
            Some(0)
        );
    }
    let other = common::write(&dir.join("other"), b"another message");
    assert_eq!(verify(&der_file, &other, &[]).status.code(), Some(8));
    // --alg p256 against an Ed25519 key file is a usage error.
    let out = verify(&der_file, &msg_file, &["--alg", "p256"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // Usage errors (exit 2, nothing on stdout): a digest for Ed25519,
    // --format der, a selector beside --alg.
    let digest = hex::encode(Sha256::digest(msg));
    for args in [
        vec!["sign", "git,alg=ed25519", "--digest", &digest],
        vec!["sign", "git", "--alg", "ed25519", "--digest", &digest],
        vec![
            "sign",
            "git,alg=ed25519",
            "--file",
            path_str(&msg_file),
            "--format",
            "der",
        ],
        vec!["pub", "machine:git", "--alg", "ed25519"],
        vec!["derive", "git", "--alg", "ed25519"],
    ] {
        let out = dkey(&env, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    // A message the callout cannot carry: EINVAL, exit 3.
    let big = common::write(&dir.join("big"), &[1; 1025]);
    let out = dkey(&env, &["sign", "git,alg=ed25519", "--file", path_str(&big)]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(out.stdout.is_empty());
    // P-256 is as before: DER over the file's SHA-256, and another key.
    let p256 = ok(&dkey(
        &env,
        &["pub", "machine:git,epoch=2", "--format", "der"],
    ));
    assert_ne!(p256, kernel);
    let p256_sig = ok(&dkey(
        &env,
        &["sign", "machine:git,epoch=2", "--file", path_str(&msg_file)],
    ));
    assert_eq!(p256_sig[0], 0x30, "DER ECDSA-Sig-Value");
}

#[test]
fn the_library_signs_messages_with_ed25519() {
    let env = KernelEnv::new("");
    let r = KeyRequest::new("lib")
        .unwrap()
        .binding(Binding::User)
        .epoch(4)
        .alg(Algorithm::Ed25519)
        .prefix(&env.prefix);
    let spki = r.public_key().unwrap();
    assert_eq!(
        spki,
        env.request("user", "lib:pub", "ed25519 user epoch=4")
            .payload()
    );
    let sig = r.sign_message(b"library message").unwrap();
    assert_eq!(sig.len(), 64);
    assert!(derived_keys::client::verify_message(
        &spki,
        b"library message",
        &sig
    ));
    assert!(!derived_keys::client::verify_message(&spki, b"other", &sig));
    assert_eq!(r.sign_digest(&[0; 32]).unwrap_err().errno(), libc::EINVAL);
    // The P-256 key of the same request is another key, verified by digest.
    let p = r.clone().alg(Algorithm::P256);
    let p_spki = p.public_key().unwrap();
    assert_ne!(p_spki, spki);
    let p_sig = p.sign_message(b"library message").unwrap();
    assert!(derived_keys::client::verify_message(
        &p_spki,
        b"library message",
        &p_sig
    ));
}
