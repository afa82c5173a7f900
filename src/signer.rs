//! RustCrypto signers for derived keys: `signature::Keypair` and
//! `signature::Signer` for a key selector, so that x509-cert, rustls and
//! other Rust crates sign with a derived key that never enters this
//! process. Each signature is one request through the kernel.
//!
//! [`P256Signer`] (ECDSA with SHA-256) and [`Ed25519Signer`] (pure RFC 8032
//! Ed25519) are the signers; [`DerivedSigner`] is either, chosen by the
//! selector's `alg`. examples/rustls_server.rs serves TLS with them.
//!
//! ```no_run
//! use derived_keys::request::Selector;
//! use derived_keys::signer::{DerivedSigner, Ed25519Signer};
//! use derived_keys::x509;
//! use signature::{Keypair, Signer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let sel = Selector::parse("machine:web,alg=ed25519")?;
//! let signer = Ed25519Signer::new(&sel)?;
//! let sig: ed25519_dalek::Signature = signer.try_sign(b"hello")?;
//! signer.verifying_key().verify_strict(b"hello", &sig)?;
//!
//! // A certificate request for whichever key a selector names.
//! let any = DerivedSigner::new(&sel)?;
//! let csr_pem = x509::csr(&any, &x509::parse_subject("CN=web.example")?, &[])?;
//! # Ok(())
//! # }
//! ```

use p256::pkcs8::der::asn1::{BitString, ObjectIdentifier};
use p256::pkcs8::der::AnyRef;
use p256::pkcs8::spki::{
    AlgorithmIdentifier, SignatureAlgorithmIdentifier, SignatureBitStringEncoding,
};
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
    #[error("the handler returned a public key that is not {alg}")]
    BadPublicKey { alg: &'static str },
}

impl SignerError {
    pub fn errno(&self) -> i32 {
        match self {
            SignerError::Client(c) => c.errno(),
            SignerError::Algorithm { .. } => libc::EINVAL,
            SignerError::BadPublicKey { .. } => libc::EIO,
        }
    }
}

/// The request, if it is for a key pair of `alg`.
fn expect_alg(request: KeyRequest, alg: Algorithm) -> Result<KeyRequest, SignerError> {
    if request.algorithm() == alg {
        Ok(request)
    } else {
        Err(SignerError::Algorithm {
            alg: request.algorithm().as_str(),
        })
    }
}

/// A P-256 key named by a selector: ECDSA with SHA-256.
#[derive(Debug, Clone)]
pub struct P256Signer {
    request: KeyRequest,
    verifying: p256::ecdsa::VerifyingKey,
    spki: Vec<u8>,
}

impl P256Signer {
    /// Asks the kernel for the key's public half once; signatures follow.
    pub fn new(sel: &Selector) -> Result<P256Signer, SignerError> {
        Self::with_request(KeyRequest::from_selector(sel)?)
    }

    /// The same for a request built by hand (or with another prefix).
    pub fn with_request(request: KeyRequest) -> Result<P256Signer, SignerError> {
        let request = expect_alg(request, Algorithm::P256)?;
        let spki = request.public_key()?;
        let verifying = p256::ecdsa::VerifyingKey::from_public_key_der(&spki)
            .map_err(|_| SignerError::BadPublicKey { alg: "P-256" })?;
        Ok(P256Signer {
            request,
            verifying,
            spki,
        })
    }

    /// The public key as the handler gave it: DER SubjectPublicKeyInfo.
    pub fn public_key_der(&self) -> &[u8] {
        &self.spki
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

impl SignatureAlgorithmIdentifier for P256Signer {
    type Params = AnyRef<'static>;
    const SIGNATURE_ALGORITHM_IDENTIFIER: AlgorithmIdentifier<Self::Params> =
        <p256::ecdsa::VerifyingKey as SignatureAlgorithmIdentifier>::SIGNATURE_ALGORITHM_IDENTIFIER;
}

/// An Ed25519 key named by a selector (`...,alg=ed25519`): pure RFC 8032
/// signatures over the message itself, which travels to the handler in
/// the callout and so is 1 to 1024 bytes; a longer (or empty) message is a
/// `signature::Error`.
#[derive(Debug, Clone)]
pub struct Ed25519Signer {
    request: KeyRequest,
    verifying: ed25519_dalek::VerifyingKey,
    spki: Vec<u8>,
}

impl Ed25519Signer {
    /// Asks the kernel for the key's public half once; signatures follow.
    pub fn new(sel: &Selector) -> Result<Ed25519Signer, SignerError> {
        Self::with_request(KeyRequest::from_selector(sel)?)
    }

    /// The same for a request built by hand (or with another prefix).
    pub fn with_request(request: KeyRequest) -> Result<Ed25519Signer, SignerError> {
        let request = expect_alg(request, Algorithm::Ed25519)?;
        let spki = request.public_key()?;
        let verifying = ed25519_dalek::VerifyingKey::from_public_key_der(&spki)
            .map_err(|_| SignerError::BadPublicKey { alg: "Ed25519" })?;
        Ok(Ed25519Signer {
            request,
            verifying,
            spki,
        })
    }

    /// The public key as the handler gave it: DER SubjectPublicKeyInfo
    /// (RFC 8410).
    pub fn public_key_der(&self) -> &[u8] {
        &self.spki
    }
}

impl signature::Keypair for Ed25519Signer {
    type VerifyingKey = ed25519_dalek::VerifyingKey;
    fn verifying_key(&self) -> ed25519_dalek::VerifyingKey {
        self.verifying
    }
}

impl signature::Signer<ed25519_dalek::Signature> for Ed25519Signer {
    fn try_sign(&self, msg: &[u8]) -> Result<ed25519_dalek::Signature, signature::Error> {
        let raw = self
            .request
            .sign_message(msg)
            .map_err(signature::Error::from_source)?;
        ed25519_dalek::Signature::from_slice(&raw)
    }
}

impl signature::Signer<Ed25519BitString> for Ed25519Signer {
    fn try_sign(&self, msg: &[u8]) -> Result<Ed25519BitString, signature::Error> {
        signature::Signer::<ed25519_dalek::Signature>::try_sign(self, msg).map(Ed25519BitString)
    }
}

/// id-Ed25519 (RFC 8410): the algorithm of the key and of its signatures.
const ID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");

impl SignatureAlgorithmIdentifier for Ed25519Signer {
    type Params = AnyRef<'static>;
    // RFC 8410 section 3: the parameters are absent.
    const SIGNATURE_ALGORITHM_IDENTIFIER: AlgorithmIdentifier<Self::Params> = AlgorithmIdentifier {
        oid: ID_ED25519,
        parameters: None,
    };
}

/// An Ed25519 signature as X.509 and PKCS#10 carry it: the 64 bytes in a
/// BIT STRING. x509-cert's builders sign into a type with spki's
/// `SignatureBitStringEncoding`, which ecdsa implements for `DerSignature`
/// but ed25519 2.2 does not implement for its `Signature` (and neither is
/// ours to implement it for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ed25519BitString(pub ed25519_dalek::Signature);

impl SignatureBitStringEncoding for Ed25519BitString {
    fn to_bitstring(&self) -> p256::pkcs8::der::Result<BitString> {
        BitString::from_bytes(&self.0.to_bytes())
    }
}

/// The signer for a selector, whichever its algorithm: what a program that
/// takes a selector from its user holds.
#[derive(Debug, Clone)]
pub enum DerivedSigner {
    P256(P256Signer),
    Ed25519(Ed25519Signer),
}

impl DerivedSigner {
    /// The selector's key (P-256 unless it says `alg=ed25519`); asks the
    /// kernel for its public half once.
    pub fn new(sel: &Selector) -> Result<DerivedSigner, SignerError> {
        Self::with_request(KeyRequest::from_selector(sel)?)
    }

    /// The same for a request built by hand (or with another prefix).
    pub fn with_request(request: KeyRequest) -> Result<DerivedSigner, SignerError> {
        Ok(match request.algorithm() {
            Algorithm::P256 => DerivedSigner::P256(P256Signer::with_request(request)?),
            Algorithm::Ed25519 => DerivedSigner::Ed25519(Ed25519Signer::with_request(request)?),
        })
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            DerivedSigner::P256(_) => Algorithm::P256,
            DerivedSigner::Ed25519(_) => Algorithm::Ed25519,
        }
    }

    /// The public key as the handler gave it: DER SubjectPublicKeyInfo.
    pub fn public_key_der(&self) -> &[u8] {
        match self {
            DerivedSigner::P256(s) => s.public_key_der(),
            DerivedSigner::Ed25519(s) => s.public_key_der(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::pkcs8::der::Encode;
    use p256::pkcs8::spki::DynSignatureAlgorithmIdentifier;
    use p256::pkcs8::EncodePublicKey;
    use signature::Signer as _;

    /// A signer for a key no kernel was asked about: enough to see what
    /// is refused before any request.
    fn offline_ed25519() -> Ed25519Signer {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let verifying = key.verifying_key();
        Ed25519Signer {
            request: KeyRequest::new("x").unwrap().alg(Algorithm::Ed25519),
            spki: verifying.to_public_key_der().unwrap().into_vec(),
            verifying,
        }
    }

    #[test]
    fn a_signer_refuses_a_request_of_the_other_algorithm_before_asking() {
        let ed = KeyRequest::new("x").unwrap().alg(Algorithm::Ed25519);
        let p = KeyRequest::new("x").unwrap();
        assert!(matches!(
            P256Signer::with_request(ed),
            Err(SignerError::Algorithm { alg: "ed25519" })
        ));
        let e = Ed25519Signer::with_request(p).unwrap_err();
        assert!(matches!(e, SignerError::Algorithm { alg: "p256" }));
        assert_eq!(e.errno(), libc::EINVAL);
    }

    #[test]
    fn an_ed25519_message_outside_1_to_1024_bytes_is_an_error_not_a_panic() {
        let s = offline_ed25519();
        for bad in [&[][..], &[0u8; 1025][..], &[0u8; 65536][..]] {
            let e = s
                .try_sign(bad)
                .map(|_: ed25519_dalek::Signature| ())
                .unwrap_err();
            let source = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<ClientError>())
                .unwrap();
            assert_eq!(source.errno(), libc::EINVAL, "{} bytes", bad.len());
            assert!(s.try_sign(bad).map(|_: Ed25519BitString| ()).is_err());
        }
    }

    #[test]
    fn ed25519_algorithm_identifier_and_bit_string_are_rfc_8410() {
        let s = offline_ed25519();
        let ours = s.signature_algorithm_identifier().unwrap();
        // What ed25519-dalek says for its own keys, and RFC 8410's
        // 30 05 06 03 2b 65 70 (parameters absent).
        assert_eq!(ours, s.verifying.signature_algorithm_identifier().unwrap());
        assert_eq!(
            ours.to_der().unwrap(),
            [0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70]
        );
        let sig = ed25519_dalek::Signature::from_bytes(&[0xa5; 64]);
        let bits = Ed25519BitString(sig).to_bitstring().unwrap();
        assert_eq!(bits.unused_bits(), 0);
        assert_eq!(bits.raw_bytes(), [0xa5; 64]);
    }
}
