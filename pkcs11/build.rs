//! The integration tests reuse the root crate's harness (tests/common),
//! which names the request-key handler by `CARGO_BIN_EXE_derived-key-helper`;
//! a dependency's binaries are not built for us, so the test builds the root
//! crate's handler and broker into this target directory (`target/root`) and this
//! points the harness there: `target/root/<profile>`, so that the benchmark
//! (release) measures a release handler and broker.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let profile = match std::env::var("PROFILE").as_deref() {
        Ok("release") => "release",
        _ => "debug",
    };
    println!(
        "cargo:rustc-env=CARGO_BIN_EXE_derived-key-helper={manifest}/target/root/{profile}/derived-key-helper"
    );
    println!("cargo:rustc-env=DK_ROOT_PROFILE={profile}");
}
