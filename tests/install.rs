//! `dkey install` and `uninstall` into a scratch root: the PKCS#11 module
//! and its p11-kit file go in when the build has the module, and come out
//! again; the salt key's Name is pinned in the configuration.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use derived_keys::setup::{self, Change, InstallOptions, Layout};

#[test]
fn install_puts_the_pkcs11_module_in_place_and_uninstall_takes_it_out() {
    let swtpm = common::Swtpm::start();
    let root = common::scratch_dir();
    let layout = Layout {
        root: root.path().to_path_buf(),
    };
    // A build tree: target/release with the binaries, and the module in
    // the pkcs11 crate's own target directory.
    let repo = common::scratch_dir();
    let build = repo.path().join("target/release");
    let module_dir = repo.path().join("pkcs11/target/release");
    std::fs::create_dir_all(&build).unwrap();
    std::fs::create_dir_all(&module_dir).unwrap();
    for bin in ["derived-key-helper", "derived-keys-broker", "dkey"] {
        std::fs::write(build.join(bin), bin.as_bytes()).unwrap();
    }
    std::fs::write(module_dir.join("libderived_keys_pkcs11.so"), b"module").unwrap();
    let steps = setup::install(
        &layout,
        &InstallOptions {
            tcti: Some(swtpm.tcti()),
            force: false,
            build_dir: build.clone(),
        },
    )
    .unwrap();
    assert_eq!(std::fs::read(layout.pkcs11_module()).unwrap(), b"module");
    let p11kit = std::fs::read_to_string(layout.p11kit_module()).unwrap();
    assert!(
        p11kit.contains("module: /usr/local/lib/derived-keys/derived-keys-pkcs11.so\n"),
        "{p11kit}"
    );
    let config =
        derived_keys::config::Config::load(&layout.config()).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.salt_key_name.is_some(), "the salt key is pinned");
    assert!(steps
        .iter()
        .any(|s| s.what.starts_with("TPM salt key pinned") && s.change == Change::Unchanged));
    let status = setup::status(&layout, &layout.config());
    assert!(status.pkcs11_installed);

    let gone = setup::uninstall(&layout, false).unwrap();
    assert!(!layout.pkcs11_module().exists());
    assert!(!layout.p11kit_module().exists());
    assert!(gone
        .iter()
        .any(|s| s.what == "PKCS#11 module" && s.change == Change::Removed));
}
