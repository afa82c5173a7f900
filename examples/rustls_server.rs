//! A TLS server (rustls) whose certificate key is a derived key: the
//! private key never enters this process, and the signature of each
//! handshake is one request through the kernel.
//!
//! ```text
//! cargo run --example rustls_server -- machine:web > web.pem
//! cargo run --example rustls_server -- machine:web,alg=ed25519 127.0.0.1:8443 > web.pem
//! openssl s_client -connect 127.0.0.1:8443 -CAfile web.pem -verify_return_error -servername localhost
//! ```
//!
//! It prints its certificate on stdout: self-signed by the key (an
//! end-entity certificate for DNS:localhost and IP:127.0.0.1, made by
//! `derived_keys::x509`), to be its clients' trust anchor. Each connection
//! gets one line, `hello from <selector>`, and is closed.
//!
//! rustls asks a [`SigningKey`] for a signature scheme and a [`Signer`]
//! for signatures; [`DerivedSigningKey`] answers with the library's
//! RustCrypto signers: ECDSA P-256 with SHA-256 (DER) for a P-256 key,
//! Ed25519 (64 bytes) for an Ed25519 key. rustls hands over the message,
//! not a digest, as both signers want.

use std::error::Error;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use derived_keys::request::Selector;
use derived_keys::signer::DerivedSigner;
use derived_keys::x509::{self, San, Usage};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, SubjectPublicKeyInfoDer};
use rustls::server::{ServerConfig, ServerConnection};
use rustls::sign::{CertifiedKey, Signer, SigningKey, SingleCertAndKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use signature::Signer as _;

/// A derived key as rustls's certificate key.
#[derive(Debug, Clone)]
pub struct DerivedSigningKey {
    signer: DerivedSigner,
}

impl DerivedSigningKey {
    pub fn new(signer: DerivedSigner) -> DerivedSigningKey {
        DerivedSigningKey { signer }
    }

    /// The one scheme the key signs with.
    fn scheme(&self) -> SignatureScheme {
        match self.signer {
            DerivedSigner::P256(_) => SignatureScheme::ECDSA_NISTP256_SHA256,
            DerivedSigner::Ed25519(_) => SignatureScheme::ED25519,
        }
    }
}

impl SigningKey for DerivedSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let scheme = self.scheme();
        offered.contains(&scheme).then(|| {
            Box::new(TlsSigner {
                signer: self.signer.clone(),
                scheme,
            }) as Box<dyn Signer>
        })
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.signer.public_key_der()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        match self.signer {
            DerivedSigner::P256(_) => SignatureAlgorithm::ECDSA,
            DerivedSigner::Ed25519(_) => SignatureAlgorithm::ED25519,
        }
    }
}

/// One handshake's signer, for the scheme chosen.
#[derive(Debug)]
struct TlsSigner {
    signer: DerivedSigner,
    scheme: SignatureScheme,
}

impl Signer for TlsSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let signed = match &self.signer {
            DerivedSigner::P256(s) => s
                .try_sign(message)
                .map(|sig: p256::ecdsa::DerSignature| sig.as_bytes().to_vec()),
            DerivedSigner::Ed25519(s) => s
                .try_sign(message)
                .map(|sig: ed25519_dalek::Signature| sig.to_bytes().to_vec()),
        };
        signed.map_err(|e| rustls::Error::Other(rustls::OtherError(Arc::new(e))))
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

/// The key with a certificate for it (self-signed by it, for localhost),
/// and that certificate as PEM.
pub fn certified_key(signer: DerivedSigner) -> Result<(CertifiedKey, String), Box<dyn Error>> {
    let subject = x509::parse_subject("CN=localhost")?;
    let sans = [
        San::Dns("localhost".into()),
        San::Ip(std::net::Ipv4Addr::LOCALHOST.into()),
    ];
    let pem = x509::self_signed(&signer, &subject, &sans, 30, Usage::EndEntity)?;
    let cert = CertificateDer::from_pem_slice(pem.as_bytes())?;
    let key = CertifiedKey::new(vec![cert], Arc::new(DerivedSigningKey::new(signer)));
    // The certificate's key is the signer's (rustls checks it here, once).
    key.keys_match()?;
    Ok((key, pem))
}

/// A server configuration with TLS 1.2 and 1.3 (ring for TLS's own
/// cryptography) that presents `key`.
pub fn server_config(key: CertifiedKey) -> Result<Arc<ServerConfig>, rustls::Error> {
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(key)));
    Ok(Arc::new(config))
}

/// One connection: the handshake, one line, close_notify.
pub fn serve(config: Arc<ServerConfig>, tcp: TcpStream, line: &str) -> Result<(), Box<dyn Error>> {
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = rustls::StreamOwned::new(ServerConnection::new(config)?, tcp);
    // The first write completes the handshake.
    tls.write_all(line.as_bytes())?;
    tls.conn.send_close_notify();
    tls.flush()?;
    Ok(())
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(selector), listen, None) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: rustls_server <key selector> [<address:port>, default 127.0.0.1:8443]");
        return ExitCode::from(2);
    };
    match run(&selector, listen) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rustls_server: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(selector: &str, listen: Option<String>) -> Result<(), Box<dyn Error>> {
    let sel = Selector::parse(selector)?;
    let (key, pem) = certified_key(DerivedSigner::new(&sel)?)?;
    let config = server_config(key)?;
    let listen = listen.unwrap_or_else(|| "127.0.0.1:8443".into());
    let listener = TcpListener::bind(&listen)?;
    print!("{pem}");
    std::io::stdout().flush()?;
    eprintln!("rustls_server: {selector} on {listen}");
    let line = format!("hello from {selector}\n");
    for tcp in listener.incoming() {
        if let Err(e) = tcp
            .map_err(Box::from)
            .and_then(|t| serve(config.clone(), t, &line))
        {
            eprintln!("rustls_server: connection: {e}");
        }
    }
    Ok(())
}
