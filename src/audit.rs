//! One line per request to syslog (authpriv), or the kernel log where no
//! syslog socket exists. Never any key material: the line is built only
//! from the request's public fields and the requester's identity.
//!
//! The line is `derived-keys: <outcome>` and then `key=value` fields split
//! by single spaces; a missing value is `-`. Every value goes through one
//! escaping, [`escape`] (shared with the handler binary, which writes the
//! lines of requests it answers alone), so a line is unambiguous whatever
//! bytes a requester put in its executable's path:
//!
//! - printable ASCII (0x21 to 0x7e) stands for itself, except the four
//!   below;
//! - `\` is written `\\`;
//! - `"`, `'`, `=` and every other byte (space, tab, newline and the other
//!   controls, DEL, non-ASCII, invalid UTF-8) are written `\xNN`, two
//!   lowercase hex digits: `a b` is `a\x20b`, and `a\x20b` is `a\\x20b`;
//! - a value cut short (paths after 256 bytes, other values after 512)
//!   ends in `\...`; read left to right, a backslash starts `\\` or
//!   `\xNN`, so `\.` is only ever that mark.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub use derived_keys_core::audit_line::escape;
use derived_keys_core::audit_line::AuditFields;

use crate::config::LogTarget;

/// A request's outcome and who asked; what the audit line says.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// None while undecided; "granted" or the errno name.
    pub outcome: Option<&'static str>,
    pub uid: Option<u32>,
    pub pid: Option<i32>,
    /// As the kernel reports it: any bytes but NUL.
    pub exe: Option<PathBuf>,
    pub name: Option<String>,
    pub operation: Option<String>,
    pub binding: Option<&'static str>,
    pub key_type: Option<&'static str>,
    pub reason: Option<String>,
}

impl Record {
    /// `derived-keys: granted uid=0 pid=1 exe=/x name=db op=symmetric:32 binding=path type=user`,
    /// and ` reason=...` for a refusal; every value escaped by
    /// [`escape`], the handler's lines made by the same code.
    pub fn line(&self) -> String {
        let mut out = Vec::with_capacity(160);
        self.fields().write(&mut |b| out.extend_from_slice(b));
        // Escaped values are printable ASCII.
        String::from_utf8_lossy(&out).into_owned()
    }

    fn fields(&self) -> AuditFields<'_> {
        AuditFields {
            outcome: self.outcome.unwrap_or("refused"),
            uid: self.uid,
            pid: self.pid,
            exe: self.exe.as_deref().map(|p| p.as_os_str().as_bytes()),
            name: self.name.as_deref().map(str::as_bytes),
            op: self.operation.as_deref().map(str::as_bytes),
            binding: self.binding.map(str::as_bytes),
            key_type: self.key_type.map(str::as_bytes),
            reason: self.reason.as_deref().map(str::as_bytes),
        }
    }
}

/// LOG_AUTHPRIV facility code.
const AUTHPRIV: u8 = 10;

/// /dev/kmsg, opened once per process: opening it costs more than a write
/// (the kernel positions a reader on its ring), and the broker logs every
/// request.
static KMSG: std::sync::Mutex<Option<std::fs::File>> = std::sync::Mutex::new(None);

fn kmsg(line: &str, severity: u8) -> std::io::Result<()> {
    let mut slot = KMSG.lock().unwrap_or_else(|p| p.into_inner());
    let f = match slot.take() {
        Some(f) => f,
        None => std::fs::OpenOptions::new().write(true).open("/dev/kmsg")?,
    };
    let f = slot.insert(f);
    f.write_all(format!("<{}>{line}\n", AUTHPRIV * 8 + severity).as_bytes())
}

fn syslog(socket: &Path, line: &str, granted: bool) -> Result<(), Box<dyn std::error::Error>> {
    let formatter = syslog::Formatter3164 {
        facility: syslog::Facility::LOG_AUTHPRIV,
        hostname: None,
        process: "derived-key-helper".into(),
        pid: std::process::id(),
    };
    let mut logger = syslog::unix_custom(formatter, socket)?;
    // A syslog daemon that stops reading must not stall the handler (and
    // with it the requester): sends give up after a short while.
    let limit = Some(std::time::Duration::from_millis(250));
    match &logger.backend {
        syslog::LoggerBackend::Unix(d) => d.set_write_timeout(limit)?,
        syslog::LoggerBackend::UnixStream(s) => s.get_ref().set_write_timeout(limit)?,
        _ => {}
    }
    if granted {
        logger.info(line)?;
    } else {
        logger.notice(line)?;
    }
    Ok(())
}

/// Sends the line; falls back to the kernel log, then to stderr, so a
/// request is never unlogged because one channel is down.
pub fn emit(target: &LogTarget, record: &Record) {
    let line = record.line();
    let granted = record.outcome == Some("granted");
    let severity = if granted { 6 } else { 5 };
    let sent = match target {
        LogTarget::Syslog { socket } => {
            (socket.exists() && syslog(socket, &line, granted).is_ok())
                || kmsg(&line, severity).is_ok()
        }
        LogTarget::Kmsg => kmsg(&line, severity).is_ok(),
        LogTarget::Stderr => false,
    };
    if !sent {
        let _ = writeln!(std::io::stderr(), "{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_format_and_escaping() {
        let r = Record {
            outcome: Some("granted"),
            uid: Some(1000),
            pid: Some(42),
            exe: Some("/tmp/evil\nname exe=/bin/x".into()),
            name: Some("db".into()),
            operation: Some("symmetric:32".into()),
            binding: Some("path"),
            key_type: Some("user"),
            reason: None,
        };
        assert_eq!(
            r.line(),
            "derived-keys: granted uid=1000 pid=42 exe=/tmp/evil\\x0aname\\x20exe\\x3d/bin/x \
             name=db op=symmetric:32 binding=path type=user"
        );
        let refused = Record {
            outcome: Some("EACCES"),
            reason: Some("uid 5 may not \"x\"\n\tat\\x20".into()),
            ..Record::default()
        };
        assert_eq!(
            refused.line(),
            "derived-keys: EACCES uid=- pid=- exe=- name=- op=- binding=- type=- \
             reason=uid\\x205\\x20may\\x20not\\x20\\x22x\\x22\\x0a\\x09at\\\\x20"
        );
    }

    #[test]
    fn every_field_is_escaped_alike() {
        use std::ffi::OsStr;
        let nasty: &[u8] = b"a b\tc\nd\\x20e\"f'g=h\xff\xc3(\x7f";
        let want = "a\\x20b\\x09c\\x0ad\\\\x20e\\x22f\\x27g\\x3dh\\xff\\xc3(\\x7f";
        let text = String::from_utf8_lossy(nasty).into_owned();
        let r = Record {
            outcome: Some("EACCES"),
            uid: Some(7),
            pid: Some(8),
            exe: Some(PathBuf::from(OsStr::from_bytes(nasty))),
            reason: Some(text.clone()),
            ..Record::default()
        };
        let line = r.line();
        // Fields split on spaces, keys end at the first '=': the exe
        // decodes to its very bytes, invalid UTF-8 included.
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields.len(), 10, "{line}");
        assert_eq!(fields[4], format!("exe={want}"));
        let lossy = escape_to_string(text.as_bytes());
        assert_eq!(fields[9], format!("reason={lossy}"));
        assert!(line.bytes().all(|b| b == b' ' || b.is_ascii_graphic()));
        // `a\x20b` literally and `a b` differ, in every field.
        let a = Record {
            exe: Some("a\\x20b".into()),
            reason: Some("a\\x20b".into()),
            ..Record::default()
        };
        let b = Record {
            exe: Some("a b".into()),
            reason: Some("a b".into()),
            ..Record::default()
        };
        assert_ne!(a.line(), b.line());
        assert!(a.line().contains("exe=a\\\\x20b "), "{}", a.line());
        assert!(b.line().contains("exe=a\\x20b "), "{}", b.line());
        // Long paths are cut, and say so.
        let long = Record {
            exe: Some("/x".repeat(200).into()),
            ..Record::default()
        };
        assert!(long
            .line()
            .contains(&format!("exe={}\\... ", "/x".repeat(128))));
    }

    fn escape_to_string(b: &[u8]) -> String {
        let mut v = Vec::new();
        escape(
            b,
            derived_keys_core::audit_line::AUDIT_MAX_FIELD,
            &mut |p| v.extend_from_slice(p),
        );
        String::from_utf8(v).unwrap()
    }

    /// The handler binary's own lines (requests it answers without the
    /// broker) come from the same `AuditFields`, into its bounded buffer:
    /// byte for byte what the broker would write for the same facts.
    #[test]
    fn handler_lines_match_the_brokers() {
        let reason = "cannot connect to the broker: errno 2 \"/run\\x\"";
        let mut handler = derived_keys_core::runtime::Line::new();
        AuditFields {
            outcome: "EIO",
            uid: Some(4310),
            reason: Some(reason.as_bytes()),
            ..AuditFields::default()
        }
        .write(&mut |b| handler.push(b));
        let broker = Record {
            outcome: Some("EIO"),
            uid: Some(4310),
            reason: Some(reason.into()),
            ..Record::default()
        };
        assert_eq!(handler.as_bytes(), broker.line().as_bytes());
    }

    #[test]
    fn syslog_line_reaches_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("log");
        let rx = std::os::unix::net::UnixDatagram::bind(&sock).unwrap();
        let r = Record {
            outcome: Some("granted"),
            name: Some("db".into()),
            ..Record::default()
        };
        emit(
            &LogTarget::Syslog {
                socket: sock.clone(),
            },
            &r,
        );
        let mut buf = [0u8; 1024];
        let n = rx.recv(&mut buf).unwrap();
        let got = String::from_utf8_lossy(&buf[..n]);
        // <86> = authpriv.info
        assert!(got.starts_with("<86>"), "{got}");
        assert!(got.contains("derived-keys: granted"), "{got}");

        // A receiver that stops reading: once its queue is full, each send
        // gives up after a moment, the line falls back to the kernel log,
        // and emit returns instead of blocking the handler.
        for _ in 0..30 {
            let start = std::time::Instant::now();
            emit(
                &LogTarget::Syslog {
                    socket: sock.clone(),
                },
                &r,
            );
            assert!(
                start.elapsed() < std::time::Duration::from_secs(1),
                "emit blocked"
            );
        }
        drop(rx);
    }
}
