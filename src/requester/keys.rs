//! The authorization key's line in /proc/keys, read by the broker through
//! a view of the file that lists only the requester's own keys.
//!
//! The kernel publishes the requesting thread only there (`pid:` on the
//! authorization key's line), and builds the file anew on every read: for
//! every key in the system it checks possession and permission, whether
//! the reader may see the key or not. On a host with many users' keys
//! that costs every request, and grows with what other users keep. It also
//! lists the keys of anyone who makes theirs world-viewable, and any key
//! description can forge a line.
//!
//! A view is /proc/keys opened from a user namespace in which only the
//! requester's uid is mapped, with a filesystem uid that owns no keys
//! ([`crate::sys::proc_keys_of_uid`]): the kernel then skips every key of
//! another owner at the cost of a comparison, and of the requester's own
//! keys lists only those the view's credentials possess, or that anyone
//! may view. The view's credentials hold the broker's session keyring,
//! and the handler links its authorization key into that keyring for the
//! length of the request (its hello names it): the one line we want is
//! listed, and the requester's finished requests' keys, which wait for
//! the key collector under a stream of requests, are not. The view's first
//! record (after the broker's keyring's own, if that comes first) is taken
//! alone if it is the authorization key's: no record comes before it to
//! forge it, and reading no further spares the kernel the keys after it
//! ([`FirstRecord`]). Otherwise lines are counted as before: only a serial
//! that starts exactly one line is trusted, and the only descriptions
//! that can forge one are the requester's own world-viewable keys (or
//! those root links into the broker's keyring).
//!
//! One view per uid is kept for the broker's lifetime (making one forks a
//! child: about a millisecond), at most [`MAX_VIEWS`] of them, root's
//! always. Where the kernel gives no user namespace, or the broker's view
//! helper failed (or is busy with another uid's view, or the request has
//! too little time left to wait for it: then for this request only), the
//! file is opened in this thread for each request
//! with the same filesystem uid (this thread's credentials hold the same
//! session keyring): the authorization key's line is there, every key in
//! the system is checked, and other users' world-viewable keys are listed
//! too (lines forged in them are counted, and refuse the request).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, TryLockError};
use std::time::{Duration, Instant};

use derived_keys_core::proc_keys::{AuthKey, FirstRecord, KeysLine, Step, MAX_LINE};

use super::RequesterError;
use crate::sys::ViewError;

/// Below this much time to wait for the helper, a request does not ask it
/// (a view takes about a millisecond to make).
const MIN_MAKER_WAIT: Duration = Duration::from_millis(5);

/// Uids with a view kept open. Past this many, the least recently used one
/// is closed (its next request makes it again).
pub const MAX_VIEWS: usize = 256;

/// What a scan of /proc/keys found for one authorization key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthLine {
    /// The first line that starts with the serial (empty if none fit).
    /// Read alone, its last field (` ci:<n>`) is the request's callout
    /// length, not read from the file ([`FirstRecord::unread`]).
    pub line: Vec<u8>,
    /// How many lines start with it; anything but 1 is refused. 1 also
    /// when the line was the file's first record, read alone (no record
    /// comes before the first, so no line in one can forge it).
    pub count: u32,
    /// Read alone as the file's first record ([`FirstRecord`]), the keys
    /// after it not listed; false after a scan of the whole file.
    pub alone: bool,
}

struct View {
    uid: u32,
    file: Arc<Mutex<File>>,
    used: u64,
}

#[derive(Default)]
struct Views {
    open: Vec<View>,
    clock: u64,
    /// The kernel said no to a user namespace: read the old way.
    no_namespaces: bool,
}

/// Who makes views.
enum Maker {
    /// The broker's helper, started while it had one thread. Dropped
    /// after its first failure (one later than `MAKER_TIMEOUT` in all, or
    /// one its answers do not explain); the file is then read plainly.
    Helper(Mutex<Option<crate::sys::ViewMaker>>),
    /// This process forks for each view itself: for tests and benchmarks,
    /// whose other threads hold no descriptor a child must not keep.
    Fork,
}

/// The broker's views of /proc/keys, one per requester uid.
pub struct KeysView {
    views: Mutex<Views>,
    maker: Maker,
    /// The anonymous session keyring the views hold (the broker's), whose
    /// record a view may list before the authorization key's.
    ring: Option<i32>,
}

impl KeysView {
    /// Views made by `maker`, the broker's helper; none (the file read
    /// plainly, with the same filesystem uid) where it could not start.
    /// `ring`: the views' anonymous session keyring, if they hold one.
    pub fn new(maker: Option<crate::sys::ViewMaker>, ring: Option<i32>) -> KeysView {
        KeysView {
            views: Mutex::default(),
            maker: Maker::Helper(Mutex::new(maker)),
            ring,
        }
    }

    /// Views made by forking this process (see [`Maker::Fork`]); `ring`:
    /// the anonymous session keyring the forking thread holds, if any.
    pub fn forking(ring: Option<i32>) -> KeysView {
        KeysView {
            views: Mutex::default(),
            maker: Maker::Fork,
            ring,
        }
    }

    /// The line of authorization key `auth`, whose requester's filesystem
    /// uid is `uid`, and how many lines claim to be it; a view made for it
    /// now waits for the helper only part of the time left until
    /// `deadline`.
    pub fn auth_line(
        &self,
        uid: u32,
        auth: &AuthKey,
        deadline: Instant,
    ) -> Result<AuthLine, RequesterError> {
        match self.view(uid, deadline) {
            Some(file) => {
                let file = file.lock().unwrap_or_else(|p| p.into_inner());
                scan(&file, auth, self.ring)
            }
            None => scan(&open_plain()?, auth, self.ring),
        }
    }

    /// Makes the view of `uid` now, so that its first request does not
    /// wait for it (the broker does this for root at start). Best effort:
    /// if a request is making a view meanwhile, root's is made at its
    /// first request.
    pub fn prepare(&self, uid: u32) {
        self.view(uid, Instant::now() + 4 * crate::sys::MAKER_TIMEOUT);
    }

    /// The view of `uid`, made if need be; None where there is none (the
    /// caller reads the file the slow way).
    fn view(&self, uid: u32, deadline: Instant) -> Option<Arc<Mutex<File>>> {
        {
            let mut v = self.views.lock().unwrap_or_else(|p| p.into_inner());
            if v.no_namespaces {
                return None;
            }
            v.clock += 1;
            let now = v.clock;
            if let Some(view) = v.open.iter_mut().find(|view| view.uid == uid) {
                view.used = now;
                return Some(view.file.clone());
            }
        }
        // Made without the lock held: another uid's request need not wait
        // for our child. Two requests of a new uid may both make one; the
        // second is dropped.
        let made = match &self.maker {
            Maker::Fork => crate::sys::proc_keys_of_uid(uid),
            Maker::Helper(helper) => {
                // A quarter of what is left, at most MAKER_TIMEOUT: the
                // rest of the request has its bound to keep. The helper
                // busy with a view (for any uid): this request reads the
                // file plainly rather than wait its turn.
                let wait = (deadline.saturating_duration_since(Instant::now()) / 4)
                    .min(crate::sys::MAKER_TIMEOUT);
                if wait < MIN_MAKER_WAIT {
                    return None;
                }
                let mut helper = match helper.try_lock() {
                    Ok(h) => h,
                    Err(TryLockError::Poisoned(p)) => p.into_inner(),
                    Err(TryLockError::WouldBlock) => return None,
                };
                let made = helper.as_ref()?.make(uid, wait);
                if matches!(made, Err(ViewError::Failed(_))) {
                    // Killed and reaped after the lock is free.
                    let gone = helper.take();
                    drop(helper);
                    drop(gone);
                }
                made
            }
        };
        let file = match made {
            Ok(fd) => Arc::new(Mutex::new(File::from(fd))),
            Err(ViewError::NoUserNamespace) => {
                let mut v = self.views.lock().unwrap_or_else(|p| p.into_inner());
                v.no_namespaces = true;
                return None;
            }
            // Read the slow way this time: the helper is slow (it owes
            // the answer to whoever asks next), or gone (without one, a
            // test's fork is tried again by the next request).
            Err(ViewError::Again | ViewError::Failed(_)) => return None,
        };
        let mut v = self.views.lock().unwrap_or_else(|p| p.into_inner());
        v.clock += 1;
        let now = v.clock;
        if let Some(view) = v.open.iter().find(|view| view.uid == uid) {
            return Some(view.file.clone());
        }
        if v.open.len() >= MAX_VIEWS {
            // Root's view stays: root asks most (machine keys, services).
            let oldest = (0..v.open.len())
                .filter(|&i| v.open[i].uid != 0)
                .min_by_key(|&i| v.open[i].used);
            if let Some(oldest) = oldest {
                v.open.swap_remove(oldest);
            }
        }
        v.open.push(View {
            uid,
            file: file.clone(),
            used: now,
        });
        Some(file)
    }

    /// How many views are open.
    #[cfg(test)]
    fn open_views(&self) -> usize {
        self.views
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .open
            .len()
    }
}

/// /proc/keys opened in this thread with a filesystem uid that owns no
/// keys: what this thread possesses, every key in the system checked.
fn open_plain() -> Result<File, RequesterError> {
    use nix::unistd::{setfsuid, Uid};
    let before = setfsuid(Uid::from_raw(crate::sys::NO_KEYS_UID));
    let file = File::open(super::PROC_KEYS);
    setfsuid(before);
    file.map_err(|source| RequesterError::Read {
        path: super::PROC_KEYS.into(),
        source,
    })
}

/// The authorization key's line: the file's first record read alone if it
/// is the key's, after the record of `ring` if that comes first (a view
/// lists what its credentials possess, and the requester's keys anyone may
/// view: under one request at a time, that keyring and the key), else a
/// scan of the whole file, which goes on from the bytes already read.
///
/// All of it with `file` to ourselves (the view's mutex is held, or the
/// file is this request's own): a read by anyone else between two of ours
/// would make the kernel list the file afresh from our next offset on, and
/// the bytes after the first record's head could then be another key's.
fn scan(file: &File, auth: &AuthKey, ring: Option<i32>) -> Result<AuthLine, RequesterError> {
    let mut head = [0u8; MAX_LINE];
    match first_record(file, auth, ring, &mut head)? {
        Ok(line) => Ok(AuthLine {
            line,
            count: 1,
            alone: true,
        }),
        Err(seen) => scan_all(file, auth.serial, &head[..seen]),
    }
}

fn read_err(source: std::io::Error) -> RequesterError {
    RequesterError::Read {
        path: super::PROC_KEYS.into(),
        source,
    }
}

/// The file's first record if it is `auth`'s, read into `buf` in reads that
/// never ask for more than that record holds (see [`FirstRecord`]): the
/// kernel then does not list, nor check, the keys after it. Otherwise how
/// many bytes of the file `buf` holds.
fn first_record(
    file: &File,
    auth: &AuthKey,
    ring: Option<i32>,
    buf: &mut [u8; MAX_LINE],
) -> Result<Result<Vec<u8>, usize>, RequesterError> {
    let reader = FirstRecord::new(auth, ring);
    let mut seen = 0;
    loop {
        match reader.step(&buf[..seen]) {
            Step::Read(n) => {
                let Some(room) = buf.get_mut(seen..seen + n) else {
                    return Ok(Err(seen));
                };
                // The first read, at offset 0, makes the kernel list the
                // keys afresh; the following ones continue its record.
                match file.read_at(room, seen as u64).map_err(read_err)? {
                    0 => return Ok(Err(seen)),
                    got => seen += got,
                }
            }
            Step::Done { at, len } => {
                // The record's end, ` ci:<n>`, as the request says it.
                let mut line = buf[at..at + len].to_vec();
                line.extend_from_slice(reader.unread());
                return Ok(Ok(line));
            }
            Step::NotFirst => return Ok(Err(seen)),
        }
    }
}

/// Reads the whole file, in chunks (another uid's keys are not listed, but
/// ours may be many and long), counting the lines that start with `auth`'s
/// serial: `start`, the bytes already read from its beginning, then the
/// rest.
fn scan_all(file: &File, auth: i32, start: &[u8]) -> Result<AuthLine, RequesterError> {
    let mut chunk = [0u8; 8192];
    let mut first = [0u8; MAX_LINE];
    let mut lines = KeysLine::new(auth);
    lines.feed(start, &mut first);
    let mut at = start.len() as u64;
    loop {
        // A read at offset 0 makes the kernel list the keys afresh; the
        // following ones continue from where the last one stopped.
        let n = file.read_at(&mut chunk, at).map_err(read_err)?;
        if n == 0 {
            let found = lines.finish(&first);
            return Ok(AuthLine {
                line: first[..found.len].to_vec(),
                count: found.count,
                alone: false,
            });
        }
        lines.feed(&chunk[..n], &mut first);
        at += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth_line_of(text: &[u8], auth: i32) -> AuthLine {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys");
        std::fs::write(&p, text).unwrap();
        let key = AuthKey {
            serial: auth,
            target: 0xb,
            callout_len: 7,
        };
        scan(&File::open(&p).unwrap(), &key, Some(0x100)).unwrap()
    }

    /// The kernel's layout of an authorization key's record.
    const REAL: &str =
        "1a2b3c4d I--Q---     1 perm 3f010000     0 65534 .request_ key:b pid:42 ci:7";

    #[test]
    fn the_first_record_is_taken_alone_only_if_it_is_the_keys() {
        let other = "1a2b3c4e I--Q---     1 perm 3f010000     0 65534 user      y: 1\n";
        let got = auth_line_of(format!("{REAL}\n{other}{REAL}\n").as_bytes(), 0x1a2b_3c4d);
        // Taken alone: a copy further down is in another record.
        assert_eq!(
            (got.line.as_slice(), got.count, got.alone),
            (REAL.as_bytes(), 1, true)
        );
        // Another record first, forging the line in its description: the
        // whole file is scanned, both lines counted.
        let forger =
            format!("0000000a I--Q---     1 perm 3f3f3f3f     0 65534 user      x\n{REAL}\n");
        let got = auth_line_of(format!("{forger}{REAL}\n").as_bytes(), 0x1a2b_3c4d);
        assert_eq!((got.count, got.alone), (2, false));
        // After the views' keyring's record; not after another keyring's.
        let ring = "00000100 I------     2 perm 3f1b0000     0 65534 keyring   _ses: 1\n";
        let got = auth_line_of(format!("{ring}{REAL}\n").as_bytes(), 0x1a2b_3c4d);
        assert_eq!((got.line.as_slice(), got.alone), (REAL.as_bytes(), true));
        let other = ring.replace("00000100", "00000101");
        let got = auth_line_of(format!("{other}{REAL}\n").as_bytes(), 0x1a2b_3c4d);
        assert_eq!(
            (got.line.as_slice(), got.count, got.alone),
            (REAL.as_bytes(), 1, false)
        );
        // The first record for another target: scanned.
        let wrong = REAL.replace("key:b ", "key:c ");
        let got = auth_line_of(format!("{wrong}\n").as_bytes(), 0x1a2b_3c4d);
        assert_eq!(
            (got.line, got.count, got.alone),
            (wrong.into_bytes(), 1, false)
        );
    }

    #[test]
    fn a_scan_counts_every_line_with_the_serial_across_chunks() {
        // Long other lines, so the serial's lines fall across chunk edges.
        let filler = format!(
            "0000000a I--Q--- 1 perm 3f010000 0 0 user {}\n",
            "x".repeat(9000)
        );
        let real = "1a2b3c4d I------ 1 perm 1b010000 0 0 .request_ key:0000000b pid:42 ci:7";
        let text = format!("{filler}{real}\n{filler}");
        let got = auth_line_of(text.as_bytes(), 0x1a2b_3c4d);
        assert_eq!((got.line.as_slice(), got.count), (real.as_bytes(), 1));
        let forged = format!("{text}f\n{real}\n");
        assert_eq!(auth_line_of(forged.as_bytes(), 0x1a2b_3c4d).count, 2);
        assert_eq!(auth_line_of(filler.as_bytes(), 0x1a2b_3c4d).count, 0);
    }

    /// Through the kernel: a view lists root's keys only (those this
    /// process possesses, or anyone may view), and it is kept.
    #[test]
    fn a_view_lists_the_keys_of_its_uid_only() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let view = KeysView::forking(None);
        let deadline = Instant::now() + Duration::from_secs(5);
        let none = AuthKey {
            serial: 0,
            target: 0,
            callout_len: 0,
        };
        assert_eq!(view.auth_line(0, &none, deadline).unwrap().count, 0);
        let Some(file) = view.view(0, deadline) else {
            // No user namespaces here: nothing more to see.
            return;
        };
        let mut text = Vec::new();
        let mut chunk = [0u8; 8192];
        let file = file.lock().unwrap();
        let mut at = 0;
        loop {
            let n = file.read_at(&mut chunk, at).unwrap();
            if n == 0 {
                break;
            }
            text.extend_from_slice(&chunk[..n]);
            at += n as u64;
        }
        let text = String::from_utf8_lossy(&text);
        // Every record (a line that starts with a serial) is root's.
        let records = text.lines().filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|s| s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        });
        for line in records {
            let uid = line.split_whitespace().nth(5).unwrap_or("");
            assert_eq!(uid, "0", "another owner's key in the view: {line}");
        }
        drop(file);
        view.prepare(0);
        assert_eq!(view.open_views(), 1);
    }
}
