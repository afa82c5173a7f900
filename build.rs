//! Links the request-key handler, `derived-key-helper`, a `no_std` program.
//!
//! Where musl is installed (Debian's musl-dev, which scripts/install-deps.sh
//! installs), the handler is linked statically against it: no dynamic
//! loader and no glibc start-up, whose CPU feature probing alone costs
//! ~0.3 ms per exec on a VM (every CPUID traps to the hypervisor). Without
//! musl it links against the system libc like any program: slower to
//! start, the same behaviour.

use std::path::Path;

const MUSL: &str = "/usr/lib/x86_64-linux-musl";
const BIN: &str = "derived-key-helper";

fn arg(a: &str) {
    println!("cargo:rustc-link-arg-bin={BIN}={a}");
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={MUSL}/libc.a");
    // DERIVED_KEYS_MUSL=0 forces the system-libc build (to test it).
    println!("cargo:rerun-if-env-changed=DERIVED_KEYS_MUSL");
    let wanted = std::env::var("DERIVED_KEYS_MUSL").map_or(true, |v| v != "0");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let musl = Path::new(MUSL);
    if wanted && arch == "x86_64" && musl.join("libc.a").is_file() && musl.join("crt1.o").is_file()
    {
        // Two loadable segments, not five: the read-only data shares the
        // code's (--no-rosegment) and the relocation-read-only data the
        // writable one (-z norelro), so exec maps fewer areas and the
        // handler takes 5 page faults, not 7 (2.5 µs each here). Nothing
        // is given up: without a dynamic loader nobody makes RELRO read
        // only (musl's static start never calls mprotect), and no segment
        // is both writable and executable.
        for a in [
            "-nostartfiles",
            "-static",
            "-no-pie",
            "-Wl,-z,norelro",
            "-Wl,--no-rosegment",
        ] {
            arg(a);
        }
        for obj in ["crt1.o", "crti.o", "libc.a", "crtn.o"] {
            arg(&format!("{MUSL}/{obj}"));
        }
        println!("cargo:rustc-cfg=dk_static_handler");
    } else {
        println!(
            "cargo:warning=musl not found in {MUSL}: {BIN} links against the system libc \
             (install musl-dev for the faster static handler)"
        );
        arg("-lc");
    }
    println!("cargo:rustc-check-cfg=cfg(dk_static_handler)");
    // The broker hands libtss2-esys one OpenSSL library context
    // (src/bin/derived-keys-broker/libctx.rs): its functions must be in
    // the executable's dynamic symbol table to take the place of
    // libcrypto's. benches/tpm.rs measures the TPM step the same way.
    for sym in [
        "OSSL_LIB_CTX_new",
        "OSSL_LIB_CTX_free",
        "OSSL_LIB_CTX_new_from_dispatch",
    ] {
        let export = format!("-Wl,--export-dynamic-symbol={sym}");
        println!("cargo:rustc-link-arg-bin=derived-keys-broker={export}");
        println!("cargo:rustc-link-arg-benches={export}");
    }
}
