//! derived-keys: stable per-application keys derived from a TPM, served
//! through the Linux request-key upcall, with nothing stored on disk.
//!
//! Architecture, edges first:
//!
//! - [`request`], [`config`], [`requester`] (its parsers), [`policy`] and
//!   [`derive`] are pure: strings become types, types become decisions and
//!   key bytes. They need neither a kernel nor a TPM to test.
//! - [`tpm`] is the only module that uses tss-esapi; [`keyring`] the only
//!   one that uses keyctl/linux-keyutils; `sys` the only one with `unsafe`.
//! - [`handler`] is the request-key handler's flow; [`broker`] keeps the
//!   TPM primary loaded for it (the handler itself never loads the TPM
//!   stack); [`client`] is the library programs use to ask for keys
//!   through the kernel.
//! - [`error`] holds the one table from errors to errnos and exit codes.
//!
//! The derivation is specified in DERIVATION.md and frozen as v1.
pub mod audit;
pub mod broker;
pub mod client;
pub mod config;
pub mod derive;
pub mod error;
pub mod handler;
pub mod keyring;
pub mod policy;
pub mod request;
pub mod requester;
pub mod secret;
pub mod setup;
mod sys;
pub mod tpm;
