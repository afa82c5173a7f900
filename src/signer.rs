//! RustCrypto signers for derived keys: `signature::Keypair` and
//! `signature::Signer` for a key selector, so that x509-cert, rustls and
//! other Rust crates sign with a derived key that never enters this
//! process. Each signature is one request through the kernel.

use p256::pkcs8::DecodePublicKey;

use crate::client::{ClientError, KeyRequest};
use crate::request::{Algorithm, Selector};

/// Why no signer could be made.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("a {alg} key cannot make this kind of signature")]
    Algorithm { alg: &'static str },
    #[error("the handler returned a public key that is not P-256")]
    BadPublicKey,
}

impl SignerError {
    pub fn errno(&self) -> i32 {
        match self {
            SignerError::Client(c) => c.errno(),
            SignerError::Algorithm { .. } => libc::EINVAL,
            SignerError::BadPublicKey => libc::EIO,
        }
    }
}

/// A P-256 key named by a selector: ECDSA with SHA-256.
#[derive(Debug, Clone)]
pub struct P256Signer {
    request: KeyRequest,
    verifying: p256::ecdsa::VerifyingKey,
}

impl P256Signer {
    /// Asks the kernel for the key's public half once; signatures follow.
    pub fn new(sel: &Selector) -> Result<P256Signer, SignerError> {
        Self::with_request(KeyRequest::from_selector(sel)?)
    }

    /// The same for a request built by hand (or with another prefix).
    pub fn with_request(request: KeyRequest) -> Result<P256Signer, SignerError> {
        if request.algorithm() != Algorithm::P256 {
            return Err(SignerError::Algorithm {
                alg: request.algorithm().as_str(),
            });
        }
        let spki = request.public_key()?;
        let verifying = p256::ecdsa::VerifyingKey::from_public_key_der(&spki)
            .map_err(|_| SignerError::BadPublicKey)?;
        Ok(P256Signer { request, verifying })
    }

    fn der(&self, msg: &[u8]) -> Result<p256::ecdsa::DerSignature, signature::Error> {
        let raw = self
            .request
            .sign_message(msg)
            .map_err(signature::Error::from_source)?;
        p256::ecdsa::DerSignature::from_bytes(&raw)
    }
}

impl signature::Keypair for P256Signer {
    type VerifyingKey = p256::ecdsa::VerifyingKey;
    fn verifying_key(&self) -> p256::ecdsa::VerifyingKey {
        self.verifying
    }
}

impl signature::Signer<p256::ecdsa::DerSignature> for P256Signer {
    fn try_sign(&self, msg: &[u8]) -> Result<p256::ecdsa::DerSignature, signature::Error> {
        self.der(msg)
    }
}

impl signature::Signer<p256::ecdsa::Signature> for P256Signer {
    fn try_sign(&self, msg: &[u8]) -> Result<p256::ecdsa::Signature, signature::Error> {
        p256::ecdsa::Signature::from_der(self.der(msg)?.as_bytes())
    }
}

impl p256::pkcs8::spki::SignatureAlgorithmIdentifier for P256Signer {
    type Params = p256::pkcs8::der::AnyRef<'static>;
    const SIGNATURE_ALGORITHM_IDENTIFIER: p256::pkcs8::spki::AlgorithmIdentifier<Self::Params> =
        <p256::ecdsa::VerifyingKey as p256::pkcs8::spki::SignatureAlgorithmIdentifier>::SIGNATURE_ALGORITHM_IDENTIFIER;
}
