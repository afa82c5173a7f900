//! SSH with derived keys and the real OpenSSH: `dkey ssh pubkey` lines,
//! the agent (ssh-add, ssh-keygen -Y), and sshd serving a host key that
//! lives in no file, to an ssh client that authenticates with a derived
//! user key, both through the agent. Through the real kernel.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::KernelEnv;

const DKEY: &str = env!("CARGO_BIN_EXE_dkey");

fn dkey(env: &KernelEnv, args: &[&str]) -> Output {
    Command::new(DKEY)
        .args(args)
        .args(["--prefix", &env.prefix])
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A running agent; killed on drop.
struct Agent {
    sock: PathBuf,
    pid: i32,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        if let Some(d) = self.sock.parent() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn start_agent(env: &KernelEnv, keys: &[&str]) -> Agent {
    let mut args = vec!["ssh-agent"];
    for k in keys {
        args.extend(["--key", k]);
    }
    let out = ok(dkey(env, &args));
    let field = |name: &str| {
        out.split(';')
            .find_map(|p| {
                p.trim()
                    .strip_prefix(&format!("{name}="))
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| panic!("no {name} in {out:?}"))
    };
    Agent {
        sock: PathBuf::from(field("SSH_AUTH_SOCK")),
        pid: field("SSH_AGENT_PID").parse().unwrap(),
    }
}

fn with_agent(agent: &Agent, args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .env("SSH_AUTH_SOCK", &agent.sock)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn pubkey_lines_are_the_keyrings_keys_and_openssh_reads_them() {
    let env = KernelEnv::new("");
    let line = ok(dkey(&env, &["ssh", "pubkey", "machine:host,epoch=2"]));
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[0], "ecdsa-sha2-nistp256");
    assert_eq!(
        fields[2], "machine:host,epoch=2",
        "the comment is the selector"
    );
    let file = env.dir.path().join("host.pub");
    std::fs::write(&file, &line).unwrap();
    let fp = ok(Command::new("ssh-keygen")
        .arg("-l")
        .arg("-f")
        .arg(&file)
        .output()
        .unwrap());
    assert!(fp.contains("(ECDSA)"), "{fp}");
    // The same key as the keyring's :pub for the equivalent request.
    let spki = env
        .request("user", "host:pub", "p256 machine epoch=2")
        .payload();
    let pem = env.dir.path().join("host.pem");
    let der = env.dir.path().join("host.der");
    std::fs::write(&der, &spki).unwrap();
    let st = Command::new("openssl")
        .args(["pkey", "-pubin", "-inform", "DER", "-in"])
        .arg(&der)
        .arg("-out")
        .arg(&pem)
        .status()
        .unwrap();
    assert!(st.success());
    let from_pem = ok(Command::new("ssh-keygen")
        .args(["-i", "-m", "PKCS8", "-f"])
        .arg(&pem)
        .output()
        .unwrap());
    assert_eq!(from_pem.split_whitespace().nth(1), Some(fields[1]));
    // A malformed selector: exit 3, nothing on stdout.
    let bad = dkey(&env, &["ssh", "pubkey", "bogus:host"]);
    assert_eq!(bad.status.code(), Some(3));
    assert!(bad.stdout.is_empty());
}

#[test]
fn the_agent_lists_signs_and_refuses_changes() {
    let env = KernelEnv::new("");
    let agent = start_agent(&env, &["user:alice", "machine:host"]);
    let dir = agent.sock.parent().unwrap();
    assert_eq!(std::fs::metadata(dir).unwrap().mode() & 0o777, 0o700);
    assert_eq!(
        std::fs::metadata(&agent.sock).unwrap().mode() & 0o777,
        0o600
    );

    let listed = ok(with_agent(&agent, &["ssh-add", "-L"]));
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 2, "{listed}");
    assert!(lines[0].ends_with(" user:alice"), "{listed}");
    assert_eq!(
        lines[1],
        ok(dkey(&env, &["ssh", "pubkey", "machine:host"])).trim()
    );

    // ssh-keygen signs with the agent's key and verifies the signature.
    let pubfile = env.dir.path().join("alice.pub");
    std::fs::write(&pubfile, format!("{}\n", lines[0])).unwrap();
    let msg = env.dir.path().join("msg");
    std::fs::write(&msg, b"hello from a derived key\n").unwrap();
    ok(with_agent(
        &agent,
        &[
            "ssh-keygen",
            "-Y",
            "sign",
            "-n",
            "file",
            "-f",
            pubfile.to_str().unwrap(),
            msg.to_str().unwrap(),
        ],
    ));
    let allowed = env.dir.path().join("allowed");
    std::fs::write(&allowed, format!("alice {}\n", lines[0])).unwrap();
    let sig = format!("{}.sig", msg.display());
    let verify = Command::new("ssh-keygen")
        .args(["-Y", "verify", "-n", "file", "-I", "alice", "-f"])
        .arg(&allowed)
        .args(["-s", &sig])
        .stdin(std::fs::File::open(&msg).unwrap())
        .output()
        .unwrap();
    ok(verify);

    // Adding, removing and locking fail.
    let key = env.dir.path().join("other");
    ok(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .output()
        .unwrap());
    for args in [
        vec!["ssh-add", key.to_str().unwrap()],
        vec!["ssh-add", "-D"],
        vec!["ssh-add", "-d", pubfile.to_str().unwrap()],
    ] {
        let out = with_agent(&agent, &args);
        assert!(!out.status.success(), "{args:?} succeeded");
    }
    let lock = Command::new("sh")
        .args([
            "-c",
            "printf 'pw\\npw\\n' | SSH_ASKPASS_REQUIRE=never ssh-add -x",
        ])
        .env("SSH_AUTH_SOCK", &agent.sock)
        .output()
        .unwrap();
    assert!(!lock.status.success(), "locking succeeded");
    // Still serving, unchanged.
    assert_eq!(ok(with_agent(&agent, &["ssh-add", "-L"])), listed);
    // Another uid cannot reach it.
    let other = Command::new("setpriv")
        .args([
            "--reuid=4370",
            "--regid=4370",
            "--clear-groups",
            "ssh-add",
            "-L",
        ])
        .env("SSH_AUTH_SOCK", &agent.sock)
        .output()
        .unwrap();
    assert!(!other.status.success());
}

#[test]
fn the_agent_refuses_a_socket_in_a_shared_directory_and_bad_selectors() {
    let env = KernelEnv::new("");
    let shared = env.dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = shared.join("s");
    let out = dkey(
        &env,
        &[
            "ssh-agent",
            "--socket",
            sock.to_str().unwrap(),
            "--key",
            "user:x",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(!sock.exists());
    let out = dkey(&env, &["ssh-agent", "--key", "user:x,epoch=x"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(out.stdout.is_empty());
}

/// ssh to root@127.0.0.1:`port` in batch mode, trusting only `known`, with
/// the keys (and the certificate `cert`, if any) of the agent at `agent`.
fn ssh_login(port: u16, known: &Path, agent: &Path, cert: Option<&Path>, cmd: &[&str]) -> Output {
    let mut c = Command::new("ssh");
    c.args(["-p", &port.to_string(), "-F", "/dev/null"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "PasswordAuthentication=no",
        ])
        .arg("-o")
        .arg(format!("IdentityAgent={}", agent.display()));
    if let Some(cert) = cert {
        c.arg("-o")
            .arg(format!("CertificateFile={}", cert.display()));
    }
    c.arg("root@127.0.0.1")
        .args(cmd)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// sshd as root on a free loopback port; killed on drop.
struct Sshd(Child);

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_sshd(dir: &Path, port: u16, host_pub: &Path, agent: &Path, authorized: &Path) -> Sshd {
    std::fs::create_dir_all("/run/sshd").unwrap();
    let cfg = dir.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nHostKeyAgent {}\n\
             AuthorizedKeysFile {}\nPidFile {}\nUsePAM no\nStrictModes no\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\n",
            host_pub.display(),
            agent.display(),
            authorized.display(),
            dir.join("sshd.pid").display()
        ),
    )
    .unwrap();
    let child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < end,
            "sshd did not listen: {}",
            std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Sshd(child)
}

#[test]
fn sshd_serves_a_host_key_that_is_in_no_file_to_a_derived_user_key() {
    let mut env = KernelEnv::new("");
    let dir_path = env.dir.path().to_path_buf();
    let dir = dir_path.as_path();
    let agent = start_agent(
        &env,
        &[
            "machine:host",
            "user:root-login",
            "user:root-ed,alg=ed25519",
        ],
    );
    let host_line = ok(dkey(&env, &["ssh", "pubkey", "machine:host"]));
    let user_line = ok(dkey(&env, &["ssh", "pubkey", "user:root-login"]));
    let ed_line = ok(dkey(&env, &["ssh", "pubkey", "user:root-ed,alg=ed25519"]));
    assert!(ed_line.starts_with("ssh-ed25519 "), "{ed_line}");
    let host_pub = dir.join("host.pub");
    std::fs::write(&host_pub, &host_line).unwrap();
    let authorized = dir.join("authorized_keys");
    std::fs::write(&authorized, &user_line).unwrap();
    let port = common::free_port();
    let sshd = start_sshd(dir, port, &host_pub, &agent.sock, &authorized);
    let known = dir.join("known_hosts");
    std::fs::write(&known, format!("[127.0.0.1]:{port} {host_line}")).unwrap();
    let out = ssh_login(port, &known, &agent.sock, None, &["echo", "logged-in"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "logged-in",
        "ssh: {}\nsshd: {}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
    );
    // An Ed25519 user key logs in too (only its line authorized now).
    std::fs::write(&authorized, &ed_line).unwrap();
    let out = ssh_login(port, &known, &agent.sock, None, &["echo", "ed25519-in"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ed25519-in",
        "ssh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(sshd);

    // A reboot: agent, broker and TPM restarted; the public key lines come
    // back byte for byte, so known_hosts and authorized_keys still hold.
    drop(agent);
    env.stop_broker();
    env.swtpm.restart();
    assert_eq!(
        ok(dkey(&env, &["ssh", "pubkey", "machine:host"])),
        host_line
    );
    assert_eq!(
        ok(dkey(&env, &["ssh", "pubkey", "user:root-ed,alg=ed25519"])),
        ed_line
    );
    let agent = start_agent(&env, &["machine:host", "user:root-ed,alg=ed25519"]);
    let _sshd = start_sshd(dir, port, &host_pub, &agent.sock, &authorized);
    let out = ssh_login(port, &known, &agent.sock, None, &["echo", "after-reboot"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "after-reboot",
        "ssh: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // With another host key in known_hosts, ssh refuses: the host key
    // really is the derived one.
    let other = ok(dkey(&env, &["ssh", "pubkey", "machine:impostor"]));
    std::fs::write(&known, format!("[127.0.0.1]:{port} {other}")).unwrap();
    let out = ssh_login(port, &known, &agent.sock, None, &["true"]);
    assert!(
        !out.status.success(),
        "ssh accepted a host key it does not know"
    );
}

#[test]
fn a_derived_ssh_ca_certifies_users_and_hosts_that_openssh_accepts() {
    let env = KernelEnv::new("");
    let dir = env.dir.path();
    let agent = start_agent(&env, &["machine:host2", "user:cert-user"]);
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let ca_line = ok(dkey(&env, &["ssh", "pubkey", "machine:ssh-ca"]));
    let ca_pub = write("ca.pub", &ca_line);
    let user_pub = write(
        "user.pub",
        &ok(dkey(&env, &["ssh", "pubkey", "user:cert-user"])),
    );
    let host_line = ok(dkey(&env, &["ssh", "pubkey", "machine:host2"]));
    let host_pub = write("host.pub", &host_line);

    let user_cert = ok(dkey(
        &env,
        &[
            "ssh",
            "certify",
            "--ca",
            "machine:ssh-ca",
            "--identity",
            "alice",
            "--principal",
            "root",
            "--days",
            "2",
            user_pub.to_str().unwrap(),
        ],
    ));
    let user_cert_file = write("user-cert.pub", &user_cert);
    let shown = ok(Command::new("ssh-keygen")
        .arg("-L")
        .arg("-f")
        .arg(&user_cert_file)
        .output()
        .unwrap());
    assert!(shown.contains("user certificate"), "{shown}");
    assert!(shown.contains("Key ID: \"alice\""), "{shown}");
    assert!(shown.contains("root"), "{shown}");
    let host_cert = ok(dkey(
        &env,
        &[
            "ssh",
            "certify",
            "--ca",
            "machine:ssh-ca",
            "--identity",
            "host2",
            "--host",
            "--principal",
            "127.0.0.1",
            host_pub.to_str().unwrap(),
        ],
    ));
    let host_cert_file = write("host-cert.pub", &host_cert);
    let shown = ok(Command::new("ssh-keygen")
        .arg("-L")
        .arg("-f")
        .arg(&host_cert_file)
        .output()
        .unwrap());
    assert!(shown.contains("host certificate"), "{shown}");

    // sshd trusts the CA for users and presents its certified host key;
    // the client knows only the CA (no authorized_keys, no host key line).
    std::fs::create_dir_all("/run/sshd").unwrap();
    let port = common::free_port();
    let cfg = write(
        "sshd_config",
        &format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nHostCertificate {}\nHostKeyAgent {}\n\
             TrustedUserCAKeys {}\nAuthorizedKeysFile none\nPidFile {}\nUsePAM no\nStrictModes no\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n",
            host_pub.display(),
            host_cert_file.display(),
            agent.sock.display(),
            ca_pub.display(),
            dir.join("sshd.pid").display()
        ),
    );
    let child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
        .spawn()
        .unwrap();
    let _sshd = Sshd(child);
    let end = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "sshd did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let known = write(
        "known_hosts",
        &format!("@cert-authority [127.0.0.1]:{port} {ca_line}"),
    );
    let login =
        |cert: Option<&Path>| ssh_login(port, &known, &agent.sock, cert, &["echo", "certified"]);
    let out = login(Some(&user_cert_file));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "certified",
        "ssh: {}\nsshd: {}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
    );
    // Without the certificate the same key is not authorized.
    assert!(!login(None).status.success());

    // Bad input is a usage error: exit 3, nothing on stdout.
    let junk = write("junk.pub", "not a key\n");
    for args in [
        vec![
            "ssh",
            "certify",
            "--ca",
            "machine:ssh-ca",
            "--identity",
            "x",
            "--principal",
            "root",
            junk.to_str().unwrap(),
        ],
        vec![
            "ssh",
            "certify",
            "--ca",
            "machine:ssh-ca",
            "--identity",
            "x",
            user_pub.to_str().unwrap(),
        ],
        vec![
            "ssh",
            "certify",
            "--ca",
            "nope:ca",
            "--identity",
            "x",
            "--principal",
            "root",
            user_pub.to_str().unwrap(),
        ],
        vec![
            "ssh",
            "certify",
            "--ca",
            "machine:ssh-ca",
            "--identity",
            "x",
            "--principal",
            "root",
            "--days",
            "0",
            user_pub.to_str().unwrap(),
        ],
    ] {
        let out = dkey(&env, &args);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {out:?}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn git_signs_a_commit_through_the_agent_and_verifies_it() {
    let env = KernelEnv::new("");
    let dir = env.dir.path();
    let agent = start_agent(&env, &["user:git-signing,alg=ed25519"]);
    let line = ok(dkey(
        &env,
        &["ssh", "pubkey", "user:git-signing,alg=ed25519"],
    ));
    let key = dir.join("signing.pub");
    std::fs::write(&key, &line).unwrap();
    let allowed = dir.join("allowed_signers");
    std::fs::write(&allowed, format!("dev@example.com {line}")).unwrap();
    let repo = dir.join("repo");
    std::fs::create_dir(&repo).unwrap();
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(&repo)
            .env("SSH_AUTH_SOCK", &agent.sock)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .output()
            .unwrap()
    };
    ok(git(&["init", "-q"]));
    for (k, v) in [
        ("user.name", "Dev"),
        ("user.email", "dev@example.com"),
        ("gpg.format", "ssh"),
        ("user.signingkey", key.to_str().unwrap()),
        ("gpg.ssh.allowedSignersFile", allowed.to_str().unwrap()),
    ] {
        ok(git(&["config", k, v]));
    }
    std::fs::write(repo.join("f"), b"signed by a derived key\n").unwrap();
    ok(git(&["add", "f"]));
    ok(git(&["commit", "-q", "-S", "-m", "signed"]));
    let v = git(&["verify-commit", "HEAD"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    assert!(
        String::from_utf8_lossy(&v.stderr).contains("Good \"git\" signature for dev@example.com"),
        "{}",
        String::from_utf8_lossy(&v.stderr)
    );
}
