//! The only module with `unsafe`: raw system calls that no safe wrapper in
//! our dependencies covers (memfd_secret, mmap/mlock for secret memory,
//! keyctl reject with an errno, request_key for any key type, bringing up
//! the loopback interface of a fresh network namespace).
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
