//! Who asked: the requesting thread, found through the kernel's own records
//! in /proc. The parsers are pure; `identify` does the reading.
//!
//! The kernel shows the requester only in /proc/keys, on the line of the
//! authorization key: `key:<target hex> pid:<tid> ci:<callout length>`. The
//! requester is blocked in request_key(2) until this handler exits, so its
//! tid, credentials and executable cannot change underneath us; we still
//! confirm it is in that syscall before trusting anything about it.
//!
//! Key descriptions may contain newlines, and /proc/keys prints them raw:
//! any user whose key the reader may view can plant a line that starts
//! with our authorization key's serial and names another thread. The
//! broker therefore reads the file through a view of the requester's own
//! keys ([`keys`]), and trusts the line only when it is the view's first
//! record (`derived_keys_core::proc_keys::FirstRecord`: nothing comes
//! before it to forge it), or when it counts every line that starts with
//! the serial and this is the only one
//! (`derived_keys_core::proc_keys::KeysLine`).

pub mod csum;
pub mod keys;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why the requester could not be identified. All mean EACCES: we only
/// serve requesters we can name.
#[derive(Debug, thiserror::Error)]
pub enum RequesterError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no authorization key {auth:#x} in /proc/keys")]
    NoAuthKey { auth: i32 },
    #[error(
        "{lines} lines of /proc/keys start with authorization key {auth:#x}'s serial: \
         all but one are forged in key descriptions, so none names the requester"
    )]
    AmbiguousAuthKey { auth: i32, lines: u32 },
    #[error("authorization key {auth:#x} is for key {found:#x}, not {expected:#x}")]
    WrongTarget {
        auth: i32,
        found: i32,
        expected: i32,
    },
    #[error("the key under construction belongs to uid {key_uid}, but request-key passed uid {argv_uid}")]
    UidMismatch { key_uid: u32, argv_uid: u32 },
    #[error("requester thread {tid} is not blocked in request_key (syscall {syscall:?})")]
    NotInRequestKey { tid: i32, syscall: String },
}

impl RequesterError {
    /// EACCES: we only serve requesters we can name.
    pub fn errno(&self) -> i32 {
        libc::EACCES
    }
}

/// Where the kernel lists keys.
pub const PROC_KEYS: &str = "/proc/keys";

/// The authorization key's record of the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthRecord {
    pub target: i32,
    pub tid: i32,
    /// Not a fact of the kernel's where the record was read alone (the
    /// request's own length stands there: see
    /// [`keys::AuthLine::line`]); nothing relies on it.
    pub callout_len: usize,
}

fn fields(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    line.split(u8::is_ascii_whitespace)
        .filter(|f| !f.is_empty())
}

/// The lines of `text` that start with `auth`'s serial: 8 lowercase hex
/// digits and a space, as the kernel prints it (`%08x `) and as the
/// broker's scan counts (`derived_keys_core::proc_keys::KeysLine`).
fn auth_lines(text: &[u8], auth: i32) -> impl Iterator<Item = &[u8]> {
    let serial = format!("{:08x} ", auth as u32);
    text.split(|&b| b == b'\n')
        .filter(move |l| l.starts_with(serial.as_bytes()))
}

/// How many lines of `text` claim to be key `auth`'s.
pub fn count_auth_lines(text: &[u8], auth: i32) -> usize {
    auth_lines(text, auth).count()
}

/// Finds the authorization key `auth` in /proc/keys and parses its
/// description. Lines are `serial flags usage expiry perm uid gid type
/// description`, the serial in hex; the type is cut to 9 characters.
/// Works on bytes: other keys' descriptions may be anything but UTF-8, and
/// must not stop us from finding ours. None unless exactly one line
/// starts with the serial: a second one is forged (see the module docs).
pub fn parse_proc_keys(text: &[u8], auth: i32) -> Option<AuthRecord> {
    let mut lines = auth_lines(text, auth);
    let line = lines.next()?;
    if lines.next().is_some() {
        return None;
    }
    let mut it = fields(line);
    let ktype = it.nth(7)?;
    if ktype != b".request_" && ktype != b".request_key_auth" {
        return None;
    }
    let (mut target, mut tid, mut ci) = (None, None, None);
    for f in it {
        let text = std::str::from_utf8(f).ok()?;
        if let Some(v) = text.strip_prefix("key:") {
            target = u32::from_str_radix(v, 16).ok().map(|t| t as i32);
        } else if let Some(v) = text.strip_prefix("pid:") {
            tid = v.parse::<i32>().ok().filter(|t| *t > 0);
        } else if let Some(v) = text.strip_prefix("ci:") {
            ci = v.parse::<usize>().ok();
        }
    }
    Some(AuthRecord {
        target: target?,
        tid: tid?,
        callout_len: ci?,
    })
}

/// The syscall number a blocked thread is in: the first field of
/// /proc/<tid>/syscall ("running" or "-1 ..." when not in a syscall).
pub fn parse_syscall(text: &[u8]) -> Option<i64> {
    std::str::from_utf8(fields(text).next()?).ok()?.parse().ok()
}

/// Supplementary groups from /proc/<tid>/status (bytes: the `Name:` line
/// is the requester's choice).
pub fn parse_groups(status: &[u8]) -> Vec<u32> {
    status
        .split(|&b| b == b'\n')
        .find_map(|l| l.strip_prefix(b"Groups:"))
        .map(|g| {
            fields(g)
                .filter_map(|x| std::str::from_utf8(x).ok()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A small /proc file, whole: one read of up to a page (these files are
/// generated at the first read) and one more that finds the end. Without
/// the size probe and the growing buffer of `std::fs::read`, which cost a
/// syscall each on every request.
fn read(path: &Path) -> Result<Vec<u8>, RequesterError> {
    let mut out = Vec::with_capacity(4096);
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_to_end(&mut f, &mut out))
        .map_err(|source| RequesterError::Read {
            path: path.to_owned(),
            source,
        })?;
    Ok(out)
}

/// How often a requester shown as "running" is looked at again (200 µs
/// apart) before it is refused as not in request_key.
const RUNNING_RETRIES: usize = 10;

/// Which facts beyond the thread, its executable's path and its uid and
/// gid a request needs ([`crate::policy::needs`] decides). Each costs
/// syscalls on the request's path, so only these are read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// Supplementary groups (/proc/<tid>/status).
    pub groups: bool,
    /// The mount and user namespaces, against the broker's.
    pub namespaces: bool,
    /// Whether the executable's path still names the file it runs.
    pub exe_at_path: bool,
}

impl Needs {
    /// Every fact.
    pub const ALL: Needs = Needs {
        groups: true,
        namespaces: true,
        exe_at_path: true,
    };
}

/// What the handler knows about the requester. A fact that was not
/// [`Needs`]-ed reads as the value that refuses (false, no groups): a
/// request that did need it is refused, never allowed.
#[derive(Debug, Clone)]
pub struct Requester {
    pub tid: i32,
    /// Executable path as the kernel reports it (raw bytes).
    pub exe: PathBuf,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Whether the requester shares this handler's mount namespace.
    pub same_mount_ns: bool,
    /// Whether `exe` names, in our namespace, the very file the requester
    /// runs (false after the binary was replaced or deleted).
    pub exe_at_path: bool,
    /// Whether the requester is in this broker's (the initial) user
    /// namespace. In a namespace of its own a process holds
    /// CAP_CHECKPOINT_RESTORE there and can point its /proc/<tid>/exe at
    /// any file it can read (prctl PR_SET_MM_MAP), so `exe` says nothing.
    pub same_user_ns: bool,
}

/// Identifies the requester of `target` through authorization key `auth`,
/// whose /proc/keys line (from the broker's view, [`keys`]) is
/// `keys`; `lines` is how many lines of the view start with the serial
/// (1 for a first record read alone, which nothing can forge). Reads the
/// facts in `needs`.
pub fn identify(
    proc_root: &Path,
    keys: &[u8],
    lines: u32,
    auth: i32,
    target: i32,
    needs: Needs,
) -> Result<Requester, RequesterError> {
    let here = u32::try_from(count_auth_lines(keys, auth)).unwrap_or(u32::MAX);
    let lines = lines.max(here);
    if lines > 1 {
        return Err(RequesterError::AmbiguousAuthKey { auth, lines });
    }
    let rec = parse_proc_keys(keys, auth).ok_or(RequesterError::NoAuthKey { auth })?;
    if rec.target != target {
        return Err(RequesterError::WrongTarget {
            auth,
            found: rec.target,
            expected: target,
        });
    }
    let tid = rec.tid;
    let dir = proc_root.join(tid.to_string());
    // Kept open for the second look: the file belongs to this thread, not
    // to its tid, so after the thread's end it reads ESRCH even if the tid
    // has been reused; and a pread regenerates it.
    let syscall_path = dir.join("syscall");
    let read_err = |source| RequesterError::Read {
        path: syscall_path.clone(),
        source,
    };
    let syscall_file = std::fs::File::open(&syscall_path).map_err(read_err)?;
    let in_request_key = || -> Result<(), RequesterError> {
        // One line, the syscall number first: one read holds it. The
        // kernel says "running" when the thread is on a CPU, or was
        // switched while it looked (on a loaded machine a requester can
        // still be on its way to sleep when we look): look again, briefly.
        let mut buf = [0u8; 256];
        let mut n = 0;
        for attempt in 0..RUNNING_RETRIES {
            n = std::os::unix::fs::FileExt::read_at(&syscall_file, &mut buf, 0)
                .map_err(read_err)?;
            if !buf[..n].starts_with(b"running") {
                break;
            }
            if attempt + 1 < RUNNING_RETRIES {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
        let syscall = &buf[..n];
        let number = parse_syscall(syscall);
        if !number.is_some_and(|n| crate::sys::REQUEST_KEY_NUMBERS.contains(&n)) {
            return Err(RequesterError::NotInRequestKey {
                tid,
                syscall: String::from_utf8_lossy(&syscall[..syscall.len().min(16)]).into_owned(),
            });
        }
        Ok(())
    };
    in_request_key()?;
    let exe_link = dir.join("exe");
    let exe = std::fs::read_link(&exe_link).map_err(|source| RequesterError::Read {
        path: exe_link.clone(),
        source,
    })?;
    let exe_at_path = if needs.exe_at_path {
        let running = std::fs::metadata(&exe_link).map_err(|source| RequesterError::Read {
            path: exe_link.clone(),
            source,
        })?;
        std::fs::metadata(&exe)
            .map(|m| m.dev() == running.dev() && m.ino() == running.ino() && running.nlink() > 0)
            .unwrap_or(false)
    } else {
        false
    };
    let ns = |p: PathBuf| {
        std::fs::metadata(&p)
            .map(|m| (m.dev(), m.ino()))
            .map_err(|source| RequesterError::Read { path: p, source })
    };
    let (same_mount_ns, same_user_ns) = if needs.namespaces {
        (
            ns(proc_root.join("self/ns/mnt"))? == ns(dir.join("ns/mnt"))?,
            ns(proc_root.join("self/ns/user"))? == ns(dir.join("ns/user"))?,
        )
    } else {
        (false, false)
    };
    let groups = if needs.groups {
        parse_groups(&read(&dir.join("status"))?)
    } else {
        Vec::new()
    };
    // Re-check that the thread is still the blocked requester (and so has
    // not exec'd or ended in between).
    in_request_key()?;
    Ok(Requester {
        tid,
        exe,
        groups,
        same_mount_ns,
        exe_at_path,
        same_user_ns,
    })
}

/// Where the kernel publishes IMA measurements.
pub const IMA_MEASUREMENTS: &str = "/sys/kernel/security/ima/ascii_runtime_measurements";

/// Whether IMA measurements are available on this kernel. Informational
/// only (`dkey status`): `csum` never uses them. IMA's list names files by
/// path string, and a path string is not the file a process runs (another
/// mount namespace, a file named `p (deleted)`); the broker hashes that
/// file itself, through /proc/<tid>/exe ([`csum`]).
pub fn ima_available() -> bool {
    Path::new(IMA_MEASUREMENTS).exists()
}

/// The path as bytes, for the derivation.
pub fn path_bytes(p: &Path) -> &[u8] {
    OsStr::as_bytes(p.as_os_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &str = "\
0b1c2d3e I--Q---     1 perm 3f030000     0     0 keyring   _ses: 1
1f2e3d4c I--Q---     1 perm 3f010000     0     0 .request_ key:2c9a1f3b pid:4242 ci:7
2c9a1f3b I--Q---     1 perm 3f010000  1000  1000 user      derived:db: 0
";

    #[test]
    fn proc_keys_auth_line() {
        let keys = KEYS.as_bytes();
        let r = parse_proc_keys(keys, 0x1f2e3d4c).unwrap();
        assert_eq!(
            r,
            AuthRecord {
                target: 0x2c9a1f3b,
                tid: 4242,
                callout_len: 7
            }
        );
        assert!(
            parse_proc_keys(keys, 0x2c9a1f3b).is_none(),
            "a user key is no auth key"
        );
        assert!(parse_proc_keys(keys, 0x1234).is_none());
        assert!(parse_proc_keys(b"", 1).is_none());
        let bad = b"1f2e3d4c I--Q--- 1 perm 3f010000 0 0 .request_ key:zz pid:1 ci:1";
        assert!(parse_proc_keys(bad, 0x1f2e3d4c).is_none());
        let neg = b"1f2e3d4c I--Q--- 1 perm 3f010000 0 0 .request_ key:1 pid:-1 ci:1";
        assert!(parse_proc_keys(neg, 0x1f2e3d4c).is_none());
        // Serials above 0x7fffffff do not occur, but must not confuse us.
        assert!(parse_proc_keys(keys, -1).is_none());
        // Someone else's key with a non-UTF-8 description is no obstacle.
        let mut hostile =
            b"0000abcd I--Q--- 1 perm 3f010000 0 0 user derived:\xff\xfe: 0\n".to_vec();
        hostile.extend_from_slice(keys);
        assert_eq!(parse_proc_keys(&hostile, 0x1f2e3d4c), Some(r));
    }

    /// A user key whose description carries a newline and a line of its
    /// own naming another thread, as an attacker would add it.
    const FORGED: &str = "\
0a000001 I--Q---     1 perm 3f3f3f3f  4310  4310 user      x
1f2e3d4c I--Q---     1 perm 3f010000  4300  4300 .request_ key:2c9a1f3b pid:777 ci:7: 0
";

    #[test]
    fn a_forged_line_makes_the_serial_ambiguous() {
        let auth = 0x1f2e3d4c;
        for text in [
            format!("{FORGED}{KEYS}"),
            format!("{KEYS}{FORGED}"),
            format!("{KEYS}{KEYS}"),
        ] {
            assert_eq!(count_auth_lines(text.as_bytes(), auth), 2, "{text}");
            assert_eq!(parse_proc_keys(text.as_bytes(), auth), None, "{text}");
        }
        // A serial that is a prefix of another's, or the serial further in
        // a line, is not a line with the serial.
        let near = "1f2e3d4c0 I--Q--- 1 perm 3f010000 0 0 .request_ key:2c9a1f3b pid:9 ci:7
                    0b1c2d3e I--Q--- 1 perm 3f030000 0 0 user 1f2e3d4c .request_ key:2c9a1f3b
                     1f2e3d4c I--Q--- 1 perm 3f010000 0 0 .request_ key:2c9a1f3b pid:9 ci:7
";
        let text = format!("{near}{KEYS}");
        assert_eq!(count_auth_lines(text.as_bytes(), auth), 1);
        assert_eq!(
            parse_proc_keys(text.as_bytes(), auth).map(|r| r.tid),
            Some(4242)
        );
        assert_eq!(parse_proc_keys(near.as_bytes(), auth), None);
    }

    #[test]
    fn identify_refuses_an_ambiguous_serial() {
        let dir = tempfile::tempdir().unwrap();
        let line = KEYS.lines().nth(1).unwrap().as_bytes();
        // The view showed two lines: refused before anything is read.
        let e = identify(dir.path(), line, 2, 0x1f2e3d4c, 0x2c9a1f3b, Needs::ALL).unwrap_err();
        assert!(
            matches!(
                e,
                RequesterError::AmbiguousAuthKey {
                    auth: 0x1f2e3d4c,
                    lines: 2
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("forged in key descriptions"), "{e}");
        // Two lines passed on as one text count too, whatever the handler said.
        let text = format!("{KEYS}{FORGED}");
        let e = identify(
            dir.path(),
            text.as_bytes(),
            1,
            0x1f2e3d4c,
            0x2c9a1f3b,
            Needs::ALL,
        )
        .unwrap_err();
        assert!(
            matches!(e, RequesterError::AmbiguousAuthKey { lines: 2, .. }),
            "{e:?}"
        );
        // None at all is no authorization key.
        let e = identify(dir.path(), b"", 0, 0x1f2e3d4c, 0x2c9a1f3b, Needs::ALL).unwrap_err();
        assert!(matches!(e, RequesterError::NoAuthKey { .. }), "{e:?}");
    }

    #[test]
    fn syscall_field() {
        assert_eq!(
            parse_syscall(b"249 0x5 0x6 0x7 0x0 0x0 0x0 0x7ffd 0x7f\n"),
            Some(249)
        );
        assert_eq!(parse_syscall(b"running\n"), None);
        assert_eq!(parse_syscall(b"-1 0x7ffd 0x7f\n"), Some(-1));
        assert_eq!(parse_syscall(b""), None);
    }

    #[test]
    fn groups_from_status() {
        let s = b"Name:\t\xffx\nUid:\t1\t1\t1\t1\nGroups:\t4 24 27 \nNgid:\t0\n";
        assert_eq!(parse_groups(s), vec![4, 24, 27]);
        assert!(parse_groups(b"Groups:\t\n").is_empty());
    }

    #[test]
    fn this_process_is_not_a_requester() {
        let me = std::process::id() as i32;
        let fake =
            format!("00000001 I--Q--- 1 perm 3f010000 0 0 .request_ key:00000002 pid:{me} ci:1\n");
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(format!("/proc/{me}"), dir.path().join(me.to_string())).unwrap();
        std::os::unix::fs::symlink("/proc/self", dir.path().join("self")).unwrap();
        let e = identify(dir.path(), fake.as_bytes(), 1, 1, 2, Needs::ALL).unwrap_err();
        assert!(matches!(e, RequesterError::NotInRequestKey { .. }), "{e:?}");
        let e = identify(dir.path(), fake.as_bytes(), 1, 1, 3, Needs::ALL).unwrap_err();
        assert!(matches!(e, RequesterError::WrongTarget { .. }), "{e:?}");
    }

    /// A thread the kernel keeps showing as "running" is looked at again,
    /// then refused as not in request_key (EACCES), not taken for one.
    #[test]
    fn a_thread_that_stays_running_is_refused() {
        let keys = "00000001 I--Q--- 1 perm 3f010000 0 0 .request_ key:00000002 pid:4242 ci:1\n";
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("4242")).unwrap();
        std::fs::write(dir.path().join("4242/syscall"), "running\n").unwrap();
        let started = std::time::Instant::now();
        let e = identify(dir.path(), keys.as_bytes(), 1, 1, 2, Needs::ALL).unwrap_err();
        assert!(matches!(e, RequesterError::NotInRequestKey { .. }), "{e:?}");
        assert_eq!(e.errno(), libc::EACCES);
        assert!(
            started.elapsed()
                >= std::time::Duration::from_micros(200 * (RUNNING_RETRIES as u64 - 1)),
            "looked again before refusing"
        );
    }

    #[test]
    fn requester_proc_entries_gone_is_an_error() {
        // A tid that does not exist (its /proc directory is gone).
        let keys =
            "00000001 I--Q--- 1 perm 3f010000 0 0 .request_ key:00000002 pid:999999999 ci:1\n";
        let dir = tempfile::tempdir().unwrap();
        let e = identify(dir.path(), keys.as_bytes(), 1, 1, 2, Needs::ALL).unwrap_err();
        assert!(matches!(e, RequesterError::Read { .. }), "{e:?}");
    }
}
