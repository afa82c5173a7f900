//! The broker: the resident half of the request-key handler.
//!
//! Started on demand by the handler (`derived-key-helper`) and gone after
//! a configured idle time, it keeps the derivation primary loaded and runs
//! the whole request pipeline ([`crate::broker::pipeline::decide`]): the handler is
//! left with reading the kernel's facts and answering the kernel. Why: on
//! a VM every exec of a glibc program pays for CPU feature probing and
//! dynamic linking (~0.6 ms here), and a request that loads the TPM stack,
//! opens the TCTI and creates the primary pays ~3 ms more on swtpm (far
//! more on a chip). Here that is paid once per broker lifetime. Nothing is
//! written to disk; the derivation is unchanged (the same primary, the
//! same HMAC).
//!
//! Protocol: [`crate::wire`]. The socket is 0600 in a 0700 root directory
//! and the broker checks the peer is root. Several requests run at once
//! (one per worker thread); TPM commands take turns, each waiting at most
//! until its request's deadline.

use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::audit::{self, Record};
use crate::config::{Config, ConfigError, LogTarget};
use crate::derive::Prk;
use crate::error::errno_name;
use crate::secret::{SecretAllocError, SecretBuf};
use crate::tpm::{Primary, Tpm, TpmError};
use crate::wire::{self, Answer, Hello, LogTo, Progress, Upcall};
use pipeline::{kernel_timeout, Context, PrkError};

pub use derived_keys_core::runtime::RUN_DIR;

mod hot;
pub mod pipeline;
mod queue;
mod shares;

use nix::sys::eventfd::{EfdFlags, EventFd};
use queue::{Job, Queues, MAX_QUEUED, MAX_QUEUED_PER_UID};
/// The broker's executable, beside the handler's.
pub const BROKER_EXE: &str = "derived-keys-broker";

/// Requests served at once, each worker accepting its own. More wait in
/// per-uid queues; a request stuck on a hung filesystem holds one until
/// its deadline.
const WORKERS: usize = 8;
/// The broker answers ETIMEDOUT itself this long before the handler's
/// deadline, so that the answer (and its audit line) is the broker's.
const MARGIN: Duration = Duration::from_millis(25);

/// The broker boundary's errors.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("TPM broker I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tpm(#[from] TpmError),
    #[error(transparent)]
    Memory(#[from] SecretAllocError),
    #[error(transparent)]
    Netns(#[from] crate::tpm::netns::NetnsError),
    #[error("cannot open the broker's session keyring to its handlers")]
    Keyring(#[source] crate::keyring::KeyringError),
}

impl BrokerError {
    /// The contract errno for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            BrokerError::Config(_) | BrokerError::Netns(_) => libc::ENODEV,
            BrokerError::Tpm(t) => t.errno(),
            BrokerError::Io { .. } | BrokerError::Memory(_) | BrokerError::Keyring(_) => libc::EIO,
        }
    }
}

/// Runtime files of the broker serving `config`.
#[derive(Debug, Clone)]
pub struct Paths {
    pub socket: PathBuf,
    pub lock: PathBuf,
    pub pid: PathBuf,
    /// Audit lines nobody could write, one byte each (broker and handler
    /// append; see `derived_keys_core::audit_line::DROPPED_EXT`). Outlives
    /// the broker, so that a count not yet reported is not lost.
    pub dropped: PathBuf,
    /// How far the brokers reported those drops (`AUDIT_STATE_EXT`).
    pub audit: PathBuf,
}

pub fn paths(config: &Config) -> Paths {
    let path = |ext| {
        let name = derived_keys_core::runtime::runtime_path(config.fingerprint, ext);
        PathBuf::from(std::ffi::OsStr::from_bytes(name.as_bytes()))
    };
    Paths {
        socket: path("sock"),
        lock: path("lock"),
        pid: path("pid"),
        dropped: path(derived_keys_core::audit_line::DROPPED_EXT),
        audit: path(derived_keys_core::audit_line::AUDIT_STATE_EXT),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BrokerError + '_ {
    move |source| BrokerError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates the runtime directory root-only, or makes an existing one so:
/// what is in it (sockets, pids, locks) is nobody else's business.
fn run_dir() -> std::io::Result<()> {
    let dir = Path::new(RUN_DIR);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir)?;
    std::os::unix::fs::chown(dir, Some(0), Some(0))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The lock file serializing access to the TPM a TCTI names (in the
/// network namespace it is reached in, if any: the same TCTI text in two
/// namespaces is two TPMs).
pub fn tpm_lock_path(tcti: &str, netns: Option<&Path>) -> PathBuf {
    let hash = match netns {
        None => crate::config::fnv1a(tcti.as_bytes()),
        Some(ns) => crate::config::fnv1a(
            tcti.as_bytes()
                .iter()
                .chain(b"\0")
                .chain(ns.as_os_str().as_encoded_bytes()),
        ),
    };
    Path::new(RUN_DIR).join(format!("tpm-{hash:016x}.lock"))
}

fn open_lock(config: &Config) -> std::io::Result<std::fs::File> {
    run_dir()?;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(tpm_lock_path(
            config.tcti.as_str(),
            config.tpm_netns.as_deref(),
        ))
}

/// An exclusive lock per TPM (by TCTI): swtpm takes one client at a time,
/// so brokers of different configurations and `dkey status` take turns.
pub fn tpm_lock(config: &Config) -> Result<nix::fcntl::Flock<std::fs::File>, BrokerError> {
    let file = open_lock(config).map_err(io(Path::new(RUN_DIR)))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, errno)| {
        BrokerError::Io {
            path: RUN_DIR.into(),
            source: std::io::Error::from(errno),
        }
    })
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

/// What only the holder of the TPM turn touches.
struct TpmState {
    loaded: Option<Loaded>,
    /// The TPM lock file, opened once; locked around each command.
    lock: Option<std::fs::File>,
}

/// One TPM command at a time; a waiter gives up at its deadline, or at
/// once when the watchdog has declared the TPM hung.
struct Turn {
    busy: Mutex<bool>,
    freed: Condvar,
}

struct TurnGuard<'a>(&'a Turn);

impl Drop for TurnGuard<'_> {
    fn drop(&mut self) {
        *relock(&self.0.busy) = false;
        self.0.freed.notify_one();
    }
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a thread panicked holding it; the data
    // (a flag, or TPM state rebuilt on the next error) stays usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Turn {
    fn take(&self, deadline: Instant, hung: &AtomicBool) -> Result<TurnGuard<'_>, PrkError> {
        let mut busy = relock(&self.busy);
        while *busy {
            let left = remaining(deadline)?;
            if hung.load(Ordering::SeqCst) {
                return Err(PrkError::TimedOut);
            }
            busy = self
                .freed
                .wait_timeout(busy, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        *busy = true;
        Ok(TurnGuard(self))
    }
}

fn remaining(deadline: Instant) -> Result<Duration, PrkError> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or(PrkError::TimedOut)
}

/// Everything the worker threads share.
struct Server {
    config: Config,
    owner_auth: Option<SecretBuf>,
    turn: Turn,
    tpm: Mutex<TpmState>,
    /// Microseconds since `epoch` when the current TPM command started; 0 if none.
    busy_since: AtomicU64,
    /// Set by the watchdog: the TPM stopped answering; the broker is ending.
    hung: AtomicBool,
    /// Set when the broker should end (idle, signal, TPM trouble).
    stop: AtomicBool,
    /// Requests being served, and when the last one ended (µs since `epoch`).
    inflight: AtomicUsize,
    last: AtomicU64,
    epoch: Instant,
    hello: Vec<u8>,
    /// Requests waiting for a worker, by share.
    queues: Mutex<Queues>,
    /// Which share each uid's requests count against.
    shares: shares::Shares,
    /// One count per job queued for a worker that is still waiting
    /// (a semaphore: each count wakes one worker).
    more: EventFd,
    /// Signalled when the last waiting worker takes work (`greeter`).
    all_busy: Condvar,
    /// Digests of executables for `csum`, and per-uid hashing turns.
    hasher: crate::requester::csum::Hasher,
    /// /proc/keys as each requester's uid sees it.
    keys: crate::requester::keys::KeysView,
    /// PRKs of recent requests (`tpm.hot_key_s`).
    hot: hot::HotKeys,
    /// The audit lines, written by a thread of their own.
    lines: audit::Lines,
    /// The listening socket and its path, to stop accepting at once.
    listener: std::os::fd::RawFd,
    socket: PathBuf,
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
            tpm.pin_salt_key(config.salt_key_name.clone());
            let primary = tpm.load_primary(owner_auth)?;
            Loaded { tpm, primary }
        }
    };
    Ok(loaded.insert(l))
}

impl Server {
    /// Ends accepting now: the socket disappears, so the next handler
    /// starts a fresh broker instead of queueing for this one. Workers
    /// blocked in accept wake up (shutdown makes it fail).
    fn begin_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.socket);
        let _ = nix::sys::socket::shutdown(self.listener, nix::sys::socket::Shutdown::Both);
        self.all_busy.notify_all();
    }

    /// Wakes `n` waiting workers, one count of the semaphore each.
    fn wake(&self, n: usize) {
        for _ in 0..n {
            let _ = self.more.write(1);
        }
    }

    fn micros(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// The PRK for `msg`: one TPM2_HMAC, in turn with other requests.
    fn prk(&self, msg: &[u8; 32], deadline: Instant) -> Result<Prk, PrkError> {
        if let Some(prk) = self.hot.get(msg)? {
            return Ok(prk);
        }
        let prk = self.tpm_prk(msg, deadline)?;
        self.hot.put(msg, &prk)?;
        Ok(prk)
    }

    /// The PRK for `msg` from the TPM.
    fn tpm_prk(&self, msg: &[u8; 32], deadline: Instant) -> Result<Prk, PrkError> {
        let mut out = SecretBuf::new(32)?;
        let _turn = self.turn.take(deadline, &self.hung)?;
        let mut st = relock(&self.tpm);
        let lock_err = |source| PrkError::Lock {
            path: tpm_lock_path(self.config.tcti.as_str(), self.config.tpm_netns.as_deref()),
            source,
        };
        let file = match st.lock.take() {
            Some(f) => f,
            None => open_lock(&self.config).map_err(lock_err)?,
        };
        let guard = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| lock_err(std::io::Error::from(errno)))?;
        self.busy_since.store(self.micros(), Ordering::SeqCst);
        let mut hmac = |loaded: &mut Option<Loaded>| {
            let l = load(loaded, &self.config, self.owner_auth.as_ref())?;
            l.tpm.prk_into(&l.primary, msg, &mut out)
        };
        let result = match hmac(&mut st.loaded) {
            Ok(()) => Ok(()),
            // The owner password will not get better by retrying.
            Err(e @ (TpmError::OwnerAuth { .. } | TpmError::Lockout { .. })) => Err(e),
            // The TPM restarted, or someone flushed our primary: start over once.
            Err(_) => {
                st.loaded = None;
                hmac(&mut st.loaded)
            }
        };
        self.busy_since.store(0, Ordering::SeqCst);
        if result.is_err() {
            // Start fresh next time; and end this broker, so that a
            // password fixed in its file is read again by the next one.
            st.loaded = None;
            self.begin_stop();
        }
        st.lock = guard.unlock().ok();
        result?;
        Prk::new(out).map_err(|_| PrkError::BadPrk)
    }

    fn shutdown(&self) {
        let Ok(_turn) = self
            .turn
            .take(Instant::now() + Duration::from_secs(1), &self.hung)
        else {
            return; // the TPM is busy or hung: the watchdog ends us
        };
        let mut st = relock(&self.tpm);
        if let Some(mut l) = st.loaded.take() {
            let _lock = tpm_lock(&self.config);
            let _ = l.tpm.flush_primary(l.primary);
        }
    }
}

/// Reads one upcall, however the kernel splits it: as much as has
/// arrived at each read (usually all of it at once), up to the largest
/// upcall, within `bound`. Nothing else comes on the connection, so bytes
/// past the upcall make it invalid. (The handler sends it once it has
/// our hello, so the first read usually waits.)
fn read_upcall(s: &mut UnixStream, buf: &mut Vec<u8>, bound: Duration) -> Option<()> {
    let mut chunk = [0u8; 4096];
    s.set_read_timeout(Some(bound)).ok()?;
    loop {
        match Upcall::progress(buf) {
            Progress::Complete(n) if n == buf.len() => return Some(()),
            Progress::Complete(_) | Progress::Invalid => return None,
            Progress::Need(_) => {}
        }
        let room = (wire::MAX_UPCALL + 1).saturating_sub(buf.len());
        let into = &mut chunk[..room.clamp(1, 4096)];
        let n = s.read(into).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Takes one connection as far as knowing whose request it is: peer check,
/// hello, upcall.
fn receive(server: &Server, mut s: UnixStream) -> Option<Job> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    // Root only: the socket is 0600 in a 0700 directory, and we check anyway.
    if getsockopt(&s, PeerCredentials).map(|c| c.uid()) != Ok(0) {
        return None;
    }
    // No write timeout: what the broker writes on a connection (the hello,
    // then one answer, under 2 kB together) always fits in an empty socket
    // buffer, so a write cannot block.
    s.write_all(&server.hello).ok()?;
    let mut buf = Vec::with_capacity(1024);
    read_upcall(&mut s, &mut buf, server.config.tpm_timeout)?;
    let uid = Upcall::decode(&buf)?.uid;
    Some(Job {
        stream: s,
        upcall: buf,
        uid,
        share: server.shares.share(uid),
    })
}

/// Why a request could not wait its turn.
#[derive(Debug, Clone, Copy)]
enum Busy {
    /// Its uid, or everyone, had as many waiting as allowed.
    Full,
    /// Every place was taken, and this request was the newest of the uid
    /// with the most waiting: it made room for uid `by`'s.
    Displaced { by: u32 },
}

/// A request that could not even wait its turn: ETIMEDOUT now.
fn refuse_busy(server: &Server, mut job: Job, why: Busy) {
    let header = Answer {
        errno: libc::ETIMEDOUT as u8,
        timeout_s: kernel_timeout(server.config.negative_timeout_s),
        len: 0,
    }
    .encode();
    let _ = job.stream.write_all(&header);
    drop(job.stream);
    let record = Record {
        uid: Some(job.uid),
        outcome: Some(errno_name(libc::ETIMEDOUT)),
        reason: Some(match why {
            Busy::Full => format!(
                "too many requests waiting (uid {}: at most {MAX_QUEUED_PER_UID}; all: at most {MAX_QUEUED})",
                job.uid
            ),
            Busy::Displaced { by } => format!(
                "too many requests waiting (all: at most {MAX_QUEUED}): uid {}{} had the most, and its newest made room for uid {by}'s",
                job.uid,
                if job.share == job.uid {
                    String::new()
                } else {
                    format!(" (a subordinate uid of {})", job.share)
                }
            ),
        }),
        ..Record::default()
    };
    server.lines.emit(record);
}

/// Answers one request: the pipeline, the answer, then the audit line
/// (after the answer: the requester does not wait for the log).
fn serve_one(server: &Server, job: Job) {
    let mut s = job.stream;
    let buf = job.upcall;
    let bound = server.config.tpm_timeout;
    let Some(up) = Upcall::decode(&buf) else {
        return;
    };
    // The handler's deadline is what counts: it started before us (before
    // the broker itself, if it started this one), and its connection may
    // have waited for a free worker. Both clocks are CLOCK_MONOTONIC.
    let now_us = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or(0) / 1000
        })
        .unwrap_or(0);
    let spent = Duration::from_micros(now_us.saturating_sub(up.started_us));
    let deadline = (Instant::now() + bound)
        .checked_sub(spent + MARGIN)
        .unwrap_or_else(Instant::now);
    let mut record = Record::default();
    let ctx = Context {
        config: &server.config,
        proc_root: Path::new("/proc"),
        prk: &|msg, deadline| server.prk(msg, deadline),
        hasher: &server.hasher,
        auth_line: &|uid, auth: &_, deadline| server.keys.auth_line(uid, auth, deadline),
    };
    let result = pipeline::decide(&up, &ctx, deadline, &mut record);
    let result = match result {
        Ok(_) if Instant::now() > deadline => Err(pipeline::PipelineError::TimedOut {
            ms: bound.as_millis(),
        }),
        other => other,
    };
    match result {
        Ok(grant) => {
            let payload = grant.payload.bytes();
            let header = Answer {
                errno: 0,
                timeout_s: grant.timeout_s.unwrap_or(0),
                len: u16::try_from(payload.len()).unwrap_or(0),
            }
            .encode();
            record.outcome = Some("granted");
            let parts = [
                std::io::IoSlice::new(&header),
                std::io::IoSlice::new(payload),
            ];
            if let Err(e) = write_all_vectored(&mut s, &parts, header.len() + payload.len()) {
                record.outcome = Some(errno_name(libc::EIO));
                record.reason = Some(format!("the handler went away: {e}"));
            }
        }
        Err(e) => {
            let errno = e.errno();
            record.outcome = Some(errno_name(errno));
            record.reason = Some(pipeline::chain(&e));
            let header = Answer {
                errno: u8::try_from(errno).unwrap_or(libc::EIO as u8),
                timeout_s: kernel_timeout(server.config.negative_timeout_s),
                len: 0,
            }
            .encode();
            let _ = s.write_all(&header);
        }
    }
    drop(s);
    server.lines.emit(record);
}

/// One write for header and payload (no copy of the payload); loops on
/// the rare short write.
fn write_all_vectored(
    s: &mut UnixStream,
    parts: &[std::io::IoSlice<'_>; 2],
    total: usize,
) -> std::io::Result<()> {
    let n = s.write_vectored(parts)?;
    if n < total {
        let (a, b) = (&*parts[0], &*parts[1]);
        if n < a.len() {
            s.write_all(&a[n..])?;
            s.write_all(b)?;
        } else {
            s.write_all(&b[n - a.len()..])?;
        }
    }
    Ok(())
}

/// How long a waiting worker sleeps before it looks at the stop flag again
/// (stopping also wakes it at once: the listener is shut down).
const WAIT_MS: u16 = 200;

/// Serves requests until the broker stops. There is no accepting thread:
/// every worker takes the connections waiting on the (non-blocking)
/// listener into the queues itself, then serves the next job the round
/// robin gives it, so the handler's connection wakes the worker that
/// answers it and nothing else. A hand-off from an accepting thread to a
/// worker, and waking every idle worker after each request, were two
/// more wake-ups on every request's path (~0.1 ms on a VM whose idle CPUs
/// halt). Idle workers wait on their own epoll sets, exclusively, so that
/// a connection wakes one of them; a worker that queued more jobs than it
/// can serve wakes as many waiting others through `server.more`, counted
/// in the queues so that a long busy spell leaves no wake-ups behind.
fn worker(server: &Server, listener: &UnixListener) {
    let Ok(waiter) = Waiter::new(listener, &server.more) else {
        // No way to wait (no file descriptors left?): rather than a broker
        // short of workers, or with none, let the next request start a
        // fresh one.
        server.begin_stop();
        return;
    };
    // Whether the listener may have connections: at first, and after each
    // wait. After serving a job with none queued, the wait itself finds
    // out (it returns at once for a waiting connection): one accept
    // answered EAGAIN less per request.
    let mut look = true;
    loop {
        if look || relock(&server.queues).queued > 0 {
            take_arrivals(server, listener);
        }
        let (job, wakes) = {
            let mut q = relock(&server.queues);
            let job = q.pop();
            (job, q.wakes_needed())
        };
        server.wake(wakes);
        match job {
            Some(job) => {
                run(server, job);
                look = false;
            }
            // Stopping: what is still queued belongs to uids with requests
            // running, whose workers take it when they finish.
            None if server.stop.load(Ordering::SeqCst) => return,
            None => {
                relock(&server.queues).waiting();
                let woken = waiter.wait(&server.more);
                let mut q = relock(&server.queues);
                q.awake(woken);
                if q.idle() == 0 {
                    server.all_busy.notify_one();
                }
                drop(q);
                look = true;
            }
        }
    }
}

/// While every worker is busy, greets new connections: it sends the hello
/// (which tells the handler the configured bound and log target) and
/// queues the request, as a worker would. Without it, a handler whose
/// connection waits in the backlog for a free worker would wait by its
/// default bound, not the configured one, and log its time-out to the
/// default target.
fn greeter(server: &Server, listener: &UnixListener) {
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
    let Ok(epoll) = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC) else {
        return;
    };
    if epoll
        .add(listener, EpollEvent::new(EpollFlags::EPOLLIN, 0))
        .is_err()
    {
        return;
    }
    loop {
        {
            let mut q = relock(&server.queues);
            while q.idle() > 0 && !server.stop.load(Ordering::SeqCst) {
                q = server
                    .all_busy
                    .wait_timeout(q, Duration::from_millis(u64::from(WAIT_MS)))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        }
        if server.stop.load(Ordering::SeqCst) {
            return;
        }
        // Every worker busy: a connection now is ours to greet. A short
        // wait, so that a worker freeing up takes over soon.
        let mut events = [EpollEvent::empty()];
        if let Ok(1) = epoll.wait(&mut events, 20u16) {
            take_arrivals(server, listener);
            // A worker may have started waiting meanwhile, and missed
            // what was just queued.
            let wakes = relock(&server.queues).wakes_needed();
            server.wake(wakes);
        }
    }
}

/// A worker's wait for a connection or for work another worker queued.
struct Waiter(nix::sys::epoll::Epoll);

impl Waiter {
    fn new(listener: &UnixListener, more: &EventFd) -> nix::Result<Waiter> {
        use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE;
        epoll.add(listener, EpollEvent::new(flags, 0))?;
        epoll.add(more, EpollEvent::new(flags, 1))?;
        Ok(Waiter(epoll))
    }

    /// Whether a wake-up sent through `more` woke it (and it took it).
    fn wait(&self, more: &EventFd) -> bool {
        let mut events = [nix::sys::epoll::EpollEvent::empty()];
        // One wake-up taken from the semaphore, unless another worker
        // took it first.
        matches!(self.0.wait(&mut events, WAIT_MS), Ok(1))
            && events[0].data() == 1
            && more.read().is_ok()
    }
}

/// Takes every connection waiting on the listener into the queues, so that
/// the round robin sees every uid that waits, however busy the workers
/// are; refuses those the queues have no room for.
fn take_arrivals(server: &Server, listener: &UnixListener) {
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            // Out of file descriptors, or stopping (the listener is shut
            // down): the waiting connections are not lost.
            Err(_) => {
                if !server.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                return;
            }
        };
        server.inflight.fetch_add(1, Ordering::SeqCst);
        let Some(job) = receive(server, stream) else {
            finished(server);
            continue;
        };
        let uid = job.uid;
        let queued = relock(&server.queues).push(job);
        let (refused, why) = match queued {
            Ok(None) => continue,
            Ok(Some(displaced)) => (displaced, Busy::Displaced { by: uid }),
            Err(job) => (job, Busy::Full),
        };
        refuse_busy(server, refused, why);
        finished(server);
    }
}

/// Serves a job the queues handed out, then frees its uid's slot.
fn run(server: &Server, job: Job) {
    let share = job.share;
    serve_one(server, job);
    relock(&server.queues).done(share);
    finished(server);
}

/// A connection is done with, answered or not.
fn finished(server: &Server) {
    server.last.store(server.micros(), Ordering::SeqCst);
    server.inflight.fetch_sub(1, Ordering::SeqCst);
}

fn encode_hello(config: &Config, keys_ring: i32) -> Vec<u8> {
    let (log, path): (LogTo, &[u8]) = match &config.log {
        LogTarget::Syslog { socket } => (LogTo::Syslog, socket.as_os_str().as_encoded_bytes()),
        LogTarget::Kmsg => (LogTo::Kmsg, b""),
        LogTarget::Stderr => (LogTo::Stderr, b""),
    };
    let hello = Hello {
        log,
        bound_ms: u32::try_from(config.tpm_timeout.as_millis()).unwrap_or(u32::MAX),
        negative_s: kernel_timeout(config.negative_timeout_s),
        keys_ring,
        // A socket path too long for a hello: the handler uses the default.
        log_path: if path.len() <= wire::MAX_LOG_PATH {
            path
        } else {
            b""
        },
    };
    let mut buf = [0u8; wire::MAX_HELLO];
    let n = hello.encode(&mut buf).unwrap_or(0);
    buf[..n].to_vec()
}

/// Set across the broker's one re-execution of itself at start.
const DETACHED_ENV: &str = "DERIVED_KEYS_BROKER_DETACHED";

/// Leaves the request-key context the broker was started from, that of
/// the request whose handler started it: its session keyring
/// (`_req.<serial>`, holding that request's authorization key), the
/// authority to instantiate, the handler's session and terminal.
///
/// Joining a fresh session keyring ([`crate::keyring::detach`]) is not
/// enough on its own: every open file keeps the credentials it was opened
/// with, and with them their keyrings. Here that is standard input,
/// output and error (request-key's /dev/null), the broker's executable
/// and every shared library ld.so mapped. So the broker reopens its
/// standard streams and then executes itself once more, under the new
/// credentials; until it exits, the first requester's keys would
/// otherwise stay alive and count against that user's quota.
fn leave_requester_context() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let _ = nix::unistd::setsid();
    if let Err(e) = crate::keyring::detach() {
        let _ = writeln!(std::io::stderr(), "derived-keys-broker: {e}");
    }
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..3 {
            let _ = nix::unistd::dup2(null.as_raw_fd(), fd);
        }
    }
    if std::env::var_os(DETACHED_ENV).is_some() {
        // Still one thread: nothing reads the environment concurrently.
        std::env::remove_var(DETACHED_ENV);
        return;
    }
    // Only the broker's own executable re-executes (never a test binary
    // that calls `serve`).
    let exe = std::env::current_exe().ok();
    if exe.as_deref().and_then(Path::file_name) != Some(std::ffi::OsStr::new(BROKER_EXE)) {
        return;
    }
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| BROKER_EXE.into());
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(argv0)
        .args(args)
        .env(DETACHED_ENV, "1")
        .exec();
    let _ = writeln!(
        std::io::stderr(),
        "derived-keys-broker: cannot execute itself again ({err}); \
         it holds its first requester's keyrings until it exits"
    );
}

/// The broker's main loop. Returns when idle, on SIGTERM, or when another
/// broker already serves this configuration.
pub fn serve(config_path: &Path) -> Result<(), BrokerError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    use std::os::fd::AsFd;

    leave_requester_context();
    crate::secret::harden();
    // While we are one thread, and before we hold a TPM connection, a
    // password or a lock: the process that makes /proc/keys views.
    let view_maker = match crate::sys::ViewMaker::start() {
        Ok(m) => Some(m),
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "derived-keys-broker: no /proc/keys view maker: {e}"
            );
            None
        }
    };

    // Everything that can fail for configuration reasons, before any
    // runtime file exists: a broker that cannot serve never listens.
    let config = Config::load(config_path)?;
    let owner_auth = config.owner_auth()?;
    // Where handlers put their authorization key for our /proc/keys views.
    let keys_ring = crate::keyring::session_for_handlers().map_err(BrokerError::Keyring)?;
    // The embedded TPM listens only in its own network namespace; enter it
    // before any thread starts, so that every thread is in it.
    if let Some(ns) = &config.tpm_netns {
        crate::tpm::netns::enter(ns)?;
    }
    let p = paths(&config);
    run_dir().map_err(io(Path::new(RUN_DIR)))?;
    let Some(_instance) = instance_lock(&p.lock)? else {
        return Ok(()); // another broker serves this configuration
    };
    // Lines no channel takes are counted from here on (before anything
    // listens, so before any request).
    let counted = match audit::count_into(&config.path, &p.dropped, &p.audit) {
        Ok(()) => Some(p.dropped.clone()),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "derived-keys-broker: {e}");
            None
        }
    };
    let _ = std::fs::remove_file(&p.socket);
    let listener = UnixListener::bind(&p.socket).map_err(io(&p.socket))?;
    // From here on, every way out removes the socket and the pid file.
    let _files = RuntimeFiles(&p);
    std::fs::set_permissions(&p.socket, std::fs::Permissions::from_mode(0o600))
        .map_err(io(&p.socket))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&p.pid)
        .and_then(|mut f| f.write_all(std::process::id().to_string().as_bytes()))
        .map_err(io(&p.pid))?;

    // Blocked in every thread (they inherit the mask); read from the fd.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    let _ = signals.thread_block();
    let sigfd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC)
        .map_err(|e| io(&p.pid)(std::io::Error::from(e)))?;
    // The first thread: after the mask, which it inherits (a SIGTERM it
    // took unblocked would end the broker without its shutdown).
    let lines = audit::Lines::start(config.log.clone(), counted).map_err(io(&p.dropped))?;

    // Workers take connections without blocking (see `worker`).
    listener.set_nonblocking(true).map_err(io(&p.socket))?;
    let more = EventFd::from_value_and_flags(
        0,
        EfdFlags::EFD_SEMAPHORE | EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC,
    )
    .map_err(|e| io(&p.socket)(std::io::Error::from(e)))?;
    let idle = config.broker_idle;
    let limit = config.tpm_timeout;
    let server = Server {
        hello: encode_hello(&config, keys_ring),
        queues: Mutex::new(Queues::default()),
        shares: shares::Shares::host(),
        more,
        all_busy: Condvar::new(),
        hasher: crate::requester::csum::Hasher::default(),
        keys: crate::requester::keys::KeysView::new(
            view_maker,
            crate::keyring::is_anonymous_session(keys_ring).then_some(keys_ring),
        ),
        hot: hot::HotKeys::new(config.hot_key),
        lines,
        owner_auth,
        config,
        turn: Turn {
            busy: Mutex::new(false),
            freed: Condvar::new(),
        },
        tpm: Mutex::new(TpmState {
            loaded: None,
            lock: None,
        }),
        busy_since: AtomicU64::new(0),
        hung: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        inflight: AtomicUsize::new(0),
        last: AtomicU64::new(0),
        epoch: Instant::now(),
        listener: std::os::fd::AsRawFd::as_raw_fd(&listener),
        socket: p.socket.clone(),
    };
    server.last.store(server.micros(), Ordering::SeqCst);

    std::thread::scope(|scope| {
        // The signing table, and root's view of /proc/keys (root asks
        // most), are made beside the first request's TPM work.
        let _ = std::thread::Builder::new()
            .name("warm-up".into())
            .spawn_scoped(scope, || {
                crate::derive::warm_up();
                server.keys.prepare(0);
            });
        let spawned = (0..WORKERS)
            .filter(|_| {
                std::thread::Builder::new()
                    .name("worker".into())
                    .spawn_scoped(scope, || worker(&server, &listener))
                    .is_ok()
            })
            .count();
        if spawned == 0
            || std::thread::Builder::new()
                .name("greeter".into())
                .spawn_scoped(scope, || greeter(&server, &listener))
                .is_err()
        {
            server.stop.store(true, Ordering::SeqCst);
        }
        // Our own watchdog: a TPM that hangs mid-command must not keep a
        // broker around that every later request would wait on. Waiting
        // requests get ETIMEDOUT at once; then the broker exits.
        let watchdog = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn_scoped(scope, || {
                while !server.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                    let since = server.busy_since.load(Ordering::SeqCst);
                    if since != 0
                        && Duration::from_micros(server.micros().saturating_sub(since)) > limit
                    {
                        server.hung.store(true, Ordering::SeqCst);
                        server.turn.freed.notify_all();
                        std::thread::sleep(Duration::from_millis(50));
                        // exit() runs no destructors: clean up by hand,
                        // and count the lines that will not be written.
                        server.lines.abandon();
                        drop(RuntimeFiles(&p));
                        std::process::exit(libc::ETIMEDOUT);
                    }
                }
            });
        if watchdog.is_err() {
            server.stop.store(true, Ordering::SeqCst);
        }
        loop {
            if server.stop.load(Ordering::SeqCst) {
                break;
            }
            let quiet = Duration::from_micros(
                server
                    .micros()
                    .saturating_sub(server.last.load(Ordering::SeqCst)),
            );
            // Hot keys keep the broker for their window: leaving would
            // send their next request back to the TPM.
            if server.inflight.load(Ordering::SeqCst) == 0 && quiet >= idle && server.hot.is_empty()
            {
                break;
            }
            let wait = match idle.saturating_sub(quiet) {
                Duration::ZERO => Duration::from_millis(200), // waiting for hot keys
                left => left.min(Duration::from_millis(200)),
            };
            let wait = PollTimeout::from(u16::try_from(wait.as_millis()).unwrap_or(200).max(1));
            let mut fds = [PollFd::new(sigfd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, wait) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) | Err(_) => break,
            }
        }
        // Stop accepting and let requests in progress and queued finish:
        // the scope joins the workers.
        server.begin_stop();
    });
    // Only then free the TPM slot: a job served after it would have
    // loaded the primary again, left behind on a TPM without a resource
    // manager.
    server.shutdown();
    server.lines.finish();
    Ok(())
}

/// Removes the broker's socket and pid file when it stops, however it stops.
struct RuntimeFiles<'a>(&'a Paths);

impl Drop for RuntimeFiles<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0.socket);
        let _ = std::fs::remove_file(&self.0.pid);
        // Still locked by us: a broker that opened this file meanwhile
        // sees it unlinked and starts over (see `instance_lock`).
        let _ = std::fs::remove_file(&self.0.lock);
    }
}

/// The one-broker-per-configuration lock, or None if another broker holds
/// it. A lock on a file that has been unlinked meanwhile (its broker was
/// leaving) does not count: open the path again.
fn instance_lock(path: &Path) -> Result<Option<nix::fcntl::Flock<std::fs::File>>, BrokerError> {
    use std::os::unix::fs::MetadataExt;
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .map_err(io(path))?;
        let Ok(lock) = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        else {
            return Ok(None);
        };
        let held = lock.metadata().map_err(io(path))?;
        match std::fs::metadata(path) {
            Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => return Ok(Some(lock)),
            _ => continue,
        }
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
        assert_eq!(PrkError::TimedOut.errno(), libc::ETIMEDOUT);
        assert_eq!(
            BrokerError::Config(ConfigError::Read {
                path: "/x".into(),
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            })
            .errno(),
            libc::ENODEV
        );
        assert_eq!(PrkError::BadPrk.errno(), libc::EIO);
    }
}
