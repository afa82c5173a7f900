//! The one table from errors to the contract's errnos and to `dkey`'s exit
//! codes. Each boundary has its own error enum; this module only maps.

use crate::config::ConfigError;
use crate::derive::DeriveError;
use crate::keyring::KeyringError;
use crate::policy::PolicyError;
use crate::request::RequestError;
use crate::requester::RequesterError;
use crate::tpm::TpmError;

/// Everything that can stop the handler from answering with a key.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("malformed request: {0}")]
    Request(#[from] RequestError),
    #[error("refused: {0}")]
    Policy(#[from] PolicyError),
    #[error("cannot identify the requester: {0}")]
    Requester(#[from] RequesterError),
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("TPM: {0}")]
    Tpm(#[from] TpmError),
    #[error("TPM broker: {0}")]
    Broker(#[from] crate::broker::BrokerError),
    #[error("derivation: {0}")]
    Derive(#[from] DeriveError),
    #[error("keyring: {0}")]
    Keyring(#[from] KeyringError),
    #[error("csum: {0}")]
    Csum(#[from] crate::csum::CsumError),
    #[error("no answer within {ms} ms")]
    TimedOut { ms: u128 },
}

impl HandlerError {
    /// The errno the requester's request_key(2) fails with.
    pub fn errno(&self) -> i32 {
        use HandlerError as H;
        match self {
            H::Request(_) => libc::EINVAL,
            H::Policy(_) | H::Requester(_) => libc::EACCES,
            H::Config(_) => libc::ENODEV,
            H::Tpm(TpmError::BadTcti { .. } | TpmError::Unreachable { .. }) => libc::ENODEV,
            H::Tpm(_) | H::Derive(_) => libc::EIO,
            H::Keyring(k) => k.errno().unwrap_or(libc::EIO),
            H::Broker(b) => b.errno(),
            H::Csum(c) => c.errno(),
            H::TimedOut { .. } => libc::ETIMEDOUT,
        }
    }
}

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
    crate::helper::errno::name(errno)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_table() {
        let e = HandlerError::Request(RequestError::BadCallout);
        assert_eq!(e.errno(), libc::EINVAL);
        let e = HandlerError::Policy(PolicyError::ForeignMountNamespace);
        assert_eq!(e.errno(), libc::EACCES);
        let e = HandlerError::Tpm(TpmError::BadTcti { tcti: "x".into() });
        assert_eq!(e.errno(), libc::ENODEV);
        let e = HandlerError::Tpm(TpmError::Lockout { rc: 0x921 });
        assert_eq!(e.errno(), libc::EIO);
        assert_eq!(HandlerError::TimedOut { ms: 1 }.errno(), libc::ETIMEDOUT);
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
