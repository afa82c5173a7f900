//! The token's logic, in safe Rust: one slot, sessions, key objects named
//! by selectors, attributes, and signatures asked of the kernel. The ABI
//! layer (`abi.rs`) turns C arguments into these calls.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use cryptoki_sys::*;
use derived_keys::client::{ClientError, KeyRequest};
use derived_keys::request::{Algorithm, Selector};
use sha2::{Digest, Sha256};

/// At most this many open sessions (C_OpenSession answers CKR_SESSION_COUNT).
pub const MAX_SESSIONS: usize = 64;
/// At most this many distinct object handles per initialisation.
pub const MAX_OBJECTS: usize = 4096;
/// Every signature is 64 bytes: P-256 r||s, or Ed25519.
pub const SIG_LEN: usize = 64;
/// The one slot.
pub const SLOT_ID: CK_SLOT_ID = 0;

/// Test only: the description prefix of the requests (default `derived`).
pub const PREFIX_ENV: &str = "DERIVED_KEYS_PKCS11_PREFIX";
/// Test only: the configuration whose `[pkcs11] keys` a search without a
/// label lists (default [`derived_keys::config::DEFAULT_PATH`]).
pub const CONFIG_ENV: &str = "DERIVED_KEYS_PKCS11_CONFIG";

pub const MECHANISMS: [CK_MECHANISM_TYPE; 3] = [CKM_ECDSA, CKM_ECDSA_SHA256, CKM_EDDSA];

/// DER OID prime256v1 (1.2.840.10045.3.1.7).
pub const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER OID id-Ed25519 (1.3.101.112), one of PKCS#11 3.0's two spellings.
pub const ED25519_PARAMS: [u8; 5] = [0x06, 0x03, 0x2b, 0x65, 0x70];
const ED25519_SPKI_HEAD: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

#[derive(Debug, Clone)]
pub struct Object {
    pub selector: Selector,
    pub class: CK_OBJECT_CLASS,
    /// The public key (DER SPKI), once asked for.
    pub spki: Option<Vec<u8>>,
}

/// An active signature operation.
#[derive(Debug, Clone)]
pub struct SignOp {
    pub mech: CK_MECHANISM_TYPE,
    pub key: CK_OBJECT_HANDLE,
    /// CKM_ECDSA_SHA256 after a C_SignUpdate: the data hashed so far (the
    /// module hashes; the kernel signs the digest once, at C_SignFinal).
    pub parts: Option<Sha256>,
}

#[derive(Debug, Default)]
pub struct Session {
    pub rw: bool,
    pub find: Option<(Vec<CK_OBJECT_HANDLE>, usize)>,
    pub sign: Option<SignOp>,
}

#[derive(Debug)]
pub struct State {
    pid: u32,
    pub prefix: Option<String>,
    pub configured: Vec<Selector>,
    pub sessions: HashMap<CK_SESSION_HANDLE, Session>,
    next_session: CK_SESSION_HANDLE,
    pub objects: Vec<Object>,
    pub logged_in: bool,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn lock() -> MutexGuard<'static, Option<State>> {
    // A panic caught at the ABI edge may have poisoned it; the state is
    // still consistent (every change is a single assignment or insert).
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on the state of this process's initialisation. After a fork
/// the child sees CKR_CRYPTOKI_NOT_INITIALIZED until it calls C_Initialize,
/// as PKCS#11 asks.
pub fn with<T>(f: impl FnOnce(&mut State) -> Result<T, CK_RV>) -> Result<T, CK_RV> {
    let mut g = lock();
    match g.as_mut() {
        Some(s) if s.pid == std::process::id() => f(s),
        _ => Err(CKR_CRYPTOKI_NOT_INITIALIZED),
    }
}

/// The selectors a search without a label lists: the configuration's
/// `[pkcs11] keys`. A configuration that cannot be read or is invalid lists
/// nothing rather than failing C_Initialize: a labelled search (or one by
/// CKA_ID) needs no configuration, and a host program should not lose its
/// other tokens over ours.
pub fn configured_keys(path: &std::path::Path) -> Vec<Selector> {
    derived_keys::config::Config::load(path)
        .map(|c| c.pkcs11_keys)
        .unwrap_or_default()
}

pub fn initialize() -> Result<(), CK_RV> {
    let mut g = lock();
    let pid = std::process::id();
    if matches!(g.as_ref(), Some(s) if s.pid == pid) {
        return Err(CKR_CRYPTOKI_ALREADY_INITIALIZED);
    }
    let prefix = std::env::var(PREFIX_ENV).ok().filter(|p| !p.is_empty());
    let config = std::env::var_os(CONFIG_ENV)
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| derived_keys::config::DEFAULT_PATH.into());
    let configured = configured_keys(std::path::Path::new(&config));
    *g = Some(State {
        pid,
        prefix,
        configured,
        sessions: HashMap::new(),
        next_session: 1,
        objects: Vec::new(),
        logged_in: false,
    });
    Ok(())
}

pub fn finalize() -> Result<(), CK_RV> {
    let mut g = lock();
    match g.as_ref() {
        Some(s) if s.pid == std::process::id() => {
            *g = None;
            Ok(())
        }
        _ => Err(CKR_CRYPTOKI_NOT_INITIALIZED),
    }
}

pub fn check_slot(slot: CK_SLOT_ID) -> Result<(), CK_RV> {
    if slot == SLOT_ID {
        Ok(())
    } else {
        Err(CKR_SLOT_ID_INVALID)
    }
}

/// A fixed-width, space-padded PKCS#11 text field.
pub fn padded<const N: usize>(s: &str) -> [CK_UTF8CHAR; N] {
    let mut out = [b' '; N];
    for (o, b) in out.iter_mut().zip(s.bytes()) {
        *o = b;
    }
    out
}

pub fn info() -> CK_INFO {
    CK_INFO {
        cryptokiVersion: CK_VERSION {
            major: 2,
            minor: 40,
        },
        manufacturerID: padded("derived-keys"),
        flags: 0,
        libraryDescription: padded("derived-keys PKCS#11 module"),
        libraryVersion: CK_VERSION { major: 0, minor: 1 },
    }
}

pub fn slot_info() -> CK_SLOT_INFO {
    CK_SLOT_INFO {
        slotDescription: padded("derived-keys: keys derived from the TPM"),
        manufacturerID: padded("derived-keys"),
        flags: CKF_TOKEN_PRESENT,
        hardwareVersion: CK_VERSION { major: 0, minor: 1 },
        firmwareVersion: CK_VERSION { major: 0, minor: 1 },
    }
}

pub fn token_info(state: &State) -> CK_TOKEN_INFO {
    let rw = state.sessions.values().filter(|s| s.rw).count();
    CK_TOKEN_INFO {
        label: padded("derived-keys"),
        manufacturerID: padded("derived-keys"),
        model: padded("TPM-derived"),
        serialNumber: padded("0"),
        flags: CKF_TOKEN_INITIALIZED | CKF_WRITE_PROTECTED,
        ulMaxSessionCount: MAX_SESSIONS as CK_ULONG,
        ulSessionCount: state.sessions.len() as CK_ULONG,
        ulMaxRwSessionCount: MAX_SESSIONS as CK_ULONG,
        ulRwSessionCount: rw as CK_ULONG,
        ulMaxPinLen: 0,
        ulMinPinLen: 0,
        ulTotalPublicMemory: CK_UNAVAILABLE_INFORMATION,
        ulFreePublicMemory: CK_UNAVAILABLE_INFORMATION,
        ulTotalPrivateMemory: CK_UNAVAILABLE_INFORMATION,
        ulFreePrivateMemory: CK_UNAVAILABLE_INFORMATION,
        hardwareVersion: CK_VERSION { major: 0, minor: 1 },
        firmwareVersion: CK_VERSION { major: 0, minor: 1 },
        utcTime: [b' '; 16],
    }
}

pub fn mechanism_info(mech: CK_MECHANISM_TYPE) -> Result<CK_MECHANISM_INFO, CK_RV> {
    match mech {
        CKM_ECDSA | CKM_ECDSA_SHA256 => Ok(CK_MECHANISM_INFO {
            ulMinKeySize: 256,
            ulMaxKeySize: 256,
            flags: CKF_SIGN | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS,
        }),
        CKM_EDDSA => Ok(CK_MECHANISM_INFO {
            ulMinKeySize: 255,
            ulMaxKeySize: 255,
            flags: CKF_SIGN,
        }),
        _ => Err(CKR_MECHANISM_INVALID),
    }
}

impl State {
    pub fn open_session(&mut self, flags: CK_FLAGS) -> Result<CK_SESSION_HANDLE, CK_RV> {
        if flags & CKF_SERIAL_SESSION == 0 {
            return Err(CKR_SESSION_PARALLEL_NOT_SUPPORTED);
        }
        if self.sessions.len() >= MAX_SESSIONS {
            return Err(CKR_SESSION_COUNT);
        }
        let h = self.next_session;
        self.next_session = self.next_session.checked_add(1).unwrap_or(1).max(1);
        self.sessions.insert(
            h,
            Session {
                rw: flags & CKF_RW_SESSION != 0,
                ..Session::default()
            },
        );
        Ok(h)
    }

    pub fn session(&mut self, h: CK_SESSION_HANDLE) -> Result<&mut Session, CK_RV> {
        self.sessions.get_mut(&h).ok_or(CKR_SESSION_HANDLE_INVALID)
    }

    pub fn close_session(&mut self, h: CK_SESSION_HANDLE) -> Result<(), CK_RV> {
        self.sessions
            .remove(&h)
            .map(|_| ())
            .ok_or(CKR_SESSION_HANDLE_INVALID)?;
        if self.sessions.is_empty() {
            self.logged_in = false;
        }
        Ok(())
    }

    pub fn close_all(&mut self) {
        self.sessions.clear();
        self.logged_in = false;
    }

    pub fn session_info(&mut self, h: CK_SESSION_HANDLE) -> Result<CK_SESSION_INFO, CK_RV> {
        let logged_in = self.logged_in;
        let s = self.session(h)?;
        let state = match (s.rw, logged_in) {
            (false, false) => CKS_RO_PUBLIC_SESSION,
            (false, true) => CKS_RO_USER_FUNCTIONS,
            (true, false) => CKS_RW_PUBLIC_SESSION,
            (true, true) => CKS_RW_USER_FUNCTIONS,
        };
        let mut flags = CKF_SERIAL_SESSION;
        if s.rw {
            flags |= CKF_RW_SESSION;
        }
        Ok(CK_SESSION_INFO {
            slotID: SLOT_ID,
            state,
            flags,
            ulDeviceError: 0,
        })
    }

    /// No PIN protects anything: a login is recorded (for the session
    /// states consumers read back) and any PIN accepted.
    pub fn login(&mut self, h: CK_SESSION_HANDLE, user: CK_USER_TYPE) -> Result<(), CK_RV> {
        self.session(h)?;
        match user {
            CKU_USER | CKU_SO | CKU_CONTEXT_SPECIFIC => {}
            _ => return Err(CKR_USER_TYPE_INVALID),
        }
        if user == CKU_CONTEXT_SPECIFIC {
            return Ok(());
        }
        if std::mem::replace(&mut self.logged_in, true) {
            return Err(CKR_USER_ALREADY_LOGGED_IN);
        }
        Ok(())
    }

    pub fn logout(&mut self, h: CK_SESSION_HANDLE) -> Result<(), CK_RV> {
        self.session(h)?;
        if !std::mem::replace(&mut self.logged_in, false) {
            return Err(CKR_USER_NOT_LOGGED_IN);
        }
        Ok(())
    }

    fn handle(
        &mut self,
        selector: &Selector,
        class: CK_OBJECT_CLASS,
    ) -> Result<CK_OBJECT_HANDLE, CK_RV> {
        if let Some(i) = self
            .objects
            .iter()
            .position(|o| o.class == class && &o.selector == selector)
        {
            return Ok(i as CK_OBJECT_HANDLE + 1);
        }
        if self.objects.len() >= MAX_OBJECTS {
            return Err(CKR_HOST_MEMORY);
        }
        self.objects.push(Object {
            selector: selector.clone(),
            class,
            spki: None,
        });
        Ok(self.objects.len() as CK_OBJECT_HANDLE)
    }

    pub fn object(&self, h: CK_OBJECT_HANDLE) -> Result<&Object, CK_RV> {
        usize::try_from(h)
            .ok()
            .and_then(|h| h.checked_sub(1))
            .and_then(|i| self.objects.get(i))
            .ok_or(CKR_OBJECT_HANDLE_INVALID)
    }

    pub fn cache_spki(&mut self, selector: &Selector, spki: &[u8]) {
        for o in self.objects.iter_mut().filter(|o| &o.selector == selector) {
            o.spki = Some(spki.to_vec());
        }
    }

    /// The objects `template` matches: with a CKA_LABEL, that selector's
    /// pair (if it is a valid selector); else with a CKA_ID, the pair of the
    /// selector it spells (see [`key_id`]); else the configured ones'. Every
    /// other attribute filters, and one the objects do not have (or that is
    /// sensitive) matches nothing. Attributes that need the public key are
    /// not matched here unless asked for (then the key is derived, once).
    pub fn find_init(
        &mut self,
        h: CK_SESSION_HANDLE,
        template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    ) -> Result<(), CK_RV> {
        if self.session(h)?.find.is_some() {
            return Err(CKR_OPERATION_ACTIVE);
        }
        let given = |ty| template.iter().find(|(t, _)| *t == ty).map(|(_, v)| v);
        let candidates: Vec<Selector> = match (given(CKA_LABEL), given(CKA_ID)) {
            (Some(label), _) => parse_bytes(label).into_iter().collect(),
            // The ID is matched below like any attribute: only the
            // canonical spelling is an object's CKA_ID.
            (None, Some(id)) => parse_bytes(id).into_iter().collect(),
            (None, None) => self.configured.clone(),
        };
        let prefix = self.prefix.clone();
        let mut found = Vec::new();
        for sel in &candidates {
            for class in [CKO_PRIVATE_KEY, CKO_PUBLIC_KEY] {
                let mut spki: Option<Vec<u8>> = None;
                let mut matches = true;
                for (ty, want) in template {
                    if *ty == CKA_LABEL {
                        continue; // matched by the selector it parses to
                    }
                    let got = match attribute(sel, class, *ty, spki.as_deref()) {
                        Attr::NeedsSpki => {
                            let key = public_key(sel, prefix.as_deref())?;
                            let got = attribute(sel, class, *ty, Some(&key));
                            spki = Some(key);
                            got
                        }
                        other => other,
                    };
                    if !matches!(got, Attr::Value(v) if &v == want) {
                        matches = false;
                        break;
                    }
                }
                if matches {
                    let oh = self.handle(sel, class)?;
                    if let Some(k) = &spki {
                        self.cache_spki(sel, k);
                    }
                    found.push(oh);
                }
            }
        }
        self.session(h)?.find = Some((found, 0));
        Ok(())
    }

    pub fn find_next(
        &mut self,
        h: CK_SESSION_HANDLE,
        max: usize,
    ) -> Result<Vec<CK_OBJECT_HANDLE>, CK_RV> {
        let s = self.session(h)?;
        let (found, pos) = s.find.as_mut().ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        let end = found.len().min(pos.saturating_add(max));
        let out = found.get(*pos..end).unwrap_or_default().to_vec();
        *pos = end;
        Ok(out)
    }

    pub fn find_final(&mut self, h: CK_SESSION_HANDLE) -> Result<(), CK_RV> {
        let s = self.session(h)?;
        s.find
            .take()
            .map(|_| ())
            .ok_or(CKR_OPERATION_NOT_INITIALIZED)
    }

    pub fn sign_init(
        &mut self,
        h: CK_SESSION_HANDLE,
        mech: CK_MECHANISM_TYPE,
        key: CK_OBJECT_HANDLE,
    ) -> Result<(), CK_RV> {
        if self.session(h)?.sign.is_some() {
            return Err(CKR_OPERATION_ACTIVE);
        }
        let obj = self.object(key).map_err(|_| CKR_KEY_HANDLE_INVALID)?;
        if obj.class != CKO_PRIVATE_KEY {
            return Err(CKR_KEY_FUNCTION_NOT_PERMITTED);
        }
        match (mech, obj.selector.alg) {
            (CKM_ECDSA | CKM_ECDSA_SHA256, Algorithm::P256) | (CKM_EDDSA, Algorithm::Ed25519) => {}
            (CKM_ECDSA | CKM_ECDSA_SHA256 | CKM_EDDSA, _) => return Err(CKR_KEY_TYPE_INCONSISTENT),
            _ => return Err(CKR_MECHANISM_INVALID),
        }
        self.session(h)?.sign = Some(SignOp {
            mech,
            key,
            parts: None,
        });
        Ok(())
    }

    /// The active single-part signature operation (it stays active:
    /// length queries). One that C_SignUpdate made multi-part is finished
    /// by C_SignFinal only.
    pub fn sign_op(
        &mut self,
        h: CK_SESSION_HANDLE,
    ) -> Result<(CK_MECHANISM_TYPE, Selector, Option<String>), CK_RV> {
        let op = self
            .session(h)?
            .sign
            .clone()
            .ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        if op.parts.is_some() {
            return Err(CKR_OPERATION_ACTIVE);
        }
        let sel = self.object(op.key)?.selector.clone();
        Ok((op.mech, sel, self.prefix.clone()))
    }

    /// C_SignUpdate: CKM_ECDSA_SHA256 hashes the part here. CKM_ECDSA
    /// (input: a hash) and CKM_EDDSA (pure Ed25519 reads the whole message
    /// twice) are single-part only, as PKCS#11 lists them.
    pub fn sign_update(&mut self, h: CK_SESSION_HANDLE, data: &[u8]) -> Result<(), CK_RV> {
        let op = self
            .session(h)?
            .sign
            .as_mut()
            .ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        if op.mech != CKM_ECDSA_SHA256 {
            return Err(CKR_FUNCTION_NOT_SUPPORTED);
        }
        op.parts.get_or_insert_with(Sha256::new).update(data);
        Ok(())
    }

    /// What C_SignFinal signs: the selector and the SHA-256 of all parts
    /// (none: of the empty message). The operation stays active.
    pub fn sign_final_op(
        &mut self,
        h: CK_SESSION_HANDLE,
    ) -> Result<(Selector, Option<String>, [u8; 32]), CK_RV> {
        let op = self
            .session(h)?
            .sign
            .clone()
            .ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        if op.mech != CKM_ECDSA_SHA256 {
            return Err(CKR_FUNCTION_NOT_SUPPORTED);
        }
        let digest = op.parts.unwrap_or_default().finalize().into();
        let sel = self.object(op.key)?.selector.clone();
        Ok((sel, self.prefix.clone(), digest))
    }

    pub fn sign_end(&mut self, h: CK_SESSION_HANDLE) {
        if let Ok(s) = self.session(h) {
            s.sign = None;
        }
    }
}

/// CKA_ID: the canonical selector's bytes, the same for both objects of a
/// pair and in every process. Consumers find a key by its ID alone
/// (OpenSSH's ssh-pkcs11 finds the private key by the public key's
/// CKA_ID, GnuTLS the public key by the private key's), and the ID maps
/// back to its selector without a table the token would have to keep.
pub fn key_id(sel: &Selector) -> Vec<u8> {
    sel.to_string().into_bytes()
}

/// A label's or ID's selector, if it spells a valid one.
fn parse_bytes(b: &[u8]) -> Option<Selector> {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| Selector::parse(s).ok())
}

/// One attribute's value, or why there is none.
#[derive(Debug, PartialEq, Eq)]
pub enum Attr {
    Value(Vec<u8>),
    Invalid,
    Sensitive,
    /// Needs the public key, which takes a request to the kernel.
    NeedsSpki,
}

fn ulong(v: CK_ULONG) -> Attr {
    Attr::Value(v.to_ne_bytes().to_vec())
}

fn flag(b: bool) -> Attr {
    Attr::Value(vec![if b { CK_TRUE } else { CK_FALSE }])
}

/// CKA_EC_POINT: a DER OCTET STRING of the uncompressed P-256 point, or of
/// the 32-byte Ed25519 key, read from the SPKI the kernel gave.
pub fn ec_point(alg: Algorithm, spki: &[u8]) -> Option<Vec<u8>> {
    let raw: Vec<u8> = match alg {
        Algorithm::P256 => {
            use p256::elliptic_curve::sec1::ToEncodedPoint;
            use p256::pkcs8::DecodePublicKey;
            let pk = p256::PublicKey::from_public_key_der(spki).ok()?;
            pk.to_encoded_point(false).as_bytes().to_vec()
        }
        Algorithm::Ed25519 => {
            let key = spki.strip_prefix(&ED25519_SPKI_HEAD[..])?;
            if key.len() != 32 {
                return None;
            }
            key.to_vec()
        }
    };
    let mut out = vec![0x04, u8::try_from(raw.len()).ok()?];
    out.extend_from_slice(&raw);
    Some(out)
}

pub fn attribute(
    sel: &Selector,
    class: CK_OBJECT_CLASS,
    ty: CK_ATTRIBUTE_TYPE,
    spki: Option<&[u8]>,
) -> Attr {
    let private = class == CKO_PRIVATE_KEY;
    match ty {
        CKA_CLASS => ulong(class),
        CKA_KEY_TYPE => ulong(match sel.alg {
            Algorithm::P256 => CKK_EC,
            Algorithm::Ed25519 => CKK_EC_EDWARDS,
        }),
        CKA_LABEL => Attr::Value(sel.to_string().into_bytes()),
        CKA_ID => Attr::Value(key_id(sel)),
        CKA_TOKEN => flag(true),
        CKA_PRIVATE | CKA_MODIFIABLE | CKA_COPYABLE | CKA_DESTROYABLE | CKA_LOCAL | CKA_DERIVE => {
            flag(false)
        }
        CKA_SUBJECT | CKA_START_DATE | CKA_END_DATE => Attr::Value(Vec::new()),
        CKA_KEY_GEN_MECHANISM => ulong(CK_UNAVAILABLE_INFORMATION),
        CKA_EC_PARAMS => Attr::Value(match sel.alg {
            Algorithm::P256 => P256_PARAMS.to_vec(),
            Algorithm::Ed25519 => ED25519_PARAMS.to_vec(),
        }),
        CKA_EC_POINT => match spki {
            None => Attr::NeedsSpki,
            Some(k) => ec_point(sel.alg, k).map_or(Attr::Invalid, Attr::Value),
        },
        CKA_PUBLIC_KEY_INFO => match spki {
            None => Attr::NeedsSpki,
            Some(k) => Attr::Value(k.to_vec()),
        },
        CKA_SIGN if private => flag(true),
        CKA_SENSITIVE | CKA_ALWAYS_SENSITIVE | CKA_NEVER_EXTRACTABLE if private => flag(true),
        CKA_SIGN_RECOVER
        | CKA_DECRYPT
        | CKA_UNWRAP
        | CKA_EXTRACTABLE
        | CKA_ALWAYS_AUTHENTICATE
        | CKA_WRAP_WITH_TRUSTED
            if private =>
        {
            flag(false)
        }
        CKA_VALUE if private => Attr::Sensitive,
        CKA_VERIFY if !private => flag(true),
        CKA_VERIFY_RECOVER | CKA_ENCRYPT | CKA_WRAP | CKA_TRUSTED if !private => flag(false),
        _ => Attr::Invalid,
    }
}

fn request(sel: &Selector, prefix: Option<&str>) -> Result<KeyRequest, CK_RV> {
    let req = KeyRequest::from_selector(sel).map_err(|_| CKR_FUNCTION_FAILED)?;
    Ok(match prefix {
        Some(p) => req.prefix(p),
        None => req,
    })
}

fn kernel_error(e: &ClientError) -> CK_RV {
    match e {
        ClientError::NoTpm { .. } | ClientError::Tpm { .. } | ClientError::TimedOut { .. } => {
            CKR_DEVICE_ERROR
        }
        _ => CKR_FUNCTION_FAILED,
    }
}

/// The public key (DER SPKI), from the kernel.
pub fn public_key(sel: &Selector, prefix: Option<&str>) -> Result<Vec<u8>, CK_RV> {
    request(sel, prefix)?
        .public_key()
        .map_err(|e| kernel_error(&e))
}

/// The 32-byte value ECDSA signs for a hash of any length: bits2int for a
/// 256-bit order keeps the leftmost 32 bytes of a longer hash, and a shorter
/// one is the same integer left-padded with zeros.
pub fn digest_for_ecdsa(hash: &[u8]) -> Result<[u8; 32], CK_RV> {
    if hash.is_empty() {
        return Err(CKR_DATA_LEN_RANGE);
    }
    let mut d = [0u8; 32];
    let n = hash.len().min(32);
    d[32 - n..].copy_from_slice(&hash[..n]);
    Ok(d)
}

/// The 64-byte signature PKCS#11 returns, asked of the kernel.
pub fn sign(
    mech: CK_MECHANISM_TYPE,
    sel: &Selector,
    prefix: Option<&str>,
    data: &[u8],
) -> Result<Vec<u8>, CK_RV> {
    match mech {
        CKM_ECDSA => sign_digest(sel, prefix, &digest_for_ecdsa(data)?),
        CKM_ECDSA_SHA256 => sign_digest(sel, prefix, &Sha256::digest(data).into()),
        CKM_EDDSA => {
            if data.is_empty() || data.len() > 1024 {
                return Err(CKR_DATA_LEN_RANGE);
            }
            let sig = request(sel, prefix)?
                .sign_message(data)
                .map_err(|e| kernel_error(&e))?;
            if sig.len() == SIG_LEN {
                Ok(sig)
            } else {
                Err(CKR_FUNCTION_FAILED)
            }
        }
        _ => Err(CKR_MECHANISM_INVALID),
    }
}

/// A P-256 signature over a SHA-256 digest, raw r||s, asked of the kernel.
pub fn sign_digest(
    sel: &Selector,
    prefix: Option<&str>,
    digest: &[u8; 32],
) -> Result<Vec<u8>, CK_RV> {
    let der = request(sel, prefix)?
        .sign_digest(digest)
        .map_err(|e| kernel_error(&e))?;
    let sig = p256::ecdsa::Signature::from_der(&der).map_err(|_| CKR_FUNCTION_FAILED)?;
    Ok(sig.to_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_map_back_to_their_selectors() {
        for s in ["machine:web", "git,alg=ed25519", "path:db,epoch=2,client=x"] {
            let sel = Selector::parse(s).unwrap();
            assert_eq!(parse_bytes(&key_id(&sel)), Some(sel.clone()));
            // Another spelling of the same key has the same ID.
            assert_eq!(
                key_id(&Selector::parse(&sel.to_string()).unwrap()),
                key_id(&sel)
            );
        }
        let a = Selector::parse("user:git").unwrap();
        let b = Selector::parse("user:git,alg=ed25519").unwrap();
        assert_ne!(key_id(&a), key_id(&b));
        assert_eq!(parse_bytes(b"no/such"), None);
        assert_eq!(parse_bytes(&[0xff, 0x00]), None);
    }

    #[test]
    fn ecdsa_digest_padding() {
        assert_eq!(digest_for_ecdsa(&[1; 20]).unwrap()[..12], [0; 12]);
        assert_eq!(digest_for_ecdsa(&[2; 48]).unwrap(), [2; 32]);
        assert!(digest_for_ecdsa(&[]).is_err());
    }

    #[test]
    fn attributes() {
        let sel = Selector::parse("machine:web").unwrap();
        assert_eq!(
            attribute(&sel, CKO_PRIVATE_KEY, CKA_VALUE, None),
            Attr::Sensitive
        );
        assert_eq!(
            attribute(&sel, CKO_PRIVATE_KEY, CKA_MODULUS, None),
            Attr::Invalid
        );
        assert_eq!(
            attribute(&sel, CKO_PUBLIC_KEY, CKA_EC_POINT, None),
            Attr::NeedsSpki
        );
        assert_eq!(
            attribute(&sel, CKO_PUBLIC_KEY, CKA_SIGN, None),
            Attr::Invalid
        );
        let mut label = [0u8; 32];
        label.copy_from_slice(&padded::<32>("derived-keys"));
        assert_eq!(&label[..14], b"derived-keys  ");
    }
}
