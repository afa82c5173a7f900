//! The TPM bus: a recording proxy between the broker and swtpm (where a
//! probe on a discrete TPM's bus, or an interposer, would sit) sees no PRK,
//! derived key or private scalar while keys of every kind are requested
//! through the kernel; a plain TPM2_HMAC through the same proxy is seen
//! (the search works); the keys through the proxy are the keys without it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use common::{KernelEnv, Swtpm};
use derived_keys::derive::{self, Input, P256Key, Purpose, Subject};
use derived_keys::tpm::{Tcti, Tpm};

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn no_secret_crosses_the_tpm_interface() {
    let swtpm = Swtpm::start();
    let direct = Tcti::parse(&swtpm.tcti()).unwrap();
    let (tcti, log) = common::proxy(&swtpm, std::time::Duration::ZERO);
    let env = KernelEnv::with_tcti(swtpm, &tcti, "");

    // Keys of every kind, through the kernel, the broker and the proxy.
    let digest = [0x5a; 32];
    let sym = env.request("user", "bus", "32 user").payload();
    let machine = env
        .request("user", "bus-m", "64 machine account=a epoch=3")
        .payload();
    let public = env.request("user", "bus-k:pub", "p256 user").payload();
    let sig = env
        .request(
            "user",
            &format!("bus-k:sign:{}", hex::encode(digest)),
            "p256 user",
        )
        .payload();
    let logon = env.request("logon", "bus-l", "32 machine");
    assert!(!matches!(logon, common::Got::Err(_)), "{logon:?}");
    env.stop_broker();
    let seen = log.lock().unwrap().clone();
    assert!(seen.len() > 1000, "the proxy carried the broker's commands");

    // What each request's PRK is, asked of swtpm directly (not through the
    // proxy), and what it gives.
    let mut tpm = Tpm::open(&direct).unwrap();
    let mut prk = |purpose, name, subject, account, epoch| {
        let m = Input {
            purpose,
            name,
            subject,
            account,
            client: None,
            epoch,
        }
        .message();
        tpm.prk(None, &m).unwrap()
    };
    let p_sym = prk(
        Purpose::Symmetric(32),
        "bus",
        Subject::User { uid: 0 },
        None,
        0,
    );
    let p_machine = prk(
        Purpose::Symmetric(64),
        "bus-m",
        Subject::Machine,
        Some("a"),
        3,
    );
    let p_key = prk(Purpose::P256, "bus-k", Subject::User { uid: 0 }, None, 0);
    let p_logon = prk(
        Purpose::KernelSymmetric(32),
        "bus-l",
        Subject::Machine,
        None,
        0,
    );

    // The keys through the proxy are the keys without it.
    assert_eq!(sym, derive::symmetric_key(&p_sym, 32).unwrap().as_ref());
    assert_eq!(
        machine,
        derive::symmetric_key(&p_machine, 64).unwrap().as_ref()
    );
    let key = P256Key::from_prk(&p_key).unwrap();
    assert_eq!(public, key.spki_der().unwrap());
    assert!(derive::verify_digest(&public, &digest, &sig));

    // None of the secrets is on the wire, nor any 16-byte piece of one.
    let scalar = key.secret_scalar().unwrap();
    let logon_key = derive::kernel_symmetric_key(&p_logon, 32).unwrap();
    for (what, secret) in [
        ("PRK of a symmetric key", p_sym.as_bytes()),
        ("PRK of a machine key", p_machine.as_bytes()),
        ("PRK of a P-256 key", p_key.as_bytes()),
        ("PRK of a logon key", p_logon.as_bytes()),
        ("a symmetric key", &sym[..]),
        ("a machine key", &machine[..]),
        ("a logon key", logon_key.as_ref()),
        ("a P-256 private scalar", scalar.as_ref()),
    ] {
        for piece in secret.chunks(16) {
            assert!(!contains(&seen, piece), "{what} crossed the TPM interface");
        }
    }

    // Positive control: a plain TPM2_HMAC (password session, no
    // encryption) through the same proxy is found by the same search.
    let dir = common::scratch_dir();
    let ctx = dir.path().join("p.ctx");
    let tool = |args: &[&str]| {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .env("TPM2TOOLS_TCTI", &tcti)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    tool(&[
        "tpm2_createprimary",
        "-C",
        "o",
        "-G",
        "hmac",
        "-g",
        "sha256",
        "-a",
        "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|sign",
        "-c",
        ctx.to_str().unwrap(),
    ]);
    let input = dir.path().join("in");
    let output = dir.path().join("out");
    std::fs::write(&input, [0x42; 32]).unwrap();
    tool(&[
        "tpm2_hmac",
        "-c",
        ctx.to_str().unwrap(),
        "-g",
        "sha256",
        "-o",
        output.to_str().unwrap(),
        input.to_str().unwrap(),
    ]);
    tool(&["tpm2_flushcontext", "-t"]);
    let plain = std::fs::read(&output).unwrap();
    assert_eq!(plain.len(), 32);
    assert!(
        contains(&log.lock().unwrap(), &plain),
        "the search finds an HMAC that is not encrypted"
    );
}

#[test]
fn a_tpm_presenting_another_salt_key_is_refused_and_the_right_one_works() {
    let swtpm = Swtpm::start();
    let tcti = Tcti::parse(&swtpm.tcti()).unwrap();
    let name = hex::encode(Tpm::open(&tcti).unwrap().salt_key_name(None).unwrap());
    assert_eq!(name.len(), 68, "a SHA-256 Name: 000b and 32 bytes");
    assert!(name.starts_with("000b"));
    // The Name is the same every time: it is what install pins.
    assert_eq!(
        hex::encode(Tpm::open(&tcti).unwrap().salt_key_name(None).unwrap()),
        name
    );
    // The documented template, made by tpm2-tools (DERIVATION.md): the
    // same Name, so anyone can check the pin.
    let dir = common::scratch_dir();
    let ctx = dir.path().join("salt.ctx");
    let name_file = dir.path().join("salt.name");
    swtpm.tool(&[
        "tpm2_createprimary",
        "-C",
        "o",
        "-G",
        "ecc256:aes128cfb",
        "-a",
        "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|restricted|decrypt",
        "-c",
        ctx.to_str().unwrap(),
    ]);
    swtpm.tool(&[
        "tpm2_readpublic",
        "-c",
        ctx.to_str().unwrap(),
        "-n",
        name_file.to_str().unwrap(),
    ]);
    swtpm.tool(&["tpm2_flushcontext", "-t"]);
    assert_eq!(hex::encode(std::fs::read(&name_file).unwrap()), name);
    let wrong = format!("000b{}", "00".repeat(32));
    let mut env = KernelEnv::with_tcti(
        swtpm,
        &tcti.to_string(),
        &format!("salt_key_name = \"{wrong}\"\n"),
    );
    assert_eq!(env.request("user", "pin", "32 user").errno(), libc::EIO);

    let conf = std::fs::read_to_string(&env.conf)
        .unwrap()
        .replace(&wrong, &name);
    env.write_conf(&conf);
    let key = env.request("user", "pin#2", "32 user").payload();
    // A TPM restarted under a running broker: its session is gone; the
    // next request re-establishes it and gets the same key.
    env.swtpm.restart();
    assert_eq!(env.request("user", "pin#3", "32 user").payload(), key);
    env.stop_broker();
    let mut tpm = Tpm::open(&tcti).unwrap();
    assert_eq!(tpm.transient_count().unwrap(), 0, "no object left");
    assert_eq!(tpm.session_count().unwrap(), 0, "no session left");
}
