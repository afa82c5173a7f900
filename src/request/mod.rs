//! The contract's request grammar, parsed once at the edge into types.
//!
//! ```text
//! description: <prefix>:<name>[:pub | :sign:<sha256-hex>][#<tag>]
//! callout:     <spec> <binding> [option=value ...]     (single spaces)
//! ```
//!
//! `<spec>` is a length, `p256` or `ed25519`. An Ed25519 `:sign:` carries the
//! message itself in the callout (`msg=<hex>`, pure RFC 8032 signs messages,
//! not digests), and the description's digest must be its SHA-256: the
//! parsed [`Want::SignEd25519`] holds the message, and the digest is
//! recomputed from it, never stored beside it.
//!
//! Nothing downstream looks at the raw strings again. `Display` on the typed
//! values gives back the canonical strings, which the client library uses.

use std::fmt;

use sha2::{Digest as _, Sha256};

pub mod selector;

pub use selector::{Algorithm, Selector};

/// The description prefix of production requests.
pub const DEFAULT_PREFIX: &str = "derived";

/// Inputs longer than this are refused before any other parsing. The kernel
/// allows 4095-byte descriptions; nothing valid here comes close.
pub const MAX_INPUT: usize = 4096;

/// Largest message an Ed25519 `:sign:` carries (`msg=`, 2048 hex digits):
/// with the longest options the callout stays well inside [`MAX_INPUT`] and
/// the handler's `wire::MAX_CALLOUT` (the kernel's one page).
pub const MAX_MESSAGE: usize = 1024;

/// Why a description or callout was refused. Every variant means EINVAL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("input of {len} bytes is longer than {MAX_INPUT}")]
    TooLong { len: usize },
    #[error("description does not start with \"{prefix}:\"")]
    BadPrefix { prefix: String },
    #[error("key name {name:?} is not 1 to 64 characters of A-Z a-z 0-9 . _ -")]
    BadName { name: String },
    #[error("tag {tag:?} is not 1 to 32 characters of A-Z a-z 0-9")]
    BadTag { tag: String },
    #[error("unknown operation {op:?}: expected nothing, \":pub\" or \":sign:<sha256-hex>\"")]
    BadOperation { op: String },
    #[error("digest {digest:?} is not 64 lowercase hex digits")]
    BadDigest { digest: String },
    #[error("callout is not \"<spec> <binding> [option=value ...]\" with single spaces")]
    BadCallout,
    #[error("spec {spec:?} is neither a length from 1 to 1024 nor \"p256\" nor \"ed25519\"")]
    BadSpec { spec: String },
    #[error("unknown binding {binding:?}: expected path, csum, user or machine")]
    UnknownBinding { binding: String },
    #[error("unknown option {option:?}: expected account, client, epoch or msg")]
    UnknownOption { option: String },
    #[error("option {option} given more than once")]
    RepeatedOption { option: &'static str },
    #[error("option {option} has an invalid value {value:?}")]
    BadOptionValue { option: &'static str, value: String },
    #[error("{operation} needs spec {expected}")]
    SpecMismatch {
        operation: &'static str,
        expected: &'static str,
    },
    #[error("key type logon is for symmetric keys only, not {operation}")]
    LogonNotSymmetric { operation: &'static str },
    #[error("key type {key_type:?} is not served: expected user or logon")]
    UnsupportedKeyType { key_type: String },
    #[error("msg {value:?} ({hex_len} characters) is not an even number of lowercase hex digits")]
    BadMessageHex { value: String, hex_len: usize },
    #[error("a message of {len} bytes is outside 1 to {MAX_MESSAGE}")]
    MessageLength { len: usize },
    #[error("msg= is only for an Ed25519 :sign:, not for {operation}")]
    MessageNotAllowed { operation: &'static str },
    #[error("an Ed25519 :sign: needs msg=<hex>: it signs the message itself")]
    MissingMessage,
    #[error("digest {digest} is not the SHA-256 of msg ({sha256})")]
    DigestMismatch { digest: String, sha256: String },
    #[error("{alg} signs the message itself (pure RFC 8032), not a digest")]
    DigestForMessageSigner { alg: &'static str },
}

impl RequestError {
    /// Every malformed request is EINVAL.
    pub fn errno(&self) -> i32 {
        libc::EINVAL
    }
}

/// Shows at most 80 characters of untrusted input, escaped, in errors.
fn shown(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(80)];
    let mut s = cut.escape_ascii().to_string();
    if bytes.len() > 80 {
        s.push('…');
    }
    s
}

fn all_in(bytes: &[u8], extra: &[u8]) -> bool {
    bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || extra.contains(b))
}

/// A key name: 1 to 64 characters of `A-Z a-z 0-9 . _ -`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Name(String);

impl Name {
    pub fn parse(s: &[u8]) -> Result<Name, RequestError> {
        if (1..=64).contains(&s.len()) && all_in(s, b"._-") {
            Ok(Name(String::from_utf8_lossy(s).into_owned()))
        } else {
            Err(RequestError::BadName { name: shown(s) })
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A `#<tag>`: 1 to 32 characters of `A-Z a-z 0-9`. Never a derivation input.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tag(String);

impl Tag {
    pub fn parse(s: &[u8]) -> Result<Tag, RequestError> {
        if (1..=32).contains(&s.len()) && all_in(s, b"") {
            Ok(Tag(String::from_utf8_lossy(s).into_owned()))
        } else {
            Err(RequestError::BadTag { tag: shown(s) })
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A SHA-256 digest to sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest32(pub [u8; 32]);

impl Digest32 {
    /// Exactly 64 lowercase hex digits.
    pub fn parse_hex(s: &[u8]) -> Result<Digest32, RequestError> {
        let bad = || RequestError::BadDigest { digest: shown(s) };
        if s.len() != 64
            || !s
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| bad())?;
        Ok(Digest32(out))
    }
}

impl fmt::Display for Digest32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// The message an Ed25519 signature is over: 1 to [`MAX_MESSAGE`] bytes.
/// Not key material and not a derivation input; its SHA-256 is what the
/// description names. Debug shows its length only, so that a caller's
/// message does not end up whole in a log line.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Message(Vec<u8>);

impl Message {
    /// Takes 1 to [`MAX_MESSAGE`] bytes.
    pub fn new(bytes: &[u8]) -> Result<Message, RequestError> {
        if (1..=MAX_MESSAGE).contains(&bytes.len()) {
            Ok(Message(bytes.to_vec()))
        } else {
            Err(RequestError::MessageLength { len: bytes.len() })
        }
    }

    /// The `msg=` value: an even number of lowercase hex digits, 2 to
    /// 2048 of them. Uppercase is refused, as in digests: one message has
    /// one spelling, so a callout has one canonical form.
    pub fn parse_hex(s: &[u8]) -> Result<Message, RequestError> {
        let bad = || RequestError::BadMessageHex {
            value: shown(s),
            hex_len: s.len(),
        };
        if s.len() % 2 != 0
            || !s
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        {
            return Err(bad());
        }
        if !(1..=MAX_MESSAGE).contains(&(s.len() / 2)) {
            return Err(RequestError::MessageLength { len: s.len() / 2 });
        }
        hex::decode(s).map(Message).map_err(|_| bad())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// SHA-256 of the message: the digest its description carries.
    pub fn digest(&self) -> Digest32 {
        Digest32(Sha256::digest(&self.0).into())
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Message({} bytes)", self.0.len())
    }
}

impl fmt::Display for Message {
    /// The canonical `msg=` value: lowercase hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0))
    }
}

/// What the description asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Symmetric,
    PublicKey,
    Sign(Digest32),
}

impl Operation {
    pub fn label(&self) -> &'static str {
        match self {
            Operation::Symmetric => "symmetric",
            Operation::PublicKey => "pub",
            Operation::Sign(_) => "sign",
        }
    }
}

/// A parsed description.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Description {
    pub prefix: String,
    pub name: Name,
    pub operation: Operation,
    pub tag: Option<Tag>,
}

impl Description {
    /// Parses `<prefix>:<name>[:pub|:sign:<hex>][#<tag>]`.
    pub fn parse(raw: &[u8], prefix: &str) -> Result<Description, RequestError> {
        if raw.len() > MAX_INPUT {
            return Err(RequestError::TooLong { len: raw.len() });
        }
        let rest = raw
            .strip_prefix(prefix.as_bytes())
            .and_then(|r| r.strip_prefix(b":"))
            .ok_or_else(|| RequestError::BadPrefix {
                prefix: prefix.to_owned(),
            })?;
        let (body, tag) = match rest.iter().position(|&b| b == b'#') {
            Some(i) => (&rest[..i], Some(Tag::parse(&rest[i + 1..])?)),
            None => (rest, None),
        };
        let mut parts = body.splitn(3, |&b| b == b':');
        let name = Name::parse(parts.next().unwrap_or_default())?;
        let operation = match (parts.next(), parts.next()) {
            (None, _) => Operation::Symmetric,
            (Some(b"pub"), None) => Operation::PublicKey,
            (Some(b"sign"), Some(hex)) => Operation::Sign(Digest32::parse_hex(hex)?),
            (Some(op), _) => {
                return Err(RequestError::BadOperation { op: shown(op) });
            }
        };
        Ok(Description {
            prefix: prefix.to_owned(),
            name,
            operation,
            tag,
        })
    }
}

impl fmt::Display for Description {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.prefix, self.name)?;
        match &self.operation {
            Operation::Symmetric => {}
            Operation::PublicKey => f.write_str(":pub")?,
            Operation::Sign(d) => write!(f, ":sign:{d}")?,
        }
        if let Some(t) = &self.tag {
            write!(f, "#{}", t.as_str())?;
        }
        Ok(())
    }
}

/// Symmetric length, or the algorithm of a key pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Spec {
    /// 1 to 1024 bytes.
    Length(u16),
    P256,
    Ed25519,
}

pub const MAX_SYMMETRIC_LEN: u16 = 1024;

/// A canonical decimal: digits only, no sign, no leading zero (but "0").
fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 10 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if s.len() > 1 && s[0] == b'0' {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

impl Spec {
    pub fn parse(s: &[u8]) -> Result<Spec, RequestError> {
        match s {
            b"p256" => return Ok(Spec::P256),
            b"ed25519" => return Ok(Spec::Ed25519),
            _ => {}
        }
        match parse_decimal(s) {
            Some(n) if (1..=u64::from(MAX_SYMMETRIC_LEN)).contains(&n) => {
                Ok(Spec::Length(n as u16))
            }
            _ => Err(RequestError::BadSpec { spec: shown(s) }),
        }
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Spec::Length(n) => write!(f, "{n}"),
            Spec::P256 => f.write_str("p256"),
            Spec::Ed25519 => f.write_str("ed25519"),
        }
    }
}

impl From<Algorithm> for Spec {
    fn from(alg: Algorithm) -> Spec {
        match alg {
            Algorithm::P256 => Spec::P256,
            Algorithm::Ed25519 => Spec::Ed25519,
        }
    }
}

/// Whose key it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Binding {
    Path,
    Csum,
    User,
    Machine,
}

impl Binding {
    pub const ALL: [Binding; 4] = [
        Binding::Path,
        Binding::Csum,
        Binding::User,
        Binding::Machine,
    ];

    pub fn parse(s: &[u8]) -> Result<Binding, RequestError> {
        match s {
            b"path" => Ok(Binding::Path),
            b"csum" => Ok(Binding::Csum),
            b"user" => Ok(Binding::User),
            b"machine" => Ok(Binding::Machine),
            _ => Err(RequestError::UnknownBinding { binding: shown(s) }),
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Binding::Path => "path",
            Binding::Csum => "csum",
            Binding::User => "user",
            Binding::Machine => "machine",
        }
    }
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An `account=` or `client=` value: 1 to 128 of `A-Z a-z 0-9 . _ @ + -`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Meta(String);

impl Meta {
    pub fn parse(option: &'static str, s: &[u8]) -> Result<Meta, RequestError> {
        if (1..=128).contains(&s.len()) && all_in(s, b"._@+-") {
            Ok(Meta(String::from_utf8_lossy(s).into_owned()))
        } else {
            Err(RequestError::BadOptionValue {
                option,
                value: shown(s),
            })
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The options of a callout, each at most once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Options {
    pub account: Option<Meta>,
    pub client: Option<Meta>,
    pub epoch: u32,
}

/// A parsed callout.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Callout {
    pub spec: Spec,
    pub binding: Binding,
    pub options: Options,
    /// `msg=`: the message of an Ed25519 `:sign:` (refused elsewhere by
    /// [`Request::from_parts`]). Apart from [`Options`]: it is no
    /// derivation input and no part of a key's name.
    pub msg: Option<Message>,
}

impl Callout {
    pub fn parse(raw: &[u8]) -> Result<Callout, RequestError> {
        if raw.len() > MAX_INPUT {
            return Err(RequestError::TooLong { len: raw.len() });
        }
        let mut words = raw.split(|&b| b == b' ');
        let (Some(spec), Some(binding)) = (words.next(), words.next()) else {
            return Err(RequestError::BadCallout);
        };
        if spec.is_empty() || binding.is_empty() {
            return Err(RequestError::BadCallout);
        }
        let spec = Spec::parse(spec)?;
        let binding = Binding::parse(binding)?;
        let mut options = Options::default();
        let mut epoch_seen = false;
        let mut msg = None;
        for word in words {
            let Some(eq) = word.iter().position(|&b| b == b'=') else {
                if word.is_empty() {
                    return Err(RequestError::BadCallout);
                }
                return Err(RequestError::UnknownOption {
                    option: shown(word),
                });
            };
            let (key, value) = (&word[..eq], &word[eq + 1..]);
            match key {
                b"account" => set_once(&mut options.account, "account", value)?,
                b"client" => set_once(&mut options.client, "client", value)?,
                b"epoch" => {
                    if epoch_seen {
                        return Err(RequestError::RepeatedOption { option: "epoch" });
                    }
                    epoch_seen = true;
                    options.epoch = parse_decimal(value)
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| RequestError::BadOptionValue {
                            option: "epoch",
                            value: shown(value),
                        })?;
                }
                b"msg" => {
                    if msg.is_some() {
                        return Err(RequestError::RepeatedOption { option: "msg" });
                    }
                    msg = Some(Message::parse_hex(value)?);
                }
                _ => return Err(RequestError::UnknownOption { option: shown(key) }),
            }
        }
        Ok(Callout {
            spec,
            binding,
            options,
            msg,
        })
    }
}

fn set_once(
    slot: &mut Option<Meta>,
    option: &'static str,
    value: &[u8],
) -> Result<(), RequestError> {
    if slot.is_some() {
        return Err(RequestError::RepeatedOption { option });
    }
    *slot = Some(Meta::parse(option, value)?);
    Ok(())
}

impl fmt::Display for Callout {
    /// The canonical callout: options in a fixed order, epoch only if not
    /// 0, msg last.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.spec, self.binding)?;
        if let Some(a) = &self.options.account {
            write!(f, " account={}", a.as_str())?;
        }
        if let Some(c) = &self.options.client {
            write!(f, " client={}", c.as_str())?;
        }
        if self.options.epoch != 0 {
            write!(f, " epoch={}", self.options.epoch)?;
        }
        if let Some(m) = &self.msg {
            write!(f, " msg={m}")?;
        }
        Ok(())
    }
}

/// The kernel key type the result goes into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// Readable by possessors.
    User,
    /// Usable only inside the kernel (dm-crypt, encrypted keys).
    Logon,
}

impl KeyType {
    pub fn parse(s: &[u8]) -> Result<KeyType, RequestError> {
        match s {
            b"user" => Ok(KeyType::User),
            b"logon" => Ok(KeyType::Logon),
            _ => Err(RequestError::UnsupportedKeyType { key_type: shown(s) }),
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyType::User => "user",
            KeyType::Logon => "logon",
        }
    }
}

/// What a request asks the handler to compute, after parsing. Each variant
/// carries exactly what its result needs (the symmetric length, the
/// algorithm, the digest or the message), so spec, operation and `msg=`
/// cannot disagree downstream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Want {
    Symmetric {
        len: u16,
    },
    /// The public key of a P-256 or Ed25519 key pair.
    PublicKey(Algorithm),
    /// An ECDSA P-256 signature over a SHA-256 digest.
    Sign(Digest32),
    /// A pure Ed25519 signature over the message itself; the description's
    /// digest was its SHA-256 ([`Message::digest`] gives it back).
    SignEd25519(Message),
}

impl Want {
    /// Signatures expire from the keyring (the configured timeout).
    pub fn is_signature(&self) -> bool {
        matches!(self, Want::Sign(_) | Want::SignEd25519(_))
    }
}

/// A whole request: key type, description and callout, cross-checked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Request {
    pub key_type: KeyType,
    pub name: Name,
    pub want: Want,
    pub tag: Option<Tag>,
    pub binding: Binding,
    pub options: Options,
}

impl Request {
    /// Parses and cross-checks the three strings the kernel gives.
    pub fn parse(
        key_type: &[u8],
        description: &[u8],
        callout: &[u8],
        prefix: &str,
    ) -> Result<Request, RequestError> {
        let key_type = KeyType::parse(key_type)?;
        let d = Description::parse(description, prefix)?;
        let c = Callout::parse(callout)?;
        Request::from_parts(key_type, d, c)
    }

    pub fn from_parts(
        key_type: KeyType,
        d: Description,
        c: Callout,
    ) -> Result<Request, RequestError> {
        let want = match (d.operation, c.spec, c.msg) {
            (Operation::Sign(digest), Spec::Ed25519, Some(msg)) => {
                let sha256 = msg.digest();
                if sha256 != digest {
                    return Err(RequestError::DigestMismatch {
                        digest: digest.to_string(),
                        sha256: sha256.to_string(),
                    });
                }
                Want::SignEd25519(msg)
            }
            (Operation::Sign(_), Spec::Ed25519, None) => return Err(RequestError::MissingMessage),
            (op, spec, Some(_)) => {
                return Err(RequestError::MessageNotAllowed {
                    operation: match (op, spec) {
                        (Operation::Symmetric, _) | (_, Spec::Length(_)) => "a symmetric key",
                        (Operation::PublicKey, _) => ":pub",
                        _ => "a P-256 :sign:",
                    },
                })
            }
            (Operation::Symmetric, Spec::Length(len), None) => Want::Symmetric { len },
            (Operation::Symmetric, Spec::P256 | Spec::Ed25519, None) => {
                return Err(RequestError::SpecMismatch {
                    operation: "a symmetric key",
                    expected: "a length from 1 to 1024",
                })
            }
            (Operation::PublicKey, Spec::P256, None) => Want::PublicKey(Algorithm::P256),
            (Operation::PublicKey, Spec::Ed25519, None) => Want::PublicKey(Algorithm::Ed25519),
            (Operation::Sign(digest), Spec::P256, None) => Want::Sign(digest),
            (op, Spec::Length(_), None) => {
                return Err(RequestError::SpecMismatch {
                    operation: if matches!(op, Operation::PublicKey) {
                        ":pub"
                    } else {
                        ":sign:"
                    },
                    expected: "p256 or ed25519",
                })
            }
        };
        if key_type == KeyType::Logon && !matches!(want, Want::Symmetric { .. }) {
            return Err(RequestError::LogonNotSymmetric {
                operation: d.operation.label(),
            });
        }
        Ok(Request {
            key_type,
            name: d.name,
            want,
            tag: d.tag,
            binding: c.binding,
            options: c.options,
        })
    }

    /// The operation as the audit log names it, e.g. `symmetric:32`,
    /// `pub`, `sign:ed25519` (P-256 keeps its plain `pub` and `sign`).
    /// Never the message.
    pub fn operation_label(&self) -> String {
        match &self.want {
            Want::Symmetric { len } => format!("symmetric:{len}"),
            Want::PublicKey(Algorithm::P256) => "pub".to_owned(),
            Want::PublicKey(Algorithm::Ed25519) => "pub:ed25519".to_owned(),
            Want::Sign(_) => "sign".to_owned(),
            Want::SignEd25519(_) => "sign:ed25519".to_owned(),
        }
    }

    /// The description this request is asked under.
    pub fn description(&self, prefix: &str) -> String {
        let operation = match &self.want {
            Want::Symmetric { .. } => Operation::Symmetric,
            Want::PublicKey(_) => Operation::PublicKey,
            Want::Sign(d) => Operation::Sign(*d),
            Want::SignEd25519(m) => Operation::Sign(m.digest()),
        };
        Description {
            prefix: prefix.to_owned(),
            name: self.name.clone(),
            operation,
            tag: self.tag.clone(),
        }
        .to_string()
    }

    /// The canonical callout of this request (with `msg=` for an Ed25519
    /// signature).
    pub fn callout(&self) -> String {
        let (spec, msg) = match &self.want {
            Want::Symmetric { len } => (Spec::Length(*len), None),
            Want::PublicKey(alg) => (Spec::from(*alg), None),
            Want::Sign(_) => (Spec::P256, None),
            Want::SignEd25519(m) => (Spec::Ed25519, Some(m.clone())),
        };
        Callout {
            spec,
            binding: self.binding,
            options: self.options.clone(),
            msg,
        }
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(t: &str, d: &str, c: &str) -> Result<Request, RequestError> {
        Request::parse(t.as_bytes(), d.as_bytes(), c.as_bytes(), DEFAULT_PREFIX)
    }

    const HEX: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn contract_examples_parse() {
        let r = req("user", "derived:db", "32 path").unwrap();
        assert_eq!(r.want, Want::Symmetric { len: 32 });
        assert_eq!(r.binding, Binding::Path);
        assert_eq!(r.name.as_str(), "db");
        assert_eq!(r.tag, None);

        let r = req("user", "derived:db#k3x9", "32 path").unwrap();
        assert_eq!(r.tag.as_ref().map(Tag::as_str), Some("k3x9"));

        let r = req("user", "derived:host-id:pub", "p256 machine").unwrap();
        assert_eq!(r.want, Want::PublicKey(Algorithm::P256));

        let d = format!("derived:ssh_1.x:sign:{HEX}#abc");
        let r = req(
            "user",
            &d,
            "p256 csum account=alice@example.com client=a+b epoch=7",
        )
        .unwrap();
        assert!(matches!(r.want, Want::Sign(_)));
        assert_eq!(r.options.epoch, 7);
        assert_eq!(
            r.options.account.as_ref().unwrap().as_str(),
            "alice@example.com"
        );
        assert_eq!(r.description(DEFAULT_PREFIX), d);
        assert_eq!(
            r.callout(),
            "p256 csum account=alice@example.com client=a+b epoch=7"
        );

        let r = req("logon", "derived:disk", "1024 machine epoch=4294967295").unwrap();
        assert_eq!(r.key_type, KeyType::Logon);
        assert_eq!(r.options.epoch, u32::MAX);
    }

    #[test]
    fn names_and_tags_have_bounds() {
        let n64 = "a".repeat(64);
        assert!(req("user", &format!("derived:{n64}"), "1 user").is_ok());
        let n65 = "a".repeat(65);
        assert!(matches!(
            req("user", &format!("derived:{n65}"), "1 user"),
            Err(RequestError::BadName { .. })
        ));
        assert!(matches!(
            req("user", "derived:", "1 user"),
            Err(RequestError::BadName { .. })
        ));
        assert!(matches!(
            req("user", "derived:a b", "1 user"),
            Err(RequestError::BadName { .. })
        ));
        assert!(matches!(
            req("user", "derived:a/b", "1 user"),
            Err(RequestError::BadName { .. })
        ));
        let t32 = "Z".repeat(32);
        assert!(req("user", &format!("derived:a#{t32}"), "1 user").is_ok());
        for bad in [
            "derived:a#",
            "derived:a#a-b",
            "derived:a#x#y",
            &format!("derived:a#{t32}Z"),
        ] {
            assert!(
                matches!(req("user", bad, "1 user"), Err(RequestError::BadTag { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn descriptions_are_strict() {
        for (d, want) in [
            ("derivedx:a", "prefix"),
            ("other:a", "prefix"),
            ("derived", "prefix"),
            ("derived:a:pubx", "op"),
            ("derived:a:pub:x", "op"),
            ("derived:a:sign", "op"),
            ("derived:a:", "op"),
        ] {
            let e = req("user", d, "p256 user").unwrap_err();
            let ok = match want {
                "prefix" => matches!(e, RequestError::BadPrefix { .. }),
                _ => matches!(e, RequestError::BadOperation { .. }),
            };
            assert!(ok, "{d}: {e:?}");
        }
        let upper = HEX.to_uppercase();
        for digest in [
            &HEX[..63],
            &format!("{HEX}0"),
            &upper,
            &format!("{}g", &HEX[..63]),
        ] {
            let d = format!("derived:a:sign:{digest}");
            assert!(
                matches!(
                    req("user", &d, "p256 user"),
                    Err(RequestError::BadDigest { .. })
                ),
                "{d}"
            );
        }
    }

    #[test]
    fn callouts_are_strict() {
        use RequestError::*;
        type Check = fn(&RequestError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, BadCallout)),
            ("32", |e| matches!(e, BadCallout)),
            ("32  path", |e| matches!(e, BadCallout)),
            (" 32 path", |e| matches!(e, BadCallout)),
            ("32 path ", |e| matches!(e, BadCallout)),
            ("0 path", |e| matches!(e, BadSpec { .. })),
            ("1025 path", |e| matches!(e, BadSpec { .. })),
            ("032 path", |e| matches!(e, BadSpec { .. })),
            ("+32 path", |e| matches!(e, BadSpec { .. })),
            ("p384 path", |e| matches!(e, BadSpec { .. })),
            ("32 group", |e| matches!(e, UnknownBinding { .. })),
            ("32 path foo=1", |e| matches!(e, UnknownOption { .. })),
            ("32 path epoch", |e| matches!(e, UnknownOption { .. })),
            ("32 path epoch=1 epoch=1", |e| {
                matches!(e, RepeatedOption { option: "epoch" })
            }),
            ("32 path account=a account=a", |e| {
                matches!(e, RepeatedOption { option: "account" })
            }),
            ("32 path client=a client=b", |e| {
                matches!(e, RepeatedOption { option: "client" })
            }),
            ("32 path epoch=4294967296", |e| {
                matches!(
                    e,
                    BadOptionValue {
                        option: "epoch",
                        ..
                    }
                )
            }),
            ("32 path epoch=-1", |e| matches!(e, BadOptionValue { .. })),
            ("32 path epoch=", |e| matches!(e, BadOptionValue { .. })),
            ("32 path account=", |e| matches!(e, BadOptionValue { .. })),
            ("32 path account=a/b", |e| {
                matches!(e, BadOptionValue { .. })
            }),
            ("32 path client=a=b", |e| matches!(e, BadOptionValue { .. })),
            ("p256 path", |e| matches!(e, SpecMismatch { .. })),
        ];
        for (c, check) in cases {
            let e = req("user", "derived:a", c).unwrap_err();
            assert!(check(&e), "{c:?}: {e:?}");
        }
        let long = "a".repeat(129);
        assert!(req("user", "derived:a", &format!("1 user account={long}")).is_err());
        assert!(req(
            "user",
            "derived:a",
            &format!("1 user account={}", &long[..128])
        )
        .is_ok());
    }

    #[test]
    fn cross_checks() {
        assert!(matches!(
            req("user", "derived:a:pub", "32 user"),
            Err(RequestError::SpecMismatch { .. })
        ));
        assert!(matches!(
            req("logon", "derived:a:pub", "p256 user"),
            Err(RequestError::LogonNotSymmetric { .. })
        ));
        let d = format!("derived:a:sign:{HEX}");
        assert!(matches!(
            req("logon", &d, "p256 user"),
            Err(RequestError::LogonNotSymmetric { .. })
        ));
        assert!(matches!(
            req("big_key", "derived:a", "1 user"),
            Err(RequestError::UnsupportedKeyType { .. })
        ));
    }

    #[test]
    fn hostile_bytes_are_refused_not_panicked_on() {
        let inputs: [&[u8]; 6] = [
            b"derived:\xff\xfe",
            b"derived:a\0b",
            b"derived:a#\xc3\xa9",
            b"\0",
            &[b'a'; 5000],
            b"derived:a:sign:\xff",
        ];
        for d in inputs {
            assert!(Request::parse(b"user", d, b"1 user", DEFAULT_PREFIX).is_err());
            assert!(Request::parse(b"user", b"derived:a", d, DEFAULT_PREFIX).is_err());
        }
        assert!(matches!(
            Callout::parse(&[b'1'; 5000]),
            Err(RequestError::TooLong { len: 5000 })
        ));
    }

    /// `ed25519` for `:pub` and `:sign:`; a signature carries `msg=` whose
    /// SHA-256 the description names; every malformation is refused.
    #[test]
    fn ed25519_requests() {
        use RequestError::*;
        let r = req("user", "derived:git:pub", "ed25519 user").unwrap();
        assert_eq!(r.want, Want::PublicKey(Algorithm::Ed25519));
        assert_eq!(r.callout(), "ed25519 user");
        assert_eq!(r.operation_label(), "pub:ed25519");

        let msg = b"hello";
        let digest = hex::encode(Sha256::digest(msg));
        let d = format!("derived:git:sign:{digest}#t1");
        let c = "ed25519 machine account=a client=b epoch=9 msg=68656c6c6f";
        let r = req("user", &d, c).unwrap();
        assert_eq!(r.want, Want::SignEd25519(Message::new(msg).unwrap()));
        assert_eq!(r.description(DEFAULT_PREFIX), d);
        assert_eq!(r.callout(), c, "msg is part of the canonical callout");
        assert_eq!(r.operation_label(), "sign:ed25519");
        assert!(r.want.is_signature());
        assert!(!format!("{r:?}").contains("68656c6c6f"), "Debug hides msg");

        // The largest message and the longest options still fit the
        // handler's callout buffer.
        let m1024 = "ab".repeat(MAX_MESSAGE);
        let long = "x".repeat(128);
        let c =
            format!("ed25519 machine account={long} client={long} epoch=4294967295 msg={m1024}");
        assert!(c.len() <= crate::wire::MAX_CALLOUT && c.len() <= MAX_INPUT);
        let d = format!(
            "derived:git:sign:{}",
            hex::encode(Sha256::digest([0xab; MAX_MESSAGE]))
        );
        assert!(req("user", &d, &c).is_ok());

        type Check = fn(&RequestError) -> bool;
        let sign = |m: &[u8]| format!("derived:git:sign:{}", hex::encode(Sha256::digest(m)));
        let hello = sign(b"hello");
        let cases: Vec<(&str, String, String, Check)> = vec![
            // The digest is not the message's.
            (
                "user",
                sign(b"hellO"),
                "ed25519 user msg=68656c6c6f".into(),
                |e| matches!(e, DigestMismatch { .. }),
            ),
            // Empty, too long, odd, uppercase, not hex.
            ("user", sign(b""), "ed25519 user msg=".into(), |e| {
                matches!(e, MessageLength { len: 0 })
            }),
            (
                "user",
                sign(&[0xab; 1025]),
                format!("ed25519 user msg={}", "ab".repeat(1025)),
                |e| matches!(e, MessageLength { len: 1025 }),
            ),
            (
                "user",
                hello.clone(),
                "ed25519 user msg=68656c6c6".into(),
                |e| matches!(e, BadMessageHex { .. }),
            ),
            (
                "user",
                hello.clone(),
                "ed25519 user msg=68656C6C6F".into(),
                |e| matches!(e, BadMessageHex { .. }),
            ),
            (
                "user",
                hello.clone(),
                "ed25519 user msg=68656c6c6g".into(),
                |e| matches!(e, BadMessageHex { .. }),
            ),
            (
                "user",
                hello.clone(),
                "ed25519 user msg=+8656c6c6f".into(),
                |e| matches!(e, BadMessageHex { .. }),
            ),
            (
                "user",
                hello.clone(),
                "ed25519 user msg=68656c6c6f msg=68656c6c6f".into(),
                |e| matches!(e, RepeatedOption { option: "msg" }),
            ),
            // msg where it has no place.
            (
                "user",
                hello.clone(),
                "p256 user msg=68656c6c6f".into(),
                |e| matches!(e, MessageNotAllowed { .. }),
            ),
            (
                "user",
                "derived:git".into(),
                "32 user msg=68656c6c6f".into(),
                |e| matches!(e, MessageNotAllowed { .. }),
            ),
            (
                "user",
                "derived:git:pub".into(),
                "ed25519 user msg=68656c6c6f".into(),
                |e| matches!(e, MessageNotAllowed { .. }),
            ),
            (
                "user",
                "derived:git:pub".into(),
                "p256 user msg=68656c6c6f".into(),
                |e| matches!(e, MessageNotAllowed { .. }),
            ),
            // No msg on an Ed25519 signature.
            ("user", hello.clone(), "ed25519 user".into(), |e| {
                matches!(e, MissingMessage)
            }),
            // logon is for symmetric keys only.
            (
                "logon",
                "derived:git:pub".into(),
                "ed25519 user".into(),
                |e| matches!(e, LogonNotSymmetric { .. }),
            ),
            (
                "logon",
                hello.clone(),
                "ed25519 user msg=68656c6c6f".into(),
                |e| matches!(e, LogonNotSymmetric { .. }),
            ),
            // ed25519 is no symmetric spec, nor a length an Ed25519 spec.
            ("user", "derived:git".into(), "ed25519 user".into(), |e| {
                matches!(e, SpecMismatch { .. })
            }),
            ("user", "derived:git:pub".into(), "32 user".into(), |e| {
                matches!(e, SpecMismatch { .. })
            }),
            (
                "user",
                "derived:git:pub".into(),
                "Ed25519 user".into(),
                |e| matches!(e, BadSpec { .. }),
            ),
        ];
        for (t, d, c, check) in &cases {
            let e = req(t, d, c).unwrap_err();
            assert!(check(&e), "{t} {d} {c}: {e:?}");
            assert_eq!(e.errno(), libc::EINVAL);
        }
    }

    #[test]
    fn custom_prefix() {
        let r = Request::parse(b"user", b"dkt42:db", b"8 user", "dkt42").unwrap();
        assert_eq!(r.description("dkt42"), "dkt42:db");
        assert!(Request::parse(b"user", b"derived:db", b"8 user", "dkt42").is_err());
    }
}
