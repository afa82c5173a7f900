//! The SSH front end: OpenSSH public key lines for derived keys, and an
//! agent (draft-miller-ssh-agent) that lists key selectors as identities
//! and signs each request through the kernel. The agent holds no private
//! key; adding, removing and locking identities fail.
//!
//! Only this module uses the SSH crates (ssh-agent-lib's protocol types,
//! ssh-key's key formats); it reaches keys through the library's public
//! API ([`crate::client`]), like any other program.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use p256::pkcs8::DecodePublicKey;
use ssh_agent_lib::proto::{Identity, PublicCredential, Request, Response, SignRequest};
use ssh_encoding::{Decode, Encode};
use ssh_key::public::{EcdsaPublicKey, Ed25519PublicKey, KeyData};
use ssh_key::{PublicKey, Signature};

use crate::client::{ClientError, KeyRequest};
use crate::derive::ED25519_SPKI_PREFIX;
use crate::request::{Algorithm, RequestError, Selector};

pub mod cert;

/// Messages longer than this are refused (OpenSSH's own agent uses 256 KiB).
pub const MAX_MESSAGE: usize = 256 * 1024;
/// Connections served at once; more wait in the listen queue.
pub const MAX_CONNECTIONS: usize = 32;

/// The SSH front end's errors.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("key selector {selector:?}: {source}")]
    Selector {
        selector: String,
        #[source]
        source: RequestError,
    },
    #[error("{selector}: {source}")]
    Key {
        selector: String,
        #[source]
        source: ClientError,
    },
    #[error("{selector}: the handler returned a public key that is not {alg}")]
    BadPublicKey { selector: String, alg: &'static str },
    #[error("SSH encoding: {0}")]
    Encoding(#[from] ssh_key::Error),
}

impl SshError {
    /// The errno behind it, for dkey's exit codes: a bad selector is
    /// EINVAL (exit 3, a usage error), a refused key its request's errno.
    pub fn errno(&self) -> i32 {
        match self {
            SshError::Selector { .. } => libc::EINVAL,
            SshError::Key { source, .. } => source.errno(),
            SshError::BadPublicKey { .. } | SshError::Encoding(_) => libc::EIO,
        }
    }
}

/// One derived key as SSH sees it.
#[derive(Debug, Clone)]
pub struct SshKey {
    /// The selector as given: the key's comment.
    pub selector: String,
    pub request: KeyRequest,
    pub public: PublicKey,
}

impl SshKey {
    /// Parses `selector` and asks the kernel for its public key.
    pub fn derive(selector: &str) -> Result<SshKey, SshError> {
        Self::derive_with_prefix(selector, crate::request::DEFAULT_PREFIX)
    }

    /// The same under another description prefix (rules other than the
    /// standard one: tests, side-by-side installs).
    pub fn derive_with_prefix(selector: &str, prefix: &str) -> Result<SshKey, SshError> {
        let sel = Selector::parse(selector).map_err(|source| SshError::Selector {
            selector: selector.to_owned(),
            source,
        })?;
        let key_err = |source| SshError::Key {
            selector: selector.to_owned(),
            source,
        };
        let request = KeyRequest::from_selector(&sel)
            .map_err(key_err)?
            .prefix(prefix);
        let spki = request.public_key().map_err(key_err)?;
        let data = key_data(&spki, sel.alg).ok_or_else(|| SshError::BadPublicKey {
            selector: selector.to_owned(),
            alg: sel.alg.as_str(),
        })?;
        Ok(SshKey {
            selector: selector.to_owned(),
            request,
            public: PublicKey::new(data, selector),
        })
    }

    /// The OpenSSH public key line: `ecdsa-sha2-nistp256 AAAA... <selector>`.
    pub fn openssh_line(&self) -> Result<String, SshError> {
        Ok(self.public.to_openssh()?)
    }

    /// The SSH signature over `data` (SHA-256 ECDSA for P-256, pure
    /// Ed25519), made through the kernel.
    pub fn sign(&self, data: &[u8]) -> Result<Signature, SshError> {
        let key_err = |source| SshError::Key {
            selector: self.selector.clone(),
            source,
        };
        let raw = self.request.sign_message(data).map_err(key_err)?;
        match self.request.algorithm() {
            Algorithm::P256 => {
                let sig =
                    p256::ecdsa::Signature::from_der(&raw).map_err(|_| SshError::BadPublicKey {
                        selector: self.selector.clone(),
                        alg: "an ECDSA signature",
                    })?;
                Ok(Signature::try_from(sig)?)
            }
            Algorithm::Ed25519 => Ok(Signature::new(ssh_key::Algorithm::Ed25519, raw)?),
        }
    }
}

/// The SSH key data of a DER SubjectPublicKeyInfo.
fn key_data(spki: &[u8], alg: Algorithm) -> Option<KeyData> {
    match alg {
        Algorithm::P256 => {
            use p256::elliptic_curve::sec1::ToEncodedPoint;
            let key = p256::PublicKey::from_public_key_der(spki).ok()?;
            let point = key.to_encoded_point(false);
            EcdsaPublicKey::from_sec1_bytes(point.as_bytes())
                .ok()
                .map(KeyData::Ecdsa)
        }
        Algorithm::Ed25519 => {
            // RFC 8410: a 12-byte header, then the 32-byte key.
            let key: [u8; 32] = spki
                .strip_prefix(&ED25519_SPKI_PREFIX[..])?
                .try_into()
                .ok()?;
            Some(KeyData::Ed25519(Ed25519PublicKey(key)))
        }
    }
}

/// The agent: the identities it lists, in order.
#[derive(Debug)]
pub struct Agent {
    keys: Vec<SshKey>,
}

impl Agent {
    /// Derives the public key of every selector (once, at start).
    pub fn new(selectors: &[String], prefix: &str) -> Result<Agent, SshError> {
        let keys = selectors
            .iter()
            .map(|s| SshKey::derive_with_prefix(s, prefix))
            .collect::<Result<_, _>>()?;
        Ok(Agent { keys })
    }

    /// Answers one request. Anything that would add, remove or lock keys
    /// fails: the agent's keys are its selectors, nothing else.
    pub fn handle(&self, request: Request) -> Response {
        match request {
            Request::RequestIdentities => Response::IdentitiesAnswer(
                self.keys
                    .iter()
                    .map(|k| Identity {
                        credential: PublicCredential::Key(k.public.key_data().clone()),
                        comment: k.selector.clone(),
                    })
                    .collect(),
            ),
            Request::SignRequest(SignRequest {
                credential, data, ..
            }) => {
                let wanted = credential.key_data();
                let Some(key) = self.keys.iter().find(|k| k.public.key_data() == wanted) else {
                    return Response::Failure;
                };
                match key.sign(&data) {
                    Ok(sig) => Response::SignResponse(sig),
                    Err(_) => Response::Failure,
                }
            }
            // No extension is implemented (session-bind@openssh.com
            // included: this agent does not restrict keys by destination,
            // so it does not pretend to); OpenSSH goes on without it.
            Request::Extension(_) => Response::Failure,
            _ => Response::Failure,
        }
    }
}

/// Whether a peer may use the agent: its own uid, or root.
fn peer_allowed(s: &UnixStream) -> bool {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let me = nix::unistd::getuid().as_raw();
    getsockopt(s, PeerCredentials).is_ok_and(|c| c.uid() == me || c.uid() == 0)
}

/// Serves one connection until the peer closes it or misbehaves.
fn serve_connection(agent: &Agent, mut s: UnixStream) {
    if !peer_allowed(&s) {
        return;
    }
    // A peer that starts a message must finish it.
    let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
    loop {
        let mut len = [0u8; 4];
        let _ = s.set_read_timeout(None);
        if s.read_exact(&mut len).is_err() {
            return;
        }
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > MAX_MESSAGE {
            return;
        }
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let mut msg = vec![0u8; len];
        if s.read_exact(&mut msg).is_err() {
            return;
        }
        let response = match Request::decode(&mut &msg[..]) {
            Ok(req) => agent.handle(req),
            Err(_) => Response::Failure,
        };
        let mut out = Vec::new();
        let encoded = response
            .encoded_len()
            .and_then(|n| u32::try_from(n).map_err(|_| ssh_encoding::Error::Length))
            .and_then(|n| n.encode(&mut out))
            .and_then(|()| response.encode(&mut out));
        if encoded.is_err() || s.write_all(&out).is_err() {
            return;
        }
    }
}

/// Serves the agent on `listener` until it fails: at most
/// [`MAX_CONNECTIONS`] at once, each on a thread of its own.
pub fn serve(agent: &Agent, listener: &UnixListener) -> std::io::Result<()> {
    let active = AtomicUsize::new(0);
    std::thread::scope(|scope| loop {
        let (stream, _) = listener.accept()?;
        if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            drop(stream);
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let active = &active;
        let spawned = std::thread::Builder::new()
            .name("ssh-agent".into())
            .spawn_scoped(scope, move || {
                serve_connection(agent, stream);
                active.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ed25519_spki_prefix_is_rfc_8410() {
        let mut spki = ED25519_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(&[7; 32]);
        assert_eq!(
            key_data(&spki, Algorithm::Ed25519),
            Some(KeyData::Ed25519(Ed25519PublicKey([7; 32])))
        );
        assert_eq!(key_data(&spki[1..], Algorithm::Ed25519), None);
        assert_eq!(key_data(&spki, Algorithm::P256), None);
    }

    #[test]
    fn the_agent_refuses_what_would_change_it() {
        let agent = Agent { keys: Vec::new() };
        assert!(matches!(
            agent.handle(Request::RequestIdentities),
            Response::IdentitiesAnswer(ids) if ids.is_empty()
        ));
        for req in [
            Request::Lock("pw".into()),
            Request::Unlock("pw".into()),
            Request::RemoveAllIdentities,
        ] {
            assert!(matches!(agent.handle(req), Response::Failure));
        }
    }

    #[test]
    fn garbage_is_answered_with_failure_not_a_panic() {
        for bytes in [&b""[..], b"\x0b", b"\x0d\x00\x00\x00\x05abc", b"\xff\xff"] {
            if let Ok(req) = Request::decode(&mut &bytes[..]) {
                let _ = Agent { keys: Vec::new() }.handle(req);
            }
        }
    }
}
