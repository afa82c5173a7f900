//! TLS through the real kernel: examples/rustls_server.rs's server, whose
//! certificate key is a derived key (P-256 and Ed25519) and whose
//! certificate our x509 code made, completes verified handshakes with
//! programs nobody here wrote: `openssl s_client` (TLS 1.2 and 1.3) and a
//! rustls client, each trusting only that certificate. The certificate
//! carries the keyring's public key, and a server whose signatures come
//! from another derived key fails every handshake: the handshake's
//! signature is the selector's key's.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;
#[path = "../examples/rustls_server.rs"]
#[allow(dead_code)]
mod rustls_server;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;

use common::KernelEnv;
use derived_keys::client::KeyRequest;
use derived_keys::request::Selector;
use derived_keys::signer::DerivedSigner;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::ServerConfig;
use rustls::sign::CertifiedKey;
use rustls_server::{certified_key, serve, server_config, DerivedSigningKey};
use x509_cert::der::Decode;

const LINE: &str = "hello from the derived key\n";

fn signer(env: &KernelEnv, selector: &str) -> DerivedSigner {
    let sel = Selector::parse(selector).unwrap();
    DerivedSigner::with_request(KeyRequest::from_selector(&sel).unwrap().prefix(&env.prefix))
        .unwrap()
}

/// A server on a free loopback port for `n` connections; joining gives
/// each connection's outcome.
fn server(config: Arc<ServerConfig>, n: usize) -> (u16, JoinHandle<Vec<Result<(), String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        (0..n)
            .map(|_| {
                let (tcp, _) = listener.accept().unwrap();
                serve(config.clone(), tcp, LINE).map_err(|e| e.to_string())
            })
            .collect()
    });
    (port, handle)
}

/// openssl s_client trusting only `cafile`, checking the name localhost,
/// reading until the server closes.
fn s_client(port: u16, cafile: &std::path::Path, version: &str) -> Output {
    Command::new("openssl")
        .args(["s_client", version, "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .args([
            "-servername",
            "localhost",
            "-verify_hostname",
            "localhost",
            "-verify_return_error",
            "-ign_eof",
            "-CAfile",
        ])
        .arg(cafile)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A rustls client trusting only `cert`: what the server said, and the
/// certificate it presented.
fn rustls_client(
    port: u16,
    cert: &CertificateDer<'static>,
    version: &'static rustls::SupportedProtocolVersion,
) -> Result<(String, Vec<u8>), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[version])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, TcpStream::connect(("127.0.0.1", port)).unwrap());
    let mut said = String::new();
    tls.read_to_string(&mut said).map_err(|e| e.to_string())?;
    let presented = tls.conn.peer_certificates().unwrap()[0].to_vec();
    Ok((said, presented))
}

/// `selector` (machine binding) and its callout `spec`: the keyring's
/// public key, the certificate's, and handshakes with both clients in both
/// TLS versions.
fn handshakes(selector: &str, spec: &str, openssl_sig: &str) {
    let env = KernelEnv::new("");
    let name = selector
        .trim_start_matches("machine:")
        .split(',')
        .next()
        .unwrap();
    let (key, pem) = certified_key(signer(&env, selector)).unwrap();
    let cert = key.end_entity_cert().unwrap().clone().into_owned();
    let cafile = env.dir.path().join("server.pem");
    std::fs::write(&cafile, &pem).unwrap();

    // The certificate's key is the one the keyring gives (through keyctl).
    let keyring = env
        .request("user", &format!("{name}:pub"), &format!("{spec} machine"))
        .payload();
    let parsed = x509_cert::Certificate::from_der(&cert).unwrap();
    let cert_spki =
        x509_cert::der::Encode::to_der(&parsed.tbs_certificate.subject_public_key_info).unwrap();
    assert_eq!(cert_spki, keyring);

    let (port, done) = server(server_config(key).unwrap(), 4);
    for version in ["-tls1_2", "-tls1_3"] {
        let out = s_client(port, &cafile, version);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{version}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("Verify return code: 0 (ok)"), "{stdout}");
        assert!(
            stdout.contains(&format!("Peer signature type: {openssl_sig}")),
            "{stdout}"
        );
        assert!(stdout.contains(LINE), "{stdout}");
    }
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let (said, presented) = rustls_client(port, &cert, version).unwrap();
        assert_eq!(said, LINE);
        assert_eq!(presented, cert.to_vec());
    }
    for outcome in done.join().unwrap() {
        outcome.unwrap();
    }
}

#[test]
fn a_p256_derived_key_serves_tls_that_openssl_and_rustls_verify() {
    handshakes("machine:web", "p256", "ECDSA");
}

#[test]
fn an_ed25519_derived_key_serves_tls_that_openssl_and_rustls_verify() {
    handshakes("machine:web,alg=ed25519", "ed25519", "ed25519");
}

/// The certificate of one derived key, the signatures of another of the
/// same algorithm: no client completes a handshake.
fn another_key_fails(selector: &str, other: &str) {
    let env = KernelEnv::new("");
    let (good, pem) = certified_key(signer(&env, selector)).unwrap();
    let cafile = env.dir.path().join("server.pem");
    std::fs::write(&cafile, &pem).unwrap();
    let cert = good.end_entity_cert().unwrap().clone().into_owned();
    let wrong = CertifiedKey::new(
        good.cert.clone(),
        Arc::new(DerivedSigningKey::new(signer(&env, other))),
    );
    assert!(wrong.keys_match().is_err());
    let (port, done) = server(server_config(wrong).unwrap(), 4);
    for version in ["-tls1_2", "-tls1_3"] {
        let out = s_client(port, &cafile, version);
        assert!(!out.status.success(), "{version}: {out:?}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains(LINE));
    }
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        // The handshake's signature, not the certificate chain, is what
        // rustls finds bad.
        let e = rustls_client(port, &cert, version).unwrap_err();
        assert!(e.contains("BadSignature"), "{e}");
    }
    for outcome in done.join().unwrap() {
        assert!(outcome.is_err());
    }
}

#[test]
fn a_server_signing_with_another_p256_key_fails_every_handshake() {
    another_key_fails("machine:web", "machine:web,epoch=1");
}

#[test]
fn a_server_signing_with_another_ed25519_key_fails_every_handshake() {
    another_key_fails("machine:web,alg=ed25519", "machine:other,alg=ed25519");
}
