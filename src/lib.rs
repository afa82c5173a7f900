//! derived-keys: stable per-application keys derived from a TPM, served
//! through the Linux request-key upcall, with nothing stored on disk.
//!
//! The path of a request, and where each step lives:
//!
//! 1. A program asks the kernel ([`client`], or keyctl, or libkeyutils).
//! 2. The kernel runs `derived-key-helper`, a static `no_std` program
//!    (src/bin/derived-key-helper): it reads the kernel's facts and passes
//!    them to the [`broker`] over [`wire`]. What the handler and the
//!    library share (the protocol, its arguments, the /proc/keys scan, the
//!    audit line, the errnos) has one home: the `derived-keys-core` crate.
//! 3. The broker runs the pipeline ([`broker::pipeline`]): [`request`]
//!    parses description and callout, [`requester`] names who asked (and
//!    [`requester::csum`] hashes its executable), [`policy`] decides,
//!    [`tpm`] computes the PRK, [`derive`] the key, signature or public
//!    key; [`audit`] writes one line.
//! 4. The handler instantiates or rejects the key as the broker said.
//!
//! Pure and testable without a kernel or a TPM: [`request`], [`config`],
//! [`policy`], [`derive`] and the parsers of [`requester`]. Boundary
//! modules own their dependency: only [`tpm`] uses tss-esapi (and
//! [`tpm::netns`] the embedded TPM's network namespace), only [`keyring`]
//! keyctl and linux-keyutils, only `sys` (and the handler's own `sys`)
//! has `unsafe`, which the workspace lints deny everywhere else. Each
//! boundary's error enum carries its errno; [`error`] maps errnos to dkey's
//! exit codes. [`setup`] is `dkey install`, `uninstall` and `status`.
//!
//! The derivation is specified in DERIVATION.md and frozen as v1.
pub mod audit;
pub mod broker;
pub mod client;
pub mod config;
pub mod derive;
pub mod error;
pub mod keyring;
pub mod policy;
pub mod request;
pub mod requester;
pub mod secret;
pub mod setup;
pub mod signer;
pub mod ssh;
#[allow(unsafe_code)]
mod sys;
pub mod tpm;
pub mod x509;

/// The handler–broker protocol (its one home is `derived-keys-core`).
pub use derived_keys_core::wire;
