//! Whose share of the broker a request counts against: its uid's own, or,
//! for a subordinate uid, the share of the user it was delegated to.
//!
//! A user with a range in /etc/subuid (rootless containers; `newuidmap`
//! maps it) can run processes as every uid of the range, and the kernel
//! names each as its own requester. Counted per uid, such a user would get
//! a share of the queues and workers for each of its 65,536 uids; counted
//! here, the range's uids share their owner's. The file is root's (the
//! shadow-utils tools edit it) and read again within [`RECHECK`] of a
//! change; owners named by login name are looked up in /etc/passwd itself,
//! not through NSS, which may need a network the broker (in the embedded
//! TPM's network namespace) does not have.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::requester::csum::FileVersion;

/// How often the files are looked at for a change, at most.
pub const RECHECK: Duration = Duration::from_secs(1);
/// Ranges kept at most (a line each); the rest of a longer file is ignored.
pub const MAX_RANGES: usize = 65_536;
/// The most of either file read (larger files are read only this far).
const MAX_FILE: u64 = 16 << 20;

/// One delegated range: uids `start..end` belong to `owner`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Range {
    start: u64,
    end: u64,
    owner: u32,
}

#[derive(Default)]
struct State {
    checked: Option<Instant>,
    /// The versions of /etc/subuid and /etc/passwd read (None: absent).
    versions: (Option<FileVersion>, Option<FileVersion>),
    /// Sorted by start, not overlapping.
    ranges: Vec<Range>,
}

/// The owners of the host's subordinate uid ranges.
pub struct Shares {
    subuid: PathBuf,
    passwd: PathBuf,
    state: Mutex<State>,
}

/// Login names and their uids, from passwd(5) text.
fn parse_passwd(text: &str) -> HashMap<&str, u32> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let uid = f.nth(1)?.parse().ok()?;
            (!name.is_empty()).then_some((name, uid))
        })
        .collect()
}

/// The ranges of subuid(5) text, `owner:start:count` a line (owner a login
/// name or a uid), sorted; malformed lines, empty ranges, ranges past
/// 2^32, owners not found and ranges overlapping an earlier one are left
/// out.
fn parse_subuid(text: &str, uid_of: impl Fn(&str) -> Option<u32>) -> Vec<Range> {
    let mut ranges: Vec<Range> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let mut f = l.trim().split(':');
            let (owner, start, count) = (f.next()?, f.next()?, f.next()?);
            if f.next().is_some() {
                return None;
            }
            let start: u64 = start.parse().ok()?;
            let count: u64 = count.parse().ok()?;
            let end = start.checked_add(count)?;
            if count == 0 || end > 1 << 32 {
                return None;
            }
            let owner = owner.parse().ok().or_else(|| uid_of(owner))?;
            Some(Range { start, end, owner })
        })
        .take(MAX_RANGES)
        .collect();
    ranges.sort_by_key(|r| r.start);
    let mut kept: Vec<Range> = Vec::with_capacity(ranges.len());
    for r in ranges {
        if kept.last().is_none_or(|last| r.start >= last.end) {
            kept.push(r);
        }
    }
    kept
}

/// The owner of `uid`'s range, if it is in one.
fn owner_of(ranges: &[Range], uid: u32) -> Option<u32> {
    let uid = u64::from(uid);
    let i = ranges.partition_point(|r| r.start <= uid);
    let r = ranges.get(i.checked_sub(1)?)?;
    (uid < r.end).then_some(r.owner)
}

fn version(path: &std::path::Path) -> Option<FileVersion> {
    std::fs::metadata(path).ok().map(|m| FileVersion::of(&m))
}

fn read_bounded(path: &std::path::Path) -> String {
    use std::io::Read;
    let mut text = String::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(MAX_FILE).read_to_string(&mut text);
    }
    text
}

impl Shares {
    /// The host's: /etc/subuid and /etc/passwd.
    pub fn host() -> Shares {
        Shares::from_files("/etc/subuid".into(), "/etc/passwd".into())
    }

    fn from_files(subuid: PathBuf, passwd: PathBuf) -> Shares {
        Shares {
            subuid,
            passwd,
            state: Mutex::default(),
        }
    }

    /// The share `uid`'s requests count against: its range's owner's, or
    /// its own.
    pub fn share(&self, uid: u32) -> u32 {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if st.checked.is_none_or(|t| now.duration_since(t) >= RECHECK) {
            st.checked = Some(now);
            let versions = (version(&self.subuid), version(&self.passwd));
            if versions != st.versions {
                st.versions = versions;
                st.ranges = if versions.0.is_some() {
                    let passwd = read_bounded(&self.passwd);
                    let names = parse_passwd(&passwd);
                    parse_subuid(&read_bounded(&self.subuid), |n| names.get(n).copied())
                } else {
                    Vec::new()
                };
            }
        }
        owner_of(&st.ranges, uid).unwrap_or(uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\nbob:x:1001:1001::/home/bob:/bin/sh\n";

    #[test]
    fn subordinate_uids_count_against_their_owner() {
        let names = parse_passwd(PASSWD);
        let ranges = parse_subuid("alice:100000:65536\n# comment\n1001:165536:65536\n", |n| {
            names.get(n).copied()
        });
        assert_eq!(ranges.len(), 2);
        assert_eq!(owner_of(&ranges, 100_000), Some(1000));
        assert_eq!(owner_of(&ranges, 165_535), Some(1000));
        assert_eq!(owner_of(&ranges, 165_536), Some(1001), "numeric owner");
        assert_eq!(owner_of(&ranges, 231_071), Some(1001));
        assert_eq!(owner_of(&ranges, 231_072), None, "past the last range");
        assert_eq!(owner_of(&ranges, 99_999), None, "before the first");
        assert_eq!(owner_of(&ranges, 1000), None, "the owners themselves");
    }

    #[test]
    fn bad_lines_are_left_out() {
        let names = parse_passwd(PASSWD);
        let ranges = parse_subuid(
            concat!(
                "nobody-known:100000:10\n", // no such user
                "alice:200000:0\n",         // empty
                "alice:4294967290:10\n",    // past 2^32
                "alice:x:10\n",             // not a number
                "alice:300000:10:extra\n",  // a field too many
                "bob:400000:100\n",         // kept
                "alice:400050:100\n",       // overlaps bob's
                "alice:4294967286:10\n",    // ends at 2^32 exactly: kept
            ),
            |n| names.get(n).copied(),
        );
        assert_eq!(
            ranges,
            vec![
                Range {
                    start: 400_000,
                    end: 400_100,
                    owner: 1001
                },
                Range {
                    start: 4_294_967_286,
                    end: 1 << 32,
                    owner: 1000
                },
            ]
        );
        assert_eq!(owner_of(&ranges, u32::MAX), Some(1000));
        assert_eq!(owner_of(&ranges, 400_050), Some(1001));
    }

    #[test]
    fn the_files_are_read_again_after_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let (subuid, passwd) = (dir.path().join("subuid"), dir.path().join("passwd"));
        std::fs::write(&passwd, PASSWD).unwrap();
        let shares = Shares::from_files(subuid.clone(), passwd);
        assert_eq!(shares.share(100_001), 100_001, "no file: every uid its own");
        std::fs::write(&subuid, "alice:100000:65536\n").unwrap();
        // Looked at again only after RECHECK.
        assert_eq!(shares.share(100_001), 100_001);
        std::thread::sleep(RECHECK + Duration::from_millis(20));
        assert_eq!(shares.share(100_001), 1000);
        assert_eq!(shares.share(1000), 1000);
        assert_eq!(shares.share(4242), 4242);
        std::fs::write(&subuid, "bob:100000:65536\n").unwrap();
        std::thread::sleep(RECHECK + Duration::from_millis(20));
        assert_eq!(shares.share(100_001), 1001);
        std::fs::remove_file(&subuid).unwrap();
        std::thread::sleep(RECHECK + Duration::from_millis(20));
        assert_eq!(shares.share(100_001), 100_001, "file gone: ranges gone");
    }
}
