//! dkey: derived keys for people and scripts. Thin: parses arguments,
//! calls the library, maps errors to the documented exit codes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use derived_keys::client::{ClientError, KeyRequest};
use derived_keys::error::{exit, exit_code_for_errno};
use derived_keys::request::{Binding, KeyType, Selector};
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
    /// Export the P-256 public key.
    Pub {
        #[command(flatten)]
        key: KeyArgs,
        #[arg(long, value_enum, default_value_t = KeyFormat::Pem)]
        format: KeyFormat,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Sign a file (its SHA-256) or a SHA-256 digest with the P-256 key.
    Sign {
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        what: Signed,
        #[arg(long, value_enum, default_value_t = SigFormat::Der)]
        format: SigFormat,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Verify a signature (DER or raw r||s) with a public key (PEM or DER).
    Verify {
        /// Public key file.
        #[arg(long = "pub")]
        public: PathBuf,
        #[command(flatten)]
        what: Signed,
        /// Signature file.
        #[arg(long)]
        sig: PathBuf,
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
    /// ([BINDING:]NAME[,account=A][,client=C][,epoch=N][,alg=p256]).
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
    /// Description prefix (only for rules other than the standard one).
    #[arg(long, default_value = derived_keys::request::DEFAULT_PREFIX, hide = true)]
    prefix: String,
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct Signed {
    /// The file whose SHA-256 is signed.
    #[arg(long)]
    file: Option<PathBuf>,
    /// A SHA-256 digest, 64 hex digits.
    #[arg(long)]
    digest: Option<String>,
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
        {
            return Err(fail(
                exit::USAGE,
                "a key selector carries its binding and options: drop --binding, --account, --client and --epoch",
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
        println!("secret memory:  {}", s.secret_memory);
        println!(
            "IMA:            {}",
            if s.ima_available {
                "available"
            } else {
                "not available (csum hashes the executable)"
            }
        );
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
            let digest = digest_of(&what)?;
            write_result(out.as_deref(), false, || {
                let sig = r.sign_digest(&digest)?;
                Ok(match format {
                    SigFormat::Der => sig,
                    SigFormat::Raw => {
                        derived_keys::derive::signature_to_raw(&sig).ok_or_else(|| {
                            fail(exit::FAILURE, "the handler returned a malformed signature")
                        })?
                    }
                })
            })?;
        }
        Cmd::Verify { public, what, sig } => {
            let read = |p: &Path| {
                std::fs::read(p)
                    .map_err(|e| fail(exit::FAILURE, format!("cannot read {}: {e}", p.display())))
            };
            let spki =
                derived_keys::derive::spki_from_pem_or_der(&read(&public)?).ok_or_else(|| {
                    fail(
                        exit::FAILURE,
                        format!(
                            "{} is not a P-256 public key (PEM or DER)",
                            public.display()
                        ),
                    )
                })?;
            if derived_keys::derive::verify_digest(&spki, &digest_of(&what)?, &read(&sig)?) {
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
