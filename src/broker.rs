//! The TPM broker: the handler's fast path to the TPM.
//!
//! A request would otherwise pay, every time, for loading the TPM stack
//! (libtss2 and libcrypto), opening the TCTI and creating the primary:
//! about 3 of its 5.5 ms on swtpm, and far more on a real chip. The broker
//! is a root process, started on demand by the handler, that keeps the
//! derivation primary loaded and answers one question over a root-only
//! unix socket: "HMAC these 32 bytes". It exits after a configured idle
//! time, flushing the primary. Nothing is written to disk; the derivation
//! is unchanged (the same primary, the same HMAC).
//!
//! Protocol (one exchange per connection):
//! request `[VERSION, OP_PRK, m (32 bytes)]`, response `[errno, PRK (32 bytes)]`,
//! errno 0 for success, else the contract errno the request should fail with.
//!
//! The client half (`prk`) does not touch the TPM stack, so the handler
//! binary does not load it at all; the server half (`serve`) is the only
//! user of [`crate::tpm`] on the request path.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Config, ConfigError};
use crate::derive::Prk;
use crate::secret::{SecretAllocError, SecretBuf};
use crate::tpm::{Primary, Tpm, TpmError};

/// Where the broker's socket, lock and pid files live (tmpfs, root only).
pub const RUN_DIR: &str = "/run/derived-keys";
/// The broker's executable, beside the handler's.
pub const BROKER_EXE: &str = "derived-keys-broker";

const VERSION: u8 = 1;
const OP_PRK: u8 = 1;
const REQUEST_LEN: usize = 34;
const RESPONSE_LEN: usize = 33;

/// The broker boundary's errors.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot start the TPM broker {path}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TPM broker I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the TPM broker did not answer in time")]
    TimedOut,
    #[error("the TPM broker answered errno {errno}")]
    Refused { errno: i32 },
    #[error("malformed answer from the TPM broker")]
    Protocol,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tpm(#[from] TpmError),
    #[error(transparent)]
    Memory(#[from] SecretAllocError),
}

impl BrokerError {
    /// The contract errno for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            BrokerError::TimedOut => libc::ETIMEDOUT,
            BrokerError::Refused { errno } => *errno,
            BrokerError::Config(_) => libc::ENODEV,
            BrokerError::Tpm(TpmError::BadTcti { .. } | TpmError::Unreachable { .. }) => {
                libc::ENODEV
            }
            _ => libc::EIO,
        }
    }
}

/// Runtime files of the broker serving `config`.
#[derive(Debug, Clone)]
pub struct Paths {
    pub socket: PathBuf,
    pub lock: PathBuf,
    pub pid: PathBuf,
}

pub fn paths(config: &Config) -> Paths {
    let base = Path::new(RUN_DIR).join(format!("broker-{:016x}", config.fingerprint));
    Paths {
        socket: base.with_extension("sock"),
        lock: base.with_extension("lock"),
        pid: base.with_extension("pid"),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BrokerError + '_ {
    move |source| BrokerError::Io {
        path: path.to_owned(),
        source,
    }
}

fn run_dir() -> Result<(), BrokerError> {
    let dir = Path::new(RUN_DIR);
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(dir)
            .map_err(io(dir))?;
    }
    Ok(())
}

fn open_lock(tcti: &str) -> Result<std::fs::File, BrokerError> {
    run_dir()?;
    let hash = crate::config::fnv1a(tcti.as_bytes());
    let path = Path::new(RUN_DIR).join(format!("tpm-{hash:016x}.lock"));
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io(&path))
}

/// An exclusive lock per TPM (by TCTI): swtpm takes one client at a time,
/// so brokers of different configurations and `dkey status` take turns.
pub fn tpm_lock(tcti: &str) -> Result<nix::fcntl::Flock<std::fs::File>, BrokerError> {
    let file = open_lock(tcti)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, errno)| {
        BrokerError::Io {
            path: RUN_DIR.into(),
            source: std::io::Error::from(errno),
        }
    })
}

// ---------------------------------------------------------------- client

/// PRK for `msg` from the broker serving `config`, starting the broker
/// (`broker_exe`) if none runs. Gives up at `deadline` with TimedOut.
pub fn prk(
    config: &Config,
    broker_exe: &Path,
    msg: &[u8; 32],
    deadline: Instant,
) -> Result<Prk, BrokerError> {
    let p = paths(config);
    let mut child: Option<std::process::Child> = None;
    loop {
        match UnixStream::connect(&p.socket) {
            Ok(stream) => return exchange(stream, &p.socket, msg, deadline),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                match child.as_mut() {
                    None => child = Some(spawn(broker_exe, &config.path)?),
                    // A broker that died before listening says why in its
                    // exit code (a contract errno); 0 means another broker
                    // holds the configuration, so keep connecting.
                    Some(c) => {
                        if let Ok(Some(status)) = c.try_wait() {
                            match status.code() {
                                Some(0) => {}
                                Some(errno) => return Err(BrokerError::Refused { errno }),
                                None => return Err(BrokerError::Refused { errno: libc::EIO }),
                            }
                        }
                    }
                }
                if Instant::now() >= deadline {
                    return Err(BrokerError::TimedOut);
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            Err(e) => return Err(io(&p.socket)(e)),
        }
    }
}

fn spawn(exe: &Path, config: &Path) -> Result<std::process::Child, BrokerError> {
    std::process::Command::new(exe)
        .arg("--config")
        .arg(config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|source| BrokerError::Spawn {
            path: exe.to_owned(),
            source,
        })
}

fn remaining(deadline: Instant) -> Result<Duration, BrokerError> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or(BrokerError::TimedOut)
}

fn exchange(
    mut s: UnixStream,
    path: &Path,
    msg: &[u8; 32],
    deadline: Instant,
) -> Result<Prk, BrokerError> {
    let timeout = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => BrokerError::TimedOut,
        _ => io(path)(e),
    };
    s.set_write_timeout(Some(remaining(deadline)?))
        .map_err(io(path))?;
    let mut req = [0u8; REQUEST_LEN];
    req[0] = VERSION;
    req[1] = OP_PRK;
    req[2..].copy_from_slice(msg);
    s.write_all(&req).map_err(timeout)?;
    s.set_read_timeout(Some(remaining(deadline)?))
        .map_err(io(path))?;
    let eof = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => BrokerError::Protocol,
        _ => timeout(e),
    };
    let mut status = [0u8; 1];
    s.read_exact(&mut status).map_err(eof)?;
    if status[0] != 0 {
        return Err(BrokerError::Refused {
            errno: i32::from(status[0]),
        });
    }
    // Straight into the buffer the PRK lives in: no other copy of it.
    let mut prk = SecretBuf::new(RESPONSE_LEN - 1)?;
    s.read_exact(prk.as_mut()).map_err(eof)?;
    Prk::new(prk).map_err(|_| BrokerError::Protocol)
}

/// Stops the broker serving `config`, if one runs (uninstall, tests).
pub fn stop(config: &Config) {
    let p = paths(config);
    if let Ok(pid) = std::fs::read_to_string(&p.pid) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

// ---------------------------------------------------------------- server

/// The loaded TPM state; dropped (and rebuilt) after TPM trouble.
struct Loaded {
    tpm: Tpm,
    primary: Primary,
}

struct Server {
    config: Config,
    owner_auth: Option<SecretBuf>,
    loaded: Option<Loaded>,
    /// The TPM lock file, opened once; locked around each request.
    lock: Option<std::fs::File>,
    /// One buffer for every PRK this broker computes, zeroized after each.
    out: SecretBuf,
}

/// The loaded TPM state, opened and created on first use.
fn load<'a>(
    loaded: &'a mut Option<Loaded>,
    config: &Config,
    owner_auth: Option<&SecretBuf>,
) -> Result<&'a mut Loaded, TpmError> {
    let l = match loaded.take() {
        Some(l) => l,
        None => {
            let mut tpm = Tpm::open(&config.tcti)?;
            let primary = tpm.load_primary(owner_auth)?;
            Loaded { tpm, primary }
        }
    };
    Ok(loaded.insert(l))
}

impl Server {
    fn hmac(&mut self, msg: &[u8; 32]) -> Result<(), TpmError> {
        let Server {
            config,
            owner_auth,
            loaded,
            out,
            ..
        } = self;
        let l = load(loaded, config, owner_auth.as_ref())?;
        l.tpm.prk_into(&l.primary, msg, out)
    }

    /// Computes the PRK for `msg` into `self.out`.
    fn prk(&mut self, msg: &[u8; 32]) -> Result<(), BrokerError> {
        let file = match self.lock.take() {
            Some(f) => f,
            None => open_lock(self.config.tcti.as_str())?,
        };
        let guard = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(
            |(_, errno)| BrokerError::Io {
                path: RUN_DIR.into(),
                source: std::io::Error::from(errno),
            },
        )?;
        let result = match self.hmac(msg) {
            Ok(()) => Ok(()),
            // The owner password will not get better by retrying.
            Err(e @ (TpmError::OwnerAuth { .. } | TpmError::Lockout { .. })) => Err(e.into()),
            // The TPM restarted, or someone flushed our primary: start over once.
            Err(_) => {
                self.loaded = None;
                self.hmac(msg).map_err(BrokerError::from)
            }
        };
        self.lock = guard.unlock().ok();
        result
    }

    fn shutdown(&mut self) {
        if let Some(mut l) = self.loaded.take() {
            let _lock = tpm_lock(self.config.tcti.as_str());
            let _ = l.tpm.flush_primary(l.primary);
        }
    }
}

fn answer(server: &mut Server, mut s: UnixStream) -> bool {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    // Root only: the socket is 0600 in a 0700 directory, and we check anyway.
    if getsockopt(&s, PeerCredentials).map(|c| c.uid()) != Ok(0) {
        return true;
    }
    let mut req = [0u8; REQUEST_LEN];
    if s.read_exact(&mut req).is_err() || req[0] != VERSION || req[1] != OP_PRK {
        return true;
    }
    let mut msg = [0u8; 32];
    msg.copy_from_slice(&req[2..]);
    match server.prk(&msg) {
        Ok(()) => {
            // Status and PRK in one write, with no further copy of the PRK.
            let parts = [
                std::io::IoSlice::new(&[0]),
                std::io::IoSlice::new(server.out.as_ref()),
            ];
            let _ = s.write_vectored(&parts);
            zeroize::Zeroize::zeroize(server.out.as_mut());
            true
        }
        Err(e) => {
            let errno = e.errno();
            let _ = s.write_all(&[u8::try_from(errno).unwrap_or(libc::EIO as u8)]);
            // A wrong password may be fixed in its file: let the next
            // broker read it again. An unreachable TPM: start fresh next time.
            server.loaded = None;
            errno != libc::EIO
        }
    }
}

/// The broker's main loop. Returns when idle, on SIGTERM, or when another
/// broker already serves this configuration.
pub fn serve(config_path: &Path) -> Result<(), BrokerError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    use std::os::fd::AsFd;

    // Leave the request-key context we were started from.
    let _ = nix::unistd::setsid();
    let _ = crate::keyring::detach();
    crate::handler::harden();

    // Everything that can fail for configuration reasons, before any
    // runtime file exists: a broker that cannot serve never listens.
    let config = Config::load(config_path)?;
    let owner_auth = config.owner_auth()?;
    let p = paths(&config);
    run_dir()?;
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&p.lock)
        .map_err(io(&p.lock))?;
    let Ok(_instance) =
        nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
    else {
        return Ok(()); // another broker serves this configuration
    };
    let _ = std::fs::remove_file(&p.socket);
    let listener = UnixListener::bind(&p.socket).map_err(io(&p.socket))?;
    // From here on, every way out removes the socket and the pid file.
    let _files = RuntimeFiles(&p);
    std::fs::set_permissions(&p.socket, std::fs::Permissions::from_mode(0o600))
        .map_err(io(&p.socket))?;
    std::fs::write(&p.pid, std::process::id().to_string()).map_err(io(&p.pid))?;

    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    let _ = signals.thread_block();
    let sigfd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC)
        .map_err(|e| io(&p.pid)(std::io::Error::from(e)))?;

    // Our own watchdog: a TPM that hangs mid-command must not keep a
    // broker around that every later request would wait on.
    let busy_since = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    {
        let busy = Arc::clone(&busy_since);
        let limit = config.tpm_timeout;
        let files = p.clone();
        let _ = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(100));
                let since = busy.load(Ordering::SeqCst);
                if since != 0
                    && epoch.elapsed().saturating_sub(Duration::from_micros(since)) > limit
                {
                    // exit() runs no destructors: clean up by hand.
                    drop(RuntimeFiles(&files));
                    std::process::exit(libc::ETIMEDOUT);
                }
            });
    }

    let idle = config.broker_idle;
    let mut server = Server {
        owner_auth,
        config,
        loaded: None,
        lock: None,
        out: SecretBuf::new(32)?,
    };
    let idle_ms = u16::try_from(idle.as_millis()).unwrap_or(u16::MAX);
    let mut last = Instant::now();
    loop {
        let left = idle.saturating_sub(last.elapsed());
        if left.is_zero() {
            break;
        }
        let wait = PollTimeout::from(u16::try_from(left.as_millis()).unwrap_or(idle_ms).max(1));
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, wait) {
            Ok(0) => continue, // re-check the idle time
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
        if fds[1].any().unwrap_or(false) {
            break;
        }
        if let Ok((stream, _)) = listener.accept() {
            busy_since.store(epoch.elapsed().as_micros().max(1) as u64, Ordering::SeqCst);
            let keep = answer(&mut server, stream);
            busy_since.store(0, Ordering::SeqCst);
            last = Instant::now();
            if !keep {
                break;
            }
        }
    }
    // Stop accepting first, then free the TPM slot.
    drop(listener);
    server.shutdown();
    Ok(())
}

/// Removes the broker's socket and pid file when it stops, however it stops.
struct RuntimeFiles<'a>(&'a Paths);

impl Drop for RuntimeFiles<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0.socket);
        let _ = std::fs::remove_file(&self.0.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_configuration() {
        let a = Config::parse("", Path::new("/a.conf")).unwrap();
        let b = Config::parse("[tpm]\ntimeout_ms = 1000\n", Path::new("/a.conf")).unwrap();
        let c = Config::parse("", Path::new("/c.conf")).unwrap();
        assert_ne!(paths(&a).socket, paths(&b).socket);
        assert_ne!(paths(&a).socket, paths(&c).socket);
        assert!(paths(&a).socket.starts_with(RUN_DIR));
        assert!(paths(&a).socket.to_string_lossy().ends_with(".sock"));
    }

    #[test]
    fn errnos() {
        assert_eq!(BrokerError::TimedOut.errno(), libc::ETIMEDOUT);
        assert_eq!(
            BrokerError::Refused {
                errno: libc::ENODEV
            }
            .errno(),
            libc::ENODEV
        );
        assert_eq!(BrokerError::Protocol.errno(), libc::EIO);
    }
}
