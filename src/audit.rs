//! One line per request, authpriv: to the journal's native socket where
//! journald runs, else to the syslog socket, else to the kernel log, but
//! only within the kernel's rate limit for /dev/kmsg writers (beyond it
//! the kernel discards lines without saying so). A line that no channel
//! takes is counted, in a root-only runtime file shared with the handler;
//! the count goes out in the next line that gets through ("N audit lines
//! were dropped") and in `dkey status`. Never any key material: the line
//! is built only from the request's public fields and the requester's
//! identity.
//!
//! In the broker a worker writes its request's line itself only when
//! that needs no wait; otherwise the line goes to a thread of its own
//! ([`Lines`]) that waits for the socket. A send may wait up to 250 ms on a
//! full socket, and the journal's and syslog's sockets take anyone's
//! datagrams, so a local user flooding them must not hold the workers, and
//! with them every request.
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
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use derived_keys_core::audit_line as line;
pub use derived_keys_core::audit_line::escape;
use derived_keys_core::audit_line::AuditFields;
use serde::Serialize;

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

/// syslog severity of the line that reports drops (warning).
const SEVERITY_DROPPED: u8 = 4;
/// How long a send to the journal or a syslog socket may take: a daemon
/// that stops reading must not stall the broker (or the handler, and with
/// it the requester).
const SEND_TIMEOUT: Duration = Duration::from_millis(250);

/// Where an audit line went (or would go).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sink {
    /// systemd-journald's native socket.
    Journal,
    /// The configured syslog socket.
    Syslog,
    /// The kernel log, within its rate limit.
    Kmsg,
    /// Standard error (`target = "stderr"`, for running by hand).
    Stderr,
}

/// Why a line did not reach the kernel log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KmsgRefusal {
    /// This window's share of the kernel's limit is used up.
    RateLimited,
    /// `printk_devkmsg=off`: the kernel discards every line.
    Off,
    /// No /dev/kmsg (a container), or writing it failed.
    Unavailable,
}

impl KmsgRefusal {
    fn why(self) -> String {
        match self {
            KmsgRefusal::RateLimited => format!(
                "no journal or syslog socket took them, and the kernel log takes \
                 at most {} lines per {} s",
                line::KMSG_BURST,
                line::KMSG_INTERVAL_MS / 1000
            ),
            KmsgRefusal::Off => {
                "no journal or syslog socket took them, and printk_devkmsg=off discards \
                 every line written to the kernel log"
                    .into()
            }
            KmsgRefusal::Unavailable => {
                "no journal or syslog socket took them, and /dev/kmsg cannot be written".into()
            }
        }
    }
}

/// How the kernel treats /dev/kmsg writers (`/proc/sys/kernel/printk_devkmsg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DevkmsgMode {
    On,
    Off,
    Ratelimit,
}

fn devkmsg_mode() -> DevkmsgMode {
    match std::fs::read_to_string(line::PRINTK_DEVKMSG)
        .as_deref()
        .map(str::trim)
    {
        Ok("on") => DevkmsgMode::On,
        Ok("off") => DevkmsgMode::Off,
        // The kernel's default, and the safe assumption when unreadable.
        _ => DevkmsgMode::Ratelimit,
    }
}

/// The broker's share of the kernel log. The kernel allows each open
/// /dev/kmsg file 10 lines per 5 s and silently discards the rest while
/// reporting the write as done; so the broker keeps the count itself, at
/// most that many lines per window of its own, and opens the file afresh
/// at each window: the kernel's window then starts at our first write in
/// it, never before ours, so every line we count as written was kept.
struct KmsgBudget {
    file: Option<std::fs::File>,
    window: Option<Instant>,
    used: u32,
    mode: DevkmsgMode,
}

impl KmsgBudget {
    const fn new() -> KmsgBudget {
        KmsgBudget {
            file: None,
            window: None,
            used: 0,
            mode: DevkmsgMode::Ratelimit,
        }
    }

    /// A new window starts at `now`.
    fn window_over(&self, now: Instant) -> bool {
        let interval = Duration::from_millis(line::KMSG_INTERVAL_MS);
        self.window
            .is_none_or(|w| now.saturating_duration_since(w) >= interval)
    }

    /// The next write would be refused without reaching the kernel.
    fn spent(&self) -> bool {
        !self.window_over(Instant::now())
            && match self.mode {
                DevkmsgMode::Off => true,
                DevkmsgMode::Ratelimit => self.used >= line::KMSG_BURST,
                DevkmsgMode::On => false,
            }
    }

    fn write(&mut self, text: &str, severity: u8) -> Result<(), KmsgRefusal> {
        let now = Instant::now();
        if self.window_over(now) {
            self.window = Some(now);
            self.used = 0;
            self.mode = devkmsg_mode();
            self.file = None;
        }
        match self.mode {
            DevkmsgMode::Off => return Err(KmsgRefusal::Off),
            DevkmsgMode::Ratelimit if self.used >= line::KMSG_BURST => {
                return Err(KmsgRefusal::RateLimited)
            }
            DevkmsgMode::Ratelimit | DevkmsgMode::On => {}
        }
        let file = match self.file.take() {
            Some(f) => f,
            None => std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/kmsg")
                .map_err(|_| KmsgRefusal::Unavailable)?,
        };
        let file = self.file.insert(file);
        // Counted before the write: a failed write may still have used
        // the kernel's allowance.
        self.used += 1;
        let pri = line::AUTHPRIV * 8 + severity;
        file.write_all(format!("<{pri}>{text}\n").as_bytes())
            .map_err(|_| {
                self.file = None;
                KmsgRefusal::Unavailable
            })
    }
}

/// The dropped-lines counter of one configuration (see
/// `derived_keys_core::audit_line::DROPPED_EXT`): the broker appends to it
/// and reports what it holds in the next line that gets through.
struct Counter {
    /// Opened (and created) at the first drop, so that a broker that never
    /// drops a line leaves no file behind.
    file: Option<std::fs::File>,
    path: PathBuf,
    state: PathBuf,
    /// The count when this broker started, and the count up to which drops
    /// have been reported in a written line.
    start: u64,
    reported: u64,
    /// Why the last line was dropped, for the report.
    why: String,
    /// The configuration this counter belongs to, named in the report.
    config: PathBuf,
    /// This broker has written its note.
    noted: bool,
}

/// The broker's audit state; one per process, behind one lock, so that a
/// report of drops and the lines around it keep their order.
struct State {
    kmsg: KmsgBudget,
    counter: Option<Counter>,
}

static STATE: Mutex<State> = Mutex::new(State {
    kmsg: KmsgBudget::new(),
    counter: None,
});

/// Setting up the dropped-lines counter failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit counter {path}")]
    Counter {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The broker's note beside the counter (`key=value` lines).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Note {
    pid: u32,
    start: u64,
    reported: u64,
}

impl Note {
    fn read(path: &Path) -> Option<Note> {
        let text = std::fs::read_to_string(path).ok()?;
        let mut note = Note::default();
        for l in text.lines() {
            let (k, v) = l.split_once('=')?;
            match k {
                "pid" => note.pid = v.parse().ok()?,
                "start" => note.start = v.parse().ok()?,
                "reported" => note.reported = v.parse().ok()?,
                _ => {}
            }
        }
        Some(note)
    }

    /// Written whole and renamed into place: a reader never sees half.
    fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("audit.new");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(
            format!(
                "pid={}\nstart={}\nreported={}\n",
                self.pid, self.start, self.reported
            )
            .as_bytes(),
        )?;
        std::fs::rename(&tmp, path)
    }
}

/// `n` dropped lines, one byte each, in one append.
fn append_drops(f: &mut std::fs::File, n: u64) {
    let _ = f.write_all(&vec![b'b'; usize::try_from(n).unwrap_or(0)]);
}

fn open_counter(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// From now on, lines this process cannot write anywhere are counted in
/// `dropped` (appended to by the handler too), and the count is reported
/// in the next line that gets through; `state` keeps how far reports went,
/// so a later broker reports only what this one did not. Both files live
/// in the broker's root-only runtime directory; the report names
/// `config`. Called once by the broker at start.
pub fn count_into(config: &Path, dropped: &Path, state: &Path) -> Result<(), AuditError> {
    let err = |source| AuditError::Counter {
        path: dropped.to_owned(),
        source,
    };
    let file = match std::fs::OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dropped)
    {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(err(e)),
    };
    let size = match &file {
        Some(f) => f.metadata().map_err(err)?.len(),
        None => 0,
    };
    let reported = Note::read(state).map_or(0, |n| n.reported.min(size));
    let mut counter = Counter {
        file,
        path: dropped.to_owned(),
        state: state.to_owned(),
        start: size,
        reported,
        why: "earlier, before this broker started".into(),
        config: config.to_owned(),
        noted: false,
    };
    if size > reported {
        counter.note();
    }
    lock().counter = Some(counter);
    Ok(())
}

impl Counter {
    /// The count now; the handler may have created the file meanwhile.
    fn size(&self) -> u64 {
        let meta = match &self.file {
            Some(f) => f.metadata(),
            None => std::fs::metadata(&self.path),
        };
        meta.map_or(self.reported, |m| m.len())
    }

    fn note(&mut self) {
        self.noted = true;
        let _ = Note {
            pid: std::process::id(),
            start: self.start,
            reported: self.reported,
        }
        .write(&self.state);
    }

    fn drop_one(&mut self, why: String) {
        self.drop_many(1, why);
    }

    fn drop_many(&mut self, n: u64, why: String) {
        // One byte a line, appended atomically beside the handler's.
        if self.file.is_none() {
            self.file = open_counter(&self.path).ok();
        }
        if let Some(f) = self.file.as_mut() {
            append_drops(f, n);
        }
        self.why = why;
        // The note changes only when a report goes out; it must exist
        // once this broker has dropped anything (`dkey status`).
        if !self.noted {
            self.note();
        }
    }
}

fn lock() -> std::sync::MutexGuard<'static, State> {
    // A panic elsewhere while logging leaves the state usable.
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a socket send may wait for room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Up to [`SEND_TIMEOUT`] (the audit thread).
    Bounded,
    /// Not at all (a worker writing its own line).
    No,
}

fn journal(socket: &Path, text: &str, severity: u8, wait: Wait) -> std::io::Result<()> {
    let mut entry = Vec::with_capacity(text.len() + 96);
    line::write_journal(
        text.as_bytes(),
        severity,
        "derived-keys",
        std::process::id(),
        &mut |b| entry.extend_from_slice(b),
    );
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    match wait {
        Wait::Bounded => sock.set_write_timeout(Some(SEND_TIMEOUT))?,
        Wait::No => sock.set_nonblocking(true)?,
    }
    sock.send_to(&entry, socket).map(|_| ())
}

fn syslog(
    socket: &Path,
    text: &str,
    severity: u8,
    wait: Wait,
) -> Result<(), Box<dyn std::error::Error>> {
    let formatter = syslog::Formatter3164 {
        facility: syslog::Facility::LOG_AUTHPRIV,
        hostname: None,
        process: "derived-key-helper".into(),
        pid: std::process::id(),
    };
    if wait == Wait::No {
        // A datagram socket only, sent to without waiting: the crate's
        // fallback for a stream socket connects, which may wait for the
        // daemon's backlog. Anything else is for the audit thread.
        use syslog::LogFormat;
        let sev = match severity {
            line::SEVERITY_GRANTED => syslog::Severity::LOG_INFO,
            SEVERITY_DROPPED => syslog::Severity::LOG_WARNING,
            _ => syslog::Severity::LOG_NOTICE,
        };
        let mut msg = Vec::with_capacity(text.len() + 64);
        formatter.format(&mut msg, sev, text)?;
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        sock.set_nonblocking(true)?;
        sock.send_to(&msg, socket)?;
        return Ok(());
    }
    let mut logger = syslog::unix_custom(formatter, socket)?;
    let limit = Some(SEND_TIMEOUT);
    match &logger.backend {
        syslog::LoggerBackend::Unix(d) => d.set_write_timeout(limit)?,
        syslog::LoggerBackend::UnixStream(s) => s.get_ref().set_write_timeout(limit)?,
        _ => {}
    }
    match severity {
        line::SEVERITY_GRANTED => logger.info(text)?,
        SEVERITY_DROPPED => logger.warning(text)?,
        _ => logger.notice(text)?,
    }
    // A stream backend buffers, and its drop ignores a failed flush: a
    // line that did not go out must say so (and be counted).
    if let syslog::LoggerBackend::UnixStream(s) = &mut logger.backend {
        s.flush()?;
    }
    Ok(())
}

/// Why a line did not go out.
#[derive(Debug, Clone, Copy)]
enum NotSent {
    /// No channel took it.
    Refused(KmsgRefusal),
    /// With [`Wait::No`]: a socket had no room now (or failed); the line
    /// is for the audit thread to try, waiting.
    Later,
}

/// One line to the first channel that takes it: the journal, the syslog
/// socket, the kernel log (within its limit); or why none did.
fn deliver(
    journal_socket: &Path,
    target: &LogTarget,
    kmsg: &mut KmsgBudget,
    text: &str,
    severity: u8,
    wait: Wait,
) -> Result<Sink, NotSent> {
    let later = |sent: bool| (wait == Wait::No && !sent).then_some(NotSent::Later);
    match target {
        LogTarget::Syslog { socket } => {
            if journal_socket.exists() {
                let sent = journal(journal_socket, text, severity, wait).is_ok();
                if sent {
                    return Ok(Sink::Journal);
                }
                if let Some(l) = later(sent) {
                    return Err(l);
                }
            }
            if socket.exists() {
                let sent = syslog(socket, text, severity, wait).is_ok();
                if sent {
                    return Ok(Sink::Syslog);
                }
                if let Some(l) = later(sent) {
                    return Err(l);
                }
            }
            kmsg.write(text, severity)
                .map(|()| Sink::Kmsg)
                .map_err(NotSent::Refused)
        }
        LogTarget::Kmsg => kmsg
            .write(text, severity)
            .map(|()| Sink::Kmsg)
            .map_err(NotSent::Refused),
        LogTarget::Stderr => {
            let _ = writeln!(std::io::stderr(), "{text}");
            Ok(Sink::Stderr)
        }
    }
}

/// Sends the line: to the journal where journald runs, else to the
/// syslog socket, else to the kernel log within its rate limit. A line
/// none of them takes is counted, and the count goes out, as its own
/// line, before the next line that gets through; `dkey status` shows it
/// too. Never blocks for long: socket sends give up after 250 ms. (The
/// broker's writer: see [`Lines`].)
fn emit(target: &LogTarget, record: &Record) {
    emit_via(Path::new(line::JOURNAL_SOCKET), target, record);
}

fn emit_via(journal_socket: &Path, target: &LogTarget, record: &Record) {
    let _ = emit_locked(&mut lock(), journal_socket, target, record, Wait::Bounded);
}

/// [`emit_via`] with the audit state held; with [`Wait::No`], Err if a
/// socket had no room for the line (nothing counted: it is for later).
fn emit_locked(
    st: &mut State,
    journal_socket: &Path,
    target: &LogTarget,
    record: &Record,
    wait: Wait,
) -> Result<(), NotSent> {
    let text = record.line();
    let severity = if record.outcome == Some("granted") {
        line::SEVERITY_GRANTED
    } else {
        line::SEVERITY_REFUSED
    };
    let State { kmsg, counter } = st;
    // A report of drops goes out only where the line could: with the
    // kernel log's allowance spent, neither would (and the count, one
    // statx, is not worth reading for every line of a flood).
    let may_report = !(matches!(target, LogTarget::Kmsg) && kmsg.spent());
    if let Some(c) = counter.as_mut().filter(|_| may_report) {
        let size = c.size();
        if size > c.reported {
            let mut report = Vec::new();
            let mut push = |b: &[u8]| report.extend_from_slice(b);
            line::write_dropped(size - c.reported, c.why.as_bytes(), &mut push);
            // Which broker's count: several configurations may share a log.
            push(b" config=");
            escape(
                c.config.as_os_str().as_bytes(),
                line::AUDIT_MAX_PATH,
                &mut push,
            );
            let report = String::from_utf8_lossy(&report);
            match deliver(
                journal_socket,
                target,
                kmsg,
                &report,
                SEVERITY_DROPPED,
                wait,
            ) {
                Ok(_) => {
                    c.reported = size;
                    c.note();
                }
                // The line waits too: it goes after its report.
                Err(NotSent::Later) => return Err(NotSent::Later),
                Err(NotSent::Refused(_)) => {}
            }
        }
    }
    match deliver(journal_socket, target, kmsg, &text, severity, wait) {
        Ok(_) => Ok(()),
        Err(NotSent::Later) => Err(NotSent::Later),
        Err(NotSent::Refused(refusal)) => {
            match counter.as_mut() {
                Some(c) => c.drop_one(refusal.why()),
                // Not the broker (dkey, tests): say it where someone may look.
                None => {
                    let _ = writeln!(std::io::stderr(), "{text}");
                }
            }
            Ok(())
        }
    }
}

/// Lines queued for the broker's audit thread, at most (a few hundred
/// bytes each, 10 kB at most with a requester's longest fields: ~10 MB in
/// all). A flood of requests while the log sockets take nothing fills it;
/// past it, lines are counted as dropped.
const QUEUED_LINES: usize = 1024;

/// Why lines were dropped before any channel was tried.
const QUEUE_FULL: &str = "the broker's audit queue was full: the log sockets were not taking lines";

/// How long a stopping broker lets its audit thread write what is queued:
/// a little more than one send's bound. It still holds its instance lock
/// (new requests wait for its successor), and a socket that took nothing
/// for that long is not about to take a queue's worth.
const FINISH: Duration = Duration::from_millis(300);

/// The broker's audit lines: a worker writes its own when no log socket
/// makes it wait, and otherwise a thread of its own writes it, in the
/// order queued, so that a slow or full log socket (a stuck syslog daemon,
/// or the journal's socket flooded by a local user) holds that thread and
/// not the workers: [`Lines::emit`] never waits for a socket. A line the
/// queue has no room for is counted as dropped, like a line no channel
/// takes.
pub struct Lines {
    tx: Mutex<Option<SyncSender<Record>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Lines refused because the queue was full, not yet counted.
    overflow: Arc<AtomicU64>,
    /// Lines queued and not yet written (or dropped).
    queued: Arc<AtomicU64>,
    /// Set by [`Lines::abandon`]: what is queued is counted, not written.
    abandoned: Arc<AtomicBool>,
    /// The drop counter, for what a stopping broker leaves queued.
    dropped: Option<PathBuf>,
    /// Where the lines go, for those written without the thread; None: all
    /// go through it (a test's writer).
    direct: Option<LogTarget>,
}

impl Lines {
    /// Starts the thread, writing to `target`; `dropped` is the drop
    /// counter [`count_into`] set up, if it did.
    pub fn start(target: LogTarget, dropped: Option<PathBuf>) -> std::io::Result<Lines> {
        let to = target.clone();
        let mut lines = Lines::start_with(move |record| emit(&to, record), dropped)?;
        lines.direct = Some(target);
        Ok(lines)
    }

    /// [`Lines::start`] with `write` for each line (tests: a writer that
    /// stalls when they say).
    fn start_with(
        mut write: impl FnMut(&Record) + Send + 'static,
        dropped: Option<PathBuf>,
    ) -> std::io::Result<Lines> {
        let (tx, rx) = sync_channel::<Record>(QUEUED_LINES);
        let overflow = Arc::new(AtomicU64::new(0));
        let queued = Arc::new(AtomicU64::new(0));
        let abandoned = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new().name("audit".into()).spawn({
            let (overflow, queued, abandoned) =
                (overflow.clone(), queued.clone(), abandoned.clone());
            move || {
                for record in rx {
                    if abandoned.load(Ordering::SeqCst) {
                        return;
                    }
                    count_overflow(&overflow);
                    write(&record);
                    // Saturating: `abandon` may have taken the count.
                    let _ = queued
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| q.checked_sub(1));
                }
                count_overflow(&overflow);
            }
        })?;
        Ok(Lines {
            direct: None,
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            overflow,
            queued,
            abandoned,
            dropped,
        })
    }

    /// Writes the line now if that needs no wait (nothing queued before
    /// it, the audit state free, room in the socket), else queues it for
    /// the thread; never waits. (Waking the thread for every line cost
    /// ~1.5% of a hot-key signature here.)
    pub fn emit(&self, record: Record) {
        let idle =
            self.queued.load(Ordering::SeqCst) == 0 && self.overflow.load(Ordering::SeqCst) == 0;
        if let Some(target) = self.direct.as_ref().filter(|_| idle) {
            let st = match STATE.try_lock() {
                Ok(st) => Some(st),
                Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            };
            if let Some(mut st) = st {
                let journal = Path::new(line::JOURNAL_SOCKET);
                if emit_locked(&mut st, journal, target, &record, Wait::No).is_ok() {
                    return;
                }
            }
        }
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = tx
            .as_ref()
            .filter(|_| !self.abandoned.load(Ordering::SeqCst))
        else {
            // Stopped: nothing will write it.
            self.count_now(1);
            return;
        };
        self.queued.fetch_add(1, Ordering::SeqCst);
        if tx.try_send(record).is_err() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            self.overflow.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Takes no more lines and lets the thread write what is queued, for
    /// at most [`FINISH`]; what is still queued then is counted as
    /// dropped. For a broker on its way out.
    pub fn finish(&self) {
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        let end = Instant::now() + FINISH;
        while thread.as_ref().is_some_and(|t| !t.is_finished()) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(t) = thread.filter(|t| t.is_finished()) {
            let _ = t.join();
        }
        self.abandon();
    }

    /// Counts what is still queued as dropped, straight into the counter
    /// file (the thread may be in the middle of a send, holding the audit
    /// state), and has the thread write nothing more: for a broker that
    /// exits now. A line the thread is sending at this moment may go out
    /// and be counted too; none is lost uncounted.
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::SeqCst);
        let n = self.queued.swap(0, Ordering::SeqCst) + self.overflow.swap(0, Ordering::SeqCst);
        self.count_now(n);
    }

    /// `n` lines dropped, straight into the counter file.
    fn count_now(&self, n: u64) {
        if let (Some(path), true) = (&self.dropped, n > 0) {
            if let Ok(mut f) = open_counter(path) {
                append_drops(&mut f, n);
            }
        }
    }
}

/// Counts the lines the queue had no room for.
fn count_overflow(overflow: &AtomicU64) {
    let n = overflow.swap(0, Ordering::SeqCst);
    if n == 0 {
        return;
    }
    if let Some(c) = lock().counter.as_mut() {
        c.drop_many(n, QUEUE_FULL.into());
    }
}

/// Where audit lines go now, and what was lost: `dkey status`.
#[derive(Debug, Clone, Serialize)]
pub struct AuditStatus {
    /// The channel the next line goes to; null if none would take it.
    pub sink: Option<Sink>,
    /// The same, in words (socket path, kernel log mode).
    pub destination: String,
    /// Whether lines can be lost there (and then only counted).
    pub lossy: bool,
    /// Lines dropped since the running broker started; null when no
    /// broker runs.
    pub dropped_since_broker_start: Option<u64>,
    /// Lines dropped since boot for this configuration.
    pub dropped_total: u64,
    /// Of those, how many no written line has reported yet.
    pub unreported: u64,
}

/// What `dkey status` says about the audit trail of `config`.
pub fn status(config: &crate::config::Config) -> AuditStatus {
    let paths = crate::broker::paths(config);
    let journal_socket = Path::new(line::JOURNAL_SOCKET);
    let kmsg = || {
        match devkmsg_mode() {
        _ if !Path::new("/dev/kmsg").exists() => (
            None,
            "nowhere: no journal or syslog socket, and no /dev/kmsg; every line is only counted"
                .to_owned(),
            true,
        ),
        DevkmsgMode::On => (
            Some(Sink::Kmsg),
            "the kernel log (/dev/kmsg, printk_devkmsg=on: unlimited)".to_owned(),
            false,
        ),
        DevkmsgMode::Off => (
            None,
            "nowhere: no journal or syslog socket, and printk_devkmsg=off discards kernel log \
             lines; every line is only counted"
                .to_owned(),
            true,
        ),
        DevkmsgMode::Ratelimit => (
            Some(Sink::Kmsg),
            format!(
                "the kernel log (/dev/kmsg): at most {} lines per {} s, more are dropped and counted",
                line::KMSG_BURST,
                line::KMSG_INTERVAL_MS / 1000
            ),
            true,
        ),
    }
    };
    let (sink, destination, lossy) = match &config.log {
        LogTarget::Syslog { .. } if journal_socket.exists() => (
            Some(Sink::Journal),
            format!("the journal ({})", journal_socket.display()),
            false,
        ),
        LogTarget::Syslog { socket } if socket.exists() => (
            Some(Sink::Syslog),
            format!("syslog, authpriv ({})", socket.display()),
            false,
        ),
        LogTarget::Syslog { .. } | LogTarget::Kmsg => kmsg(),
        LogTarget::Stderr => (
            Some(Sink::Stderr),
            "the broker's standard error (target = \"stderr\": for running by hand)".to_owned(),
            true,
        ),
    };
    let total = std::fs::metadata(&paths.dropped).map_or(0, |m| m.len());
    let note = Note::read(&paths.audit).unwrap_or_default();
    let broker = std::fs::read_to_string(&paths.pid)
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .filter(|pid| Path::new(&format!("/proc/{pid}")).exists());
    let dropped_since_broker_start = broker.map(|pid| {
        if note.pid == pid {
            total.saturating_sub(note.start)
        } else {
            // It has dropped nothing yet, or it would have noted it.
            0
        }
    });
    AuditStatus {
        sink,
        destination,
        lossy,
        dropped_since_broker_start,
        dropped_total: total,
        unreported: total.saturating_sub(note.reported.min(total)),
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
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let no_journal = dir.path().join("no-journal");
        let sock = dir.path().join("log");
        let rx = std::os::unix::net::UnixDatagram::bind(&sock).unwrap();
        let r = Record {
            outcome: Some("granted"),
            name: Some("db".into()),
            ..Record::default()
        };
        emit_via(
            &no_journal,
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
            emit_via(
                &no_journal,
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

    /// Tests that use the process's one audit state take turns.
    static SERIAL: Mutex<()> = Mutex::new(());

    /// Where journald runs, a line goes to its native socket, as fields.
    #[test]
    fn journal_entry_reaches_the_native_socket() {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("socket");
        let rx = std::os::unix::net::UnixDatagram::bind(&journal).unwrap();
        let r = Record {
            outcome: Some("EACCES"),
            name: Some("db".into()),
            ..Record::default()
        };
        let syslog = LogTarget::Syslog {
            socket: dir.path().join("no-log"),
        };
        emit_via(&journal, &syslog, &r);
        let mut buf = [0u8; 2048];
        let n = rx.recv(&mut buf).unwrap();
        let got = String::from_utf8_lossy(&buf[..n]);
        let fields: Vec<&str> = got.lines().collect();
        assert!(fields.contains(&"PRIORITY=5"), "{got}");
        assert!(fields.contains(&"SYSLOG_FACILITY=10"), "{got}");
        assert!(fields.contains(&"SYSLOG_IDENTIFIER=derived-keys"), "{got}");
        assert!(
            fields.contains(&format!("MESSAGE={}", r.line()).as_str()),
            "{got}"
        );
    }

    /// Drops counted by anyone (the handler appends too) are reported in
    /// the next line that gets through, once, and the note says so.
    #[test]
    fn dropped_lines_are_reported_in_the_next_line() {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let dropped = dir.path().join("x.dropped");
        let state = dir.path().join("x.audit");
        std::fs::write(&dropped, b"hh").unwrap();
        std::fs::write(&state, "pid=1\nstart=0\nreported=0\n").unwrap();
        count_into(Path::new("/x.conf"), &dropped, &state).unwrap();
        let sock = dir.path().join("log");
        let rx = std::os::unix::net::UnixDatagram::bind(&sock).unwrap();
        let target = LogTarget::Syslog {
            socket: sock.clone(),
        };
        let r = Record {
            outcome: Some("granted"),
            name: Some("db".into()),
            ..Record::default()
        };
        let no_journal = dir.path().join("no-journal");
        emit_via(&no_journal, &target, &r);
        emit_via(&no_journal, &target, &r);
        let mut got = Vec::new();
        for _ in 0..3 {
            let mut buf = [0u8; 2048];
            let n = rx.recv(&mut buf).unwrap();
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        // <84> = authpriv.warning
        assert!(got[0].starts_with("<84>"), "{got:?}");
        assert!(
            got[0].contains("derived-keys: 2 audit lines were dropped (earlier"),
            "{got:?}"
        );
        assert!(got[0].ends_with(") config=/x.conf"), "{got:?}");
        assert!(got[1].contains("derived-keys: granted"), "{got:?}");
        assert!(got[2].contains("derived-keys: granted"), "{got:?}");
        let note = Note::read(&state).unwrap();
        assert_eq!((note.start, note.reported), (2, 2));
        assert_eq!(note.pid, std::process::id());
        lock().counter = None;
    }

    /// While the writer is stuck (a log socket that takes nothing), the
    /// queue takes its lines at once, and counts those past its room as
    /// dropped, in the counter the broker reports from; once the writer
    /// moves again, the queued lines are written in order.
    #[test]
    fn lines_never_wait_for_a_stuck_writer_and_overflow_is_counted() {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let (_dir, dropped) = counting();
        let (lines, release, started, written) = stuck_writer(&dropped);
        // The first line holds the writer; QUEUED_LINES more fill the
        // queue; five more find no room.
        lines.emit(record(0));
        started.recv().unwrap();
        for i in 1..=QUEUED_LINES + 5 {
            lines.emit(record(i));
        }
        release.send(()).unwrap();
        lines.finish();
        let got: Vec<String> = written.try_iter().collect();
        let want: Vec<String> = (0..=QUEUED_LINES).map(|i| i.to_string()).collect();
        assert_eq!(got, want);
        assert_eq!(std::fs::read(&dropped).unwrap(), b"bbbbb");
        assert_eq!(lock().counter.as_ref().unwrap().why, QUEUE_FULL);
        lock().counter = None;
    }

    /// A drop counter of a test's own, as the broker sets one up.
    fn counting() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let dropped = dir.path().join("x.dropped");
        count_into(Path::new("/x.conf"), &dropped, &dir.path().join("x.audit")).unwrap();
        (dir, dropped)
    }

    fn record(i: usize) -> Record {
        Record {
            outcome: Some("granted"),
            name: Some(i.to_string()),
            ..Record::default()
        }
    }

    /// Lines whose writer takes each line's name, and stops at line "0"
    /// (saying so on `started`) until `release` is sent.
    #[allow(clippy::type_complexity)]
    fn stuck_writer(
        dropped: &Path,
    ) -> (
        Lines,
        std::sync::mpsc::Sender<()>,
        std::sync::mpsc::Receiver<()>,
        std::sync::mpsc::Receiver<String>,
    ) {
        let (release, stuck) = std::sync::mpsc::channel::<()>();
        let (start, started) = std::sync::mpsc::channel::<()>();
        let (wrote, written) = std::sync::mpsc::channel::<String>();
        let lines = Lines::start_with(
            move |r: &Record| {
                if r.name.as_deref() == Some("0") {
                    let _ = start.send(());
                    let _ = stuck.recv();
                }
                let _ = wrote.send(r.name.clone().unwrap_or_default());
            },
            Some(dropped.to_owned()),
        )
        .unwrap();
        (lines, release, started, written)
    }

    /// A broker that stops while its writer is stuck gives it FINISH, then
    /// counts what is left (the line being written and those queued) and
    /// has nothing more written; a line after the stop is counted too.
    #[test]
    fn a_stop_counts_what_a_stuck_writer_left() {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let (_dir, dropped) = counting();
        let (lines, release, started, written) = stuck_writer(&dropped);
        lines.emit(record(0));
        started.recv().unwrap();
        lines.emit(record(1));
        lines.emit(record(2));
        let t = Instant::now();
        lines.finish();
        assert!(t.elapsed() < FINISH * 4, "{:?}", t.elapsed());
        assert_eq!(std::fs::read(&dropped).unwrap(), b"bbb");
        lines.emit(record(3));
        assert_eq!(std::fs::read(&dropped).unwrap(), b"bbbb");
        release.send(()).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        // At most the line it was writing went out; nothing queued did.
        let got: Vec<String> = written.try_iter().collect();
        assert!(got.is_empty() || got == ["0"], "{got:?}");
        lock().counter = None;
    }

    /// Fills `sock`'s queue: datagrams from new sockets until a fresh one
    /// has no room either (one sender's own buffer may fill first, where
    /// net.unix.max_dgram_qlen is large).
    fn fill(sock: &Path) {
        loop {
            let s = std::os::unix::net::UnixDatagram::unbound().unwrap();
            s.set_nonblocking(true).unwrap();
            if s.send_to(b"x", sock).is_err() {
                return;
            }
            while s.send_to(b"x", sock).is_ok() {}
            // Kept open: its datagrams stay charged to it, not freed.
            std::mem::forget(s);
        }
    }

    /// A worker's own write never waits: a syslog socket with no room
    /// leaves the line for later (for the thread) without counting it;
    /// with room again, the line goes out at once.
    #[test]
    fn a_line_written_without_waiting_is_left_for_later_when_the_socket_is_full() {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("log");
        let rx = std::os::unix::net::UnixDatagram::bind(&sock).unwrap();
        fill(&sock);
        let target = LogTarget::Syslog {
            socket: sock.clone(),
        };
        let r = Record {
            outcome: Some("granted"),
            name: Some("db".into()),
            ..Record::default()
        };
        let no_journal = dir.path().join("no-journal");
        let t = Instant::now();
        let got = emit_locked(&mut lock(), &no_journal, &target, &r, Wait::No);
        assert!(matches!(got, Err(NotSent::Later)), "{got:?}");
        assert!(t.elapsed() < SEND_TIMEOUT, "it waited {:?}", t.elapsed());
        let mut buf = [0u8; 2048];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"x");
        assert!(emit_locked(&mut lock(), &no_journal, &target, &r, Wait::No).is_ok());
        rx.set_nonblocking(true).unwrap();
        let lines: Vec<String> = std::iter::from_fn(|| {
            let n = rx.recv(&mut buf).ok()?;
            Some(String::from_utf8_lossy(&buf[..n]).into_owned())
        })
        .collect();
        assert!(
            lines.last().unwrap().contains("derived-keys: granted"),
            "{lines:?}"
        );
    }

    #[test]
    fn kmsg_budget_follows_the_kernels_limit() {
        // Never writes: the window is spent before the first line.
        let mut b = KmsgBudget::new();
        b.window = Some(Instant::now());
        b.used = line::KMSG_BURST;
        b.mode = DevkmsgMode::Ratelimit;
        assert!(b.spent());
        assert_eq!(b.write("x", 6), Err(KmsgRefusal::RateLimited));
        b.mode = DevkmsgMode::Off;
        assert!(b.spent());
        assert_eq!(b.write("x", 6), Err(KmsgRefusal::Off));
        // Room left, no limit, or a new window: not spent.
        b.mode = DevkmsgMode::On;
        assert!(!b.spent());
        b.mode = DevkmsgMode::Ratelimit;
        b.used = line::KMSG_BURST - 1;
        assert!(!b.spent());
        b.used = line::KMSG_BURST;
        b.window = Instant::now().checked_sub(Duration::from_millis(line::KMSG_INTERVAL_MS));
        assert!(!b.spent());
        assert!(!KmsgBudget::new().spent());
        assert!(KmsgRefusal::RateLimited.why().contains("10 lines per 5 s"));
    }
}
