//! Test harness: a private swtpm per test, and helpers for tpm2-tools.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use derived_keys::setup::{self, Layout};

/// A swtpm process with its own ports and state directory, stopped on drop:
/// on the host's loopback, or set up exactly as `dkey install` sets up the
/// embedded TPM (its own network namespace, locked down) in a scratch
/// install root.
pub struct Swtpm {
    child: Option<Child>,
    pub port: u16,
    pub ctrl_port: u16,
    state: tempfile::TempDir,
    embedded: Option<Layout>,
}

/// Ports for the tests' servers (swtpm, proxies, sshd, gnutls-serv): free,
/// and below the kernel's ephemeral range. Inside that range a client that
/// connects to a port nobody listens on yet (a test waiting for its server
/// to come up, a TCTI reconnecting) is now and then given that very port
/// as its own source port, and TCP connects the socket to itself: the
/// probe "succeeds" and the server then cannot bind its port. That was the
/// TPM the suite found unreachable on a first request, once every few
/// runs.
fn server_ports() -> std::ops::Range<u16> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32768u16);
    10000..low.saturating_sub(1).max(10002)
}

/// `n` consecutive free server ports (see [`server_ports`]), the first one
/// returned.
fn free_ports(n: u16) -> u16 {
    let range = server_ports();
    let span = u64::from(range.end - range.start - n);
    let mut x = u64::from(std::process::id())
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    loop {
        // xorshift: no rand dependency needed for picking a port.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = range.start + (x % span) as u16;
        let all: Vec<_> = (port..port + n)
            .map(|p| TcpListener::bind(("127.0.0.1", p)))
            .collect();
        if all.iter().all(Result::is_ok) {
            return port;
        }
    }
}

/// Whether a TCP socket listens on 127.0.0.1:`port` (/proc/net/tcp, state
/// 0A), without connecting to it.
fn listening(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&want.as_str()) && f.get(3) == Some(&"0A")
        })
    })
}

/// The swtpm TCTI expects the control port right after the server port.
pub fn free_port_pair() -> (u16, u16) {
    let port = free_ports(2);
    (port, port + 1)
}

/// One free server port.
pub fn free_port() -> u16 {
    free_ports(1)
}

impl Swtpm {
    /// The swtpm process id (0 if it is not running).
    pub fn pid(&self) -> i32 {
        if let Some(l) = &self.embedded {
            return std::fs::read_to_string(l.swtpm_pid())
                .ok()
                .and_then(|p| p.trim().parse().ok())
                .unwrap_or(0);
        }
        self.child
            .as_ref()
            .map_or(0, |c| i32::try_from(c.id()).unwrap_or(0))
    }

    pub fn start() -> Swtpm {
        let mut last = String::new();
        // Ports are picked free, then released; retry if another test won the race.
        for _ in 0..5 {
            let (port, ctrl_port) = free_port_pair();
            let mut s = Swtpm {
                child: None,
                port,
                ctrl_port,
                state: tempfile::Builder::new()
                    .prefix("dk-swtpm-")
                    .tempdir()
                    .unwrap(),
                embedded: None,
            };
            match s.spawn() {
                Ok(()) => return s,
                Err(e) => last = e,
            }
        }
        panic!("swtpm did not start: {last}");
    }

    /// The embedded software TPM of a scratch install root, started and
    /// locked down by the library's own install steps.
    pub fn start_embedded() -> Swtpm {
        let root = tempfile::Builder::new()
            .prefix("dk-embedded-")
            .tempdir()
            .unwrap();
        let layout = Layout {
            root: root.path().to_path_buf(),
        };
        let mut s = Swtpm {
            child: None,
            port: setup::SWTPM_PORT,
            ctrl_port: setup::SWTPM_PORT + 1,
            state: root,
            embedded: Some(layout),
        };
        s.spawn_embedded();
        s
    }

    fn spawn_embedded(&mut self) {
        let layout = self.embedded.as_ref().unwrap();
        setup::start_embedded_swtpm(layout).unwrap();
        setup::lockdown_embedded(layout).unwrap();
    }

    /// The scratch install root of an embedded TPM.
    pub fn layout(&self) -> Option<&Layout> {
        self.embedded.as_ref()
    }

    /// Configuration lines (in `[tpm]`) that reach this TPM besides its TCTI.
    pub fn conf_lines(&self) -> String {
        match &self.embedded {
            None => String::new(),
            Some(l) => format!(
                "netns = \"{}\"\nowner_auth_file = \"{}\"\n",
                l.tpm_netns().display(),
                l.owner_auth().display()
            ),
        }
    }

    /// The command prefix that puts a program where it reaches this TPM.
    fn wrap(&self) -> Vec<String> {
        match &self.embedded {
            None => Vec::new(),
            Some(l) => vec![
                "nsenter".into(),
                format!("--net={}", l.tpm_netns().display()),
            ],
        }
    }

    fn spawn(&mut self) -> Result<(), String> {
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2"])
            .arg("--server")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", self.port))
            .arg("--ctrl")
            .arg(format!(
                "type=tcp,port={},bindaddr=127.0.0.1",
                self.ctrl_port
            ))
            .arg("--tpmstate")
            .arg(format!("dir={}", self.state.path().display()))
            .args(["--flags", "not-need-init,startup-clear"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run swtpm: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(format!("swtpm exited with {status}"));
            }
            // The control port by a connection, the server's by the
            // kernel's socket table: swtpm serves one client at a time,
            // and a probe there would be the first.
            if listening(self.port) && TcpStream::connect(("127.0.0.1", self.ctrl_port)).is_ok() {
                // Still ours a moment later: a swtpm that lost a port to
                // another test's exits, and the probe may have reached the
                // other's.
                std::thread::sleep(Duration::from_millis(20));
                if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                    self.child = None;
                    return Err(format!("swtpm exited with {status} after it listened"));
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        Err("swtpm did not listen within 10 s".into())
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    pub fn state_dir(&self) -> PathBuf {
        match &self.embedded {
            Some(l) => l.swtpm_state(),
            None => self.state.path().to_path_buf(),
        }
    }

    /// Kills swtpm; its state directory stays for `restart`.
    pub fn stop(&mut self) {
        if let Some(l) = &self.embedded {
            let _ = setup::stop_embedded_swtpm(l);
            return;
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts swtpm again on the same ports and state.
    pub fn restart(&mut self) {
        self.stop();
        if self.embedded.is_some() {
            self.spawn_embedded();
        } else {
            self.spawn().unwrap();
        }
    }

    /// A tpm2-tools (or other) command that reaches this TPM.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut all = self.wrap();
        all.extend(args.iter().map(|a| a.to_string()));
        let mut c = Command::new(&all[0]);
        c.args(&all[1..]).env("TPM2TOOLS_TCTI", self.tcti());
        c
    }

    /// Runs a tpm2-tools command against this TPM.
    pub fn tool(&self, args: &[&str]) -> std::process::Output {
        let out = self.command(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Flushes every transient object, the broker's primary included (the
    /// broker re-creates it on its next request), as another client might.
    pub fn flush_all(&self) {
        self.tool(&["tpm2_flushcontext", "-t"]);
    }

    /// TPM2_Clear with the (empty) platform authorization.
    pub fn clear(&self) {
        self.tool(&["tpm2_clear", "-c", "p"]);
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
        // Its TPM lock file; nothing uses this TPM any more.
        let netns = self.embedded.as_ref().map(Layout::tpm_netns);
        let _ = std::fs::remove_file(derived_keys::broker::tpm_lock_path(
            &self.tcti(),
            netns.as_deref(),
        ));
    }
}

pub fn scratch_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("dk-test-")
        .tempdir()
        .unwrap()
}

pub fn write(path: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

/// /proc/keys as text. Lossy: other keys' descriptions may be any bytes.
pub fn proc_keys() -> String {
    String::from_utf8_lossy(&std::fs::read("/proc/keys").unwrap()).into_owned()
}

/// The errno whose strerror text is `msg` (keyctl prints `request_key: <msg>`).
pub fn errno_from_message(msg: &str) -> Option<i32> {
    (1..200).find(|&e| {
        let s = std::io::Error::from_raw_os_error(e).to_string();
        let text = s.split(" (os error").next().unwrap_or_default();
        msg.trim_end().ends_with(text)
    })
}

/// One installed request-key rule for a private description prefix, a
/// private swtpm and a private configuration; all removed on drop.
pub struct KernelEnv {
    pub swtpm: Swtpm,
    pub dir: tempfile::TempDir,
    pub prefix: String,
    pub conf: PathBuf,
    rule: PathBuf,
}

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// What a request through the kernel gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    Key {
        serial: i32,
        payload: Vec<u8>,
    },
    /// A key that exists but whose payload cannot be read (logon).
    Unreadable {
        serial: i32,
        read_errno: i32,
    },
    Err(i32),
}

impl Got {
    pub fn payload(&self) -> Vec<u8> {
        match self {
            Got::Key { payload, .. } => payload.clone(),
            other => panic!("expected a key, got {other:?}"),
        }
    }
    pub fn errno(&self) -> i32 {
        match self {
            Got::Err(e) => *e,
            other => panic!("expected an error, got {other:?}"),
        }
    }
}

impl KernelEnv {
    /// `conf_extra` is appended to the configuration (after `[tpm]` keys).
    pub fn new(conf_extra: &str) -> KernelEnv {
        let swtpm = Swtpm::start();
        let tcti = swtpm.tcti();
        KernelEnv::with_tcti(swtpm, &tcti, conf_extra)
    }

    /// With the embedded TPM as `dkey install` sets it up (in a scratch root).
    pub fn embedded(conf_extra: &str) -> KernelEnv {
        let swtpm = Swtpm::start_embedded();
        let tcti = swtpm.tcti();
        let extra = swtpm.conf_lines() + conf_extra;
        KernelEnv::with_tcti(swtpm, &tcti, &extra)
    }

    pub fn with_tcti(swtpm: Swtpm, tcti: &str, conf_extra: &str) -> KernelEnv {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("dkt{}x{n}", std::process::id());
        let dir = scratch_dir();
        let conf = dir.path().join("derived-keys.conf");
        let env = KernelEnv {
            swtpm,
            prefix: prefix.clone(),
            conf: conf.clone(),
            rule: PathBuf::from(format!("/etc/request-key.d/{prefix}.conf")),
            dir,
        };
        // Every request reaches the TPM unless a test turns hot keys on.
        let hot = if conf_extra.contains("hot_key_s") {
            ""
        } else {
            "hot_key_s = 0\n"
        };
        env.write_conf(&format!(
            "[tpm]\ntcti = \"{tcti}\"\ntimeout_ms = 3000\n{hot}{conf_extra}\n"
        ));
        let helper = env!("CARGO_BIN_EXE_derived-key-helper");
        let line = |ty: &str| {
            format!(
                "create {ty} {prefix}:* * {helper} --config {} --prefix {prefix} %k %u %g\n",
                conf.display()
            )
        };
        std::fs::write(&env.rule, line("user") + &line("logon")).unwrap();
        env
    }

    pub fn write_conf(&self, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&self.conf, text).unwrap();
        std::fs::set_permissions(&self.conf, std::fs::Permissions::from_mode(0o644)).unwrap();
        // Let non-root test users reach nothing here but what they need.
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    }

    /// The longest name and callout the kernel passes on: with the
    /// prefix, a 4,095-byte description, and a 4,095-byte callout (both
    /// malformed: too long a name, too long an account).
    pub fn longest_name_and_callout(&self) -> (String, String) {
        let name = "n".repeat(4095 - self.prefix.len() - 1);
        assert_eq!(self.desc(&name).len(), 4095);
        let callout = format!("32 user account={}", "a".repeat(4095 - 16));
        assert_eq!(callout.len(), 4095);
        (name, callout)
    }

    /// `<prefix>:<rest>`.
    pub fn desc(&self, rest: &str) -> String {
        format!("{}:{rest}", self.prefix)
    }

    /// Requests through the kernel with keyctl, in a new session keyring,
    /// optionally wrapped (setpriv, unshare, a copied keyctl...).
    pub fn request_with(
        &self,
        wrapper: &[&str],
        keyctl: &str,
        ty: &str,
        rest: &str,
        callout: &str,
    ) -> Got {
        request_described(wrapper, keyctl, ty, &self.desc(rest), callout)
    }

    /// A rule of this test's for another prefix (`<prefix><suffix>`): our
    /// handler with `config`. Its prefix, and the rule (removed on drop).
    pub fn rule_for(&self, suffix: &str, config: &Path) -> (String, RuleFile) {
        let prefix = format!("{}{suffix}", self.prefix);
        let helper = env!("CARGO_BIN_EXE_derived-key-helper");
        let program = format!(
            "{helper} --config {} --prefix {prefix} %k %u %g",
            config.display()
        );
        let rule = RuleFile::install(&prefix, &program);
        (prefix, rule)
    }
}

/// A request-key rule file of a test's own,
/// `/etc/request-key.d/<prefix>.conf`, removed on drop.
pub struct RuleFile {
    pub path: PathBuf,
}

impl RuleFile {
    /// `create user <prefix>:* * <program>`.
    pub fn install(prefix: &str, program: &str) -> RuleFile {
        let path = PathBuf::from(format!("/etc/request-key.d/{prefix}.conf"));
        std::fs::write(&path, format!("create user {prefix}:* * {program}\n")).unwrap();
        RuleFile { path }
    }
}

impl Drop for RuleFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A request for the whole `description` through the kernel with keyctl,
/// in a new session keyring, optionally wrapped.
pub fn request_described(
    wrapper: &[&str],
    keyctl: &str,
    ty: &str,
    description: &str,
    callout: &str,
) -> Got {
    let script = r#"
            id=$("$KEYCTL" request2 "$1" "$2" "$3" @s) || exit 3
            echo "serial=$id"
            f=$(mktemp); e=$(mktemp)
            if "$KEYCTL" pipe "$id" >"$f" 2>"$e"; then
                echo "payload=$(od -An -v -tx1 <"$f" | tr -d ' \n')"
            else
                echo "readerr=$(cat "$e")"
            fi
            rm -f "$f" "$e"
        "#;
    let mut cmd: Vec<&str> = wrapper.to_vec();
    cmd.extend_from_slice(&[keyctl, "session", "-", "bash", "-c", script, "sh", ty]);
    cmd.push(description);
    cmd.push(callout);
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .env("KEYCTL", keyctl)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let field = |k: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")).map(str::to_owned))
    };
    let Some(serial) = field("serial").and_then(|s| s.trim().parse().ok()) else {
        let line = stderr
            .lines()
            .find(|l| l.starts_with("request_key:"))
            .unwrap_or_else(|| panic!("no result: {stdout} {stderr}"));
        return Got::Err(errno_from_message(line).unwrap_or_else(|| panic!("{line}")));
    };
    match field("readerr") {
        Some(e) => Got::Unreadable {
            serial,
            read_errno: errno_from_message(&e).unwrap_or(-1),
        },
        None => Got::Key {
            serial,
            payload: hex::decode(field("payload").unwrap_or_default()).unwrap(),
        },
    }
}

impl KernelEnv {
    pub fn request(&self, ty: &str, rest: &str, callout: &str) -> Got {
        self.request_with(&[], "keyctl", ty, rest, callout)
    }

    /// The same request as another uid (and gid), with no supplementary groups.
    pub fn request_as(&self, uid: u32, ty: &str, rest: &str, callout: &str) -> Got {
        let u = format!("--reuid={uid}");
        let g = format!("--regid={uid}");
        self.request_with(
            &["setpriv", &u, &g, "--clear-groups"],
            "keyctl",
            ty,
            rest,
            callout,
        )
    }
}

impl KernelEnv {
    /// `keyctl request2 user <desc> <callout> @p` as `uid` (and its gid,
    /// no supplementary groups): the key goes into the process's own
    /// keyring, gone with it. Output streams are the caller's to set.
    pub fn keyctl_as(&self, uid: u32, rest: &str, callout: &str) -> Command {
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "keyctl",
            "request2",
            "user",
            &self.desc(rest),
            callout,
            "@p",
        ]);
        c
    }
}

impl KernelEnv {
    /// Stops the TPM broker serving the current configuration and waits
    /// until it has flushed its primary and gone.
    pub fn stop_broker(&self) {
        let Ok(config) = derived_keys::config::Config::load(&self.conf) else {
            return;
        };
        let paths = derived_keys::broker::paths(&config);
        derived_keys::broker::stop(&config);
        let end = Instant::now() + Duration::from_secs(5);
        while paths.pid.exists() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for KernelEnv {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.rule);
        self.stop_broker();
        // The broker's runtime files that outlive it (the drop counter is
        // kept for the next broker of the same configuration): this
        // configuration has no next broker.
        if let Ok(config) = derived_keys::config::Config::load(&self.conf) {
            let paths = derived_keys::broker::paths(&config);
            for p in [paths.lock, paths.dropped, paths.audit] {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// A "TPM" that accepts connections on a server and control port pair and
/// never answers; returns its TCTI.
pub fn hung_tpm() -> String {
    loop {
        let (port, ctrl) = free_port_pair();
        let (Ok(a), Ok(b)) = (
            TcpListener::bind(("127.0.0.1", port)),
            TcpListener::bind(("127.0.0.1", ctrl)),
        ) else {
            continue;
        };
        for l in [a, b] {
            std::thread::spawn(move || {
                let mut held = Vec::new();
                for s in l.incoming().flatten() {
                    held.push(s);
                }
            });
        }
        return format!("swtpm:host=127.0.0.1,port={port}");
    }
}

/// Makes an executable copy of `src` at `dst`, plus `extra` bytes, in a
/// child process: a write descriptor held by this (multi-threaded) test
/// process could leak into a sibling test's fork and make exec fail with
/// ETXTBSY.
pub fn copy_executable(src: &str, dst: &Path, extra: &str) {
    let st = Command::new("sh")
        .args([
            "-c",
            "cp \"$1\" \"$2\" && printf '%s' \"$3\" >> \"$2\" && chmod 755 \"$2\"",
            "sh",
            src,
        ])
        .arg(dst)
        .arg(extra)
        .status()
        .unwrap();
    assert!(st.success());
}

/// A TCP proxy pair (command and control port) in front of `swtpm`, where
/// a probe on a TPM's bus or an interposer would sit: every byte both ways
/// goes into the returned log, and each answer from the TPM is held back
/// `delay` (a slow TPM). Returns its TCTI.
pub fn proxy(
    swtpm: &Swtpm,
    delay: Duration,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};
    fn forward(listen: TcpListener, upstream: u16, log: Arc<Mutex<Vec<u8>>>, delay: Duration) {
        std::thread::spawn(move || {
            for client in listen.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                for (mut from, mut to, wait) in [
                    (
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        Duration::ZERO,
                    ),
                    (server, client, delay),
                ] {
                    let log = log.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 4096];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            std::thread::sleep(wait);
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            log.lock().unwrap().extend_from_slice(&buf[..n]);
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
    }
    let log = Arc::new(Mutex::new(Vec::new()));
    loop {
        let (port, ctrl) = free_port_pair();
        let (Ok(a), Ok(b)) = (
            TcpListener::bind(("127.0.0.1", port)),
            TcpListener::bind(("127.0.0.1", ctrl)),
        ) else {
            continue;
        };
        forward(a, swtpm.port, log.clone(), delay);
        forward(b, swtpm.ctrl_port, log.clone(), delay);
        return (format!("swtpm:host=127.0.0.1,port={port}"), log);
    }
}
