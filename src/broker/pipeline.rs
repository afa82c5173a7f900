//! What a request-key upcall gets: parse, identify, decide, derive.
//!
//! The request-key handler itself (`derived-key-helper`) is a small static
//! program that only reads the kernel's facts and answers the kernel; the
//! broker runs this pipeline on those facts (see [`crate::wire`]) and tells
//! the handler what to answer. Everything here is the same whichever
//! process runs it: the requester is found from /proc, the TPM is reached
//! through a function the caller passes.

use std::path::Path;
use std::time::Instant;

use crate::audit::Record;
use crate::config::{Config, CsumSource};
use crate::derive::{self, Input, P256Key, Prk, Purpose, Subject};
use crate::keyring::{KeyRecord, KeyringError};
use crate::policy::{self, Facts};
use crate::request::{Binding, Callout, Description, KeyType, Request, RequestError, Want};
use crate::requester::{self, Requester};
use crate::secret::SecretBuf;
use crate::wire::Upcall;

/// The kernel keeps key expiry in whole seconds (`now_seconds + timeout`)
/// and checks it once more when the helper exits: a 1-second timeout set
/// late in a second can already count as expired then, and the requester
/// gets ENOKEY instead of our answer. One extra second makes a result live
/// at least the configured time (and at most one second more).
pub fn kernel_timeout(configured_s: u32) -> u32 {
    configured_s.saturating_add(1)
}

/// An error and its sources, for the audit line: what an operator needs.
pub fn chain(e: &dyn std::error::Error) -> String {
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

/// The TPM step: the PRK for a 32-byte message, by a deadline.
pub type PrkFn<'a> = dyn Fn(&[u8; 32], Instant) -> Result<Prk, PrkError> + 'a;

/// Why the TPM step gave no PRK.
#[derive(Debug, thiserror::Error)]
pub enum PrkError {
    #[error("no TPM turn before the request's deadline")]
    TimedOut,
    #[error("cannot take the TPM lock {path}")]
    Lock {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the TPM's answer is not a 32-byte PRK")]
    BadPrk,
    #[error(transparent)]
    Tpm(#[from] crate::tpm::TpmError),
    #[error(transparent)]
    Memory(#[from] crate::secret::SecretAllocError),
}

impl PrkError {
    pub fn errno(&self) -> i32 {
        match self {
            PrkError::TimedOut => libc::ETIMEDOUT,
            PrkError::Tpm(t) => t.errno(),
            PrkError::Lock { .. } | PrkError::BadPrk | PrkError::Memory(_) => libc::EIO,
        }
    }
}

/// Everything that can stop a request from being answered with a key.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("malformed request: {0}")]
    Request(#[from] RequestError),
    #[error("refused: {0}")]
    Policy(#[from] crate::policy::PolicyError),
    #[error("cannot identify the requester: {0}")]
    Requester(#[from] requester::RequesterError),
    #[error("csum: {0}")]
    Csum(#[from] crate::requester::csum::CsumError),
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("TPM: {0}")]
    Prk(#[from] PrkError),
    #[error("derivation: {0}")]
    Derive(#[from] derive::DeriveError),
    #[error("keyring: {0}")]
    Keyring(#[from] KeyringError),
    #[error("no answer within {ms} ms")]
    TimedOut { ms: u128 },
}

impl PipelineError {
    /// The errno the requester's request_key(2) fails with: each
    /// boundary's own mapping.
    pub fn errno(&self) -> i32 {
        use PipelineError as P;
        match self {
            P::Request(e) => e.errno(),
            P::Policy(e) => e.errno(),
            P::Requester(e) => e.errno(),
            P::Csum(e) => e.errno(),
            P::Config(e) => e.errno(),
            P::Prk(e) => e.errno(),
            // A derivation that fails is an internal error of ours.
            P::Derive(_) => libc::EIO,
            P::Keyring(k) => k.errno().unwrap_or(libc::EIO),
            P::TimedOut { .. } => libc::ETIMEDOUT,
        }
    }
}

/// What the pipeline needs besides the upcall.
pub struct Context<'a> {
    pub config: &'a Config,
    /// procfs mount point; tests never change it, but keeping it a
    /// parameter keeps the /proc parsing testable.
    pub proc_root: &'a Path,
    pub prk: &'a PrkFn<'a>,
    /// `csum` digests: bounded, cached, one file at a time per uid.
    pub hasher: &'a crate::requester::csum::Hasher,
}

/// A granted request: what to instantiate, and the key's timeout.
pub struct Grant {
    pub payload: Payload,
    /// Seconds to hand the kernel (already rounded up), or None.
    pub timeout_s: Option<u32>,
}

/// Decides one upcall. `record` collects what the audit line will say as
/// the request becomes known, whatever the outcome.
pub fn decide(
    up: &Upcall<'_>,
    ctx: &Context<'_>,
    deadline: Instant,
    record: &mut Record,
) -> Result<Grant, PipelineError> {
    let config = ctx.config;
    record.uid = Some(up.uid);
    let target = KeyRecord::parse(up.describe).ok_or(KeyringError::Describe { key: up.key })?;
    // The prefix comes from the rule file; one that is not text matches
    // no description.
    let prefix = std::str::from_utf8(up.prefix).map_err(|_| RequestError::BadPrefix {
        prefix: String::from_utf8_lossy(up.prefix).into_owned(),
    })?;

    // 1. The typed request.
    let key_type = KeyType::parse(&target.key_type)?;
    let description = Description::parse(&target.description, prefix);
    let req = Request::from_parts(key_type, description?, Callout::parse(up.callout)?)?;
    record.name = Some(req.name.as_str().to_owned());
    record.operation = Some(req.operation_label());
    record.binding = Some(req.binding.as_str());
    record.key_type = Some(req.key_type.as_str());

    // 2. The requester.
    if target.uid != up.uid {
        return Err(PipelineError::Requester(
            requester::RequesterError::UidMismatch {
                key_uid: target.uid,
                argv_uid: up.uid,
            },
        ));
    }
    let who: Requester =
        requester::identify(ctx.proc_root, up.keys_line, up.auth_lines, up.auth, up.key)?;
    record.pid = Some(who.tid);
    record.exe = Some(who.exe.clone());

    // 3. Policy, then what the binding mixes in.
    let facts = Facts {
        uid: up.uid,
        gid: up.gid,
        groups: &who.groups,
        same_mount_ns: who.same_mount_ns,
        exe_at_path: who.exe_at_path,
        same_user_ns: who.same_user_ns,
    };
    policy::check(config, &req, &facts)?;
    let digest = match (req.binding, config.csum_source) {
        (Binding::Csum, CsumSource::File) => ctx.hasher.exe_digest(
            ctx.proc_root,
            who.tid,
            up.uid,
            config.csum_max_bytes,
            deadline,
        )?,
        (Binding::Csum, CsumSource::Ima) => {
            requester::ima_digest(Path::new(requester::IMA_MEASUREMENTS), &who.exe)?
        }
        _ => [0; 32],
    };
    let subject = match req.binding {
        Binding::Path => Subject::Path {
            uid: up.uid,
            path: requester::path_bytes(&who.exe),
        },
        Binding::Csum => Subject::Csum {
            uid: up.uid,
            digest,
        },
        Binding::User => Subject::User { uid: up.uid },
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

    // 4. The TPM.
    let prk = (ctx.prk)(&input.message(), deadline)?;

    // 5. The result.
    let payload = match req.want {
        Want::Symmetric { len } => Payload::Secret(derive::symmetric_key(&prk, len.into())?),
        Want::PublicKey => Payload::Public(P256Key::from_prk(&prk)?.spki_der()?),
        Want::Sign(d) => Payload::Public(P256Key::from_prk(&prk)?.sign_digest(&d.0)?),
    };
    let timeout_s =
        matches!(req.want, Want::Sign(_)).then(|| kernel_timeout(config.signature_timeout_s));
    Ok(Grant { payload, timeout_s })
}

/// A result: secret bytes stay in secret memory until the kernel has them.
pub enum Payload {
    Secret(SecretBuf),
    Public(Vec<u8>),
}

impl Payload {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Payload::Secret(s) => s.as_ref(),
            Payload::Public(p) => p,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up<'a>(describe: &'a [u8], callout: &'a [u8], keys_line: &'a [u8]) -> Upcall<'a> {
        Upcall {
            key: 0x11,
            uid: 1000,
            gid: 1000,
            auth: 0x22,
            started_us: 0,
            prefix: b"derived",
            describe,
            callout,
            keys_line,
            auth_lines: 1,
        }
    }

    fn run(u: &Upcall<'_>) -> (Result<Grant, PipelineError>, Record) {
        let config = Config::parse("", Path::new("/t.conf")).unwrap();
        let no_tpm = |_: &[u8; 32], _: Instant| -> Result<Prk, PrkError> {
            panic!("the TPM must not be reached")
        };
        let ctx = Context {
            config: &config,
            proc_root: Path::new("/nonexistent-proc"),
            prk: &no_tpm,
            hasher: &crate::requester::csum::Hasher::default(),
        };
        let mut record = Record::default();
        let r = decide(
            u,
            &ctx,
            Instant::now() + std::time::Duration::from_secs(5),
            &mut record,
        );
        (r, record)
    }

    fn errno(r: Result<Grant, PipelineError>) -> i32 {
        match r {
            Ok(_) => 0,
            Err(e) => e.errno(),
        }
    }

    #[test]
    fn malformed_requests_never_reach_the_tpm() {
        let line = b"00000022 I--Q--- 1 perm 3f010000 1000 1000 .request_ key:00000011 pid:1 ci:7";
        for (describe, callout, want) in [
            (
                &b"user;1000;1000;3f010000;derived:db"[..],
                &b"32 nobinding"[..],
                libc::EINVAL,
            ),
            (
                b"user;1000;1000;3f010000;other:db",
                b"32 user",
                libc::EINVAL,
            ),
            (
                b"logon;1000;1000;3f010000;derived:db:pub",
                b"p256 user",
                libc::EINVAL,
            ),
            (b"garbage", b"32 user", libc::EIO),
        ] {
            let (r, _) = run(&up(describe, callout, line));
            assert_eq!(errno(r), want, "{:?}", String::from_utf8_lossy(describe));
        }
    }

    #[test]
    fn identity_problems_are_eacces_and_the_record_says_what_was_asked() {
        // The key belongs to another uid than request-key reported.
        let (r, rec) = run(&up(b"user;0;0;3f010000;derived:db", b"32 user", b""));
        assert_eq!(errno(r), libc::EACCES);
        assert_eq!(rec.name.as_deref(), Some("db"));
        assert_eq!(rec.binding, Some("user"));
        assert_eq!(rec.uid, Some(1000));
        // No /proc/keys line for the authorization key.
        let (r, rec) = run(&up(b"user;1000;1000;3f010000;derived:db", b"32 path", b""));
        assert_eq!(errno(r), libc::EACCES);
        assert_eq!(rec.pid, None);
        // A line naming another key.
        let other = b"00000022 I--Q--- 1 perm 3f010000 1000 1000 .request_ key:00000099 pid:1 ci:7";
        let (r, _) = run(&up(
            b"user;1000;1000;3f010000;derived:db",
            b"32 path",
            other,
        ));
        assert_eq!(errno(r), libc::EACCES);
    }

    #[test]
    fn a_serial_on_two_lines_is_refused_and_says_why() {
        let line = b"00000022 I--Q--- 1 perm 3f010000 1000 1000 .request_ key:00000011 pid:1 ci:7";
        let mut u = up(b"user;1000;1000;3f010000;derived:db", b"32 path", line);
        u.auth_lines = 2;
        let (r, rec) = run(&u);
        let e = r.err().unwrap();
        assert_eq!(e.errno(), libc::EACCES);
        assert!(
            matches!(
                e,
                PipelineError::Requester(requester::RequesterError::AmbiguousAuthKey {
                    auth: 0x22,
                    lines: 2
                })
            ),
            "{e:?}"
        );
        assert!(chain(&e).contains("forged"), "{}", chain(&e));
        assert_eq!(rec.pid, None, "no thread is named");
    }

    #[test]
    fn a_prefix_that_is_not_text_matches_nothing() {
        let mut u = up(b"user;1000;1000;3f010000;derived:db", b"32 user", b"");
        u.prefix = b"\xff";
        assert_eq!(errno(run(&u).0), libc::EINVAL);
    }

    #[test]
    fn results_outlive_the_kernels_whole_second_rounding() {
        assert_eq!(kernel_timeout(1), 2);
        assert_eq!(kernel_timeout(u32::MAX), u32::MAX);
    }
}
