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
use crate::config::Config;
use crate::derive::{self, Ed25519Key, Input, P256Key, Prk, Purpose, Subject};
use crate::keyring::{KeyRecord, KeyringError};
use crate::policy::{self, Facts};
use crate::request::{
    Algorithm, Binding, Callout, Description, KeyType, Request, RequestError, Want,
};
use crate::requester::keys::AuthLine;
use crate::requester::{self, Requester};
use crate::secret::SecretBuf;
use crate::wire::Upcall;
use derived_keys_core::proc_keys::AuthKey;

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
    /// The authorization key's /proc/keys line, by the requester's uid
    /// and the key's serial ([`crate::requester::keys::KeysView`]).
    pub auth_line: &'a AuthLineFn<'a>,
}

/// How the pipeline reads the authorization key's line.
pub type AuthLineFn<'a> =
    dyn Fn(u32, &AuthKey, Instant) -> Result<AuthLine, requester::RequesterError> + 'a;

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
    let needs = policy::needs(config, &req, up.uid, up.gid);
    let auth = AuthKey {
        serial: up.auth,
        target: up.key,
        callout_len: up.callout.len(),
    };
    let keys = (ctx.auth_line)(up.uid, &auth, deadline)?;
    let who: Requester = requester::identify(
        ctx.proc_root,
        &keys.line,
        keys.count,
        up.auth,
        up.key,
        needs,
    )?;
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
    // The digest of the very file the requester runs, opened through
    // /proc/<tid>/exe: neither a path name (another mount namespace, a file
    // named `p (deleted)`) nor a measurement list looked up by one.
    let digest = match req.binding {
        Binding::Csum => ctx.hasher.exe_digest(
            ctx.proc_root,
            who.tid,
            up.uid,
            config.csum_max_bytes,
            deadline,
        )?,
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
            // A kernel-only key has a purpose of its own: its bytes are never
            // what a `user` request of the same name and callout returns.
            Want::Symmetric { len } => match req.key_type {
                KeyType::User => Purpose::Symmetric(len),
                KeyType::Logon => Purpose::KernelSymmetric(len),
            },
            Want::PublicKey(Algorithm::P256) | Want::Sign(_) => Purpose::P256,
            // Its own purpose too: never the P-256 key of the same request,
            // nor its symmetric key used as a seed.
            Want::PublicKey(Algorithm::Ed25519) | Want::SignEd25519(_) => Purpose::Ed25519,
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
    let payload = match (input.purpose, &req.want) {
        (Purpose::Symmetric(len), _) => Payload::Secret(derive::symmetric_key(&prk, len.into())?),
        (Purpose::KernelSymmetric(len), _) => {
            Payload::Secret(derive::kernel_symmetric_key(&prk, len.into())?)
        }
        (Purpose::P256, Want::Sign(d)) => {
            Payload::Public(P256Key::from_prk(&prk)?.sign_digest(&d.0)?)
        }
        (Purpose::P256, _) => Payload::Public(P256Key::from_prk(&prk)?.spki_der()?),
        // The seed lives in secret memory and is dropped (wiped) with the
        // key at the end of the arm; only the public results leave.
        (Purpose::Ed25519, Want::SignEd25519(m)) => {
            Payload::Public(Ed25519Key::from_prk(&prk)?.sign(m.as_bytes())?.to_vec())
        }
        (Purpose::Ed25519, _) => Payload::Public(Ed25519Key::from_prk(&prk)?.spki_der()?),
    };
    let timeout_s = req
        .want
        .is_signature()
        .then(|| kernel_timeout(config.signature_timeout_s));
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

    /// An upcall, and what /proc/keys says for its authorization key.
    struct Asked<'a> {
        up: Upcall<'a>,
        line: &'a [u8],
        lines: u32,
    }

    fn up<'a>(describe: &'a [u8], callout: &'a [u8], line: &'a [u8]) -> Asked<'a> {
        Asked {
            up: Upcall {
                key: 0x11,
                uid: 1000,
                gid: 1000,
                auth: 0x22,
                started_us: 0,
                prefix: b"derived",
                describe,
                callout,
            },
            line,
            lines: u32::from(!line.is_empty()),
        }
    }

    /// A fixed /proc/keys answer, checking what it is asked for (the
    /// callout's length too, where given).
    fn keys_say(
        line: &[u8],
        lines: u32,
        callout_len: Option<usize>,
    ) -> impl Fn(u32, &AuthKey, Instant) -> Result<AuthLine, requester::RequesterError> + '_ {
        move |uid, auth, _| {
            let asked = AuthKey {
                serial: 0x22,
                target: 0x11,
                callout_len: callout_len.unwrap_or(auth.callout_len),
            };
            assert_eq!((uid, *auth), (1000, asked), "the requester's uid and key");
            Ok(AuthLine {
                line: line.to_vec(),
                count: lines,
                alone: false,
            })
        }
    }

    fn run(u: &Asked<'_>) -> (Result<Grant, PipelineError>, Record) {
        let config = Config::parse("", Path::new("/t.conf")).unwrap();
        let no_tpm = |_: &[u8; 32], _: Instant| -> Result<Prk, PrkError> {
            panic!("the TPM must not be reached")
        };
        let ctx = Context {
            config: &config,
            proc_root: Path::new("/nonexistent-proc"),
            prk: &no_tpm,
            hasher: &crate::requester::csum::Hasher::default(),
            auth_line: &keys_say(u.line, u.lines, Some(u.up.callout.len())),
        };
        let mut record = Record::default();
        let r = decide(
            &u.up,
            &ctx,
            Instant::now() + std::time::Duration::from_secs(5),
            &mut record,
        );
        (r, record)
    }

    const LINE_4242: &[u8] =
        b"00000022 I--Q--- 1 perm 3f010000 1000 1000 .request_ key:00000011 pid:4242 ci:7";

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
            (
                b"logon;1000;1000;3f010000;derived:db:pub",
                b"ed25519 user",
                libc::EINVAL,
            ),
            // An Ed25519 signature whose digest is not SHA-256("a").
            (
                b"user;1000;1000;3f010000;derived:db:sign:0000000000000000000000000000000000000000000000000000000000000000",
                b"ed25519 user msg=61",
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
        u.lines = 2;
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
        u.up.prefix = b"\xff";
        assert_eq!(errno(run(&u).0), libc::EINVAL);
    }

    /// A /proc of one requester, thread 4242, blocked in request_key and
    /// running `exe`, in this process's namespaces.
    fn fake_proc(exe: &Path) -> tempfile::TempDir {
        use std::os::unix::fs::symlink;
        let root = tempfile::tempdir().unwrap();
        for dir in ["self/ns", "4242/ns"] {
            let ns = root.path().join(dir);
            std::fs::create_dir_all(&ns).unwrap();
            symlink("/proc/self/ns/mnt", ns.join("mnt")).unwrap();
            symlink("/proc/self/ns/user", ns.join("user")).unwrap();
        }
        let tid = root.path().join("4242");
        let syscall = format!(
            "{} 0x1 0x2 0x3 0x0 0x0 0x0 0x7ffd 0x7f\n",
            crate::sys::SYS_REQUEST_KEY
        );
        std::fs::write(tid.join("syscall"), syscall).unwrap();
        std::fs::write(tid.join("status"), "Name:\tx\nGroups:\t\n").unwrap();
        symlink(exe, tid.join("exe")).unwrap();
        root
    }

    /// A PRF with the TPM's shape: different messages, different PRKs.
    fn soft_prk(msg: &[u8; 32]) -> Prk {
        use hmac::{Mac, SimpleHmac};
        let mut mac = SimpleHmac::<sha2::Sha256>::new_from_slice(b"pipeline test PRF key").unwrap();
        mac.update(msg);
        Prk::new(SecretBuf::copy_from(&mac.finalize().into_bytes()).unwrap()).unwrap()
    }

    /// `logon` and `user` requests of one name and callout, every binding:
    /// the `user` key is derivation v1's purpose 01 as before, the `logon`
    /// key is purpose 03's, and the two payloads differ.
    #[test]
    fn a_logon_key_is_not_the_user_key_of_the_same_request() {
        let exe = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(exe.path(), b"#!/bin/true\n").unwrap();
        let proc_root = fake_proc(exe.path());
        let config =
            Config::parse("[bindings]\nmachine_uids = [1000]\n", Path::new("/t.conf")).unwrap();
        let prk = |m: &[u8; 32], _: Instant| -> Result<Prk, PrkError> { Ok(soft_prk(m)) };
        let hasher = crate::requester::csum::Hasher::default();
        let ctx = Context {
            config: &config,
            proc_root: proc_root.path(),
            prk: &prk,
            hasher: &hasher,
            auth_line: &keys_say(LINE_4242, 1, None),
        };
        let line = LINE_4242;
        let get = |ty: &str, rest: &str, callout: &str| {
            let describe = format!("{ty};1000;1000;3f010000;derived:{rest}");
            let u = up(describe.as_bytes(), callout.as_bytes(), line);
            let deadline = Instant::now() + std::time::Duration::from_secs(5);
            let grant = decide(&u.up, &ctx, deadline, &mut Record::default())
                .unwrap_or_else(|e| panic!("{ty} {callout}: {}", chain(&e)));
            grant.payload.bytes().to_vec()
        };
        let digest: [u8; 32] = sha2::Digest::finalize(sha2::Digest::chain_update(
            <sha2::Sha256 as sha2::Digest>::new(),
            b"#!/bin/true\n",
        ))
        .into();
        let exe_path = exe.path().as_os_str().as_encoded_bytes();
        let mut seen = std::collections::HashSet::new();
        for (callout, len, subject) in [
            ("64 user", 64u16, Subject::User { uid: 1000 }),
            ("64 machine", 64, Subject::Machine),
            (
                "32 path",
                32,
                Subject::Path {
                    uid: 1000,
                    path: exe_path,
                },
            ),
            ("32 csum", 32, Subject::Csum { uid: 1000, digest }),
        ] {
            let (user, logon) = (get("user", "disk", callout), get("logon", "disk", callout));
            assert_ne!(
                user, logon,
                "{callout}: the logon key is readable as a user key"
            );
            assert_eq!(logon.len(), usize::from(len));
            let input = |purpose| Input {
                purpose,
                name: "disk",
                subject,
                account: None,
                client: None,
                epoch: 0,
            };
            let v1 = input(Purpose::Symmetric(len));
            let want_user = derive::symmetric_key(&soft_prk(&v1.message()), len.into()).unwrap();
            assert_eq!(user, want_user.as_ref(), "{callout}: user keys stay v1's");
            let kernel = input(Purpose::KernelSymmetric(len));
            let want_logon =
                derive::kernel_symmetric_key(&soft_prk(&kernel.message()), len.into()).unwrap();
            assert_eq!(logon, want_logon.as_ref(), "{callout}");
            assert!(seen.insert(user) && seen.insert(logon), "{callout}");
        }
        // P-256 results are the same whichever way they are asked for.
        let spki = get("user", "disk:pub", "p256 user");
        let key = P256Key::from_prk(&soft_prk(
            &Input {
                purpose: Purpose::P256,
                name: "disk",
                subject: Subject::User { uid: 1000 },
                account: None,
                client: None,
                epoch: 0,
            }
            .message(),
        ))
        .unwrap();
        assert_eq!(spki, key.spki_der().unwrap());
    }

    /// `ed25519` requests are purpose 04: the public key and the signature
    /// over `msg` of the seed of that PRK, a signature with the signature
    /// timeout; neither is the P-256 result of the same request.
    #[test]
    fn ed25519_requests_derive_purpose_04() {
        let exe = tempfile::NamedTempFile::new().unwrap();
        let proc_root = fake_proc(exe.path());
        let config = Config::parse("", Path::new("/t.conf")).unwrap();
        let prk = |m: &[u8; 32], _: Instant| -> Result<Prk, PrkError> { Ok(soft_prk(m)) };
        let hasher = crate::requester::csum::Hasher::default();
        let ctx = Context {
            config: &config,
            proc_root: proc_root.path(),
            prk: &prk,
            hasher: &hasher,
            auth_line: &keys_say(LINE_4242, 1, None),
        };
        let line = LINE_4242;
        let get = |rest: &str, callout: &str| {
            let describe = format!("user;1000;1000;3f010000;derived:{rest}");
            let u = up(describe.as_bytes(), callout.as_bytes(), line);
            let deadline = Instant::now() + std::time::Duration::from_secs(5);
            let mut record = Record::default();
            let grant = decide(&u.up, &ctx, deadline, &mut record)
                .unwrap_or_else(|e| panic!("{rest} {callout}: {}", chain(&e)));
            (grant.payload.bytes().to_vec(), grant.timeout_s, record)
        };
        let input = |purpose| Input {
            purpose,
            name: "git",
            subject: Subject::User { uid: 1000 },
            account: None,
            client: None,
            epoch: 5,
        };
        let key = Ed25519Key::from_prk(&soft_prk(&input(Purpose::Ed25519).message())).unwrap();
        let (spki, timeout, record) = get("git:pub", "ed25519 user epoch=5");
        assert_eq!(spki, key.spki_der().unwrap());
        assert_eq!(timeout, None);
        assert_eq!(record.operation.as_deref(), Some("pub:ed25519"));
        let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"hi"));
        let (sig, timeout, record) = get(
            &format!("git:sign:{digest}"),
            "ed25519 user epoch=5 msg=6869",
        );
        assert_eq!(sig, key.sign(b"hi").unwrap());
        assert!(derive::verify_ed25519(&spki, b"hi", &sig));
        assert_eq!(timeout, Some(kernel_timeout(config.signature_timeout_s)));
        assert_eq!(record.operation.as_deref(), Some("sign:ed25519"));
        let (p256, _, _) = get("git:pub", "p256 user epoch=5");
        assert_ne!(p256, spki);
        let want_p256 = P256Key::from_prk(&soft_prk(&input(Purpose::P256).message())).unwrap();
        assert_eq!(p256, want_p256.spki_der().unwrap());
    }

    #[test]
    fn results_outlive_the_kernels_whole_second_rounding() {
        assert_eq!(kernel_timeout(1), 2);
        assert_eq!(kernel_timeout(u32::MAX), u32::MAX);
    }
}
