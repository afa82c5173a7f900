//! derived-keys: stable per-application keys derived from a TPM, served
//! through the Linux request-key upcall, with nothing stored on disk.
//!
//! Architecture, edges first:
//!
//! - [`request`], [`config`], [`requester`] (its parsers), [`policy`] and
//!   [`derive`] are pure: strings become types, types become decisions and
//!   key bytes. They need neither a kernel nor a TPM to test.
//! - [`tpm`] is the only module that uses tss-esapi; [`keyring`] the only
//!   one that uses keyctl/linux-keyutils; `sys` the only one with `unsafe`
//!   (and, in the handler binary, its own `sys`).
//! - The request-key handler, `derived-key-helper`, is a small static
//!   program without Rust's std or glibc's start-up: it reads the kernel's
//!   facts, passes them over [`wire`] to the [`broker`] (starting it when
//!   none runs), and instantiates or rejects as told. The broker keeps the
//!   TPM primary loaded and runs the request pipeline, [`handler`].
//! - [`client`] is the library programs use to ask for keys through the
//!   kernel.
//! - [`error`] holds the one table from errors to errnos and exit codes.
//!
//! The derivation is specified in DERIVATION.md and frozen as v1.
pub mod audit;
pub mod broker;
pub mod client;
pub mod config;
pub mod csum;
pub mod derive;
pub mod error;
pub mod handler;
pub mod helper;
pub mod keyring;
pub mod netns;
pub mod policy;
pub mod request;
pub mod requester;
pub mod secret;
pub mod setup;
mod sys;
pub mod tpm;
pub mod wire;
