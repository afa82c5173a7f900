//! The audit line's format and its one escaping, for the broker's lines
//! and the handler's alike.

use core::fmt::Write;

use crate::runtime::Line;

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

/// systemd-journald's native socket. Preferred to any syslog socket where
/// it exists: it takes structured fields, and the facility and priority
/// arrive as fields rather than as a prefix a relay may rewrite.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// LOG_AUTHPRIV: the facility of every audit line.
pub const AUTHPRIV: u8 = 10;
/// syslog severities of a granted request (info) and a refusal (notice).
pub const SEVERITY_GRANTED: u8 = 6;
pub const SEVERITY_REFUSED: u8 = 5;

/// The kernel's limit on /dev/kmsg writers (`printk_devkmsg=ratelimit`,
/// the default): `ratelimit_default_init` in `devkmsg_open`, that is
/// DEFAULT_RATELIMIT_BURST (10) lines per DEFAULT_RATELIMIT_INTERVAL
/// (5 s), per open file. Beyond it the kernel throws lines away and still
/// reports the write as done, so a writer can only know what was kept by
/// keeping count itself.
pub const KMSG_BURST: u32 = 10;
pub const KMSG_INTERVAL_MS: u64 = 5000;

/// Where the kernel says how it treats /dev/kmsg writers: `on`
/// (unlimited), `off` (every line discarded, the write still "succeeds")
/// or `ratelimit`.
pub const PRINTK_DEVKMSG: &str = "/proc/sys/kernel/printk_devkmsg";

/// The runtime file (see `runtime::runtime_path`) counting audit lines
/// nobody could write: one byte is appended per line, by the broker or the
/// handler alike (`O_APPEND` makes each append atomic, so the two never
/// need a lock), and the file's size is the count. Root only, in the root
/// only runtime directory; tmpfs, so it counts since boot.
pub const DROPPED_EXT: &str = "dropped";
/// The broker's note beside it: up to which count drops were reported in
/// a written line, and the count when the broker started.
pub const AUDIT_STATE_EXT: &str = "audit";

/// The line that reports drops, written before the next line that gets
/// through: `derived-keys: <n> audit lines were dropped (<why>)`.
pub fn write_dropped(n: u64, why: &[u8], push: &mut dyn FnMut(&[u8])) {
    let mut num = Line::new();
    let _ = write!(num, "derived-keys: {n} audit lines were dropped (");
    push(num.as_bytes());
    push(why);
    push(b")");
}

/// One journal entry in the journal's native datagram format (`FIELD=value`
/// lines; every value here is a single line, which this format requires
/// for its plain form): MESSAGE, PRIORITY, SYSLOG_FACILITY (authpriv),
/// SYSLOG_IDENTIFIER and SYSLOG_PID. `message` must hold no newline (an
/// audit line never does: [`escape`] writes it `\x0a`).
pub fn write_journal(
    message: &[u8],
    severity: u8,
    identifier: &str,
    pid: u32,
    push: &mut dyn FnMut(&[u8]),
) {
    let mut head = Line::new();
    let _ = write!(
        head,
        "PRIORITY={severity}\nSYSLOG_FACILITY={AUTHPRIV}\nSYSLOG_IDENTIFIER={identifier}\nSYSLOG_PID={pid}\nMESSAGE="
    );
    push(head.as_bytes());
    push(message);
    push(b"\n");
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn journal_entry_and_dropped_line() {
        let mut v = Vec::new();
        write_journal(
            b"derived-keys: granted uid=1",
            6,
            "derived-keys",
            42,
            &mut |b| v.extend_from_slice(b),
        );
        assert_eq!(
            std::str::from_utf8(&v).unwrap(),
            "PRIORITY=6\nSYSLOG_FACILITY=10\nSYSLOG_IDENTIFIER=derived-keys\nSYSLOG_PID=42\n\
             MESSAGE=derived-keys: granted uid=1\n"
        );
        let mut d = Vec::new();
        write_dropped(90, b"kernel log rate limit", &mut |b| {
            d.extend_from_slice(b)
        });
        assert_eq!(
            d,
            b"derived-keys: 90 audit lines were dropped (kernel log rate limit)"
        );
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
}
