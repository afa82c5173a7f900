//! The embedded software TPM, for hosts without a TPM device: swtpm on
//! 127.0.0.1 inside a network namespace of its own (see
//! [`crate::tpm::netns`]), so that only root can reach it, started by
//! `dkey install` (or its systemd unit), locked down after every start,
//! and moved there from the host's loopback where an earlier release ran it.

use std::net::TcpStream;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{install_file, io, write_atomic, Change, Layout, SetupError, Step};
use crate::secret::SecretBuf;
use crate::tpm::{HierarchyAuth, Tcti, Tpm, TpmError};

/// The embedded software TPM's ports (swtpm's and tpm2-tools' defaults),
/// inside its own network namespace: the host's ports stay free.
pub const SWTPM_PORT: u16 = 2321;
pub const SWTPM_TCTI: &str = "swtpm:host=127.0.0.1,port=2321";

/// Whether systemd manages this host (then the swtpm gets a unit).
pub(super) fn systemd_running() -> bool {
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
    crate::tpm::netns::run_in(Some(netns), || {
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

pub(super) fn swtpm_args(layout: &Layout, daemon: bool) -> Vec<String> {
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

pub(super) fn swtpm_unit(dkey: &Path) -> String {
    format!(
        "[Unit]\nDescription=derived-keys embedded software TPM (swtpm): no hardware protection\n\
         \n[Service]\nExecStart={dkey} swtpm-run\nExecStartPost={dkey} swtpm-lockdown\n\
         Restart=on-failure\n\n[Install]\nWantedBy=multi-user.target\n",
        dkey = dkey.display()
    )
}

pub(super) fn run(cmd: &str, args: &[&str]) -> Result<(), SetupError> {
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
pub(super) fn swtpm_process(layout: &Layout) -> Option<i32> {
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
    let Some(pid) = swtpm_process(layout) else {
        return false;
    };
    // Unreadable: leave it alone rather than stop a TPM we cannot place.
    let Ok(its_netns) = std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino()) else {
        return false;
    };
    if Some(its_netns) == crate::tpm::netns::inode(&layout.tpm_netns()) {
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
    crate::tpm::netns::create(&netns)?;
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
        crate::tpm::netns::run_in(Some(&netns), || run("swtpm", &args))??;
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
        .and_then(|()| crate::tpm::netns::create(&netns).map_err(SetupError::from))
        // Single-threaded here: the whole process, and swtpm after exec.
        .and_then(|()| crate::tpm::netns::enter(&netns).map_err(SetupError::from));
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
    crate::tpm::netns::run_in(netns, || lockdown_here(layout, tcti))?
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
    crate::tpm::netns::remove(&layout.tpm_netns())?;
    Ok(())
}
