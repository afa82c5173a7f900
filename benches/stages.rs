//! The TPM step alone, on swtpm, as the broker runs it (with its one
//! OpenSSL library context for the TPM stack): opening the TCTI, setting
//! up (salt key, salted session, primary), and one TPM2_HMAC in the
//! salted, encrypted session. Run as root: `cargo bench --bench tpm`
//! (DK_TPM_N, default 300).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(unsafe_code, dead_code)]
#[path = "../src/bin/derived-keys-broker/libctx.rs"]
mod libctx;

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "measure.rs"]
mod measure;

use std::time::Instant;

use common::Swtpm;
use derived_keys::tpm::{Tcti, Tpm};
use measure::Row;

fn main() {
    let n: usize = std::env::var("DK_TPM_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let swtpm = Swtpm::start();
    let tcti = Tcti::parse(&swtpm.tcti()).unwrap();
    let mut rows = Vec::new();

    let mut open = Row::new("open the TCTI");
    let mut load = Row::new("salt key, salted session, primary");
    let mut hmac = Row::new("TPM2_HMAC in the salted session");
    for _ in 0..10 {
        let t = Instant::now();
        let mut t2 = Tpm::open(&tcti).unwrap();
        open.add(Ok(t.elapsed()));
        let t = Instant::now();
        let p = t2.load_primary(None).unwrap();
        load.add(Ok(t.elapsed()));
        t2.flush_primary(p).unwrap();
    }
    let mut t2 = Tpm::open(&tcti).unwrap();
    let p = t2.load_primary(None).unwrap();
    for i in 0..n {
        let msg = [i as u8; 32];
        let t = Instant::now();
        let prk = t2.prk_with(&p, &msg).unwrap();
        hmac.add(Ok(t.elapsed()));
        drop(prk);
    }
    t2.flush_primary(p).unwrap();
    rows.extend([open, load, hmac]);
    println!("\nmachine: {}\n", measure::machine());
    measure::print_table(&rows);
}
