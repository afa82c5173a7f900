//! Derivation v1: pure software around one TPM HMAC. Specified byte for
//! byte in DERIVATION.md; frozen by the known-answer vectors in
//! tests/vectors/. Never change anything here for v1: every user's keys
//! would change with it. A new derivation is a new version.
//!
//! ```text
//! E   = canonical encoding of every request input        (encode)
//! m   = SHA-256(E)                                        (message)
//! PRK = TPM2_HMAC(owner-hierarchy HMAC primary, m)        (tpm module)
//! symmetric key = HKDF-SHA256(IKM=PRK, salt=none, info=INFO_SYMMETRIC, L)
//! P-256 scalar  = hash_to_field(PRK) mod n, expand_message_xmd SHA-256, DST_P256
//! signature     = RFC 6979 ECDSA, HMAC-SHA256, z = digest mod n   (sign_digest)
//! ```

use hkdf::Hkdf;
use p256::ecdsa::Signature;
use p256::elliptic_curve::hash2curve::{ExpandMsgXmd, GroupDigest};
use p256::elliptic_curve::ops::Reduce;
use p256::elliptic_curve::point::AffineCoordinates;
use p256::elliptic_curve::subtle::{ConditionallySelectable, ConstantTimeEq};
use p256::elliptic_curve::Field as _;
use p256::elliptic_curve::{Curve, FieldBytesEncoding, PrimeField};
use p256::pkcs8::EncodePublicKey;
use p256::{AffinePoint, NistP256, ProjectivePoint, Scalar, U256};
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

use crate::secret::{SecretAllocError, SecretBuf};

/// Version byte of the encoding. v1 is frozen.
pub const VERSION: u8 = 1;
/// Domain string at the start of every encoding.
pub const DOMAIN: &[u8] = b"derived-keys";
/// HKDF info for symmetric keys.
pub const INFO_SYMMETRIC: &[u8] = b"derived-keys/v1/symmetric";
/// hash_to_field domain separation tag for P-256 scalars.
pub const DST_P256: &[u8] = b"derived-keys/v1/p256-scalar";
/// The `unique` value of the TPM primary's template (exactly 32 bytes).
pub const PRIMARY_UNIQUE: &[u8; 32] = b"derived-keys/v1/tpm-hmac-primary";

/// Purpose codes in the encoding.
const PURPOSE_SYMMETRIC: u8 = 0x01;
const PURPOSE_P256: u8 = 0x02;
/// Binding codes in the encoding.
const BIND_PATH: u8 = 0x01;
const BIND_CSUM: u8 = 0x02;
const BIND_USER: u8 = 0x03;
const BIND_MACHINE: u8 = 0x04;

/// What the derived secret is for. The length is an input, so a 16-byte
/// key is not a prefix of the 32-byte key of the same request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// 1 to 1024 bytes.
    Symmetric(u16),
    P256,
}

/// Who the key belongs to: exactly the values each binding mixes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject<'a> {
    /// uid and the executable's path, as bytes (Linux paths need not be UTF-8).
    Path {
        uid: u32,
        path: &'a [u8],
    },
    /// uid and the SHA-256 of the executable's content.
    Csum {
        uid: u32,
        digest: [u8; 32],
    },
    User {
        uid: u32,
    },
    Machine,
}

/// Every input of one derivation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Input<'a> {
    pub purpose: Purpose,
    pub name: &'a str,
    pub subject: Subject<'a>,
    pub account: Option<&'a str>,
    pub client: Option<&'a str>,
    pub epoch: u32,
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Lengths are bounded by the request grammar and PATH_MAX; u32 is ample.
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn put_optional(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        None => out.push(0x00),
        Some(v) => {
            out.push(0x01);
            put_bytes(out, v.as_bytes());
        }
    }
}

impl Input<'_> {
    /// The canonical encoding E. Every field is fixed-size, tagged or
    /// length-prefixed, in a fixed order, so E can be parsed back
    /// unambiguously: two different inputs never share an encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Vec::with_capacity(128);
        put_bytes(&mut e, DOMAIN);
        e.push(VERSION);
        let (purpose, len) = match self.purpose {
            Purpose::Symmetric(n) => (PURPOSE_SYMMETRIC, u32::from(n)),
            Purpose::P256 => (PURPOSE_P256, 32),
        };
        e.push(purpose);
        e.extend_from_slice(&len.to_be_bytes());
        put_bytes(&mut e, self.name.as_bytes());
        match self.subject {
            Subject::Path { uid, path } => {
                e.push(BIND_PATH);
                e.extend_from_slice(&uid.to_be_bytes());
                put_bytes(&mut e, path);
            }
            Subject::Csum { uid, digest } => {
                e.push(BIND_CSUM);
                e.extend_from_slice(&uid.to_be_bytes());
                put_bytes(&mut e, &digest);
            }
            Subject::User { uid } => {
                e.push(BIND_USER);
                e.extend_from_slice(&uid.to_be_bytes());
            }
            Subject::Machine => e.push(BIND_MACHINE),
        }
        put_optional(&mut e, self.account);
        put_optional(&mut e, self.client);
        e.extend_from_slice(&self.epoch.to_be_bytes());
        e
    }

    /// m = SHA-256(E): the one fixed-size input the TPM HMACs, so that any
    /// path length fits one TPM buffer.
    pub fn message(&self) -> [u8; 32] {
        Sha256::digest(self.encode()).into()
    }
}

/// Why a derivation step failed.
#[derive(Debug, thiserror::Error)]
pub enum DeriveError {
    #[error("the PRF output has {len} bytes, expected 32")]
    PrkLength { len: usize },
    #[error("symmetric length {len} is outside 1 to 1024")]
    Length { len: usize },
    #[error(transparent)]
    Memory(#[from] SecretAllocError),
    #[error("hash_to_field failed")]
    HashToField,
    /// Probability about 2^-256; reported, never papered over.
    #[error("the derived P-256 scalar is zero")]
    ZeroScalar,
    #[error("ECDSA signing failed")]
    Sign,
    #[error("encoding the public key failed")]
    Spki,
}

/// The 32-byte output of the TPM's HMAC: the root of every derived secret.
pub struct Prk(SecretBuf);

impl Prk {
    /// Takes a PRF output; refuses anything but 32 bytes.
    pub fn new(secret: SecretBuf) -> Result<Prk, DeriveError> {
        if secret.len() != 32 {
            return Err(DeriveError::PrkLength { len: secret.len() });
        }
        Ok(Prk(secret))
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_ref()
    }
}

/// A symmetric key of `len` bytes: HKDF-SHA256 with no salt.
pub fn symmetric_key(prk: &Prk, len: usize) -> Result<SecretBuf, DeriveError> {
    if !(1..=1024).contains(&len) {
        return Err(DeriveError::Length { len });
    }
    let mut out = SecretBuf::new(len)?;
    // HKDF-Expand can produce up to 255*32 bytes; 1024 is far below.
    Hkdf::<Sha256>::new(None, prk.as_bytes())
        .expand(INFO_SYMMETRIC, out.as_mut())
        .map_err(|_| DeriveError::Length { len })?;
    Ok(out)
}

/// A P-256 private key. No Debug or Display: it holds the secret scalar,
/// zeroized on drop. The public point is computed only when asked for:
/// a signature does not need it, and skipping it halves a signing request's
/// elliptic-curve work.
pub struct P256Key(Scalar);

impl Drop for P256Key {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl P256Key {
    /// d = OS2IP(expand_message_xmd(PRK, DST_P256, 48)) mod n, as RFC 9380
    /// hash_to_field with m = 1 over the scalar field (RFC 9497's HashToScalar).
    pub fn from_prk(prk: &Prk) -> Result<P256Key, DeriveError> {
        let scalar =
            NistP256::hash_to_scalar::<ExpandMsgXmd<Sha256>>(&[prk.as_bytes()], &[DST_P256])
                .map_err(|_| DeriveError::HashToField)?;
        if bool::from(scalar.is_zero()) {
            return Err(DeriveError::ZeroScalar);
        }
        Ok(P256Key(scalar))
    }

    /// SubjectPublicKeyInfo DER (id-ecPublicKey, prime256v1, uncompressed).
    pub fn spki_der(&self) -> Result<Vec<u8>, DeriveError> {
        let point = mul_generator(&self.0).to_affine();
        let public = p256::PublicKey::from_affine(point).map_err(|_| DeriveError::Spki)?;
        public
            .to_public_key_der()
            .map(|d| d.as_bytes().to_vec())
            .map_err(|_| DeriveError::Spki)
    }

    /// ECDSA P-256 over a 32-byte (SHA-256) digest with the deterministic
    /// nonce of RFC 6979 section 3.2, HMAC-SHA256, DER-encoded. Exactly, with
    /// n the group order, d the secret scalar and h1 the 32 digest bytes:
    ///
    /// ```text
    /// z = bits2int(h1) mod n = OS2IP(h1) mod n     qlen = hlen = 256: no shift
    /// k = RFC 6979 3.2 steps b-h, HMAC-SHA256, with
    ///       int2octets(x)  = d as 32 bytes big-endian
    ///       bits2octets(h1) = z as 32 bytes big-endian      (step d and f)
    ///       no additional data (the k' of section 3.6 is empty)
    /// r = x(k·G) mod n
    /// s = k^-1 · (z + r·d) mod n                   not normalized to low s
    /// DER ECDSA-Sig-Value { r INTEGER, s INTEGER }
    /// ```
    ///
    /// z is the same value in the nonce and in the equation, so for a digest
    /// whose integer value is n or more the result is the one of every
    /// conforming implementation. If r or s is 0 (probability about 2^-256)
    /// this returns [`DeriveError::Sign`] instead of taking the next k of
    /// step h.3.
    ///
    /// It is `ecdsa::hazmat`'s `try_sign_prehashed_rfc6979` (p256 0.13,
    /// ecdsa 0.16, which hands the unreduced digest to the nonce HMAC) with
    /// the digest reduced first and k×G from [`mul_generator`]. k, k^-1 and
    /// the byte copies of d and k are zeroized before it returns.
    pub fn sign_digest(&self, digest: &[u8; 32]) -> Result<Vec<u8>, DeriveError> {
        // For P-256, 2^256 < 2n: one constant-time conditional subtraction.
        let z = <Scalar as Reduce<U256>>::reduce_bytes(&p256::FieldBytes::from(*digest));
        let mut k = rfc6979_nonce(&self.0, &z)?;
        let result = (|| {
            let mut k_inv = Option::<Scalar>::from(k.invert()).ok_or(DeriveError::Sign)?;
            let big_r = mul_generator(&k).to_affine();
            let r = <Scalar as Reduce<U256>>::reduce_bytes(&big_r.x());
            let s = k_inv * (z + r * self.0);
            k_inv.zeroize();
            Signature::from_scalars(r, s).map_err(|_| DeriveError::Sign)
        })();
        k.zeroize();
        Ok(result?.to_der().as_bytes().to_vec())
    }

    /// A key from a given scalar, for the RFC 6979 test vectors.
    #[cfg(test)]
    fn from_scalar_bytes(bytes: &[u8; 32]) -> Option<P256Key> {
        Option::<Scalar>::from(Scalar::from_repr((*bytes).into()))
            .filter(|s| !bool::from(s.is_zero()))
            .map(P256Key)
    }

    /// The 32-byte big-endian secret scalar, for the known-answer tests.
    pub fn secret_scalar(&self) -> Result<SecretBuf, DeriveError> {
        Ok(SecretBuf::copy_from(&self.0.to_bytes())?)
    }
}

/// The RFC 6979 section 3.2 nonce for secret scalar `d` and the already
/// reduced digest `z` (HMAC-SHA256, no additional data): the HMAC_DRBG is
/// seeded with int2octets(d) || int2octets(z), and int2octets(z) is
/// bits2octets(h1) because z = bits2int(h1) mod n. The byte copies of d and
/// k are zeroized.
fn rfc6979_nonce(d: &Scalar, z: &Scalar) -> Result<Scalar, DeriveError> {
    let n = <U256 as FieldBytesEncoding<NistP256>>::encode_field_bytes(&NistP256::ORDER);
    let mut x = d.to_repr();
    let mut k_bytes = rfc6979::generate_k::<Sha256, _>(&x, &n, &z.to_repr(), &[]);
    x.zeroize();
    // generate_k returns 0 < k < n, so from_repr cannot fail.
    let k = Option::<Scalar>::from(Scalar::from_repr(k_bytes));
    k_bytes.zeroize();
    k.ok_or(DeriveError::Sign)
}

/// k×G by table: 64 four-bit windows, each holding the 16 multiples of
/// 16^i·G (affine), built once per process. Every window reads all 16
/// entries with constant-time selection and adds with the curve's complete
/// formulas, so neither timing nor memory access depends on k. It costs a
/// third of the generic k×G; the table (~70 KB) costs ~10 ms once, which a
/// resident broker pays once.
pub fn mul_generator(k: &Scalar) -> ProjectivePoint {
    static TABLE: std::sync::OnceLock<Vec<[AffinePoint; 16]>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut rows = Vec::with_capacity(64);
        let mut base = ProjectivePoint::GENERATOR;
        for _ in 0..64 {
            let mut row = [ProjectivePoint::IDENTITY; 16];
            for j in 1..16 {
                row[j] = row[j - 1] + base;
            }
            base = row[15] + base;
            rows.push(row.map(|p| p.to_affine()));
        }
        rows
    });
    let mut bytes = k.to_bytes();
    let mut acc = ProjectivePoint::IDENTITY;
    for (i, row) in table.iter().enumerate() {
        // Window i is bits 4i..4i+4, counted from the least significant.
        let byte = bytes[31 - i / 2];
        let digit = if i % 2 == 0 { byte & 0x0f } else { byte >> 4 };
        let mut p = AffinePoint::IDENTITY;
        for (j, entry) in (0u8..).zip(row.iter()) {
            p.conditional_assign(entry, j.ct_eq(&digit));
        }
        acc += p;
    }
    bytes.zeroize();
    acc
}

/// Builds the k×G table now (a resident process calls this at start, so
/// that its first signature does not wait ~8 ms for it).
pub fn warm_up() {
    let _ = mul_generator(&Scalar::ONE);
}

/// Verifies a DER (or raw r||s) ECDSA P-256 signature over a SHA-256 digest
/// with a DER SubjectPublicKeyInfo. Pure software; no TPM.
pub fn verify_digest(spki_der: &[u8], digest: &[u8; 32], signature: &[u8]) -> bool {
    use p256::ecdsa::signature::hazmat::PrehashVerifier;
    use p256::ecdsa::VerifyingKey;
    use p256::pkcs8::DecodePublicKey;
    let Ok(key) = VerifyingKey::from_public_key_der(spki_der) else {
        return false;
    };
    let sig = Signature::from_der(signature).or_else(|_| Signature::from_slice(signature));
    match sig {
        Ok(sig) => key.verify_prehash(digest, &sig).is_ok(),
        Err(_) => false,
    }
}

/// PEM ("PUBLIC KEY") for a DER SubjectPublicKeyInfo.
pub fn spki_to_pem(spki_der: &[u8]) -> Option<String> {
    use p256::pkcs8::{DecodePublicKey, LineEnding};
    p256::PublicKey::from_public_key_der(spki_der)
        .ok()?
        .to_public_key_pem(LineEnding::LF)
        .ok()
}

/// A P-256 SubjectPublicKeyInfo from PEM or DER bytes, as DER.
pub fn spki_from_pem_or_der(bytes: &[u8]) -> Option<Vec<u8>> {
    use p256::pkcs8::DecodePublicKey;
    let key = match std::str::from_utf8(bytes) {
        Ok(text) if text.contains("-----BEGIN") => {
            p256::PublicKey::from_public_key_pem(text).ok()?
        }
        _ => p256::PublicKey::from_public_key_der(bytes).ok()?,
    };
    key.to_public_key_der().ok().map(|d| d.as_bytes().to_vec())
}

/// The fixed-size r||s form (64 bytes) of a DER ECDSA P-256 signature.
pub fn signature_to_raw(der: &[u8]) -> Option<Vec<u8>> {
    Signature::from_der(der).ok().map(|s| s.to_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_multiplication_matches_the_generic_one() {
        let mut edge = vec![Scalar::ZERO, Scalar::ONE, -Scalar::ONE, Scalar::from(16u64)];
        // Every window's extreme digits: 0x0f.., 0xf0.., 0xff...
        for b in [0x0fu8, 0xf0, 0xff, 0x80] {
            let bytes = p256::FieldBytes::from([b; 32]);
            edge.push(<Scalar as Reduce<U256>>::reduce_bytes(&bytes));
        }
        let mut x = Scalar::from(0x1234_5678u64);
        for _ in 0..32 {
            x = x * x + Scalar::from(7u64);
            edge.push(x);
        }
        for k in edge {
            assert_eq!(
                mul_generator(&k).to_affine(),
                (ProjectivePoint::GENERATOR * k).to_affine()
            );
        }
    }
    use hmac::{Mac, SimpleHmac};

    fn input(subject: Subject<'_>) -> Input<'_> {
        Input {
            purpose: Purpose::Symmetric(32),
            name: "db",
            subject,
            account: None,
            client: None,
            epoch: 0,
        }
    }

    fn soft_prk(msg: &[u8; 32]) -> Prk {
        let mut mac = SimpleHmac::<Sha256>::new_from_slice(&[0x42; 32]).unwrap();
        mac.update(msg);
        Prk::new(SecretBuf::copy_from(&mac.finalize().into_bytes()).unwrap()).unwrap()
    }

    #[test]
    fn encoding_layout_is_as_specified() {
        let e = input(Subject::User { uid: 1000 }).encode();
        let mut want = Vec::new();
        want.extend_from_slice(&[0, 0, 0, 12]);
        want.extend_from_slice(b"derived-keys");
        want.extend_from_slice(&[1, 1, 0, 0, 0, 32, 0, 0, 0, 2]);
        want.extend_from_slice(b"db");
        want.extend_from_slice(&[3, 0, 0, 0x03, 0xe8, 0, 0, 0, 0, 0, 0]);
        assert_eq!(hex::encode(&e), hex::encode(&want));
    }

    #[test]
    fn bindings_never_collide() {
        // Each binding mixes in different values, and its code keeps even
        // coinciding values apart: user uid 0 vs machine, path vs csum.
        let d = [7u8; 32];
        let subjects = [
            Subject::Path { uid: 0, path: b"" },
            Subject::Path { uid: 0, path: &d },
            Subject::Csum { uid: 0, digest: d },
            Subject::User { uid: 0 },
            Subject::Machine,
        ];
        let mut seen = std::collections::HashSet::new();
        for s in subjects {
            assert!(seen.insert(input(s).encode()), "{s:?}");
        }
    }

    #[test]
    fn optional_fields_are_unambiguous() {
        let base = input(Subject::Machine);
        let variants = [
            Input {
                account: Some("a"),
                ..base
            },
            Input {
                client: Some("a"),
                ..base
            },
            Input {
                account: Some("a"),
                client: Some("b"),
                ..base
            },
            Input {
                account: Some("ab"),
                ..base
            },
            Input { epoch: 1, ..base },
            Input {
                name: "dbx",
                ..base
            },
            Input {
                purpose: Purpose::Symmetric(33),
                ..base
            },
            Input {
                purpose: Purpose::P256,
                ..base
            },
            base,
        ];
        let set: std::collections::HashSet<_> = variants.iter().map(Input::encode).collect();
        assert_eq!(set.len(), variants.len());
    }

    #[test]
    fn lengths_give_unrelated_keys() {
        // One request, only its length differs. Under one PRK, HKDF-Expand's
        // first 16 bytes are the 16-byte output (RFC 5869 T(1) || T(2) ...):
        // what keeps a 16-byte key from being the prefix of the 32-byte key
        // is the length in E, hence in m and in the PRK.
        let request = |len| Input {
            purpose: Purpose::Symmetric(len),
            ..input(Subject::User { uid: 1000 })
        };
        let key = |len: u16| symmetric_key(&soft_prk(&request(len).message()), len.into()).unwrap();
        let lengths = [1u16, 16, 31, 32, 33, 64, 1024];
        for (i, &a) in lengths.iter().enumerate() {
            for &b in &lengths[i + 1..] {
                let (short, long) = (key(a), key(b));
                assert_ne!(
                    short.as_ref(),
                    &long.as_ref()[..short.len()],
                    "{a} bytes is a prefix of {b}"
                );
            }
        }
        // What the length in E protects against: one PRK, two lengths.
        let prk = soft_prk(&request(32).message());
        assert_eq!(
            symmetric_key(&prk, 16).unwrap().as_ref(),
            &symmetric_key(&prk, 32).unwrap().as_ref()[..16]
        );
        assert!(symmetric_key(&prk, 0).is_err());
        assert!(symmetric_key(&prk, 1025).is_err());
        assert_eq!(symmetric_key(&prk, 1024).unwrap().len(), 1024);
    }

    #[test]
    fn prk_must_be_32_bytes() {
        assert!(Prk::new(SecretBuf::new(31).unwrap()).is_err());
    }

    #[test]
    fn sign_and_verify_round_trip() {
        let key = P256Key::from_prk(&soft_prk(&[3; 32])).unwrap();
        let spki = key.spki_der().unwrap();
        assert_eq!(spki.len(), 91);
        let digest: [u8; 32] = Sha256::digest(b"hello").into();
        let sig = key.sign_digest(&digest).unwrap();
        assert!(verify_digest(&spki, &digest, &sig));
        assert_eq!(
            sig,
            key.sign_digest(&digest).unwrap(),
            "RFC 6979 is deterministic"
        );
        let mut other = digest;
        other[0] ^= 1;
        assert!(!verify_digest(&spki, &other, &sig));
        let raw = signature_to_raw(&sig).unwrap();
        assert_eq!(raw.len(), 64);
        assert!(verify_digest(&spki, &digest, &raw));
        let pem = spki_to_pem(&spki).unwrap();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"));
        assert_eq!(spki_from_pem_or_der(pem.as_bytes()).unwrap(), spki);
        assert_eq!(spki_from_pem_or_der(&spki).unwrap(), spki);
        assert!(spki_from_pem_or_der(b"junk").is_none());
    }

    fn bytes32(hex_str: &str) -> [u8; 32] {
        hex::decode(hex_str).unwrap().try_into().unwrap()
    }

    /// RFC 6979 appendix A.2.5 (NIST P-256), private key and public key.
    const RFC_X: &str = "c9afa9d845ba75166b5c215767b1d6934e50c3db36e89b127b8a622b120f6721";
    const RFC_UX: &str = "60fed4ba255a9d31c961eb74c6356d68c049b8923b61fa6ce669622e60f29fb6";
    const RFC_UY: &str = "7903fe1008b8bc99a41ae9e95628bc64f2f1b20c2d7e9f5177a3c294d4462299";

    /// The nonce and r || s that sign_digest's own steps give.
    fn nonce_and_raw(key: &P256Key, digest: &[u8; 32]) -> (String, String) {
        let z = <Scalar as Reduce<U256>>::reduce_bytes(&p256::FieldBytes::from(*digest));
        let k = rfc6979_nonce(&key.0, &z).unwrap();
        let sig = key.sign_digest(digest).unwrap();
        (
            hex::encode(k.to_bytes()),
            hex::encode(signature_to_raw(&sig).unwrap()),
        )
    }

    /// RFC 6979 A.2.5, "With SHA-256": k, r and s for the messages "sample"
    /// and "test", signed over SHA-256(message) by sign_digest.
    #[test]
    fn rfc6979_appendix_a25_p256_sha256() {
        let key = P256Key::from_scalar_bytes(&bytes32(RFC_X)).unwrap();
        let spki = hex::encode(key.spki_der().unwrap());
        assert!(spki.ends_with(&format!("04{RFC_UX}{RFC_UY}")), "{spki}");
        let cases = [
            (
                &b"sample"[..],
                "a6e3c57dd01abe90086538398355dd4c3b17aa873382b0f24d6129493d8aad60",
                "efd48b2aacb6a8fd1140dd9cd45e81d69d2c877b56aaf991c34d0ea84eaf3716",
                "f7cb1c942d657c41d436c7a1b6e29f65f3e900dbb9aff4064dc4ab2f843acda8",
            ),
            (
                &b"test"[..],
                "d16b6ae827f17175e040871a1c7ec3500192c4c92677336ec2537acaee0008e0",
                "f1abb023518351cd71d881567b1ea663ed3efcf6c5132b354f28d3b0b7d38367",
                "019f4113742a2b14bd25926b49c649155f267e60d3814b4c0cc84250e46f0083",
            ),
        ];
        for (msg, k, r, s) in cases {
            let digest: [u8; 32] = Sha256::digest(msg).into();
            assert_eq!(nonce_and_raw(&key, &digest), (k.into(), format!("{r}{s}")));
        }
    }

    /// A digest above n: h1 = 2^256 - 1, the RFC's key. The expected k and
    /// signature come from python-ecdsa 0.19.2
    /// (`rfc6979.generate_k`, `sign_digest_deterministic(digest,
    /// hashfunc=sha256, sigencode=sigencode_der)`) and agree with pyca
    /// cryptography 48 on OpenSSL 4.0.0 (`ECDSA(Prehashed(SHA256()),
    /// deterministic_signing=True)`). Both reduce h1 mod n in bits2octets.
    #[test]
    fn rfc6979_reduces_a_digest_above_n() {
        let key = P256Key::from_scalar_bytes(&bytes32(RFC_X)).unwrap();
        let digest = [0xff; 32];
        let (k, _) = nonce_and_raw(&key, &digest);
        assert_eq!(
            k,
            "a2d7ccca091233c3888120593a491e2281e641361334223e6e5c3c7a217b7c8d"
        );
        assert_eq!(
            hex::encode(key.sign_digest(&digest).unwrap()),
            "304502201f2adbc54b88764c279f689fc9505959fc9e73e80dc20889a4e0be91865de75b\
             0221009d109b65e2fbfc0ae42ba0b2e5f03670cd458cff4882df6783f3d93d607d1755"
        );
    }

    /// Cross-check with RustCrypto's `ecdsa` (through p256's `SigningKey`),
    /// which the project did not write. Its `sign_prehash` is RFC 6979 for a
    /// digest below n, but ecdsa 0.16 hands the unreduced digest to the nonce
    /// HMAC, so for h1 >= n it is given int2octets(h1 mod n) instead: by RFC
    /// 6979 that is the same signature, since bits2octets and the signing
    /// equation both see only h1 mod n.
    #[test]
    fn signatures_match_rustcrypto_ecdsa_over_the_reduced_digest() {
        use p256::ecdsa::signature::hazmat::PrehashSigner;
        let n = "ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551";
        let mut digests: Vec<[u8; 32]> = [
            "0000000000000000000000000000000000000000000000000000000000000000",
            "0000000000000000000000000000000000000000000000000000000000000001",
            "ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632550",
            n,
            "ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632552",
            "ffffffff00000001000000000000000000000000000000000000000000000000",
            "fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffe",
            "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
        ]
        .iter()
        .map(|h| bytes32(h))
        .collect();
        let mut h: [u8; 32] = Sha256::digest(b"digests").into();
        for i in 0..64 {
            h = Sha256::digest(h).into();
            let mut d = h;
            if i % 2 == 0 {
                d[..8].fill(0xff); // >= n: n starts ffffffff 00000000
            }
            digests.push(d);
        }
        let above = digests
            .iter()
            .filter(|d| d.as_slice() >= &bytes32(n)[..])
            .count();
        assert_eq!(above, 37, "the cross-check covers digests >= n");
        let rfc_key = P256Key::from_scalar_bytes(&bytes32(RFC_X)).unwrap();
        let derived = P256Key::from_prk(&soft_prk(&[9; 32])).unwrap();
        for key in [rfc_key, derived] {
            let theirs = p256::ecdsa::SigningKey::from_bytes(&key.0.to_bytes()).unwrap();
            for d in &digests {
                let z = <Scalar as Reduce<U256>>::reduce_bytes(&p256::FieldBytes::from(*d));
                let want: Signature = theirs.sign_prehash(&z.to_bytes()).unwrap();
                assert_eq!(
                    hex::encode(key.sign_digest(d).unwrap()),
                    hex::encode(want.to_der().as_bytes()),
                    "digest {}",
                    hex::encode(d)
                );
            }
        }
    }
}
