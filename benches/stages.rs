//! Each stage of a request alone, to say where a request's time goes
//! (docs/SPEED.md): the TPM step on swtpm as the broker runs it (with its
//! one OpenSSL library context for the TPM stack), the derivations, the
//! /proc reads of the handler and of the broker's requester check, and a
//! wake-up round trip over a Unix socket. Run as root:
//! `cargo bench --bench stages` (DK_STAGES_N, default 300).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(unsafe_code, dead_code)]
#[path = "../src/bin/derived-keys-broker/libctx.rs"]
mod libctx;

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "measure.rs"]
mod measure;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use common::Swtpm;
use derived_keys::derive::{self, Ed25519Key, P256Key};
use derived_keys::tpm::{Tcti, Tpm};
use measure::Row;

fn row(name: &str, n: usize, mut f: impl FnMut(usize)) -> Row {
    for i in 0..5 {
        f(1_000_000 + i);
    }
    let mut r = Row::new(name);
    for i in 0..n {
        let t = Instant::now();
        f(i);
        r.add(Ok(t.elapsed()));
    }
    r
}

fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let n: usize = if smoke {
        5
    } else {
        std::env::var("DK_STAGES_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300)
    };
    assert!(libctx::no_config());
    let swtpm = Swtpm::start();
    let tcti = Tcti::parse(&swtpm.tcti()).unwrap();
    let mut rows = Vec::new();

    // The TPM: what a broker does when it starts, and once per request.
    rows.push(row("TPM: open the TCTI", 10.min(n), |_| {
        drop(Tpm::open(&tcti).unwrap());
    }));
    let mut tpm = Tpm::open(&tcti).unwrap();
    rows.push(row(
        "TPM: set-up (salt key, salted session, primary)",
        10.min(n),
        |_| {
            let p = tpm.load_primary(None).unwrap();
            tpm.flush_primary(p).unwrap();
        },
    ));
    let primary = tpm.load_primary(None).unwrap();
    let mut prk = None;
    rows.push(row("TPM: TPM2_HMAC in the salted session", n, |i| {
        prk = Some(tpm.prk_with(&primary, &[i as u8; 32]).unwrap());
    }));
    tpm.flush_primary(primary).unwrap();
    let prk = prk.unwrap();

    // The derivations, from a PRK.
    rows.push(row("derive: HKDF, 32-byte symmetric key", n, |_| {
        drop(derive::symmetric_key(&prk, 32).unwrap());
    }));
    rows.push(row("derive: P-256 key and signature (RFC 6979)", n, |i| {
        let k = P256Key::from_prk(&prk).unwrap();
        drop(k.sign_digest(&[i as u8; 32]).unwrap());
    }));
    rows.push(row("derive: P-256 public key (SPKI)", n, |_| {
        drop(P256Key::from_prk(&prk).unwrap().spki_der().unwrap());
    }));
    rows.push(row(
        "derive: Ed25519 key and signature (32 bytes)",
        n,
        |i| {
            let k = Ed25519Key::from_prk(&prk).unwrap();
            let _ = k.sign(&[i as u8; 32]).unwrap();
        },
    ));

    // /proc/keys read plainly (the kernel checks possession and permission
    // of every key in the system), as the handler read it before release
    // 0.3 (with an fsuid that owns no keys), and as the broker reads it
    // now: through root's view, which skips other owners' keys.
    rows.push(row("/proc/keys: plain read as root", n, |_| {
        drop(std::fs::read("/proc/keys").unwrap());
    }));
    rows.push(row("/proc/keys: plain read, fsuid (uid_t)-2", n, |_| {
        let before = nix::unistd::setfsuid(nix::unistd::Uid::from_raw(u32::MAX - 1));
        drop(std::fs::read("/proc/keys").unwrap());
        nix::unistd::setfsuid(before);
    }));
    let view = derived_keys::requester::keys::KeysView::forking(None);
    rows.push(row(
        "/proc/keys: broker's view for uid 0 (a scan)",
        n,
        |_| {
            drop(
                view.auth_line(
                    0,
                    &derived_keys_core::proc_keys::AuthKey {
                        serial: 1,
                        target: 2,
                        callout_len: 3,
                    },
                    Instant::now() + std::time::Duration::from_secs(5),
                )
                .unwrap(),
            );
        },
    ));
    let mut child = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let dir = Path::new("/proc").join(child.id().to_string());
    // What requester::identify reads: the thread's syscall (the file kept
    // open and read again), its executable, and for a `path` request the
    // namespaces and the executable's identity too (policy::needs).
    let syscall_twice_and_exe = |dir: &Path| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(dir.join("syscall")).unwrap();
        let mut buf = [0u8; 256];
        let _ = f.read_at(&mut buf, 0).unwrap();
        let exe = std::fs::read_link(dir.join("exe")).unwrap();
        let _ = f.read_at(&mut buf, 0).unwrap();
        exe
    };
    rows.push(row(
        "broker: requester reads in /proc, machine or user (syscall x2, exe)",
        n,
        |_| {
            let _ = syscall_twice_and_exe(&dir);
        },
    ));
    rows.push(row(
        "broker: requester reads in /proc, path (+ namespaces, exe identity)",
        n,
        |_| {
            let exe = syscall_twice_and_exe(&dir);
            let _ = std::fs::metadata(dir.join("exe")).unwrap();
            let _ = std::fs::metadata(exe).unwrap();
            for ns in ["self/ns/mnt", "self/ns/user"] {
                let _ = std::fs::metadata(Path::new("/proc").join(ns)).unwrap();
            }
            for ns in ["ns/mnt", "ns/user"] {
                let _ = std::fs::metadata(dir.join(ns)).unwrap();
            }
        },
    ));
    let _ = child.kill();
    let _ = child.wait();

    // What a message and its answer between two processes cost: each side
    // sleeps in read until the other writes (handler and broker do this
    // once per request; the broker and swtpm once per TPM command).
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok(k) = b.read(&mut buf) {
            if k == 0 || b.write_all(&buf[..k]).is_err() {
                break;
            }
        }
    });
    rows.push(row(
        "wake-up: Unix socket round trip between two threads",
        n,
        |_| {
            let mut buf = [0u8; 64];
            a.write_all(&[7; 64]).unwrap();
            a.read_exact(&mut buf).unwrap();
        },
    ));
    drop(a);
    echo.join().unwrap();

    println!("\nmachine: {}\n", measure::machine());
    println!("| stage | n | p50 µs | p90 µs | p99 µs |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for r in &rows {
        let us = |p| r.pct(p) * 1000.0;
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} |",
            r.name,
            r.samples.len(),
            us(0.5),
            us(0.9),
            us(0.99)
        );
    }
}
