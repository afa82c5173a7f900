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
