//! Key selectors: one string naming an asymmetric key, for the front ends
//! (SSH agent, PKCS#11 module, `dkey`):
//!
//! ```text
//! [<binding>:]<name>[,<option>=<value>]...
//! ```
//!
//! `<binding>` is `path`, `csum`, `user` or `machine` (default `user`);
//! options are `account`, `client`, `epoch` (validated as in the callout)
//! and `alg=p256|ed25519` (default `p256`), each at most once. A selector
//! names the same key as the equivalent description and callout:
//! `machine:host,epoch=2` is `derived:host:pub` with `p256 machine epoch=2`,
//! `git,alg=ed25519` is `derived:git:pub` with `ed25519 user`.

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

use super::{
    Binding, Digest32, KeyType, Message, Meta, Name, Options, Request, RequestError, Tag, Want,
    MAX_INPUT,
};

/// The algorithm of a selector's key pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Algorithm {
    #[default]
    P256,
    Ed25519,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::P256 => "p256",
            Algorithm::Ed25519 => "ed25519",
        }
    }
}

/// A parsed key selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Selector {
    pub binding: Binding,
    pub name: Name,
    pub options: Options,
    pub alg: Algorithm,
}

impl Selector {
    /// Parses a selector; the errors are the callout's (EINVAL, dkey's
    /// exit 3).
    pub fn parse(s: &str) -> Result<Selector, RequestError> {
        let raw = s.as_bytes();
        if raw.len() > MAX_INPUT {
            return Err(RequestError::TooLong { len: raw.len() });
        }
        let mut parts = s.split(',');
        let head = parts.next().unwrap_or_default();
        let (binding, name) = match head.split_once(':') {
            Some((b, n)) => (Binding::parse(b.as_bytes())?, n),
            None => (Binding::User, head),
        };
        let name = Name::parse(name.as_bytes())?;
        let mut options = Options::default();
        let (mut epoch_seen, mut alg) = (false, None);
        for part in parts {
            let Some((key, value)) = part.split_once('=') else {
                return Err(RequestError::UnknownOption {
                    option: part.escape_default().to_string(),
                });
            };
            match key {
                "account" | "client" => {
                    let (slot, option) = if key == "account" {
                        (&mut options.account, "account")
                    } else {
                        (&mut options.client, "client")
                    };
                    if slot.is_some() {
                        return Err(RequestError::RepeatedOption { option });
                    }
                    *slot = Some(Meta::parse(option, value.as_bytes())?);
                }
                "epoch" => {
                    if std::mem::replace(&mut epoch_seen, true) {
                        return Err(RequestError::RepeatedOption { option: "epoch" });
                    }
                    options.epoch = super::parse_decimal(value.as_bytes())
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| RequestError::BadOptionValue {
                            option: "epoch",
                            value: value.escape_default().to_string(),
                        })?;
                }
                "alg" => {
                    if alg.is_some() {
                        return Err(RequestError::RepeatedOption { option: "alg" });
                    }
                    alg = Some(match value {
                        "p256" => Algorithm::P256,
                        "ed25519" => Algorithm::Ed25519,
                        other => {
                            return Err(RequestError::BadOptionValue {
                                option: "alg",
                                value: other.escape_default().to_string(),
                            })
                        }
                    });
                }
                other => {
                    return Err(RequestError::UnknownOption {
                        option: other.escape_default().to_string(),
                    })
                }
            }
        }
        Ok(Selector {
            binding,
            name,
            options,
            alg: alg.unwrap_or_default(),
        })
    }

    fn request(&self, want: Want, tag: Option<Tag>) -> Request {
        Request {
            key_type: KeyType::User,
            name: self.name.clone(),
            want,
            tag,
            binding: self.binding,
            options: self.options.clone(),
        }
    }

    /// The request for this key's public key (`derived:<name>:pub`, spec
    /// `p256` or `ed25519`).
    pub fn public_key_request(&self, tag: Option<Tag>) -> Result<Request, RequestError> {
        Ok(self.request(Want::PublicKey(self.alg), tag))
    }

    /// The request for this P-256 key's signature over a SHA-256 digest.
    /// An Ed25519 key signs messages, not digests: use
    /// [`Selector::sign_message_request`].
    pub fn sign_request(
        &self,
        digest: [u8; 32],
        tag: Option<Tag>,
    ) -> Result<Request, RequestError> {
        match self.alg {
            Algorithm::P256 => Ok(self.request(Want::Sign(Digest32(digest)), tag)),
            Algorithm::Ed25519 => Err(RequestError::DigestForMessageSigner {
                alg: Algorithm::Ed25519.as_str(),
            }),
        }
    }

    /// The request for this key's signature over `message`: pure Ed25519
    /// over the message itself (1 to 1024 bytes, carried as `msg=`), or
    /// for a P-256 key ECDSA over its SHA-256 digest.
    pub fn sign_message_request(
        &self,
        message: &[u8],
        tag: Option<Tag>,
    ) -> Result<Request, RequestError> {
        let want = match self.alg {
            Algorithm::P256 => Want::Sign(Digest32(sha2::Sha256::digest(message).into())),
            Algorithm::Ed25519 => Want::SignEd25519(Message::new(message)?),
        };
        Ok(self.request(want, tag))
    }
}

impl FromStr for Selector {
    type Err = RequestError;
    fn from_str(s: &str) -> Result<Selector, RequestError> {
        Selector::parse(s)
    }
}

impl fmt::Display for Selector {
    /// The canonical selector: binding always, options in a fixed order,
    /// epoch only if not 0, alg only if not p256.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.binding, self.name.as_str())?;
        if let Some(a) = &self.options.account {
            write!(f, ",account={}", a.as_str())?;
        }
        if let Some(c) = &self.options.client {
            write!(f, ",client={}", c.as_str())?;
        }
        if self.options.epoch != 0 {
            write!(f, ",epoch={}", self.options.epoch)?;
        }
        if self.alg != Algorithm::P256 {
            write!(f, ",alg={}", self.alg.as_str())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Sha256;

    #[test]
    fn the_contract_examples() {
        for (s, canonical) in [
            ("git", "user:git"),
            ("machine:host", "machine:host"),
            ("path:db,epoch=2", "path:db,epoch=2"),
            ("user:git,alg=ed25519", "user:git,alg=ed25519"),
            (
                "csum:x,epoch=0,client=c@d,account=a.b,alg=p256",
                "csum:x,account=a.b,client=c@d",
            ),
        ] {
            let sel = Selector::parse(s).unwrap();
            assert_eq!(sel.to_string(), canonical, "{s}");
            assert_eq!(Selector::parse(canonical).unwrap(), sel, "{s}");
        }
    }

    #[test]
    fn a_selector_is_the_equivalent_description_and_callout() {
        let sel = Selector::parse("machine:host,epoch=2").unwrap();
        let via_selector = sel.public_key_request(None).unwrap();
        let via_kernel_strings = Request::parse(
            b"user",
            b"derived:host:pub",
            b"p256 machine epoch=2",
            "derived",
        )
        .unwrap();
        assert_eq!(via_selector, via_kernel_strings);
        assert_eq!(via_selector.description("derived"), "derived:host:pub");
        assert_eq!(via_selector.callout(), "p256 machine epoch=2");

        let sel = Selector::parse("db,account=a,client=b").unwrap();
        let digest = [0xab; 32];
        let signed = sel.sign_request(digest, None).unwrap();
        let desc = format!("derived:db:sign:{}", hex::encode(digest));
        assert_eq!(
            signed,
            Request::parse(
                b"user",
                desc.as_bytes(),
                b"p256 user account=a client=b",
                "derived"
            )
            .unwrap()
        );
    }

    #[test]
    fn malformed_selectors_are_refused_as_callouts_are() {
        for bad in [
            "",
            ":x",
            "host:",
            "bogus:x",
            "machine:host:pub",
            "a b",
            "x,epoch=01",
            "x,epoch=4294967296",
            "x,epoch=1,epoch=2",
            "x,account=",
            "x,account=a,account=b",
            "x,account=a b",
            "x,alg=rsa",
            "x,alg=p256,alg=p256",
            "x,color=red",
            "x,",
            "x,epoch",
            &"n".repeat(65),
        ] {
            assert!(Selector::parse(bad).is_err(), "{bad:?}");
        }
        let e = Selector::parse("bogus:x").unwrap_err();
        assert!(matches!(e, RequestError::UnknownBinding { .. }), "{e:?}");
    }

    /// `alg=ed25519` names the key of spec `ed25519`: its `:pub`, and its
    /// signature over a message carried as `msg=` under the message's
    /// SHA-256. It signs no bare digest.
    #[test]
    fn ed25519_selectors_are_the_ed25519_description_and_callout() {
        let sel = Selector::parse("machine:git,epoch=3,alg=ed25519").unwrap();
        assert_eq!(sel.alg, Algorithm::Ed25519);
        let public = sel.public_key_request(None).unwrap();
        assert_eq!(
            public,
            Request::parse(
                b"user",
                b"derived:git:pub",
                b"ed25519 machine epoch=3",
                "derived"
            )
            .unwrap()
        );
        assert_eq!(public.callout(), "ed25519 machine epoch=3");

        let signed = sel.sign_message_request(b"hello", None).unwrap();
        let desc = format!("derived:git:sign:{}", hex::encode(Sha256::digest(b"hello")));
        let callout = format!("ed25519 machine epoch=3 msg={}", hex::encode(b"hello"));
        assert_eq!(signed.description("derived"), desc);
        assert_eq!(signed.callout(), callout);
        assert_eq!(
            signed,
            Request::parse(b"user", desc.as_bytes(), callout.as_bytes(), "derived").unwrap()
        );
        assert!(matches!(
            sel.sign_request([0; 32], None),
            Err(RequestError::DigestForMessageSigner { alg: "ed25519" })
        ));
        for bad in [&b""[..], &[7; 1025]] {
            assert!(matches!(
                sel.sign_message_request(bad, None),
                Err(RequestError::MessageLength { .. })
            ));
        }
        assert!(sel.sign_message_request(&[7; 1024], None).is_ok());
        // A P-256 selector signs a message by its digest, as before.
        let p256 = Selector::parse("machine:git,epoch=3").unwrap();
        assert_eq!(
            p256.sign_message_request(b"hello", None).unwrap(),
            p256.sign_request(Sha256::digest(b"hello").into(), None)
                .unwrap()
        );
    }
}
