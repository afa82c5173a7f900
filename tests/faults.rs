//! Faults: each gives the contract's errno promptly, through the kernel,
//! and never a hang or an unanswered request.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use std::time::{Duration, Instant};

use common::{Got, KernelEnv};

fn quickly(env: &KernelEnv, rest: &str, callout: &str) -> Got {
    let t = Instant::now();
    let got = env.request("user", rest, callout);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    got
}

#[test]
fn slots_exhausted_by_another_client_are_recovered() {
    let env = KernelEnv::new("");
    let reference = env.request("user", "db", "32 user").payload();
    let fill = |tag: &str| {
        for i in 0..3 {
            let ctx = env.dir.path().join(format!("{tag}{i}.ctx"));
            env.swtpm.tool(&[
                "tpm2_createprimary",
                "-C",
                "o",
                "-G",
                "ecc",
                "-c",
                ctx.to_str().unwrap(),
            ]);
        }
    };
    // Another client flushes everything (the broker's primary too) and
    // fills all three slots of swtpm: the broker recovers.
    env.swtpm.flush_all();
    fill("o");
    assert_eq!(quickly(&env, "db#after", "32 user").payload(), reference);
    // The same for a broker starting up into a full TPM.
    env.stop_broker();
    env.swtpm.flush_all();
    fill("n");
    assert_eq!(quickly(&env, "db#fresh", "32 user").payload(), reference);
    // Only the broker's primary is left loaded; it goes when the broker does.
    let handles = |env: &KernelEnv| {
        String::from_utf8_lossy(&env.swtpm.tool(&["tpm2_getcap", "handles-transient"]).stdout)
            .lines()
            .count()
    };
    assert_eq!(handles(&env), 1);
    env.stop_broker();
    assert_eq!(handles(&env), 0);
}

#[test]
fn dictionary_attack_lockout_does_not_block_derivation() {
    // The primary is noDA and hierarchy passwords carry no DA implications,
    // so another application locking the TPM out does not stop us.
    let env = KernelEnv::new("");
    let reference = env.request("user", "db", "32 user").payload();
    let d = env.dir.path();
    let p = |n: &str| d.join(n).to_str().unwrap().to_owned();
    let tool = |args: &[&str]| {
        env.swtpm.tool(args);
        env.swtpm.flush_all(); // swtpm has three slots and no resource manager
    };
    tool(&[
        "tpm2_dictionarylockout",
        "-s",
        "-n",
        "2",
        "-t",
        "600",
        "-l",
        "600",
        "-Q",
    ]);
    tool(&["tpm2_createprimary", "-C", "o", "-c", &p("p.ctx"), "-Q"]);
    tool(&[
        "tpm2_create",
        "-C",
        &p("p.ctx"),
        "-G",
        "hmac",
        "-p",
        "secret",
        "-u",
        &p("k.pub"),
        "-r",
        &p("k.priv"),
        "-Q",
    ]);
    tool(&[
        "tpm2_load",
        "-C",
        &p("p.ctx"),
        "-u",
        &p("k.pub"),
        "-r",
        &p("k.priv"),
        "-c",
        &p("k.ctx"),
        "-Q",
    ]);
    std::fs::write(d.join("m"), b"x").unwrap();
    for _ in 0..3 {
        let _ = std::process::Command::new("tpm2_hmac")
            .args(["-c", &p("k.ctx"), "-p", "wrong", &p("m")])
            .env("TPM2TOOLS_TCTI", env.swtpm.tcti())
            .output();
        env.swtpm.flush_all();
    }
    let caps = env.swtpm.tool(&["tpm2_getcap", "properties-variable"]);
    assert!(String::from_utf8_lossy(&caps.stdout).contains("inLockout:                 1"));
    assert_eq!(quickly(&env, "db#lockout", "32 user").payload(), reference);
}

#[test]
fn garbage_tcti_and_bad_configurations_are_enodev() {
    let env = KernelEnv::new("");
    for conf in [
        "[tpm]\ntcti = \"garbage\"\n",
        "[tpm]\ntcti = \"swtpm:host=127.0.0.1,port=notaport\"\n",
        "[tpm]\ntcti = \"device:/nonexistent/tpm\"\n",
        "this is not toml",
        "[tpm]\nunknown_key = 1\n",
    ] {
        env.write_conf(conf);
        assert_eq!(
            quickly(&env, "db", "32 user"),
            Got::Err(libc::ENODEV),
            "{conf}"
        );
    }
    // World-writable: refused, whatever it says.
    env.write_conf(&format!("[tpm]\ntcti = \"{}\"\n", env.swtpm.tcti()));
    std::fs::set_permissions(
        &env.conf,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    assert_eq!(quickly(&env, "db", "32 user"), Got::Err(libc::ENODEV));
    // Unreadable: a directory where the file should be.
    std::fs::remove_file(&env.conf).unwrap();
    std::fs::create_dir(&env.conf).unwrap();
    assert_eq!(quickly(&env, "db", "32 user"), Got::Err(libc::ENODEV));
}

#[test]
fn owner_password_file_must_be_private() {
    let env = KernelEnv::new("");
    let auth = env.dir.path().join("owner-auth");
    std::fs::write(&auth, "pw\n").unwrap();
    std::fs::set_permissions(&auth, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    env.write_conf(&format!(
        "[tpm]\ntcti = \"{}\"\nowner_auth_file = \"{}\"\n",
        env.swtpm.tcti(),
        auth.display()
    ));
    assert_eq!(quickly(&env, "db", "32 user"), Got::Err(libc::ENODEV));
}
