//! The README's recipes, run for real through the kernel.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use std::process::Command;

use common::KernelEnv;

fn sh(script: &str) -> (bool, String) {
    let out = Command::new("keyctl")
        .args(["session", "-", "bash", "-c", script])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn encrypted_key_with_a_derived_master_survives_sessions_not_rotation() {
    let env = KernelEnv::new("");
    let blob = env.dir.path().join("app-key.blob");
    let master = env.desc("master");
    let (ok, out) = sh(&format!(
        "set -e; keyctl request2 user {master} '32 machine' @s >/dev/null
         keyctl add encrypted app-key 'new default user:{master} 32' @s >/dev/null
         keyctl pipe %encrypted:app-key > {b}",
        b = blob.display()
    ));
    assert!(ok, "{out}");
    let text = std::fs::read_to_string(&blob).unwrap();
    assert!(
        text.starts_with(&format!("default user:{master} 32 ")),
        "{text}"
    );
    // A new session (a re-imaged host looks the same): re-derive, load.
    let load = |callout: &str| {
        sh(&format!(
            "set -e; keyctl request2 user {master} '{callout}' @s >/dev/null
             keyctl add encrypted app-key \"load $(cat {b})\" @s",
            b = blob.display()
        ))
    };
    let (ok, out) = load("32 machine");
    assert!(ok, "{out}");
    // Another master (a rotated epoch) cannot open the blob.
    let (ok, _) = load("32 machine epoch=1");
    assert!(!ok);
}
