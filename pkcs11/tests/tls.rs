//! TLS through the token with programs nobody here wrote: `gnutls-serv`
//! serves with the key `pkcs11:token=derived-keys;object=<selector>` and a
//! certificate of that key, `gnutls-cli` and `openssl s_client` verify the
//! certificate against itself as the only CA and complete handshakes, for
//! P-256 and Ed25519. The served certificate's key is the kernel's; after
//! a "reboot" (broker and TPM restarted) the same certificate still works.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::process::Stdio;

use support::{free_port, module, Env, Server};

/// gnutls-serv with the token's key (a PKCS#11 URL) and `cert`.
fn serve(env: &Env, tag: &str, key_url: &str, cert: &str) -> (Server, u16) {
    let port = free_port();
    let mut cmd = env.command("gnutls-serv");
    cmd.arg("--provider")
        .arg(module())
        .args(["--x509keyfile", key_url, "--x509certfile", cert])
        .args(["--disable-client-cert", "-p", &port.to_string()]);
    let log = env.kernel.dir.path().join(format!("gnutls-serv-{tag}.log"));
    (Server::start(cmd, port, log), port)
}

/// One gnutls-cli handshake, the certificate the only trust anchor and
/// checked for the name `localhost`.
fn gnutls_cli(env: &Env, port: u16, cert: &str) -> std::process::Output {
    env.command("gnutls-cli")
        .args(["--x509cafile", cert, "-p", &port.to_string(), "localhost"])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// One openssl s_client handshake that fails unless the chain verifies;
/// returns its output (with the served certificate, `-showcerts`).
fn s_client(env: &Env, port: u16, cert: &str) -> std::process::Output {
    env.command("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", "localhost", "-verify_hostname", "localhost"])
        .args(["-verify_return_error", "-CAfile", cert, "-showcerts"])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// Both clients complete a verified handshake with the server at `port`;
/// returns the DER SubjectPublicKeyInfo of the certificate it served.
fn handshakes(env: &Env, port: u16, cert: &str, server: &Server, want_sig: &str) -> Vec<u8> {
    let g = gnutls_cli(env, port, cert);
    let t = text(&g);
    assert!(
        g.status.success() && t.contains("Handshake was completed"),
        "gnutls-cli: {t}\nserver: {}",
        server.output()
    );
    assert!(t.contains(want_sig), "{want_sig} not in {t}");
    let o = s_client(env, port, cert);
    let t = text(&o);
    assert!(
        o.status.success() && t.contains("Verify return code: 0 (ok)"),
        "s_client: {t}\nserver: {}",
        server.output()
    );
    let begin = t.find("-----BEGIN CERTIFICATE-----").unwrap();
    let end = t.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----".len();
    let served = env.path(&format!("served-{port}.pem"));
    std::fs::write(&served, format!("{}\n", &t[begin..end])).unwrap();
    let der = env.path(&format!("served-{port}.spki"));
    let pem = env.ok("openssl", &["x509", "-in", &served, "-noout", "-pubkey"]);
    let pem_path = env.path(&format!("served-{port}.pub"));
    std::fs::write(&pem_path, pem).unwrap();
    env.ok(
        "openssl",
        &[
            "pkey", "-pubin", "-in", &pem_path, "-outform", "DER", "-out", &der,
        ],
    );
    std::fs::read(&der).unwrap()
}

/// A handshake that must fail: the server's certificate is not the one
/// `ca` trusts (a certificate of another key).
fn refused(env: &Env, port: u16, ca: &str) {
    let g = gnutls_cli(env, port, ca);
    assert!(!g.status.success(), "gnutls-cli trusted it: {}", text(&g));
    let o = s_client(env, port, ca);
    assert!(!o.status.success(), "s_client trusted it: {}", text(&o));
}

/// The public key p11tool reads from the token (DER SPKI).
fn token_pubkey(env: &Env, selector_url: &str, tag: &str) -> Vec<u8> {
    let so = module();
    let pem = env.ok(
        "p11tool",
        &[
            "--provider",
            so.to_str().unwrap(),
            "--export-pubkey",
            &format!("{selector_url};type=public"),
        ],
    );
    let pem_path = env.path(&format!("token-{tag}.pem"));
    let der = env.path(&format!("token-{tag}.der"));
    std::fs::write(&pem_path, pem).unwrap();
    env.ok(
        "openssl",
        &[
            "pkey", "-pubin", "-in", &pem_path, "-outform", "DER", "-out", &der,
        ],
    );
    std::fs::read(&der).unwrap()
}

struct Case {
    /// The selector (canonical) and its URL-encoded form.
    selector: &'static str,
    object: &'static str,
    /// Name and callout of the same key, for keyctl.
    name: &'static str,
    callout: &'static str,
    /// What gnutls-cli reports as the server's signature.
    sig: &'static str,
}

fn tls_through_the_token(case: &Case, make_cert: impl Fn(&Env, &str) -> String) {
    let mut env = Env::new(&[case.selector]);
    let url = format!("pkcs11:token=derived-keys;object={}", case.object);
    let key_url = format!("{url};type=private");
    let cert = make_cert(&env, &key_url);
    let spki = env.spki(case.name, case.callout);

    let (server, port) = serve(&env, "1", &key_url, &cert);
    assert_eq!(handshakes(&env, port, &cert, &server, case.sig), spki);
    assert_eq!(token_pubkey(&env, &url, "before"), spki);
    // A certificate of another key is not trusted for this server: the
    // handshakes above verified the server's signature, not just a name.
    let other = env.path("other.pem");
    let other_key = env.path("other.key");
    support::pem_key_and_cert(&env, &other_key, &other);
    refused(&env, port, &other);
    drop(server);

    // "Reboot": the broker stops, the TPM restarts; a new server process
    // loads the module again and serves the same key for the same
    // certificate.
    env.reboot();
    assert_eq!(token_pubkey(&env, &url, "after"), spki);
    let (server, port) = serve(&env, "2", &key_url, &cert);
    assert_eq!(handshakes(&env, port, &cert, &server, case.sig), spki);
    drop(server);
}

#[test]
fn gnutls_serves_tls_with_a_p256_token_key() {
    tls_through_the_token(
        &Case {
            selector: "machine:tlsp",
            object: "machine:tlsp",
            name: "tlsp",
            callout: "p256 machine",
            sig: "ECDSA-SECP256R1-SHA256",
        },
        // dkey cert: the certificate of the selector's key, signed by it.
        |env, _| {
            let pem = env.dkey(&[
                "cert",
                "machine:tlsp",
                "--subject",
                "CN=localhost",
                "--san",
                "DNS:localhost",
                "--days",
                "2",
            ]);
            let path = env.path("cert.pem");
            std::fs::write(&path, pem).unwrap();
            path
        },
    );
}

#[test]
fn gnutls_serves_tls_with_an_ed25519_token_key() {
    tls_through_the_token(
        &Case {
            selector: "machine:tlse,alg=ed25519",
            object: "machine:tlse%2Calg%3Ded25519",
            name: "tlse",
            callout: "ed25519 machine",
            sig: "EdDSA-Ed25519",
        },
        // dkey cert makes P-256 certificates only: GnuTLS's certtool
        // makes this one, signing through the token.
        |env, key_url| {
            let template = env.path("cert.tmpl");
            std::fs::write(
                &template,
                "cn = \"localhost\"\ndns_name = \"localhost\"\nexpiration_days = 2\n\
                 signing_key\ntls_www_server\n",
            )
            .unwrap();
            let path = env.path("cert.pem");
            let so = module();
            env.ok(
                "certtool",
                &[
                    "--provider",
                    so.to_str().unwrap(),
                    "--generate-self-signed",
                    "--load-privkey",
                    key_url,
                    "--template",
                    &template,
                    "--outfile",
                    &path,
                ],
            );
            path
        },
    );
}
