//! derived-keys: stable per-application keys derived from a TPM.
pub mod derive;
pub mod request;
pub mod secret;
mod sys;
pub mod tpm;
