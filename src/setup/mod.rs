//! `dkey install`, `uninstall` and `status`: putting the handler, the rule
//! and the configuration in place, and the embedded software TPM for hosts
//! without a TPM device.
//!
//! The embedded swtpm listens on 127.0.0.1 inside a network namespace of
//! its own (see [`crate::tpm::netns`]: tss-esapi 7 cannot reach swtpm's unix
//! socket), so no other local user can connect to it, for commands or
//! control. Install also locks it down: random owner, endorsement and
//! lockout passwords in root-only files, and after every start a random,
//! discarded platform password, so that not even a root process without
//! the files can derive keys, clear the TPM or change its passwords. See
//! THREAT-MODEL.md.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{Config, DEFAULT_PATH};
use crate::secret::{self, SecretBuf};
use crate::tpm::{Tcti, TpmError};

pub mod embedded;
pub mod status;

pub use embedded::{
    exec_embedded_swtpm, lockdown, lockdown_embedded, start_embedded_swtpm, stop_embedded_swtpm,
    SWTPM_PORT, SWTPM_TCTI,
};
use embedded::{run, swtpm_process};
pub use status::{status, tpm_access, Status};

/// The rule file shipped in request-key/.
pub const RULE: &str = include_str!("../../request-key/derived-keys.conf");
/// The default configuration shipped in conf/.
pub const DEFAULT_CONFIG: &str = include_str!("../../conf/derived-keys.conf");
/// The defaults earlier releases shipped: a configuration install wrote
/// from one of them and nobody edited is replaced on upgrade, not kept.
const PREVIOUS_DEFAULTS: &[&str] = &[include_str!("../../conf/previous/0.1-derived-keys.conf")];

/// Where everything goes. Fixed paths; `root` lets tests install into a
/// scratch tree (the kernel only reads the real one).
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Default for Layout {
    fn default() -> Self {
        Layout { root: "/".into() }
    }
}

impl Layout {
    fn at(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }
    pub fn handler(&self) -> PathBuf {
        self.at("/usr/local/libexec/derived-key-helper")
    }
    /// The TPM broker, beside the handler (which starts it from there).
    pub fn broker(&self) -> PathBuf {
        self.at("/usr/local/libexec/derived-keys-broker")
    }
    pub fn dkey(&self) -> PathBuf {
        self.at("/usr/local/bin/dkey")
    }
    pub fn rule(&self) -> PathBuf {
        self.at("/etc/request-key.d/derived-keys.conf")
    }
    pub fn config(&self) -> PathBuf {
        self.at(DEFAULT_PATH)
    }
    pub fn owner_auth(&self) -> PathBuf {
        self.at("/etc/derived-keys/owner-auth")
    }
    pub fn lockout_auth(&self) -> PathBuf {
        self.at("/etc/derived-keys/lockout-auth")
    }
    pub fn endorsement_auth(&self) -> PathBuf {
        self.at("/etc/derived-keys/endorsement-auth")
    }
    /// Runtime files: root only (0700), on tmpfs.
    pub fn run_dir(&self) -> PathBuf {
        self.at(derived_keys_core::runtime::RUN_DIR)
    }
    /// The embedded software TPM's private network namespace (a bind mount).
    pub fn tpm_netns(&self) -> PathBuf {
        self.at("/run/derived-keys/tpm.netns")
    }
    pub fn swtpm_state(&self) -> PathBuf {
        self.at("/var/lib/derived-keys/swtpm")
    }
    pub fn swtpm_pid(&self) -> PathBuf {
        self.at("/run/derived-keys/swtpm.pid")
    }
    pub fn swtpm_unit(&self) -> PathBuf {
        self.at("/etc/systemd/system/derived-keys-swtpm.service")
    }
    /// The PKCS#11 module (CONTRACT.md, "PKCS#11 (v2)").
    pub fn pkcs11_module(&self) -> PathBuf {
        self.at("/usr/local/lib/derived-keys/derived-keys-pkcs11.so")
    }
    /// The p11-kit module file that makes p11-kit's consumers load it.
    pub fn p11kit_module(&self) -> PathBuf {
        self.at("/etc/pkcs11/modules/derived-keys.module")
    }
}

/// The PKCS#11 module's file name as cargo builds it (crate pkcs11/).
const PKCS11_BUILT: &str = "libderived_keys_pkcs11.so";

/// Where a build tree's PKCS#11 module is: beside dkey, or in the
/// pkcs11 crate's own target directory of the same profile.
fn built_pkcs11_module(build_dir: &Path) -> Option<PathBuf> {
    let profile = build_dir.file_name()?;
    let repo = build_dir.parent()?.parent()?;
    [
        build_dir.join(PKCS11_BUILT),
        repo.join("pkcs11/target").join(profile).join(PKCS11_BUILT),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// Setup's errors; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{what} needs root; run it with sudo")]
    NotRoot { what: &'static str },
    #[error("{path}: {action} failed")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the handler binary {path} is missing; build it first (cargo build --release) and run dkey from the same build")]
    NoHandlerBuild { path: PathBuf },
    #[error("TCTI: {0}")]
    Tcti(#[source] TpmError),
    #[error("cannot start the software TPM: {reason}")]
    Swtpm { reason: String },
    #[error("software TPM lockdown: {0}")]
    Lockdown(#[source] TpmError),
    #[error(transparent)]
    Netns(#[from] crate::tpm::netns::NetnsError),
    #[error("the TPM's owner hierarchy has a password but {path} is missing; put the password there (root-owned, mode 0600) and run install again")]
    LostOwnerAuth { path: PathBuf },
    #[error(transparent)]
    Memory(#[from] secret::SecretAllocError),
}

pub(crate) fn io<'a>(
    path: &'a Path,
    action: &'static str,
) -> impl FnOnce(std::io::Error) -> SetupError + 'a {
    move |source| SetupError::Io {
        path: path.to_owned(),
        action,
        source,
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Writes `bytes` to `path` atomically (temporary file, then rename).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SetupError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(io(dir, "create directory"))?;
    let tmp = dir.join(format!(
        ".{}.dkey-tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp, "create"))?;
    f.write_all(bytes).map_err(io(&tmp, "write"))?;
    f.sync_all().map_err(io(&tmp, "sync"))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(io(&tmp, "chmod"))?;
    std::fs::rename(&tmp, path).map_err(io(path, "rename into place"))
}

/// What happened to one installed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Created,
    Updated,
    Unchanged,
    /// An edited file was left alone; the proposed one is beside it.
    KeptEdited {
        proposed: PathBuf,
    },
    Removed,
    Absent,
    /// Left in place on purpose (state or secrets); `--purge` removes it.
    Kept,
}

/// One line of an install or uninstall report.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub what: String,
    pub path: PathBuf,
    pub change: Change,
}

/// Installs `bytes` at `path` unless identical.
pub(crate) fn install_file(path: &Path, bytes: &[u8], mode: u32) -> Result<Change, SetupError> {
    match std::fs::read(path) {
        Ok(old) if old == bytes => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(io(path, "chmod"))?;
            Ok(Change::Unchanged)
        }
        Ok(_) => write_atomic(path, bytes, mode).map(|()| Change::Updated),
        Err(_) => write_atomic(path, bytes, mode).map(|()| Change::Created),
    }
}

/// The configuration install writes: the shipped one with this TCTI and,
/// for the embedded software TPM, its namespace and owner password file.
pub fn config_text(tcti: &Tcti, netns: Option<&Path>, owner_auth: Option<&Path>) -> String {
    render(DEFAULT_CONFIG, tcti, netns, owner_auth)
}

/// A shipped default with install's values filled in.
fn render(default: &str, tcti: &Tcti, netns: Option<&Path>, owner_auth: Option<&Path>) -> String {
    let mut out = String::new();
    for line in default.lines() {
        if line.starts_with("tcti = ") {
            out.push_str(&format!("tcti = \"{}\"\n", tcti.as_str()));
        } else if let (Some(p), true) = (netns, line.starts_with("# netns = ")) {
            out.push_str(&format!("netns = \"{}\"\n", p.display()));
        } else if line.starts_with("# owner_auth_file = ") {
            match owner_auth {
                Some(p) => out.push_str(&format!("owner_auth_file = \"{}\"\n", p.display())),
                None => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// What earlier releases' install would have written for this TCTI (they
/// had no namespace for the embedded TPM).
fn previous_texts(tcti: &Tcti, owner_auth: Option<&Path>) -> Vec<String> {
    PREVIOUS_DEFAULTS
        .iter()
        .map(|d| render(d, tcti, None, owner_auth))
        .collect()
}

/// Installs the configuration; an edited one is never overwritten unless
/// `force` (then it is saved as `.bak` first). One an earlier release
/// wrote for the embedded TPM on the host's network gets the line that
/// moves it into its namespace (`netns`), edited or not, the old one kept
/// as `.bak`: without it, the TPM could no longer be reached.
fn install_config(
    path: &Path,
    text: &str,
    force: bool,
    netns: Option<&Path>,
) -> Result<Change, SetupError> {
    install_config_after(path, text, force, netns, &[])
}

/// `install_config`, where `unedited` are the texts earlier releases
/// would have written here: one of them is replaced like an unedited file.
fn install_config_after(
    path: &Path,
    text: &str,
    force: bool,
    netns: Option<&Path>,
    unedited: &[String],
) -> Result<Change, SetupError> {
    let old = match std::fs::read_to_string(path) {
        Err(_) => {
            write_atomic(path, text.as_bytes(), 0o644)?;
            return Ok(Change::Created);
        }
        Ok(old) => old,
    };
    if old == text {
        return Ok(Change::Unchanged);
    }
    if unedited.contains(&old) {
        write_atomic(path, text.as_bytes(), 0o644)?;
        return Ok(Change::Updated);
    }
    if let Some(migrated) = netns.and_then(|n| migrate_config(&old, n)) {
        write_atomic(&path.with_extension("conf.bak"), old.as_bytes(), 0o644)?;
        write_atomic(path, migrated.as_bytes(), 0o644)?;
        return install_config(path, text, force, None).map(|c| match c {
            Change::Unchanged => Change::Updated,
            other => other,
        });
    }
    if force {
        let bak = path.with_extension("conf.bak");
        write_atomic(&bak, old.as_bytes(), 0o644)?;
        write_atomic(path, text.as_bytes(), 0o644)?;
        return Ok(Change::Updated);
    }
    let proposed = path.with_extension("conf.new");
    write_atomic(&proposed, text.as_bytes(), 0o644)?;
    Ok(Change::KeptEdited { proposed })
}

/// Options of `dkey install`.
#[derive(Debug, Clone, Default)]
pub struct InstallOptions {
    /// Use this TCTI; default: /dev/tpmrm0 if present, else the embedded swtpm.
    pub tcti: Option<String>,
    /// Replace an edited configuration (keeping a .bak).
    pub force: bool,
    /// Directory holding the build's `derived-key-helper` (and `dkey`).
    pub build_dir: PathBuf,
}

/// An embedded configuration an earlier release wrote (the swtpm on the
/// host's loopback) with the one line that moves it into the namespace;
/// None when `text` needs no change. Everything else stays as the
/// operator left it.
pub fn migrate_config(text: &str, netns: &Path) -> Option<String> {
    let config = Config::parse(text, Path::new("/migrate")).ok()?;
    if config.tcti.as_str() != SWTPM_TCTI || config.tpm_netns.is_some() {
        return None;
    }
    insert_after_tcti(text, &format!("netns = \"{}\"", netns.display()))
}

/// `text` with `line` added right after its `tcti` line (in `[tpm]`), the
/// rest as the operator left it; None if it has no such line.
fn insert_after_tcti(text: &str, line: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len() + line.len() + 2);
    let mut done = false;
    for l in text.split_inclusive('\n') {
        out.push_str(l);
        if !done && l.trim_start().starts_with("tcti") {
            if !l.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(line);
            out.push('\n');
            done = true;
        }
    }
    done.then_some(out)
}

/// The p11-kit module file for the module at `module`: what makes p11-kit
/// (and through it GnuTLS, p11tool, browsers) load the token.
pub fn p11kit_module_text(module: &Path) -> String {
    format!(
        "# derived-keys: a stateless PKCS#11 token (installed by dkey install)\nmodule: {}\n",
        module.display()
    )
}

/// `dkey install`.
pub fn install(layout: &Layout, opts: &InstallOptions) -> Result<Vec<Step>, SetupError> {
    if !is_root() {
        return Err(SetupError::NotRoot {
            what: "dkey install",
        });
    }
    let mut steps = Vec::new();
    let helper_src = opts.build_dir.join("derived-key-helper");
    let helper =
        std::fs::read(&helper_src).map_err(|_| SetupError::NoHandlerBuild { path: helper_src })?;
    steps.push(Step {
        what: "request-key handler".into(),
        path: layout.handler(),
        change: install_file(&layout.handler(), &helper, 0o755)?,
    });
    let broker_src = opts.build_dir.join(crate::broker::BROKER_EXE);
    let broker =
        std::fs::read(&broker_src).map_err(|_| SetupError::NoHandlerBuild { path: broker_src })?;
    steps.push(Step {
        what: "TPM broker".into(),
        path: layout.broker(),
        change: install_file(&layout.broker(), &broker, 0o755)?,
    });
    let dkey_src = opts.build_dir.join("dkey");
    if dkey_src != layout.dkey() {
        if let Ok(bytes) = std::fs::read(&dkey_src) {
            steps.push(Step {
                what: "dkey command".into(),
                path: layout.dkey(),
                change: install_file(&layout.dkey(), &bytes, 0o755)?,
            });
        }
    }
    steps.push(Step {
        what: "request-key rule".into(),
        path: layout.rule(),
        change: install_file(&layout.rule(), RULE.as_bytes(), 0o644)?,
    });
    match built_pkcs11_module(&opts.build_dir) {
        Some(built) => {
            let bytes = std::fs::read(&built).map_err(io(&built, "read"))?;
            steps.push(Step {
                what: "PKCS#11 module".into(),
                path: layout.pkcs11_module(),
                change: install_file(&layout.pkcs11_module(), &bytes, 0o755)?,
            });
            let p11kit = p11kit_module_text(
                &Path::new("/").join(
                    layout
                        .pkcs11_module()
                        .strip_prefix(&layout.root)
                        .unwrap_or(&layout.pkcs11_module()),
                ),
            );
            steps.push(Step {
                what: "p11-kit module file".into(),
                path: layout.p11kit_module(),
                change: install_file(&layout.p11kit_module(), p11kit.as_bytes(), 0o644)?,
            });
        }
        None => steps.push(Step {
            what: "PKCS#11 module not built (cargo build --release --manifest-path pkcs11/Cargo.toml), skipped".into(),
            path: layout.pkcs11_module(),
            change: Change::Absent,
        }),
    }

    let embedded = opts.tcti.is_none() && !layout.at("/dev/tpmrm0").exists();
    let tcti_text = match (&opts.tcti, embedded) {
        (Some(t), _) => t.clone(),
        (None, true) => SWTPM_TCTI.to_owned(),
        (None, false) => "device:/dev/tpmrm0".to_owned(),
    };
    let tcti = Tcti::parse(&tcti_text).map_err(SetupError::Tcti)?;
    // A broker of the current configuration holds a primary on the TPM
    // that may be about to move.
    if let Ok(old) = Config::load(&layout.config()) {
        crate::broker::stop(&old);
    }
    let netns = embedded.then(|| layout.tpm_netns());
    if let Some(netns) = &netns {
        steps.push(start_embedded_swtpm(layout)?);
        lockdown(layout, &tcti, Some(netns))?;
    }
    let owner_auth = embedded.then(|| layout.owner_auth());
    let text = config_text(&tcti, netns.as_deref(), owner_auth.as_deref());
    // The salt key's Name, to pin: with it, the configuration names this
    // very TPM, and an interposer presenting another key is refused.
    let salt_name = read_salt_key_name(&tcti, netns.as_deref(), owner_auth.as_deref());
    let text = match &salt_name {
        Ok(name) => pin_salt_key(&text, name).unwrap_or(text),
        Err(_) => text,
    };
    steps.push(Step {
        what: "configuration".into(),
        path: layout.config(),
        change: install_config_after(
            &layout.config(),
            &text,
            opts.force,
            netns.as_deref(),
            &previous_texts(&tcti, owner_auth.as_deref()),
        )?,
    });
    steps.push(Step {
        what: match &salt_name {
            Ok(name) => format!("TPM salt key pinned (Name {name})"),
            Err(e) => format!(
                "TPM salt key NOT pinned ({e}); run dkey install again once the TPM answers"
            ),
        },
        path: layout.config(),
        change: match &salt_name {
            Ok(name) => ensure_pinned(&layout.config(), name)?,
            Err(_) => Change::Absent,
        },
    });
    Ok(steps)
}

/// The Name of the salt key of the TPM `tcti` names, in hex.
fn read_salt_key_name(
    tcti: &Tcti,
    netns: Option<&Path>,
    owner_auth_file: Option<&Path>,
) -> Result<String, SetupError> {
    let auth = match owner_auth_file {
        Some(p) => {
            let bytes = std::fs::read(p).map_err(io(p, "read"))?;
            let bytes = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
            Some(SecretBuf::copy_from(bytes)?)
        }
        None => None,
    };
    crate::tpm::netns::run_in(netns, || {
        let mut tpm = crate::tpm::Tpm::open(tcti).map_err(SetupError::Tcti)?;
        tpm.salt_key_name(auth.as_ref())
            .map(hex::encode)
            .map_err(SetupError::Tcti)
    })?
}

/// `text` with `salt_key_name` set to `name` where the shipped default
/// has it commented out; None if `text` has no such line.
fn pin_salt_key(text: &str, name: &str) -> Option<String> {
    let mut done = false;
    let out: String = text
        .split_inclusive('\n')
        .map(|line| {
            if !done && line.starts_with("# salt_key_name = ") {
                done = true;
                format!("salt_key_name = \"{name}\"\n")
            } else {
                line.to_owned()
            }
        })
        .collect();
    done.then_some(out)
}

/// Makes the installed configuration pin `name` if it pins nothing yet (an
/// edited or older file): one line after `tcti`, the old file kept as
/// `.bak`. A pin already there stays, even if it differs: then the broker
/// refuses the TPM and says why, which is what a swapped TPM must get.
fn ensure_pinned(path: &Path, name: &str) -> Result<Change, SetupError> {
    let text = std::fs::read_to_string(path).map_err(io(path, "read"))?;
    let config = Config::parse(&text, path).map_err(|_| SetupError::Io {
        path: path.to_owned(),
        action: "parse",
        source: std::io::Error::from(std::io::ErrorKind::InvalidData),
    })?;
    match config.salt_key_name {
        Some(n) if hex::encode(&n) == name => return Ok(Change::Unchanged),
        Some(_) => return Ok(Change::Kept),
        None => {}
    }
    let Some(out) = insert_after_tcti(&text, &format!("salt_key_name = \"{name}\"")) else {
        return Ok(Change::Absent);
    };
    write_atomic(&path.with_extension("conf.bak"), text.as_bytes(), 0o644)?;
    write_atomic(path, out.as_bytes(), 0o644)?;
    Ok(Change::Updated)
}

/// `dkey uninstall`: removes the handler, the rule, the dkey copy and the
/// embedded swtpm service. The configuration, the TPM passwords and the
/// software TPM's state (its seed: every key) stay unless `purge`.
pub fn uninstall(layout: &Layout, purge: bool) -> Result<Vec<Step>, SetupError> {
    if !is_root() {
        return Err(SetupError::NotRoot {
            what: "dkey uninstall",
        });
    }
    let mut steps = Vec::new();
    if let Ok(config) = Config::load(&layout.config()) {
        crate::broker::stop(&config);
    }
    let embedded_step = Step {
        what: "software TPM process and its network namespace".into(),
        path: layout.tpm_netns(),
        change: if swtpm_process(layout).is_some() || layout.tpm_netns().exists() {
            stop_embedded_swtpm(layout)?;
            Change::Removed
        } else {
            Change::Absent
        },
    };
    steps.push(embedded_step);
    let mut remove = |what: &str, path: PathBuf, really: bool| -> Result<(), SetupError> {
        let change = if !path.exists() {
            Change::Absent
        } else if !really {
            Change::Kept
        } else {
            if path.is_dir() {
                std::fs::remove_dir_all(&path).map_err(io(&path, "remove"))?;
            } else {
                std::fs::remove_file(&path).map_err(io(&path, "remove"))?;
            }
            Change::Removed
        };
        steps.push(Step {
            what: what.into(),
            path,
            change,
        });
        Ok(())
    };
    remove("request-key rule", layout.rule(), true)?;
    remove("request-key handler", layout.handler(), true)?;
    remove("TPM broker", layout.broker(), true)?;
    if layout.swtpm_unit().exists() {
        let _ = run(
            "systemctl",
            &["disable", "--now", "derived-keys-swtpm.service"],
        );
        remove("software TPM service", layout.swtpm_unit(), true)?;
        let _ = run("systemctl", &["daemon-reload"]);
    }
    remove("configuration", layout.config(), purge)?;
    let _ = std::fs::remove_file(layout.config().with_extension("conf.new"));
    remove("owner password", layout.owner_auth(), purge)?;
    remove("endorsement password", layout.endorsement_auth(), purge)?;
    remove("lockout password", layout.lockout_auth(), purge)?;
    remove(
        "software TPM state (its seed: every key)",
        layout.swtpm_state(),
        purge,
    )?;
    remove("dkey command", layout.dkey(), true)?;
    remove("PKCS#11 module", layout.pkcs11_module(), true)?;
    remove("p11-kit module file", layout.p11kit_module(), true)?;
    if purge {
        // The directories install created, if nothing else is in them.
        for dir in [
            layout.at("/etc/derived-keys"),
            layout.at("/var/lib/derived-keys"),
        ] {
            let _ = std::fs::remove_dir(dir);
        }
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::embedded::{swtpm_args, swtpm_unit};
    use super::*;

    #[test]
    fn config_text_sets_tcti_and_owner_auth() {
        let t = Tcti::parse(SWTPM_TCTI).unwrap();
        let ns = Path::new("/run/derived-keys/tpm.netns");
        let text = config_text(
            &t,
            Some(ns),
            Some(Path::new("/etc/derived-keys/owner-auth")),
        );
        let c = Config::parse(&text, Path::new("/x")).unwrap();
        assert_eq!(c.tcti.as_str(), SWTPM_TCTI);
        assert_eq!(c.tpm_netns.as_deref(), Some(ns));
        assert_eq!(
            c.owner_auth_file.as_deref(),
            Some(Path::new("/etc/derived-keys/owner-auth"))
        );
        let d = Tcti::parse("device:/dev/tpmrm0").unwrap();
        assert_eq!(config_text(&d, None, None), DEFAULT_CONFIG);
    }

    #[test]
    fn edited_configuration_is_kept_and_said_so() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("derived-keys.conf");
        assert_eq!(
            install_config(&p, "a\n", false, None).unwrap(),
            Change::Created
        );
        assert_eq!(
            install_config(&p, "a\n", false, None).unwrap(),
            Change::Unchanged
        );
        std::fs::write(&p, "edited\n").unwrap();
        let c = install_config(&p, "a\n", false, None).unwrap();
        let Change::KeptEdited { proposed } = c else {
            panic!("{c:?}")
        };
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "edited\n");
        assert_eq!(std::fs::read_to_string(proposed).unwrap(), "a\n");
        assert_eq!(
            install_config(&p, "a\n", true, None).unwrap(),
            Change::Updated
        );
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "a\n");
        assert_eq!(
            std::fs::read_to_string(p.with_extension("conf.bak")).unwrap(),
            "edited\n"
        );
    }

    #[test]
    fn files_are_installed_idempotently_with_modes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/helper");
        assert_eq!(install_file(&p, b"x", 0o755).unwrap(), Change::Created);
        assert_eq!(install_file(&p, b"x", 0o755).unwrap(), Change::Unchanged);
        assert_eq!(install_file(&p, b"y", 0o755).unwrap(), Change::Updated);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);
    }

    #[test]
    fn unit_runs_swtpm_in_the_foreground_and_locks_it_down() {
        let u = swtpm_unit(Path::new("/usr/local/bin/dkey"));
        // swtpm-run enters the namespace and execs swtpm in the foreground.
        assert!(u.contains("ExecStart=/usr/local/bin/dkey swtpm-run\n"));
        assert!(u.contains("ExecStartPost=/usr/local/bin/dkey swtpm-lockdown\n"));
        let args = swtpm_args(&Layout::default(), false).join(" ");
        assert!(!args.contains("--daemon"));
        assert_eq!(args.matches("bindaddr=127.0.0.1").count(), 2, "{args}");
    }

    /// The configuration the previous release wrote for the embedded TPM.
    fn previous_release_config() -> String {
        let t = Tcti::parse(SWTPM_TCTI).unwrap();
        previous_texts(&t, Some(Path::new("/etc/derived-keys/owner-auth"))).remove(0)
    }

    #[test]
    fn an_embedded_configuration_moves_into_the_namespace_with_its_edits() {
        let ns = Path::new("/run/derived-keys/tpm.netns");
        let edited =
            previous_release_config().replace("machine_uids = [0]", "machine_uids = [0, 7]");
        let migrated = migrate_config(&edited, ns).unwrap();
        let c = Config::parse(&migrated, Path::new("/x")).unwrap();
        assert_eq!(c.tpm_netns.as_deref(), Some(ns));
        assert_eq!(c.machine_uids, [0, 7], "the operator's edit stays");
        assert_eq!(c.tcti.as_str(), SWTPM_TCTI);
        // Nothing to do twice, nor for other TPMs.
        assert!(migrate_config(&migrated, ns).is_none());
        assert!(migrate_config(DEFAULT_CONFIG, ns).is_none());

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("derived-keys.conf");
        std::fs::write(&p, &edited).unwrap();
        let new = config_text(
            &Tcti::parse(SWTPM_TCTI).unwrap(),
            Some(ns),
            Some(Path::new("/etc/derived-keys/owner-auth")),
        );
        let c = install_config(&p, &new, false, Some(ns)).unwrap();
        assert!(matches!(c, Change::KeptEdited { .. }), "{c:?}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), migrated);
        assert_eq!(
            std::fs::read_to_string(p.with_extension("conf.bak")).unwrap(),
            edited
        );
        // Unedited, it becomes the new release's text.
        std::fs::write(&p, previous_release_config()).unwrap();
        let before = previous_texts(
            &Tcti::parse(SWTPM_TCTI).unwrap(),
            Some(Path::new("/etc/derived-keys/owner-auth")),
        );
        assert_eq!(
            install_config_after(&p, &new, false, Some(ns), &before).unwrap(),
            Change::Updated
        );
        assert_eq!(std::fs::read_to_string(&p).unwrap(), new);
        let got = Config::parse(&std::fs::read_to_string(&p).unwrap(), Path::new("/x")).unwrap();
        assert_eq!(got.tpm_netns.as_deref(), Some(ns));
    }
}
