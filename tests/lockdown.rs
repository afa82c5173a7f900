//! The embedded software TPM's lockdown: after it, nobody without the
//! password files can create a primary in the owner hierarchy, clear the
//! TPM or take the platform hierarchy; with the owner password, derivation
//! works. Runs against a private swtpm with a scratch install root.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use std::process::Command;

use common::Swtpm;
use derived_keys::setup::{lockdown, Layout};
use derived_keys::tpm::{Tcti, Tpm};

fn tool_ok(swtpm: &Swtpm, args: &[&str]) -> bool {
    let ok = Command::new(args[0])
        .args(&args[1..])
        .env("TPM2TOOLS_TCTI", swtpm.tcti())
        .output()
        .unwrap()
        .status
        .success();
    let _ = Command::new("tpm2_flushcontext")
        .arg("-t")
        .env("TPM2TOOLS_TCTI", swtpm.tcti())
        .output();
    ok
}

#[test]
fn lockdown_shuts_out_everyone_without_the_passwords() {
    let swtpm = Swtpm::start();
    let root = common::scratch_dir();
    let layout = Layout {
        root: root.path().to_path_buf(),
    };
    let tcti = Tcti::parse(&swtpm.tcti()).unwrap();
    let ctx = root.path().join("p.ctx");
    let ctx = ctx.to_str().unwrap();
    assert!(
        tool_ok(&swtpm, &["tpm2_createprimary", "-C", "o", "-c", ctx]),
        "open before"
    );

    lockdown(&layout, &tcti, None).unwrap();
    lockdown(&layout, &tcti, None).unwrap(); // idempotent, e.g. after every start

    let owner = std::fs::read_to_string(layout.owner_auth()).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(layout.owner_auth())
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(owner.len(), 32, "128 random bits, hex");
    assert!(layout.lockout_auth().exists());

    assert!(
        !tool_ok(&swtpm, &["tpm2_createprimary", "-C", "o", "-c", ctx]),
        "owner hierarchy without password"
    );
    assert!(
        !tool_ok(&swtpm, &["tpm2_clear", "-c", "p"]),
        "clear through the platform hierarchy"
    );
    assert!(
        !tool_ok(&swtpm, &["tpm2_clear", "-c", "l"]),
        "clear through lockout without password"
    );
    assert!(
        !tool_ok(&swtpm, &["tpm2_changeauth", "-c", "o", "mine"]),
        "take over the owner password"
    );
    let with_pw = format!("file:{}", layout.owner_auth().display());
    assert!(tool_ok(
        &swtpm,
        &["tpm2_createprimary", "-C", "o", "-P", &with_pw, "-c", ctx]
    ));

    // And the derivation works with the password it wrote.
    let pw = derived_keys::secret::SecretBuf::copy_from(owner.as_bytes()).unwrap();
    let mut tpm = Tpm::open(&tcti).unwrap();
    tpm.prk(Some(&pw), &[5; 32]).unwrap();
}
