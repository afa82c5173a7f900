//! `ssh -I <module>` logs in to a real sshd with a key of the token: sshd
//! on a loopback port with its own configuration and a throwaway host
//! key, the user's authorized_keys line from `dkey ssh pubkey`. OpenSSH's
//! ssh-pkcs11 finds the public keys by class (the configured ones), then
//! the private key by CKA_ID, and signs with CKM_ECDSA.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use support::{free_port, module, Env, Server};

/// sshd as root on `port`, trusting only the keys in `authorized`.
fn sshd(env: &Env, port: u16, authorized: &Path) -> Server {
    let dir = env.kernel.dir.path();
    let host_key = dir.join("host_key");
    if !host_key.exists() {
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&host_key)
            .status()
            .unwrap();
        assert!(st.success());
    }
    std::fs::create_dir_all("/run/sshd").unwrap();
    let cfg = dir.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
             PidFile {}\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n",
            host_key.display(),
            authorized.display(),
            dir.join("sshd.pid").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("/usr/sbin/sshd");
    cmd.args(["-D", "-e", "-f"]).arg(&cfg);
    Server::start(cmd, port, dir.join("sshd.log"))
}

/// `ssh -I <module>` to root@127.0.0.1:`port`, trusting only the host key,
/// no agent; runs `echo logged-in`. With IdentitiesOnly, OpenSSH uses a
/// token's key only if its public key is also an IdentityFile: `identity`
/// (which holds no private key: only the token can sign).
fn ssh(env: &Env, port: u16, identity: &Path) -> Output {
    let dir = env.kernel.dir.path();
    let host_pub = std::fs::read_to_string(dir.join("host_key.pub")).unwrap();
    let known = dir.join("known_hosts");
    std::fs::write(&known, format!("[127.0.0.1]:{port} {host_pub}")).unwrap();
    env.command("ssh")
        .args(["-v", "-p", &port.to_string(), "-F", "/dev/null", "-I"])
        .arg(module())
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
        .args([
            "-o",
            "PasswordAuthentication=no",
            "-o",
            "IdentityAgent=none",
        ])
        .args(["-o", "IdentitiesOnly=yes", "-o"])
        .arg(format!("IdentityFile={}", identity.display()))
        .args(["root@127.0.0.1", "echo", "logged-in"])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// The key part of an OpenSSH public key line (type and base64).
fn key_of(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn ssh_logs_in_with_a_token_key() {
    let mut env = Env::new(&["machine:sshp", "machine:sshe,alg=ed25519"]);
    let p256 = key_of(&env.dkey(&["ssh", "pubkey", "machine:sshp"]));
    let ed25519 = key_of(&env.dkey(&["ssh", "pubkey", "machine:sshe,alg=ed25519"]));
    assert!(p256.starts_with("ecdsa-sha2-nistp256 "), "{p256}");

    // What OpenSSH reads from the token (ssh-keygen -D: the same lookup
    // as ssh -I) is the key dkey prints.
    let out = env.run("ssh-keygen", &["-D", module().to_str().unwrap()]);
    assert!(out.status.success());
    let listed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(key_of)
        .collect();
    let skipped = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(listed.contains(&p256), "{listed:?}");

    let dir = env.kernel.dir.path();
    let p256_file = dir.join("p256.pub");
    std::fs::write(&p256_file, format!("{p256}\n")).unwrap();
    let ed_file = dir.join("ed25519.pub");
    std::fs::write(&ed_file, format!("{ed25519}\n")).unwrap();
    let authorized = dir.join("authorized_keys");
    std::fs::write(&authorized, format!("{p256} machine:sshp\n")).unwrap();
    let port = free_port();
    let server = sshd(&env, port, &authorized);
    let out = ssh(&env, port, &p256_file);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "logged-in",
        "ssh: {}\nsshd: {}",
        text(&out),
        server.output()
    );

    // After a "reboot" (broker and TPM restarted) OpenSSH reads the same
    // key from the token and logs in with it again.
    env.reboot();
    let again = env.ok("ssh-keygen", &["-D", module().to_str().unwrap()]);
    assert!(again.lines().map(key_of).any(|k| k == p256), "{again}");
    let out = ssh(&env, port, &p256_file);
    assert!(out.status.success(), "ssh after reboot: {}", text(&out));

    // sshd trusting another key only: the token's key is not accepted.
    let other = key_of(&env.dkey(&["ssh", "pubkey", "machine:sshother"]));
    std::fs::write(&authorized, format!("{other} other\n")).unwrap();
    let out = ssh(&env, port, &p256_file);
    assert!(!out.status.success(), "ssh: {}", text(&out));

    // Ed25519: OpenSSH 9.2's ssh-pkcs11 knows RSA and ECDSA keys only
    // (CKK_EC_EDWARDS: "skipping unsupported key type"). Where it lists the
    // key, it must log in with it.
    if listed.contains(&ed25519) {
        std::fs::write(&authorized, format!("{ed25519} ed\n")).unwrap();
        let out = ssh(&env, port, &ed_file);
        assert!(out.status.success(), "ssh: {}", text(&out));
    } else {
        assert!(
            skipped.contains("skipping unsupported key type"),
            "{skipped}"
        );
    }
    drop(server);
}
