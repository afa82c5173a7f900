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

/// Scans the whole of /proc/keys, fed in chunks of any size, for the
/// lines that start with key `auth`'s serial (8 lowercase hex digits and a
/// space). Key descriptions may contain newlines and /proc/keys prints
/// them raw, so a line further down can be forged by anyone whose key we
/// may view: only a serial that starts exactly one line is trusted (the
/// broker refuses otherwise). Keeps the first such line if it fits the
/// output buffer (the authorization key's line is short).
#[derive(Debug)]
pub struct KeysLine {
    want: [u8; 9],
    /// Bytes seen of the current line.
    col: usize,
    /// The current line starts with `want`, as far as seen.
    head: bool,
    /// Lines so far that start with `want`.
    count: u32,
    /// The first such line, once complete and if it fit.
    found: Option<usize>,
}

/// What a whole scan of /proc/keys found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeysScan {
    /// Length of the first line with the serial (0 if none, or too long).
    pub len: usize,
    /// How many lines start with the serial; anything but 1 is refused.
    pub count: u32,
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
            col: 0,
            head: true,
            count: 0,
            found: None,
        }
    }

    /// The current line ends (a newline, or the end of input).
    fn end_line(&mut self, out: &[u8]) {
        if self.head && self.col >= self.want.len() {
            self.count = self.count.saturating_add(1);
            if self.found.is_none() && self.col <= out.len() {
                self.found = Some(self.col);
            }
        }
        self.col = 0;
        self.head = true;
    }

    /// Feeds the next chunk. The first matching line is copied to `out`;
    /// `out` must be the same buffer on every call.
    pub fn feed(&mut self, chunk: &[u8], out: &mut [u8]) {
        for &b in chunk {
            if b == b'\n' {
                self.end_line(out);
                continue;
            }
            if self.head {
                match self.want.get(self.col) {
                    Some(&w) if w != b => self.head = false,
                    _ => {
                        if self.found.is_none() {
                            if let Some(slot) = out.get_mut(self.col) {
                                *slot = b;
                            }
                        }
                    }
                }
            }
            self.col = self.col.saturating_add(1);
        }
    }

    /// At end of input (a last line without a newline counts too).
    pub fn finish(mut self, out: &[u8]) -> KeysScan {
        if self.col > 0 {
            self.end_line(out);
        }
        KeysScan {
            len: self.found.unwrap_or(0),
            count: self.count,
        }
    }
}

/// The one escaping of audit-line fields, for the broker's lines and the
/// handler's alike, so a line means one thing whatever bytes a requester
/// chose (its executable's path, say): printable ASCII (0x21 to 0x7e)
/// stands for itself, except `\` (written `\\`) and `"`, `'` and `=`; every
/// other byte (space, tab, newline, other controls, DEL, non-ASCII,
/// invalid UTF-8) and those three are written `\xNN`, two lowercase hex
/// digits. A value never contains a space, so fields split on spaces, and
/// the first `=` of a field ends its key. `\...` marks a value cut at
/// `max` bytes of input: read left to right, an escape is `\\` or `\xNN`,
/// so a backslash followed by `.` is only ever that mark.
pub fn escape(bytes: &[u8], max: usize, push: &mut dyn FnMut(&[u8])) {
    let hex = b"0123456789abcdef";
    for &b in bytes.iter().take(max) {
        match b {
            b'\\' => push(b"\\\\"),
            b'"' | b'\'' | b'=' => push(&[
                b'\\',
                b'x',
                hex[usize::from(b >> 4)],
                hex[usize::from(b & 0xf)],
            ]),
            0x21..=0x7e => push(&[b]),
            _ => push(&[
                b'\\',
                b'x',
                hex[usize::from(b >> 4)],
                hex[usize::from(b & 0xf)],
            ]),
        }
    }
    if bytes.len() > max {
        push(b"\\...");
    }
}

/// Longest input kept of a path in an audit line.
pub const AUDIT_MAX_PATH: usize = 256;
/// Longest input kept of any other audit field.
pub const AUDIT_MAX_FIELD: usize = 512;

/// An audit line's fields; `None` is written `-`. The broker's and the
/// handler's lines are both made here, one format and one escaping.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuditFields<'a> {
    /// "granted" or the errno name.
    pub outcome: &'a str,
    pub uid: Option<u32>,
    pub pid: Option<i32>,
    pub exe: Option<&'a [u8]>,
    pub name: Option<&'a [u8]>,
    pub op: Option<&'a [u8]>,
    pub binding: Option<&'a [u8]>,
    pub key_type: Option<&'a [u8]>,
    /// Why it was refused; the field is left out when None.
    pub reason: Option<&'a [u8]>,
}

impl AuditFields<'_> {
    /// `derived-keys: <outcome> uid=.. pid=.. exe=.. name=.. op=.. binding=.. type=.. [reason=..]`
    pub fn write(&self, push: &mut dyn FnMut(&[u8])) {
        push(b"derived-keys: ");
        escape(self.outcome.as_bytes(), AUDIT_MAX_FIELD, push);
        for (key, value) in [
            ("uid", self.uid.map(i64::from)),
            ("pid", self.pid.map(i64::from)),
        ] {
            push(b" ");
            push(key.as_bytes());
            push(b"=");
            match value {
                Some(v) => {
                    let mut num = Line::new();
                    let _ = write!(num, "{v}");
                    push(num.as_bytes());
                }
                None => push(b"-"),
            }
        }
        let text = [
            ("exe", self.exe, AUDIT_MAX_PATH),
            ("name", self.name, AUDIT_MAX_FIELD),
            ("op", self.op, AUDIT_MAX_FIELD),
            ("binding", self.binding, AUDIT_MAX_FIELD),
            ("type", self.key_type, AUDIT_MAX_FIELD),
        ];
        for (key, value, max) in text {
            push(b" ");
            push(key.as_bytes());
            push(b"=");
            match value {
                Some(v) => escape(v, max, push),
                None => push(b"-"),
            }
        }
        if let Some(r) = self.reason {
            push(b" reason=");
            escape(r, AUDIT_MAX_FIELD, push);
        }
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

    fn scan(text: &[u8], auth: i32, chunk: usize, out: &mut [u8]) -> KeysScan {
        let mut m = KeysLine::new(auth);
        for c in text.chunks(chunk.max(1)) {
            m.feed(c, out);
        }
        m.finish(out)
    }

    const KEYS: &[u8] = b"0000000a I--Q--- 1 perm 3f010000 0 0 user x: 1\n\
        1a2b3c4d I--Q--- 1 perm 3f010000 0 0 .request_ key:0000000b pid:42 ci:7\n\
        1a2b3c4e I--Q--- 1 perm 3f010000 0 0 user y: 1\n";

    #[test]
    fn keys_line_is_found_across_chunks() {
        let want = KEYS.split(|&b| b == b'\n').nth(1).unwrap();
        for chunk in [1, 2, 7, 9, 10, 64, KEYS.len()] {
            let mut out = [0u8; 512];
            let s = scan(KEYS, 0x1a2b_3c4d, chunk, &mut out);
            assert_eq!((&out[..s.len], s.count), (want, 1), "chunk {chunk}");
        }
        // The last line without a newline counts.
        let mut out = [0u8; 512];
        let s = scan(&KEYS[..KEYS.len() - 1], 0x1a2b_3c4e, 5, &mut out);
        assert_eq!(s.count, 1);
        assert!(out[..s.len].ends_with(b"user y: 1"));
        // A serial that is only a prefix of another (always 8 digits) or
        // of a longer token, and no serial at all.
        for (auth, text) in [
            (0x01a2_b3c4, KEYS),
            (
                0x1a2b_3c4d,
                &b"1a2b3c4dd I--Q--- 1 perm 0 0 0 user z: 1\n"[..],
            ),
            (0x1a2b_3c4d, b"1a2b3c4d"),
            (0x1a2b_3c4d, b""),
            (0x1a2b_3c4d, b" 1a2b3c4d I--Q--- x\n"),
        ] {
            let mut out = [0u8; 512];
            assert_eq!(scan(text, auth, 3, &mut out), KeysScan { len: 0, count: 0 });
        }
        // A line too long for the buffer is counted, but not kept.
        let mut small = [0u8; 8];
        assert_eq!(
            scan(KEYS, 0x0a, 4, &mut small),
            KeysScan { len: 0, count: 1 }
        );
    }

    #[test]
    fn every_line_with_the_serial_is_counted() {
        let real = &b"1a2b3c4d I--Q--- 1 perm 3f010000 0 0 .request_ key:0000000b pid:42 ci:7"[..];
        // A forged line in another key's description, before and after
        // the real one, and a second copy of the real line itself.
        let forged_desc = b"0000000a I--Q--- 1 perm 3f3f3f3f 4310 4310 user x\n\
            1a2b3c4d I--Q--- 1 perm 3f010000 4300 4300 .request_ key:0000000b pid:99 ci:7: 0\n";
        let mut before = forged_desc.to_vec();
        before.extend_from_slice(real);
        before.push(b'\n');
        let mut after = real.to_vec();
        after.push(b'\n');
        after.extend_from_slice(forged_desc);
        let mut twice = after[..real.len() + 1].to_vec();
        twice.extend_from_slice(&after[..real.len() + 1]);
        for text in [&before, &after, &twice] {
            for chunk in [1, 3, 9, 100, text.len()] {
                let mut out = [0u8; 512];
                let s = scan(text, 0x1a2b_3c4d, chunk, &mut out);
                assert_eq!(s.count, 2, "chunk {chunk}");
                // Whatever is kept, the count tells the broker to refuse.
                assert!(out[..s.len].starts_with(b"1a2b3c4d "));
            }
        }
        // Many decoys saturate, never wrap.
        let mut m = KeysLine::new(0x0a);
        let mut out = [0u8; 64];
        for _ in 0..3 {
            m.feed(b"0000000a x\n", &mut out);
        }
        assert_eq!(m.finish(&out).count, 3);
    }

    fn escaped(b: &[u8]) -> String {
        let mut v = Vec::new();
        escape(b, AUDIT_MAX_FIELD, &mut |p| v.extend_from_slice(p));
        String::from_utf8(v).unwrap()
    }

    /// The reverse of `escape`, to show it loses nothing.
    fn unescape(s: &str) -> Vec<u8> {
        let (out, cut) = decode(s);
        assert!(!cut, "{s:?} was cut");
        out
    }

    /// A value's bytes, and whether it was cut.
    fn decode(s: &str) -> (Vec<u8>, bool) {
        let b = s.as_bytes();
        let (mut out, mut i) = (Vec::new(), 0);
        while i < b.len() {
            match (b[i], b.get(i + 1)) {
                (b'\\', Some(b'.')) if &b[i..] == b"\\..." => return (out, true),
                (b'\\', Some(b'\\')) => {
                    out.push(b'\\');
                    i += 2;
                }
                (b'\\', Some(b'x')) => {
                    let h = std::str::from_utf8(&b[i + 2..i + 4]).unwrap();
                    out.push(u8::from_str_radix(h, 16).unwrap());
                    i += 4;
                }
                (b'\\', _) => panic!("a backslash that is no escape in {s:?}"),
                (c, _) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        (out, false)
    }

    #[test]
    fn audit_escaping_is_unambiguous() {
        for (raw, want) in [
            (&b"/usr/bin/app"[..], "/usr/bin/app"),
            (b"a b", "a\\x20b"),
            (b"a\\x20b", "a\\\\x20b"),
            (b"tab\there", "tab\\x09here"),
            (b"nl\nexe=/bin/x", "nl\\x0aexe\\x3d/bin/x"),
            (b"cr\r", "cr\\x0d"),
            (b"\"q\" 'q'", "\\x22q\\x22\\x20\\x27q\\x27"),
            (b"back\\slash\\", "back\\\\slash\\\\"),
            (b"\x1b[31m\x7f", "\\x1b[31m\\x7f"),
            (b"\xff\xfe", "\\xff\\xfe"),
            ("caf\u{e9}".as_bytes(), "caf\\xc3\\xa9"),
            (b"", ""),
        ] {
            let e = escaped(raw);
            assert_eq!(e, want, "{raw:?}");
            assert!(e.bytes().all(|c| c.is_ascii_graphic()), "{e:?}");
            assert!(!e.contains(['"', '\'', '=', ' ']), "{e:?}");
            assert_eq!(unescape(&e), raw);
        }
        assert_ne!(escaped(b"a\\x20b"), escaped(b"a b"));
        // Every single byte, and every pair, decodes back to itself.
        for a in 0..=255u8 {
            assert_eq!(unescape(&escaped(&[a])), [a]);
            for b in [0u8, b'\\', b'x', b'2', b'0', b' ', 0xff] {
                assert_eq!(unescape(&escaped(&[a, b])), [a, b]);
            }
        }
        // A cut value says so, and the mark cannot come from escaping.
        let mut v = Vec::new();
        escape(b"abcdef", 3, &mut |p| v.extend_from_slice(p));
        assert_eq!(v, b"abc\\...");
        assert_eq!(decode("abc\\..."), (b"abc".to_vec(), true));
        assert_eq!(decode(&escaped(b"abc\\...")), (b"abc\\...".to_vec(), false));
    }

    #[test]
    fn audit_fields_line() {
        let mut l = Line::new();
        AuditFields {
            outcome: "EIO",
            uid: Some(4310),
            reason: Some(b"cannot connect to the broker: errno 2"),
            ..AuditFields::default()
        }
        .write(&mut |b| l.push(b));
        assert_eq!(
            std::str::from_utf8(l.as_bytes()).unwrap(),
            "derived-keys: EIO uid=4310 pid=- exe=- name=- op=- binding=- type=- \
             reason=cannot\\x20connect\\x20to\\x20the\\x20broker:\\x20errno\\x202"
        );
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
