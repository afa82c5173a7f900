//! Every system call the handler makes, and the only `unsafe` in it.
//!
//! The handler has no std: these are the C library's wrappers (musl's,
//! linked statically, or the system's), declared here by hand so that no
//! crate drags in another libc. Each wrapper checks what the kernel
//! returns and turns failures into an errno.

use core::ffi::{c_char, c_int, c_long, c_uint, c_void, CStr};
use core::sync::atomic::{AtomicBool, Ordering};

use derived_keys_core::wire;

/// An errno, as the kernel reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

pub const ENOENT: i32 = 2;
pub const EINTR: i32 = 4;
pub const EIO: i32 = 5;
pub const E2BIG: i32 = 7;
pub const EAGAIN: i32 = 11;
pub const EINVAL: i32 = 22;
pub const ECONNREFUSED: i32 = 111;

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}

#[repr(C)]
struct Timeval {
    sec: i64,
    usec: i64,
}

#[repr(C)]
struct Rlimit {
    cur: u64,
    max: u64,
}

#[repr(C)]
struct SockaddrUn {
    family: u16,
    path: [u8; 108],
}

extern "C" {
    fn syscall(n: c_long, ...) -> c_long;
    fn read(fd: c_int, buf: *mut c_void, n: usize) -> isize;
    fn write(fd: c_int, buf: *const c_void, n: usize) -> isize;
    fn mkdir(path: *const c_char, mode: c_uint) -> c_int;
    fn close(fd: c_int) -> c_int;
    fn socket(domain: c_int, ty: c_int, proto: c_int) -> c_int;
    fn connect(fd: c_int, addr: *const c_void, len: u32) -> c_int;
    fn setsockopt(fd: c_int, level: c_int, name: c_int, val: *const c_void, len: u32) -> c_int;
    fn sendto(
        fd: c_int,
        buf: *const c_void,
        n: usize,
        flags: c_int,
        addr: *const c_void,
        len: u32,
    ) -> isize;
    fn nanosleep(req: *const Timespec, rem: *mut Timespec) -> c_int;
    fn fork() -> c_int;
    fn execve(path: *const c_char, argv: *const *const c_char, envp: *const *const c_char)
        -> c_int;
    fn waitpid(pid: c_int, status: *mut c_int, options: c_int) -> c_int;
    fn readlink(path: *const c_char, buf: *mut c_char, n: usize) -> isize;
    fn prctl(op: c_int, ...) -> c_int;
    fn setrlimit(resource: c_int, limit: *const Rlimit) -> c_int;
    fn getpid() -> c_int;
    fn signal(sig: c_int, handler: usize) -> usize;
    fn __errno_location() -> *mut c_int;
    fn _exit(code: c_int) -> !;
    static environ: *const *const c_char;
}

// Numbers from the libc crate (constants only: nothing of it is linked).
const SYS_KEYCTL: c_long = libc::SYS_keyctl;
const SYS_CLOCK_GETTIME: c_long = libc::SYS_clock_gettime;
const KEYCTL_GET_KEYRING_ID: c_long = libc::KEYCTL_GET_KEYRING_ID as c_long;
const KEYCTL_DESCRIBE: c_long = libc::KEYCTL_DESCRIBE as c_long;
const KEYCTL_READ: c_long = libc::KEYCTL_READ as c_long;
const KEYCTL_INSTANTIATE: c_long = libc::KEYCTL_INSTANTIATE as c_long;
const KEYCTL_SET_TIMEOUT: c_long = libc::KEYCTL_SET_TIMEOUT as c_long;
const KEYCTL_REJECT: c_long = libc::KEYCTL_REJECT as c_long;
const KEYCTL_LINK: c_long = libc::KEYCTL_LINK as c_long;
const KEYCTL_SETPERM: c_long = libc::KEYCTL_SETPERM as c_long;
const KEYCTL_UNLINK: c_long = libc::KEYCTL_UNLINK as c_long;
const O_RDONLY: c_int = libc::O_RDONLY as c_int;
const O_WRONLY: c_int = libc::O_WRONLY as c_int;
const O_CLOEXEC: c_int = libc::O_CLOEXEC as c_int;
const O_APPEND: c_int = libc::O_APPEND as c_int;
const O_CREAT: c_int = libc::O_CREAT as c_int;
const O_NOFOLLOW: c_int = libc::O_NOFOLLOW as c_int;
const AF_UNIX: c_int = libc::AF_UNIX as c_int;
const SOCK_STREAM: c_int = libc::SOCK_STREAM as c_int;
const SOCK_DGRAM: c_int = libc::SOCK_DGRAM as c_int;
const SOCK_CLOEXEC: c_int = libc::SOCK_CLOEXEC as c_int;
const SOL_SOCKET: c_int = libc::SOL_SOCKET as c_int;
const SO_RCVTIMEO: c_int = libc::SO_RCVTIMEO as c_int;
const SO_SNDTIMEO: c_int = libc::SO_SNDTIMEO as c_int;
const MSG_NOSIGNAL: c_int = libc::MSG_NOSIGNAL as c_int;
const CLOCK_MONOTONIC: c_int = libc::CLOCK_MONOTONIC as c_int;
const WNOHANG: c_int = libc::WNOHANG as c_int;
const PR_SET_DUMPABLE: c_int = libc::PR_SET_DUMPABLE as c_int;
const RLIMIT_CORE: c_int = libc::RLIMIT_CORE as c_int;

fn errno() -> Errno {
    // SAFETY: __errno_location returns this thread's errno slot, valid
    // for the thread's lifetime.
    Errno(unsafe { *__errno_location() })
}

fn check(ret: c_long) -> Result<usize, Errno> {
    usize::try_from(ret).map_err(|_| errno())
}

/// A NUL-terminated path built from bytes, without allocation.
pub struct CPath {
    buf: [u8; 256],
}

impl CPath {
    /// None if too long or holding a NUL.
    pub fn new(parts: &[&[u8]]) -> Option<CPath> {
        CPath::format(|w| {
            for p in parts {
                w.push(p)?;
            }
            Ok(())
        })
    }

    /// A path written with `core::fmt`; None if too long or holding a NUL.
    pub fn format(f: impl FnOnce(&mut PathWriter) -> core::fmt::Result) -> Option<CPath> {
        let mut w = PathWriter {
            buf: [0; 256],
            len: 0,
        };
        f(&mut w).ok()?;
        // At least one NUL must remain after the bytes.
        (w.len < w.buf.len()).then_some(CPath { buf: w.buf })
    }

    fn ptr(&self) -> *const c_char {
        self.buf.as_ptr().cast()
    }

    pub fn bytes(&self) -> &[u8] {
        let n = self.buf.iter().position(|&b| b == 0).unwrap_or(0);
        &self.buf[..n]
    }
}

/// What [`CPath::format`] writes into.
pub struct PathWriter {
    buf: [u8; 256],
    len: usize,
}

impl PathWriter {
    fn push(&mut self, b: &[u8]) -> core::fmt::Result {
        if b.contains(&0) {
            return Err(core::fmt::Error);
        }
        let end = self.len + b.len();
        self.buf
            .get_mut(self.len..end)
            .ok_or(core::fmt::Error)?
            .copy_from_slice(b);
        self.len = end;
        Ok(())
    }
}

impl core::fmt::Write for PathWriter {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.push(s.as_bytes())
    }
}

// ---------------------------------------------------------------- process

/// The command line, as byte strings that live as long as the process.
pub fn args(argc: c_int, argv: *const *const c_char) -> impl Iterator<Item = &'static [u8]> {
    let n = usize::try_from(argc).unwrap_or(0);
    (0..n).filter_map(move |i| {
        // SAFETY: the C runtime passes argc valid, NUL-terminated strings
        // in argv, which stay alive and unchanged until the process exits.
        unsafe {
            let p = *argv.add(i);
            (!p.is_null()).then(|| CStr::from_ptr(p).to_bytes())
        }
    })
}

/// No core dumps and no ptrace by non-root: key material stays in memory.
/// A broker that goes away mid-write gives EPIPE, not a fatal SIGPIPE.
pub fn harden() {
    const SIGPIPE: c_int = 13;
    const SIG_IGN: usize = 1;
    let zero = Rlimit { cur: 0, max: 0 };
    // SAFETY: integer arguments; `zero` outlives the call.
    unsafe {
        prctl(
            PR_SET_DUMPABLE,
            0 as c_long,
            0 as c_long,
            0 as c_long,
            0 as c_long,
        );
        setrlimit(RLIMIT_CORE, &zero);
        signal(SIGPIPE, SIG_IGN);
    }
}

/// openat(2) itself: musl's open() follows an O_CLOEXEC open with an
/// fcntl(F_SETFD) for kernels before 2.6.23, one more syscall on every
/// request for nothing.
fn open_at(path: *const c_char, flags: c_int, mode: c_uint) -> Result<Fd, Errno> {
    // SAFETY: `path` is NUL-terminated (a CStr's or a CPath's pointer, alive
    // for the call); the mode is read only with O_CREAT.
    let n = unsafe {
        syscall(
            libc::SYS_openat,
            libc::AT_FDCWD as c_long,
            path,
            flags as c_long,
            mode as c_long,
        )
    };
    let n = check(n)?;
    c_int::try_from(n).map(Fd).map_err(|_| Errno(EIO))
}

pub fn pid() -> i32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { getpid() }
}

/// Monotonic time in microseconds, by the system call: the vDSO's
/// clock_gettime costs two page faults (its code and its data page) on
/// first use, ~5 µs on a VM, and the handler reads the clock a few times.
pub fn now_us() -> u64 {
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { syscall(SYS_CLOCK_GETTIME, CLOCK_MONOTONIC as c_long, &mut ts) };
    u64::try_from(ts.sec).unwrap_or(0) * 1_000_000 + u64::try_from(ts.nsec).unwrap_or(0) / 1000
}

pub fn sleep_us(us: u64) {
    let ts = Timespec {
        sec: i64::try_from(us / 1_000_000).unwrap_or(0),
        nsec: i64::try_from((us % 1_000_000) * 1000).unwrap_or(0),
    };
    // SAFETY: valid request; no remainder wanted.
    unsafe { nanosleep(&ts, core::ptr::null_mut()) };
}

/// The path of this executable, into `buf`; the length.
pub fn self_exe(buf: &mut [u8]) -> Result<usize, Errno> {
    // SAFETY: readlink writes at most buf.len() bytes into buf.
    let n = unsafe {
        readlink(
            c"/proc/self/exe".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = check(n as c_long)?;
    // A full buffer may mean a truncated path.
    if n >= buf.len() {
        return Err(Errno(E2BIG));
    }
    Ok(n)
}

/// Starts `exe` with `args` (argv[0] included) and our environment.
pub fn spawn(exe: &CPath, args: &[&CPath]) -> Result<i32, Errno> {
    let mut argv: [*const c_char; 8] = [core::ptr::null(); 8];
    if args.len() >= argv.len() {
        return Err(Errno(E2BIG));
    }
    for (slot, a) in argv.iter_mut().zip(args) {
        *slot = a.ptr();
    }
    // SAFETY: fork has no memory arguments. In the child only execve and
    // _exit run (both async-signal-safe); argv and the paths were built
    // before the fork and stay valid; environ is the C runtime's.
    unsafe {
        let pid = fork();
        if pid == 0 {
            execve(exe.ptr(), argv.as_ptr(), environ);
            _exit(127);
        }
        if pid < 0 {
            return Err(errno());
        }
        Ok(pid)
    }
}

/// The exit code of child `pid` if it has ended (-1 if killed by a signal).
pub fn try_wait(pid: i32) -> Option<i32> {
    let mut status: c_int = 0;
    // SAFETY: `status` is a valid, writable int.
    let r = unsafe { waitpid(pid, &mut status, WNOHANG) };
    if r != pid {
        return None;
    }
    Some(if status & 0x7f == 0 {
        (status >> 8) & 0xff
    } else {
        -1
    })
}

/// The handler's two message buffers, in .bss: the kernel maps its pages
/// at first touch, so a request pays only for the bytes it writes (a
/// page or two). On the stack, the frame's probe would fault in all of
/// its pages at once, ~2.5 µs each on a VM, where the static floor's
/// handler faults five pages in all.
#[repr(C)]
pub struct Buffers {
    /// What the broker sends: its hello, the answer and its payload.
    pub inbox: [u8; crate::INBOX],
    /// The upcall, built in place (after the inbox, so that its first
    /// bytes share a page with the inbox's end).
    pub upcall: [u8; wire::MAX_UPCALL],
}

static mut BUFFERS: Buffers = Buffers {
    inbox: [0; crate::INBOX],
    upcall: [0; wire::MAX_UPCALL],
};
static BUFFERS_TAKEN: AtomicBool = AtomicBool::new(false);

/// The buffers, the first time only (None after).
pub fn buffers() -> Option<&'static mut Buffers> {
    if BUFFERS_TAKEN.swap(true, Ordering::SeqCst) {
        return None;
    }
    // SAFETY: the swap above lets exactly one caller get here, so this is
    // the only reference ever made to BUFFERS; the program has one thread.
    Some(unsafe { &mut *core::ptr::addr_of_mut!(BUFFERS) })
}

/// Overwrites `buf` with zeros in a way the compiler cannot elide.
pub fn wipe(buf: &mut [u8]) {
    for b in buf.iter_mut() {
        // SAFETY: `b` is a valid, exclusive reference to one byte.
        unsafe { core::ptr::write_volatile(b, 0) };
    }
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
}

// ---------------------------------------------------------------- keys

fn keyctl(op: c_long, a: c_long, b: c_long, c: c_long, d: c_long) -> Result<usize, Errno> {
    // SAFETY: callers pass integers, or pointers with their true lengths.
    check(unsafe { syscall(SYS_KEYCTL, op, a, b, c, d) })
}

/// KEYCTL_DESCRIBE into `buf`: the length without the NUL.
pub fn describe(key: i32, buf: &mut [u8]) -> Result<usize, Errno> {
    let ptr = buf.as_mut_ptr() as c_long;
    let n = keyctl(KEYCTL_DESCRIBE, key.into(), ptr, buf.len() as c_long, 0)?;
    // The kernel reports the full size even when it did not fit.
    if n == 0 || n > buf.len() {
        return Err(Errno(E2BIG));
    }
    Ok(n - 1)
}

/// The instantiation authorization key this process holds.
pub fn auth_key() -> Result<i32, Errno> {
    const REQKEY_AUTH_KEY: c_long = -7;
    let n = keyctl(KEYCTL_GET_KEYRING_ID, REQKEY_AUTH_KEY, 0, 0, 0)?;
    i32::try_from(n).map_err(|_| Errno(EINVAL))
}

/// KEYCTL_READ of `key` into `buf`: the length.
pub fn read_key(key: i32, buf: &mut [u8]) -> Result<usize, Errno> {
    let ptr = buf.as_mut_ptr() as c_long;
    let n = keyctl(KEYCTL_READ, key.into(), ptr, buf.len() as c_long, 0)?;
    if n > buf.len() {
        return Err(Errno(E2BIG));
    }
    Ok(n)
}

/// KEYCTL_LINK: `key` into `keyring`.
pub fn link(key: i32, keyring: i32) -> Result<(), Errno> {
    keyctl(KEYCTL_LINK, key.into(), keyring.into(), 0, 0).map(|_| ())
}

/// KEYCTL_UNLINK: `key` out of `keyring`.
pub fn unlink(key: i32, keyring: i32) -> Result<(), Errno> {
    keyctl(KEYCTL_UNLINK, key.into(), keyring.into(), 0, 0).map(|_| ())
}

/// The calling process's session keyring, as a key id.
pub const SESSION_KEYRING: i32 = libc::KEY_SPEC_SESSION_KEYRING;

/// KEYCTL_SETPERM.
pub fn set_perm(key: i32, perm: u32) -> Result<(), Errno> {
    keyctl(KEYCTL_SETPERM, key.into(), perm.into(), 0, 0).map(|_| ())
}

pub fn set_timeout(key: i32, seconds: u32) -> Result<(), Errno> {
    keyctl(KEYCTL_SET_TIMEOUT, key.into(), seconds.into(), 0, 0).map(|_| ())
}

pub fn instantiate(key: i32, payload: &[u8]) -> Result<(), Errno> {
    let ptr = payload.as_ptr() as c_long;
    keyctl(
        KEYCTL_INSTANTIATE,
        key.into(),
        ptr,
        payload.len() as c_long,
        0,
    )
    .map(|_| ())
}

pub fn reject(key: i32, timeout_s: u32, errno: i32) -> Result<(), Errno> {
    keyctl(KEYCTL_REJECT, key.into(), timeout_s.into(), errno.into(), 0).map(|_| ())
}

// ---------------------------------------------------------------- files and sockets

/// An owned file descriptor, closed on drop.
pub struct Fd(c_int);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor and close it once.
        unsafe { close(self.0) };
    }
}

fn fd(ret: c_int) -> Result<Fd, Errno> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(Fd(ret))
    }
}

impl Fd {
    pub fn open_read(path: &CStr) -> Result<Fd, Errno> {
        open_at(path.as_ptr(), O_RDONLY | O_CLOEXEC, 0)
    }

    pub fn open_path(path: &CPath, write: bool) -> Result<Fd, Errno> {
        let flags = if write { O_WRONLY } else { O_RDONLY };
        open_at(path.ptr(), flags | O_CLOEXEC, 0)
    }

    /// For appending (audit counter), created root-only if missing;
    /// never through a symlink.
    pub fn open_append(path: &CPath) -> Result<Fd, Errno> {
        let flags = O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC;
        open_at(path.ptr(), flags, 0o600)
    }

    /// One read; 0 at end of file. Retries on EINTR.
    pub fn read(&self, buf: &mut [u8]) -> Result<usize, Errno> {
        loop {
            // SAFETY: read writes at most buf.len() bytes into buf.
            let n = unsafe { read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
            match check(n as c_long) {
                Err(Errno(EINTR)) => continue,
                Ok(n) if n > buf.len() => return Err(Errno(EIO)),
                other => return other,
            }
        }
    }

    pub fn write_all(&self, mut buf: &[u8]) -> Result<(), Errno> {
        while !buf.is_empty() {
            // SAFETY: write reads at most buf.len() bytes from buf.
            let n = unsafe { write(self.0, buf.as_ptr().cast(), buf.len()) };
            match check(n as c_long) {
                Err(Errno(EINTR)) => continue,
                Err(e) => return Err(e),
                Ok(0) => return Err(Errno(EIO)),
                Ok(n) => buf = buf.get(n..).ok_or(Errno(EIO))?,
            }
        }
        Ok(())
    }

    /// Send and receive timeouts (0: none).
    pub fn set_timeouts(&self, us: u64) -> Result<(), Errno> {
        self.set_timeout_opts(&[SO_RCVTIMEO, SO_SNDTIMEO], us)
    }

    /// The receive timeout alone (nothing more is sent).
    pub fn set_receive_timeout(&self, us: u64) -> Result<(), Errno> {
        self.set_timeout_opts(&[SO_RCVTIMEO], us)
    }

    fn set_timeout_opts(&self, opts: &[c_int], us: u64) -> Result<(), Errno> {
        let tv = Timeval {
            sec: i64::try_from(us / 1_000_000).unwrap_or(i64::MAX),
            usec: i64::try_from(us % 1_000_000).unwrap_or(0),
        };
        for &opt in opts {
            // SAFETY: `tv` is a valid timeval of the size we pass.
            let r = unsafe {
                setsockopt(
                    self.0,
                    SOL_SOCKET,
                    opt,
                    (&tv as *const Timeval).cast(),
                    core::mem::size_of::<Timeval>() as u32,
                )
            };
            if r < 0 {
                return Err(errno());
            }
        }
        Ok(())
    }
}

fn sockaddr(path: &[u8]) -> Result<SockaddrUn, Errno> {
    let mut addr = SockaddrUn {
        family: AF_UNIX as u16,
        path: [0; 108],
    };
    if path.len() >= addr.path.len() || path.contains(&0) {
        return Err(Errno(EINVAL));
    }
    addr.path[..path.len()].copy_from_slice(path);
    Ok(addr)
}

/// Creates a root-only directory (an existing one is left as it is).
pub fn mkdir_private(path: &CPath) -> Result<(), Errno> {
    // SAFETY: NUL-terminated path and an integer mode.
    let r = unsafe { mkdir(path.ptr(), 0o700) };
    if r < 0 {
        return Err(errno());
    }
    Ok(())
}

/// A stream connection to a unix socket, with `timeout_us` for sends and
/// receives already set: it bounds the connect too (a listener whose
/// backlog is full makes connect wait for room).
pub fn connect_stream(path: &[u8], timeout_us: u64) -> Result<Fd, Errno> {
    let addr = sockaddr(path)?;
    // SAFETY: integer arguments.
    let s = fd(unsafe { socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0) })?;
    s.set_timeouts(timeout_us)?;
    // SAFETY: `addr` is a valid sockaddr_un of the size we pass.
    let r = unsafe {
        connect(
            s.0,
            (&addr as *const SockaddrUn).cast(),
            core::mem::size_of::<SockaddrUn>() as u32,
        )
    };
    if r < 0 {
        return Err(errno());
    }
    Ok(s)
}

/// One datagram to a unix socket (syslog), giving up after `timeout_us`.
pub fn send_datagram(path: &[u8], msg: &[u8], timeout_us: u64) -> Result<(), Errno> {
    let addr = sockaddr(path)?;
    // SAFETY: integer arguments.
    let s = fd(unsafe { socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0) })?;
    s.set_timeouts(timeout_us)?;
    // SAFETY: `msg` and `addr` are valid for the lengths we pass.
    let n = unsafe {
        sendto(
            s.0,
            msg.as_ptr().cast(),
            msg.len(),
            MSG_NOSIGNAL,
            (&addr as *const SockaddrUn).cast(),
            core::mem::size_of::<SockaddrUn>() as u32,
        )
    };
    check(n as c_long).map(|_| ())
}

/// Writes to standard error (best effort).
pub fn stderr(msg: &[u8]) {
    // SAFETY: write reads at most msg.len() bytes from msg.
    unsafe { write(2, msg.as_ptr().cast(), msg.len()) };
}

/// Ends the process at once (no destructors, nothing flushed).
pub fn exit(code: i32) -> ! {
    // SAFETY: _exit takes an integer and does not return.
    unsafe { _exit(code) }
}
