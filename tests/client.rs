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
    let env = KernelEnv::new("");
    let mine = KeyRequest::new("app")
        .unwrap()
        .prefix(&env.prefix)
        .symmetric(16)
        .unwrap();
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
    let desc = common::proc_keys();
    assert!(desc.contains(&k.description[..k.description.len().min(20)]));
}
