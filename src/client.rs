//! The library programs use to ask for keys through the kernel.
//!
//! Every request gets a fresh random `#<tag>`, goes into the calling
//! process's own keyring, and (except `logon` keys, which exist to be used
//! by the kernel) is invalidated as soon as its payload is read. So no
//! other process can read the result from a shared keyring, and no key
//! planted under a predictable description can be handed to us.
//!
//! ```no_run
//! use derived_keys::client::KeyRequest;
//! use derived_keys::request::Binding;
//!
//! # fn main() -> Result<(), derived_keys::client::ClientError> {
//! // A 32-byte key for this program (path binding), rotated once.
//! let key = KeyRequest::new("db")?.binding(Binding::Path).epoch(1).symmetric(32)?;
//! assert_eq!(key.as_ref().len(), 32);
//!
//! // A P-256 identity for this host, and a signature by it.
//! let host = KeyRequest::new("host-id")?.binding(Binding::Machine);
//! let spki_der = host.public_key()?;
//! let signature = host.sign_message(b"enrollment request")?;
//! assert!(derived_keys::client::verify_message(&spki_der, b"enrollment request", &signature));
//!
//! // The Ed25519 key of the same name: another key, signing the message
//! // itself (1 to 1024 bytes) with 64-byte RFC 8032 signatures.
//! use derived_keys::request::Algorithm;
//! let ssh = KeyRequest::new("host-id")?.binding(Binding::Machine).alg(Algorithm::Ed25519);
//! let ed_spki = ssh.public_key()?;
//! let ed_sig = ssh.sign_message(b"challenge")?;
//! assert_eq!(ed_sig.len(), 64);
//! assert!(derived_keys::client::verify_message(&ed_spki, b"challenge", &ed_sig));
//! # Ok(())
//! # }
//! ```

use sha2::{Digest, Sha256};

use crate::keyring::{self, KeyringError, PROCESS_KEYRING};
use crate::request::{
    Algorithm, Binding, Digest32, KeyType, Message, Meta, Name, Options, Request, RequestError,
    Selector, Tag, Want, DEFAULT_PREFIX, MAX_SYMMETRIC_LEN,
};
use crate::secret::SecretBuf;

/// What went wrong with a request, by the contract's errno.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid request: {0}")]
    Invalid(#[from] RequestError),
    #[error("{description}: the handler found the request malformed (EINVAL)")]
    Malformed { description: String },
    #[error("{description}: refused by policy (EACCES)")]
    Denied { description: String },
    #[error("{description}: no TPM reachable or configured (ENODEV); run `dkey status`")]
    NoTpm { description: String },
    #[error("{description}: the TPM answered with an error (EIO)")]
    Tpm { description: String },
    #[error("{description}: the TPM did not answer in time (ETIMEDOUT)")]
    TimedOut { description: String },
    #[error("{description}: no handler answered (ENOKEY); is the request-key rule installed? run `dkey status`")]
    NoHandler { description: String },
    #[error("keyring: {0}")]
    Keyring(KeyringError),
}

impl ClientError {
    /// The errno behind this error (EINVAL for requests refused locally).
    pub fn errno(&self) -> i32 {
        match self {
            ClientError::Invalid(_) | ClientError::Malformed { .. } => libc::EINVAL,
            ClientError::Denied { .. } => libc::EACCES,
            ClientError::NoTpm { .. } => libc::ENODEV,
            ClientError::Tpm { .. } => libc::EIO,
            ClientError::TimedOut { .. } => libc::ETIMEDOUT,
            ClientError::NoHandler { .. } => libc::ENOKEY,
            ClientError::Keyring(k) => k.errno().unwrap_or(libc::EIO),
        }
    }

    fn from_keyring(e: KeyringError) -> ClientError {
        let description = match &e {
            KeyringError::Request { description, .. } => description.clone(),
            _ => return ClientError::Keyring(e),
        };
        match e.errno() {
            Some(libc::EINVAL) => ClientError::Malformed { description },
            Some(libc::EACCES) => ClientError::Denied { description },
            Some(libc::ENODEV) => ClientError::NoTpm { description },
            Some(libc::EIO) => ClientError::Tpm { description },
            Some(libc::ETIMEDOUT) => ClientError::TimedOut { description },
            Some(libc::ENOKEY) => ClientError::NoHandler { description },
            _ => ClientError::Keyring(e),
        }
    }
}

/// A request under construction: name, binding, options, and the
/// algorithm of its key pair (P-256 unless told otherwise).
#[derive(Debug, Clone)]
pub struct KeyRequest {
    name: Name,
    binding: Binding,
    options: Options,
    prefix: String,
    alg: Algorithm,
}

/// A key left in a keyring (a `logon` key for the kernel to use, or a
/// `user` key a script asked to keep).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptKey {
    pub serial: i32,
    /// The full description, tag included: what dm-crypt or an encrypted
    /// key refers to (`logon:<description>`).
    pub description: String,
}

fn fresh_tag() -> Result<Tag, ClientError> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).map_err(|e| {
        ClientError::Keyring(KeyringError::Keyctl {
            op: "getrandom",
            key: 0,
            source: std::io::Error::from(e),
        })
    })?;
    Ok(Tag::parse(hex::encode(bytes).as_bytes())?)
}

impl KeyRequest {
    /// A request for key `name` (1 to 64 of `A-Z a-z 0-9 . _ -`), bound to
    /// the calling program's path until told otherwise.
    pub fn new(name: &str) -> Result<KeyRequest, ClientError> {
        Ok(KeyRequest {
            name: Name::parse(name.as_bytes())?,
            binding: Binding::Path,
            options: Options::default(),
            prefix: DEFAULT_PREFIX.to_owned(),
            alg: Algorithm::P256,
        })
    }

    /// The key a selector names (`machine:host,epoch=2`,
    /// `git,alg=ed25519`): its binding, options and algorithm.
    pub fn from_selector(sel: &Selector) -> Result<KeyRequest, ClientError> {
        Ok(KeyRequest {
            name: sel.name.clone(),
            binding: sel.binding,
            options: sel.options.clone(),
            prefix: DEFAULT_PREFIX.to_owned(),
            alg: sel.alg,
        })
    }

    /// The algorithm of the key pair that [`KeyRequest::public_key`] and
    /// [`KeyRequest::sign_message`] use: P-256 (the default) or Ed25519, a
    /// different key of the same name. Symmetric keys do not depend on it.
    pub fn alg(mut self, alg: Algorithm) -> KeyRequest {
        self.alg = alg;
        self
    }

    /// The algorithm this request's key pair has.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// Whose key it is: `Path`, `Csum`, `User` or `Machine`.
    pub fn binding(mut self, binding: Binding) -> KeyRequest {
        self.binding = binding;
        self
    }

    /// Extra binding metadata (1 to 128 of `A-Z a-z 0-9 . _ @ + -`).
    pub fn account(mut self, account: &str) -> Result<KeyRequest, ClientError> {
        self.options.account = Some(Meta::parse("account", account.as_bytes())?);
        Ok(self)
    }

    /// Extra binding metadata (1 to 128 of `A-Z a-z 0-9 . _ @ + -`).
    pub fn client(mut self, client: &str) -> Result<KeyRequest, ClientError> {
        self.options.client = Some(Meta::parse("client", client.as_bytes())?);
        Ok(self)
    }

    /// The key's epoch: a new epoch is a new key (rotation).
    pub fn epoch(mut self, epoch: u32) -> KeyRequest {
        self.options.epoch = epoch;
        self
    }

    /// The description prefix; only for rules other than the standard
    /// `derived:` one (tests, side-by-side installs).
    pub fn prefix(mut self, prefix: &str) -> KeyRequest {
        self.prefix = prefix.to_owned();
        self
    }

    fn typed(&self, key_type: KeyType, want: Want) -> Result<Request, ClientError> {
        Ok(Request {
            key_type,
            name: self.name.clone(),
            want,
            tag: Some(fresh_tag()?),
            binding: self.binding,
            options: self.options.clone(),
        })
    }

    /// Asks the kernel; returns the new key's serial in `dest`.
    fn ask(&self, req: &Request, dest: i32) -> Result<(i32, String), ClientError> {
        let description = req.description(&self.prefix);
        let serial = keyring::request(
            req.key_type.as_str(),
            &description,
            Some(&req.callout()),
            dest,
        )
        .map_err(ClientError::from_keyring)?;
        Ok((serial, description))
    }

    /// Reads a result and drops it from every keyring at once.
    fn take<T>(
        serial: i32,
        read: impl FnOnce(i32) -> Result<T, KeyringError>,
    ) -> Result<T, ClientError> {
        let got = read(serial);
        let dropped = keyring::invalidate(serial);
        let got = got.map_err(ClientError::Keyring)?;
        dropped.map_err(ClientError::Keyring)?;
        Ok(got)
    }

    fn check_len(len: usize) -> Result<u16, ClientError> {
        u16::try_from(len)
            .ok()
            .filter(|l| (1..=MAX_SYMMETRIC_LEN).contains(l))
            .ok_or_else(|| {
                ClientError::Invalid(RequestError::BadSpec {
                    spec: len.to_string(),
                })
            })
    }

    /// A symmetric key of `len` bytes (1 to 1024), in secret memory.
    pub fn symmetric(&self, len: usize) -> Result<SecretBuf, ClientError> {
        let len = Self::check_len(len)?;
        let req = self.typed(KeyType::User, Want::Symmetric { len })?;
        let (serial, _) = self.ask(&req, PROCESS_KEYRING)?;
        Self::take(serial, keyring::read_secret)
    }

    /// A symmetric `logon` key left in keyring `dest` (a serial, or a
    /// special id such as -3 for the session keyring) for the kernel to
    /// use; its bytes never reach user space.
    pub fn logon(&self, len: usize, dest: i32) -> Result<KeptKey, ClientError> {
        self.keep(len, KeyType::Logon, dest)
    }

    /// A symmetric key of either type left in keyring `dest`. A `user`
    /// key there is readable by every process that possesses `dest`.
    pub fn keep(&self, len: usize, key_type: KeyType, dest: i32) -> Result<KeptKey, ClientError> {
        let len = Self::check_len(len)?;
        let req = self.typed(key_type, Want::Symmetric { len })?;
        let (serial, description) = self.ask(&req, dest)?;
        Ok(KeptKey {
            serial,
            description,
        })
    }

    /// The public key, DER SubjectPublicKeyInfo: P-256 (id-ecPublicKey,
    /// 91 bytes) or Ed25519 (RFC 8410 id-Ed25519, 44 bytes), by
    /// [`KeyRequest::alg`].
    pub fn public_key(&self) -> Result<Vec<u8>, ClientError> {
        let req = self.typed(KeyType::User, Want::PublicKey(self.alg))?;
        self.ask_and_take(&req)
    }

    /// An ECDSA P-256 signature (DER) over a SHA-256 digest. An Ed25519 key
    /// signs no digest (pure RFC 8032 hashes the message itself): use
    /// [`KeyRequest::sign_message`].
    pub fn sign_digest(&self, digest: &[u8; 32]) -> Result<Vec<u8>, ClientError> {
        if self.alg != Algorithm::P256 {
            return Err(ClientError::Invalid(RequestError::DigestForMessageSigner {
                alg: self.alg.as_str(),
            }));
        }
        let req = self.typed(KeyType::User, Want::Sign(Digest32(*digest)))?;
        self.ask_and_take(&req)
    }

    /// A signature over `message`: for P-256, ECDSA (DER) over its SHA-256;
    /// for Ed25519, the 64-byte pure RFC 8032 signature over the message
    /// itself, which travels to the handler in the callout and so is 1 to
    /// 1024 bytes.
    pub fn sign_message(&self, message: &[u8]) -> Result<Vec<u8>, ClientError> {
        match self.alg {
            Algorithm::P256 => self.sign_digest(&Sha256::digest(message).into()),
            Algorithm::Ed25519 => {
                let req = self.typed(KeyType::User, Want::SignEd25519(Message::new(message)?))?;
                self.ask_and_take(&req)
            }
        }
    }

    /// Asks into this process's keyring, reads the (public) result and
    /// drops it.
    fn ask_and_take(&self, req: &Request) -> Result<Vec<u8>, ClientError> {
        let (serial, _) = self.ask(req, PROCESS_KEYRING)?;
        Self::take(serial, keyring::read_public)
    }
}

/// Verifies a signature over `message` with a DER SubjectPublicKeyInfo,
/// by the key's algorithm: P-256, a DER (or raw r||s) ECDSA signature over
/// SHA-256(`message`); Ed25519, a 64-byte RFC 8032 signature over the
/// message itself.
pub fn verify_message(spki_der: &[u8], message: &[u8], signature: &[u8]) -> bool {
    use crate::derive::PublicKey;
    match PublicKey::from_der(spki_der) {
        Some(PublicKey::P256(der)) => {
            crate::derive::verify_digest(&der, &Sha256::digest(message).into(), signature)
        }
        Some(PublicKey::Ed25519(_)) => crate::derive::verify_ed25519(spki_der, message, signature),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_validates_inputs() {
        assert!(KeyRequest::new("db").is_ok());
        assert!(matches!(
            KeyRequest::new("a b"),
            Err(ClientError::Invalid(_))
        ));
        assert!(KeyRequest::new("db").unwrap().account("a/b").is_err());
        assert!(KeyRequest::new("db")
            .unwrap()
            .client(&"c".repeat(129))
            .is_err());
        let r = KeyRequest::new("db").unwrap();
        assert!(matches!(r.symmetric(0), Err(ClientError::Invalid(_))));
        assert!(matches!(r.symmetric(1025), Err(ClientError::Invalid(_))));
    }

    #[test]
    fn requests_carry_fresh_tags_and_canonical_callouts() {
        let r = KeyRequest::new("db")
            .unwrap()
            .binding(Binding::User)
            .account("alice")
            .unwrap()
            .epoch(2);
        let a = r.typed(KeyType::User, Want::Symmetric { len: 32 }).unwrap();
        let b = r.typed(KeyType::User, Want::Symmetric { len: 32 }).unwrap();
        assert_ne!(a.description("derived"), b.description("derived"));
        assert!(a.description("derived").starts_with("derived:db#"));
        assert_eq!(a.callout(), "32 user account=alice epoch=2");
        // What the library sends parses back to what it meant.
        let back = Request::parse(
            b"user",
            a.description("derived").as_bytes(),
            a.callout().as_bytes(),
            "derived",
        )
        .unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn the_algorithm_picks_the_request() {
        let r = KeyRequest::new("git").unwrap().binding(Binding::User);
        assert_eq!(r.algorithm(), Algorithm::P256);
        let ed = r.clone().alg(Algorithm::Ed25519);
        let public = ed
            .typed(KeyType::User, Want::PublicKey(ed.algorithm()))
            .unwrap();
        assert_eq!(public.callout(), "ed25519 user");
        assert!(matches!(
            ed.sign_digest(&[0; 32]),
            Err(ClientError::Invalid(
                RequestError::DigestForMessageSigner { .. }
            ))
        ));
        for bad in [&b""[..], &[1; 1025]] {
            assert!(matches!(
                ed.sign_message(bad),
                Err(ClientError::Invalid(RequestError::MessageLength { .. }))
            ));
        }
        let sel = Selector::parse("machine:git,epoch=2,alg=ed25519").unwrap();
        let from_sel = KeyRequest::from_selector(&sel).unwrap();
        assert_eq!(from_sel.algorithm(), Algorithm::Ed25519);
        let via_lib = from_sel
            .typed(KeyType::User, Want::PublicKey(from_sel.algorithm()))
            .unwrap();
        let mut via_sel = sel.public_key_request(None).unwrap();
        via_sel.tag = via_lib.tag.clone();
        assert_eq!(via_lib, via_sel);
    }

    #[test]
    fn errno_mapping() {
        let e = |errno| {
            ClientError::from_keyring(KeyringError::Request {
                description: "d".into(),
                source: std::io::Error::from_raw_os_error(errno),
            })
        };
        assert!(matches!(e(libc::EACCES), ClientError::Denied { .. }));
        assert!(matches!(e(libc::ENODEV), ClientError::NoTpm { .. }));
        assert!(matches!(e(libc::ENOKEY), ClientError::NoHandler { .. }));
        assert_eq!(e(libc::ETIMEDOUT).errno(), libc::ETIMEDOUT);
        assert_eq!(e(libc::EIO).errno(), libc::EIO);
        assert_eq!(e(libc::EINVAL).errno(), libc::EINVAL);
    }
}
