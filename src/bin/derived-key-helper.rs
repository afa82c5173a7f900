//! derived-key-helper: the request-key(8) handler. Started by
//! /sbin/request-key as root for `derived:*` requests; see the rule file in
//! request-key/. Thin: it parses argv and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use derived_keys::handler::{self, Args};

/// Answers a derived-keys request from the kernel. Not for running by hand:
/// it needs the instantiation authority /sbin/request-key passes on.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Configuration file.
    #[arg(long, default_value = derived_keys::config::DEFAULT_PATH)]
    config: PathBuf,
    /// Description prefix this rule serves.
    #[arg(long, default_value = derived_keys::request::DEFAULT_PREFIX)]
    prefix: String,
    /// The key under construction (%k).
    key: i32,
    /// The requester's uid (%u).
    uid: u32,
    /// The requester's gid (%g).
    gid: u32,
}

fn main() -> ExitCode {
    // Before anything else: no core dumps, and no TSS log lines on stderr.
    handler::harden();
    std::env::set_var("TSS2_LOG", "all+NONE");
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // Without a key id there is nothing to reject; the kernel
            // gives the requester ENOKEY when we exit.
            let _ = e.print();
            return ExitCode::from(2);
        }
    };
    let args = Args {
        key: cli.key,
        uid: cli.uid,
        gid: cli.gid,
        config: cli.config,
        prefix: cli.prefix,
        proc_root: PathBuf::from("/proc"),
    };
    ExitCode::from(handler::run(&args))
}
