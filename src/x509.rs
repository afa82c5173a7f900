//! Enrollment: PKCS#10 certificate requests and self-signed X.509
//! certificates signed by a derived key (P-256 or Ed25519), through
//! [`crate::signer`]. Only this module uses x509-cert.

use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use x509_cert::builder::{Builder, CertificateBuilder, Profile, RequestBuilder};
use x509_cert::der::asn1::{Ia5String, OctetString};
use x509_cert::der::{pem::LineEnding, EncodePem};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::{
    DynSignatureAlgorithmIdentifier, EncodePublicKey, SignatureBitStringEncoding,
    SubjectPublicKeyInfoOwned,
};
use x509_cert::time::Validity;

use crate::client::ClientError;
use crate::signer::{DerivedSigner, Ed25519BitString};

/// Why no request or certificate came out.
#[derive(Debug, thiserror::Error)]
pub enum X509Error {
    #[error(
        "subject {subject:?} is not an RFC 4514 distinguished name with at least one attribute"
    )]
    BadSubject { subject: String },
    #[error("SAN {san:?}: expected DNS:<name> or IP:<address>")]
    BadSan { san: String },
    #[error("--days must be 1 to 36500, not {days}")]
    Days { days: u32 },
    #[error("building the structure: {0}")]
    Build(#[from] x509_cert::builder::Error),
    #[error("encoding: {0}")]
    Der(#[from] x509_cert::der::Error),
    #[error("public key: {0}")]
    Spki(#[from] x509_cert::spki::Error),
    #[error("no randomness for the serial number")]
    NoRandomness,
}

impl X509Error {
    /// EINVAL for bad input (dkey's usage exit 3), the request's errno if
    /// the kernel refused the signature (EINVAL for an Ed25519 structure
    /// over the 1024 bytes a message may have), EIO otherwise.
    pub fn errno(&self) -> i32 {
        match self {
            X509Error::BadSubject { .. } | X509Error::BadSan { .. } | X509Error::Days { .. } => {
                libc::EINVAL
            }
            X509Error::Build(x509_cert::builder::Error::Signature(e)) => {
                std::error::Error::source(e)
                    .and_then(|s| s.downcast_ref::<ClientError>())
                    .map_or(libc::EIO, ClientError::errno)
            }
            _ => libc::EIO,
        }
    }
}

/// What a self-signed certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A root CA (basicConstraints cA, keyCertSign and cRLSign): a trust
    /// anchor for the certificates its key signs (`dkey cert --ca`).
    Ca,
    /// An end-entity certificate (cA false, digitalSignature), such as a
    /// TLS server's that is its own trust anchor: what `dkey cert` prints.
    /// A root CA's profile forbids the signatures TLS makes with the key:
    /// GnuTLS then refuses to serve it, and webpki (rustls) refuses a CA
    /// certificate as a server's.
    EndEntity,
}

/// A subject alternative name, parsed at the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum San {
    Dns(String),
    Ip(IpAddr),
}

impl FromStr for San {
    type Err = X509Error;
    fn from_str(s: &str) -> Result<San, X509Error> {
        let bad = || X509Error::BadSan { san: s.to_owned() };
        match s.split_once(':') {
            Some(("DNS", name))
                if !name.is_empty()
                    && name.len() <= 253
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-.*".contains(&b)) =>
            {
                Ok(San::Dns(name.to_owned()))
            }
            Some(("IP", ip)) => ip.parse().map(San::Ip).map_err(|_| bad()),
            _ => Err(bad()),
        }
    }
}

/// An RFC 4514 name with at least one attribute (the last RDN written
/// comes first in the DER, as RFC 4514 says).
pub fn parse_subject(s: &str) -> Result<Name, X509Error> {
    let name = Name::from_str(s).map_err(|_| X509Error::BadSubject {
        subject: s.to_owned(),
    })?;
    if name.0.is_empty() || name.0.iter().any(|rdn| rdn.0.is_empty()) {
        return Err(X509Error::BadSubject {
            subject: s.to_owned(),
        });
    }
    Ok(name)
}

fn san_extension(sans: &[San]) -> Result<Option<SubjectAltName>, X509Error> {
    if sans.is_empty() {
        return Ok(None);
    }
    let names = sans
        .iter()
        .map(|s| {
            Ok(match s {
                San::Dns(d) => GeneralName::DnsName(Ia5String::new(d)?),
                San::Ip(IpAddr::V4(a)) => GeneralName::IpAddress(OctetString::new(a.octets())?),
                San::Ip(IpAddr::V6(a)) => GeneralName::IpAddress(OctetString::new(a.octets())?),
            })
        })
        .collect::<Result<Vec<_>, x509_cert::der::Error>>()?;
    Ok(Some(SubjectAltName(names)))
}

/// A PEM PKCS#10 certificate request for `subject`, signed by the key.
pub fn csr(signer: &DerivedSigner, subject: &Name, sans: &[San]) -> Result<String, X509Error> {
    match signer {
        DerivedSigner::P256(s) => csr_by::<_, p256::ecdsa::DerSignature>(s, subject, sans),
        DerivedSigner::Ed25519(s) => csr_by::<_, Ed25519BitString>(s, subject, sans),
    }
}

fn csr_by<S, Sig>(signer: &S, subject: &Name, sans: &[San]) -> Result<String, X509Error>
where
    S: signature::Keypair + DynSignatureAlgorithmIdentifier + signature::Signer<Sig>,
    S::VerifyingKey: EncodePublicKey,
    Sig: SignatureBitStringEncoding,
{
    let mut b = RequestBuilder::new(subject.clone(), signer)?;
    if let Some(san) = san_extension(sans)? {
        b.add_extension(&san)?;
    }
    let req = b.build::<Sig>()?;
    Ok(req.to_pem(LineEnding::LF)?)
}

/// A PEM self-signed certificate for `subject`, valid from now for `days`,
/// with the profile `usage` says.
pub fn self_signed(
    signer: &DerivedSigner,
    subject: &Name,
    sans: &[San],
    days: u32,
    usage: Usage,
) -> Result<String, X509Error> {
    if !(1..=36_500).contains(&days) {
        return Err(X509Error::Days { days });
    }
    let profile = match usage {
        Usage::Ca => Profile::Root,
        Usage::EndEntity => Profile::Leaf {
            issuer: subject.clone(),
            enable_key_agreement: false,
            enable_key_encipherment: false,
        },
    };
    let cert = match signer {
        DerivedSigner::P256(s) => {
            self_signed_by::<_, p256::ecdsa::DerSignature>(s, profile, subject, sans, days)
        }
        DerivedSigner::Ed25519(s) => {
            self_signed_by::<_, Ed25519BitString>(s, profile, subject, sans, days)
        }
    }?;
    Ok(cert.to_pem(LineEnding::LF)?)
}

fn self_signed_by<S, Sig>(
    signer: &S,
    profile: Profile,
    subject: &Name,
    sans: &[San],
    days: u32,
) -> Result<x509_cert::Certificate, X509Error>
where
    S: signature::Keypair + DynSignatureAlgorithmIdentifier + signature::Signer<Sig>,
    S::VerifyingKey: EncodePublicKey,
    Sig: SignatureBitStringEncoding,
{
    let mut serial = [0u8; 16];
    getrandom::getrandom(&mut serial).map_err(|_| X509Error::NoRandomness)?;
    serial[0] &= 0x7f; // positive, as RFC 5280 wants
    let spki = SubjectPublicKeyInfoOwned::from_key(signer.verifying_key())?;
    let mut b = CertificateBuilder::new(
        profile,
        SerialNumber::new(&serial)?,
        Validity::from_now(Duration::from_secs(u64::from(days) * 86_400))?,
        subject.clone(),
        spki,
        signer,
    )?;
    if let Some(san) = san_extension(sans)? {
        b.add_extension(&san)?;
    }
    Ok(b.build::<Sig>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_sans_are_parsed_at_the_edge() {
        let n = parse_subject("CN=host.example,O=Example,C=DE").unwrap();
        // RFC 4514: the last RDN in the string is the first in the DER.
        assert_eq!(n.0.len(), 3);
        assert_eq!(n.to_string(), "CN=host.example,O=Example,C=DE");
        for bad in ["", "CN", "=x", "XX=1", "CN=a,,O=b"] {
            assert!(parse_subject(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            "DNS:a.example".parse::<San>().unwrap(),
            San::Dns("a.example".into())
        );
        assert_eq!(
            "IP:192.0.2.1".parse::<San>().unwrap(),
            San::Ip("192.0.2.1".parse().unwrap())
        );
        assert!("IP:::1".parse::<San>().is_ok());
        for bad in [
            "a.example",
            "DNS:",
            "dns:a",
            "IP:300.1.1.1",
            "URI:x",
            "DNS:a b",
        ] {
            assert!(bad.parse::<San>().is_err(), "{bad:?}");
        }
    }
}
