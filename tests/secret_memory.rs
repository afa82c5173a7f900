//! Secret memory, seen from outside: another root process cannot read a
//! live process's memfd_secret memory through /proc/<pid>/mem, while it can
//! read ordinary memory of the same process; the handler's hardening makes
//! it non-dumpable with no core files.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, Read, Seek, SeekFrom};
use std::process::{Command, Stdio};

const PATTERN: &[u8; 32] = b"derived-keys secret pattern 0123";

/// Set in the child the test below runs.
const CHILD: &str = "DK_SECRET_CHILD";

/// The child's role: hold a secret and a plain copy, say where, wait
/// until the parent closes stdin.
fn hold_secret() {
    derived_keys::secret::harden();
    let secret = derived_keys::secret::SecretBuf::copy_from(PATTERN).unwrap();
    let plain = Box::new(*PATTERN);
    let dumpable = nix::sys::prctl::get_dumpable().unwrap();
    println!(
        "READY pid={} secret={:x} plain={:x} backing={} dumpable={dumpable}",
        std::process::id(),
        secret.addr(),
        plain.as_ptr() as usize,
        secret.backing().as_str()
    );
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap(); // until the parent is done
    drop(secret);
    println!("CHILD DONE");
}

fn read_mem(pid: &str, addr: usize) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    f.seek(SeekFrom::Start(addr as u64))?;
    let mut buf = vec![0u8; 32];
    f.read_exact(&mut buf)?;
    Ok(buf)
}

/// One test in two roles: run plainly, it runs this test binary again,
/// filtered to this very test, as the child that holds the secret. A
/// child that is skipped, fails or never says READY fails the test.
#[test]
fn root_cannot_read_secret_memory_of_a_live_process() {
    if std::env::var_os(CHILD).is_some() {
        hold_secret();
        return;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "root_cannot_read_secret_memory_of_a_live_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("READY") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "child said nothing");
    }
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(&format!("{k}=")))
            .unwrap()
            .to_owned()
    };
    let pid = field("pid");
    let secret = usize::from_str_radix(&field("secret"), 16).unwrap();
    let plain = usize::from_str_radix(&field("plain"), 16).unwrap();
    assert_eq!(
        field("backing"),
        "memfd_secret",
        "this machine kind has CONFIG_SECRETMEM"
    );
    assert_eq!(field("dumpable"), "false");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(core.split_whitespace().nth(4), Some("0"), "{core}");

    // We are root (CAP_SYS_PTRACE): ordinary memory is readable even though
    // the child is non-dumpable, which shows the read path works...
    assert_eq!(read_mem(&pid, plain).unwrap(), PATTERN);
    // ...and the secret is not: memfd_secret pages are not reachable
    // through /proc/<pid>/mem at all.
    match read_mem(&pid, secret) {
        Ok(bytes) => assert_ne!(bytes, PATTERN, "secret memory was read from outside"),
        Err(e) => assert!(
            matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EFAULT)),
            "{e}"
        ),
    }
    drop(child.stdin.take());
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success(), "the child failed: {rest}");
    assert!(
        rest.contains("CHILD DONE") && rest.contains("test result: ok. 1 passed"),
        "the child did not finish its test: {rest}"
    );
}
