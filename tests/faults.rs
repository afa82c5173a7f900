//! Faults: each gives the contract's errno promptly, through the kernel,
//! and never a hang or an unanswered request.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use std::time::{Duration, Instant};

use common::{Got, KernelEnv};

/// Several times the harness's TPM bound (3 s): a request that took this
/// long hung; one that merely ran slowly on a loaded machine did not.
const HANG: Duration = Duration::from_secs(10);

/// A request that must not hang; its errno (or key) says what happened.
fn quickly(env: &KernelEnv, rest: &str, callout: &str) -> Got {
    let t = Instant::now();
    let got = env.request("user", rest, callout);
    assert!(t.elapsed() < HANG, "took {:?}", t.elapsed());
    got
}

/// A listener where the handler looks for `env`'s broker, for a test to
/// play the broker; and its path, for the test to remove once done.
fn fake_broker(env: &KernelEnv) -> (std::os::unix::net::UnixListener, std::path::PathBuf) {
    use std::os::unix::fs::DirBuilderExt;
    let config = derived_keys::config::Config::load(&env.conf).unwrap();
    let socket = derived_keys::broker::paths(&config).socket;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(derived_keys::broker::RUN_DIR)
        .unwrap();
    let _ = std::fs::remove_file(&socket);
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    (listener, socket)
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
    let reference = env.request("user", "db", "32 user").payload();
    env.stop_broker();
    env.swtpm.tool(&["tpm2_changeauth", "-c", "o", "pw"]);
    let auth = env.dir.path().join("owner-auth");
    std::fs::write(&auth, "pw\n").unwrap();
    std::fs::set_permissions(&auth, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    env.write_conf(&format!(
        "[tpm]\ntcti = \"{}\"\nhot_key_s = 0\nowner_auth_file = \"{}\"\n",
        env.swtpm.tcti(),
        auth.display()
    ));
    assert_eq!(
        quickly(&env, "db#shared", "32 user"),
        Got::Err(libc::ENODEV)
    );
    // The same file, the same password, private: the mode alone was refused.
    std::fs::set_permissions(&auth, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    assert_eq!(quickly(&env, "db#private", "32 user").payload(), reference);
}

/// The broker dies in the middle of a request (here: killed while the TPM
/// is stopped and its command hangs). The handler answers EIO at once
/// instead of waiting out its bound, and the next request starts a fresh
/// broker over the dead one's socket and pid files.
#[test]
fn broker_killed_mid_request_gives_eio_and_is_replaced() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let sock_dir = common::scratch_dir();
    let sock = sock_dir.path().join("log");
    let rx = std::os::unix::net::UnixDatagram::bind(&sock).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let env = KernelEnv::new("");
    env.write_conf(&format!(
        "[tpm]\ntcti = \"{}\"\ntimeout_ms = 30000\nhot_key_s = 0\n[log]\ntarget = \"syslog\"\nsocket = \"{}\"\n",
        env.swtpm.tcti(),
        sock.display()
    ));
    let first = quickly(&env, "db", "32 user");
    assert!(matches!(first, Got::Key { .. }), "{first:?}");
    let config = derived_keys::config::Config::load(&env.conf).unwrap();
    let paths = derived_keys::broker::paths(&config);
    let broker = Pid::from_raw(
        std::fs::read_to_string(&paths.pid)
            .unwrap()
            .trim()
            .parse()
            .unwrap(),
    );
    let swtpm = Pid::from_raw(env.swtpm.pid());

    kill(swtpm, Signal::SIGSTOP).unwrap();
    let t = Instant::now();
    let got = std::thread::scope(|s| {
        let pending = s.spawn(|| env.request("user", "db#2", "32 user"));
        std::thread::sleep(Duration::from_millis(300));
        kill(broker, Signal::SIGKILL).unwrap();
        pending.join().unwrap()
    });
    kill(swtpm, Signal::SIGCONT).unwrap();
    assert_eq!(got, Got::Err(libc::EIO));
    // At once: well before the 30 s bound the handler would otherwise wait out.
    assert!(t.elapsed() < HANG, "{:?}", t.elapsed());
    assert!(paths.socket.exists(), "a killed broker leaves its socket");
    // The handler answered alone, so it wrote the audit line, to the
    // syslog socket the broker's hello named.
    let mut buf = [0u8; 2048];
    let line = loop {
        let n = rx.recv(&mut buf).expect("the handler's audit line");
        let l = String::from_utf8_lossy(&buf[..n]).into_owned();
        if l.contains("derived-keys: EIO") {
            break l;
        }
    };
    assert!(line.starts_with("<85>derived-key-helper["), "{line}");
    assert!(
        line.contains("uid=0 ") && line.contains(r"the\x20broker\x20closed\x20the\x20connection"),
        "{line}"
    );

    let again = quickly(&env, "db#3", "32 user");
    match (first, again) {
        (Got::Key { payload: a, .. }, Got::Key { payload: b, .. }) => assert_eq!(a, b),
        other => panic!("{other:?}"),
    }
    let new = std::fs::read_to_string(&paths.pid).unwrap();
    assert_ne!(new.trim(), broker.as_raw().to_string());
}

/// A broker that closes connections without answering (one stopping just
/// as a request arrives, before any worker took it): the handler goes
/// again, to the broker that follows, instead of failing the request.
#[test]
fn connections_dropped_before_the_hello_are_retried() {
    let env = KernelEnv::new("");
    let (listener, socket) = fake_broker(&env);
    let dropped = std::thread::spawn({
        let socket = socket.clone();
        move || {
            // Close two connections unanswered, then go away.
            for _ in 0..2 {
                drop(listener.accept().unwrap());
            }
            std::fs::remove_file(&socket).unwrap();
            2
        }
    });
    let got = quickly(&env, "db", "32 user");
    assert!(matches!(got, Got::Key { .. }), "{got:?}");
    assert_eq!(dropped.join().unwrap(), 2);
}

/// The processes whose parent is `pid`.
fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // "pid (comm) state ppid ...": the last ')' ends the comm, which
        // may hold spaces and parentheses.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// How many views of /proc/keys the broker holds open (one per uid it
/// made one for; a plain read's descriptor is closed by the request).
fn views_held(broker: i32) -> usize {
    std::fs::read_dir(format!("/proc/{broker}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t == std::path::Path::new("/proc/keys"))
        })
        .count()
}

/// The process that makes the broker's per-uid views of /proc/keys gone
/// (killed) or stuck (stopped), with a request bound of 1 s: a uid
/// without a view yet is served all the same, from a plain read of the
/// file, within the bound, with the key a broker with its views gives;
/// root is served on; the broker still stops when asked. A stopped maker
/// that goes on is not given up: the answer it owes is taken by the next
/// request of that uid, whose view the broker then keeps.
#[test]
fn a_view_maker_killed_or_stuck_costs_no_request() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    for (signal, uid) in [(Signal::SIGKILL, 4361), (Signal::SIGSTOP, 4363)] {
        let env = KernelEnv::new("");
        // A bound the maker's longest wait (1 s) would overrun.
        env.write_conf(&format!(
            "[tpm]\ntcti = \"{}\"\ntimeout_ms = 1000\nhot_key_s = 0\n",
            env.swtpm.tcti()
        ));
        let root_key = quickly(&env, "db", "32 user").payload();
        let config = derived_keys::config::Config::load(&env.conf).unwrap();
        let paths = derived_keys::broker::paths(&config);
        let broker: i32 = std::fs::read_to_string(&paths.pid)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The broker's one child: the view maker (views' own children are
        // the maker's, and gone once they have passed their view on).
        let makers = children(broker);
        assert_eq!(makers.len(), 1, "{signal:?}: children {makers:?}");
        let maker = Pid::from_raw(makers[0]);
        // Root's view, which the broker makes at start, first.
        let end = Instant::now() + HANG;
        while views_held(broker) == 0 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(views_held(broker), 1, "{signal:?}: root's view");
        kill(maker, signal).unwrap();

        let first = match env.request_as(uid, "user", "own", "32 user") {
            Got::Key { payload, .. } => payload,
            other => panic!("{signal:?}: {other:?}"),
        };
        if signal == Signal::SIGSTOP {
            kill(maker, Signal::SIGCONT).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            let again = env.request_as(uid, "user", "own#2", "32 user").payload();
            assert_eq!(first, again);
            assert_eq!(views_held(broker), 2, "root's view and the late one");
        } else {
            let next = env.request_as(uid + 1, "user", "own", "32 user");
            assert!(matches!(next, Got::Key { .. }), "{signal:?}: {next:?}");
            assert_eq!(views_held(broker), 1, "root's view only");
        }
        assert_eq!(
            quickly(&env, "db#2", "32 user").payload(),
            root_key,
            "{signal:?}"
        );

        env.stop_broker();
        assert!(!paths.pid.exists(), "{signal:?}: the broker did not stop");
        // Its successor, with a maker of its own, derives the same key.
        let again = env.request_as(uid, "user", "own#3", "32 user").payload();
        assert_eq!(first, again, "{signal:?}");
    }
}

/// A broker whose hello names no keyring for the authorization key: the
/// handler cannot make its line visible, so it refuses the request itself
/// (EIO) rather than send an upcall the broker could only misread.
#[test]
fn a_hello_without_a_keyring_is_eio() {
    use derived_keys::wire::{Hello, LogTo, MAX_HELLO};
    use std::io::{Read, Write};
    let env = KernelEnv::new("");
    let (listener, socket) = fake_broker(&env);
    let fake = std::thread::spawn({
        let socket = socket.clone();
        move || {
            let (mut s, _) = listener.accept().unwrap();
            let hello = Hello {
                log: LogTo::Stderr,
                bound_ms: 3000,
                negative_s: 1,
                keys_ring: 0,
                log_path: b"",
            };
            let mut buf = [0u8; MAX_HELLO];
            let n = hello.encode(&mut buf).unwrap();
            s.write_all(&buf[..n]).unwrap();
            // What the handler sends after that hello: nothing.
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            std::fs::remove_file(&socket).unwrap();
            rest.len()
        }
    });
    let got = quickly(&env, "db", "32 user");
    assert_eq!(got, Got::Err(libc::EIO));
    assert_eq!(fake.join().unwrap(), 0, "the handler sent an upcall");
}

/// Plays `env`'s broker for one request: a hello naming a session keyring
/// of its own (made as the broker makes its) for the authorization key,
/// then the upcall, which `inspect` sees while the request waits, then a
/// refusal (EINVAL). What `inspect` returned, once the request is over.
fn one_upcall<T: Send + 'static>(
    env: &KernelEnv,
    inspect: impl FnOnce(&derived_keys::wire::Upcall<'_>) -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    use derived_keys::wire::{Answer, Hello, LogTo, Progress, Upcall, MAX_HELLO, MAX_UPCALL};
    use std::io::{Read, Write};
    let (listener, socket) = fake_broker(env);
    std::thread::spawn(move || {
        derived_keys::keyring::detach().unwrap();
        let ring = derived_keys::keyring::session_for_handlers().unwrap();
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let hello = Hello {
            log: LogTo::Stderr,
            bound_ms: 3000,
            negative_s: 1,
            keys_ring: ring,
            log_path: b"",
        };
        let mut buf = [0u8; MAX_HELLO];
        let n = hello.encode(&mut buf).unwrap();
        s.write_all(&buf[..n]).unwrap();
        let mut up = vec![0u8; MAX_UPCALL];
        let mut have = 0;
        let len = loop {
            match s.read(&mut up[have..]).unwrap() {
                0 => panic!("the handler closed before its upcall was whole"),
                k => have += k,
            }
            match Upcall::progress(&up[..have]) {
                Progress::Complete(n) if have >= n => break n,
                Progress::Invalid => panic!("malformed upcall"),
                _ => {}
            }
        };
        let got = inspect(&Upcall::decode(&up[..len]).expect("malformed upcall"));
        let answer = Answer {
            errno: libc::EINVAL as u8,
            timeout_s: 1,
            len: 0,
        };
        s.write_all(&answer.encode()).unwrap();
        let _ = s.read_to_end(&mut Vec::new());
        std::fs::remove_file(&socket).unwrap();
        got
    })
}

/// While a request is under way, the session keyring the kernel made for
/// it (`_req.<key>`) no longer lets its possessors view it: once the
/// request is over it waits for the key collector, and every reader of
/// /proc/keys (the broker's view of its owner's keys) would otherwise
/// search its own keyrings for it. The fake broker looks at the keyring's
/// line when the upcall arrives.
#[test]
fn the_request_session_keyring_is_not_viewed_through_possession() {
    let env = KernelEnv::new("");
    let fake = one_upcall(&env, |up| {
        // `<serial> <flags> <usage> <timeout> <perm> <uid> <gid> keyring
        // _req.<key>: <links>`
        let field = format!("_req.{}:", up.key as u32);
        std::fs::read_to_string("/proc/keys")
            .unwrap()
            .lines()
            .find(|l| l.split_whitespace().nth(8) == Some(&field[..]))
            .map(str::to_owned)
    });
    assert_eq!(quickly(&env, "db", "32 user"), Got::Err(libc::EINVAL));
    let line = fake
        .join()
        .unwrap()
        .expect("no _req keyring line in /proc/keys");
    let perm = line.split_whitespace().nth(4).unwrap();
    assert_eq!(perm, "3e030000", "{line}");
}

/// The longest description and callout the kernel passes on (4,095 bytes
/// each) reach the broker byte for byte: the handler reads both straight
/// into its message.
#[test]
fn the_longest_description_and_callout_arrive_whole() {
    let env = KernelEnv::new("");
    let (name, callout) = env.longest_name_and_callout();
    let desc = env.desc(&name);
    let fake = one_upcall(&env, |up| (up.describe.to_vec(), up.callout.to_vec()));
    assert_eq!(quickly(&env, &name, &callout), Got::Err(libc::EINVAL));
    let (describe, got_callout) = fake.join().unwrap();
    // `user;<uid>;<gid>;<perm>;<description>`
    let describe = String::from_utf8(describe).unwrap();
    assert!(describe.starts_with("user;"), "{}", &describe[..40]);
    assert!(
        describe.ends_with(&format!(";{desc}")),
        "{}",
        describe.len()
    );
    assert_eq!(got_callout, callout.as_bytes());
}
