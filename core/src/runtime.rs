//! Where a broker's runtime files are, and the bounded text the handler
//! builds names and messages in (it has no allocator).

use core::fmt::Write;

/// FNV-1a, 64 bits, fed in pieces: names a configuration's broker (see
/// `config::fnv1a`). Not a security function.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// Where brokers keep their socket, lock and pid files (tmpfs, root only).
pub const RUN_DIR: &str = "/run/derived-keys";

/// The path of a broker's runtime file (`ext`: sock, lock or pid). One
/// broker per configuration (its fingerprint), release and protocol
/// version: after an upgrade, a new handler starts a broker of its own
/// instead of talking to one still running from the old release, which
/// idles out beside it.
pub fn runtime_path(fingerprint: u64, ext: &str) -> Line {
    let mut name = Line::new();
    let _ = write_runtime_path(&mut name, fingerprint, ext);
    name
}

/// [`runtime_path`] into any writer (the handler formats it straight
/// into its path buffer).
pub fn write_runtime_path(w: &mut impl Write, fingerprint: u64, ext: &str) -> core::fmt::Result {
    write!(
        w,
        "{RUN_DIR}/broker-{fingerprint:016x}-{}-w{}.{ext}",
        env!("CARGO_PKG_VERSION"),
        crate::wire::VERSION
    )
}

/// A bounded text buffer (the handler has no allocator); what does not
/// fit is cut.
pub struct Line {
    buf: [u8; 768],
    len: usize,
}

impl Default for Line {
    fn default() -> Line {
        Line::new()
    }
}

impl Line {
    pub const fn new() -> Line {
        Line {
            buf: [0; 768],
            len: 0,
        }
    }

    pub fn push(&mut self, b: &[u8]) {
        let n = b.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_bounded() {
        let mut l = Line::new();
        for _ in 0..100 {
            let _ = write!(l, "0123456789");
        }
        assert_eq!(l.as_bytes().len(), 768);
    }
}
