//! The request-key handler: parse, identify, decide, derive, answer.
//!
//! The requester sleeps uninterruptibly until this process exits, so the
//! handler bounds its own run time: a watchdog thread answers ETIMEDOUT and
//! exits at the deadline, whatever the TPM is doing. Exactly one of the
//! two answers the kernel; every path ends in instantiate or reject.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::audit::{self, Record};
use crate::broker;
use crate::config::{Config, CsumSource, LogTarget};
use crate::derive::{self, Input, P256Key, Purpose, Subject};
use crate::error::{errno_name, HandlerError};
use crate::keyring;
use crate::policy::{self, Facts};
use crate::request::{Binding, Callout, Description, KeyType, Request, Want};
use crate::requester::{self, Requester};
use crate::secret::SecretBuf;

/// Bound and negative timeout used until the configuration is read.
const DEFAULT_BOUND: Duration = Duration::from_secs(5);
const DEFAULT_NEGATIVE_S: u32 = 1;

/// What the kernel (via /sbin/request-key) tells the handler.
#[derive(Debug, Clone)]
pub struct Args {
    /// The key under construction (`%k`).
    pub key: i32,
    /// The requester's fsuid and fsgid (`%u`, `%g`).
    pub uid: u32,
    pub gid: u32,
    pub config: PathBuf,
    /// The description prefix this rule serves (`derived` in production).
    pub prefix: String,
    /// procfs mount point; tests never change it, but keeping it a
    /// parameter keeps the /proc parsing testable.
    pub proc_root: PathBuf,
}

/// The kernel keeps key expiry in whole seconds (`now_seconds + timeout`)
/// and checks it once more when the helper exits: a 1-second timeout set
/// late in a second can already count as expired then, and the requester
/// gets ENOKEY instead of our answer. One extra second makes a result live
/// at least the configured time (and at most one second more).
fn kernel_timeout(configured_s: u32) -> u32 {
    configured_s.saturating_add(1)
}

/// State shared with the watchdog.
struct Shared {
    answered: bool,
    deadline: Instant,
    negative_s: u32,
    log: LogTarget,
    record: Record,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A poisoned lock only means another thread panicked while holding
    // it; the data (flags and a log record) stays usable.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// Makes this process non-dumpable: no core files, no ptrace or
/// /proc/<pid>/mem by non-root, no key material on disk after a crash.
pub fn harden() {
    let _ = nix::sys::prctl::set_dumpable(false);
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
}

fn watchdog(key: i32, shared: Arc<Mutex<Shared>>) {
    loop {
        let deadline = lock(&shared).deadline;
        let now = Instant::now();
        if now < deadline {
            std::thread::sleep((deadline - now).min(Duration::from_millis(100)));
            continue;
        }
        let mut s = lock(&shared);
        if s.deadline > Instant::now() {
            continue; // moved while we slept
        }
        let mut log = None;
        if !s.answered {
            s.answered = true;
            let _ = keyring::reject(key, kernel_timeout(s.negative_s), libc::ETIMEDOUT);
            s.record.outcome = Some("ETIMEDOUT");
            s.record.reason = Some("the request did not finish within the configured bound".into());
            log = Some((s.log.clone(), s.record.clone()));
        }
        drop(s);
        if let Some((target, record)) = log {
            audit::emit(&target, &record);
        }
        std::process::exit(1);
    }
}

/// The key under construction, for the panic hook.
static KEY: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Should anything panic after all (a dependency, an allocation failure),
/// the requester still gets an answer (EIO) instead of hanging on ENOKEY.
/// The hook prints nothing: a panic message could carry data.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|_| {
        let key = KEY.load(std::sync::atomic::Ordering::SeqCst);
        if key != 0 {
            let _ = keyring::reject(key, kernel_timeout(DEFAULT_NEGATIVE_S), libc::EIO);
        }
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"derived-key-helper: internal error; the request was rejected with EIO\n",
        );
    }));
}

/// An error and its sources, for the audit line: what an operator needs.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// Runs one request to its end; returns the process exit status.
pub fn run(args: &Args) -> u8 {
    KEY.store(args.key, std::sync::atomic::Ordering::SeqCst);
    install_panic_hook();
    let start = Instant::now();
    let shared = Arc::new(Mutex::new(Shared {
        answered: false,
        deadline: start + DEFAULT_BOUND,
        negative_s: DEFAULT_NEGATIVE_S,
        log: LogTarget::Syslog {
            socket: "/dev/log".into(),
        },
        record: Record {
            uid: Some(args.uid),
            ..Record::default()
        },
    }));
    let spawned = {
        let shared = Arc::clone(&shared);
        let key = args.key;
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || watchdog(key, shared))
    };
    if spawned.is_err() {
        // Without the watchdog the run time is unbounded: refuse to start.
        let mut s = lock(&shared);
        s.answered = true;
        let _ = keyring::reject(args.key, kernel_timeout(s.negative_s), libc::EIO);
        s.record.outcome = Some("EIO");
        s.record.reason = Some("cannot start the watchdog thread".into());
        let (target, record) = (s.log.clone(), s.record.clone());
        drop(s);
        audit::emit(&target, &record);
        return 1;
    }
    let result = serve(args, start, &shared);
    let mut s = lock(&shared);
    if s.answered {
        // Granted (already logged by `serve`), or the watchdog answered.
        return u8::from(result.is_err());
    }
    s.answered = true;
    let (status, errno) = match result {
        Ok(()) => {
            s.record.outcome = Some("granted");
            (0, None)
        }
        Err(e) => {
            let errno = e.errno();
            s.record.outcome = Some(errno_name(errno));
            s.record.reason = Some(chain(&e));
            (1, Some(errno))
        }
    };
    if let Some(errno) = errno {
        if let Err(e) = keyring::reject(args.key, kernel_timeout(s.negative_s), errno) {
            s.record.reason = Some(format!(
                "{}; and rejecting the key failed: {e}",
                s.record.reason.take().unwrap_or_default()
            ));
        }
    }
    // Logging happens outside the lock: a slow log must never keep the
    // watchdog from enforcing the bound.
    let (target, record) = (s.log.clone(), s.record.clone());
    drop(s);
    audit::emit(&target, &record);
    status
}

/// Everything between start-up and the answer. On success the key has
/// been instantiated (under the shared lock, so the watchdog cannot also
/// answer).
fn serve(args: &Args, start: Instant, shared: &Mutex<Shared>) -> Result<(), HandlerError> {
    let target = keyring::describe(args.key)?;
    let config = Config::load(&args.config)?;
    {
        let mut s = lock(shared);
        s.deadline = start + config.tpm_timeout;
        s.negative_s = config.negative_timeout_s;
        s.log = config.log.clone();
    }

    // 1. The typed request.
    let key_type = KeyType::parse(&target.key_type)?;
    let description = Description::parse(&target.description, &args.prefix);
    let callout = keyring::read_callout()?;
    let req = Request::from_parts(key_type, description?, Callout::parse(&callout)?)?;
    {
        let mut s = lock(shared);
        s.record.name = Some(req.name.as_str().to_owned());
        s.record.operation = Some(req.operation_label());
        s.record.binding = Some(req.binding.as_str());
        s.record.key_type = Some(req.key_type.as_str());
    }

    // 2. The requester.
    if target.uid != args.uid {
        return Err(HandlerError::Requester(
            requester::RequesterError::UidMismatch {
                key_uid: target.uid,
                argv_uid: args.uid,
            },
        ));
    }
    let auth = keyring::auth_key_serial()?;
    let who: Requester = requester::identify(&args.proc_root, auth, args.key)?;
    {
        let mut s = lock(shared);
        s.record.pid = Some(who.tid);
        s.record.exe = Some(who.exe.display().to_string());
    }

    // 3. Policy, then what the binding mixes in.
    let facts = Facts {
        uid: args.uid,
        gid: args.gid,
        groups: &who.groups,
        same_mount_ns: who.same_mount_ns,
        exe_at_path: who.exe_at_path,
    };
    policy::check(&config, &req, &facts)?;
    let digest = match (req.binding, config.csum_source) {
        (Binding::Csum, CsumSource::File) => requester::exe_digest(&args.proc_root, who.tid)?,
        (Binding::Csum, CsumSource::Ima) => {
            requester::ima_digest(Path::new(requester::IMA_MEASUREMENTS), &who.exe)?
        }
        _ => [0; 32],
    };
    let subject = match req.binding {
        Binding::Path => Subject::Path {
            uid: args.uid,
            path: requester::path_bytes(&who.exe),
        },
        Binding::Csum => Subject::Csum {
            uid: args.uid,
            digest,
        },
        Binding::User => Subject::User { uid: args.uid },
        Binding::Machine => Subject::Machine,
    };
    let input = Input {
        purpose: match req.want {
            Want::Symmetric { len } => Purpose::Symmetric(len),
            Want::PublicKey | Want::Sign(_) => Purpose::P256,
        },
        name: req.name.as_str(),
        subject,
        account: req.options.account.as_ref().map(|m| m.as_str()),
        client: req.options.client.as_ref().map(|m| m.as_str()),
        epoch: req.options.epoch,
    };

    // 4. The TPM, through the broker (started here if none runs).
    let broker = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(broker::BROKER_EXE)))
        .unwrap_or_else(|| PathBuf::from(broker::BROKER_EXE));
    let prk = broker::prk(
        &config,
        &broker,
        &input.message(),
        start + config.tpm_timeout,
    )?;

    // 5. The result, then the answer.
    let payload: Payload = match req.want {
        Want::Symmetric { len } => Payload::Secret(derive::symmetric_key(&prk, len.into())?),
        Want::PublicKey => Payload::Public(P256Key::from_prk(&prk)?.spki_der()?),
        Want::Sign(d) => Payload::Public(P256Key::from_prk(&prk)?.sign_digest(&d.0)?),
    };
    drop(prk);
    let mut s = lock(shared);
    if s.answered {
        return Ok(()); // too late: the watchdog has answered
    }
    if matches!(req.want, Want::Sign(_)) {
        keyring::set_timeout(args.key, kernel_timeout(config.signature_timeout_s))?;
    }
    keyring::instantiate(args.key, payload.bytes())?;
    s.answered = true;
    s.record.outcome = Some("granted");
    let (target, record) = (s.log.clone(), s.record.clone());
    drop(s);
    audit::emit(&target, &record);
    Ok(())
}

/// A result: secret bytes stay in secret memory until the kernel has them.
enum Payload {
    Secret(SecretBuf),
    Public(Vec<u8>),
}

impl Payload {
    fn bytes(&self) -> &[u8] {
        match self {
            Payload::Secret(s) => s.as_ref(),
            Payload::Public(p) => p,
        }
    }
}
