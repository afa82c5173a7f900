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
//! logon key     = HKDF-SHA256(IKM=PRK, salt=none, info=INFO_KERNEL_SYMMETRIC, L)
//! P-256 scalar  = hash_to_field(PRK) mod n, expand_message_xmd SHA-256, DST_P256
//! signature     = RFC 6979 ECDSA, HMAC-SHA256, z = digest mod n   (sign_digest)
//! Ed25519 seed  = HKDF-SHA256(IKM=PRK, salt=none, info=INFO_ED25519_SEED, 32)
//! Ed25519 key pair and signature = RFC 8032 from that seed (ed25519-dalek)
//! ```

use hkdf::Hkdf;
use p256::ecdsa::Signature;
use p256::elliptic_curve::hash2curve::{ExpandMsgXmd, GroupDigest};
use p256::elliptic_curve::ops::Reduce;
use p256::elliptic_curve::point::AffineCoordinates;
use p256::elliptic_curve::subtle::{Choice, ConditionallySelectable, ConstantTimeEq};
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
/// HKDF info for kernel-only symmetric keys (key type `logon`). Their own
/// purpose code already gives them their own PRK; their own label keeps
/// the two apart even for a reader who looks only at the HKDF step.
pub const INFO_KERNEL_SYMMETRIC: &[u8] = b"derived-keys/v1/kernel-symmetric";
/// hash_to_field domain separation tag for P-256 scalars.
pub const DST_P256: &[u8] = b"derived-keys/v1/p256-scalar";
/// The `unique` value of the TPM primary's template (exactly 32 bytes).
pub const PRIMARY_UNIQUE: &[u8; 32] = b"derived-keys/v1/tpm-hmac-primary";

/// Purpose codes in the encoding (the registry in DERIVATION.md). A code
/// is never reused or given another meaning: a new purpose takes the next
/// free code and a label of its own, so no existing key changes.
const PURPOSE_SYMMETRIC: u8 = 0x01;
const PURPOSE_P256: u8 = 0x02;
const PURPOSE_KERNEL_SYMMETRIC: u8 = 0x03;
/// Ed25519 key pairs (DERIVATION.md section 7): length field 32, seed
/// label [`INFO_ED25519_SEED`]. Its own code gives an Ed25519 key its own
/// PRK: it is neither the P-256 key nor the symmetric key of the same
/// name and callout.
const PURPOSE_ED25519: u8 = 0x04;
/// HKDF info of the Ed25519 seed, with [`PURPOSE_ED25519`]: a label of its
/// own keeps the seed apart from symmetric keys even under one PRK.
pub const INFO_ED25519_SEED: &[u8] = b"derived-keys/v1/ed25519-seed";
/// The RFC 8410 SubjectPublicKeyInfo of an Ed25519 key is these 12 bytes
/// (SEQUENCE, AlgorithmIdentifier id-Ed25519 1.3.101.112 without
/// parameters, BIT STRING of 33 bytes with no unused bits), then the 32
/// bytes of the public key.
pub const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// Binding codes in the encoding.
const BIND_PATH: u8 = 0x01;
const BIND_CSUM: u8 = 0x02;
const BIND_USER: u8 = 0x03;
const BIND_MACHINE: u8 = 0x04;

/// What the derived secret is for. The length is an input, so a 16-byte
/// key is not a prefix of the 32-byte key of the same request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// 1 to 1024 bytes, returned to the requester (key type `user`).
    Symmetric(u16),
    P256,
    /// 1 to 1024 bytes that only the kernel may use (key type `logon`).
    /// A purpose of its own, so that these bytes are never what a `user`
    /// request of the same name and callout returns.
    KernelSymmetric(u16),
    /// An Ed25519 key pair (RFC 8032), from a seed of its own label.
    Ed25519,
}

impl Purpose {
    /// The purpose byte of E and the length field beside it.
    fn code_and_length(self) -> (u8, u32) {
        match self {
            Purpose::Symmetric(n) => (PURPOSE_SYMMETRIC, u32::from(n)),
            Purpose::P256 => (PURPOSE_P256, 32),
            Purpose::KernelSymmetric(n) => (PURPOSE_KERNEL_SYMMETRIC, u32::from(n)),
            Purpose::Ed25519 => (PURPOSE_ED25519, 32),
        }
    }
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
        let (purpose, len) = self.purpose.code_and_length();
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
    #[error("the Ed25519 seed has {len} bytes, expected 32")]
    SeedLength { len: usize },
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

/// A symmetric key of `len` bytes: HKDF-SHA256 with no salt, from the PRK
/// of a [`Purpose::Symmetric`] input.
pub fn symmetric_key(prk: &Prk, len: usize) -> Result<SecretBuf, DeriveError> {
    hkdf_expand(prk, INFO_SYMMETRIC, len)
}

/// A kernel-only (`logon`) key of `len` bytes: the same HKDF with its own
/// label, from the PRK of a [`Purpose::KernelSymmetric`] input.
pub fn kernel_symmetric_key(prk: &Prk, len: usize) -> Result<SecretBuf, DeriveError> {
    hkdf_expand(prk, INFO_KERNEL_SYMMETRIC, len)
}

fn hkdf_expand(prk: &Prk, info: &[u8], len: usize) -> Result<SecretBuf, DeriveError> {
    if !(1..=1024).contains(&len) {
        return Err(DeriveError::Length { len });
    }
    let mut out = SecretBuf::new(len)?;
    // HKDF-Expand can produce up to 255*32 bytes; 1024 is far below.
    Hkdf::<Sha256>::new(None, prk.as_bytes())
        .expand(info, out.as_mut())
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
            let mut k_inv = invert_blinded(&k).ok_or(DeriveError::Sign)?;
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

/// An Ed25519 private key: the 32-byte RFC 8032 seed, in secret memory
/// (memfd_secret or mlock, zeroized on drop). No Debug or Display.
///
/// ed25519-dalek's `SigningKey` (a copy of the seed and the public key) is
/// built from the seed only for the one operation asked, and dropped right
/// after it; with the crate's `zeroize` feature it wipes its copy of the
/// seed on drop, and the expanded secret key (the clamped scalar and the
/// nonce prefix, SHA-512 of the seed) it makes for each signature wipes
/// itself too. What is left on the stack, neither in secret memory nor
/// wiped: bytes a move or a return copies without zeroizing (Rust moves are
/// plain copies), and the SHA-512 state and 64-byte output inside
/// ed25519-dalek that holds the expanded secret; sha2 does not zeroize.
/// The broker is non-dumpable and nothing of its stack reaches a log, but
/// these bytes live until the stack is reused, as the P-256 path's
/// intermediate scalars do.
pub struct Ed25519Key(SecretBuf);

impl Ed25519Key {
    /// seed = HKDF-SHA256(IKM = PRK, no salt, info = INFO_ED25519_SEED, 32),
    /// from the PRK of a [`Purpose::Ed25519`] input (DERIVATION.md section 7).
    pub fn from_prk(prk: &Prk) -> Result<Ed25519Key, DeriveError> {
        Ok(Ed25519Key(hkdf_expand(prk, INFO_ED25519_SEED, 32)?))
    }

    /// Runs `f` with the signing key, which is dropped (and so wiped) as
    /// soon as `f` returns.
    fn with_signing_key<T>(
        &self,
        f: impl FnOnce(&ed25519_dalek::SigningKey) -> T,
    ) -> Result<T, DeriveError> {
        // A reference into the secret buffer: no copy of the seed yet.
        let seed: &[u8; 32] = self
            .0
            .as_ref()
            .try_into()
            .map_err(|_| DeriveError::SeedLength { len: self.0.len() })?;
        let key = ed25519_dalek::SigningKey::from_bytes(seed);
        let out = f(&key);
        drop(key);
        Ok(out)
    }

    /// The 32-byte RFC 8032 public key A.
    pub fn public_key(&self) -> Result<[u8; 32], DeriveError> {
        self.with_signing_key(|k| k.verifying_key().to_bytes())
    }

    /// SubjectPublicKeyInfo DER of RFC 8410 (id-Ed25519): 44 bytes.
    pub fn spki_der(&self) -> Result<Vec<u8>, DeriveError> {
        let mut der = ED25519_SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.public_key()?);
        Ok(der)
    }

    /// The 64-byte pure Ed25519 signature R || S of RFC 8032 section 5.1.6
    /// over `message` itself (no prehash, no context). Deterministic.
    pub fn sign(&self, message: &[u8]) -> Result<[u8; 64], DeriveError> {
        use ed25519_dalek::Signer as _;
        self.with_signing_key(|k| k.sign(message).to_bytes())
    }

    /// A copy of the 32-byte seed, for the known-answer tests.
    pub fn secret_seed(&self) -> Result<SecretBuf, DeriveError> {
        Ok(SecretBuf::copy_from(self.0.as_ref())?)
    }

    /// A key from a given seed, for the RFC 8032 test vectors.
    #[cfg(test)]
    fn from_seed(seed: &[u8; 32]) -> Ed25519Key {
        Ed25519Key(SecretBuf::copy_from(seed).unwrap())
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

/// k⁻¹ mod n for a secret k, a fifth of the time of p256's constant-time
/// inversion (Fermat: ~450 Barrett multiplications, 23 µs here, a third of
/// a signature): k·b is inverted for a fresh random b by a variable-time
/// binary extended GCD, then multiplied by b again. The GCD's running time
/// depends only on k·b, which is uniformly distributed and independent of
/// k for uniform b; the multiplications are constant time. Falls back to
/// the constant-time inversion if the kernel has no randomness to give.
fn invert_blinded(k: &Scalar) -> Option<Scalar> {
    let mut raw = [0u8; 32];
    if getrandom::getrandom(&mut raw).is_err() {
        return k.invert().into();
    }
    let mut b = <Scalar as Reduce<U256>>::reduce_bytes(&raw.into());
    raw.zeroize();
    if bool::from(b.is_zero()) {
        return k.invert().into();
    }
    // k·b and b together give k: every copy is wiped.
    let mut kb_scalar = *k * b;
    let mut kb = U256::from(kb_scalar);
    kb_scalar.zeroize();
    let inverse = inverse_vartime(&kb, &NistP256::ORDER);
    kb.zeroize();
    let Some(mut inverse) = inverse else {
        b.zeroize();
        return None;
    };
    // Below n already: the reduction is the identity.
    let mut kb_inv = <Scalar as Reduce<U256>>::reduce(inverse);
    inverse.zeroize();
    let k_inv = kb_inv * b;
    kb_inv.zeroize();
    b.zeroize();
    Some(k_inv)
}

/// a⁻¹ mod m for an odd prime m and 0 < a < m, in variable time: the
/// binary extended Euclidean algorithm (Hankerson, Menezes and Vanstone,
/// Guide to Elliptic Curve Cryptography, algorithm 2.22). Only for
/// blinded values ([`invert_blinded`]). None if a is 0 or not below m.
fn inverse_vartime(a: &U256, m: &U256) -> Option<U256> {
    if a == &U256::ZERO || a >= m {
        return None;
    }
    // x/2 mod m for x < m: x + m is even when x is odd, and may carry
    // into bit 256.
    let top = U256::ONE.shl_vartime(255);
    let half = |x: &U256| -> U256 {
        if x.bit_vartime(0) {
            let (sum, carry) = x.adc(m, p256::elliptic_curve::bigint::Limb::ZERO);
            let halved = sum.shr_vartime(1);
            if carry.0 != 0 {
                halved | top
            } else {
                halved
            }
        } else {
            x.shr_vartime(1)
        }
    };
    let (mut u, mut v) = (*a, *m);
    let (mut x1, mut x2) = (U256::ONE, U256::ZERO);
    // Throughout, a·x1 ≡ u and a·x2 ≡ v (mod m), and gcd(u, v) = 1: one
    // of them reaches 1.
    while u != U256::ONE && v != U256::ONE {
        while !u.bit_vartime(0) {
            u = u.shr_vartime(1);
            x1 = half(&x1);
        }
        while !v.bit_vartime(0) {
            v = v.shr_vartime(1);
            x2 = half(&x2);
        }
        if u >= v {
            u = u.wrapping_sub(&v);
            x1 = x1.sub_mod(&x2, m);
        } else {
            v = v.wrapping_sub(&u);
            x2 = x2.sub_mod(&x1, m);
        }
    }
    let inverse = if u == U256::ONE { x1 } else { x2 };
    u.zeroize();
    v.zeroize();
    x1.zeroize();
    x2.zeroize();
    Some(inverse)
}

/// Bits of k per window of the k×G table.
const WINDOW_BITS: usize = 6;
/// Windows in a 256-bit scalar (the last holds 4 bits, and a carry).
const WINDOWS: usize = 256_usize.div_ceil(WINDOW_BITS);
/// Entries per window: 1·B .. 32·B for the window's base B (signed
/// digits: -32·B .. -1·B are their negations, 0 the identity).
const ENTRIES: usize = 1 << (WINDOW_BITS - 1);

/// k×G by table: 43 six-bit windows with signed digits in -31..=32, each
/// window holding the 32 multiples 1..=32 of 64^i·G (affine), built once
/// per process. Every window reads all 32 entries with constant-time
/// selection, negates in constant time, and adds with the curve's complete
/// formulas, so neither timing nor memory access depends on k. Signed
/// digits halve what each window reads (64 entries before): the selection
/// took as long as the 43 point additions (0.4 µs each here). The table,
/// ~100 KB, a resident broker builds once (~12 ms, in its warm-up thread,
/// beside its first request's TPM set-up).
pub fn mul_generator(k: &Scalar) -> ProjectivePoint {
    static TABLE: std::sync::OnceLock<Vec<[AffinePoint; ENTRIES]>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut rows = Vec::with_capacity(WINDOWS);
        let mut base = ProjectivePoint::GENERATOR;
        for _ in 0..WINDOWS {
            let mut row = [base; ENTRIES];
            for j in 1..ENTRIES {
                row[j] = row[j - 1] + base;
            }
            // 64·B = 2·(32·B).
            base = row[ENTRIES - 1] + row[ENTRIES - 1];
            rows.push(row.map(|p| p.to_affine()));
        }
        rows
    });
    // Little-endian bytes: window i is bits 6i..6i+6 from the least
    // significant, within one byte or across two; which bytes and shifts
    // depends on i alone, not on k.
    let mut bytes = k.to_bytes();
    bytes.reverse();
    let mut acc = ProjectivePoint::IDENTITY;
    let mut carry = 0u8;
    for (i, row) in table.iter().enumerate() {
        let (at, shift) = (i * WINDOW_BITS / 8, i * WINDOW_BITS % 8);
        let next = bytes.get(at + 1).copied().unwrap_or(0);
        let bits = (u16::from(bytes[at]) | u16::from(next) << 8) >> shift;
        // 0..=64 with the carry; above 32 it becomes v - 64 and carries
        // into the next window (the last one's 4 bits and a carry never
        // reach 32: k < n < 2^256).
        let v = ((bits as u8) & 63) + carry;
        carry = (32u8.wrapping_sub(v) >> 7) & 1;
        let digit = (v as i8).wrapping_sub((carry << 6) as i8);
        let sign = ((digit as u8) >> 7) & 1;
        let magnitude = ((digit ^ -(sign as i8)) as u8).wrapping_add(sign);
        let mut p = AffinePoint::IDENTITY;
        for (j, entry) in (1u8..).zip(row.iter()) {
            p.conditional_assign(entry, j.ct_eq(&magnitude));
        }
        let negated = -p;
        p.conditional_assign(&negated, Choice::from(sign));
        acc += p;
    }
    bytes.zeroize();
    acc
}

/// Builds the k×G table now (a resident process calls this at start, so
/// that its first signature does not wait ~12 ms for it).
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

/// PEM ("PUBLIC KEY") for a DER SubjectPublicKeyInfo, P-256 or Ed25519.
pub fn spki_to_pem(spki_der: &[u8]) -> Option<String> {
    use p256::pkcs8::der::pem::{self, LineEnding};
    PublicKey::from_der(spki_der)?;
    pem::encode_string("PUBLIC KEY", LineEnding::LF, spki_der).ok()
}

/// A P-256 SubjectPublicKeyInfo from PEM or DER bytes, as DER.
pub fn spki_from_pem_or_der(bytes: &[u8]) -> Option<Vec<u8>> {
    match PublicKey::from_pem_or_der(bytes)? {
        PublicKey::P256(der) => Some(der),
        PublicKey::Ed25519(_) => None,
    }
}

/// A public key whose algorithm its SubjectPublicKeyInfo names: what
/// `dkey verify` reads, so that a key file says how to check a signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// A P-256 SubjectPublicKeyInfo, as DER.
    P256(Vec<u8>),
    /// The 32 bytes of an Ed25519 public key (RFC 8032 A).
    Ed25519([u8; 32]),
}

impl PublicKey {
    /// Parses a DER SubjectPublicKeyInfo: id-ecPublicKey with prime256v1,
    /// or id-Ed25519 (RFC 8410: no parameters, 32 key bytes). Anything else
    /// is None.
    pub fn from_der(der: &[u8]) -> Option<PublicKey> {
        use p256::pkcs8::DecodePublicKey;
        if let Some(key) = der.strip_prefix(&ED25519_SPKI_PREFIX[..]) {
            return Some(PublicKey::Ed25519(key.try_into().ok()?));
        }
        let key = p256::PublicKey::from_public_key_der(der).ok()?;
        key.to_public_key_der()
            .ok()
            .map(|d| PublicKey::P256(d.as_bytes().to_vec()))
    }

    /// From a PEM ("PUBLIC KEY") or DER file's bytes.
    pub fn from_pem_or_der(bytes: &[u8]) -> Option<PublicKey> {
        match std::str::from_utf8(bytes) {
            Ok(text) if text.contains("-----BEGIN") => {
                let (label, der) =
                    p256::pkcs8::der::pem::decode_vec(text.trim().as_bytes()).ok()?;
                (label == "PUBLIC KEY").then_some(())?;
                PublicKey::from_der(&der)
            }
            _ => PublicKey::from_der(bytes),
        }
    }

    /// The DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> Vec<u8> {
        match self {
            PublicKey::P256(der) => der.clone(),
            PublicKey::Ed25519(key) => [&ED25519_SPKI_PREFIX[..], key].concat(),
        }
    }
}

/// Verifies a 64-byte pure Ed25519 signature over `message` with a DER
/// SubjectPublicKeyInfo (RFC 8410). Strict RFC 8032 verification (no small-
/// order keys, canonical S), as ed25519-dalek's `verify_strict` does it.
pub fn verify_ed25519(spki_der: &[u8], message: &[u8], signature: &[u8]) -> bool {
    let Some(PublicKey::Ed25519(key)) = PublicKey::from_der(spki_der) else {
        return false;
    };
    let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&key) else {
        return false;
    };
    let Ok(sig) = ed25519_dalek::Signature::from_slice(signature) else {
        return false;
    };
    key.verify_strict(message, &sig).is_ok()
}

/// The fixed-size r||s form (64 bytes) of a DER ECDSA P-256 signature.
pub fn signature_to_raw(der: &[u8]) -> Option<Vec<u8>> {
    Signature::from_der(der).ok().map(|s| s.to_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blinded inversion against p256's own (Fermat), over random
    /// scalars and the edges; the GCD alone against a multiplication.
    #[test]
    fn blinded_inversion_is_the_inverse() {
        let mut edges = vec![
            Scalar::ONE,
            -Scalar::ONE,
            Scalar::from(2u64),
            -Scalar::from(2u64),
        ];
        for _ in 0..2000 {
            let mut raw = [0u8; 32];
            getrandom::getrandom(&mut raw).unwrap();
            edges.push(<Scalar as Reduce<U256>>::reduce_bytes(&raw.into()));
        }
        for k in edges.into_iter().filter(|k| !bool::from(k.is_zero())) {
            let inv = invert_blinded(&k).unwrap();
            assert_eq!(inv, k.invert().unwrap());
            assert_eq!(inv * k, Scalar::ONE);
        }
        let n = NistP256::ORDER;
        assert_eq!(inverse_vartime(&U256::ZERO, &n), None);
        assert_eq!(inverse_vartime(&n, &n), None);
        assert_eq!(inverse_vartime(&U256::MAX, &n), None);
        assert_eq!(inverse_vartime(&U256::ONE, &n), Some(U256::ONE));
        // Modulo the field prime too (carry out of x + m: p > 2^255).
        let p =
            U256::from_be_hex("ffffffff00000001000000000000000000000000ffffffffffffffffffffffff");
        use p256::elliptic_curve::bigint::modular::runtime_mod::{DynResidue, DynResidueParams};
        let params = DynResidueParams::new(&p);
        for a in [
            U256::from(3u64),
            p.wrapping_sub(&U256::ONE),
            U256::MAX.shr_vartime(1),
        ] {
            let inv = inverse_vartime(&a, &p).unwrap();
            let product = DynResidue::new(&a, params) * DynResidue::new(&inv, params);
            assert_eq!(product.retrieve(), U256::ONE, "{a}");
        }
    }

    #[test]
    fn table_multiplication_matches_the_generic_one() {
        let mut edge = vec![Scalar::ZERO, Scalar::ONE, -Scalar::ONE, Scalar::from(16u64)];
        // A window's last and a next window's first digit, and windows
        // that straddle two 64-bit words (bits 60..66, 126..132, 186..192).
        // Signed digits: 32 stays, 33 becomes -31 and carries; a carry into
        // 31 makes 32 (no carry), into 32 makes 33 (-31, a carry again),
        // into 63 makes 64 (0, a carry again).
        for v in [
            63u64,
            64,
            4095,
            4096,
            1 << 60,
            1 << 63,
            u64::MAX,
            31,
            32,
            33,
            32 * 64 + 32,
            31 * 64 + 33,
            32 * 64 + 33,
            63 * 64 + 33,
        ] {
            edge.push(Scalar::from(v));
        }
        for shift in [61usize, 127, 190, 250, 255] {
            edge.push(<Scalar as Reduce<U256>>::reduce(
                U256::ONE.shl_vartime(shift),
            ));
        }
        for _ in 0..200 {
            let mut raw = [0u8; 32];
            getrandom::getrandom(&mut raw).unwrap();
            edge.push(<Scalar as Reduce<U256>>::reduce_bytes(&raw.into()));
        }
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
            Input {
                purpose: Purpose::KernelSymmetric(32),
                ..base
            },
            base,
        ];
        let set: std::collections::HashSet<_> = variants.iter().map(Input::encode).collect();
        assert_eq!(set.len(), variants.len());
    }

    /// A `logon` key has its own purpose byte (03) and nothing else of E
    /// differs; the `user` key of the same request keeps purpose 01, so its
    /// bytes are those of derivation v1 as before.
    #[test]
    fn kernel_only_keys_have_their_own_purpose() {
        let user = input(Subject::User { uid: 1000 });
        let logon = Input {
            purpose: Purpose::KernelSymmetric(32),
            ..user
        };
        let (u, l) = (user.encode(), logon.encode());
        let purpose_at = 4 + DOMAIN.len() + 1;
        assert_eq!((u[purpose_at], l[purpose_at]), (0x01, 0x03));
        let differ: Vec<usize> = (0..u.len()).filter(|&i| u[i] != l[i]).collect();
        assert_eq!(differ, vec![purpose_at], "only the purpose byte differs");
        let user_key = symmetric_key(&soft_prk(&user.message()), 32).unwrap();
        let logon_key = kernel_symmetric_key(&soft_prk(&logon.message()), 32).unwrap();
        assert_ne!(user_key.as_ref(), logon_key.as_ref());
        // Even under one PRK the labels keep the two apart.
        let prk = soft_prk(&user.message());
        assert_ne!(
            symmetric_key(&prk, 32).unwrap().as_ref(),
            kernel_symmetric_key(&prk, 32).unwrap().as_ref()
        );
        assert!(kernel_symmetric_key(&prk, 0).is_err());
        assert!(kernel_symmetric_key(&prk, 1025).is_err());
    }

    /// DERIVATION.md's registry: every purpose (the reserved one included)
    /// has its own code and its own label.
    #[test]
    fn purpose_codes_and_labels_are_distinct() {
        let codes = [
            PURPOSE_SYMMETRIC,
            PURPOSE_P256,
            PURPOSE_KERNEL_SYMMETRIC,
            PURPOSE_ED25519,
        ];
        assert_eq!(codes, [1, 2, 3, 4]);
        let labels = [
            INFO_SYMMETRIC,
            DST_P256,
            INFO_KERNEL_SYMMETRIC,
            INFO_ED25519_SEED,
        ];
        let set: std::collections::HashSet<_> = labels.iter().collect();
        assert_eq!(set.len(), labels.len());
        let purposes = [
            Purpose::Symmetric(32),
            Purpose::P256,
            Purpose::KernelSymmetric(32),
            Purpose::Ed25519,
        ];
        let got: Vec<_> = purposes.iter().map(|p| p.code_and_length()).collect();
        assert_eq!(got, [(1, 32), (2, 32), (3, 32), (4, 32)]);
    }

    /// RFC 8032 section 7.1, TEST 1 to 3: seed, public key and signature.
    #[test]
    fn rfc8032_section_7_1() {
        for (seed, public, message, sig) in [
            (
                "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
                "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
                "",
                "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155\
                 5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
            ),
            (
                "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
                "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
                "72",
                "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da\
                 085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
            ),
            (
                "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
                "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
                "af82",
                "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac\
                 18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
            ),
        ] {
            let key = Ed25519Key::from_seed(&bytes32(seed));
            assert_eq!(hex::encode(key.public_key().unwrap()), public);
            let spki = key.spki_der().unwrap();
            assert_eq!(
                hex::encode(&spki),
                format!("302a300506032b6570032100{public}")
            );
            let message = hex::decode(message).unwrap();
            let got = key.sign(&message).unwrap();
            assert_eq!(hex::encode(got), sig);
            assert!(verify_ed25519(&spki, &message, &got));
            let mut other = message.clone();
            other.push(0);
            assert!(!verify_ed25519(&spki, &other, &got));
            let mut forged = got;
            forged[63] ^= 0x10;
            assert!(!verify_ed25519(&spki, &message, &forged));
        }
    }

    /// An Ed25519 key has purpose 04 in E and nothing else differs from the
    /// P-256 key or the 32-byte symmetric key of the same request; its
    /// seed is neither the symmetric key of that request nor the HKDF
    /// output of another label under its own PRK.
    #[test]
    fn ed25519_keys_are_neither_p256_nor_symmetric_keys_of_the_request() {
        let sym = input(Subject::User { uid: 1000 });
        let ed = Input {
            purpose: Purpose::Ed25519,
            ..sym
        };
        let p256 = Input {
            purpose: Purpose::P256,
            ..sym
        };
        let purpose_at = 4 + DOMAIN.len() + 1;
        for other in [sym, p256] {
            let (a, b) = (other.encode(), ed.encode());
            let differ: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
            assert_eq!(differ, vec![purpose_at], "{:?}", other.purpose);
            assert_eq!(b[purpose_at], 0x04);
        }
        let ed_key = Ed25519Key::from_prk(&soft_prk(&ed.message())).unwrap();
        let seed = ed_key.secret_seed().unwrap();
        let sym_key = symmetric_key(&soft_prk(&sym.message()), 32).unwrap();
        assert_ne!(seed.as_ref(), sym_key.as_ref());
        // The symmetric key used as a seed is another key pair.
        let as_seed = Ed25519Key(sym_key);
        assert_ne!(as_seed.public_key().unwrap(), ed_key.public_key().unwrap());
        // Under one PRK the labels still separate.
        let prk = soft_prk(&ed.message());
        assert_ne!(
            Ed25519Key::from_prk(&prk)
                .unwrap()
                .secret_seed()
                .unwrap()
                .as_ref(),
            symmetric_key(&prk, 32).unwrap().as_ref()
        );
        let p256_key = P256Key::from_prk(&soft_prk(&p256.message())).unwrap();
        assert_ne!(p256_key.secret_scalar().unwrap().as_ref(), seed.as_ref());
        // Deterministic, and the public key is the signer's.
        let spki = ed_key.spki_der().unwrap();
        assert_eq!(spki.len(), 44);
        let sig = ed_key.sign(b"m").unwrap();
        assert_eq!(sig, ed_key.sign(b"m").unwrap());
        assert!(verify_ed25519(&spki, b"m", &sig));
        assert!(!verify_ed25519(&p256_key.spki_der().unwrap(), b"m", &sig));
    }

    /// Key files: PEM or DER, each algorithm recognized by its SPKI.
    #[test]
    fn public_keys_say_their_algorithm() {
        let ed = Ed25519Key::from_prk(&soft_prk(&[5; 32])).unwrap();
        let p = P256Key::from_prk(&soft_prk(&[5; 32])).unwrap();
        let (ed_der, p_der) = (ed.spki_der().unwrap(), p.spki_der().unwrap());
        for (der, want_ed) in [(&ed_der, true), (&p_der, false)] {
            let pem = spki_to_pem(der).unwrap();
            assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem}");
            for bytes in [der.clone(), pem.into_bytes()] {
                let key = PublicKey::from_pem_or_der(&bytes).unwrap();
                assert_eq!(matches!(key, PublicKey::Ed25519(_)), want_ed);
                assert_eq!(&key.spki_der(), der);
            }
        }
        assert_eq!(spki_from_pem_or_der(&ed_der), None, "not a P-256 key");
        assert!(PublicKey::from_der(&ed_der[..43]).is_none());
        assert!(PublicKey::from_der(&[ed_der.clone(), vec![0]].concat()).is_none());
        assert!(PublicKey::from_pem_or_der(b"junk").is_none());
        assert!(spki_to_pem(b"junk").is_none());
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
