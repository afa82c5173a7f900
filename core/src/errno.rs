//! The errnos requests end with, and their names for audit lines and
//! messages: the one table, for the handler and the library. Numbers come
//! from the libc crate, never written per architecture.

pub const EIO: i32 = libc::EIO;
pub const ENOMEM: i32 = libc::ENOMEM;
pub const EACCES: i32 = libc::EACCES;
pub const ENODEV: i32 = libc::ENODEV;
pub const EINVAL: i32 = libc::EINVAL;
pub const ETIMEDOUT: i32 = libc::ETIMEDOUT;
pub const EDQUOT: i32 = libc::EDQUOT;
pub const ENOKEY: i32 = libc::ENOKEY;
pub const EKEYEXPIRED: i32 = libc::EKEYEXPIRED;
pub const EKEYREVOKED: i32 = libc::EKEYREVOKED;
pub const EKEYREJECTED: i32 = libc::EKEYREJECTED;

/// The symbolic name, "EOTHER" for any other errno.
pub fn name(e: i32) -> &'static str {
    match e {
        EINVAL => "EINVAL",
        EACCES => "EACCES",
        ENODEV => "ENODEV",
        EIO => "EIO",
        ETIMEDOUT => "ETIMEDOUT",
        ENOKEY => "ENOKEY",
        EKEYREJECTED => "EKEYREJECTED",
        EKEYREVOKED => "EKEYREVOKED",
        EKEYEXPIRED => "EKEYEXPIRED",
        EDQUOT => "EDQUOT",
        ENOMEM => "ENOMEM",
        _ => "EOTHER",
    }
}

/// A contract errno from a broker's exit code; anything else is EIO.
pub fn exit_errno(code: i32) -> i32 {
    match code {
        EINVAL | EACCES | ENODEV | EIO | ETIMEDOUT => code,
        _ => EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_exit_codes_become_contract_errnos() {
        assert_eq!(exit_errno(19), ENODEV);
        assert_eq!(exit_errno(110), ETIMEDOUT);
        for other in [-1, 0, 1, 127, 255] {
            assert_eq!(exit_errno(other), EIO);
        }
        assert_eq!(name(ETIMEDOUT), "ETIMEDOUT");
        assert_eq!(name(1), "EOTHER");
    }
}
