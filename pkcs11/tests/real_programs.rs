//! The module driven by programs nobody here wrote (GnuTLS's `p11tool`,
//! OpenSC's `pkcs11-tool`, `openssl`), signing through the real kernel: a
//! private request-key rule, swtpm and configuration per test (the root
//! crate's harness), reached through `DERIVED_KEYS_PKCS11_PREFIX`; the
//! module reads that configuration's `[pkcs11] keys`
//! (`DERIVED_KEYS_PKCS11_CONFIG`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use support::{id, module, Env};

/// openssl checks a DER SPKI's ECDSA-SHA256 signature over a file.
fn assert_openssl_verifies(env: &Env, pub_der: &str, sig: &str, data: &str) {
    let v = env.ok(
        "openssl",
        &[
            "dgst",
            "-sha256",
            "-verify",
            pub_der,
            "-keyform",
            "DER",
            "-signature",
            sig,
            data,
        ],
    );
    assert!(v.contains("Verified OK"), "{v}");
}

#[test]
fn p11tool_lists_the_token_and_the_configured_keys() {
    let env = Env::new(&["machine:web", "machine:ssh,alg=ed25519"]);
    let so = module();
    let so = so.to_str().unwrap();
    let tokens = env.ok("p11tool", &["--provider", so, "--list-tokens"]);
    assert!(tokens.contains("Label: derived-keys"), "{tokens}");
    let all = env.ok(
        "p11tool",
        &["--provider", so, "--list-all", "pkcs11:token=derived-keys"],
    );
    for want in [
        "object=machine%3Aweb;type=private",
        "object=machine%3Aweb;type=public",
        "object=machine%3Assh%2Calg%3Ded25519;type=private",
        "object=machine%3Assh%2Calg%3Ded25519;type=public",
    ] {
        assert!(all.contains(want), "missing {want} in\n{all}");
    }
    // One key pair per selector: 4 objects, nothing else.
    assert_eq!(all.matches("Object ").count(), 4, "{all}");
    // A label names any valid selector's pair, configured or not; a label
    // that is no valid selector finds nothing.
    let other = env.ok(
        "p11tool",
        &[
            "--provider",
            so,
            "--list-all",
            "pkcs11:token=derived-keys;object=user:other,epoch=3",
        ],
    );
    assert_eq!(other.matches("Object ").count(), 2, "{other}");
    assert!(
        other.contains("object=user%3Aother%2Cepoch%3D3;type=private"),
        "{other}"
    );
    let none = env.run(
        "p11tool",
        &[
            "--provider",
            so,
            "--list-all",
            "pkcs11:token=derived-keys;object=no%2Fsuch",
        ],
    );
    assert!(!String::from_utf8_lossy(&none.stdout).contains("Object "));
    let private = env.ok(
        "p11tool",
        &[
            "--provider",
            so,
            "--list-all",
            "pkcs11:token=derived-keys;type=private",
        ],
    );
    assert_eq!(private.matches("Object ").count(), 2, "{private}");
    // GnuTLS signs through the token and verifies with the public key
    // object, for both algorithms.
    for (url, hash) in [
        (
            "pkcs11:token=derived-keys;object=machine:web;type=private",
            "--hash=SHA256",
        ),
        (
            "pkcs11:token=derived-keys;object=machine%3Assh%2Calg%3Ded25519;type=private",
            "--hash=SHA512",
        ),
    ] {
        let out = env.run("p11tool", &["--provider", so, hash, "--test-sign", url]);
        assert!(out.status.success());
        let out = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        assert!(
            out.contains("Verifying against public key in the token... ok"),
            "{out}"
        );
    }
    // The public key p11tool reads is the kernel's.
    let pem = env.ok(
        "p11tool",
        &[
            "--provider",
            so,
            "--export-pubkey",
            "pkcs11:token=derived-keys;object=machine:web;type=public",
        ],
    );
    let der = env.path("web.der");
    let pem_path = env.path("web.pem");
    std::fs::write(&pem_path, pem).unwrap();
    env.ok(
        "openssl",
        &[
            "pkey", "-pubin", "-in", &pem_path, "-outform", "DER", "-out", &der,
        ],
    );
    assert_eq!(
        std::fs::read(&der).unwrap(),
        env.spki("web", "p256 machine")
    );
}

#[test]
fn pkcs11_tool_signs_with_each_mechanism_and_openssl_verifies() {
    // pkcs11-tool finds the key to sign with by CKA_ID alone (it passes
    // no label to C_FindObjectsInit for --sign): the ID is the selector.
    let env = Env::new(&["machine:web", "machine:ssh,alg=ed25519"]);
    let web_id = id("machine:web");
    let ssh_id = id("machine:ssh,alg=ed25519");
    let so = module();
    let so = so.to_str().unwrap();
    let listed = env.ok("pkcs11-tool", &["--module", so, "-L", "-M"]);
    for want in ["derived-keys", "ECDSA-SHA256", "EDDSA"] {
        assert!(listed.contains(want), "{want} not in\n{listed}");
    }
    let data = env.path("data");
    std::fs::write(&data, b"a message the token signs through the kernel\n").unwrap();

    // P-256: the public key pkcs11-tool reads is the kernel's.
    let pub_der = env.path("p256.der");
    env.ok(
        "pkcs11-tool",
        &[
            "--module",
            so,
            "--read-object",
            "--type",
            "pubkey",
            "--label",
            "machine:web",
            "-o",
            &pub_der,
        ],
    );
    assert_eq!(
        std::fs::read(&pub_der).unwrap(),
        env.spki("web", "p256 machine")
    );

    // CKM_ECDSA_SHA256 over the data.
    let sig = env.path("sig-sha256");
    env.ok(
        "pkcs11-tool",
        &[
            "--module",
            so,
            "--sign",
            "-m",
            "ECDSA-SHA256",
            "--id",
            &web_id,
            "--signature-format",
            "openssl",
            "-i",
            &data,
            "-o",
            &sig,
        ],
    );
    assert_openssl_verifies(&env, &pub_der, &sig, &data);

    // CKM_ECDSA over a SHA-256 hash the caller made.
    let hash = env.path("hash");
    let digest = env.ok(
        "openssl",
        &["dgst", "-sha256", "-binary", "-out", &hash, &data],
    );
    assert!(digest.is_empty());
    let raw_sig = env.path("sig-raw");
    env.ok(
        "pkcs11-tool",
        &[
            "--module",
            so,
            "--sign",
            "-m",
            "ECDSA",
            "--id",
            &web_id,
            "--signature-format",
            "openssl",
            "-i",
            &hash,
            "-o",
            &raw_sig,
        ],
    );
    let v = env.ok(
        "openssl",
        &[
            "pkeyutl", "-verify", "-pubin", "-keyform", "DER", "-inkey", &pub_der, "-in", &hash,
            "-sigfile", &raw_sig,
        ],
    );
    assert!(v.contains("Signature Verified Successfully"), "{v}");

    // The default (PKCS#11) format is raw r||s, 64 bytes.
    let rs = env.path("sig-rs");
    env.ok(
        "pkcs11-tool",
        &[
            "--module",
            so,
            "--sign",
            "-m",
            "ECDSA-SHA256",
            "--id",
            &web_id,
            "-i",
            &data,
            "-o",
            &rs,
        ],
    );
    assert_eq!(std::fs::read(&rs).unwrap().len(), 64);

    // Ed25519: CKM_EDDSA over the message itself.
    let ed_der = env.path("ed.der");
    std::fs::write(&ed_der, env.spki("ssh", "ed25519 machine")).unwrap();
    let ed_sig = env.path("sig-ed");
    env.ok(
        "pkcs11-tool",
        &[
            "--module", so, "--sign", "-m", "EDDSA", "--id", &ssh_id, "-i", &data, "-o", &ed_sig,
        ],
    );
    assert_eq!(std::fs::read(&ed_sig).unwrap().len(), 64);
    let v = env.ok(
        "openssl",
        &[
            "pkeyutl", "-verify", "-pubin", "-keyform", "DER", "-inkey", &ed_der, "-rawin", "-in",
            &data, "-sigfile", &ed_sig,
        ],
    );
    assert!(v.contains("Signature Verified Successfully"), "{v}");

    // Data longer than pkcs11-tool's buffer is signed in parts
    // (C_SignUpdate, C_SignFinal): the module hashes, the kernel signs.
    let big = env.path("big");
    let text: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&big, &text).unwrap();
    let big_sig = env.path("sig-big");
    env.ok(
        "pkcs11-tool",
        &[
            "--module",
            so,
            "--sign",
            "-m",
            "ECDSA-SHA256",
            "--id",
            &web_id,
            "--signature-format",
            "openssl",
            "-i",
            &big,
            "-o",
            &big_sig,
        ],
    );
    assert_openssl_verifies(&env, &pub_der, &big_sig, &big);

    // The ID alone names a key nobody configured (it is the selector);
    // an ID that is no selector finds nothing; a wrong mechanism for the
    // key's type is refused.
    let other_sig = env.path("sig-other");
    env.ok(
        "pkcs11-tool",
        &[
            "--module",
            so,
            "--sign",
            "-m",
            "ECDSA-SHA256",
            "--id",
            &id("machine:other"),
            "--signature-format",
            "openssl",
            "-i",
            &data,
            "-o",
            &other_sig,
        ],
    );
    let other_der = env.path("other.der");
    std::fs::write(&other_der, env.spki("other", "p256 machine")).unwrap();
    assert_openssl_verifies(&env, &other_der, &other_sig, &data);
    let bad = env.run(
        "pkcs11-tool",
        &[
            "--module",
            so,
            "--sign",
            "-m",
            "ECDSA-SHA256",
            "--id",
            &id("machine:no/such"),
            "-i",
            &data,
            "-o",
            &rs,
        ],
    );
    assert!(!bad.status.success());
    let wrong = env.run(
        "pkcs11-tool",
        &[
            "--module", so, "--sign", "-m", "EDDSA", "--id", &web_id, "-i", &data, "-o", &rs,
        ],
    );
    assert!(!wrong.status.success());
}

/// p11-kit loads the token through its module file alone, the file `dkey
/// install` writes to /etc/pkcs11/modules (the same text, here a user's:
/// p11-kit reads no user configuration in a program running as root, and
/// the system directory is the installed system's). p11tool runs as uid
/// 1000 with no `--provider`, and reads uid 1000's own key.
#[test]
fn p11tool_finds_the_token_through_its_p11kit_module_file() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new(&["user:web"]);
    // What uid 1000 may read: the module, the configuration, a home.
    let open = tempfile::Builder::new()
        .prefix("dk-p11kit-")
        .tempdir()
        .unwrap();
    let at = |name: &str| open.path().join(name);
    let mode = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    mode(open.path(), 0o755);
    std::fs::copy(module(), at("derived-keys-pkcs11.so")).unwrap();
    mode(&at("derived-keys-pkcs11.so"), 0o755);
    std::fs::copy(&env.kernel.conf, at("derived-keys.conf")).unwrap();
    mode(&at("derived-keys.conf"), 0o644);
    let modules = at("home/.config/pkcs11/modules");
    std::fs::create_dir_all(&modules).unwrap();
    for d in [
        "home",
        "home/.config",
        "home/.config/pkcs11",
        "home/.config/pkcs11/modules",
    ] {
        std::os::unix::fs::chown(at(d), Some(1000), Some(1000)).unwrap();
    }
    let p11tool = |args: &[&str]| {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=1000", "--regid=1000", "--clear-groups", "p11tool"])
            .args(args)
            .env("HOME", at("home"))
            .env("DERIVED_KEYS_PKCS11_PREFIX", &env.kernel.prefix)
            .env("DERIVED_KEYS_PKCS11_CONFIG", at("derived-keys.conf"))
            .output()
            .unwrap();
        eprintln!(
            "$ p11tool {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Without the module file, no such token.
    assert!(!p11tool(&["--list-tokens"]).contains("Label: derived-keys"));
    std::fs::write(
        modules.join("derived-keys.module"),
        derived_keys::setup::p11kit_module_text(&at("derived-keys-pkcs11.so")),
    )
    .unwrap();
    let tokens = p11tool(&["--list-tokens"]);
    assert!(tokens.contains("Label: derived-keys"), "{tokens}");
    let all = p11tool(&["--list-all", "pkcs11:token=derived-keys"]);
    assert!(all.contains("object=user%3Aweb;type=public"), "{all}");
    // uid 1000's own key, as the kernel gives it to uid 1000.
    let pem = p11tool(&[
        "--export-pubkey",
        "pkcs11:token=derived-keys;object=user:web;type=public",
    ]);
    let pem_path = env.path("web1000.pem");
    let der = env.path("web1000.der");
    std::fs::write(&pem_path, pem).unwrap();
    env.ok(
        "openssl",
        &[
            "pkey", "-pubin", "-in", &pem_path, "-outform", "DER", "-out", &der,
        ],
    );
    let kernel = env
        .kernel
        .request_as(1000, "user", "web:pub", "p256 user")
        .payload();
    assert_eq!(std::fs::read(&der).unwrap(), kernel);
    assert_ne!(
        kernel,
        env.spki("web", "p256 user"),
        "root's key is another"
    );
}
