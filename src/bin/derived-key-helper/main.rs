//! derived-key-helper: the request-key(8) handler. Started by
//! /sbin/request-key as root for `derived:*` requests (see the rule file
//! in request-key/), with the authority to instantiate the key.
//!
//! Every request pays for this program's start, so it is small and has no
//! std and no libc start-up (linked statically against musl where it is
//! installed; see build.rs). It reads what the kernel says about the
//! request, hands that to the broker (`derived-keys-broker`, started here
//! when none runs) over [`wire`], and instantiates or rejects the key as
//! the broker answers. It enforces the configured time bound itself: a
//! broker that does not answer in time gets the request rejected with
//! ETIMEDOUT. Every path ends in an answer to the kernel.
//!
//! Usage (from a request-key rule): `derived-key-helper [--config FILE]
//! [--prefix PREFIX] %k %u %g`.
#![no_std]
#![no_main]

#[allow(unsafe_code)]
mod sys;

use core::ffi::{c_char, c_int};
use core::fmt::Write;
use core::sync::atomic::{AtomicI32, Ordering};

use derived_keys_core::audit_line::{self, AuditFields};
use derived_keys_core::errno::{self, exit_errno, EINVAL, EIO, ENODEV, ETIMEDOUT};
use derived_keys_core::handler_args::{parse_args, Args, Cli};
use derived_keys_core::runtime::{write_runtime_path, Fnv, Line, RUN_DIR};
use derived_keys_core::session;
use derived_keys_core::wire::{self, Answer, FieldError, Hello, LogTo, UpcallBuilder, UpcallHead};
use sys::{CPath, Errno, Fd};

const BROKER_EXE: &[u8] = b"derived-keys-broker";
/// The bound until the broker has told us the configured one.
const DEFAULT_BOUND_US: u64 = 5_000_000;
/// Negative-result timeout (seconds, as given to the kernel) until then.
const DEFAULT_NEGATIVE_S: u32 = 2;

/// The key under construction, for the panic handler.
static KEY: AtomicI32 = AtomicI32::new(0);
/// The authorization key and the broker's keyring it is linked into
/// (0 when not linked), for the panic handler.
static LINKED_AUTH: AtomicI32 = AtomicI32::new(0);
static LINKED_RING: AtomicI32 = AtomicI32::new(0);

/// Nothing here should panic; if something does, the requester still gets
/// an answer (EIO) instead of hanging until ENOKEY.
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    let ring = LINKED_RING.load(Ordering::SeqCst);
    if ring != 0 {
        let _ = sys::unlink(LINKED_AUTH.load(Ordering::SeqCst), ring);
    }
    let key = KEY.load(Ordering::SeqCst);
    if key != 0 {
        let _ = sys::reject(key, DEFAULT_NEGATIVE_S, EIO);
    }
    sys::exit(1)
}

/// Only referenced by unoptimized builds of `core`; this program aborts on
/// panic and never unwinds.
// The C runtime's symbols are this program's only entry points.
#[allow(unsafe_code)]
#[no_mangle]
extern "C" fn rust_eh_personality() {}

#[allow(unsafe_code)]
#[no_mangle]
pub extern "C" fn main(argc: c_int, argv: *const *const c_char) -> c_int {
    sys::harden();
    let start = sys::now_us();
    let args = match parse_args(sys::args(argc, argv)) {
        Cli::Run(a) => a,
        Cli::Version => {
            sys::stderr(concat!("derived-key-helper ", env!("CARGO_PKG_VERSION"), "\n").as_bytes());
            return 0;
        }
        Cli::Usage => {
            // Without a key id there is nothing to reject; the kernel
            // gives the requester ENOKEY when we exit.
            sys::stderr(
                b"usage: derived-key-helper [--config FILE] [--prefix PREFIX] KEY UID GID\n\
                  (started by request-key(8); not for running by hand)\n",
            );
            return 2;
        }
    };
    KEY.store(args.key, Ordering::SeqCst);
    let Some(buffers) = sys::buffers() else {
        // Taken once, here: cannot happen.
        let _ = sys::reject(args.key, DEFAULT_NEGATIVE_S, EIO);
        return 1;
    };
    // What the broker sends: its hello, then the answer and its payload.
    let inbox = &mut buffers.inbox;
    let mut session = Session {
        negative_s: DEFAULT_NEGATIVE_S,
        log: None,
    };
    let status = match request(&args, start, inbox, &mut buffers.upcall, &mut session) {
        Ok((answer, body)) if answer.errno == 0 => {
            let bytes = &inbox[body];
            let result = if answer.timeout_s > 0 {
                sys::set_timeout(args.key, answer.timeout_s)
            } else {
                Ok(())
            }
            .and_then(|()| sys::instantiate(args.key, bytes));
            sys::wipe(inbox);
            match result {
                Ok(()) => 0,
                Err(e) => instantiate_failed(&args, &session, e),
            }
        }
        // The broker decided, and logged the refusal.
        Ok((answer, _)) => {
            let _ = sys::reject(args.key, answer.timeout_s, answer.errno.into());
            1
        }
        Err(fail) => failed(&args, &session, fail),
    };
    sys::wipe(inbox);
    status
}

// The failures' lines are built out of main's frame: its size is stack
// every request touches (a page fault per page, a few microseconds on a
// VM).

#[cold]
#[inline(never)]
fn instantiate_failed(args: &Args<'_>, session: &Session, Errno(e): Errno) -> c_int {
    let _ = sys::reject(args.key, DEFAULT_NEGATIVE_S, EIO);
    let mut r = Line::new();
    let _ = write!(r, "instantiating the key failed: errno {e}");
    audit(session.log.as_ref(), args, "EIO", r.as_bytes());
    1
}

#[cold]
#[inline(never)]
fn failed(args: &Args<'_>, session: &Session, fail: Fail) -> c_int {
    let errno = fail.errno();
    let _ = sys::reject(args.key, session.negative_s, errno);
    let name = errno::name(errno);
    let mut reason = Line::new();
    fail.reason(&mut reason);
    audit(session.log.as_ref(), args, name, reason.as_bytes());
    1
}

/// Why this handler answered by itself, without the broker's verdict.
#[derive(Debug, Clone, Copy)]
enum Fail {
    Describe(i32),
    NoAuthKey(i32),
    Callout(i32),
    TooLarge,
    Connect(i32),
    Link(i32),
    NoBrokerExe,
    ConfigPath,
    Spawn(i32),
    BrokerExit(i32),
    Socket(i32),
    Closed(i32),
    Protocol,
    TimedOut,
}

impl Fail {
    fn errno(self) -> i32 {
        match self {
            Fail::TimedOut => ETIMEDOUT,
            Fail::TooLarge => EINVAL,
            Fail::ConfigPath => ENODEV,
            Fail::BrokerExit(code) => exit_errno(code),
            _ => EIO,
        }
    }

    fn reason(self, w: &mut Line) {
        let _ = match self {
            Fail::Describe(e) => write!(w, "cannot describe the key: errno {e}"),
            Fail::NoAuthKey(e) => write!(w, "no authorization key: errno {e}"),
            Fail::Callout(e) => write!(w, "cannot read the callout info: errno {e}"),
            Fail::TooLarge => write!(w, "request too large for the broker protocol"),
            Fail::Connect(e) => write!(w, "cannot connect to the broker: errno {e}"),
            Fail::Link(e) => write!(
                w,
                "cannot link the authorization key into the broker's keyring: errno {e}"
            ),
            Fail::NoBrokerExe => write!(w, "cannot find the broker executable"),
            Fail::ConfigPath => write!(w, "unusable configuration path"),
            Fail::Spawn(e) => write!(w, "cannot start the broker: errno {e}"),
            Fail::BrokerExit(c) => write!(w, "the broker could not start (exit code {c})"),
            Fail::Socket(e) => write!(w, "broker socket: errno {e}"),
            Fail::Closed(e) => write!(w, "the broker closed the connection (errno {e})"),
            Fail::Protocol => write!(w, "malformed answer from the broker"),
            Fail::TimedOut => write!(w, "the request did not finish within the configured bound"),
        };
    }
}

/// What the broker's hello said, for answering by ourselves.
struct Session {
    negative_s: u32,
    log: Option<LogConf>,
}

#[derive(Clone, Copy)]
struct LogConf {
    to: LogTo,
    path: [u8; wire::MAX_LOG_PATH],
    path_len: usize,
}

/// The most the broker sends on a connection.
pub(crate) const INBOX: usize = wire::MAX_HELLO + wire::ANSWER_HEADER + wire::MAX_PAYLOAD;

/// Takes the possessor's view away from the session keyring this process
/// runs in if it is the one the kernel made for this request, `_req.<key>`
/// (see `derived_keys_core::session`): under a stream of requests, about
/// a third fewer keyring searches in every read of /proc/keys. Best
/// effort, after the kernel's facts are read; `scratch` holds the
/// keyring's description meanwhile.
fn unview_request_session(key: i32, scratch: &mut [u8]) {
    let Ok(n) = sys::describe(sys::SESSION_KEYRING, scratch) else {
        return;
    };
    if let Some(perm) = session::without_possessor_view(&scratch[..n], key) {
        let _ = sys::set_perm(sys::SESSION_KEYRING, perm);
    }
}

/// A failed field of the upcall: the kernel's error (as `fail`), or too
/// large for the protocol.
fn field_fail(e: FieldError<Errno>, fail: fn(i32) -> Fail) -> Fail {
    match e {
        FieldError::Fill(Errno(e)) => fail(e),
        FieldError::TooLarge => Fail::TooLarge,
    }
}

/// The whole exchange: the answer and where in `inbox` its payload is.
fn request(
    args: &Args<'_>,
    start: u64,
    inbox: &mut [u8; INBOX],
    msg: &mut [u8; wire::MAX_UPCALL],
    session: &mut Session,
) -> Result<(Answer, core::ops::Range<usize>), Fail> {
    // 1. What the kernel says, read straight into the upcall. Who asked
    // is the broker's to find, in /proc/keys (the authorization key's
    // line names the requesting thread).
    let up = UpcallBuilder::new(msg, args.prefix).ok_or(Fail::TooLarge)?;
    let up = up
        .describe(|room| sys::describe(args.key, room))
        .map_err(|e| field_fail(e, Fail::Describe))?;
    let auth = sys::auth_key().map_err(|Errno(e)| Fail::NoAuthKey(e))?;
    let up = up
        .callout(|room| sys::read_key(auth, room))
        .map_err(|e| field_fail(e, Fail::Callout))?;
    unview_request_session(args.key, inbox);
    let n = up.finish(&UpcallHead {
        key: args.key,
        uid: args.uid,
        gid: args.gid,
        auth,
        started_us: start,
    });

    // 2. The broker: its hello first, which names the keyring to link the
    // authorization key into, so that the broker's view of /proc/keys
    // lists it; then the upcall.
    let mut deadline = start + DEFAULT_BOUND_US;
    let mut attempts = 0;
    let mut got = Received::default();
    let conn = loop {
        let conn = connect_broker(args, deadline, inbox)?;
        match got.read_until(&conn, inbox, Hello::FIXED) {
            Ok(()) => break conn,
            // Closed before any worker took the connection: that broker
            // was stopping (idle, or a TPM password to re-read). Nothing
            // was decided; go again, to its successor.
            Err(Errno(e)) if e != sys::EAGAIN && attempts < 3 => {
                attempts += 1;
                got = Received::default();
                sys::sleep_us(1000);
            }
            Err(e) => return Err(exchange_fail(e, deadline)),
        }
    };
    let hlen = Hello::len(&inbox[..Hello::FIXED]).ok_or(Fail::Protocol)?;
    got.at_least(&conn, inbox, hlen, deadline)?;
    let hello = Hello::decode(&inbox[..hlen]).ok_or(Fail::Protocol)?;
    let mut log = LogConf {
        to: hello.log,
        path: [0; wire::MAX_LOG_PATH],
        path_len: hello.log_path.len(),
    };
    log.path[..hello.log_path.len()].copy_from_slice(hello.log_path);
    session.log = Some(log);
    session.negative_s = hello.negative_s;
    deadline = start + u64::from(hello.bound_ms) * 1000;
    // Unlinked when this function returns, before the key is instantiated
    // (which revokes the authorization key). Without the link the broker's
    // view would not list the real line, and a line forged in one of the
    // requester's own keys could stand alone: no link, no request.
    let _linked = Linked::new(auth, hello.keys_ring)?;
    conn.write_all(&msg[..n])
        .map_err(|e| exchange_fail(e, deadline))?;

    // 3. Its answer, within the bound: the receive timeout is the
    // broker's bound from here on, set before the first read that waits.
    got.bound_set = false;
    let head_end = hlen + wire::ANSWER_HEADER;
    got.at_least(&conn, inbox, head_end, deadline)?;
    let mut head = [0u8; wire::ANSWER_HEADER];
    head.copy_from_slice(&inbox[hlen..head_end]);
    let answer = Answer::decode(&head).ok_or(Fail::Protocol)?;
    let body = head_end..head_end + usize::from(answer.len);
    if body.end > INBOX {
        return Err(Fail::Protocol);
    }
    got.at_least(&conn, inbox, body.end, deadline)?;
    Ok((answer, body))
}

/// The authorization key linked into the broker's keyring, for as long as
/// this lives.
struct Linked {
    auth: i32,
    ring: i32,
}

impl Linked {
    fn new(auth: i32, ring: i32) -> Result<Linked, Fail> {
        if ring == 0 {
            return Err(Fail::Protocol);
        }
        sys::link(auth, ring).map_err(|Errno(e)| Fail::Link(e))?;
        LINKED_AUTH.store(auth, Ordering::SeqCst);
        LINKED_RING.store(ring, Ordering::SeqCst);
        Ok(Linked { auth, ring })
    }
}

impl Drop for Linked {
    fn drop(&mut self) {
        LINKED_RING.store(0, Ordering::SeqCst);
        let _ = sys::unlink(self.auth, self.ring);
    }
}

/// How much of what the broker sent has been read into the inbox.
struct Received {
    have: usize,
    /// Whether the connection's receive timeout is what is left until
    /// the current deadline.
    bound_set: bool,
}

impl Default for Received {
    /// Before the hello, connect_broker has set the timeouts.
    fn default() -> Received {
        Received {
            have: 0,
            bound_set: true,
        }
    }
}

impl Received {
    /// Reads until the inbox holds at least `n` bytes, each read taking
    /// as much as has arrived (usually the whole answer at once).
    fn read_until(&mut self, conn: &Fd, inbox: &mut [u8], n: usize) -> Result<(), Errno> {
        while self.have < n {
            match conn.read(&mut inbox[self.have..])? {
                0 => return Err(Errno(EIO)),
                k => self.have += k,
            }
        }
        Ok(())
    }

    /// [`Received::read_until`] within `deadline`: the receive timeout is
    /// brought to it before a read has to wait.
    fn at_least(
        &mut self,
        conn: &Fd,
        inbox: &mut [u8],
        n: usize,
        deadline: u64,
    ) -> Result<(), Fail> {
        if self.have < n && !self.bound_set {
            conn.set_receive_timeout(left(deadline)?)
                .map_err(|Errno(e)| Fail::Socket(e))?;
            self.bound_set = true;
        }
        self.read_until(conn, inbox, n)
            .map_err(|e| exchange_fail(e, deadline))
    }
}

fn left(deadline: u64) -> Result<u64, Fail> {
    match deadline.checked_sub(sys::now_us()) {
        Some(us) if us > 0 => Ok(us),
        _ => Err(Fail::TimedOut),
    }
}

/// A failed read or write on the broker connection: a timeout, or the
/// broker went away (which, past the deadline, is a timeout too).
fn exchange_fail(Errno(e): Errno, deadline: u64) -> Fail {
    if e == sys::EAGAIN || sys::now_us() >= deadline {
        Fail::TimedOut
    } else {
        Fail::Closed(e)
    }
}

/// The broker's socket: named by the configuration's path and content, so
/// an edited configuration gets a fresh broker. None if the file cannot be
/// read. `chunk` is room to read the file in.
fn socket_path(config: &[u8], chunk: &mut [u8]) -> Option<CPath> {
    runtime_file(config, "sock", chunk)
}

/// A runtime file (`ext`) of the broker serving the configuration at
/// `config`, named as the library's `broker::paths` names it. The file is
/// read through `chunk`: on a request, the inbox, whose page the hello
/// touches anyway (a buffer of its own on the stack would be a page fault
/// more, a few microseconds on a VM).
fn runtime_file(config: &[u8], ext: &str, chunk: &mut [u8]) -> Option<CPath> {
    let path = CPath::new(&[config])?;
    let f = Fd::open_path(&path, false).ok()?;
    let mut h = Fnv::default();
    h.feed(config);
    loop {
        match f.read(chunk).ok()? {
            0 => break,
            n => h.feed(&chunk[..n]),
        }
    }
    CPath::format(|w| write_runtime_path(w, h.0, ext))
}

fn broker_exe() -> Option<CPath> {
    let mut buf = [0u8; 240];
    let n = sys::self_exe(&mut buf).ok()?;
    let dir = buf[..n].rsplitn(2, |&b| b == b'/').nth(1)?;
    CPath::new(&[dir, b"/", BROKER_EXE])
}

/// The broker this handler started, if any.
enum Child {
    None,
    Running(i32),
    /// It exited at once, leaving the work to another broker (at this time).
    Yielded(u64),
}

/// Connects to the broker for this configuration, starting one if none
/// listens. A broker that cannot serve exits with the errno to answer.
fn connect_broker(args: &Args<'_>, deadline: u64, chunk: &mut [u8]) -> Result<Fd, Fail> {
    let sock = socket_path(args.config, chunk);
    let mut child = Child::None;
    loop {
        if let Some(p) = &sock {
            match sys::connect_stream(p.bytes(), left(deadline)?) {
                Ok(fd) => return Ok(fd),
                Err(Errno(sys::ENOENT | sys::ECONNREFUSED)) => {}
                Err(Errno(sys::EAGAIN)) => return Err(Fail::TimedOut),
                Err(Errno(e)) => return Err(Fail::Connect(e)),
            }
        }
        match child {
            Child::None => child = Child::Running(start_broker(args)?),
            Child::Running(pid) => {
                if let Some(code) = sys::try_wait(pid) {
                    if code != 0 || sock.is_none() {
                        return Err(Fail::BrokerExit(code));
                    }
                    // 0: another broker holds this configuration. It may
                    // be on its way out: if it never listens, start
                    // another one after a moment.
                    child = Child::Yielded(sys::now_us());
                }
            }
            Child::Yielded(at) => {
                if sys::now_us().saturating_sub(at) > 20_000 {
                    child = Child::None;
                }
            }
        }
        if sys::now_us() >= deadline {
            return Err(Fail::TimedOut);
        }
        sys::sleep_us(500);
    }
}

/// Starts a broker for the configuration; its pid. Out of line: its paths
/// are stack that only the first request after an idle period needs.
#[cold]
#[inline(never)]
fn start_broker(args: &Args<'_>) -> Result<i32, Fail> {
    let exe = broker_exe().ok_or(Fail::NoBrokerExe)?;
    let config = CPath::new(&[args.config]).ok_or(Fail::ConfigPath)?;
    let flag = CPath::new(&[b"--config"]).ok_or(Fail::ConfigPath)?;
    sys::spawn(&exe, &[&exe, &flag, &config]).map_err(|Errno(e)| Fail::Spawn(e))
}

/// The audit line for a request this handler answered itself, in the
/// broker's format and escaping (one function, in the core crate), to
/// where the broker said (syslog if it did not) and in the broker's order:
/// the journal's native socket, the syslog socket, the kernel log. This
/// process writes one line, on a /dev/kmsg file of its own, so the
/// kernel's per-file rate limit (10 lines per 5 s) never discards it; but
/// `printk_devkmsg=off` discards every line while reporting it written,
/// so then the kernel log is not tried. A line no channel takes is
/// counted in the broker's counter file (reported by the broker in its
/// next line, and by `dkey status`), and goes to standard error.
fn audit(log: Option<&LogConf>, args: &Args<'_>, outcome: &str, reason: &[u8]) {
    let mut line = Line::new();
    AuditFields {
        outcome,
        uid: Some(args.uid),
        reason: Some(reason),
        ..AuditFields::default()
    }
    .write(&mut |b| line.push(b));
    let (to, path) = match log {
        Some(l) if !(l.to == LogTo::Syslog && l.path_len == 0) => (l.to, &l.path[..l.path_len]),
        Some(l) => (l.to, &b"/dev/log"[..]),
        None => (LogTo::Syslog, &b"/dev/log"[..]),
    };
    let sent = match to {
        LogTo::Syslog => journal(&line) || syslog(path, &line) || kmsg(&line),
        LogTo::Kmsg => kmsg(&line),
        LogTo::Stderr => false,
    };
    if !sent {
        if to != LogTo::Stderr {
            count_dropped(args.config);
        }
        line.push(b"\n");
        sys::stderr(line.as_bytes());
    }
}

/// Sends give up after this long: a stalled log daemon must not hold up
/// the requester.
const SEND_TIMEOUT_US: u64 = 250_000;

fn journal(line: &Line) -> bool {
    let mut entry = Line::new();
    audit_line::write_journal(
        line.as_bytes(),
        audit_line::SEVERITY_REFUSED,
        "derived-key-helper",
        u32::try_from(sys::pid()).unwrap_or(0),
        &mut |b| entry.push(b),
    );
    // A cut entry would be thrown away by journald after a successful
    // send: never send one. A `Line` cuts at its end, so the final newline
    // is there only if everything before it is (the message has none).
    entry.as_bytes().last() == Some(&b'\n')
        && sys::send_datagram(
            audit_line::JOURNAL_SOCKET.as_bytes(),
            entry.as_bytes(),
            SEND_TIMEOUT_US,
        )
        .is_ok()
}

fn syslog(path: &[u8], line: &Line) -> bool {
    let pri = audit_line::AUTHPRIV * 8 + audit_line::SEVERITY_REFUSED;
    let mut msg = Line::new();
    let _ = write!(msg, "<{pri}>derived-key-helper[{}]: ", sys::pid());
    msg.push(line.as_bytes());
    sys::send_datagram(path, msg.as_bytes(), SEND_TIMEOUT_US).is_ok()
}

fn kmsg(line: &Line) -> bool {
    if devkmsg_off() {
        return false;
    }
    let Some(path) = CPath::new(&[b"/dev/kmsg"]) else {
        return false;
    };
    let Ok(f) = Fd::open_path(&path, true) else {
        return false;
    };
    let mut msg = Line::new();
    let pri = audit_line::AUTHPRIV * 8 + audit_line::SEVERITY_REFUSED;
    let _ = write!(msg, "<{pri}>");
    msg.push(line.as_bytes());
    msg.push(b"\n");
    f.write_all(msg.as_bytes()).is_ok()
}

/// `printk_devkmsg=off`: the kernel discards what /dev/kmsg writers write.
fn devkmsg_off() -> bool {
    let Ok(f) = Fd::open_read(c"/proc/sys/kernel/printk_devkmsg") else {
        return false;
    };
    let mut buf = [0u8; 16];
    matches!(f.read(&mut buf), Ok(n) if buf[..n].starts_with(b"off"))
}

/// One more line nobody took, in the counter the broker of this
/// configuration reports from (one byte per line, appended atomically).
fn count_dropped(config: &[u8]) {
    let mut chunk = [0u8; 512];
    let Some(path) = runtime_file(config, audit_line::DROPPED_EXT, &mut chunk) else {
        return;
    };
    // The broker creates the runtime directory; none may have run yet.
    if let Some(dir) = CPath::new(&[RUN_DIR.as_bytes()]) {
        let _ = sys::mkdir_private(&dir);
    }
    if let Ok(f) = Fd::open_append(&path) {
        let _ = f.write_all(b"h");
    }
}
