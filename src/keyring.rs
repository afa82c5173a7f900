//! The kernel keyring boundary: the only module of the library that uses
//! linux-keyutils or keyctl. The client side asks with request_key(2) and
//! reads results; the broker leaves the request-key context it was started
//! from. (The request-key handler, a no-std program, makes its own few
//! keyctl calls in `src/bin/derived-key-helper/sys.rs`.)

use std::ffi::CString;

use linux_keyutils::{Key, KeyError, KeySerialId};

use crate::secret::{SecretAllocError, SecretBuf};
use crate::sys;

/// KEY_SPEC_PROCESS_KEYRING.
pub const PROCESS_KEYRING: i32 = -2;
/// KEY_SPEC_SESSION_KEYRING.
pub const SESSION_KEYRING: i32 = -3;

/// The keyring boundary's errors; `op` names the keyctl operation.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("keyctl {op} on key {key} failed")]
    Keyctl {
        op: &'static str,
        key: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("keyctl {op} on key {key} failed: {source:?}")]
    Keyutils {
        op: &'static str,
        key: i32,
        source: KeyError,
    },
    #[error("the kernel returned {got} bytes for {what}, more than the {max} allowed")]
    Length {
        what: &'static str,
        got: usize,
        max: usize,
    },
    #[error("key {key} has a malformed description record")]
    Describe { key: i32 },
    #[error("request_key for {description:?} failed")]
    Request {
        description: String,
        #[source]
        source: std::io::Error,
    },
    #[error("description or callout contains a NUL byte")]
    Nul,
    #[error(transparent)]
    Memory(#[from] SecretAllocError),
}

impl KeyringError {
    /// The errno behind this error, if the kernel gave one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            KeyringError::Keyctl { source, .. } | KeyringError::Request { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }
}

/// A key as KEYCTL_DESCRIBE reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub key_type: Vec<u8>,
    pub uid: u32,
    pub gid: u32,
    pub perm: u32,
    pub description: Vec<u8>,
}

impl KeyRecord {
    /// Parses `type;uid;gid;perm;description` (the description may hold `;`).
    pub fn parse(raw: &[u8]) -> Option<KeyRecord> {
        let mut it = raw.splitn(5, |&b| b == b';');
        let key_type = it.next()?.to_vec();
        let num = |b: Option<&[u8]>| std::str::from_utf8(b?).ok()?.parse::<u32>().ok();
        let uid = num(it.next())?;
        let gid = num(it.next())?;
        let perm = u32::from_str_radix(std::str::from_utf8(it.next()?).ok()?, 16).ok()?;
        let description = it.next()?.to_vec();
        Some(KeyRecord {
            key_type,
            uid,
            gid,
            perm,
            description,
        })
    }
}

/// Leaves the request-key context a child process inherited: drops any
/// instantiation authority, joins a fresh anonymous session keyring (the
/// handler's is the request's `_req.<serial>`, which holds its
/// authorization key), and empties any thread or process keyring (fork and
/// exec already drop them; the kernel offers no call to drop one, so an
/// inherited one is cleared). The old keyrings still live on in whatever
/// holds the old credentials, every file opened under them included: the
/// broker reopens its standard streams and executes itself again
/// (`broker::serve`).
pub fn detach() -> Result<(), KeyringError> {
    use linux_keyutils::{KeyRing, KeyRingIdentifier};
    sys::keyctl_drop_authority().map_err(|source| KeyringError::Keyctl {
        op: "assume_authority",
        key: 0,
        source,
    })?;
    sys::keyctl_new_session().map_err(|source| KeyringError::Keyctl {
        op: "join_session_keyring",
        key: 0,
        source,
    })?;
    for (id, special) in [
        (KeyRingIdentifier::Thread, -1),
        (KeyRingIdentifier::Process, PROCESS_KEYRING),
    ] {
        // ENOKEY (none) is the usual answer.
        if let Ok(ring) = KeyRing::from_special_id(id, false) {
            ring.clear().map_err(|source| KeyringError::Keyutils {
                op: "clear",
                key: special,
                source,
            })?;
        }
    }
    Ok(())
}

/// The caller's session keyring, made linkable for its owner's other
/// processes: the serial, after adding write permission for the owner's
/// uid (possessor: all; owner: view, read, write, link). The broker's
/// handlers, root like it, link their authorization key into it for the
/// length of a request, so that the broker's views of /proc/keys (whose
/// credentials hold this session keyring) possess it and list its line
/// ([`crate::requester::keys`]). Other users cannot link into it: they
/// are not its owner, and it grants nothing to others.
pub fn session_for_handlers() -> Result<i32, KeyringError> {
    use linux_keyutils::{Key, KeyPermissionsBuilder, KeySerialId, Permission};
    let id = sys::keyctl_session_id().map_err(|source| KeyringError::Keyctl {
        op: "get_keyring_id",
        key: SESSION_KEYRING,
        source,
    })?;
    let perms = KeyPermissionsBuilder::builder()
        .posessor(Permission::ALL)
        .user(Permission::VIEW | Permission::READ | Permission::WRITE | Permission::LINK)
        .build();
    Key::from_id(KeySerialId::new(id))
        .set_perms(perms)
        .map_err(|source| KeyringError::Keyutils {
            op: "setperm",
            key: id,
            source,
        })?;
    Ok(id)
}

/// Whether keyring `id` is an anonymous session keyring (the kernel's
/// `_ses`): the one record the broker's views may pass over before the
/// authorization key's ([`derived_keys_core::proc_keys::FirstRecord`]).
pub fn is_anonymous_session(id: i32) -> bool {
    use linux_keyutils::{Key, KeySerialId, KeyType};
    Key::from_id(KeySerialId::new(id))
        .metadata()
        .is_ok_and(|m| {
            m.get_type() == KeyType::KeyRing
                && m.get_description().as_bytes() == derived_keys_core::proc_keys::ANON_SESSION
        })
}

/// request_key(2) into `dest` (a keyring serial or special id).
pub fn request(
    key_type: &str,
    description: &str,
    callout: Option<&str>,
    dest: i32,
) -> Result<i32, KeyringError> {
    let t = CString::new(key_type).map_err(|_| KeyringError::Nul)?;
    let d = CString::new(description).map_err(|_| KeyringError::Nul)?;
    let c = callout
        .map(CString::new)
        .transpose()
        .map_err(|_| KeyringError::Nul)?;
    sys::request_key(&t, &d, c.as_deref(), dest).map_err(|source| KeyringError::Request {
        description: description.to_owned(),
        source,
    })
}

/// Reads a payload into `buf`; the kernel returns the full length even
/// when the buffer is smaller, so that length is checked, not trusted.
fn read_into(key: i32, buf: &mut [u8]) -> Result<usize, KeyringError> {
    let got = Key::from_id(KeySerialId::new(key))
        .read(&mut &mut *buf)
        .map_err(|source| KeyringError::Keyutils {
            op: "read",
            key,
            source,
        })?;
    if got > buf.len() {
        return Err(KeyringError::Length {
            what: "key payload",
            got,
            max: buf.len(),
        });
    }
    Ok(got)
}

/// Reads a key's payload into secret memory (user keys hold at most 32767 bytes).
pub fn read_secret(key: i32) -> Result<SecretBuf, KeyringError> {
    let mut buf = SecretBuf::new(32767)?;
    let got = read_into(key, buf.as_mut())?;
    Ok(SecretBuf::copy_from(&buf.as_ref()[..got])?)
}

/// Reads a public payload (public key, signature).
pub fn read_public(key: i32) -> Result<Vec<u8>, KeyringError> {
    let mut buf = vec![0u8; 4096];
    let got = read_into(key, &mut buf)?;
    buf.truncate(got);
    Ok(buf)
}

/// Invalidates a key: gone from every keyring at once.
pub fn invalidate(key: i32) -> Result<(), KeyringError> {
    Key::from_id(KeySerialId::new(key))
        .invalidate()
        .map_err(|source| KeyringError::Keyutils {
            op: "invalidate",
            key,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_records_parse() {
        let r = KeyRecord::parse(b"user;1000;1000;3f010000;derived:db;x").unwrap();
        assert_eq!(r.key_type, b"user");
        assert_eq!((r.uid, r.gid, r.perm), (1000, 1000, 0x3f01_0000));
        assert_eq!(r.description, b"derived:db;x");
        assert!(KeyRecord::parse(b"user;x;0;0;d").is_none());
        assert!(KeyRecord::parse(b"user;0;0;zz;d").is_none());
        assert!(KeyRecord::parse(b"user;0;0").is_none());
    }
}
