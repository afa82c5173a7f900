//! dkey: derived keys for people and scripts. Thin: parses arguments,
//! calls the library, maps errors to the documented exit codes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use derived_keys::client::{ClientError, KeyRequest};
use derived_keys::error::{exit, exit_code_for_errno};
use derived_keys::request::{Algorithm, Binding, KeyType, Selector};
use derived_keys::setup::{self, Change, InstallOptions, Layout};
use sha2::{Digest, Sha256};

#[derive(Parser)]
#[command(
    version,
    about = "Stable per-application keys derived from this host's TPM"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Derive a symmetric key into a keyring (bytes leave the kernel only with --out or --stdout).
    Derive {
        #[command(flatten)]
        key: KeyArgs,
        /// Key length in bytes (1 to 1024).
        #[arg(long, default_value_t = 32)]
        len: usize,
        /// Kernel key type: user (readable) or logon (kernel use only, e.g. dm-crypt).
        #[arg(long = "type", value_enum, default_value_t = TypeArg::User)]
        key_type: TypeArg,
        /// Keyring to leave the key in: @s, @u, @p, @t, @us or a serial.
        #[arg(long, default_value = "@s")]
        keyring: String,
        /// Write the key bytes to this file (mode 0600) instead of a keyring.
        #[arg(long, conflicts_with_all = ["stdout", "keyring"])]
        out: Option<PathBuf>,
        /// Write the key bytes to standard output instead of a keyring.
        #[arg(long)]
        stdout: bool,
        /// Hex instead of raw bytes (with --out or --stdout).
        #[arg(long)]
        hex: bool,
    },
    /// Export the public key (P-256, or Ed25519 with --alg ed25519), SubjectPublicKeyInfo.
    Pub {
        #[command(flatten)]
        key: KeyArgs,
        #[arg(long, value_enum, default_value_t = KeyFormat::Pem)]
        format: KeyFormat,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Sign with the P-256 key (a file's SHA-256, or a digest) or the Ed25519 key (a file of 1 to 1024 bytes).
    Sign {
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        what: Signed,
        /// P-256: DER (default) or raw r||s. Ed25519 has one form, the 64 bytes of RFC 8032 (raw).
        #[arg(long, value_enum)]
        format: Option<SigFormat>,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Verify a signature with a public key (PEM or DER): P-256 (DER or raw r||s, over a file's SHA-256 or a digest) or Ed25519 (64 bytes, over a file).
    Verify {
        /// Public key file; its algorithm is read from it.
        #[arg(long = "pub")]
        public: PathBuf,
        #[command(flatten)]
        what: Signed,
        /// Signature file.
        #[arg(long)]
        sig: PathBuf,
        /// The algorithm the public key must have (default: whichever it has).
        #[arg(long, value_enum)]
        alg: Option<AlgArg>,
    },
    /// Report whether everything is in place.
    Status {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = derived_keys::config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Install the handler, the request-key rule and the configuration.
    Install {
        /// TPM to use (default: device:/dev/tpmrm0, or an embedded software TPM when there is no device).
        #[arg(long)]
        tcti: Option<String>,
        /// Replace an edited configuration (it is kept as .bak).
        #[arg(long)]
        force: bool,
    },
    /// Remove what install put in place (configuration, TPM passwords and software TPM state stay unless --purge).
    Uninstall {
        /// Also remove the configuration, passwords and the software TPM's state: every key is lost.
        #[arg(long)]
        purge: bool,
    },
    /// Print a PEM PKCS#10 certificate request signed by a derived key.
    Csr {
        #[command(flatten)]
        x: X509Args,
    },
    /// Print a PEM self-signed X.509 certificate of a derived key.
    Cert {
        #[command(flatten)]
        x: X509Args,
        /// Days of validity, from now.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// A root CA's certificate (CA:TRUE, keyCertSign, cRLSign) instead of
        /// an endpoint's own (CA:FALSE, digitalSignature: a TLS server's).
        #[arg(long)]
        ca: bool,
    },
    /// SSH: OpenSSH public key lines for derived keys.
    Ssh {
        #[command(subcommand)]
        command: SshCmd,
    },
    /// Serve the OpenSSH agent protocol for key selectors; signs through the kernel, holds no private key.
    #[command(name = "ssh-agent")]
    SshAgent {
        /// The agent's socket (default: a new 0700 directory under $TMPDIR or /tmp).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Stay in the foreground instead of detaching.
        #[arg(long)]
        foreground: bool,
        /// A key selector to serve (repeatable).
        #[arg(long = "key", required = true)]
        keys: Vec<String>,
        /// Description prefix (only for rules other than the standard one).
        #[arg(long, default_value = derived_keys::request::DEFAULT_PREFIX, hide = true)]
        prefix: String,
    },
    /// Lock down the embedded software TPM after a start (run by its service).
    #[command(hide = true)]
    SwtpmLockdown,
    /// Run the embedded software TPM in the foreground, in its network namespace (its service's ExecStart).
    #[command(hide = true)]
    SwtpmRun,
}

#[derive(Args)]
struct KeyArgs {
    /// Key name (1 to 64 of A-Z a-z 0-9 . _ -), or a whole key selector
    /// ([BINDING:]NAME[,account=A][,client=C][,epoch=N][,alg=p256|ed25519]).
    name: String,
    /// Whose key: path, csum (both: dkey's own), user (default) or machine.
    #[arg(long, value_enum, default_value_t = BindingArg::User)]
    binding: BindingArg,
    #[arg(long)]
    account: Option<String>,
    #[arg(long)]
    client: Option<String>,
    /// Rotation epoch (a new epoch is a new key).
    #[arg(long, default_value_t = 0)]
    epoch: u32,
    /// Key pair algorithm for pub and sign: p256 (default) or ed25519, another key of the same name.
    #[arg(long, value_enum)]
    alg: Option<AlgArg>,
    /// Description prefix (only for rules other than the standard one).
    #[arg(long, default_value = derived_keys::request::DEFAULT_PREFIX, hide = true)]
    prefix: String,
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct Signed {
    /// The file signed: P-256 signs its SHA-256, Ed25519 its bytes (1 to 1024).
    #[arg(long)]
    file: Option<PathBuf>,
    /// A SHA-256 digest, 64 hex digits (P-256 only).
    #[arg(long)]
    digest: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AlgArg {
    P256,
    Ed25519,
}

impl From<AlgArg> for Algorithm {
    fn from(a: AlgArg) -> Algorithm {
        match a {
            AlgArg::P256 => Algorithm::P256,
            AlgArg::Ed25519 => Algorithm::Ed25519,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BindingArg {
    Path,
    Csum,
    User,
    Machine,
}
#[derive(Clone, Copy, ValueEnum)]
enum TypeArg {
    User,
    Logon,
}
#[derive(Clone, Copy, ValueEnum)]
enum KeyFormat {
    Pem,
    Der,
}
#[derive(Clone, Copy, ValueEnum)]
enum SigFormat {
    Der,
    Raw,
}

/// A failure with its exit code and a message that says what to do.
struct Failure {
    code: u8,
    message: String,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure {
            code: match &e {
                ClientError::Invalid(_) => exit::INVALID,
                other => exit_code_for_errno(other.errno()),
            },
            message: e.to_string(),
        }
    }
}

impl From<setup::SetupError> for Failure {
    fn from(e: setup::SetupError) -> Self {
        let mut message = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            message.push_str(&format!(": {s}"));
            src = s.source();
        }
        Failure {
            code: exit::FAILURE,
            message,
        }
    }
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

fn request(k: &KeyArgs) -> Result<KeyRequest, Failure> {
    // NAME may be a whole key selector (`machine:host,epoch=2`); names
    // never hold ':' or ','.
    if k.name.contains([':', ',']) {
        let sel = Selector::parse(&k.name)
            .map_err(|e| fail(exit::INVALID, format!("key selector {:?}: {e}", k.name)))?;
        if k.account.is_some()
            || k.client.is_some()
            || k.epoch != 0
            || k.binding != BindingArg::User
            || k.alg.is_some()
        {
            return Err(fail(
                exit::USAGE,
                "a key selector carries its binding, options and algorithm: drop --binding, --account, --client, --epoch and --alg",
            ));
        }
        return Ok(KeyRequest::from_selector(&sel)?.prefix(&k.prefix));
    }
    let binding = match k.binding {
        BindingArg::Path => Binding::Path,
        BindingArg::Csum => Binding::Csum,
        BindingArg::User => Binding::User,
        BindingArg::Machine => Binding::Machine,
    };
    let mut r = KeyRequest::new(&k.name)?
        .binding(binding)
        .epoch(k.epoch)
        .alg(k.alg.map_or(Algorithm::P256, Algorithm::from))
        .prefix(&k.prefix);
    if let Some(a) = &k.account {
        r = r.account(a)?;
    }
    if let Some(c) = &k.client {
        r = r.client(c)?;
    }
    Ok(r)
}

fn keyring_id(s: &str) -> Result<i32, Failure> {
    Ok(match s {
        "@t" => -1,
        "@p" => -2,
        "@s" => -3,
        "@u" => -4,
        "@us" => -5,
        other => other.parse().map_err(|_| {
            fail(
                exit::USAGE,
                format!("--keyring {other:?}: expected @s, @u, @p, @t, @us or a serial"),
            )
        })?,
    })
}

/// Where a result goes: standard output, or a file dkey creates itself
/// (never an existing path, never through a symlink: O_CREAT|O_EXCL), mode
/// 0600 for key material. Opened before the key is asked for, so that a
/// refused path costs nothing and leaves nothing.
enum Output {
    Stdout,
    File { path: PathBuf, file: std::fs::File },
}

impl Output {
    fn open(out: Option<&Path>, secret: bool) -> Result<Output, Failure> {
        use std::os::unix::fs::OpenOptionsExt;
        let Some(path) = out else {
            return Ok(Output::Stdout);
        };
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if secret { 0o600 } else { 0o644 })
            .open(path)
        {
            Ok(file) => Ok(Output::File {
                path: path.to_owned(),
                file,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(fail(
                exit::USAGE,
                format!(
                    "--out {}: the path exists; dkey writes only to a file it creates (remove it first)",
                    path.display()
                ),
            )),
            Err(e) => Err(fail(
                exit::FAILURE,
                format!("--out {}: cannot create: {e}", path.display()),
            )),
        }
    }

    fn write(self, bytes: &[u8]) -> Result<(), Failure> {
        let res = match &self {
            Output::Stdout => std::io::stdout().lock().write_all(bytes),
            Output::File { file, .. } => {
                let mut f = file;
                f.write_all(bytes).and_then(|()| f.sync_all())
            }
        };
        res.map_err(|e| {
            self.abandon();
            fail(exit::FAILURE, format!("cannot write output: {e}"))
        })
    }

    /// Removes a file created for a result that never came.
    fn abandon(&self) {
        if let Output::File { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Runs `get` and writes what it gives to `out`.
fn write_result(
    out: Option<&Path>,
    secret: bool,
    get: impl FnOnce() -> Result<Vec<u8>, Failure>,
) -> Result<(), Failure> {
    let output = Output::open(out, secret)?;
    match get() {
        Ok(bytes) => output.write(&bytes),
        Err(e) => {
            output.abandon();
            Err(e)
        }
    }
}

fn digest_of(what: &Signed) -> Result<[u8; 32], Failure> {
    if let Some(f) = &what.file {
        let bytes = std::fs::read(f)
            .map_err(|e| fail(exit::FAILURE, format!("cannot read {}: {e}", f.display())))?;
        return Ok(Sha256::digest(bytes).into());
    }
    let hex = what.digest.as_deref().unwrap_or_default();
    let d = derived_keys::request::Digest32::parse_hex(hex.as_bytes())
        .map_err(|e| fail(exit::USAGE, format!("--digest: {e}")))?;
    Ok(d.0)
}

/// What an Ed25519 key signs or verifies: the bytes of `--file` themselves
/// (pure RFC 8032 hashes the message inside the signature), so `--digest`
/// is a usage error.
fn message_of(what: &Signed) -> Result<Vec<u8>, Failure> {
    match (&what.file, &what.digest) {
        (Some(f), _) => std::fs::read(f)
            .map_err(|e| fail(exit::FAILURE, format!("cannot read {}: {e}", f.display()))),
        (None, _) => Err(fail(
            exit::USAGE,
            "--digest: an Ed25519 key signs the message itself (pure RFC 8032), not a digest: give --file",
        )),
    }
}

fn print_steps(steps: &[setup::Step]) {
    for s in steps {
        let what = match &s.change {
            Change::Created => "installed".to_owned(),
            Change::Updated => "updated".into(),
            Change::Unchanged => "unchanged".into(),
            Change::KeptEdited { proposed } => format!(
                "kept your edited file; the new default is in {} (use --force to replace yours)",
                proposed.display()
            ),
            Change::Removed => "removed".into(),
            Change::Absent => "not present".into(),
            Change::Kept => "kept (remove with --purge)".into(),
        };
        println!("{:<44} {:<48} {what}", s.what, s.path.display());
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "ok"
    } else {
        "MISSING"
    }
}

fn status(json: bool, config: &Path) -> Result<u8, Failure> {
    let s = setup::status(&Layout::default(), config);
    if json {
        let text = serde_json::to_string_pretty(&s)
            .map_err(|e| fail(exit::FAILURE, format!("json: {e}")))?;
        println!("{text}");
    } else {
        println!("ready:          {}", if s.ready { "yes" } else { "NO" });
        println!(
            "configuration:  {} {}",
            yes(s.config_valid),
            s.config_path.display()
        );
        if let Some(e) = &s.config_error {
            println!("                {e}");
        }
        for d in &s.config_deprecated {
            println!("                WARNING: {d}");
        }
        println!(
            "TPM:            {} {}",
            yes(s.tpm_reachable),
            s.tcti.as_deref().unwrap_or("-")
        );
        if let (Some(kind), Some(m)) = (s.tpm_kind, &s.tpm_manufacturer) {
            println!(
                "                {kind} TPM, manufacturer {m:?}, vendor {:?}",
                s.tpm_vendor.as_deref().unwrap_or("")
            );
        }
        if let Some(e) = &s.tpm_error {
            println!("                {e}");
        }
        if let Some(access) = &s.tpm_access {
            let warn = if s.tpm_open_to_all_users == Some(true) {
                "WARNING: "
            } else {
                ""
            };
            println!("reachable by:   {warn}{access}");
        }
        println!("derivation:     {}", yes(s.derivation_ok));
        println!("protection:     {}", s.protection);
        println!(
            "rule:           {} {}{}",
            yes(s.rule_installed),
            s.rule_path.display(),
            if s.rule_installed && !s.rule_current {
                " (differs from this build's)"
            } else {
                ""
            }
        );
        println!(
            "handler:        {} {}",
            yes(s.handler_installed),
            s.handler_path.display()
        );
        println!(
            "broker:         {} {}",
            yes(s.broker_installed),
            match s.broker_pid {
                Some(pid) => format!("running, pid {pid}"),
                None => "not running (starts with the next request)".into(),
            }
        );
        println!(
            "PKCS#11:        {} /usr/local/lib/derived-keys/derived-keys-pkcs11.so",
            yes(s.pkcs11_installed)
        );
        if let Some(a) = &s.audit {
            println!(
                "audit:          {}{}; dropped: {} since the broker started, {} since boot, {} not yet reported",
                if a.lossy { "LOSSY: " } else { "" },
                a.destination,
                a.dropped_since_broker_start.map_or("-".into(), |n| n.to_string()),
                a.dropped_total,
                a.unreported
            );
        }
        println!("secret memory:  {}", s.secret_memory);
        println!(
            "IMA:            {} (informational: csum always hashes the running file)",
            if s.ima_available {
                "available"
            } else {
                "not available"
            }
        );
        if s.key_space_shared {
            println!(
                "key space:      WARNING: these rules all hand out this TPM's keys, \
                 each under its own configuration's policy (prefix and configuration \
                 are no derivation inputs; see THREAT-MODEL.md):"
            );
            for r in &s.key_space_rules {
                println!("                {r}");
            }
        } else if let Some(r) = s.key_space_rules.first() {
            println!("key space:      one rule: {r}");
        } else if s.config_valid {
            println!("key space:      no rule routes to derived-key-helper with this TPM");
        }
        if !s.ready {
            println!("\nTo fix: run `dkey install` as root (see README.md).");
        }
    }
    Ok(if s.ready { exit::OK } else { exit::NOT_READY })
}

fn run(cli: Cli) -> Result<u8, Failure> {
    match cli.command {
        Cmd::Derive {
            key,
            len,
            key_type,
            keyring,
            out,
            stdout,
            hex,
        } => {
            let r = request(&key)?;
            if key.alg.is_some() || r.algorithm() != Algorithm::P256 {
                return Err(fail(
                    exit::USAGE,
                    "a symmetric key has no algorithm: drop --alg (or alg= from the selector)",
                ));
            }
            if out.is_some() || stdout {
                if matches!(key_type, TypeArg::Logon) {
                    return Err(fail(
                        exit::USAGE,
                        "logon keys never leave the kernel: drop --out/--stdout",
                    ));
                }
                write_result(out.as_deref(), true, || {
                    let k = r.symmetric(len)?;
                    Ok(if hex {
                        format!("{}\n", hex::encode(k.as_ref())).into_bytes()
                    } else {
                        k.as_ref().to_vec()
                    })
                })?;
            } else {
                let t = match key_type {
                    TypeArg::User => KeyType::User,
                    TypeArg::Logon => KeyType::Logon,
                };
                let kept = r.keep(len, t, keyring_id(&keyring)?)?;
                println!("{} {}:{}", kept.serial, t.as_str(), kept.description);
            }
        }
        Cmd::Pub { key, format, out } => {
            let r = request(&key)?;
            write_result(out.as_deref(), false, || {
                let der = r.public_key()?;
                Ok(match format {
                    KeyFormat::Der => der,
                    KeyFormat::Pem => derived_keys::derive::spki_to_pem(&der)
                        .ok_or_else(|| {
                            fail(exit::FAILURE, "the handler returned a malformed public key")
                        })?
                        .into_bytes(),
                })
            })?;
        }
        Cmd::Sign {
            key,
            what,
            format,
            out,
        } => {
            let r = request(&key)?;
            if r.algorithm() == Algorithm::Ed25519 {
                if matches!(format, Some(SigFormat::Der)) {
                    return Err(fail(
                        exit::USAGE,
                        "--format der: an Ed25519 signature has one form, the 64 bytes of RFC 8032 (raw)",
                    ));
                }
                let message = message_of(&what)?;
                return write_result(out.as_deref(), false, || Ok(r.sign_message(&message)?))
                    .map(|()| exit::OK);
            }
            let digest = digest_of(&what)?;
            write_result(out.as_deref(), false, || {
                let sig = r.sign_digest(&digest)?;
                Ok(match format.unwrap_or(SigFormat::Der) {
                    SigFormat::Der => sig,
                    SigFormat::Raw => {
                        derived_keys::derive::signature_to_raw(&sig).ok_or_else(|| {
                            fail(exit::FAILURE, "the handler returned a malformed signature")
                        })?
                    }
                })
            })?;
        }
        Cmd::Verify {
            public,
            what,
            sig,
            alg,
        } => {
            use derived_keys::derive::{self, PublicKey};
            let read = |p: &Path| {
                std::fs::read(p)
                    .map_err(|e| fail(exit::FAILURE, format!("cannot read {}: {e}", p.display())))
            };
            // The key file names its algorithm (the SubjectPublicKeyInfo's).
            let key = PublicKey::from_pem_or_der(&read(&public)?).ok_or_else(|| {
                fail(
                    exit::FAILURE,
                    format!(
                        "{} is not a P-256 or Ed25519 public key (PEM or DER)",
                        public.display()
                    ),
                )
            })?;
            let key_alg = match key {
                PublicKey::P256(_) => Algorithm::P256,
                PublicKey::Ed25519(_) => Algorithm::Ed25519,
            };
            if let Some(want) = alg.map(Algorithm::from).filter(|a| *a != key_alg) {
                return Err(fail(
                    exit::USAGE,
                    format!(
                        "--alg {}: {} is a {} public key",
                        want.as_str(),
                        public.display(),
                        key_alg.as_str()
                    ),
                ));
            }
            let good = match &key {
                PublicKey::P256(spki) => {
                    derive::verify_digest(spki, &digest_of(&what)?, &read(&sig)?)
                }
                PublicKey::Ed25519(_) => {
                    derive::verify_ed25519(&key.spki_der(), &message_of(&what)?, &read(&sig)?)
                }
            };
            if good {
                println!("signature ok");
            } else {
                println!("signature does NOT verify");
                return Ok(exit::BAD_SIGNATURE);
            }
        }
        Cmd::Status { json, config } => return status(json, &config),
        Cmd::Install { tcti, force } => {
            let exe = std::env::current_exe()
                .map_err(|e| fail(exit::FAILURE, format!("cannot find dkey itself: {e}")))?;
            let build_dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
            let steps = setup::install(
                &Layout::default(),
                &InstallOptions {
                    tcti,
                    force,
                    build_dir,
                },
            )?;
            print_steps(&steps);
        }
        Cmd::Uninstall { purge } => print_steps(&setup::uninstall(&Layout::default(), purge)?),
        Cmd::Csr { x } => {
            let (signer, subject, sans) = x509_parts(&x)?;
            print!("{}", derived_keys::x509::csr(&signer, &subject, &sans)?);
        }
        Cmd::Cert { x, days, ca } => {
            use derived_keys::x509::Usage;
            let (signer, subject, sans) = x509_parts(&x)?;
            let usage = if ca { Usage::Ca } else { Usage::EndEntity };
            print!(
                "{}",
                derived_keys::x509::self_signed(&signer, &subject, &sans, days, usage)?
            );
        }
        Cmd::Ssh { command } => return ssh(command),
        Cmd::SshAgent {
            socket,
            foreground,
            keys,
            prefix,
        } => return ssh_agent(socket, foreground, &keys, &prefix),
        Cmd::SwtpmLockdown => setup::lockdown_embedded(&Layout::default())?,
        Cmd::SwtpmRun => return Err(setup::exec_embedded_swtpm(&Layout::default()).into()),
    }
    Ok(exit::OK)
}

fn main() -> ExitCode {
    std::env::set_var("TSS2_LOG", "all+NONE");
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("dkey: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

#[derive(Subcommand)]
enum SshCmd {
    /// Print the OpenSSH public key line of a key selector (authorized_keys, known_hosts, sshd's HostKey).
    Pubkey {
        /// Key selector, e.g. machine:host or user:git,alg=ed25519.
        selector: String,
        /// Description prefix (only for rules other than the standard one).
        #[arg(long, default_value = derived_keys::request::DEFAULT_PREFIX, hide = true)]
        prefix: String,
    },
    /// Print an OpenSSH certificate for a public key, signed by a derived CA key.
    Certify {
        /// The CA's key selector (its `dkey ssh pubkey` line goes in sshd's TrustedUserCAKeys or @cert-authority).
        #[arg(long)]
        ca: String,
        /// The certificate's key id (shown in sshd's logs).
        #[arg(long)]
        identity: String,
        /// A user name (or, with --host, a host name) the certificate is valid for (repeatable).
        #[arg(long = "principal")]
        principals: Vec<String>,
        /// A host certificate instead of a user certificate.
        #[arg(long)]
        host: bool,
        /// Days of validity, from now.
        #[arg(long, default_value_t = 30)]
        days: u32,
        /// The OpenSSH public key file to certify.
        public_key: PathBuf,
        /// Description prefix (only for rules other than the standard one).
        #[arg(long, default_value = derived_keys::request::DEFAULT_PREFIX, hide = true)]
        prefix: String,
    },
}

impl From<derived_keys::ssh::cert::CertError> for Failure {
    fn from(e: derived_keys::ssh::cert::CertError) -> Self {
        Failure {
            code: exit_code_for_errno(e.errno()),
            message: e.to_string(),
        }
    }
}

impl From<derived_keys::ssh::SshError> for Failure {
    fn from(e: derived_keys::ssh::SshError) -> Self {
        Failure {
            code: exit_code_for_errno(e.errno()),
            message: e.to_string(),
        }
    }
}

fn ssh(command: SshCmd) -> Result<u8, Failure> {
    match command {
        SshCmd::Pubkey { selector, prefix } => {
            let line = derived_keys::ssh::SshKey::derive_with_prefix(&selector, &prefix)?
                .openssh_line()?;
            println!("{line}");
        }
        SshCmd::Certify {
            ca,
            identity,
            principals,
            host,
            days,
            public_key,
            prefix,
        } => {
            let text = std::fs::read_to_string(&public_key)
                .map_err(|e| fail(exit::INVALID, format!("{}: {e}", public_key.display())))?;
            let subject = ssh_key::PublicKey::from_openssh(text.trim()).map_err(|e| {
                fail(
                    exit::INVALID,
                    format!("{}: not an OpenSSH public key: {e}", public_key.display()),
                )
            })?;
            let ca = derived_keys::ssh::SshKey::derive_with_prefix(&ca, &prefix)?;
            let req = derived_keys::ssh::cert::CertRequest {
                identity,
                principals,
                host,
                days,
            };
            let cert = derived_keys::ssh::cert::certify(&ca, &subject, &req)?;
            let line = cert
                .to_openssh()
                .map_err(|e| fail(exit::FAILURE, format!("certificate: {e}")))?;
            println!("{line}");
        }
    }
    Ok(exit::OK)
}

/// Set in the agent process `dkey ssh-agent` starts when it detaches.
const AGENT_CHILD: &str = "DKEY_SSH_AGENT_CHILD";

/// A new private (0700) directory for the agent's socket.
fn agent_dir() -> Result<PathBuf, Failure> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::var_os("TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    for _ in 0..16 {
        let mut r = [0u8; 6];
        getrandom::getrandom(&mut r)
            .map_err(|e| fail(exit::FAILURE, format!("no randomness: {e}")))?;
        let dir = base.join(format!("dkey-ssh-{}", hex::encode(r)));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(fail(
                    exit::FAILURE,
                    format!("cannot create {}: {e}", dir.display()),
                ))
            }
        }
    }
    Err(fail(
        exit::FAILURE,
        "cannot create a private directory for the agent",
    ))
}

/// Checks the socket's directory is ours and private (0700).
fn private_parent(socket: &Path) -> Result<(), Failure> {
    use std::os::unix::fs::MetadataExt;
    let dir = socket
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let m = std::fs::metadata(dir)
        .map_err(|e| fail(exit::USAGE, format!("--socket: {}: {e}", dir.display())))?;
    if m.uid() != nix::unistd::getuid().as_raw() || m.mode() & 0o077 != 0 {
        return Err(fail(
            exit::USAGE,
            format!(
                "--socket: {} must be a directory of yours with mode 0700 (it is {:o})",
                dir.display(),
                m.mode() & 0o777
            ),
        ));
    }
    Ok(())
}

fn ssh_agent(
    socket: Option<PathBuf>,
    foreground: bool,
    keys: &[String],
    prefix: &str,
) -> Result<u8, Failure> {
    use std::os::unix::fs::PermissionsExt;
    // Every selector is checked, and its public key derived, before the
    // agent answers anyone: a bad selector fails here, in the foreground.
    let agent = derived_keys::ssh::Agent::new(keys, prefix)?;
    let socket = match socket {
        Some(s) => s,
        None => agent_dir()?.join(format!("agent.{}", std::process::id())),
    };
    private_parent(&socket)?;
    if !foreground {
        let exe = std::env::current_exe()
            .map_err(|e| fail(exit::FAILURE, format!("cannot find dkey itself: {e}")))?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("ssh-agent")
            .arg("--foreground")
            .arg("--socket")
            .arg(&socket)
            .arg("--prefix")
            .arg(prefix);
        for k in keys {
            cmd.arg("--key").arg(k);
        }
        let child = cmd
            .env(AGENT_CHILD, "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| fail(exit::FAILURE, format!("cannot start the agent: {e}")))?;
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !socket.exists() {
            if std::time::Instant::now() > end {
                return Err(fail(exit::FAILURE, "the agent did not start"));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let s = socket.display();
        let pid = child.id();
        println!("SSH_AUTH_SOCK={s}; export SSH_AUTH_SOCK;");
        println!("SSH_AGENT_PID={pid}; export SSH_AGENT_PID;");
        println!("echo Agent pid {pid};");
        return Ok(exit::OK);
    }
    if std::env::var_os(AGENT_CHILD).is_some() {
        // Detached: out of the terminal's session and process group.
        let _ = nix::unistd::setsid();
    }
    let _ = std::fs::remove_file(&socket);
    let listener = std::os::unix::net::UnixListener::bind(&socket)
        .map_err(|e| fail(exit::FAILURE, format!("{}: {e}", socket.display())))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| fail(exit::FAILURE, format!("{}: {e}", socket.display())))?;
    derived_keys::ssh::serve(&agent, &listener)
        .map_err(|e| fail(exit::FAILURE, format!("agent: {e}")))?;
    Ok(exit::OK)
}

#[derive(Args)]
struct X509Args {
    /// Key selector, e.g. machine:web (P-256) or machine:web,alg=ed25519.
    selector: String,
    /// The subject, an RFC 4514 distinguished name (CN=host,O=Org,C=DE).
    #[arg(long)]
    subject: String,
    /// A subject alternative name, DNS:<name> or IP:<address> (repeatable).
    #[arg(long = "san")]
    sans: Vec<String>,
    /// Description prefix (only for rules other than the standard one).
    #[arg(long, default_value = derived_keys::request::DEFAULT_PREFIX, hide = true)]
    prefix: String,
}

impl From<derived_keys::x509::X509Error> for Failure {
    fn from(e: derived_keys::x509::X509Error) -> Self {
        Failure {
            code: exit_code_for_errno(e.errno()),
            message: e.to_string(),
        }
    }
}

impl From<derived_keys::signer::SignerError> for Failure {
    fn from(e: derived_keys::signer::SignerError) -> Self {
        Failure {
            code: exit_code_for_errno(e.errno()),
            message: e.to_string(),
        }
    }
}

/// Everything is parsed and checked before the key is asked for: bad
/// input costs no request and prints nothing on stdout.
fn x509_parts(
    x: &X509Args,
) -> Result<
    (
        derived_keys::signer::DerivedSigner,
        x509_cert::name::Name,
        Vec<derived_keys::x509::San>,
    ),
    Failure,
> {
    let subject = derived_keys::x509::parse_subject(&x.subject)?;
    let sans = x
        .sans
        .iter()
        .map(|s| s.parse())
        .collect::<Result<Vec<derived_keys::x509::San>, _>>()?;
    let sel = Selector::parse(&x.selector)
        .map_err(|e| fail(exit::INVALID, format!("key selector {:?}: {e}", x.selector)))?;
    let request = KeyRequest::from_selector(&sel)?.prefix(&x.prefix);
    Ok((
        derived_keys::signer::DerivedSigner::with_request(request)?,
        subject,
        sans,
    ))
}
