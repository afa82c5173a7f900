//! The one home of everything the static, `no_std` request-key handler
//! (`derived-key-helper`) and the `derived-keys` library share: both
//! compile this crate, so a format or a table cannot drift between them.
//!
//! - [`handler_args`]: the handler's command line, typed.
//! - [`proc_keys`]: the authorization key's line in /proc/keys (which
//!   names the requester), found in chunks in bounded memory, forgeries
//!   counted (the broker's scan; kept here, where nothing allocates).
//! - [`wire`]: the handler–broker protocol.
//! - [`audit_line`]: the audit line's format and its one escaping.
//! - [`errno`]: the contract's errnos and their names.
//! - [`runtime`]: where a broker's runtime files are; bounded text.
//!
//! `core` only: no allocation, no I/O, no `unsafe`.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod audit_line;
pub mod errno;
pub mod handler_args;
pub mod proc_keys;
pub mod runtime;
pub mod session;
pub mod wire;
