//! `dkey`'s exit codes, one per contract errno. Each boundary's error enum
//! maps itself to its errno beside its definition (`errno()`); this module
//! only maps errnos to exit codes.

/// `dkey` exit codes, one per contract errno (documented in the README).
pub mod exit {
    pub const OK: u8 = 0;
    /// Anything not listed below (I/O, bad files, internal errors).
    pub const FAILURE: u8 = 1;
    /// Bad command-line usage.
    pub const USAGE: u8 = 2;
    /// EINVAL: malformed request.
    pub const INVALID: u8 = 3;
    /// EACCES: refused by policy.
    pub const DENIED: u8 = 4;
    /// ENODEV: no TPM reachable or configured; ENOKEY: no handler answered.
    pub const NO_TPM: u8 = 5;
    /// EIO: the TPM answered with an error.
    pub const TPM_ERROR: u8 = 6;
    /// ETIMEDOUT: the TPM did not answer in time.
    pub const TIMED_OUT: u8 = 7;
    /// `verify`: the signature does not verify.
    pub const BAD_SIGNATURE: u8 = 8;
    /// `status`: something is not in place.
    pub const NOT_READY: u8 = 9;
}

/// The exit code for a request that failed with `errno`.
pub fn exit_code_for_errno(errno: i32) -> u8 {
    match errno {
        libc::EINVAL => exit::INVALID,
        libc::EACCES => exit::DENIED,
        libc::ENODEV | libc::ENOKEY => exit::NO_TPM,
        libc::EIO => exit::TPM_ERROR,
        libc::ETIMEDOUT => exit::TIMED_OUT,
        _ => exit::FAILURE,
    }
}

/// The symbolic name of an errno the contract uses, for logs and messages
/// (the table is shared with the handler binary).
pub fn errno_name(errno: i32) -> &'static str {
    derived_keys_core::errno::name(errno)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        for (errno, code) in [
            (libc::EINVAL, exit::INVALID),
            (libc::EACCES, exit::DENIED),
            (libc::ENODEV, exit::NO_TPM),
            (libc::EIO, exit::TPM_ERROR),
            (libc::ETIMEDOUT, exit::TIMED_OUT),
            (libc::EPERM, exit::FAILURE),
        ] {
            assert_eq!(exit_code_for_errno(errno), code);
        }
    }
}
