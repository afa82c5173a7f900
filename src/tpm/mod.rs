//! The TPM boundary: the only module that uses tss-esapi.
//!
//! One derivation is three TPM commands: CreatePrimary of the fixed HMAC
//! template in the owner hierarchy, HMAC of the 32-byte message, and
//! FlushContext of the primary, which runs on every path, errors included.
//!
//! Every primary gets a fresh random 32-byte authValue that only this
//! process knows (it is not an input of the key: the same template gives
//! the same HMAC key whatever its authValue). Another client of the same
//! TPM that finds the loaded primary's handle cannot use it.

pub mod netns;

use std::fmt;
use std::str::FromStr;

use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::{CapabilityType, PropertyTag, Tss2ResponseCodeKind};
use tss_esapi::handles::AuthHandle;
use tss_esapi::handles::{KeyHandle, ObjectHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Auth, CapabilityData, Digest, KeyedHashScheme, MaxBuffer, Public, PublicBuilder,
    PublicKeyedHashParameters,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::{Context, Error as TssError};

use crate::derive::{Prk, PRIMARY_UNIQUE};
use crate::secret::{SecretAllocError, SecretBuf};

/// TPMA_OBJECT of the primary: fixedTPM | fixedParent | sensitiveDataOrigin
/// | userWithAuth | noDA | sign. Part of derivation v1.
pub const PRIMARY_ATTRIBUTES: u32 = 0x0004_0472;

/// Bytes of the derivation primary's random authValue (a SHA-256 digest's
/// size, the most its name algorithm allows).
const PRIMARY_AUTH_LEN: usize = 32;

/// Handles of transient objects start here (TPM_HT_TRANSIENT << 24).
const TRANSIENT_FIRST: u32 = 0x8000_0000;
/// Handles of loaded sessions start here (TPM_HT_HMAC_SESSION << 24).
const SESSION_FIRST: u32 = 0x0200_0000;

/// How the TPM is reached, in the TCTI syntax tpm2-tools accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tcti {
    text: String,
    kind: TctiKind,
}

/// The transport family of a TCTI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TctiKind {
    /// A kernel device node such as /dev/tpmrm0.
    Device,
    /// swtpm's socket interface: a software TPM.
    Swtpm,
    /// The Microsoft simulator protocol: a software TPM.
    Mssim,
    /// The tpm2-abrmd access broker (whatever TPM it fronts).
    Tabrmd,
}

impl Tcti {
    /// Parses `device[:path]`, `swtpm[:host=H,port=P]`, `mssim[:...]` or
    /// `tabrmd[:...]`. Our own syntax check: tss-esapi's parser compiles
    /// regular expressions on every call (a fifth of a millisecond on the
    /// handler's hot path); a unit test keeps the two in agreement, and
    /// `Tpm::open` still hands the string to tss-esapi.
    pub fn parse(text: &str) -> Result<Tcti, TpmError> {
        let bad = || TpmError::BadTcti {
            tcti: text.to_owned(),
        };
        let (family, conf) = text.split_once(':').unwrap_or((text, ""));
        let network = |conf: &str| {
            conf.is_empty()
                || conf.split(',').all(|kv| match kv.split_once('=') {
                    Some(("host", h)) => !h.is_empty() && !h.contains([' ', '/']),
                    Some(("port", p)) => p.parse::<u16>().is_ok(),
                    _ => false,
                })
        };
        let kind = match family {
            "device" if !conf.contains('\0') => TctiKind::Device,
            "swtpm" if network(conf) => TctiKind::Swtpm,
            "mssim" if network(conf) => TctiKind::Mssim,
            "tabrmd" if !conf.contains('\0') => TctiKind::Tabrmd,
            _ => return Err(bad()),
        };
        Ok(Tcti {
            text: text.to_owned(),
            kind,
        })
    }

    pub fn kind(&self) -> TctiKind {
        self.kind
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The device node for `device:` TCTIs (default /dev/tpmrm0).
    pub fn device_path(&self) -> Option<&str> {
        match self.kind {
            TctiKind::Device => Some(
                self.text
                    .strip_prefix("device:")
                    .filter(|p| !p.is_empty())
                    .unwrap_or("/dev/tpmrm0"),
            ),
            _ => None,
        }
    }
}

impl fmt::Display for Tcti {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The TPM boundary's errors.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    #[error("{tcti:?} is not a TCTI: expected device[:PATH], swtpm[:host=H,port=P], mssim[:...] or tabrmd[:...]")]
    BadTcti { tcti: String },
    #[error("no TPM reachable through {tcti}")]
    Unreachable {
        tcti: String,
        #[source]
        source: TssError,
    },
    #[error("TPM object memory is full during {command} even after flushing leftovers")]
    ObjectMemory { command: &'static str },
    #[error(
        "TPM refused the owner-hierarchy authorization during {command} (response code {rc:#x})"
    )]
    OwnerAuth { command: &'static str, rc: u32 },
    #[error("TPM is in dictionary-attack lockout (response code {rc:#x})")]
    Lockout { rc: u32 },
    #[error("TPM command {command} failed with response code {rc:#x}")]
    Command {
        command: &'static str,
        rc: u32,
        #[source]
        source: TssError,
    },
    #[error("TPM stack error during {command}")]
    Stack {
        command: &'static str,
        #[source]
        source: TssError,
    },
    #[error("no randomness for the primary's authorization value")]
    NoRandomness,
    #[error("the TPM's salt key is not the one `dkey install` recorded (tpm.salt_key_name {expected}, the TPM presents {found}): something may stand between this host and its TPM, or the TPM was cleared")]
    SaltKeyMismatch { expected: String, found: String },
    #[error("TPM session memory is full during {command} even after flushing leftovers")]
    SessionMemory { command: &'static str },
    #[error("the TPM started no session")]
    NoSession,
    #[error("the owner authorization is longer than 64 bytes")]
    OwnerAuthTooLong,
    #[error("TPM returned a {len}-byte HMAC, expected 32")]
    HmacLength { len: usize },
    #[error(transparent)]
    Memory(#[from] SecretAllocError),
}

impl TpmError {
    /// ENODEV when no TPM is reachable (or none is named right), EIO when
    /// the TPM answered with an error.
    pub fn errno(&self) -> i32 {
        match self {
            TpmError::BadTcti { .. } | TpmError::Unreachable { .. } => libc::ENODEV,
            _ => libc::EIO,
        }
    }
}

/// Layers of a TSS2_RC (bits 16..23), from the TSS spec.
const LAYER_TPM: u32 = 0x00;
const LAYER_TCTI: u32 = 0x0A;

fn raw_rc(e: &TssError) -> Option<u32> {
    match e {
        TssError::Tss2Error(tss_esapi::constants::response_code::Tss2ResponseCode::FormatZero(
            rc,
        )) => Some(rc.0),
        TssError::Tss2Error(tss_esapi::constants::response_code::Tss2ResponseCode::FormatOne(
            rc,
        )) => Some(rc.0),
        _ => None,
    }
}

fn kind_of(e: &TssError) -> Option<Tss2ResponseCodeKind> {
    match e {
        TssError::Tss2Error(rc) => rc.kind(),
        _ => None,
    }
}

/// Turns a failed command into the boundary's typed error.
fn classify(tcti: &Tcti, command: &'static str, source: TssError) -> TpmError {
    let Some(rc) = raw_rc(&source) else {
        return TpmError::Stack { command, source };
    };
    match (rc >> 16) & 0xff {
        LAYER_TCTI => TpmError::Unreachable {
            tcti: tcti.to_string(),
            source,
        },
        LAYER_TPM => match kind_of(&source) {
            Some(Tss2ResponseCodeKind::ObjectMemory) => TpmError::ObjectMemory { command },
            Some(Tss2ResponseCodeKind::SessionMemory) => TpmError::SessionMemory { command },
            Some(Tss2ResponseCodeKind::Lockout) => TpmError::Lockout { rc },
            Some(Tss2ResponseCodeKind::AuthFail | Tss2ResponseCodeKind::BadAuth)
                if command == "CreatePrimary" =>
            {
                TpmError::OwnerAuth { command, rc }
            }
            _ => TpmError::Command {
                command,
                rc,
                source,
            },
        },
        _ => TpmError::Stack { command, source },
    }
}

/// What the TPM says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmInfo {
    pub manufacturer: String,
    pub vendor: String,
    /// True for swtpm/libtpms and simulators: no hardware protection.
    pub software: bool,
}

/// The derivation primary, loaded in the TPM until flushed, and the
/// salted session its HMACs run in.
#[derive(Debug)]
pub struct Primary {
    key: KeyHandle,
    session: AuthSession,
}

/// Which hierarchy passwords a TPM has set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthSet {
    pub owner: bool,
    pub endorsement: bool,
    pub lockout: bool,
    /// Dictionary-attack lockout is in force.
    pub in_lockout: bool,
}

/// A hierarchy whose password can be changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HierarchyAuth {
    Owner,
    Endorsement,
    Lockout,
    Platform,
}

/// An open connection to a TPM.
pub struct Tpm {
    ctx: Context,
    tcti: Tcti,
    /// The salt key Name this TPM must present (`tpm.salt_key_name`).
    salt_pin: Option<Vec<u8>>,
}

impl Tpm {
    /// Opens the TCTI. For socket TCTIs nothing is sent yet; an absent TPM
    /// shows up as `Unreachable` on the first command.
    pub fn open(tcti: &Tcti) -> Result<Tpm, TpmError> {
        let conf = TctiNameConf::from_str(tcti.as_str()).map_err(|_| TpmError::BadTcti {
            tcti: tcti.to_string(),
        })?;
        // A TCP simulator's TCTI connects at once, to a server that takes
        // one client at a time: under load a connect fails now and then
        // although the TPM is there. Try again briefly before calling it
        // unreachable; a device node is not retried.
        let retries = match tcti.kind() {
            TctiKind::Swtpm | TctiKind::Mssim => 3,
            TctiKind::Device | TctiKind::Tabrmd => 0,
        };
        let mut pause = std::time::Duration::from_millis(20);
        let mut attempt = 0;
        let ctx = loop {
            match Context::new(conf.clone()) {
                Ok(ctx) => break ctx,
                Err(_) if attempt < retries => {
                    attempt += 1;
                    std::thread::sleep(pause);
                    pause *= 3;
                }
                Err(source) => {
                    return Err(TpmError::Unreachable {
                        tcti: tcti.to_string(),
                        source,
                    })
                }
            }
        };
        Ok(Tpm {
            ctx,
            tcti: tcti.clone(),
            salt_pin: None,
        })
    }

    /// Refuse to derive unless the TPM's salt key has this Name (what
    /// `dkey install` recorded): an interposer cannot swap in its own key.
    pub fn pin_salt_key(&mut self, name: Option<Vec<u8>>) {
        self.salt_pin = name;
    }

    /// The template of the salt key: the TCG's ECC P-256 storage key
    /// template (restricted decryption, AES-128-CFB, zero unique), in the
    /// owner hierarchy. Fixed, so its Name is the same after every reboot
    /// and re-image while the owner seed stays (DERIVATION.md).
    fn salt_template() -> Result<Public, TssError> {
        use tss_esapi::interface_types::ecc::EccCurve;
        use tss_esapi::structures::{
            EccPoint, EccScheme, KeyDerivationFunctionScheme, PublicEccParametersBuilder,
            SymmetricDefinitionObject,
        };
        let attributes = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_no_da(true)
            .with_restricted(true)
            .with_decrypt(true)
            .build()?;
        PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attributes)
            .with_ecc_parameters(
                PublicEccParametersBuilder::new()
                    .with_symmetric(SymmetricDefinitionObject::AES_128_CFB)
                    .with_ecc_scheme(EccScheme::Null)
                    .with_curve(EccCurve::NistP256)
                    .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                    .with_is_signing_key(false)
                    .with_is_decryption_key(true)
                    .with_restricted(true)
                    .build()?,
            )
            .with_ecc_unique_identifier(EccPoint::default())
            .build()
    }

    /// Sets the owner hierarchy's authValue in ESYS (empty when None).
    fn set_owner_auth(&mut self, owner_auth: Option<&SecretBuf>) -> Result<(), TpmError> {
        let stack = |source| TpmError::Stack {
            command: "TR_SetAuth",
            source,
        };
        let auth = match owner_auth {
            Some(a) if a.len() > 64 => return Err(TpmError::OwnerAuthTooLong),
            Some(a) => Auth::try_from(a.as_ref().to_vec()).map_err(stack)?,
            None => Auth::default(),
        };
        self.ctx
            .tr_set_auth(ObjectHandle::Owner, auth)
            .map_err(stack)
    }

    /// A session for one command, with `symmetric` parameter encryption
    /// and `salt` as its salt key (None: unsalted).
    fn start_session(
        &mut self,
        salt: Option<KeyHandle>,
        symmetric: tss_esapi::structures::SymmetricDefinition,
        keep: bool,
    ) -> Result<AuthSession, TpmError> {
        use tss_esapi::attributes::SessionAttributesBuilder;
        use tss_esapi::constants::SessionType;
        let tcti = self.tcti.clone();
        let session = self
            .ctx
            .start_auth_session(
                salt,
                None,
                None,
                SessionType::Hmac,
                symmetric,
                HashingAlgorithm::Sha256,
            )
            .map_err(|e| classify(&tcti, "StartAuthSession", e))?
            .ok_or(TpmError::NoSession)?;
        let mut attrs = SessionAttributesBuilder::new().with_continue_session(keep);
        if salt.is_some() {
            attrs = attrs.with_decrypt(true).with_encrypt(true);
        }
        let (attributes, mask) = attrs.build();
        self.ctx
            .tr_sess_set_attributes(session, attributes, mask)
            .map_err(|source| TpmError::Stack {
                command: "TR_Sess_SetAttributes",
                source,
            })?;
        Ok(session)
    }

    /// Lets go of a session started with continueSession clear once its
    /// one command is done. The TPM ends such a session only when the
    /// command succeeds (TPM 2.0 Part 2, TPMA_SESSION): then ESYS and
    /// tss-esapi must forget it without a flush, or dropping the context
    /// would flush its handle number, which the next session (ours or
    /// another client's) reuses at once. A command the TPM refused leaves
    /// the session loaded: flush it. After a transport or ESYS error we
    /// cannot tell, and forgetting is the safer mistake (a slot until the
    /// TPM restarts, rather than another client's session).
    fn end_one_command_session(&mut self, session: AuthSession, failed: Option<&TssError>) {
        let mut h = ObjectHandle::from(tss_esapi::handles::SessionHandle::from(session));
        let refused = failed
            .and_then(raw_rc)
            .is_some_and(|rc| (rc >> 16) & 0xff == LAYER_TPM);
        if refused && self.flush(h).is_ok() {
            return;
        }
        // tss-esapi answers InvalidHandleState here (it expected a flush)
        // but forgets the handle all the same.
        let _ = self.ctx.tr_close(&mut h);
    }

    /// Creates the salt key (owner authorization through an unsalted HMAC
    /// session: the owner password never crosses the bus) and returns it
    /// with its Name.
    fn create_salt_key(
        &mut self,
        owner_auth: Option<&SecretBuf>,
    ) -> Result<(KeyHandle, Vec<u8>), TpmError> {
        let template = Self::salt_template().map_err(|source| TpmError::Stack {
            command: "CreatePrimary",
            source,
        })?;
        self.set_owner_auth(owner_auth)?;
        let once = self.start_session(
            None,
            tss_esapi::structures::SymmetricDefinition::Null,
            false,
        )?;
        let tcti = self.tcti.clone();
        let created = self.ctx.execute_with_session(Some(once), |ctx| {
            ctx.create_primary(Hierarchy::Owner, template, None, None, None, None)
        });
        self.end_one_command_session(once, created.as_ref().err());
        let key = created
            .map(|r| r.key_handle)
            .map_err(|e| classify(&tcti, "CreatePrimary", e));
        let key = key?;
        match self.ctx.tr_get_name(key.into()) {
            Ok(name) => Ok((key, name.value().to_vec())),
            Err(source) => {
                let _ = self.flush(key.into());
                Err(TpmError::Stack {
                    command: "TR_GetName",
                    source,
                })
            }
        }
    }

    /// The Name of this TPM's salt key, for `dkey install` to pin.
    pub fn salt_key_name(&mut self, owner_auth: Option<&SecretBuf>) -> Result<Vec<u8>, TpmError> {
        let (key, name) = self.create_salt_key(owner_auth)?;
        self.flush(key.into())?;
        Ok(name)
    }

    /// A salted HMAC session with command and response encryption, kept
    /// across commands: salted to the salt key (whose Name must match the
    /// pin, if any), which is flushed once the session stands.
    fn salted_session(&mut self, owner_auth: Option<&SecretBuf>) -> Result<AuthSession, TpmError> {
        let (key, name) = self.create_salt_key(owner_auth)?;
        if let Some(pin) = self.salt_pin.clone() {
            if pin != name {
                let _ = self.flush(key.into());
                return Err(TpmError::SaltKeyMismatch {
                    expected: hex::encode(pin),
                    found: hex::encode(&name),
                });
            }
        }
        let session = self.start_session(
            Some(key),
            tss_esapi::structures::SymmetricDefinition::AES_128_CFB,
            true,
        );
        let flushed = self.flush(key.into());
        let session = session?;
        flushed?;
        Ok(session)
    }

    fn flush_session(&mut self, session: AuthSession) {
        if let AuthSession::Password = session {
            return;
        }
        let h = tss_esapi::handles::SessionHandle::from(session);
        let _ = self.flush(ObjectHandle::from(h));
    }

    /// The template of the derivation primary. Frozen by derivation v1.
    fn primary_template() -> Result<Public, TssError> {
        let attributes = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_no_da(true)
            .with_sign_encrypt(true)
            .build()?;
        PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::KeyedHash)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attributes)
            .with_keyed_hash_parameters(PublicKeyedHashParameters::new(
                KeyedHashScheme::HMAC_SHA_256,
            ))
            .with_keyed_hash_unique_identifier(Digest::try_from(PRIMARY_UNIQUE.to_vec())?)
            .build()
    }

    fn create_primary(
        &mut self,
        owner_auth: Option<&SecretBuf>,
        session: AuthSession,
    ) -> Result<KeyHandle, TpmError> {
        let stack = |source| TpmError::Stack {
            command: "CreatePrimary",
            source,
        };
        let template = Self::primary_template().map_err(stack)?;
        // The primary's own authValue: random, never stored; ESYS keeps
        // its copy in the object's metadata for the HMAC's authorization.
        let mut secret = SecretBuf::new(PRIMARY_AUTH_LEN)?;
        getrandom::getrandom(secret.as_mut()).map_err(|_| TpmError::NoRandomness)?;
        let primary_auth = || Auth::try_from(secret.as_ref().to_vec()).map_err(stack);
        self.set_owner_auth(owner_auth)?;
        let tcti = self.tcti.clone();
        let in_sensitive = primary_auth()?;
        let key = self
            .ctx
            .execute_with_session(Some(session), |ctx| {
                ctx.create_primary(
                    Hierarchy::Owner,
                    template,
                    Some(in_sensitive),
                    None,
                    None,
                    None,
                )
            })
            .map(|r| r.key_handle)
            .map_err(|e| classify(&tcti, "CreatePrimary", e))?;
        if let Err(e) = self.ctx.tr_set_auth(key.into(), primary_auth()?) {
            let _ = self.flush(key.into());
            return Err(stack(e));
        }
        Ok(key)
    }

    fn hmac(&mut self, primary: &Primary, msg: &[u8; 32]) -> Result<SecretBuf, TpmError> {
        let mut out = SecretBuf::new(32)?;
        self.hmac_into(primary, msg, out.as_mut())?;
        Ok(out)
    }

    fn hmac_into(
        &mut self,
        primary: &Primary,
        msg: &[u8; 32],
        out: &mut [u8],
    ) -> Result<(), TpmError> {
        let tcti = self.tcti.clone();
        let buffer = MaxBuffer::try_from(msg.to_vec()).map_err(|source| TpmError::Stack {
            command: "HMAC",
            source,
        })?;
        let digest = self
            .ctx
            // The salted session: the input is encrypted on its way in, the
            // PRK on its way out; the primary's authValue only keys the
            // session's HMAC.
            .execute_with_session(Some(primary.session), |ctx| {
                ctx.hmac(primary.key.into(), buffer, HashingAlgorithm::Sha256)
            })
            .map_err(|e| classify(&tcti, "HMAC", e))?;
        if digest.len() != out.len() {
            return Err(TpmError::HmacLength { len: digest.len() });
        }
        out.copy_from_slice(digest.value());
        Ok(())
    }

    fn flush(&mut self, handle: ObjectHandle) -> Result<(), TpmError> {
        let tcti = self.tcti.clone();
        self.ctx
            .execute_without_session(|ctx| ctx.flush_context(handle))
            .map_err(|e| classify(&tcti, "FlushContext", e))
    }

    /// PRK = HMAC(primary, msg). Creates the session and the primary,
    /// HMACs, flushes both.
    pub fn prk(&mut self, owner_auth: Option<&SecretBuf>, msg: &[u8; 32]) -> Result<Prk, TpmError> {
        let primary = self.load_primary(owner_auth)?;
        let out = self.hmac(&primary, msg);
        let flushed = self.flush_primary(primary);
        let out = out?;
        flushed?;
        Prk::new(out).map_err(|_| TpmError::HmacLength { len: 0 })
    }

    /// Starts the salted session and creates the derivation primary in it,
    /// and keeps both (for the broker, which answers many requests with
    /// them). If the TPM's object or session memory is full of leftovers
    /// (a crashed client), flushes them once and tries again.
    pub fn load_primary(&mut self, owner_auth: Option<&SecretBuf>) -> Result<Primary, TpmError> {
        // swtpm's TCTI opens a connection per command and swtpm takes one
        // client at a time: under load a connect now and then fails with
        // an I/O error although the TPM is there. Setting up takes six
        // commands, so try again (briefly) before calling it unreachable.
        let mut pause = std::time::Duration::from_millis(20);
        for _ in 0..3 {
            match self.load_primary_once(owner_auth) {
                Err(TpmError::Unreachable { .. }) => {
                    std::thread::sleep(pause);
                    pause *= 3;
                }
                other => return other,
            }
        }
        self.load_primary_once(owner_auth)
    }

    fn load_primary_once(&mut self, owner_auth: Option<&SecretBuf>) -> Result<Primary, TpmError> {
        match self.try_load_primary(owner_auth) {
            Err(TpmError::ObjectMemory { .. } | TpmError::SessionMemory { .. }) => {
                self.flush_transients()?;
                self.try_load_primary(owner_auth)
            }
            other => other,
        }
    }

    fn try_load_primary(&mut self, owner_auth: Option<&SecretBuf>) -> Result<Primary, TpmError> {
        let session = self.salted_session(owner_auth)?;
        match self.create_primary(owner_auth, session) {
            Ok(key) => Ok(Primary { key, session }),
            Err(e) => {
                self.flush_session(session);
                Err(e)
            }
        }
    }

    /// PRK = HMAC(primary, msg) with a primary kept loaded.
    pub fn prk_with(&mut self, primary: &Primary, msg: &[u8; 32]) -> Result<Prk, TpmError> {
        let out = self.hmac(primary, msg)?;
        Prk::new(out).map_err(|_| TpmError::HmacLength { len: 0 })
    }

    /// PRK = HMAC(primary, msg) into a caller's 32-byte secret buffer, so
    /// that a long-running caller can reuse one buffer for every request.
    pub fn prk_into(
        &mut self,
        primary: &Primary,
        msg: &[u8; 32],
        out: &mut SecretBuf,
    ) -> Result<(), TpmError> {
        self.hmac_into(primary, msg, out.as_mut())
    }

    /// Flushes a primary kept loaded, and its session.
    pub fn flush_primary(&mut self, primary: Primary) -> Result<(), TpmError> {
        self.flush_session(primary.session);
        self.flush(primary.key.into())
    }

    /// The TPM's handles from `first` on (capability TPM_CAP_HANDLES).
    fn handles(&mut self, first: u32) -> Result<Vec<TpmHandle>, TpmError> {
        let tcti = self.tcti.clone();
        let (data, _) = self
            .ctx
            .execute_without_session(|ctx| ctx.get_capability(CapabilityType::Handles, first, 64))
            .map_err(|e| classify(&tcti, "GetCapability", e))?;
        let CapabilityData::Handles(list) = data else {
            return Ok(Vec::new());
        };
        Ok(list.into_inner())
    }

    fn transient_handles(&mut self) -> Result<Vec<TpmHandle>, TpmError> {
        Ok(self
            .handles(TRANSIENT_FIRST)?
            .into_iter()
            .filter(|h| matches!(h, TpmHandle::Transient(_)))
            .collect())
    }

    /// Loaded sessions (HMAC and policy).
    fn session_handles(&mut self) -> Result<Vec<TpmHandle>, TpmError> {
        Ok(self
            .handles(SESSION_FIRST)?
            .into_iter()
            .filter(|h| {
                matches!(
                    h,
                    TpmHandle::HmacSession(_)
                        | TpmHandle::LoadedSession(_)
                        | TpmHandle::PolicySession(_)
                )
            })
            .collect())
    }

    /// How many transient objects are loaded right now.
    pub fn transient_count(&mut self) -> Result<usize, TpmError> {
        Ok(self.transient_handles()?.len())
    }

    /// How many sessions are loaded right now.
    pub fn session_count(&mut self) -> Result<usize, TpmError> {
        Ok(self.session_handles()?.len())
    }

    /// Flushes every transient object and loaded session. Callers hold the
    /// TPM lock, so on a TPM without a resource manager these are leftovers
    /// of dead clients.
    pub fn flush_transients(&mut self) -> Result<usize, TpmError> {
        let handles: Vec<TpmHandle> = self
            .transient_handles()?
            .into_iter()
            .chain(self.session_handles()?)
            .collect();
        let tcti = self.tcti.clone();
        for h in &handles {
            let obj = self
                .ctx
                .execute_without_session(|ctx| ctx.tr_from_tpm_public(*h))
                .map_err(|e| classify(&tcti, "TR_FromTPMPublic", e))?;
            self.flush(obj)?;
        }
        Ok(handles.len())
    }

    /// TPM2_GetCapability(TPM_PROPERTIES) from `first`, `count` of them.
    fn properties(&mut self, first: PropertyTag, count: u32) -> Result<CapabilityData, TpmError> {
        let tcti = self.tcti.clone();
        self.ctx
            .execute_without_session(|ctx| {
                ctx.get_capability(CapabilityType::TpmProperties, first.into(), count)
            })
            .map(|(data, _)| data)
            .map_err(|e| classify(&tcti, "GetCapability", e))
    }

    /// Which hierarchy passwords are set (TPM_PT_PERMANENT: ownerAuthSet,
    /// lockoutAuthSet).
    pub fn auth_set(&mut self) -> Result<AuthSet, TpmError> {
        let data = self.properties(PropertyTag::Permanent, 1)?;
        let bits = match data {
            CapabilityData::TpmProperties(list) => list
                .find(PropertyTag::Permanent)
                .map(|p| p.value())
                .unwrap_or(0),
            _ => 0,
        };
        Ok(AuthSet {
            owner: bits & 1 != 0,
            endorsement: bits & 2 != 0,
            lockout: bits & 4 != 0,
            in_lockout: bits & (1 << 9) != 0,
        })
    }

    /// TPM2_HierarchyChangeAuth: sets `new` as the password of `which`,
    /// authorizing with `current` (empty when None).
    pub fn change_auth(
        &mut self,
        which: HierarchyAuth,
        current: Option<&SecretBuf>,
        new: &SecretBuf,
    ) -> Result<(), TpmError> {
        let (object, handle) = match which {
            HierarchyAuth::Owner => (ObjectHandle::Owner, AuthHandle::Owner),
            HierarchyAuth::Endorsement => (ObjectHandle::Endorsement, AuthHandle::Endorsement),
            HierarchyAuth::Lockout => (ObjectHandle::Lockout, AuthHandle::Lockout),
            HierarchyAuth::Platform => (ObjectHandle::Platform, AuthHandle::Platform),
        };
        let stack = |source| TpmError::Stack {
            command: "HierarchyChangeAuth",
            source,
        };
        let auth = |s: Option<&SecretBuf>| match s {
            Some(a) if a.len() > 64 => Err(TpmError::OwnerAuthTooLong),
            Some(a) => Auth::try_from(a.as_ref().to_vec()).map_err(stack),
            None => Ok(Auth::default()),
        };
        let current = auth(current)?;
        let new = auth(Some(new))?;
        self.ctx.tr_set_auth(object, current).map_err(stack)?;
        let tcti = self.tcti.clone();
        self.ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.hierarchy_change_auth(handle, new)
            })
            .map_err(|e| match classify(&tcti, "HierarchyChangeAuth", e) {
                TpmError::Command { rc, .. } if rc & 0xbf == 0x8e || rc & 0xbf == 0xa2 => {
                    TpmError::OwnerAuth {
                        command: "HierarchyChangeAuth",
                        rc,
                    }
                }
                other => other,
            })
    }

    /// Manufacturer and vendor strings, and whether this is a software TPM.
    pub fn info(&mut self) -> Result<TpmInfo, TpmError> {
        let data = self.properties(PropertyTag::Manufacturer, 6)?;
        let mut manufacturer = String::new();
        let mut vendor = String::new();
        if let CapabilityData::TpmProperties(list) = data {
            let text = |tag| {
                list.find(tag)
                    .map(|p| {
                        p.value()
                            .to_be_bytes()
                            .iter()
                            .filter(|b| b.is_ascii_graphic() || **b == b' ')
                            .map(|&b| b as char)
                            .collect::<String>()
                    })
                    .unwrap_or_default()
            };
            manufacturer = text(PropertyTag::Manufacturer).trim().to_owned();
            for tag in [
                PropertyTag::VendorString1,
                PropertyTag::VendorString2,
                PropertyTag::VendorString3,
                PropertyTag::VendorString4,
            ] {
                vendor.push_str(&text(tag));
            }
        }
        let vendor = vendor.split_whitespace().collect::<Vec<_>>().join(" ");
        let software = matches!(self.tcti.kind(), TctiKind::Swtpm | TctiKind::Mssim)
            || vendor.starts_with("SW");
        Ok(TpmInfo {
            manufacturer,
            vendor,
            software,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcti_syntax() {
        let d = Tcti::parse("device:/dev/tpmrm0").unwrap();
        assert_eq!(d.kind(), TctiKind::Device);
        assert_eq!(d.device_path(), Some("/dev/tpmrm0"));
        assert_eq!(
            Tcti::parse("device").unwrap().device_path(),
            Some("/dev/tpmrm0")
        );
        let s = Tcti::parse("swtpm:host=127.0.0.1,port=2321").unwrap();
        assert_eq!(s.kind(), TctiKind::Swtpm);
        assert_eq!(s.device_path(), None);
        assert_eq!(
            Tcti::parse("mssim:port=2321").unwrap().kind(),
            TctiKind::Mssim
        );
        for bad in [
            "",
            "tpm",
            "swtpmx:port=1",
            "file:/x",
            "\u{0}",
            "swtpm:port=notanumber",
        ] {
            assert!(Tcti::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn template_matches_the_specification() {
        use tss_esapi::traits::Marshall;
        // TPMT_PUBLIC as DERIVATION.md writes it, byte by byte, not from
        // our constants: type KEYEDHASH (0008), nameAlg SHA256 (000b),
        // objectAttributes 00040472, empty authPolicy, scheme HMAC (0005)
        // with SHA256, unique = the 32-byte label.
        let mut want = hex::decode("0008000b000404720000000500 0b0020".replace(' ', "")).unwrap();
        want.extend_from_slice(b"derived-keys/v1/tpm-hmac-primary");
        let got = Tpm::primary_template().unwrap().marshall().unwrap();
        assert_eq!(hex::encode(got), hex::encode(want));
    }

    #[test]
    fn salt_key_template_is_the_tcg_ecc_storage_key() {
        use tss_esapi::traits::Marshall;
        // Its Name is pinned by install, so its bytes must never change:
        // type ECC (0023), nameAlg SHA256, attributes fixedTPM|fixedParent|
        // sensitiveDataOrigin|userWithAuth|noDA|restricted|decrypt
        // (00030472), empty authPolicy, AES-128-CFB (0006 0080 0043),
        // scheme NULL (0010), curve NIST P-256 (0003), kdf NULL (0010),
        // unique x and y empty.
        let want = "0023000b000304720000000600800043001000030010 00000000".replace(' ', "");
        let got = Tpm::salt_template().unwrap().marshall().unwrap();
        assert_eq!(hex::encode(got), want);
    }

    #[test]
    fn missing_device_is_unreachable() {
        let t = Tcti::parse("device:/nonexistent/tpm").unwrap();
        assert!(matches!(Tpm::open(&t), Err(TpmError::Unreachable { .. })));
    }
}
