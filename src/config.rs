//! The TOML configuration, parsed into types once. Unknown keys and bad
//! values are errors that name the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::request::{Binding, Selector};
use crate::secret::{SecretAllocError, SecretBuf};
use crate::tpm::{Tcti, TpmError};

/// Where the configuration lives unless told otherwise.
pub const DEFAULT_PATH: &str = "/etc/derived-keys/derived-keys.conf";

/// The configuration boundary's errors.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "configuration {path} is writable by others than root (owner uid {uid}, mode {mode:o})"
    )]
    Insecure { path: PathBuf, uid: u32, mode: u32 },
    #[error("configuration {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("configuration {path}: {key}: {reason}")]
    Value {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
    #[error("owner authorization file {path}")]
    OwnerAuthRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("owner authorization file {path} must be owned by root and unreadable by others (owner uid {uid}, mode {mode:o})")]
    OwnerAuthInsecure { path: PathBuf, uid: u32, mode: u32 },
    #[error("owner authorization file {path} holds {len} bytes; at most 64 are allowed")]
    OwnerAuthTooLong { path: PathBuf, len: usize },
    #[error(transparent)]
    Memory(#[from] SecretAllocError),
}

impl ConfigError {
    /// ENODEV: without a valid configuration there is no TPM to use.
    pub fn errno(&self) -> i32 {
        libc::ENODEV
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    tpm: RawTpm,
    #[serde(default)]
    bindings: RawBindings,
    #[serde(default)]
    results: RawResults,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    pkcs11: RawPkcs11,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPkcs11 {
    #[serde(default)]
    keys: Vec<String>,
}

/// At most this many `[pkcs11] keys`: each lists two objects, and the
/// module holds at most 4096 object handles.
pub const MAX_PKCS11_KEYS: usize = 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTpm {
    #[serde(default = "default_tcti")]
    tcti: String,
    netns: Option<PathBuf>,
    salt_key_name: Option<String>,
    owner_auth_file: Option<PathBuf>,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_broker_idle_s")]
    broker_idle_s: u32,
    #[serde(default = "default_hot_key_s")]
    hot_key_s: u32,
}

impl Default for RawTpm {
    fn default() -> Self {
        RawTpm {
            tcti: default_tcti(),
            netns: None,
            salt_key_name: None,
            owner_auth_file: None,
            timeout_ms: default_timeout_ms(),
            broker_idle_s: default_broker_idle_s(),
            hot_key_s: default_hot_key_s(),
        }
    }
}

fn default_hot_key_s() -> u32 {
    60
}
fn default_broker_idle_s() -> u32 {
    30
}

fn default_tcti() -> String {
    "device:/dev/tpmrm0".into()
}
fn default_timeout_ms() -> u64 {
    5000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBindings {
    #[serde(default = "yes")]
    path: bool,
    #[serde(default = "yes")]
    csum: bool,
    #[serde(default = "yes")]
    user: bool,
    #[serde(default = "yes")]
    machine: bool,
    #[serde(default = "root_only")]
    machine_uids: Vec<u32>,
    #[serde(default)]
    machine_gids: Vec<u32>,
    #[serde(default = "default_csum_source")]
    csum_source: String,
    #[serde(default = "default_csum_max_mib")]
    csum_max_mib: u64,
}

impl Default for RawBindings {
    fn default() -> Self {
        RawBindings {
            path: true,
            csum: true,
            user: true,
            machine: true,
            machine_uids: root_only(),
            machine_gids: Vec::new(),
            csum_source: default_csum_source(),
            csum_max_mib: default_csum_max_mib(),
        }
    }
}

fn yes() -> bool {
    true
}
fn root_only() -> Vec<u32> {
    vec![0]
}
fn default_csum_source() -> String {
    "file".into()
}
fn default_csum_max_mib() -> u64 {
    1024
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResults {
    #[serde(default = "one")]
    negative_timeout_s: u32,
    #[serde(default = "thirty")]
    signature_timeout_s: u32,
}

impl Default for RawResults {
    fn default() -> Self {
        RawResults {
            negative_timeout_s: 1,
            signature_timeout_s: 30,
        }
    }
}

fn one() -> u32 {
    1
}
fn thirty() -> u32 {
    30
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    #[serde(default = "default_log_target")]
    target: String,
    #[serde(default = "default_log_socket")]
    socket: PathBuf,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            target: default_log_target(),
            socket: default_log_socket(),
        }
    }
}

fn default_log_target() -> String {
    "syslog".into()
}
fn default_log_socket() -> PathBuf {
    "/dev/log".into()
}

/// FNV-1a, 64 bits: names per-configuration runtime files. Not a security
/// function; collisions would only make two configurations share a broker
/// name, and the broker checks its configuration's fingerprint.
pub fn fnv1a<'a>(bytes: impl IntoIterator<Item = &'a u8>) -> u64 {
    let mut h = derived_keys_core::runtime::Fnv::default();
    for b in bytes {
        h.feed(std::slice::from_ref(b));
    }
    h.0
}

/// `[pkcs11] keys` parsed into selectors at load: a bad one is a
/// configuration error naming it, not a key the module silently skips.
fn pkcs11_keys(keys: &[String]) -> Result<Vec<Selector>, String> {
    if keys.len() > MAX_PKCS11_KEYS {
        return Err(format!(
            "at most {MAX_PKCS11_KEYS} selectors, not {}",
            keys.len()
        ));
    }
    let mut out: Vec<Selector> = Vec::with_capacity(keys.len());
    for k in keys {
        let sel = Selector::parse(k).map_err(|e| format!("selector {k:?}: {e}"))?;
        if !out.contains(&sel) {
            out.push(sel);
        }
    }
    Ok(out)
}

/// A setting that is still accepted but no longer does what its name says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deprecated {
    /// `bindings.csum_source = "ima"`: matched IMA entries by path name.
    CsumSourceIma,
}

impl std::fmt::Display for Deprecated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Deprecated::CsumSourceIma => f.write_str(
                "bindings.csum_source = \"ima\" is deprecated: csum hashes the file the \
                 requester runs, as \"file\" does (the same digest, so keys are unchanged); \
                 set \"file\"",
            ),
        }
    }
}

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    /// syslog (authpriv) on this socket; the kernel log if it is absent.
    Syslog { socket: PathBuf },
    /// Always the kernel log (/dev/kmsg).
    Kmsg,
    /// Standard error (for running by hand).
    Stderr,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub tcti: Tcti,
    /// The network namespace the TCTI is reached in (the embedded software
    /// TPM listens only there), or None for the host's.
    pub tpm_netns: Option<PathBuf>,
    /// The Name of the TPM's salt key, pinned by `dkey install`: a TPM
    /// presenting another is refused (EIO). None: salted, not pinned.
    pub salt_key_name: Option<Vec<u8>>,
    pub owner_auth_file: Option<PathBuf>,
    pub tpm_timeout: Duration,
    /// How long the TPM broker stays without requests before it exits.
    pub broker_idle: Duration,
    /// How long the broker serves a key again without the TPM (its PRK in
    /// secret memory); zero: every request asks the TPM.
    pub hot_key: Duration,
    /// Identifies this configuration (path and content): one broker each.
    pub fingerprint: u64,
    enabled: [bool; 4],
    pub machine_uids: Vec<u32>,
    pub machine_gids: Vec<u32>,
    /// Settings that still work but should be changed, each with why
    /// (`dkey status` shows them).
    pub deprecated: Vec<Deprecated>,
    /// Executables larger than this are refused for `csum` (EACCES).
    pub csum_max_bytes: u64,
    pub negative_timeout_s: u32,
    pub signature_timeout_s: u32,
    pub log: LogTarget,
    /// `[pkcs11] keys`: the selectors the PKCS#11 module lists in a search
    /// without a label, in order, each once (by canonical form).
    pub pkcs11_keys: Vec<Selector>,
}

impl Config {
    /// Reads and validates the file. It must not be writable by non-root
    /// users: it decides which TPM and which policy the handler uses.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        use std::os::unix::fs::MetadataExt;
        let read = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
            return Err(ConfigError::Insecure {
                path: path.to_owned(),
                uid: meta.uid(),
                mode: meta.mode() & 0o7777,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Config::parse(&text, path)
    }

    /// Parses configuration text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let value = |key, reason: String| ConfigError::Value {
            path: path.to_owned(),
            key,
            reason,
        };
        let tcti =
            Tcti::parse(&raw.tpm.tcti).map_err(|e: TpmError| value("tpm.tcti", e.to_string()))?;
        if !(100..=120_000).contains(&raw.tpm.timeout_ms) {
            return Err(value("tpm.timeout_ms", "must be 100 to 120000".into()));
        }
        if raw.tpm.hot_key_s > 3600 {
            return Err(value("tpm.hot_key_s", "must be 0 (off) to 3600".into()));
        }
        if !(1..=3600).contains(&raw.tpm.broker_idle_s) {
            return Err(value("tpm.broker_idle_s", "must be 1 to 3600".into()));
        }
        // `csum` always hashes the file the requester runs. "ima" once
        // looked the digest up in IMA's measurement list by path name, which
        // a private mount namespace or a file named `p (deleted)` spoofs; it
        // stays accepted so that existing configurations keep working, and
        // keeps their keys: IMA's sha256 is the file's SHA-256.
        let mut deprecated = Vec::new();
        match raw.bindings.csum_source.as_str() {
            "file" => {}
            "ima" => deprecated.push(Deprecated::CsumSourceIma),
            other => {
                return Err(value(
                    "bindings.csum_source",
                    format!("{other:?} is not \"file\" (\"ima\" is a deprecated alias of it)"),
                ))
            }
        }
        if !(1..=3600).contains(&raw.results.negative_timeout_s) {
            return Err(value(
                "results.negative_timeout_s",
                "must be 1 to 3600".into(),
            ));
        }
        if !(1..=86_400).contains(&raw.results.signature_timeout_s) {
            return Err(value(
                "results.signature_timeout_s",
                "must be 1 to 86400".into(),
            ));
        }
        let log = match raw.log.target.as_str() {
            "syslog" => LogTarget::Syslog {
                socket: raw.log.socket,
            },
            "kmsg" => LogTarget::Kmsg,
            "stderr" => LogTarget::Stderr,
            other => {
                return Err(value(
                    "log.target",
                    format!("{other:?} is not syslog, kmsg or stderr"),
                ))
            }
        };
        let salt_key_name = match &raw.tpm.salt_key_name {
            None => None,
            Some(h) => Some(
                hex::decode(h)
                    .ok()
                    .filter(|n| n.len() == 34 && n[..2] == [0x00, 0x0b])
                    .ok_or_else(|| {
                        value(
                            "tpm.salt_key_name",
                            "must be the hex of a SHA-256 Name (000b followed by 64 hex digits)"
                                .into(),
                        )
                    })?,
            ),
        };
        if raw.tpm.netns.as_deref().is_some_and(|p| !p.is_absolute()) {
            return Err(value("tpm.netns", "must be an absolute path".into()));
        }
        if !(1..=1 << 20).contains(&raw.bindings.csum_max_mib) {
            return Err(value(
                "bindings.csum_max_mib",
                "must be 1 to 1048576".into(),
            ));
        }
        if let Some(p) = &raw.tpm.owner_auth_file {
            if !p.is_absolute() {
                return Err(value(
                    "tpm.owner_auth_file",
                    "must be an absolute path".into(),
                ));
            }
        }
        let pkcs11_keys =
            pkcs11_keys(&raw.pkcs11.keys).map_err(|reason| value("pkcs11.keys", reason))?;
        let b = &raw.bindings;
        Ok(Config {
            path: path.to_owned(),
            tcti,
            tpm_netns: raw.tpm.netns,
            salt_key_name,
            owner_auth_file: raw.tpm.owner_auth_file,
            tpm_timeout: Duration::from_millis(raw.tpm.timeout_ms),
            broker_idle: Duration::from_secs(raw.tpm.broker_idle_s.into()),
            hot_key: Duration::from_secs(raw.tpm.hot_key_s.into()),
            fingerprint: fnv1a(
                path.as_os_str()
                    .as_encoded_bytes()
                    .iter()
                    .chain(text.as_bytes()),
            ),
            enabled: [b.path, b.csum, b.user, b.machine],
            machine_uids: raw.bindings.machine_uids,
            machine_gids: raw.bindings.machine_gids,
            deprecated,
            csum_max_bytes: raw.bindings.csum_max_mib << 20,
            negative_timeout_s: raw.results.negative_timeout_s,
            signature_timeout_s: raw.results.signature_timeout_s,
            log,
            pkcs11_keys,
        })
    }

    /// Whether the configuration enables this binding.
    pub fn enabled(&self, binding: Binding) -> bool {
        let i = match binding {
            Binding::Path => 0,
            Binding::Csum => 1,
            Binding::User => 2,
            Binding::Machine => 3,
        };
        self.enabled[i]
    }

    /// Reads the owner-hierarchy password, if one is configured. The file
    /// must be root's and unreadable by anyone else; one trailing newline
    /// is ignored, as tpm2-tools' `file:` passwords are usually written.
    pub fn owner_auth(&self) -> Result<Option<SecretBuf>, ConfigError> {
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        let Some(path) = &self.owner_auth_file else {
            return Ok(None);
        };
        let err = |source| ConfigError::OwnerAuthRead {
            path: path.clone(),
            source,
        };
        let mut f = std::fs::File::open(path).map_err(err)?;
        let meta = f.metadata().map_err(err)?;
        if meta.uid() != 0 || meta.mode() & 0o077 != 0 {
            return Err(ConfigError::OwnerAuthInsecure {
                path: path.clone(),
                uid: meta.uid(),
                mode: meta.mode() & 0o7777,
            });
        }
        let mut buf = SecretBuf::new(66)?;
        let mut len = 0;
        loop {
            let n = f.read(&mut buf.as_mut()[len..]).map_err(err)?;
            if n == 0 {
                break;
            }
            len += n;
            if len == 66 {
                return Err(ConfigError::OwnerAuthTooLong {
                    path: path.clone(),
                    len,
                });
            }
        }
        if buf.as_ref()[..len].ends_with(b"\n") {
            len -= 1;
        }
        if len > 64 {
            return Err(ConfigError::OwnerAuthTooLong {
                path: path.clone(),
                len,
            });
        }
        Ok(Some(SecretBuf::copy_from(&buf.as_ref()[..len])?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("/test.conf"))
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.tcti.as_str(), "device:/dev/tpmrm0");
        assert_eq!(c.tpm_timeout, Duration::from_secs(5));
        assert!(Binding::ALL.iter().all(|b| c.enabled(*b)));
        assert_eq!(c.machine_uids, vec![0]);
        assert!(c.machine_gids.is_empty());
        assert!(c.deprecated.is_empty());
        assert_eq!((c.negative_timeout_s, c.signature_timeout_s), (1, 30));
        assert_eq!(
            c.log,
            LogTarget::Syslog {
                socket: "/dev/log".into()
            }
        );
    }

    #[test]
    fn shipped_default_configuration_parses() {
        let text = include_str!("../conf/derived-keys.conf");
        let c = parse(text).unwrap();
        assert_eq!(c.tcti.as_str(), "device:/dev/tpmrm0");
        assert_eq!(c.machine_uids, vec![0]);
        assert!(c.pkcs11_keys.is_empty());
        // The commented example is valid.
        let example = text
            .lines()
            .find_map(|l| l.strip_prefix("# keys = "))
            .unwrap();
        let c = parse(&format!("[pkcs11]\nkeys = {example}\n")).unwrap();
        assert_eq!(c.pkcs11_keys.len(), 2);
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = parse("[tpm]\ntcit = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("tcit"), "{e}");
        let e = parse("[tmp]\n").unwrap_err().to_string();
        assert!(e.contains("tmp"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        for (text, key) in [
            ("[tpm]\ntcti = \"floppy\"\n", "tpm.tcti"),
            ("[tpm]\ntimeout_ms = 0\n", "tpm.timeout_ms"),
            ("[tpm]\nbroker_idle_s = 0\n", "tpm.broker_idle_s"),
            (
                "[tpm]\nowner_auth_file = \"rel/path\"\n",
                "tpm.owner_auth_file",
            ),
            (
                "[bindings]\ncsum_source = \"md5\"\n",
                "bindings.csum_source",
            ),
            (
                "[results]\nnegative_timeout_s = 0\n",
                "results.negative_timeout_s",
            ),
            (
                "[results]\nsignature_timeout_s = 0\n",
                "results.signature_timeout_s",
            ),
            ("[log]\ntarget = \"file\"\n", "log.target"),
            ("[pkcs11]\nkeys = [\"machine:a/b\"]\n", "pkcs11.keys"),
            ("[pkcs11]\nkeys = [\"user:x,alg=rsa\"]\n", "pkcs11.keys"),
            ("[pkcs11]\nkeys = [\"\"]\n", "pkcs11.keys"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
        let e = parse("[bindings]\npath = \"yes\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("path"), "{e}");
        let e = parse("[bindings]\nmachine_uids = [-1]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("machine_uids"), "{e}");
    }

    /// "ima" is accepted, so configurations that name it keep working and
    /// keep their keys, but it means what "file" means and says so.
    #[test]
    fn csum_source_ima_is_a_deprecated_alias_of_file() {
        let ima = parse("[bindings]\ncsum_source = \"ima\"\n").unwrap();
        assert_eq!(ima.deprecated, vec![Deprecated::CsumSourceIma]);
        assert!(ima.deprecated[0].to_string().contains("deprecated"));
        let file = parse("[bindings]\ncsum_source = \"file\"\n").unwrap();
        assert!(file.deprecated.is_empty());
        let e = parse("[bindings]\ncsum_source = \"IMA\"\n").unwrap_err();
        assert!(e.to_string().contains("bindings.csum_source"), "{e}");
    }

    #[test]
    fn pkcs11_keys_are_selectors() {
        assert!(parse("").unwrap().pkcs11_keys.is_empty());
        let c = parse(
            "[pkcs11]\nkeys = [\"machine:web\", \"git,alg=ed25519\", \"user:git,alg=ed25519\", \"path:db,epoch=2\"]\n",
        )
        .unwrap();
        let names: Vec<String> = c.pkcs11_keys.iter().map(|s| s.to_string()).collect();
        // Canonical, in order, a duplicate (another spelling) listed once.
        assert_eq!(
            names,
            ["machine:web", "user:git,alg=ed25519", "path:db,epoch=2"]
        );
        // The bad selector is named, with why.
        let e = parse("[pkcs11]\nkeys = [\"machine:web\", \"machine:web,epoch=x\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pkcs11.keys") && e.contains("machine:web,epoch=x"),
            "{e}"
        );
        let e = parse("[pkcs11]\nkeys = \"machine:web\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("keys"), "{e}");
        let e = parse("[pkcs11]\nkey = []\n").unwrap_err().to_string();
        assert!(e.contains("key"), "{e}");
        let many = vec!["\"a\""; MAX_PKCS11_KEYS + 1].join(",");
        let e = parse(&format!("[pkcs11]\nkeys = [{many}]\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("pkcs11.keys"), "{e}");
    }

    #[test]
    fn bindings_can_be_disabled() {
        let c = parse("[bindings]\npath = false\nmachine_uids = [0, 1000]\nmachine_gids = [10]\n")
            .unwrap();
        assert!(!c.enabled(Binding::Path));
        assert!(c.enabled(Binding::Csum));
        assert_eq!(c.machine_uids, vec![0, 1000]);
        assert_eq!(c.machine_gids, vec![10]);
    }

    #[test]
    fn fingerprint_matches_the_library() {
        let mut f = derived_keys_core::runtime::Fnv::default();
        f.feed(b"/etc/x.conf");
        f.feed(b"[tpm]\n");
        assert_eq!(f.0, fnv1a(b"/etc/x.conf[tpm]\n"));
        let name = derived_keys_core::runtime::runtime_path(0xab, "sock");
        let name = std::str::from_utf8(name.as_bytes()).unwrap();
        assert!(name.starts_with("/run/derived-keys/broker-00000000000000ab-"));
        assert!(name.ends_with(&format!("-w{}.sock", crate::wire::VERSION)));
        assert!(name.contains(env!("CARGO_PKG_VERSION")));
    }
}
