//! The request-key handler's pure parts, `core` only: its command line,
//! finding its authorization key's line in /proc/keys, naming the broker's
//! socket, and bounded text. The handler binary (which has no std)
//! includes this file; the library compiles it too, so it is unit-tested
//! like the rest.

use core::fmt::Write;

pub const DEFAULT_CONFIG: &[u8] = b"/etc/derived-keys/derived-keys.conf";
pub const DEFAULT_PREFIX: &[u8] = b"derived";

/// The errnos requests end with (Linux numbers; the library checks them
/// against libc), and their names for audit lines and messages: the one
/// table, for the handler (which has no libc crate) and the library.
pub mod errno {
    pub const EIO: i32 = 5;
    pub const ENOMEM: i32 = 12;
    pub const EACCES: i32 = 13;
    pub const ENODEV: i32 = 19;
    pub const EINVAL: i32 = 22;
    pub const ETIMEDOUT: i32 = 110;
    pub const EDQUOT: i32 = 122;
    pub const ENOKEY: i32 = 126;
    pub const EKEYEXPIRED: i32 = 127;
    pub const EKEYREVOKED: i32 = 128;
    pub const EKEYREJECTED: i32 = 129;

    /// The symbolic name, "EOTHER" for any other errno.
    pub fn name(e: i32) -> &'static str {
        match e {
            EINVAL => "EINVAL",
            EACCES => "EACCES",
            ENODEV => "ENODEV",
            EIO => "EIO",
            ETIMEDOUT => "ETIMEDOUT",
            ENOKEY => "ENOKEY",
            EKEYREJECTED => "EKEYREJECTED",
            EKEYREVOKED => "EKEYREVOKED",
            EKEYEXPIRED => "EKEYEXPIRED",
            EDQUOT => "EDQUOT",
            ENOMEM => "ENOMEM",
            _ => "EOTHER",
        }
    }
}

/// What /sbin/request-key passes, typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Args<'a> {
    pub config: &'a [u8],
    pub prefix: &'a [u8],
    /// The key under construction (`%k`).
    pub key: i32,
    /// The requester's fsuid and fsgid (`%u`, `%g`).
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cli<'a> {
    Run(Args<'a>),
    Version,
    Usage,
}

fn decimal<T: core::str::FromStr>(b: &[u8]) -> Option<T> {
    core::str::from_utf8(b).ok()?.parse().ok()
}

/// `[--config FILE] [--prefix PREFIX] KEY UID GID` (argv[0] first).
pub fn parse_args<'a>(mut it: impl Iterator<Item = &'a [u8]>) -> Cli<'a> {
    let _argv0 = it.next();
    let (mut config, mut prefix) = (DEFAULT_CONFIG, DEFAULT_PREFIX);
    let mut nums: [&[u8]; 3] = [b""; 3];
    let mut n = 0;
    while let Some(a) = it.next() {
        match a {
            b"--version" | b"-V" => return Cli::Version,
            b"--config" | b"--prefix" => {
                let Some(v) = it.next() else {
                    return Cli::Usage;
                };
                if a == b"--config" {
                    config = v;
                } else {
                    prefix = v;
                }
            }
            _ if a.starts_with(b"--config=") => config = &a[9..],
            _ if a.starts_with(b"--prefix=") => prefix = &a[9..],
            _ if n < 3 => {
                nums[n] = a;
                n += 1;
            }
            _ => return Cli::Usage,
        }
    }
    match (n, decimal(nums[0]), decimal(nums[1]), decimal(nums[2])) {
        (3, Some(key), Some(uid), Some(gid)) if key > 0 => Cli::Run(Args {
            config,
            prefix,
            key,
            uid,
            gid,
        }),
        _ => Cli::Usage,
    }
}

/// A contract errno from a broker's exit code; anything else is EIO.
pub fn exit_errno(code: i32) -> i32 {
    use errno::*;
    match code {
        EINVAL | EACCES | ENODEV | EIO | ETIMEDOUT => code,
        _ => EIO,
    }
}

/// Finds the line of /proc/keys that describes key `auth`, fed in chunks
/// of any size. Lines longer than the output buffer never match (the
/// authorization key's line is short).
#[derive(Debug)]
pub struct KeysLine {
    want: [u8; 9],
    len: usize,
    long: bool,
}

impl KeysLine {
    pub fn new(auth: i32) -> KeysLine {
        let mut want = [b' '; 9];
        let hex = b"0123456789abcdef";
        let v = auth as u32;
        for (i, slot) in want[..8].iter_mut().enumerate() {
            *slot = hex[((v >> (28 - 4 * i)) & 0xf) as usize];
        }
        KeysLine {
            want,
            len: 0,
            long: false,
        }
    }

    fn matches(&self, out: &[u8]) -> bool {
        !self.long && out[..self.len].starts_with(&self.want)
    }

    /// Feeds the next chunk; `Some(len)` once `out[..len]` holds the line.
    pub fn feed(&mut self, chunk: &[u8], out: &mut [u8]) -> Option<usize> {
        for &b in chunk {
            if b == b'\n' {
                if self.matches(out) {
                    return Some(self.len);
                }
                self.len = 0;
                self.long = false;
            } else if self.len < out.len() {
                out[self.len] = b;
                self.len += 1;
            } else {
                self.long = true;
            }
        }
        None
    }

    /// At end of input: the last line, if it had no newline and matches.
    pub fn finish(&self, out: &[u8]) -> Option<usize> {
        self.matches(out).then_some(self.len)
    }
}

/// FNV-1a, 64 bits, fed in pieces: names a configuration's broker (see
/// `config::fnv1a`). Not a security function.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// Where brokers keep their socket, lock and pid files (tmpfs, root only).
pub const RUN_DIR: &str = "/run/derived-keys";

/// The path of a broker's runtime file (`ext`: sock, lock or pid). One
/// broker per configuration (its fingerprint), release and protocol
/// version: after an upgrade, a new handler starts a broker of its own
/// instead of talking to one still running from the old release, which
/// idles out beside it.
pub fn runtime_path(fingerprint: u64, ext: &str) -> Line {
    let mut name = Line::new();
    let _ = write!(
        name,
        "{RUN_DIR}/broker-{fingerprint:016x}-{}-w{}.{ext}",
        env!("CARGO_PKG_VERSION"),
        crate::wire::VERSION
    );
    name
}

/// A bounded text buffer (the handler has no allocator); what does not
/// fit is cut.
pub struct Line {
    buf: [u8; 768],
    len: usize,
}

impl Default for Line {
    fn default() -> Line {
        Line::new()
    }
}

impl Line {
    pub const fn new() -> Line {
        Line {
            buf: [0; 768],
            len: 0,
        }
    }

    pub fn push(&mut self, b: &[u8]) {
        let n = b.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv<'a>(a: &'a [&'a str]) -> impl Iterator<Item = &'a [u8]> {
        a.iter().map(|s| s.as_bytes())
    }

    #[test]
    fn arguments() {
        let Cli::Run(a) = parse_args(argv(&["h", "12", "1000", "100"])) else {
            panic!("not parsed");
        };
        assert_eq!((a.key, a.uid, a.gid), (12, 1000, 100));
        assert_eq!((a.config, a.prefix), (DEFAULT_CONFIG, DEFAULT_PREFIX));
        let Cli::Run(a) = parse_args(argv(&["h", "--config", "/c", "--prefix=t1", "5", "0", "0"]))
        else {
            panic!("not parsed");
        };
        assert_eq!((a.config, a.prefix, a.key), (&b"/c"[..], &b"t1"[..], 5));
        for bad in [
            &["h"][..],
            &["h", "1", "2"],
            &["h", "1", "2", "3", "4"],
            &["h", "x", "2", "3"],
            &["h", "0", "2", "3"],
            &["h", "1", "-2", "3"],
            &["h", "1", "2", "3", "--config"],
        ] {
            assert_eq!(parse_args(argv(bad)), Cli::Usage, "{bad:?}");
        }
        assert_eq!(parse_args(argv(&["h", "--version"])), Cli::Version);
    }

    #[test]
    fn broker_exit_codes_become_contract_errnos() {
        assert_eq!(exit_errno(19), errno::ENODEV);
        assert_eq!(exit_errno(110), errno::ETIMEDOUT);
        for other in [-1, 0, 1, 127, 255] {
            assert_eq!(exit_errno(other), errno::EIO);
        }
        assert_eq!(errno::name(errno::ETIMEDOUT), "ETIMEDOUT");
        assert_eq!(errno::name(1), "EOTHER");
        // The literals are Linux's numbers.
        for (ours, libc) in [
            (errno::EIO, libc::EIO),
            (errno::ENOMEM, libc::ENOMEM),
            (errno::EACCES, libc::EACCES),
            (errno::ENODEV, libc::ENODEV),
            (errno::EINVAL, libc::EINVAL),
            (errno::ETIMEDOUT, libc::ETIMEDOUT),
            (errno::EDQUOT, libc::EDQUOT),
            (errno::ENOKEY, libc::ENOKEY),
            (errno::EKEYEXPIRED, libc::EKEYEXPIRED),
            (errno::EKEYREVOKED, libc::EKEYREVOKED),
            (errno::EKEYREJECTED, libc::EKEYREJECTED),
        ] {
            assert_eq!(ours, libc);
        }
    }

    #[test]
    fn keys_line_is_found_across_chunks() {
        let text = b"0000000a I--Q--- 1 perm 3f010000 0 0 user x: 1\n\
                     1a2b3c4d I--Q--- 1 perm 3f010000 0 0 .request_ key:0000000b pid:42 ci:7\n\
                     1a2b3c4e I--Q--- 1 perm 3f010000 0 0 user y: 1\n";
        let want = text.split(|&b| b == b'\n').nth(1).unwrap();
        for chunk in [1, 7, 64, text.len()] {
            let mut m = KeysLine::new(0x1a2b_3c4d);
            let mut out = [0u8; 512];
            let found = text.chunks(chunk).find_map(|c| m.feed(c, &mut out));
            assert_eq!(found.map(|n| &out[..n]), Some(want));
        }
        // The last line without a newline, a serial that is only a prefix
        // of another (always 8 digits), and a line too long for the buffer.
        let mut m = KeysLine::new(0x1a2b_3c4e);
        let mut out = [0u8; 512];
        assert_eq!(m.feed(&text[..text.len() - 1], &mut out), None);
        assert!(m.finish(&out).is_some());
        let mut m = KeysLine::new(0x01a2_b3c4);
        assert_eq!(m.feed(text, &mut out), None);
        assert_eq!(m.finish(&out), None);
        let mut m = KeysLine::new(0x0a);
        let mut small = [0u8; 8];
        assert_eq!(m.feed(text, &mut small), None);
    }

    #[test]
    fn fingerprint_matches_the_library() {
        let mut f = Fnv::default();
        f.feed(b"/etc/x.conf");
        f.feed(b"[tpm]\n");
        assert_eq!(f.0, crate::config::fnv1a(b"/etc/x.conf[tpm]\n"));
        let name = runtime_path(0xab, "sock");
        let name = std::str::from_utf8(name.as_bytes()).unwrap();
        assert!(name.starts_with("/run/derived-keys/broker-00000000000000ab-"));
        assert!(name.ends_with(&format!("-w{}.sock", crate::wire::VERSION)));
        assert!(name.contains(env!("CARGO_PKG_VERSION")));
    }

    #[test]
    fn lines_are_bounded() {
        let mut l = Line::new();
        for _ in 0..100 {
            let _ = write!(l, "0123456789");
        }
        assert_eq!(l.as_bytes().len(), 768);
    }
}
