//! One line per request to syslog (authpriv), or the kernel log where no
//! syslog socket exists. Never any key material: the line is built only
//! from the request's public fields and the requester's identity.

use std::io::Write;
use std::path::Path;

use crate::config::LogTarget;

/// A request's outcome and who asked; what the audit line says.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// None while undecided; "granted" or the errno name.
    pub outcome: Option<&'static str>,
    pub uid: Option<u32>,
    pub pid: Option<i32>,
    pub exe: Option<String>,
    pub name: Option<String>,
    pub operation: Option<String>,
    pub binding: Option<&'static str>,
    pub key_type: Option<&'static str>,
    pub reason: Option<String>,
}

/// Makes untrusted text safe for one log line: no newlines, no control
/// characters, no spaces (which would split fields), bounded length.
fn clean(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(256)
        .map(|c| {
            if c.is_ascii_graphic() {
                c.to_string()
            } else if c.is_ascii() {
                // Spaces too: a path must not be able to forge a field.
                format!("\\x{:02x}", c as u32)
            } else {
                c.escape_default().to_string()
            }
        })
        .collect();
    if s.chars().count() > 256 {
        out.push_str("...");
    }
    out
}

impl Record {
    /// `derived-keys: granted uid=0 pid=1 exe=/x name=db op=symmetric:32 binding=path type=user`
    pub fn line(&self) -> String {
        let mut l = format!("derived-keys: {}", self.outcome.unwrap_or("refused"));
        let mut field = |k: &str, v: Option<String>| {
            l.push_str(&format!(" {k}={}", v.unwrap_or_else(|| "-".into())));
        };
        field("uid", self.uid.map(|u| u.to_string()));
        field("pid", self.pid.map(|p| p.to_string()));
        field("exe", self.exe.as_deref().map(clean));
        field("name", self.name.clone());
        field("op", self.operation.clone());
        field("binding", self.binding.map(str::to_owned));
        field("type", self.key_type.map(str::to_owned));
        if let Some(r) = &self.reason {
            // The reason is last and may contain spaces; it is quoted.
            l.push_str(&format!(
                " reason=\"{}\"",
                r.replace(['"', '\n', '\r'], "'")
            ));
        }
        l
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
        let l = r.line();
        assert_eq!(
            l,
            "derived-keys: granted uid=1000 pid=42 exe=/tmp/evil\\x0aname\\x20exe=/bin/x \
             name=db op=symmetric:32 binding=path type=user"
        );
        let refused = Record {
            outcome: Some("EACCES"),
            reason: Some("uid 5 may not \"x\"\n".into()),
            ..Record::default()
        };
        assert_eq!(
            refused.line(),
            "derived-keys: EACCES uid=- pid=- exe=- name=- op=- binding=- type=- reason=\"uid 5 may not 'x''\""
        );
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
