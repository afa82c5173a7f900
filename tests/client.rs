//! The library through the real kernel: requests carry fresh tags, land in
//! the process keyring and are invalidated once read.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use common::KernelEnv;
use derived_keys::client::{verify_message, ClientError, KeyRequest};
use derived_keys::request::Binding;

fn keys_with(prefix: &str) -> Vec<String> {
    common::proc_keys()
        .lines()
        // Library requests always carry a #tag; keyctl's here do not.
        .filter(|l| l.contains(&format!(" {prefix}:")) && l.contains('#'))
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|f| !f.contains('i'))
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn symmetric_public_and_signature_through_the_kernel() {
    let env = KernelEnv::new("");
    let r = KeyRequest::new("db")
        .unwrap()
        .binding(Binding::User)
        .prefix(&env.prefix);
    let key = r.symmetric(32).unwrap();
    assert_eq!(
        key.as_ref(),
        env.request("user", "db", "32 user").payload().as_slice()
    );
    assert_eq!(r.symmetric(32).unwrap().as_ref(), key.as_ref());
    assert_ne!(
        r.clone().epoch(1).symmetric(32).unwrap().as_ref(),
        key.as_ref()
    );

    let host = KeyRequest::new("host")
        .unwrap()
        .binding(Binding::Machine)
        .prefix(&env.prefix);
    let spki = host.public_key().unwrap();
    let sig = host.sign_message(b"csr").unwrap();
    assert!(verify_message(&spki, b"csr", &sig));
    assert!(!verify_message(&spki, b"csR", &sig));
    // Nothing is left in any keyring: every result was invalidated once read.
    assert!(
        keys_with(&env.prefix).is_empty(),
        "{:?}",
        keys_with(&env.prefix)
    );
}

#[test]
fn path_binding_is_this_test_program() {
    let dir = common::scratch_dir();
    let sock = dir.path().join("log");
    let rx = std::os::unix::net::UnixDatagram::bind(&sock).unwrap();
    rx.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let env = KernelEnv::new(&format!(
        "[log]\ntarget = \"syslog\"\nsocket = \"{}\"\n",
        sock.display()
    ));
    // The library's default binding.
    let mine = KeyRequest::new("app")
        .unwrap()
        .prefix(&env.prefix)
        .symmetric(16)
        .unwrap();
    // The handler bound it to this very program, by path.
    let mut buf = [0u8; 2048];
    let n = rx.recv(&mut buf).unwrap();
    let line = String::from_utf8_lossy(&buf[..n]);
    let me = std::env::current_exe().unwrap();
    assert!(line.contains("derived-keys: granted uid=0 "), "{line}");
    assert!(
        line.contains(&format!(
            " exe={} name=app op=symmetric:16 binding=path ",
            me.display()
        )),
        "{line}"
    );
    let keyctls = env.request("user", "app", "16 path").payload();
    assert_ne!(
        mine.as_ref(),
        keyctls.as_slice(),
        "another program, another key"
    );
}

#[test]
fn errors_are_typed_by_errno() {
    let env = KernelEnv::new("[bindings]\nmachine_uids = []\n");
    let r = KeyRequest::new("m")
        .unwrap()
        .binding(Binding::Machine)
        .prefix(&env.prefix);
    assert!(matches!(r.symmetric(32), Err(ClientError::Denied { .. })));
    let none = KeyRequest::new("m")
        .unwrap()
        .binding(Binding::User)
        .prefix("dkt-no-rule-here");
    let Err(e) = none.symmetric(32) else {
        panic!("no handler should answer")
    };
    assert!(matches!(e, ClientError::NoHandler { .. }), "{e:?}");
    assert!(e.to_string().contains("dkey status"));
}

#[test]
fn logon_keys_are_kept_for_the_kernel() {
    let env = KernelEnv::new("");
    let k = KeyRequest::new("disk")
        .unwrap()
        .binding(Binding::Machine)
        .prefix(&env.prefix)
        .logon(64, -2)
        .unwrap();
    assert!(k.description.starts_with(&format!("{}:disk#", env.prefix)));
    // Kept: the very key, live (not invalidated) in the process keyring,
    // a logon key...
    let id = format!("{:08x}", k.serial as u32);
    let keys = common::proc_keys();
    let line = keys
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("key {id} not in /proc/keys"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert!(
        fields[1].starts_with('I') && !fields[1].contains('i'),
        "{line}"
    );
    assert_eq!(fields[7], "logon", "{line}");
    assert!(line.contains(&format!(" {}: 64", k.description)), "{line}");
    // ...whose bytes stay in the kernel, even for this process, which
    // possesses it.
    let key = linux_keyutils::Key::from_id(linux_keyutils::KeySerialId::new(k.serial));
    let mut buf = [0u8; 64];
    assert_eq!(
        key.read(&mut buf),
        Err(linux_keyutils::KeyError::OperationNotSupported)
    );
}
