//! The `csum` digest: SHA-256 of the very file a requester runs, read
//! through /proc/<tid>/exe, bounded so that one user cannot keep the
//! broker hashing for everyone else.
//!
//! - A file larger than the configured limit is refused before a byte is
//!   read.
//! - Hashing stops at the request's deadline (ETIMEDOUT).
//! - One uid hashes one file at a time; its other requests wait for that
//!   uid's turn, never another uid's.
//! - A digest is remembered by the file's identity and change times
//!   (device, inode, size, mtime, ctime), so an unchanged executable is
//!   hashed once per broker lifetime. A write changes ctime, which no
//!   unprivileged process can set back; rename or replace gives a new
//!   inode. But many filesystems keep times at the kernel's coarse clock
//!   (a tick, a few milliseconds), so a second change within the tick of
//!   the first can leave all five as they were: a digest is remembered
//!   only once the file's ctime is [`SETTLED`] old (git's "racy clean"
//!   entries), and only on local filesystems whose times come from this
//!   host's clock at a resolution finer than that ([`cacheable`]: not
//!   vfat's 2 s, not a network or FUSE server's clock). There, content
//!   cannot change while it is hashed or run: a running executable is
//!   denied to writers (ETXTBSY), and exec refuses a file open for
//!   writing, shared writable mappings included. Elsewhere every request
//!   hashes.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

/// Digests remembered at most (oldest forgotten first).
const CACHE_ENTRIES: usize = 512;
/// How long before the hashing a file must have last changed for its
/// digest to be remembered (see the module's docs).
pub const SETTLED: Duration = Duration::from_secs(1);
/// Read size; the deadline is checked between reads.
const CHUNK: usize = 1 << 16;

/// Why no digest came out.
#[derive(Debug, thiserror::Error)]
pub enum CsumError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the executable {path} is {size} bytes, over the csum limit of {limit} bytes (bindings.csum_max_mib)")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("hashing the executable did not finish before the request's deadline")]
    TimedOut,
}

impl CsumError {
    /// The contract errno.
    pub fn errno(&self) -> i32 {
        match self {
            CsumError::Read { .. } | CsumError::TooLarge { .. } => libc::EACCES,
            CsumError::TimedOut => libc::ETIMEDOUT,
        }
    }
}

/// What identifies one version of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FileVersion {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileVersion {
    /// Whether the file last changed [`SETTLED`] or more before `at`: a
    /// change after `at` then shows in its times.
    /// Times out of range (negative, nanoseconds of a second or more, past
    /// what `SystemTime` holds: a FUSE server chooses them) never are.
    fn settled(&self, at: SystemTime) -> bool {
        let (Ok(sec), Ok(nsec)) = (u64::try_from(self.ctime.0), u32::try_from(self.ctime.1)) else {
            return false;
        };
        if nsec >= 1_000_000_000 {
            return false;
        }
        SystemTime::UNIX_EPOCH
            .checked_add(Duration::new(sec, nsec))
            .and_then(|changed| at.duration_since(changed).ok())
            .is_some_and(|age| age >= SETTLED)
    }

    pub(crate) fn of(m: &std::fs::Metadata) -> FileVersion {
        FileVersion {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// Whether digests of files on `f`'s filesystem may be remembered: local
/// filesystems whose times come from this host's clock with a resolution
/// finer than [`SETTLED`] (ext2/3/4 share one magic number).
fn cacheable(f: &File) -> bool {
    use nix::sys::statfs::{
        fstatfs, BTRFS_SUPER_MAGIC, EXT4_SUPER_MAGIC, F2FS_SUPER_MAGIC, OVERLAYFS_SUPER_MAGIC,
        TMPFS_MAGIC, XFS_SUPER_MAGIC,
    };
    fstatfs(f).is_ok_and(|s| {
        [
            EXT4_SUPER_MAGIC,
            XFS_SUPER_MAGIC,
            BTRFS_SUPER_MAGIC,
            F2FS_SUPER_MAGIC,
            TMPFS_MAGIC,
            OVERLAYFS_SUPER_MAGIC,
        ]
        .contains(&s.filesystem_type())
    })
}

#[derive(Default)]
struct Cache {
    digests: HashMap<FileVersion, [u8; 32]>,
    order: VecDeque<FileVersion>,
}

/// The broker's digests and per-uid hashing turns.
#[derive(Default)]
pub struct Hasher {
    cache: Mutex<Cache>,
    lanes: Mutex<HashMap<u32, Arc<Mutex<()>>>>,
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hasher {
    fn cached(&self, v: &FileVersion) -> Option<[u8; 32]> {
        relock(&self.cache).digests.get(v).copied()
    }

    fn remember(&self, v: FileVersion, d: [u8; 32]) {
        let mut c = relock(&self.cache);
        if c.digests.insert(v, d).is_none() {
            c.order.push_back(v);
        }
        while c.order.len() > CACHE_ENTRIES {
            if let Some(old) = c.order.pop_front() {
                c.digests.remove(&old);
            }
        }
    }

    fn lane(&self, uid: u32) -> Arc<Mutex<()>> {
        let mut lanes = relock(&self.lanes);
        // Forget lanes nobody holds, so that the map stays small.
        if lanes.len() > 64 {
            lanes.retain(|_, l| Arc::strong_count(l) > 1);
        }
        lanes.entry(uid).or_default().clone()
    }

    /// SHA-256 of the file thread `tid` runs, for a requester of `uid`.
    pub fn exe_digest(
        &self,
        proc_root: &Path,
        tid: i32,
        uid: u32,
        limit: u64,
        deadline: Instant,
    ) -> Result<[u8; 32], CsumError> {
        let path = proc_root.join(tid.to_string()).join("exe");
        let err = |source| CsumError::Read {
            path: path.clone(),
            source,
        };
        // Opened once: the version, the size check and the bytes are all
        // of this one open file.
        let mut f = File::open(&path).map_err(err)?;
        let version = FileVersion::of(&f.metadata().map_err(err)?);
        if version.size > limit {
            return Err(CsumError::TooLarge {
                path: std::fs::read_link(&path).unwrap_or(path.clone()),
                size: version.size,
                limit,
            });
        }
        if let Some(d) = self.cached(&version) {
            return Ok(d);
        }
        let lane = self.lane(uid);
        let _turn = relock(&lane);
        if let Some(d) = self.cached(&version) {
            return Ok(d); // hashed by this uid's previous request meanwhile
        }
        let started = SystemTime::now();
        let d = hash_until(&mut f, &path, deadline)?;
        // Only if the file did not change while it was read, and a later
        // change cannot leave its times as they are.
        let unchanged = f.metadata().map(|m| FileVersion::of(&m)).ok() == Some(version);
        if unchanged && version.settled(started) && cacheable(&f) {
            self.remember(version, d);
        }
        Ok(d)
    }
}

/// Reads `f` to its end, hashing, unless the deadline passes first.
fn hash_until(f: &mut File, path: &Path, deadline: Instant) -> Result<[u8; 32], CsumError> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        if Instant::now() >= deadline {
            return Err(CsumError::TimedOut);
        }
        match f.read(&mut buf) {
            Ok(0) => return Ok(h.finalize().into()),
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(CsumError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(30)
    }

    #[test]
    fn hashes_the_running_file_once() {
        // Freshly linked, the test binary is remembered only once settled.
        let exe = std::fs::metadata("/proc/self/exe").unwrap();
        let give_up = Instant::now() + 5 * SETTLED;
        while !FileVersion::of(&exe).settled(SystemTime::now()) {
            assert!(
                Instant::now() < give_up,
                "the test binary's ctime is in the future"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            cacheable(&File::open("/proc/self/exe").unwrap()),
            "target/ on an unusual filesystem"
        );
        let h = Hasher::default();
        let want: [u8; 32] = Sha256::digest(std::fs::read("/proc/self/exe").unwrap()).into();
        let tid = std::process::id() as i32;
        let got = h
            .exe_digest(Path::new("/proc"), tid, 0, u64::MAX, later())
            .unwrap();
        assert_eq!(got, want);
        assert_eq!(relock(&h.cache).digests.len(), 1);
        // The second time comes from the cache, even past the deadline.
        let again = h
            .exe_digest(Path::new("/proc"), tid, 0, u64::MAX, Instant::now())
            .unwrap();
        assert_eq!(again, want);
    }

    #[test]
    fn too_large_is_refused_before_reading() {
        let h = Hasher::default();
        let tid = std::process::id() as i32;
        let e = h
            .exe_digest(Path::new("/proc"), tid, 0, 10, later())
            .unwrap_err();
        assert!(matches!(e, CsumError::TooLarge { limit: 10, .. }), "{e}");
        assert_eq!(e.errno(), libc::EACCES);
        assert!(relock(&h.cache).digests.is_empty());
    }

    #[test]
    fn a_passed_deadline_stops_hashing() {
        let h = Hasher::default();
        let tid = std::process::id() as i32;
        let e = h
            .exe_digest(Path::new("/proc"), tid, 0, u64::MAX, Instant::now())
            .unwrap_err();
        assert!(matches!(e, CsumError::TimedOut));
        assert_eq!(e.errno(), libc::ETIMEDOUT);
    }

    #[test]
    fn a_changed_file_is_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"one").unwrap();
        let h = Hasher::default();
        let v1 = FileVersion::of(&std::fs::metadata(&p).unwrap());
        h.remember(v1, [1; 32]);
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&p, b"two").unwrap();
        let v2 = FileVersion::of(&std::fs::metadata(&p).unwrap());
        assert_ne!(v1, v2, "a write changes the version");
        assert!(h.cached(&v2).is_none());
    }

    /// A file changed within SETTLED of its hashing could change again in
    /// the same clock tick without a trace in its times: not remembered.
    #[test]
    fn only_settled_files_are_remembered() {
        let now = SystemTime::now();
        let at = |t: SystemTime| {
            let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
            let ctime = (d.as_secs() as i64, i64::from(d.subsec_nanos()));
            FileVersion {
                dev: 1,
                ino: 2,
                size: 3,
                mtime: ctime,
                ctime,
            }
        };
        assert!(at(now - SETTLED).settled(now));
        assert!(at(now - Duration::from_secs(3600)).settled(now));
        assert!(!at(now - SETTLED / 2).settled(now), "changed just now");
        assert!(!at(now).settled(now));
        assert!(
            !at(now + Duration::from_secs(5)).settled(now),
            "a ctime ahead of the clock"
        );
        let mut v = at(now);
        v.ctime = (-1, 0);
        assert!(!v.settled(now), "before 1970: not trusted");
        // What a FUSE server may report: no panic, not settled.
        for ctime in [
            (i64::MAX, 1_500_000_000),
            (i64::MAX, 0),
            (0, 1_000_000_000),
            (0, -1),
        ] {
            v.ctime = ctime;
            assert!(!v.settled(now), "{ctime:?}");
        }
    }

    #[test]
    fn only_local_filesystems_of_fine_times_are_cacheable() {
        let tmp = tempfile::tempfile().unwrap();
        assert!(cacheable(&tmp), "this test's temporary directory");
        assert!(!cacheable(&File::open("/proc/self/status").unwrap()));
    }

    /// Through exe_digest, as a request hashes: a file changed just now is
    /// hashed but not remembered; once its change is SETTLED old, it is.
    #[test]
    fn a_file_changed_just_now_is_hashed_again_until_settled() {
        let proc_root = tempfile::tempdir().unwrap();
        let tid = 4242;
        std::fs::create_dir(proc_root.path().join(tid.to_string())).unwrap();
        let file = proc_root.path().join("program");
        std::fs::write(&file, b"fresh content").unwrap();
        std::os::unix::fs::symlink(&file, proc_root.path().join(format!("{tid}/exe"))).unwrap();
        let want: [u8; 32] = Sha256::digest(b"fresh content").into();
        let h = Hasher::default();
        let digest = || {
            h.exe_digest(proc_root.path(), tid, 0, u64::MAX, later())
                .unwrap()
        };
        assert_eq!(digest(), want);
        assert!(relock(&h.cache).digests.is_empty(), "changed just now");
        std::thread::sleep(SETTLED + Duration::from_millis(50));
        assert_eq!(digest(), want);
        assert_eq!(
            relock(&h.cache).digests.len(),
            1,
            "settled (on /tmp's filesystem)"
        );
    }

    #[test]
    fn the_cache_is_bounded() {
        let h = Hasher::default();
        for i in 0..(CACHE_ENTRIES as u64 + 10) {
            let v = FileVersion {
                dev: 1,
                ino: i,
                size: 0,
                mtime: (0, 0),
                ctime: (0, 0),
            };
            h.remember(v, [0; 32]);
        }
        assert_eq!(relock(&h.cache).digests.len(), CACHE_ENTRIES);
    }
}
