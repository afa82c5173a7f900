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

/// The derivation primary, loaded in the TPM until flushed.
#[derive(Debug)]
pub struct Primary(KeyHandle);

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
}

impl Tpm {
    /// Opens the TCTI. For socket TCTIs nothing is sent yet; an absent TPM
    /// shows up as `Unreachable` on the first command.
    pub fn open(tcti: &Tcti) -> Result<Tpm, TpmError> {
        let conf = TctiNameConf::from_str(tcti.as_str()).map_err(|_| TpmError::BadTcti {
            tcti: tcti.to_string(),
        })?;
        let ctx = Context::new(conf).map_err(|source| TpmError::Unreachable {
            tcti: tcti.to_string(),
            source,
        })?;
        Ok(Tpm {
            ctx,
            tcti: tcti.clone(),
        })
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

    fn create_primary(&mut self, owner_auth: Option<&SecretBuf>) -> Result<KeyHandle, TpmError> {
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
        let auth = match owner_auth {
            Some(a) if a.len() > 64 => return Err(TpmError::OwnerAuthTooLong),
            Some(a) => Auth::try_from(a.as_ref().to_vec()),
            None => Ok(Auth::default()),
        }
        .map_err(|source| TpmError::Stack {
            command: "CreatePrimary",
            source,
        })?;
        self.ctx
            .tr_set_auth(ObjectHandle::Owner, auth)
            .map_err(|source| TpmError::Stack {
                command: "CreatePrimary",
                source,
            })?;
        let tcti = self.tcti.clone();
        let in_sensitive = primary_auth()?;
        let key = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
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

    fn hmac(&mut self, key: KeyHandle, msg: &[u8; 32]) -> Result<SecretBuf, TpmError> {
        let mut out = SecretBuf::new(32)?;
        self.hmac_into(key, msg, out.as_mut())?;
        Ok(out)
    }

    fn hmac_into(
        &mut self,
        key: KeyHandle,
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
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.hmac(key.into(), buffer, HashingAlgorithm::Sha256)
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

    /// PRK = HMAC(primary, msg). Creates the primary, HMACs, flushes it.
    /// If the TPM's object memory is full of leftovers (a crashed client),
    /// flushes them once and tries again.
    pub fn prk(&mut self, owner_auth: Option<&SecretBuf>, msg: &[u8; 32]) -> Result<Prk, TpmError> {
        let primary = match self.create_primary(owner_auth) {
            Err(TpmError::ObjectMemory { .. }) => {
                self.flush_transients()?;
                self.create_primary(owner_auth)?
            }
            other => other?,
        };
        let out = self.hmac(primary, msg);
        let flushed = self.flush(primary.into());
        let out = out?;
        flushed?;
        Prk::new(out).map_err(|_| TpmError::HmacLength { len: 0 })
    }

    /// Creates the derivation primary and keeps it loaded (for the broker,
    /// which answers many requests with it). Recovers from object memory
    /// full of leftovers once, like `prk`.
    pub fn load_primary(&mut self, owner_auth: Option<&SecretBuf>) -> Result<Primary, TpmError> {
        match self.create_primary(owner_auth) {
            Err(TpmError::ObjectMemory { .. }) => {
                self.flush_transients()?;
                self.create_primary(owner_auth).map(Primary)
            }
            other => other.map(Primary),
        }
    }

    /// PRK = HMAC(primary, msg) with a primary kept loaded.
    pub fn prk_with(&mut self, primary: &Primary, msg: &[u8; 32]) -> Result<Prk, TpmError> {
        let out = self.hmac(primary.0, msg)?;
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
        self.hmac_into(primary.0, msg, out.as_mut())
    }

    /// Flushes a primary kept loaded.
    pub fn flush_primary(&mut self, primary: Primary) -> Result<(), TpmError> {
        self.flush(primary.0.into())
    }

    fn transient_handles(&mut self) -> Result<Vec<u32>, TpmError> {
        let tcti = self.tcti.clone();
        let (data, _) = self
            .ctx
            .execute_without_session(|ctx| {
                ctx.get_capability(CapabilityType::Handles, TRANSIENT_FIRST, 64)
            })
            .map_err(|e| classify(&tcti, "GetCapability", e))?;
        let CapabilityData::Handles(list) = data else {
            return Ok(Vec::new());
        };
        Ok(list
            .into_inner()
            .into_iter()
            .filter_map(|h| match h {
                TpmHandle::Transient(t) => Some(u32::from(t)),
                _ => None,
            })
            .collect())
    }

    /// How many transient objects are loaded right now.
    pub fn transient_count(&mut self) -> Result<usize, TpmError> {
        Ok(self.transient_handles()?.len())
    }

    /// Flushes every transient object. Callers hold the TPM lock, so on a
    /// TPM without a resource manager these are leftovers of dead clients.
    pub fn flush_transients(&mut self) -> Result<usize, TpmError> {
        let handles = self.transient_handles()?;
        let tcti = self.tcti.clone();
        for raw in &handles {
            let th = tss_esapi::handles::TransientTpmHandle::new(*raw).map_err(|source| {
                TpmError::Stack {
                    command: "FlushContext",
                    source,
                }
            })?;
            let obj = self
                .ctx
                .execute_without_session(|ctx| ctx.tr_from_tpm_public(TpmHandle::Transient(th)))
                .map_err(|e| classify(&tcti, "ReadPublic", e))?;
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
        let t = Tpm::primary_template().unwrap();
        let Public::KeyedHash {
            object_attributes,
            unique,
            ..
        } = &t
        else {
            panic!("not keyedhash");
        };
        assert_eq!(u32::from(*object_attributes), PRIMARY_ATTRIBUTES);
        assert_eq!(unique.value(), PRIMARY_UNIQUE);
    }

    #[test]
    fn missing_device_is_unreachable() {
        let t = Tcti::parse("device:/nonexistent/tpm").unwrap();
        assert!(matches!(Tpm::open(&t), Err(TpmError::Unreachable { .. })));
    }
}
