//! Enrollment: PKCS#10 certificate requests and self-signed X.509
//! certificates signed by a derived key, through [`crate::signer`]. Only
//! this module uses x509-cert.

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
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::Validity;

use crate::signer::P256Signer;

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
    /// EINVAL for bad input (dkey's usage exit 3), EIO otherwise.
    pub fn errno(&self) -> i32 {
        match self {
            X509Error::BadSubject { .. } | X509Error::BadSan { .. } | X509Error::Days { .. } => {
                libc::EINVAL
            }
            _ => libc::EIO,
        }
    }
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
pub fn csr(signer: &P256Signer, subject: &Name, sans: &[San]) -> Result<String, X509Error> {
    let mut b = RequestBuilder::new(subject.clone(), signer)?;
    if let Some(san) = san_extension(sans)? {
        b.add_extension(&san)?;
    }
    let req = b.build::<p256::ecdsa::DerSignature>()?;
    Ok(req.to_pem(LineEnding::LF)?)
}

/// A PEM self-signed certificate for `subject`, valid from now for `days`.
pub fn self_signed(
    signer: &P256Signer,
    subject: &Name,
    sans: &[San],
    days: u32,
) -> Result<String, X509Error> {
    if !(1..=36_500).contains(&days) {
        return Err(X509Error::Days { days });
    }
    let mut serial = [0u8; 16];
    getrandom::getrandom(&mut serial).map_err(|_| X509Error::NoRandomness)?;
    serial[0] &= 0x7f; // positive, as RFC 5280 wants
    let spki = SubjectPublicKeyInfoOwned::from_key(signature::Keypair::verifying_key(signer))?;
    let mut b = CertificateBuilder::new(
        Profile::Root,
        SerialNumber::new(&serial)?,
        Validity::from_now(Duration::from_secs(u64::from(days) * 86_400))?,
        subject.clone(),
        spki,
        signer,
    )?;
    if let Some(san) = san_extension(sans)? {
        b.add_extension(&san)?;
    }
    let cert = b.build::<p256::ecdsa::DerSignature>()?;
    Ok(cert.to_pem(LineEnding::LF)?)
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
