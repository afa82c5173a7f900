//! `dkey install`, `uninstall` and `status`: putting the handler, the rule
//! and the configuration in place, and the embedded software TPM for hosts
//! without a TPM device.
//!
//! The embedded swtpm listens on 127.0.0.1 inside a network namespace of
//! its own (see [`crate::netns`]: tss-esapi 7 cannot reach swtpm's unix
//! socket), so no other local user can connect to it, for commands or
//! control. Install also locks it down: random owner, endorsement and
//! lockout passwords in root-only files, and after every start a random,
//! discarded platform password, so that not even a root process without
//! the files can derive keys, clear the TPM or change its passwords. See
//! THREAT-MODEL.md.

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{Config, DEFAULT_PATH};
use crate::derive::{Input, Purpose, Subject};
use crate::secret::{self, SecretBuf};
use crate::tpm::{HierarchyAuth, Tcti, Tpm, TpmError};

/// The rule file shipped in request-key/.
pub const RULE: &str = include_str!("../request-key/derived-keys.conf");
/// The default configuration shipped in conf/.
pub const DEFAULT_CONFIG: &str = include_str!("../conf/derived-keys.conf");
/// The defaults earlier releases shipped: a configuration install wrote
/// from one of them and nobody edited is replaced on upgrade, not kept.
const PREVIOUS_DEFAULTS: &[&str] = &[include_str!("../conf/previous/0.1-derived-keys.conf")];

/// Where everything goes. Fixed paths; `root` lets tests install into a
/// scratch tree (the kernel only reads the real one).
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Default for Layout {
    fn default() -> Self {
        Layout { root: "/".into() }
    }
}

impl Layout {
    fn at(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }
    pub fn handler(&self) -> PathBuf {
        self.at("/usr/local/libexec/derived-key-helper")
    }
    /// The TPM broker, beside the handler (which starts it from there).
    pub fn broker(&self) -> PathBuf {
        self.at("/usr/local/libexec/derived-keys-broker")
    }
    pub fn dkey(&self) -> PathBuf {
        self.at("/usr/local/bin/dkey")
    }
    pub fn rule(&self) -> PathBuf {
        self.at("/etc/request-key.d/derived-keys.conf")
    }
    pub fn config(&self) -> PathBuf {
        self.at(DEFAULT_PATH)
    }
    pub fn owner_auth(&self) -> PathBuf {
        self.at("/etc/derived-keys/owner-auth")
    }
    pub fn lockout_auth(&self) -> PathBuf {
        self.at("/etc/derived-keys/lockout-auth")
    }
    pub fn endorsement_auth(&self) -> PathBuf {
        self.at("/etc/derived-keys/endorsement-auth")
    }
    /// Runtime files: root only (0700), on tmpfs.
    pub fn run_dir(&self) -> PathBuf {
        self.at(crate::helper::RUN_DIR)
    }
    /// The embedded software TPM's private network namespace (a bind mount).
    pub fn tpm_netns(&self) -> PathBuf {
        self.at("/run/derived-keys/tpm.netns")
    }
    pub fn swtpm_state(&self) -> PathBuf {
        self.at("/var/lib/derived-keys/swtpm")
    }
    pub fn swtpm_pid(&self) -> PathBuf {
        self.at("/run/derived-keys/swtpm.pid")
    }
    pub fn swtpm_unit(&self) -> PathBuf {
        self.at("/etc/systemd/system/derived-keys-swtpm.service")
    }
}

/// The embedded software TPM's ports (swtpm's and tpm2-tools' defaults),
/// inside its own network namespace: the host's ports stay free.
pub const SWTPM_PORT: u16 = 2321;
pub const SWTPM_TCTI: &str = "swtpm:host=127.0.0.1,port=2321";

/// Setup's errors; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{what} needs root; run it with sudo")]
    NotRoot { what: &'static str },
    #[error("{path}: {action} failed")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the handler binary {path} is missing; build it first (cargo build --release) and run dkey from the same build")]
    NoHandlerBuild { path: PathBuf },
    #[error("TCTI: {0}")]
    Tcti(#[source] TpmError),
    #[error("cannot start the software TPM: {reason}")]
    Swtpm { reason: String },
    #[error("software TPM lockdown: {0}")]
    Lockdown(#[source] TpmError),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error("the TPM's owner hierarchy has a password but {path} is missing; put the password there (root-owned, mode 0600) and run install again")]
    LostOwnerAuth { path: PathBuf },
    #[error(transparent)]
    Memory(#[from] secret::SecretAllocError),
}

fn io<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(std::io::Error) -> SetupError + 'a {
    move |source| SetupError::Io {
        path: path.to_owned(),
        action,
        source,
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Writes `bytes` to `path` atomically (temporary file, then rename).
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SetupError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(io(dir, "create directory"))?;
    let tmp = dir.join(format!(
        ".{}.dkey-tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp, "create"))?;
    f.write_all(bytes).map_err(io(&tmp, "write"))?;
    f.sync_all().map_err(io(&tmp, "sync"))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(io(&tmp, "chmod"))?;
    std::fs::rename(&tmp, path).map_err(io(path, "rename into place"))
}

/// What happened to one installed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Created,
    Updated,
    Unchanged,
    /// An edited file was left alone; the proposed one is beside it.
    KeptEdited {
        proposed: PathBuf,
    },
    Removed,
    Absent,
    /// Left in place on purpose (state or secrets); `--purge` removes it.
    Kept,
}

/// One line of an install or uninstall report.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub what: String,
    pub path: PathBuf,
    pub change: Change,
}

/// Installs `bytes` at `path` unless identical.
fn install_file(path: &Path, bytes: &[u8], mode: u32) -> Result<Change, SetupError> {
    match std::fs::read(path) {
        Ok(old) if old == bytes => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(io(path, "chmod"))?;
            Ok(Change::Unchanged)
        }
        Ok(_) => write_atomic(path, bytes, mode).map(|()| Change::Updated),
        Err(_) => write_atomic(path, bytes, mode).map(|()| Change::Created),
    }
}

/// The configuration install writes: the shipped one with this TCTI and,
/// for the embedded software TPM, its namespace and owner password file.
pub fn config_text(tcti: &Tcti, netns: Option<&Path>, owner_auth: Option<&Path>) -> String {
    render(DEFAULT_CONFIG, tcti, netns, owner_auth)
}

/// A shipped default with install's values filled in.
fn render(default: &str, tcti: &Tcti, netns: Option<&Path>, owner_auth: Option<&Path>) -> String {
    let mut out = String::new();
    for line in default.lines() {
        if line.starts_with("tcti = ") {
            out.push_str(&format!("tcti = \"{}\"\n", tcti.as_str()));
        } else if let (Some(p), true) = (netns, line.starts_with("# netns = ")) {
            out.push_str(&format!("netns = \"{}\"\n", p.display()));
        } else if line.starts_with("# owner_auth_file = ") {
            match owner_auth {
                Some(p) => out.push_str(&format!("owner_auth_file = \"{}\"\n", p.display())),
                None => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// What earlier releases' install would have written for this TCTI (they
/// had no namespace for the embedded TPM).
fn previous_texts(tcti: &Tcti, owner_auth: Option<&Path>) -> Vec<String> {
    PREVIOUS_DEFAULTS
        .iter()
        .map(|d| render(d, tcti, None, owner_auth))
        .collect()
}

/// Installs the configuration; an edited one is never overwritten unless
/// `force` (then it is saved as `.bak` first). One an earlier release
/// wrote for the embedded TPM on the host's network gets the line that
/// moves it into its namespace (`netns`), edited or not, the old one kept
/// as `.bak`: without it, the TPM could no longer be reached.
fn install_config(
    path: &Path,
    text: &str,
    force: bool,
    netns: Option<&Path>,
) -> Result<Change, SetupError> {
    install_config_after(path, text, force, netns, &[])
}

/// `install_config`, where `unedited` are the texts earlier releases
/// would have written here: one of them is replaced like an unedited file.
fn install_config_after(
    path: &Path,
    text: &str,
    force: bool,
    netns: Option<&Path>,
    unedited: &[String],
) -> Result<Change, SetupError> {
    let old = match std::fs::read_to_string(path) {
        Err(_) => {
            write_atomic(path, text.as_bytes(), 0o644)?;
            return Ok(Change::Created);
        }
        Ok(old) => old,
    };
    if old == text {
        return Ok(Change::Unchanged);
    }
    if unedited.contains(&old) {
        write_atomic(path, text.as_bytes(), 0o644)?;
        return Ok(Change::Updated);
    }
    if let Some(migrated) = netns.and_then(|n| migrate_config(&old, n)) {
        write_atomic(&path.with_extension("conf.bak"), old.as_bytes(), 0o644)?;
        write_atomic(path, migrated.as_bytes(), 0o644)?;
        return install_config(path, text, force, None).map(|c| match c {
            Change::Unchanged => Change::Updated,
            other => other,
        });
    }
    if force {
        let bak = path.with_extension("conf.bak");
        write_atomic(&bak, old.as_bytes(), 0o644)?;
        write_atomic(path, text.as_bytes(), 0o644)?;
        return Ok(Change::Updated);
    }
    let proposed = path.with_extension("conf.new");
    write_atomic(&proposed, text.as_bytes(), 0o644)?;
    Ok(Change::KeptEdited { proposed })
}

/// Options of `dkey install`.
#[derive(Debug, Clone, Default)]
pub struct InstallOptions {
    /// Use this TCTI; default: /dev/tpmrm0 if present, else the embedded swtpm.
    pub tcti: Option<String>,
    /// Replace an edited configuration (keeping a .bak).
    pub force: bool,
    /// Directory holding the build's `derived-key-helper` (and `dkey`).
    pub build_dir: PathBuf,
}

/// Whether systemd manages this host (then the swtpm gets a unit).
fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// Waits until the embedded swtpm answers connections inside its namespace.
fn wait_listening(netns: &Path, within: Duration) -> bool {
    crate::netns::run_in(Some(netns), || {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if listening(SWTPM_PORT) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    })
    .unwrap_or(false)
}

/// Creates a root-only directory, or makes an existing one root-only.
fn private_dir(dir: &Path) -> Result<(), SetupError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir, "create directory"))?;
    std::os::unix::fs::chown(dir, Some(0), Some(0)).map_err(io(dir, "chown"))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir, "chmod"))
}

fn swtpm_args(layout: &Layout, daemon: bool) -> Vec<String> {
    let mut a = vec![
        "socket".to_owned(),
        "--tpm2".into(),
        "--server".into(),
        format!("type=tcp,port={SWTPM_PORT},bindaddr=127.0.0.1"),
        "--ctrl".into(),
        format!("type=tcp,port={},bindaddr=127.0.0.1", SWTPM_PORT + 1),
        "--tpmstate".into(),
        format!("dir={}", layout.swtpm_state().display()),
        "--flags".into(),
        "not-need-init,startup-clear".into(),
    ];
    if daemon {
        a.push("--daemon".into());
        a.push("--pid".into());
        a.push(format!("file={}", layout.swtpm_pid().display()));
    }
    a
}

fn swtpm_unit(dkey: &Path) -> String {
    format!(
        "[Unit]\nDescription=derived-keys embedded software TPM (swtpm): no hardware protection\n\
         \n[Service]\nExecStart={dkey} swtpm-run\nExecStartPost={dkey} swtpm-lockdown\n\
         Restart=on-failure\n\n[Install]\nWantedBy=multi-user.target\n",
        dkey = dkey.display()
    )
}

fn run(cmd: &str, args: &[&str]) -> Result<(), SetupError> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| SetupError::Swtpm {
            reason: format!("cannot run {cmd}: {e}"),
        })?;
    if !out.status.success() {
        return Err(SetupError::Swtpm {
            reason: format!(
                "{cmd} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// The swtpm process named by the pid file, if it still runs.
fn swtpm_process(layout: &Layout) -> Option<i32> {
    let pid = std::fs::read_to_string(layout.swtpm_pid()).ok()?;
    let pid = pid.trim().parse::<i32>().ok().filter(|p| *p > 0)?;
    let comm = std::fs::read(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim_ascii_end() == b"swtpm").then_some(pid)
}

fn stop_process(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    );
    let end = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops an embedded swtpm that an earlier release started on the host's
/// network (every local user could reach it); returns whether there was one.
/// Its state directory stays: the new one serves the same seed, every key.
fn retire_host_swtpm(layout: &Layout) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(pid) = swtpm_process(layout) else {
        return false;
    };
    // Unreadable: leave it alone rather than stop a TPM we cannot place.
    let Ok(its_netns) = std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino()) else {
        return false;
    };
    if Some(its_netns) == crate::netns::inode(&layout.tpm_netns()) {
        return false; // already in its own namespace
    }
    stop_process(pid);
    let _ = std::fs::remove_file(layout.swtpm_pid());
    true
}

/// Starts the embedded swtpm in its namespace unless it already runs there
/// (moving one an earlier release left on the host's network); returns
/// the step.
pub fn start_embedded_swtpm(layout: &Layout) -> Result<Step, SetupError> {
    let state = layout.swtpm_state();
    private_dir(&state)?;
    private_dir(&layout.run_dir())?;
    let moved = retire_host_swtpm(layout);
    let netns = layout.tpm_netns();
    crate::netns::create(&netns)?;
    let mut step = Step {
        what: "software TPM (swtpm, no hardware protection; root only)".into(),
        path: state.clone(),
        change: if moved {
            Change::Updated
        } else {
            Change::Unchanged
        },
    };
    if systemd_running() {
        let unit = layout.swtpm_unit();
        let change = install_file(&unit, swtpm_unit(&layout.dkey()).as_bytes(), 0o644)?;
        run("systemctl", &["daemon-reload"])?;
        run("systemctl", &["enable", "derived-keys-swtpm.service"])?;
        let verb = if change == Change::Unchanged && !moved {
            "start"
        } else {
            "restart"
        };
        run("systemctl", &[verb, "derived-keys-swtpm.service"])?;
        step.path = unit;
        if change != Change::Unchanged {
            step.change = change;
        }
    } else if !wait_listening(&netns, Duration::ZERO) {
        let args = swtpm_args(layout, true);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::netns::run_in(Some(&netns), || run("swtpm", &args))??;
        if !moved {
            step.change = Change::Created;
        }
    }
    if !wait_listening(&netns, Duration::from_secs(10)) {
        return Err(SetupError::Swtpm {
            reason: format!(
                "nothing listens on 127.0.0.1:{SWTPM_PORT} in {} after starting swtpm",
                netns.display()
            ),
        });
    }
    Ok(step)
}

/// `dkey swtpm-run` (the systemd unit's ExecStart): the embedded swtpm in
/// the foreground, in its namespace. Returns only on failure.
pub fn exec_embedded_swtpm(layout: &Layout) -> SetupError {
    use std::os::unix::process::CommandExt;
    let netns = layout.tpm_netns();
    let ready = private_dir(&layout.swtpm_state())
        .and_then(|()| private_dir(&layout.run_dir()))
        .and_then(|()| crate::netns::create(&netns).map_err(SetupError::from))
        // Single-threaded here: the whole process, and swtpm after exec.
        .and_then(|()| crate::netns::enter(&netns).map_err(SetupError::from));
    if let Err(e) = ready {
        return e;
    }
    let e = Command::new("swtpm").args(swtpm_args(layout, false)).exec();
    SetupError::Swtpm {
        reason: format!("cannot run swtpm: {e}"),
    }
}

fn random_password() -> Result<SecretBuf, SetupError> {
    let mut raw = SecretBuf::new(16)?;
    getrandom::getrandom(raw.as_mut()).map_err(|e| SetupError::Swtpm {
        reason: format!("no randomness: {e}"),
    })?;
    // Hex, so the files work as tpm2-tools `-P file:...` passwords too.
    let mut text = SecretBuf::new(32)?;
    hex::encode_to_slice(raw.as_ref(), text.as_mut()).map_err(|_| SetupError::Swtpm {
        reason: "hex encoding".into(),
    })?;
    Ok(text)
}

/// Locks a software TPM down (idempotent; run after each start): owner,
/// endorsement and lockout passwords set once and kept in root-only files,
/// the platform password set to a random value nobody keeps. `netns`: the
/// namespace the TCTI is reached in.
pub fn lockdown(layout: &Layout, tcti: &Tcti, netns: Option<&Path>) -> Result<(), SetupError> {
    crate::netns::run_in(netns, || lockdown_here(layout, tcti))?
}

fn lockdown_here(layout: &Layout, tcti: &Tcti) -> Result<(), SetupError> {
    let mut tpm = Tpm::open(tcti).map_err(SetupError::Lockdown)?;
    let set = tpm.auth_set().map_err(SetupError::Lockdown)?;
    for (which, is_set, path) in [
        (HierarchyAuth::Owner, set.owner, layout.owner_auth()),
        (
            HierarchyAuth::Endorsement,
            set.endorsement,
            layout.endorsement_auth(),
        ),
        (HierarchyAuth::Lockout, set.lockout, layout.lockout_auth()),
    ] {
        if is_set {
            if !path.exists() {
                return Err(SetupError::LostOwnerAuth { path });
            }
            continue;
        }
        let pw = random_password()?;
        // The file first: a password set but not saved would be lost.
        write_atomic(&path, pw.as_ref(), 0o600)?;
        tpm.change_auth(which, None, &pw)
            .map_err(SetupError::Lockdown)?;
    }
    let throwaway = random_password()?;
    match tpm.change_auth(HierarchyAuth::Platform, None, &throwaway) {
        Ok(()) | Err(TpmError::OwnerAuth { .. }) => Ok(()), // already locked
        Err(e) => Err(SetupError::Lockdown(e)),
    }
}

/// Locks down the embedded software TPM once it listens (its service runs
/// this after every start: platform passwords do not survive a restart).
pub fn lockdown_embedded(layout: &Layout) -> Result<(), SetupError> {
    let netns = layout.tpm_netns();
    if !wait_listening(&netns, Duration::from_secs(5)) {
        return Err(SetupError::Swtpm {
            reason: format!(
                "nothing listens on 127.0.0.1:{SWTPM_PORT} in {}",
                netns.display()
            ),
        });
    }
    lockdown(
        layout,
        &Tcti::parse(SWTPM_TCTI).map_err(SetupError::Tcti)?,
        Some(&netns),
    )
}

/// Stops the embedded swtpm and removes its namespace (its state stays).
pub fn stop_embedded_swtpm(layout: &Layout) -> Result<(), SetupError> {
    if let Some(pid) = swtpm_process(layout) {
        stop_process(pid);
    }
    let _ = std::fs::remove_file(layout.swtpm_pid());
    crate::netns::remove(&layout.tpm_netns())?;
    Ok(())
}

/// An embedded configuration an earlier release wrote (the swtpm on the
/// host's loopback) with the one line that moves it into the namespace;
/// None when `text` needs no change. Everything else stays as the
/// operator left it.
pub fn migrate_config(text: &str, netns: &Path) -> Option<String> {
    let config = Config::parse(text, Path::new("/migrate")).ok()?;
    if config.tcti.as_str() != SWTPM_TCTI || config.tpm_netns.is_some() {
        return None;
    }
    let mut out = String::with_capacity(text.len() + 64);
    let mut done = false;
    for line in text.split_inclusive('\n') {
        out.push_str(line);
        if !done && line.trim_start().starts_with("tcti") {
            if !line.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&format!("netns = \"{}\"\n", netns.display()));
            done = true;
        }
    }
    done.then_some(out)
}

/// `dkey install`.
pub fn install(layout: &Layout, opts: &InstallOptions) -> Result<Vec<Step>, SetupError> {
    if !is_root() {
        return Err(SetupError::NotRoot {
            what: "dkey install",
        });
    }
    let mut steps = Vec::new();
    let helper_src = opts.build_dir.join("derived-key-helper");
    let helper =
        std::fs::read(&helper_src).map_err(|_| SetupError::NoHandlerBuild { path: helper_src })?;
    steps.push(Step {
        what: "request-key handler".into(),
        path: layout.handler(),
        change: install_file(&layout.handler(), &helper, 0o755)?,
    });
    let broker_src = opts.build_dir.join(crate::broker::BROKER_EXE);
    let broker =
        std::fs::read(&broker_src).map_err(|_| SetupError::NoHandlerBuild { path: broker_src })?;
    steps.push(Step {
        what: "TPM broker".into(),
        path: layout.broker(),
        change: install_file(&layout.broker(), &broker, 0o755)?,
    });
    let dkey_src = opts.build_dir.join("dkey");
    if dkey_src != layout.dkey() {
        if let Ok(bytes) = std::fs::read(&dkey_src) {
            steps.push(Step {
                what: "dkey command".into(),
                path: layout.dkey(),
                change: install_file(&layout.dkey(), &bytes, 0o755)?,
            });
        }
    }
    steps.push(Step {
        what: "request-key rule".into(),
        path: layout.rule(),
        change: install_file(&layout.rule(), RULE.as_bytes(), 0o644)?,
    });

    let embedded = opts.tcti.is_none() && !layout.at("/dev/tpmrm0").exists();
    let tcti_text = match (&opts.tcti, embedded) {
        (Some(t), _) => t.clone(),
        (None, true) => SWTPM_TCTI.to_owned(),
        (None, false) => "device:/dev/tpmrm0".to_owned(),
    };
    let tcti = Tcti::parse(&tcti_text).map_err(SetupError::Tcti)?;
    // A broker of the current configuration holds a primary on the TPM
    // that may be about to move.
    if let Ok(old) = Config::load(&layout.config()) {
        crate::broker::stop(&old);
    }
    let netns = embedded.then(|| layout.tpm_netns());
    if let Some(netns) = &netns {
        steps.push(start_embedded_swtpm(layout)?);
        lockdown(layout, &tcti, Some(netns))?;
    }
    let owner_auth = embedded.then(|| layout.owner_auth());
    let text = config_text(&tcti, netns.as_deref(), owner_auth.as_deref());
    steps.push(Step {
        what: "configuration".into(),
        path: layout.config(),
        change: install_config_after(
            &layout.config(),
            &text,
            opts.force,
            netns.as_deref(),
            &previous_texts(&tcti, owner_auth.as_deref()),
        )?,
    });
    Ok(steps)
}

/// `dkey uninstall`: removes the handler, the rule, the dkey copy and the
/// embedded swtpm service. The configuration, the TPM passwords and the
/// software TPM's state (its seed: every key) stay unless `purge`.
pub fn uninstall(layout: &Layout, purge: bool) -> Result<Vec<Step>, SetupError> {
    if !is_root() {
        return Err(SetupError::NotRoot {
            what: "dkey uninstall",
        });
    }
    let mut steps = Vec::new();
    if let Ok(config) = Config::load(&layout.config()) {
        crate::broker::stop(&config);
    }
    let embedded_step = Step {
        what: "software TPM process and its network namespace".into(),
        path: layout.tpm_netns(),
        change: if swtpm_process(layout).is_some() || layout.tpm_netns().exists() {
            stop_embedded_swtpm(layout)?;
            Change::Removed
        } else {
            Change::Absent
        },
    };
    steps.push(embedded_step);
    let mut remove = |what: &str, path: PathBuf, really: bool| -> Result<(), SetupError> {
        let change = if !path.exists() {
            Change::Absent
        } else if !really {
            Change::Kept
        } else {
            if path.is_dir() {
                std::fs::remove_dir_all(&path).map_err(io(&path, "remove"))?;
            } else {
                std::fs::remove_file(&path).map_err(io(&path, "remove"))?;
            }
            Change::Removed
        };
        steps.push(Step {
            what: what.into(),
            path,
            change,
        });
        Ok(())
    };
    remove("request-key rule", layout.rule(), true)?;
    remove("request-key handler", layout.handler(), true)?;
    remove("TPM broker", layout.broker(), true)?;
    if layout.swtpm_unit().exists() {
        let _ = run(
            "systemctl",
            &["disable", "--now", "derived-keys-swtpm.service"],
        );
        remove("software TPM service", layout.swtpm_unit(), true)?;
        let _ = run("systemctl", &["daemon-reload"]);
    }
    remove("configuration", layout.config(), purge)?;
    let _ = std::fs::remove_file(layout.config().with_extension("conf.new"));
    remove("owner password", layout.owner_auth(), purge)?;
    remove("endorsement password", layout.endorsement_auth(), purge)?;
    remove("lockout password", layout.lockout_auth(), purge)?;
    remove(
        "software TPM state (its seed: every key)",
        layout.swtpm_state(),
        purge,
    )?;
    remove("dkey command", layout.dkey(), true)?;
    if purge {
        // The directories install created, if nothing else is in them.
        for dir in [
            layout.at("/etc/derived-keys"),
            layout.at("/var/lib/derived-keys"),
        ] {
            let _ = std::fs::remove_dir(dir);
        }
    }
    Ok(steps)
}

/// What `dkey status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub ready: bool,
    pub config_path: PathBuf,
    pub config_valid: bool,
    pub config_error: Option<String>,
    pub tcti: Option<String>,
    pub tpm_reachable: bool,
    /// "hardware", "software" or null when unreachable.
    pub tpm_kind: Option<&'static str>,
    pub tpm_manufacturer: Option<String>,
    pub tpm_vendor: Option<String>,
    pub tpm_error: Option<String>,
    /// Who can send the configured TPM commands, in words.
    pub tpm_access: Option<String>,
    /// Every local user can reach the TPM (a TCP TCTI on the host's
    /// network, a device node open to all); null when unknown.
    pub tpm_open_to_all_users: Option<bool>,
    /// A test derivation (owner password included) went through.
    pub derivation_ok: bool,
    pub protection: String,
    pub rule_path: PathBuf,
    pub rule_installed: bool,
    pub rule_current: bool,
    pub handler_path: PathBuf,
    pub handler_installed: bool,
    pub broker_installed: bool,
    /// The broker serving this configuration, if one runs now (it starts
    /// with the first request and exits when idle).
    pub broker_pid: Option<u32>,
    pub secret_memory: &'static str,
    pub ima_available: bool,
}

/// `dkey status`: everything a request needs, checked.
pub fn status(layout: &Layout, config_path: &Path) -> Status {
    let rule = std::fs::read_to_string(layout.rule()).ok();
    let executable = |p: PathBuf| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    let handler_installed = executable(layout.handler());
    let broker_installed = executable(layout.broker());
    let mut s = Status {
        ready: false,
        config_path: config_path.to_owned(),
        config_valid: false,
        config_error: None,
        tcti: None,
        tpm_reachable: false,
        tpm_kind: None,
        tpm_manufacturer: None,
        tpm_vendor: None,
        tpm_error: None,
        tpm_access: None,
        tpm_open_to_all_users: None,
        derivation_ok: false,
        protection: "none: no TPM reachable".into(),
        rule_path: layout.rule(),
        rule_installed: rule.is_some(),
        rule_current: rule.as_deref() == Some(RULE),
        handler_path: layout.handler(),
        handler_installed,
        broker_installed,
        broker_pid: None,
        secret_memory: secret::probe_backing().map_or("unavailable", |b| b.as_str()),
        ima_available: crate::requester::ima_available(),
    };
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            s.config_error = Some(e.to_string());
            return s;
        }
    };
    s.config_valid = true;
    s.tcti = Some(config.tcti.to_string());
    s.broker_pid = std::fs::read_to_string(crate::broker::paths(&config).pid)
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .filter(|pid| Path::new(&format!("/proc/{pid}")).exists());
    let (access, open) = tpm_access(&config);
    s.tpm_access = Some(access);
    s.tpm_open_to_all_users = open;
    let probed = crate::netns::run_in(config.tpm_netns.as_deref(), || {
        let mut part = s.clone();
        let r = probe_tpm(&config, &mut part).map_err(|e| e.to_string());
        (part, r)
    });
    match probed {
        Ok((part, r)) => {
            s = part;
            s.tpm_error = r.err();
        }
        Err(e) => s.tpm_error = Some(e.to_string()),
    }
    s.ready = s.config_valid
        && s.tpm_reachable
        && s.derivation_ok
        && s.rule_installed
        && s.handler_installed
        && s.broker_installed;
    s
}

/// Who can reach the TPM the configuration names, and whether that is
/// every local user.
pub fn tpm_access(config: &Config) -> (String, Option<bool>) {
    use crate::tpm::TctiKind;
    use std::os::unix::fs::MetadataExt;
    if let Some(ns) = &config.tpm_netns {
        let ok = crate::netns::exists(ns);
        let private = ns
            .parent()
            .and_then(|d| std::fs::metadata(d).ok())
            .is_some_and(|m| m.uid() == 0 && m.mode() & 0o077 == 0);
        return if ok && private {
            (
                format!(
                    "root only: the TPM listens only inside network namespace {}, which only root can enter",
                    ns.display()
                ),
                Some(false),
            )
        } else if ok {
            (
                format!(
                    "root only (network namespace {}), but its directory is not root-only (0700)",
                    ns.display()
                ),
                Some(false),
            )
        } else {
            (
                format!(
                    "no TPM: network namespace {} is missing (run dkey install)",
                    ns.display()
                ),
                None,
            )
        };
    }
    match config.tcti.kind() {
        TctiKind::Device => {
            let path = config.tcti.device_path().unwrap_or("/dev/tpmrm0");
            match std::fs::metadata(path) {
                Ok(m) => {
                    let group = nix::unistd::Group::from_gid(m.gid().into())
                        .ok()
                        .flatten()
                        .map_or_else(|| m.gid().to_string(), |g| g.name);
                    let owner = nix::unistd::User::from_uid(m.uid().into())
                        .ok()
                        .flatten()
                        .map_or_else(|| m.uid().to_string(), |u| u.name);
                    let mode = m.mode() & 0o777;
                    let open = mode & 0o006 != 0;
                    let who = if open {
                        "every local user".to_owned()
                    } else if mode & 0o060 != 0 {
                        format!("root and members of group {group}")
                    } else {
                        format!("root and {owner}")
                    };
                    (
                        format!("{who}: device node {path} (owner {owner}, group {group}, mode {mode:04o})"),
                        Some(open),
                    )
                }
                Err(_) => (format!("no TPM: {path} does not exist"), None),
            }
        }
        TctiKind::Swtpm | TctiKind::Mssim => (
            format!(
                "every local user: {} is a TCP socket on this host's network that any process can connect to",
                config.tcti
            ),
            Some(true),
        ),
        TctiKind::Tabrmd => (
            "whoever tpm2-abrmd's D-Bus policy admits".to_owned(),
            None,
        ),
    }
}

/// Reaches the TPM, says what kind it is, and runs one test derivation
/// (owner password included), filling in `s` as it goes.
fn probe_tpm(config: &Config, s: &mut Status) -> Result<(), crate::error::HandlerError> {
    // Take turns with the broker: swtpm serves one client at a time.
    let _lock = crate::broker::tpm_lock(config)?;
    let mut tpm = Tpm::open(&config.tcti)?;
    let info = tpm.info()?;
    s.tpm_reachable = true;
    s.tpm_kind = Some(if info.software {
        "software"
    } else {
        "hardware"
    });
    s.protection = if info.software {
        "software only: a software TPM (swtpm) keeps its seed in a file; keys are as safe as that file and this host's root".into()
    } else {
        format!(
            "hardware TPM ({}) through {}",
            info.manufacturer,
            config.tcti.device_path().unwrap_or(config.tcti.as_str())
        )
    };
    s.tpm_manufacturer = Some(info.manufacturer);
    s.tpm_vendor = Some(info.vendor);
    let auth = config.owner_auth()?;
    let probe_input = Input {
        purpose: Purpose::Symmetric(32),
        name: "dkey-status-self-test",
        subject: Subject::Machine,
        account: None,
        client: None,
        epoch: 0,
    };
    tpm.prk(auth.as_ref(), &probe_input.message())?;
    s.derivation_ok = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_text_sets_tcti_and_owner_auth() {
        let t = Tcti::parse(SWTPM_TCTI).unwrap();
        let ns = Path::new("/run/derived-keys/tpm.netns");
        let text = config_text(
            &t,
            Some(ns),
            Some(Path::new("/etc/derived-keys/owner-auth")),
        );
        let c = Config::parse(&text, Path::new("/x")).unwrap();
        assert_eq!(c.tcti.as_str(), SWTPM_TCTI);
        assert_eq!(c.tpm_netns.as_deref(), Some(ns));
        assert_eq!(
            c.owner_auth_file.as_deref(),
            Some(Path::new("/etc/derived-keys/owner-auth"))
        );
        let d = Tcti::parse("device:/dev/tpmrm0").unwrap();
        assert_eq!(config_text(&d, None, None), DEFAULT_CONFIG);
    }

    #[test]
    fn edited_configuration_is_kept_and_said_so() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("derived-keys.conf");
        assert_eq!(
            install_config(&p, "a\n", false, None).unwrap(),
            Change::Created
        );
        assert_eq!(
            install_config(&p, "a\n", false, None).unwrap(),
            Change::Unchanged
        );
        std::fs::write(&p, "edited\n").unwrap();
        let c = install_config(&p, "a\n", false, None).unwrap();
        let Change::KeptEdited { proposed } = c else {
            panic!("{c:?}")
        };
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "edited\n");
        assert_eq!(std::fs::read_to_string(proposed).unwrap(), "a\n");
        assert_eq!(
            install_config(&p, "a\n", true, None).unwrap(),
            Change::Updated
        );
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "a\n");
        assert_eq!(
            std::fs::read_to_string(p.with_extension("conf.bak")).unwrap(),
            "edited\n"
        );
    }

    #[test]
    fn files_are_installed_idempotently_with_modes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/helper");
        assert_eq!(install_file(&p, b"x", 0o755).unwrap(), Change::Created);
        assert_eq!(install_file(&p, b"x", 0o755).unwrap(), Change::Unchanged);
        assert_eq!(install_file(&p, b"y", 0o755).unwrap(), Change::Updated);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);
    }

    #[test]
    fn unit_runs_swtpm_in_the_foreground_and_locks_it_down() {
        let u = swtpm_unit(Path::new("/usr/local/bin/dkey"));
        // swtpm-run enters the namespace and execs swtpm in the foreground.
        assert!(u.contains("ExecStart=/usr/local/bin/dkey swtpm-run\n"));
        assert!(u.contains("ExecStartPost=/usr/local/bin/dkey swtpm-lockdown\n"));
        let args = swtpm_args(&Layout::default(), false).join(" ");
        assert!(!args.contains("--daemon"));
        assert_eq!(args.matches("bindaddr=127.0.0.1").count(), 2, "{args}");
    }

    /// The configuration the previous release wrote for the embedded TPM.
    fn previous_release_config() -> String {
        let t = Tcti::parse(SWTPM_TCTI).unwrap();
        previous_texts(&t, Some(Path::new("/etc/derived-keys/owner-auth"))).remove(0)
    }

    #[test]
    fn an_embedded_configuration_moves_into_the_namespace_with_its_edits() {
        let ns = Path::new("/run/derived-keys/tpm.netns");
        let edited =
            previous_release_config().replace("machine_uids = [0]", "machine_uids = [0, 7]");
        let migrated = migrate_config(&edited, ns).unwrap();
        let c = Config::parse(&migrated, Path::new("/x")).unwrap();
        assert_eq!(c.tpm_netns.as_deref(), Some(ns));
        assert_eq!(c.machine_uids, [0, 7], "the operator's edit stays");
        assert_eq!(c.tcti.as_str(), SWTPM_TCTI);
        // Nothing to do twice, nor for other TPMs.
        assert!(migrate_config(&migrated, ns).is_none());
        assert!(migrate_config(DEFAULT_CONFIG, ns).is_none());

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("derived-keys.conf");
        std::fs::write(&p, &edited).unwrap();
        let new = config_text(
            &Tcti::parse(SWTPM_TCTI).unwrap(),
            Some(ns),
            Some(Path::new("/etc/derived-keys/owner-auth")),
        );
        let c = install_config(&p, &new, false, Some(ns)).unwrap();
        assert!(matches!(c, Change::KeptEdited { .. }), "{c:?}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), migrated);
        assert_eq!(
            std::fs::read_to_string(p.with_extension("conf.bak")).unwrap(),
            edited
        );
        // Unedited, it becomes the new release's text.
        std::fs::write(&p, previous_release_config()).unwrap();
        let before = previous_texts(
            &Tcti::parse(SWTPM_TCTI).unwrap(),
            Some(Path::new("/etc/derived-keys/owner-auth")),
        );
        assert_eq!(
            install_config_after(&p, &new, false, Some(ns), &before).unwrap(),
            Change::Updated
        );
        assert_eq!(std::fs::read_to_string(&p).unwrap(), new);
        let got = Config::parse(&std::fs::read_to_string(&p).unwrap(), Path::new("/x")).unwrap();
        assert_eq!(got.tpm_netns.as_deref(), Some(ns));
    }
}
