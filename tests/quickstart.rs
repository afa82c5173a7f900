//! Follows the README's quick start in a fresh clone: the first command
//! (scripts/quickstart.sh) must set everything up and show a key, a public
//! key and an openssl-verified signature. A pre-existing installation is
//! left as it was; one this test made is removed again.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

#[test]
fn readme_quick_start_in_a_fresh_clone() {
    let repo = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(Path::new(repo).join("README.md")).unwrap();
    assert!(
        readme.contains("bash scripts/quickstart.sh"),
        "README quick start changed"
    );
    assert!(
        readme.contains("bash scripts/test.sh"),
        "README test command changed"
    );

    let was_installed = Path::new("/etc/request-key.d/derived-keys.conf").exists();
    let dir = tempfile::Builder::new()
        .prefix("dk-clone-")
        .tempdir()
        .unwrap();
    let clone = dir.path().join("derived-keys");
    let st = Command::new("git")
        .args(["clone", "--quiet", repo])
        .arg(&clone)
        .status()
        .unwrap();
    assert!(st.success());
    // A target directory of its own (under ours, so it stays cached across
    // runs): sharing ours would overwrite this tree's binaries with the
    // clone's.
    let target = Path::new(repo).join("target").join("quickstart-clone");
    let out = Command::new("bash")
        .arg(clone.join("scripts/quickstart.sh"))
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let cleanup = || {
        if !was_installed {
            let _ = Command::new(target.join("release/dkey"))
                .args(["uninstall", "--purge"])
                .output();
        }
    };
    if !out.status.success() {
        cleanup();
        panic!("quickstart failed:\n{stdout}\n{stderr}");
    }
    for want in [
        "ready:          yes",
        "asked again: the same key",
        "-----BEGIN PUBLIC KEY-----",
        "Verified OK",
    ] {
        if !stdout.contains(want) {
            cleanup();
            panic!("quickstart output lacks {want:?}:\n{stdout}\n{stderr}");
        }
    }
    cleanup();
}
