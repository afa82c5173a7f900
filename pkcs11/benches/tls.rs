//! What the token costs a TLS server: p50 of a full handshake (a new
//! `openssl s_client` process each, certificate verified) against gnutls-serv
//! serving a P-256 key through the token, against the same server serving
//! a P-256 key from a PEM file, interleaved; beside it the p50 of one
//! keyring signature (the library, in process), which is what the token
//! adds per handshake. The configuration is the shipped default's
//! `hot_key_s = 60` (DK_TLS_HOT_KEY_S=0: every signature asks the TPM).
//!
//! Run as root, in pkcs11/: `cargo bench --bench tls` (DK_TLS_N handshakes
//! each, default 50). `cargo test --benches` runs it
//! as a smoke test (3 each).
//!
//! The client is openssl, not gnutls-cli: gnutls-cli's closing exchange
//! waits ~45 ms on about half of its runs here (a file key's as much as
//! the token's), which would swamp the difference measured.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../benches/measure.rs"]
mod measure;
#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::Instant;

use derived_keys::client::KeyRequest;
use derived_keys::request::Selector;
use measure::Row;
use support::{free_port, module, Env, Server};

fn serve(env: &Env, tag: &str, key: &str, cert: &str) -> (Server, u16) {
    let port = free_port();
    let mut cmd = env.command("gnutls-serv");
    cmd.arg("--provider")
        .arg(module())
        .args(["--x509keyfile", key, "--x509certfile", cert])
        .args(["--disable-client-cert", "-p", &port.to_string()]);
    let log = env.kernel.dir.path().join(format!("serv-{tag}.log"));
    (Server::start(cmd, port, log), port)
}

/// One verified handshake (P-256 certificate, TLS 1.3 by default).
fn handshake(port: u16, cert: &str) -> Result<std::time::Duration, i32> {
    let start = Instant::now();
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", "localhost", "-verify_hostname", "localhost"])
        .args(["-verify_return_error", "-CAfile", cert])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let took = start.elapsed();
    let ok = out.status.success()
        && String::from_utf8_lossy(&out.stdout).contains("Verify return code: 0 (ok)");
    if ok {
        Ok(took)
    } else {
        Err(out.status.code().unwrap_or(-1))
    }
}

fn main() {
    if unsafe_free_euid() != 0 {
        eprintln!("tls bench: run as root");
        std::process::exit(1);
    }
    let smoke = !std::env::args().any(|a| a == "--bench");
    let n: usize = if smoke {
        3
    } else {
        std::env::var("DK_TLS_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(50)
    };
    let hot = std::env::var("DK_TLS_HOT_KEY_S").unwrap_or_else(|_| "60".into());
    let env = Env::with_conf(&["machine:tlsbench"], &format!("hot_key_s = {hot}"));

    // The token's key and its certificate; a key file and its certificate.
    let token_key = "pkcs11:token=derived-keys;object=machine:tlsbench;type=private";
    let token_cert = env.path("token.pem");
    let pem = env.dkey(&[
        "cert",
        "machine:tlsbench",
        "--subject",
        "CN=localhost",
        "--san",
        "DNS:localhost",
        "--days",
        "2",
    ]);
    std::fs::write(&token_cert, pem).unwrap();
    let file_key = env.path("file.key");
    let file_cert = env.path("file.pem");
    support::pem_key_and_cert(&env, &file_key, &file_cert);
    let (token_srv, token_port) = serve(&env, "token", token_key, &token_cert);
    let (file_srv, file_port) = serve(&env, "file", &file_key, &file_cert);

    // Warm up both (page cache, the broker, a hot key).
    for _ in 0..2 {
        handshake(token_port, &token_cert)
            .unwrap_or_else(|e| panic!("token handshake failed ({e}): {}", token_srv.output()));
        handshake(file_port, &file_cert)
            .unwrap_or_else(|e| panic!("file handshake failed ({e}): {}", file_srv.output()));
    }
    let mut via_token = Row::new("TLS handshake, P-256 key through the token");
    let mut via_file = Row::new("TLS handshake, P-256 key from a PEM file");
    for _ in 0..n {
        via_token.add(handshake(token_port, &token_cert));
        via_file.add(handshake(file_port, &file_cert));
    }
    let req = KeyRequest::from_selector(&Selector::parse("machine:tlsbench").unwrap())
        .unwrap()
        .prefix(&env.kernel.prefix);
    let mut sign = Row::new("one keyring signature (library, in process)");
    for i in 0..n {
        let digest = [i as u8; 32];
        let start = Instant::now();
        let r = req.sign_digest(&digest).map(|_| start.elapsed());
        sign.add(r.map_err(|e| e.errno()));
    }
    drop(token_srv);
    drop(file_srv);

    println!(
        "\n{}; hot_key_s = {hot}; {n} handshakes each (interleaved)",
        measure::machine()
    );
    let diff = via_token.pct(0.5) - via_file.pct(0.5);
    let one = sign.pct(0.5);
    measure::print_table(&[via_token, via_file, sign]);
    println!(
        "\ntoken - file, p50: {diff:.2} ms; one keyring signature, p50: {one:.2} ms \
         (a TLS 1.3 handshake signs once)"
    );
    if smoke {
        println!("(smoke run: numbers are not meaningful)");
    }
}

/// The effective uid, without `unsafe` (the harness needs root).
fn unsafe_free_euid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}
