//! Enrollment through the real kernel and a CA nobody here wrote
//! (openssl): a CSR signed by a derived key that `openssl req -verify`
//! accepts and an openssl CA certifies, and a self-signed certificate that
//! `openssl verify -check_ss_sig` accepts against itself, both for the keyring's key.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::KernelEnv;

const DKEY: &str = env!("CARGO_BIN_EXE_dkey");

fn dkey(env: &KernelEnv, args: &[&str]) -> Output {
    Command::new(DKEY)
        .args(args)
        .args(["--prefix", &env.prefix])
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn openssl(args: &[&str], dir: &Path) -> String {
    ok(Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap())
}

/// `openssl req -verify` exits 0 even when the signature is bad: only its
/// message (on stderr) tells.
fn assert_csr_signature_verifies(csr: &str, dir: &Path) {
    let out = Command::new("openssl")
        .args(["req", "-in", csr, "-noout", "-verify"])
        .current_dir(dir)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.contains("self-signature verify OK"),
        "{said}"
    );
}

/// `openssl verify -CAfile c c` checks a trust anchor's own signature only
/// with -check_ss_sig.
fn assert_self_signed_verifies(cert: &str, dir: &Path) {
    let v = openssl(&["verify", "-check_ss_sig", "-CAfile", cert, cert], dir);
    assert!(v.contains(&format!("{cert}: OK")), "{v}");
}

/// The keyring's public key for `machine:<name>` (`spec` p256 or
/// ed25519), as PEM.
fn keyring_pub(env: &KernelEnv, name: &str, spec: &str) -> String {
    let der = env
        .request("user", &format!("{name}:pub"), &format!("{spec} machine"))
        .payload();
    let f = env.dir.path().join(format!("{name}.der"));
    std::fs::write(&f, der).unwrap();
    openssl(
        &[
            "pkey",
            "-pubin",
            "-inform",
            "DER",
            "-in",
            f.to_str().unwrap(),
        ],
        env.dir.path(),
    )
}

#[test]
fn a_csr_that_openssl_verifies_and_an_openssl_ca_certifies() {
    let env = KernelEnv::new("");
    let dir = env.dir.path();
    let pem = ok(dkey(
        &env,
        &[
            "csr",
            "machine:web",
            "--subject",
            "CN=web.example,O=Example Org,C=DE",
            "--san",
            "DNS:web.example",
            "--san",
            "IP:192.0.2.7",
        ],
    ));
    assert!(
        pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
        "{pem}"
    );
    std::fs::write(dir.join("web.csr"), &pem).unwrap();
    assert_csr_signature_verifies("web.csr", dir);
    let text = openssl(
        &["req", "-in", "web.csr", "-noout", "-verify", "-text"],
        dir,
    );
    // RFC 4514 order: the last RDN written is the first in the DER.
    assert!(
        text.contains("Subject: C = DE, O = Example Org, CN = web.example"),
        "{text}"
    );
    assert!(
        text.contains("DNS:web.example") && text.contains("IP Address:192.0.2.7"),
        "{text}"
    );
    // The request carries the keyring's key.
    let req_pub = openssl(&["req", "-in", "web.csr", "-noout", "-pubkey"], dir);
    assert_eq!(req_pub, keyring_pub(&env, "web", "p256"));

    // An openssl CA issues a certificate for it, which verifies.
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=Test CA",
            "-days",
            "2",
        ],
        dir,
    );
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "web.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "web.pem",
            "-days",
            "1",
            "-copy_extensions",
            "copy",
        ],
        dir,
    );
    let v = openssl(&["verify", "-CAfile", "ca.pem", "web.pem"], dir);
    assert!(v.contains("web.pem: OK"), "{v}");
}

#[test]
fn a_self_signed_certificate_that_openssl_verifies() {
    let env = KernelEnv::new("");
    let dir = env.dir.path();
    let pem = ok(dkey(
        &env,
        &[
            "cert",
            "machine:self",
            "--subject",
            "CN=self.example",
            "--san",
            "DNS:self.example",
            "--days",
            "7",
        ],
    ));
    std::fs::write(dir.join("self.pem"), &pem).unwrap();
    assert_self_signed_verifies("self.pem", dir);
    let text = openssl(
        &["x509", "-in", "self.pem", "-noout", "-text", "-enddate"],
        dir,
    );
    assert!(text.contains("DNS:self.example"), "{text}");
    // An endpoint's certificate: TLS may sign with its key.
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(text.contains("Digital Signature"), "{text}");
    let cert_pub = openssl(&["x509", "-in", "self.pem", "-noout", "-pubkey"], dir);
    assert_eq!(cert_pub, keyring_pub(&env, "self", "p256"));
    // Valid for the days asked: it expires between 6 and 8 days from now.
    let ends_in = |days: &str| {
        Command::new("openssl")
            .args(["x509", "-in", "self.pem", "-noout", "-checkend", days])
            .current_dir(dir)
            .status()
            .unwrap()
            .success()
    };
    assert!(ends_in(&(6 * 86_400).to_string()));
    assert!(!ends_in(&(8 * 86_400).to_string()));
}

/// `--ca`: a root CA's certificate for the key, the trust anchor of what
/// the key signs (through the PKCS#11 token, say).
#[test]
fn a_ca_certificate_on_request() {
    let env = KernelEnv::new("");
    let dir = env.dir.path();
    let pem = ok(dkey(
        &env,
        &["cert", "machine:root", "--subject", "CN=Root", "--ca"],
    ));
    std::fs::write(dir.join("root.pem"), &pem).unwrap();
    assert_self_signed_verifies("root.pem", dir);
    let text = openssl(&["x509", "-in", "root.pem", "-noout", "-text"], dir);
    assert!(text.contains("CA:TRUE"), "{text}");
    assert!(text.contains("Certificate Sign"), "{text}");
    assert!(!text.contains("Digital Signature"), "{text}");
}

#[test]
fn ed25519_keys_make_a_csr_and_a_certificate_that_openssl_verifies() {
    let env = KernelEnv::new("");
    let dir = env.dir.path();
    let sel = "machine:edweb,alg=ed25519";
    let csr = ok(dkey(
        &env,
        &[
            "csr",
            sel,
            "--subject",
            "CN=ed.example",
            "--san",
            "DNS:ed.example",
        ],
    ));
    std::fs::write(dir.join("ed.csr"), &csr).unwrap();
    assert_csr_signature_verifies("ed.csr", dir);
    let text = openssl(&["req", "-in", "ed.csr", "-noout", "-verify", "-text"], dir);
    assert!(
        text.contains("ED25519") && text.contains("DNS:ed.example"),
        "{text}"
    );
    let req_pub = openssl(&["req", "-in", "ed.csr", "-noout", "-pubkey"], dir);
    let keyring = keyring_pub(&env, "edweb", "ed25519");
    assert_eq!(req_pub, keyring);

    let cert = ok(dkey(&env, &["cert", sel, "--subject", "CN=ed.example"]));
    std::fs::write(dir.join("ed.pem"), &cert).unwrap();
    assert_self_signed_verifies("ed.pem", dir);
    let cert_pub = openssl(&["x509", "-in", "ed.pem", "-noout", "-pubkey"], dir);
    assert_eq!(cert_pub, keyring);
    // The P-256 key of the same name is another key.
    assert_ne!(keyring, keyring_pub(&env, "edweb", "p256"));
}

#[test]
fn an_ed25519_structure_over_1024_bytes_is_a_usage_error() {
    // An Ed25519 signature is over the message itself, which reaches the
    // handler in the callout: at most 1024 bytes. 60 SANs make the
    // to-be-signed part longer; P-256 signs its digest and takes them.
    let env = KernelEnv::new("");
    let sans: Vec<String> = (0..60)
        .map(|i| format!("DNS:host{i:02}.example.org"))
        .collect();
    let with_sans = |sel: &str| {
        let mut args = vec!["cert", sel, "--subject", "CN=many"];
        for s in &sans {
            args.extend(["--san", s.as_str()]);
        }
        dkey(&env, &args)
    };
    let out = with_sans("machine:many,alg=ed25519");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(out.stdout.is_empty());
    ok(with_sans("machine:many"));
}

#[test]
fn bad_subjects_and_sans_are_exit_3_with_nothing_on_stdout() {
    let env = KernelEnv::new("");
    for args in [
        vec!["csr", "machine:web", "--subject", ""],
        vec!["csr", "machine:web", "--subject", "CN"],
        vec!["csr", "machine:web", "--subject", "XX=1"],
        vec!["csr", "machine:web", "--subject", "CN=a", "--san", "URI:x"],
        vec![
            "csr",
            "machine:web",
            "--subject",
            "CN=a",
            "--san",
            "IP:300.0.0.1",
        ],
        vec!["cert", "machine:web", "--subject", "CN=a", "--days", "0"],
        vec!["cert", "bogus:web", "--subject", "CN=a"],
    ] {
        let out = dkey(&env, &args);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}
