//! Buffers for key material: memfd_secret(2) where the kernel has it,
//! mlock(2) otherwise, zeroized on drop. They have no `Debug` or `Display`
//! so a secret cannot end up in a log line or a panic message by accident.

use zeroize::Zeroize;

pub use crate::sys::Backing;
use crate::sys::Region;

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
    region: Region,
    len: usize,
}

impl SecretBuf {
    /// A zero-filled secret of `len` bytes.
    pub fn new(len: usize) -> Result<SecretBuf, SecretAllocError> {
        let region = Region::new(len, true).map_err(|source| SecretAllocError { len, source })?;
        Ok(SecretBuf { region, len })
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
        self.region.backing()
    }

    /// Start address of the mapping: lets tests look for it in /proc.
    pub fn addr(&self) -> usize {
        self.region.addr()
    }
}

impl AsRef<[u8]> for SecretBuf {
    fn as_ref(&self) -> &[u8] {
        &self.region.as_slice()[..self.len]
    }
}

impl AsMut<[u8]> for SecretBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.region.as_mut_slice()[..len]
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
        self.region.as_mut_slice().zeroize();
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
    fn memfd_secret_is_used_where_available() {
        // This machine kind has CONFIG_SECRETMEM=y; elsewhere, fallbacks apply.
        let b = SecretBuf::new(32).unwrap();
        if crate::sys::memfd_secret_available() {
            assert_eq!(b.backing(), Backing::MemfdSecret);
        }
    }
}
