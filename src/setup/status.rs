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
    /// The PKCS#11 module and its p11-kit file are in place.
    pub pkcs11_installed: bool,
    /// The broker serving this configuration, if one runs now (it starts
    /// with the first request and exits when idle).
    pub broker_pid: Option<u32>,
    /// Where audit lines go now, whether they can be lost, how many were.
    pub audit: Option<crate::audit::AuditStatus>,
    pub secret_memory: &'static str,
    /// Informational: `csum` never uses IMA (it hashes the running file).
    pub ima_available: bool,
    /// Settings of the configuration that still work but should be
    /// changed, in words.
    pub config_deprecated: Vec<String>,
    /// Every request-key rule that hands requests to derived-key-helper
    /// with a configuration naming this configuration's TPM. The prefix
    /// and the configuration are not derivation inputs, so all of them
    /// serve one key space: `test:db` under one rule is `derived:db` under
    /// another, each answered under its own rule's policy.
    pub key_space_rules: Vec<HandlerRule>,
    /// More than one rule file or configuration among `key_space_rules`:
    /// the loosest of their policies decides who gets this TPM's keys.
    pub key_space_shared: bool,
}

/// One line of a request-key rule file that runs derived-key-helper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HandlerRule {
    /// The rule file the line is in.
    pub file: PathBuf,
    /// The key type the line matches (`user`, `logon`, `*`).
    pub key_type: String,
    /// The description prefix the handler serves (`--prefix`).
    pub prefix: String,
    /// The configuration the handler reads (`--config`).
    pub config: PathBuf,
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
        pkcs11_installed: layout.pkcs11_module().is_file() && layout.p11kit_module().is_file(),
        broker_pid: None,
        audit: None,
        secret_memory: secret::probe_backing().map_or("unavailable", |b| b.as_str()),
        ima_available: crate::requester::ima_available(),
        config_deprecated: Vec::new(),
        key_space_rules: Vec::new(),
        key_space_shared: false,
    };
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            s.config_error = Some(e.to_string());
            return s;
        }
    };
    s.config_valid = true;
    s.audit = Some(crate::audit::status(&config));
    s.config_deprecated = config.deprecated.iter().map(|d| d.to_string()).collect();
    (s.key_space_rules, s.key_space_shared) = key_space(layout, &config);
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

impl std::fmt::Display for HandlerRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} {}:*, config {})",
            self.file.display(),
            self.key_type,
            self.prefix,
            self.config.display()
        )
    }
}

/// The rule files /sbin/request-key reads, in its order: every
/// `/etc/request-key.d/*.conf` (names starting with `.` skipped), sorted,
/// then `/etc/request-key.conf`.
fn rule_files(layout: &Layout) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(layout.at("/etc/request-key.d"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| !n.starts_with('.') && n.ends_with(".conf"))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files.push(layout.at("/etc/request-key.conf"));
    files
}

/// The lines of a rule file that run derived-key-helper, with the
/// handler's own reading of its arguments (`--config`, `--prefix`, their
/// defaults); request-key's `%` macros stand in as placeholders.
pub fn handler_rules(file: &Path, text: &str) -> Vec<HandlerRule> {
    use derived_keys_core::handler_args::{parse_args, Cli};
    use std::os::unix::ffi::OsStrExt;
    let mut rules = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // op type description callout program [args...]
        let [op, key_type, _desc, _callout, program, args @ ..] = fields.as_slice() else {
            continue;
        };
        if op.starts_with('#') || !op.eq_ignore_ascii_case("create") {
            continue;
        }
        let program = program.trim_start_matches('|');
        if Path::new(program).file_name() != Some(std::ffi::OsStr::new("derived-key-helper")) {
            continue;
        }
        let argv = std::iter::once(program)
            .chain(
                args.iter()
                    .map(|a| if a.starts_with('%') { "1" } else { a }),
            )
            .map(str::as_bytes);
        if let Cli::Run(a) = parse_args(argv) {
            rules.push(HandlerRule {
                file: file.to_owned(),
                key_type: (*key_type).to_owned(),
                prefix: String::from_utf8_lossy(a.prefix).into_owned(),
                config: PathBuf::from(std::ffi::OsStr::from_bytes(a.config)),
            });
        }
    }
    rules
}

/// Which TPM a configuration reaches, as one comparable string: the
/// network namespace and TCTI; a device node by its TPM (`/dev/tpmrm0` and
/// `/dev/tpm0` are one chip); a TCP simulator by host and port, with
/// tpm2-tss's defaults (localhost, 2321).
pub fn tpm_identity(config: &Config) -> String {
    use crate::tpm::TctiKind;
    let netns = config
        .tpm_netns
        .as_ref()
        .map_or_else(String::new, |n| format!("netns {} ", n.display()));
    let tcti = config.tcti.as_str();
    let conf = tcti.split_once(':').map_or("", |(_, c)| c);
    let id = match config.tcti.kind() {
        TctiKind::Device => {
            let path = config.tcti.device_path().unwrap_or("/dev/tpmrm0");
            let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.into());
            let real = real.to_string_lossy();
            format!("device {}", real.replacen("/tpmrm", "/tpm", 1))
        }
        TctiKind::Swtpm | TctiKind::Mssim => {
            let (mut host, mut port) = ("localhost", "2321");
            for kv in conf.split(',') {
                match kv.split_once('=') {
                    Some(("host", h)) => host = h,
                    Some(("port", p)) => port = p,
                    _ => {}
                }
            }
            let host = if host == "127.0.0.1" {
                "localhost"
            } else {
                host
            };
            format!("tcp {host}:{port}")
        }
        TctiKind::Tabrmd => format!("tabrmd {conf}"),
    };
    netns + &id
}

/// Every rule that routes to derived-key-helper with a valid configuration
/// that reaches the same TPM as `config`, and whether they come from more
/// than one rule file or configuration (one file's `user` and `logon`
/// lines with one configuration are one rule). A rule whose configuration
/// does not load serves no keys (the broker refuses it too): left out.
fn key_space(layout: &Layout, config: &Config) -> (Vec<HandlerRule>, bool) {
    key_space_with(layout, config, |p| Config::load(p).ok())
}

/// [`key_space`] with the configuration loader given (tests load without
/// Config::load's root-ownership check).
fn key_space_with(
    layout: &Layout,
    config: &Config,
    load: impl Fn(&Path) -> Option<Config>,
) -> (Vec<HandlerRule>, bool) {
    use std::collections::BTreeSet;
    let ours = tpm_identity(config);
    let (mut same, mut files, mut configs) = (Vec::new(), BTreeSet::new(), BTreeSet::new());
    for file in rule_files(layout) {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for rule in handler_rules(&file, &text) {
            let path = layout.at(&rule.config.to_string_lossy());
            let Some(theirs) = load(&path) else {
                continue;
            };
            if tpm_identity(&theirs) == ours {
                files.insert(rule.file.clone());
                configs.insert(std::fs::canonicalize(&path).unwrap_or(path));
                same.push(rule);
            }
        }
    }
    let shared = files.len() > 1 || configs.len() > 1;
    (same, shared)
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
    // The same pin as the broker's: a swapped salt key fails here too.
    tpm.pin_salt_key(config.salt_key_name.clone());
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

#[cfg(test)]
mod tests {
    use super::*;

    const HELPER: &str = "/usr/local/libexec/derived-key-helper";

    #[test]
    fn handler_rules_are_read_as_the_handler_reads_its_arguments() {
        let text = format!(
            "# comment {HELPER} --prefix x %k %u %g\n\
             create user derived:* * {HELPER} %k %u %g\n\
             create\tlogon\ttest:*\t*\t{HELPER} --config /etc/t.conf --prefix=test %k %u %g\n\
             create user debug:* * /bin/keyctl negate %k 30 %S\n\
             create user odd:* * |{HELPER} --config=/c %k %u %g\n\
             create user short:* *\n"
        );
        let rules = handler_rules(Path::new("/r.conf"), &text);
        let got: Vec<_> = rules
            .iter()
            .map(|r| {
                (
                    r.key_type.as_str(),
                    r.prefix.as_str(),
                    r.config.to_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("user", "derived", "/etc/derived-keys/derived-keys.conf"),
                ("logon", "test", "/etc/t.conf"),
                ("user", "derived", "/c"),
            ]
        );
    }

    #[test]
    fn one_tpm_is_named_one_way() {
        let id = |text: &str| tpm_identity(&Config::parse(text, Path::new("/t")).unwrap());
        assert_eq!(
            id("[tpm]\ntcti = \"swtpm:port=2321\"\n"),
            id("[tpm]\ntcti = \"swtpm:host=127.0.0.1,port=2321\"\n")
        );
        assert_eq!(
            id("[tpm]\ntcti = \"swtpm\"\n"),
            id("[tpm]\ntcti = \"mssim:host=localhost\"\n")
        );
        assert_ne!(
            id("[tpm]\ntcti = \"swtpm:port=2321\"\n"),
            id("[tpm]\ntcti = \"swtpm:port=2421\"\n")
        );
        assert_eq!(id(""), id("[tpm]\ntcti = \"device:/dev/tpm0\"\n"));
        assert_ne!(id(""), id("[tpm]\nnetns = \"/run/n\"\n"));
    }

    /// Two rule files against one TPM: both listed, and shared. A third
    /// against another TPM and a fourth with a broken configuration are
    /// not this TPM's key space.
    #[test]
    fn a_second_rule_against_the_same_tpm_is_reported() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout {
            root: root.path().to_owned(),
        };
        let write = |p: &str, text: &str| {
            let p = layout.at(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        let tpm = "[tpm]\ntcti = \"swtpm:port=4000\"\n";
        write("/etc/derived-keys/derived-keys.conf", tpm);
        write(
            "/etc/derived-keys/loose.conf",
            &format!("{tpm}[bindings]\nmachine_uids = [0, 1000]\n"),
        );
        write(
            "/etc/derived-keys/other.conf",
            "[tpm]\ntcti = \"swtpm:port=5000\"\n",
        );
        write("/etc/derived-keys/broken.conf", "[tpm]\ntcit = 1\n");
        let rule = |config: &str, prefix: &str| {
            format!(
                "create user {prefix}:* * {HELPER} --config {config} --prefix {prefix} %k %u %g\n\
                 create logon {prefix}:* * {HELPER} --config {config} --prefix {prefix} %k %u %g\n"
            )
        };
        write(
            "/etc/request-key.d/derived-keys.conf",
            &rule("/etc/derived-keys/derived-keys.conf", "derived"),
        );
        let load = |p: &Path| Config::parse(&std::fs::read_to_string(p).ok()?, p).ok();
        let ours = load(&layout.config()).unwrap();

        let (rules, shared) = key_space_with(&layout, &ours, load);
        assert_eq!(
            (rules.len(), shared),
            (2, false),
            "user and logon lines of one rule: {rules:?}"
        );

        write(
            "/etc/request-key.d/other.conf",
            &rule("/etc/derived-keys/other.conf", "o"),
        );
        write(
            "/etc/request-key.d/broken.conf",
            &rule("/etc/derived-keys/broken.conf", "b"),
        );
        write(
            "/etc/request-key.d/.hidden.conf",
            &rule("/etc/derived-keys/loose.conf", "h"),
        );
        write(
            "/etc/request-key.d/notes.txt",
            &rule("/etc/derived-keys/loose.conf", "n"),
        );
        let (rules, shared) = key_space_with(&layout, &ours, load);
        assert_eq!((rules.len(), shared), (2, false), "{rules:?}");

        write(
            "/etc/request-key.d/test.conf",
            &rule("/etc/derived-keys/loose.conf", "test"),
        );
        let (rules, shared) = key_space_with(&layout, &ours, load);
        assert!(shared, "{rules:?}");
        let prefixes: Vec<_> = rules.iter().map(|r| r.prefix.as_str()).collect();
        assert_eq!(prefixes, ["derived", "derived", "test", "test"]);
        assert!(rules[2].file.ends_with("etc/request-key.d/test.conf"));

        // /etc/request-key.conf is read too, after the directory, and one
        // file with two configurations is shared as well.
        std::fs::remove_file(layout.at("/etc/request-key.d/test.conf")).unwrap();
        std::fs::remove_file(layout.at("/etc/request-key.d/derived-keys.conf")).unwrap();
        write(
            "/etc/request-key.conf",
            &(rule("/etc/derived-keys/derived-keys.conf", "a")
                + &rule("/etc/derived-keys/loose.conf", "b")),
        );
        let (rules, shared) = key_space_with(&layout, &ours, load);
        assert_eq!((rules.len(), shared), (4, true), "{rules:?}");
        assert!(rules
            .iter()
            .all(|r| r.file.ends_with("etc/request-key.conf")));
    }
}
