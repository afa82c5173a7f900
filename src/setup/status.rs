//! `dkey status`: everything a request needs, checked, and who can reach
//! the TPM.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{Layout, RULE};
use crate::config::Config;
use crate::derive::{Input, Purpose, Subject};
use crate::secret;
use crate::tpm::{Tpm, TpmError};

/// What `dkey status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub ready: bool,
    pub config_path: PathBuf,
    pub config_valid: bool,
    pub config_error: Option<String>,
    pub tcti: Option<String>,
    pub tpm_reachable: bool,
    /// "hardware", "software" or null when unreachable.
    pub tpm_kind: Option<&'static str>,
    pub tpm_manufacturer: Option<String>,
    pub tpm_vendor: Option<String>,
    pub tpm_error: Option<String>,
    /// Who can send the configured TPM commands, in words.
    pub tpm_access: Option<String>,
    /// Every local user can reach the TPM (a TCP TCTI on the host's
    /// network, a device node open to all); null when unknown.
    pub tpm_open_to_all_users: Option<bool>,
    /// A test derivation (owner password included) went through.
    pub derivation_ok: bool,
    pub protection: String,
    pub rule_path: PathBuf,
    pub rule_installed: bool,
    pub rule_current: bool,
    pub handler_path: PathBuf,
    pub handler_installed: bool,
    pub broker_installed: bool,
    /// The broker serving this configuration, if one runs now (it starts
    /// with the first request and exits when idle).
    pub broker_pid: Option<u32>,
    pub secret_memory: &'static str,
    pub ima_available: bool,
}

/// `dkey status`: everything a request needs, checked.
pub fn status(layout: &Layout, config_path: &Path) -> Status {
    let rule = std::fs::read_to_string(layout.rule()).ok();
    let executable = |p: PathBuf| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    let handler_installed = executable(layout.handler());
    let broker_installed = executable(layout.broker());
    let mut s = Status {
        ready: false,
        config_path: config_path.to_owned(),
        config_valid: false,
        config_error: None,
        tcti: None,
        tpm_reachable: false,
        tpm_kind: None,
        tpm_manufacturer: None,
        tpm_vendor: None,
        tpm_error: None,
        tpm_access: None,
        tpm_open_to_all_users: None,
        derivation_ok: false,
        protection: "none: no TPM reachable".into(),
        rule_path: layout.rule(),
        rule_installed: rule.is_some(),
        rule_current: rule.as_deref() == Some(RULE),
        handler_path: layout.handler(),
        handler_installed,
        broker_installed,
        broker_pid: None,
        secret_memory: secret::probe_backing().map_or("unavailable", |b| b.as_str()),
        ima_available: crate::requester::ima_available(),
    };
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            s.config_error = Some(e.to_string());
            return s;
        }
    };
    s.config_valid = true;
    s.tcti = Some(config.tcti.to_string());
    s.broker_pid = std::fs::read_to_string(crate::broker::paths(&config).pid)
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .filter(|pid| Path::new(&format!("/proc/{pid}")).exists());
    let (access, open) = tpm_access(&config);
    s.tpm_access = Some(access);
    s.tpm_open_to_all_users = open;
    let probed = crate::tpm::netns::run_in(config.tpm_netns.as_deref(), || {
        let mut part = s.clone();
        let r = probe_tpm(&config, &mut part).map_err(|e| e.to_string());
        (part, r)
    });
    match probed {
        Ok((part, r)) => {
            s = part;
            s.tpm_error = r.err();
        }
        Err(e) => s.tpm_error = Some(e.to_string()),
    }
    s.ready = s.config_valid
        && s.tpm_reachable
        && s.derivation_ok
        && s.rule_installed
        && s.handler_installed
        && s.broker_installed;
    s
}

/// Who can reach the TPM the configuration names, and whether that is
/// every local user.
pub fn tpm_access(config: &Config) -> (String, Option<bool>) {
    use crate::tpm::TctiKind;
    use std::os::unix::fs::MetadataExt;
    if let Some(ns) = &config.tpm_netns {
        let ok = crate::tpm::netns::exists(ns);
        let private = ns
            .parent()
            .and_then(|d| std::fs::metadata(d).ok())
            .is_some_and(|m| m.uid() == 0 && m.mode() & 0o077 == 0);
        return if ok && private {
            (
                format!(
                    "root only: the TPM listens only inside network namespace {}, which only root can enter",
                    ns.display()
                ),
                Some(false),
            )
        } else if ok {
            (
                format!(
                    "root only (network namespace {}), but its directory is not root-only (0700)",
                    ns.display()
                ),
                Some(false),
            )
        } else {
            (
                format!(
                    "no TPM: network namespace {} is missing (run dkey install)",
                    ns.display()
                ),
                None,
            )
        };
    }
    match config.tcti.kind() {
        TctiKind::Device => {
            let path = config.tcti.device_path().unwrap_or("/dev/tpmrm0");
            match std::fs::metadata(path) {
                Ok(m) => {
                    let group = nix::unistd::Group::from_gid(m.gid().into())
                        .ok()
                        .flatten()
                        .map_or_else(|| m.gid().to_string(), |g| g.name);
                    let owner = nix::unistd::User::from_uid(m.uid().into())
                        .ok()
                        .flatten()
                        .map_or_else(|| m.uid().to_string(), |u| u.name);
                    let mode = m.mode() & 0o777;
                    let open = mode & 0o006 != 0;
                    let who = if open {
                        "every local user".to_owned()
                    } else if mode & 0o060 != 0 {
                        format!("root and members of group {group}")
                    } else {
                        format!("root and {owner}")
                    };
                    (
                        format!("{who}: device node {path} (owner {owner}, group {group}, mode {mode:04o})"),
                        Some(open),
                    )
                }
                Err(_) => (format!("no TPM: {path} does not exist"), None),
            }
        }
        TctiKind::Swtpm | TctiKind::Mssim => (
            format!(
                "every local user: {} is a TCP socket on this host's network that any process can connect to",
                config.tcti
            ),
            Some(true),
        ),
        TctiKind::Tabrmd => (
            "whoever tpm2-abrmd's D-Bus policy admits".to_owned(),
            None,
        ),
    }
}

/// Why the status probe stopped.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error(transparent)]
    Lock(#[from] crate::broker::BrokerError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Tpm(#[from] TpmError),
}

/// Reaches the TPM, says what kind it is, and runs one test derivation
/// (owner password included), filling in `s` as it goes.
fn probe_tpm(config: &Config, s: &mut Status) -> Result<(), ProbeError> {
    // Take turns with the broker: swtpm serves one client at a time.
    let _lock = crate::broker::tpm_lock(config)?;
    let mut tpm = Tpm::open(&config.tcti)?;
    let info = tpm.info()?;
    s.tpm_reachable = true;
    s.tpm_kind = Some(if info.software {
        "software"
    } else {
        "hardware"
    });
    s.protection = if info.software {
        "software only: a software TPM (swtpm) keeps its seed in a file; keys are as safe as that file and this host's root".into()
    } else {
        format!(
            "hardware TPM ({}) through {}",
            info.manufacturer,
            config.tcti.device_path().unwrap_or(config.tcti.as_str())
        )
    };
    s.tpm_manufacturer = Some(info.manufacturer);
    s.tpm_vendor = Some(info.vendor);
    let auth = config.owner_auth()?;
    let probe_input = Input {
        purpose: Purpose::Symmetric(32),
        name: "dkey-status-self-test",
        subject: Subject::Machine,
        account: None,
        client: None,
        epoch: 0,
    };
    tpm.prk(auth.as_ref(), &probe_input.message())?;
    s.derivation_ok = true;
    Ok(())
}
