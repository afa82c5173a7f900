//! The only module with `unsafe`: raw system calls that no safe wrapper in
//! our dependencies covers (memfd_secret, mmap/mlock for secret memory,
//! keyctl reject with an errno, request_key for any key type, bringing up
//! the loopback interface of a fresh network namespace, /proc/keys opened
//! from a user namespace of its own).
//!
//! Every block states why it is sound. Everything here returns
//! `io::Error` from errno; callers wrap it in their boundary's error type.

use std::ffi::CStr;
use std::io;
use std::ptr::NonNull;

/// How a secret region is protected, strongest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// memfd_secret(2): removed from the kernel's direct map, invisible to
    /// /proc/<pid>/mem and ptrace, never swapped.
    MemfdSecret,
    /// Anonymous memory locked with mlock(2) and excluded from core dumps.
    Mlock,
    /// Anonymous memory excluded from core dumps only (mlock refused, e.g.
    /// RLIMIT_MEMLOCK for an unprivileged library user).
    Plain,
}

impl Backing {
    pub fn as_str(self) -> &'static str {
        match self {
            Backing::MemfdSecret => "memfd_secret",
            Backing::Mlock => "mlock",
            Backing::Plain => "plain",
        }
    }
}

/// A private, page-aligned, zero-initialised mapping owned by one value.
pub struct Region {
    ptr: NonNull<u8>,
    map_len: usize,
    backing: Backing,
}

// SAFETY: `Region` exclusively owns its mapping (no aliasing pointer leaves
// this type except through `&self`/`&mut self` borrows), so moving it to or
// sharing it with another thread is as safe as for a `Box<[u8]>`.
unsafe impl Send for Region {}
// SAFETY: shared access only hands out `&[u8]`; mutation needs `&mut self`.
unsafe impl Sync for Region {}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

fn round_up(len: usize) -> usize {
    let page = page_size();
    len.max(1).div_ceil(page) * page
}

fn memfd_secret_fd() -> io::Result<libc::c_int> {
    // SAFETY: memfd_secret takes one flags argument and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_memfd_secret, libc::O_CLOEXEC as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd as libc::c_int)
}

fn close(fd: libc::c_int) {
    // SAFETY: `fd` was returned by memfd_secret and is closed exactly once.
    unsafe { libc::close(fd) };
}

fn map_memfd_secret(map_len: usize) -> io::Result<NonNull<u8>> {
    let fd = memfd_secret_fd()?;
    // SAFETY: `fd` is a valid memfd; ftruncate only sizes it.
    if unsafe { libc::ftruncate(fd, map_len as libc::off_t) } != 0 {
        let e = io::Error::last_os_error();
        close(fd);
        return Err(e);
    }
    // SAFETY: a fresh shared mapping of `map_len` bytes of our own memfd;
    // the kernel chooses the address, so nothing existing is overwritten.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    let e = io::Error::last_os_error();
    // The mapping keeps the memory alive; the descriptor is no longer needed.
    close(fd);
    if p == libc::MAP_FAILED {
        return Err(e);
    }
    NonNull::new(p.cast::<u8>()).ok_or(e)
}

fn map_anonymous(map_len: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: a fresh private anonymous mapping; the kernel picks the address.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast::<u8>()).ok_or_else(io::Error::last_os_error)
}

impl Region {
    /// Maps at least `len` bytes, preferring memfd_secret, then mlock.
    /// `allow_secretmem = false` skips memfd_secret (used to test fallbacks).
    pub fn new(len: usize, allow_secretmem: bool) -> io::Result<Region> {
        let map_len = round_up(len);
        if allow_secretmem {
            if let Ok(ptr) = map_memfd_secret(map_len) {
                return Ok(Region {
                    ptr,
                    map_len,
                    backing: Backing::MemfdSecret,
                });
            }
        }
        let ptr = map_anonymous(map_len)?;
        // SAFETY: `ptr..ptr+map_len` is the mapping created just above.
        unsafe { libc::madvise(ptr.as_ptr().cast(), map_len, libc::MADV_DONTDUMP) };
        // SAFETY: same range; mlock has no memory-safety preconditions.
        let locked = unsafe { libc::mlock(ptr.as_ptr().cast(), map_len) } == 0;
        Ok(Region {
            ptr,
            map_len,
            backing: if locked {
                Backing::Mlock
            } else {
                Backing::Plain
            },
        })
    }

    pub fn backing(&self) -> Backing {
        self.backing
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `map_len` readable bytes, zero-initialised
        // by the kernel, alive as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.map_len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.map_len) }
    }

    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// The mapped length (whole pages).
    pub fn map_len(&self) -> usize {
        self.map_len
    }
}

/// The length of a one-page mapping.
pub fn page_len() -> usize {
    round_up(1)
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the range this value mapped, once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}

/// Whether memfd_secret(2) works on this kernel (probes with one page).
pub fn memfd_secret_available() -> bool {
    match memfd_secret_fd() {
        Ok(fd) => {
            close(fd);
            true
        }
        Err(_) => false,
    }
}

/// request_key(2) for any key type (linux-keyutils only asks for `user`).
pub fn request_key(
    key_type: &CStr,
    description: &CStr,
    callout: Option<&CStr>,
    dest_keyring: i32,
) -> io::Result<i32> {
    let callout_ptr = callout.map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: all pointers are NUL-terminated C strings borrowed for the
    // duration of the call (or NULL for no callout, which the kernel allows).
    let r = unsafe {
        libc::syscall(
            libc::SYS_request_key,
            key_type.as_ptr(),
            description.as_ptr(),
            callout_ptr,
            dest_keyring as libc::c_long,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    i32::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::ERANGE))
}

/// The syscall number of request_key(2) on this architecture, as it appears
/// in the first field of /proc/<tid>/syscall.
pub const SYS_REQUEST_KEY: i64 = libc::SYS_request_key;

/// Every number request_key(2) appears under in /proc/<tid>/syscall: this
/// architecture's own and, on x86-64, those of the 32-bit ABIs whose
/// programs its kernel runs too, which libc (built for x86-64) does not
/// name: ia32's 287 (the kernel's arch/x86/entry/syscalls/syscall_32.tbl)
/// and x32's, the native number with `__X32_SYSCALL_BIT` (0x40000000).
#[cfg(target_arch = "x86_64")]
pub const REQUEST_KEY_NUMBERS: &[i64] = &[SYS_REQUEST_KEY, 287, 0x4000_0000 | SYS_REQUEST_KEY];
#[cfg(not(target_arch = "x86_64"))]
pub const REQUEST_KEY_NUMBERS: &[i64] = &[SYS_REQUEST_KEY];

/// KEYCTL_JOIN_SESSION_KEYRING with no name: a fresh anonymous session
/// keyring, leaving the one inherited from request-key.
pub fn keyctl_new_session() -> io::Result<i32> {
    // SAFETY: a NULL name pointer is allowed and means "anonymous".
    let r = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            libc::KEYCTL_JOIN_SESSION_KEYRING as libc::c_long,
            std::ptr::null::<libc::c_char>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    i32::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::ERANGE))
}

/// KEYCTL_GET_KEYRING_ID of the session keyring, without making one.
pub fn keyctl_session_id() -> io::Result<i32> {
    // SAFETY: integer arguments only.
    let r = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            libc::KEYCTL_GET_KEYRING_ID as libc::c_long,
            libc::KEY_SPEC_SESSION_KEYRING as libc::c_long,
            0 as libc::c_long,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    i32::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::ERANGE))
}

/// KEYCTL_ASSUME_AUTHORITY with 0: gives up any instantiation authority
/// inherited from the handler.
pub fn keyctl_drop_authority() -> io::Result<()> {
    // SAFETY: integer arguments only.
    let r = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            libc::KEYCTL_ASSUME_AUTHORITY as libc::c_long,
            0 as libc::c_long,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Brings up `lo` in the calling thread's network namespace (a new one has
/// it down, without 127.0.0.1). SIOCGIFFLAGS then SIOCSIFFLAGS with IFF_UP:
/// nix and libc offer no safe wrapper.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket(2) call; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, b) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = *b as libc::c_char;
    }
    // SAFETY: `req` is a valid, initialized ifreq naming "lo" that lives
    // across both calls; the kernel reads the name and reads/writes the
    // flags member of the union only.
    let r = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req) < 0 {
            -1
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req)
        }
    };
    let err = io::Error::last_os_error();
    close(fd);
    if r < 0 {
        return Err(err);
    }
    Ok(())
}

/// How long [`proc_keys_of_uid`] waits for its child at each step (a few
/// system calls; the whole takes about a millisecond).
const VIEW_CHILD_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(200);

/// Why [`proc_keys_of_uid`] failed: the child's step, or ours.
#[derive(Debug)]
pub enum ViewError {
    /// This kernel or its configuration gives no user namespace
    /// (`user.max_user_namespaces` = 0, or user namespaces not built in).
    NoUserNamespace,
    /// Not this time: the broker's maker is slower than the request could
    /// wait (it still owes the answer, and is asked for it next time), or
    /// its child failed for this uid.
    Again,
    /// Anything else, with the errno or the child's report.
    Failed(io::Error),
}

/// A uid no account has: `(uid_t)-2`, the highest valid one (-1 means
/// "no change" to the set*id calls).
pub const NO_KEYS_UID: u32 = 0xffff_fffe;

/// /proc/keys opened by a short-lived child of ours with filesystem uid
/// [`NO_KEYS_UID`], from a user namespace of its own in which only `uid`
/// is mapped. The kernel lists in /proc/keys only keys whose owner is
/// mapped in the opener's user namespace, and checks view permission with
/// the opener's credentials: reads of this file (pread from offset 0
/// starts over) list the keys of `uid` that those credentials possess
/// (through our session keyring) or that anyone may view, and skip every
/// other owner's key at the cost of a comparison, instead of checking
/// possession and permission of each.
///
/// The child only makes system calls: it may be forked from a threaded
/// process (the broker forks it from its [`ViewMaker`], which has one
/// thread, but tests do not), where anything else, an allocation
/// included, could wait forever on a lock another thread held. It stops on its own if we go
/// away: every wait of its is a read on a socket whose other end we hold.
pub fn proc_keys_of_uid(uid: u32) -> Result<std::os::fd::OwnedFd, ViewError> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let failed = |e: io::Error| ViewError::Failed(e);
    let mut pair = [0 as libc::c_int; 2];
    // SAFETY: `pair` has room for the two descriptors the kernel writes.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(failed(io::Error::last_os_error()));
    }
    // SAFETY: two fresh descriptors that nothing else owns.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
    nix::sys::socket::setsockopt(
        &ours,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &timeval(VIEW_CHILD_TIMEOUT),
    )
    .map_err(|e| failed(e.into()))?;

    // Everything the child touches is made here, before the fork.
    #[repr(C)]
    struct FdMessage {
        head: libc::cmsghdr,
        fd: libc::c_int,
    }
    // SAFETY: cmsghdr is plain old data; all-zero is a valid value.
    let mut control: FdMessage = unsafe { std::mem::zeroed() };
    control.head.cmsg_level = libc::SOL_SOCKET;
    control.head.cmsg_type = libc::SCM_RIGHTS;
    let fd_len = std::mem::size_of::<libc::c_int>() as u32;
    // SAFETY: CMSG_LEN and CMSG_SPACE are arithmetic on their argument.
    let (cmsg_len, cmsg_space) = unsafe { (libc::CMSG_LEN(fd_len), libc::CMSG_SPACE(fd_len)) };
    control.head.cmsg_len = cmsg_len as _;
    let mut byte = *b"f";
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    let control: *mut FdMessage = std::ptr::addr_of_mut!(control);
    msg.msg_control = control.cast();
    msg.msg_controllen = cmsg_space as _;
    assert!(msg.msg_controllen as usize <= std::mem::size_of::<FdMessage>());
    let (ours_fd, theirs_fd) = (ours.as_raw_fd(), theirs.as_raw_fd());
    let path = c"/proc/keys";

    // SAFETY: the child runs only the system calls below on memory made
    // before the fork, and leaves with _exit; the parent goes on as usual.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(failed(io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: plain system calls on descriptors and buffers that were
        // made before the fork and are valid in this copy of the memory.
        unsafe {
            libc::close(ours_fd);
            // Nothing else of the parent's: our socket becomes fd 3.
            if theirs_fd != 3 && libc::dup2(theirs_fd, 3) != 3 {
                libc::_exit(11);
            }
            let theirs_fd = 3;
            libc::syscall(
                libc::SYS_close_range,
                4 as libc::c_uint,
                libc::c_uint::MAX,
                0 as libc::c_uint,
            );
            let mut go = 0u8;
            libc::setfsuid(NO_KEYS_UID);
            if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                // No user namespaces on this kernel, or none allowed; a
                // limit reached (ENOSPC, ENOMEM) is only this time.
                let e = *libc::__errno_location();
                libc::_exit(if matches!(e, libc::EINVAL | libc::EPERM | libc::ENOSYS) {
                    10
                } else {
                    14
                });
            }
            if libc::write(theirs_fd, b"u".as_ptr().cast(), 1) != 1
                || libc::read(theirs_fd, std::ptr::addr_of_mut!(go).cast(), 1) != 1
            {
                libc::_exit(11);
            }
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                libc::_exit(12);
            }
            (*control).fd = fd;
            if libc::sendmsg(theirs_fd, &msg, 0) != 1 {
                libc::_exit(13);
            }
            libc::_exit(0);
        }
    }
    drop(theirs);
    let child = nix::unistd::Pid::from_raw(pid);
    let got = receive_view(&ours, pid, uid);
    if got.is_err() {
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
    }
    let status = nix::sys::wait::waitpid(child, None);
    match (got, status) {
        (Ok(fd), _) => Ok(fd),
        (Err(_), Ok(nix::sys::wait::WaitStatus::Exited(_, 10))) => Err(ViewError::NoUserNamespace),
        (Err(e), _) => Err(failed(e)),
    }
}

/// A process of ours that makes views of /proc/keys ([`proc_keys_of_uid`])
/// on request. It is forked while the broker is still one thread, before
/// the broker opens its TPM, reads a password or takes a lock: so the
/// children that make views, forked from it, hold none of those. (A
/// child of a worker thread would hold a copy of every descriptor the
/// broker has open at that moment, the TPM's connection included, until
/// it exits.) It leaves when its socket closes: when the broker does.
pub struct ViewMaker {
    state: std::sync::Mutex<MakerState>,
    pid: nix::unistd::Pid,
}

struct MakerState {
    sock: std::os::fd::OwnedFd,
    /// A question whose answer did not come while its request could wait:
    /// the uid, and when it was asked. The maker answers in order.
    owed: Option<(u32, std::time::Instant)>,
}

/// How long the maker may take to answer a question, in all: longer than
/// its own worst case (its two waits for a child, a fork, a uid map). A
/// request waits for it at most a quarter of its own time left
/// ([`crate::requester::keys`]); an answer late for its request is taken
/// by the next one. A maker later than this is killed, and the broker
/// reads the file plainly from then on.
pub const MAKER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

fn timeval(d: std::time::Duration) -> nix::sys::time::TimeVal {
    nix::sys::time::TimeVal::new(d.as_secs() as _, d.subsec_micros() as _)
}

/// What the maker answers: a view follows, or why none does.
const MADE: u8 = 0;
const MADE_NO_NAMESPACE: u8 = 1;
const MADE_FAILED: u8 = 2;

impl ViewMaker {
    /// Forks the maker. Call only while this process has one thread.
    pub fn start() -> io::Result<ViewMaker> {
        let (ours, theirs) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        // SAFETY: the caller runs us while the process has one thread, so
        // the child may run any code: no lock is held by a thread that
        // does not exist in it.
        match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
            nix::unistd::ForkResult::Child => {
                drop(ours);
                serve_views(&theirs);
                // SAFETY: leaves at once, running no destructors of state
                // copied from the parent.
                unsafe { libc::_exit(0) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                drop(theirs);
                Ok(ViewMaker {
                    state: std::sync::Mutex::new(MakerState {
                        sock: ours,
                        owed: None,
                    }),
                    pid: child,
                })
            }
        }
    }

    /// A view of /proc/keys for `uid`, made by the maker, waiting for it
    /// at most `wait` (clamped to 1 ms ..= [`MAKER_TIMEOUT`]). Every
    /// answer names the uid it is for, and the maker answers in order: an
    /// answer still owed to an earlier question is taken first (and is
    /// ours if that question was for `uid` too). [`ViewError::Again`]: not
    /// this time, ask again later. After [`ViewError::Failed`] the caller
    /// must not use this maker again.
    pub fn make(
        &self,
        uid: u32,
        wait: std::time::Duration,
    ) -> Result<std::os::fd::OwnedFd, ViewError> {
        use std::io::Write;
        use std::time::{Duration, Instant};
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let until = Instant::now() + wait.clamp(Duration::from_millis(1), MAKER_TIMEOUT);
        if let Some((owed, asked)) = st.owed.take() {
            let (status, fd) = st.answer(owed, asked, until)?;
            if owed == uid {
                return outcome(status, fd);
            }
        }
        let asked = Instant::now();
        std::fs::File::from(st.sock.try_clone().map_err(ViewError::Failed)?)
            .write_all(&uid.to_le_bytes())
            .map_err(ViewError::Failed)?;
        let (status, fd) = st.answer(uid, asked, until)?;
        outcome(status, fd)
    }
}

impl MakerState {
    /// The answer to the question for `uid` asked at `asked`, waited for
    /// until `until`: its status and descriptor. Not there yet, and the
    /// maker not yet [`MAKER_TIMEOUT`] late: [`ViewError::Again`], and the
    /// question stays owed.
    fn answer(
        &mut self,
        uid: u32,
        asked: std::time::Instant,
        until: std::time::Instant,
    ) -> Result<(u8, Option<std::os::fd::OwnedFd>), ViewError> {
        let late = asked + MAKER_TIMEOUT;
        match answer_by(&self.sock, until.min(late)) {
            Ok((answer, fd)) if answer[1..] == uid.to_le_bytes() => Ok((answer[0], fd)),
            Ok(_) => Err(ViewError::Failed(io::Error::from_raw_os_error(
                libc::EPROTO,
            ))),
            Err(e) if timed_out(&e) && std::time::Instant::now() < late => {
                self.owed = Some((uid, asked));
                Err(ViewError::Again)
            }
            Err(e) => Err(ViewError::Failed(e)),
        }
    }
}

/// The maker's next answer, waiting until `until` (at least 1 ms).
fn answer_by(
    sock: &std::os::fd::OwnedFd,
    until: std::time::Instant,
) -> io::Result<([u8; 5], Option<std::os::fd::OwnedFd>)> {
    use std::os::fd::AsRawFd;
    let wait = until
        .saturating_duration_since(std::time::Instant::now())
        .max(std::time::Duration::from_millis(1));
    nix::sys::socket::setsockopt(
        sock,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &timeval(wait),
    )
    .map_err(io::Error::from)?;
    receive_fd::<5>(sock.as_raw_fd())
}

fn timed_out(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EAGAIN)
}

/// What an answer's status byte means.
fn outcome(
    status: u8,
    fd: Option<std::os::fd::OwnedFd>,
) -> Result<std::os::fd::OwnedFd, ViewError> {
    match (status, fd) {
        (MADE, Some(fd)) => Ok(fd),
        (MADE_NO_NAMESPACE, _) => Err(ViewError::NoUserNamespace),
        // Its child failed for this uid (a limit reached, a slow step):
        // the maker itself is fine.
        (MADE_FAILED, _) => Err(ViewError::Again),
        _ => Err(ViewError::Failed(io::Error::from_raw_os_error(
            libc::EPROTO,
        ))),
    }
}

impl Drop for ViewMaker {
    fn drop(&mut self) {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        // SIGKILL, not a request to leave: a maker that stopped answering
        // may be stopped (a stopped process holds SIGTERM until it is
        // continued) or stuck in the kernel, where even SIGKILL waits for
        // it to come out. Reaped now if it is gone already, or else by a
        // thread of its own: the caller must not wait.
        let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
        let pid = self.pid;
        if let Ok(WaitStatus::StillAlive) = waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            let _ = std::thread::Builder::new()
                .name("reaper".into())
                .spawn(move || waitpid(pid, None));
        }
    }
}

/// The maker's loop: a uid in, a view (or why not) out, until the end.
fn serve_views(sock: &std::os::fd::OwnedFd) {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let Ok(mut reader) = sock.try_clone().map(std::fs::File::from) else {
        return;
    };
    let mut uid = [0u8; 4];
    while reader.read_exact(&mut uid).is_ok() {
        let (status, fd) = match proc_keys_of_uid(u32::from_le_bytes(uid)) {
            Ok(fd) => (MADE, Some(fd)),
            Err(ViewError::NoUserNamespace) => (MADE_NO_NAMESPACE, None),
            Err(ViewError::Failed(_) | ViewError::Again) => (MADE_FAILED, None),
        };
        let answer = [status, uid[0], uid[1], uid[2], uid[3]];
        if send_fd(sock.as_raw_fd(), &answer, fd.as_ref()).is_err() {
            return;
        }
    }
}

/// A short message, with a descriptor attached if there is one.
fn send_fd(sock: libc::c_int, bytes: &[u8], fd: Option<&std::os::fd::OwnedFd>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let iov = [std::io::IoSlice::new(bytes)];
    let fds: Vec<libc::c_int> = fd.map(|f| f.as_raw_fd()).into_iter().collect();
    let cmsgs: Vec<nix::sys::socket::ControlMessage<'_>> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![nix::sys::socket::ControlMessage::ScmRights(&fds)]
    };
    nix::sys::socket::sendmsg::<()>(
        sock,
        &iov,
        &cmsgs,
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .map(|_| ())
    .map_err(io::Error::from)
}

/// A message of exactly `N` bytes and the descriptor that came with it,
/// if any.
fn receive_fd<const N: usize>(
    sock: libc::c_int,
) -> io::Result<([u8; N], Option<std::os::fd::OwnedFd>)> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut bytes = [0u8; N];
    let mut iov = [std::io::IoSliceMut::new(&mut bytes)];
    let mut space = nix::cmsg_space!(libc::c_int);
    let msg = nix::sys::socket::recvmsg::<()>(
        sock,
        &mut iov,
        Some(&mut space),
        nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    if msg.bytes != N {
        return Err(io::Error::from_raw_os_error(libc::EPIPE));
    }
    let mut got = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: descriptors the kernel just installed for us.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                if got.is_none() {
                    got = Some(fd);
                }
            }
        }
    }
    Ok((bytes, got))
}

/// Our side of [`proc_keys_of_uid`]: map `uid` once the child is in its
/// namespace, then take the descriptor it opened there.
fn receive_view(
    ours: &std::os::fd::OwnedFd,
    pid: libc::pid_t,
    uid: u32,
) -> io::Result<std::os::fd::OwnedFd> {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let mut sock = std::fs::File::from(ours.try_clone()?);
    let mut step = [0u8; 1];
    sock.read_exact(&mut step)?;
    std::fs::write(format!("/proc/{pid}/uid_map"), format!("{uid} {uid} 1\n"))?;
    sock.write_all(b"g")?;
    match receive_fd::<1>(ours.as_raw_fd())? {
        ([b'f'], Some(fd)) => Ok(fd),
        _ => Err(io::Error::from_raw_os_error(libc::EPROTO)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_is_zeroed_and_writable() {
        for allow in [true, false] {
            let mut r = Region::new(100, allow).unwrap();
            assert!(r.as_slice().len() >= 100);
            assert!(r.as_slice().iter().all(|&b| b == 0));
            r.as_mut_slice()[..4].copy_from_slice(b"abcd");
            assert_eq!(&r.as_slice()[..4], b"abcd");
            if !allow {
                assert_ne!(r.backing(), Backing::MemfdSecret);
            }
        }
    }

    #[test]
    fn request_key_without_callout_reports_enokey() {
        let t = std::ffi::CString::new("user").unwrap();
        let d = std::ffi::CString::new("derived-keys-test:absent:sys").unwrap();
        let e = request_key(&t, &d, None, 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOKEY));
    }
}
