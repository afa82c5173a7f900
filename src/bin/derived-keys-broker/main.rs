//! derived-keys-broker: keeps the derivation primary loaded for the
//! request-key handler, which starts it on demand. Root only; exits when
//! idle. Thin: the work is in `derived_keys::broker`; [`libctx`] gives the
//! TPM stack one OpenSSL library context instead of one per operation.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[allow(unsafe_code)]
mod libctx;

/// The TPM broker of derived-keys. Started by derived-key-helper; not for
/// running by hand except to debug.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Configuration file (the handler passes its own).
    #[arg(long, default_value = derived_keys::config::DEFAULT_PATH)]
    config: PathBuf,
}

fn main() -> ExitCode {
    std::env::set_var("TSS2_LOG", "all+NONE");
    // Before anything touches libcrypto: no openssl.cnf (see libctx).
    if !libctx::no_config() {
        eprintln!("derived-keys-broker: cannot initialise libcrypto");
        return ExitCode::from(libc::EIO as u8);
    }
    let cli = Cli::parse();
    match derived_keys::broker::serve(&cli.config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("derived-keys-broker: {e}");
            // The handler that started us reads the contract errno here.
            ExitCode::from(u8::try_from(e.errno()).unwrap_or(libc::EIO as u8))
        }
    }
}
