//! Buffers for key material: memfd_secret(2) where the kernel has it,
//! mlock(2) otherwise, zeroized on drop. They have no `Debug` or `Display`
//! so a secret cannot end up in a log line or a panic message by accident.

use std::sync::Mutex;

use zeroize::Zeroize;

pub use crate::sys::Backing;
use crate::sys::Region;

/// Freed one-page buffers kept for reuse, zeroized. Making secret memory
/// takes its pages out of the kernel's direct map, which costs a TLB flush
/// on every CPU; a resident process (the broker, several buffers per
/// request) reuses a few instead.
static POOL: Mutex<Vec<Region>> = Mutex::new(Vec::new());
const POOL_MAX: usize = 16;

type Pool = Mutex<Vec<Region>>;

fn lock(pool: &Pool) -> std::sync::MutexGuard<'_, Vec<Region>> {
    // The pool holds only zeroized regions; a panic elsewhere cannot
    // leave it in a state worse than that.
    pool.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a secret buffer could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot allocate {len} bytes of secret memory")]
pub struct SecretAllocError {
    pub len: usize,
    #[source]
    pub source: std::io::Error,
}

/// A fixed-length secret. Dropping it overwrites it with zeros and unmaps it.
pub struct SecretBuf {
    /// None only while dropping.
    region: Option<Region>,
    len: usize,
    /// Where the page goes back when dropped.
    pool: &'static Pool,
}

impl SecretBuf {
    /// A zero-filled secret of `len` bytes.
    pub fn new(len: usize) -> Result<SecretBuf, SecretAllocError> {
        Self::new_in(&POOL, len)
    }

    fn new_in(pool: &'static Pool, len: usize) -> Result<SecretBuf, SecretAllocError> {
        let page = crate::sys::page_len();
        let reused = if len <= page { lock(pool).pop() } else { None };
        let region = match reused {
            Some(r) => r,
            // Rounded up to whole pages: small buffers are one page each.
            None => Region::new(len, true).map_err(|source| SecretAllocError { len, source })?,
        };
        Ok(SecretBuf {
            region: Some(region),
            len,
            pool,
        })
    }

    /// A secret holding a copy of `bytes`.
    pub fn copy_from(bytes: &[u8]) -> Result<SecretBuf, SecretAllocError> {
        let mut s = SecretBuf::new(bytes.len())?;
        s.as_mut().copy_from_slice(bytes);
        Ok(s)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Which protection this buffer got.
    pub fn backing(&self) -> Backing {
        self.region.as_ref().map_or(Backing::Plain, Region::backing)
    }

    /// Start address of the mapping: lets tests look for it in /proc.
    pub fn addr(&self) -> usize {
        self.region.as_ref().map_or(0, Region::addr)
    }
}

impl AsRef<[u8]> for SecretBuf {
    fn as_ref(&self) -> &[u8] {
        self.region
            .as_ref()
            .map_or(&[], |r| &r.as_slice()[..self.len])
    }
}

impl AsMut<[u8]> for SecretBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        self.region
            .as_mut()
            .map_or(&mut [], |r| &mut r.as_mut_slice()[..len])
    }
}

impl PartialEq for SecretBuf {
    /// Constant-time comparison (length is not secret).
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.as_ref(), other.as_ref());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl Drop for SecretBuf {
    fn drop(&mut self) {
        if let Some(mut region) = self.region.take() {
            region.as_mut_slice().zeroize();
            if region.map_len() == crate::sys::page_len() {
                let mut pool = lock(self.pool);
                if pool.len() < POOL_MAX {
                    pool.push(region);
                }
            }
        }
    }
}

/// Whether memfd_secret(2) works on this kernel.
pub fn memfd_secret_available() -> bool {
    crate::sys::memfd_secret_available()
}

/// Which protection a new secret buffer would get on this machine.
pub fn probe_backing() -> Option<Backing> {
    SecretBuf::new(1).ok().map(|b| b.backing())
}

/// Makes this process non-dumpable: no core files, no ptrace or
/// /proc/<pid>/mem by non-root, no key material on disk after a crash.
pub fn harden() {
    let _ = nix::sys::prctl::set_dumpable(false);
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_and_compare() {
        let a = SecretBuf::copy_from(b"key material").unwrap();
        let b = SecretBuf::copy_from(b"key material").unwrap();
        let c = SecretBuf::copy_from(b"key materiaL").unwrap();
        assert_eq!(a.as_ref(), b"key material");
        assert!(a == b);
        assert!(a != c);
        assert_eq!(a.len(), 12);
    }

    #[test]
    fn reused_buffers_come_back_zeroed() {
        // A pool of this test's own: nothing else takes its page.
        let pool: &'static Pool = Box::leak(Box::new(Mutex::new(Vec::new())));
        let mut a = SecretBuf::new_in(pool, 64).unwrap();
        a.as_mut().fill(0xa5);
        let addr = a.addr();
        drop(a);
        assert_eq!(lock(pool).len(), 1, "the page went back to the pool");
        let b = SecretBuf::new_in(pool, 16).unwrap();
        assert_eq!(b.addr(), addr, "the same page was reused");
        assert_eq!(b.len(), 16);
        // Not only the 16 bytes asked for: the whole page was zeroized.
        let region = b.region.as_ref().unwrap();
        assert!(region.as_slice().iter().all(|&x| x == 0));
        // A full pool keeps no more pages.
        let many: Vec<SecretBuf> = (0..POOL_MAX + 2)
            .map(|_| SecretBuf::new_in(pool, 8).unwrap())
            .collect();
        drop(many);
        drop(b);
        assert_eq!(lock(pool).len(), POOL_MAX);
    }

    #[test]
    fn memfd_secret_is_used_where_available() {
        // This machine kind has CONFIG_SECRETMEM=y; elsewhere, fallbacks apply.
        let b = SecretBuf::new(32).unwrap();
        if crate::sys::memfd_secret_available() {
            assert_eq!(b.backing(), Backing::MemfdSecret);
        }
    }
}
