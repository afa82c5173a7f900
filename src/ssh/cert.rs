//! A stateless SSH certificate authority: OpenSSH user and host
//! certificates signed by a derived key (the CA's private key exists only
//! inside the broker, for one signature).

use std::time::{SystemTime, UNIX_EPOCH};

use ssh_key::certificate::{Builder, CertType, Certificate};
use ssh_key::public::KeyData;
use ssh_key::{PublicKey, Signature};

use super::{SshError, SshKey};

impl signature::Signer<Signature> for SshKey {
    fn try_sign(&self, msg: &[u8]) -> Result<Signature, signature::Error> {
        self.sign(msg).map_err(signature::Error::from_source)
    }
}

impl From<&SshKey> for KeyData {
    fn from(k: &SshKey) -> KeyData {
        k.public.key_data().clone()
    }
}

/// What a certificate says.
#[derive(Debug, Clone)]
pub struct CertRequest {
    pub identity: String,
    pub principals: Vec<String>,
    pub host: bool,
    pub days: u32,
}

/// Why a certificate request is refused before anything is signed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("at least one --principal is needed")]
    NoPrincipal,
    #[error("--days must be 1 to 3650, not {days}")]
    Days { days: u32 },
    #[error("{0}")]
    Ssh(#[from] SshError),
    #[error("certificate: {0}")]
    Encoding(#[from] ssh_key::Error),
    #[error("no randomness for the certificate's nonce")]
    NoRandomness,
}

impl CertError {
    /// EINVAL for bad input (dkey's usage exit 3), the key's errno else.
    pub fn errno(&self) -> i32 {
        match self {
            CertError::NoPrincipal | CertError::Days { .. } | CertError::Encoding(_) => {
                libc::EINVAL
            }
            CertError::Ssh(e) => e.errno(),
            CertError::NoRandomness => libc::EIO,
        }
    }
}

/// Signs `subject` (an OpenSSH public key) with the CA key: valid from a
/// minute ago (clock skew) for `days` days, a random serial and nonce,
/// the principals given, and for user certificates the extensions
/// ssh-keygen grants by default.
pub fn certify(
    ca: &SshKey,
    subject: &PublicKey,
    req: &CertRequest,
) -> Result<Certificate, CertError> {
    if req.principals.is_empty() {
        return Err(CertError::NoPrincipal);
    }
    if !(1..=3650).contains(&req.days) {
        return Err(CertError::Days { days: req.days });
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut random = [0u8; 40];
    getrandom::getrandom(&mut random).map_err(|_| CertError::NoRandomness)?;
    let (nonce, serial) = random.split_at(32);
    let mut b = Builder::new(
        nonce.to_vec(),
        subject.key_data().clone(),
        now.saturating_sub(60),
        now + u64::from(req.days) * 86_400,
    )?;
    let mut serial_bytes = [0u8; 8];
    serial_bytes.copy_from_slice(serial);
    b.serial(u64::from_be_bytes(serial_bytes))?;
    b.key_id(req.identity.as_str())?;
    b.cert_type(if req.host {
        CertType::Host
    } else {
        CertType::User
    })?;
    for p in &req.principals {
        b.valid_principal(p.as_str())?;
    }
    if !req.host {
        for ext in [
            "permit-X11-forwarding",
            "permit-agent-forwarding",
            "permit-port-forwarding",
            "permit-pty",
            "permit-user-rc",
        ] {
            b.extension(ext, "")?;
        }
    }
    b.comment(subject.comment())?;
    Ok(b.sign(ca)?)
}
