//! The C ABI as a consumer sees it, without the kernel: argument checks,
//! length queries, re-initialisation, sessions, threads, fork, and the
//! attributes that need no public key. One test function: the module's
//! state is process-global, as PKCS#11's is.

// A test is a C caller: it dereferences what the module gives it.
#![allow(clippy::undocumented_unsafe_blocks, clippy::unwrap_used, clippy::panic)]

use std::ptr::null_mut;

use cryptoki_sys::*;
use derived_keys_pkcs11::C_GetFunctionList;

fn list() -> &'static CK_FUNCTION_LIST {
    let mut p = null_mut();
    assert_eq!(unsafe { C_GetFunctionList(&mut p) }, CKR_OK);
    assert!(!p.is_null());
    unsafe { &*p }
}

macro_rules! call {
    ($f:ident ( $($a:expr),* $(,)? )) => {
        unsafe { (list().$f.unwrap())($($a),*) }
    };
}

fn attr(ty: CK_ATTRIBUTE_TYPE, v: &mut [u8]) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE {
        type_: ty,
        pValue: v.as_mut_ptr().cast(),
        ulValueLen: v.len() as CK_ULONG,
    }
}

fn find(s: CK_SESSION_HANDLE, template: &mut [CK_ATTRIBUTE]) -> Vec<CK_OBJECT_HANDLE> {
    assert_eq!(
        call!(C_FindObjectsInit(
            s,
            template.as_mut_ptr(),
            template.len() as CK_ULONG
        )),
        CKR_OK
    );
    let mut out = Vec::new();
    loop {
        let mut buf = [0 as CK_OBJECT_HANDLE; 3];
        let mut n = 0;
        assert_eq!(call!(C_FindObjects(s, buf.as_mut_ptr(), 3, &mut n)), CKR_OK);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
    assert_eq!(call!(C_FindObjectsFinal(s)), CKR_OK);
    out
}

/// An attribute's value, after a length query.
fn get(
    s: CK_SESSION_HANDLE,
    o: CK_OBJECT_HANDLE,
    ty: CK_ATTRIBUTE_TYPE,
) -> Result<Vec<u8>, (CK_RV, CK_ULONG)> {
    let mut a = CK_ATTRIBUTE {
        type_: ty,
        pValue: null_mut(),
        ulValueLen: 0,
    };
    let rv = call!(C_GetAttributeValue(s, o, &mut a, 1));
    if rv != CKR_OK {
        return Err((rv, a.ulValueLen));
    }
    let mut v = vec![0u8; a.ulValueLen as usize];
    if !v.is_empty() {
        // Too small first: CKR_BUFFER_TOO_SMALL, the length unavailable.
        let mut small = CK_ATTRIBUTE {
            type_: ty,
            pValue: v.as_mut_ptr().cast(),
            ulValueLen: a.ulValueLen - 1,
        };
        assert_eq!(
            call!(C_GetAttributeValue(s, o, &mut small, 1)),
            CKR_BUFFER_TOO_SMALL
        );
        assert_eq!(small.ulValueLen, CK_UNAVAILABLE_INFORMATION);
    }
    let mut full = CK_ATTRIBUTE {
        type_: ty,
        pValue: v.as_mut_ptr().cast(),
        ulValueLen: a.ulValueLen,
    };
    assert_eq!(call!(C_GetAttributeValue(s, o, &mut full, 1)), CKR_OK);
    Ok(v)
}

fn ulong(v: &[u8]) -> CK_ULONG {
    CK_ULONG::from_ne_bytes(v.try_into().unwrap())
}

unsafe extern "C" fn create_mutex(m: *mut *mut std::os::raw::c_void) -> CK_RV {
    unsafe { *m = std::ptr::dangling_mut() };
    CKR_OK
}
unsafe extern "C" fn mutex_op(_: *mut std::os::raw::c_void) -> CK_RV {
    CKR_OK
}

#[test]
fn the_abi_behaves_as_pkcs11_says() {
    assert_eq!(unsafe { C_GetFunctionList(null_mut()) }, CKR_ARGUMENTS_BAD);
    let fl = list();
    assert_eq!((fl.version.major, fl.version.minor), (2, 40));
    // Every entry is a function (none NULL), unsupported ones refuse.
    let entries = (std::mem::size_of::<CK_FUNCTION_LIST>() - 8) / 8;
    let words = unsafe {
        std::slice::from_raw_parts(
            (fl as *const CK_FUNCTION_LIST as *const u8).add(8) as *const usize,
            entries,
        )
    };
    assert_eq!(entries, 68);
    assert!(words.iter().all(|&w| w != 0));
    assert_eq!(
        call!(C_GenerateRandom(1, null_mut(), 0)),
        CKR_FUNCTION_NOT_SUPPORTED
    );
    assert_eq!(
        call!(C_SignUpdate(1, null_mut(), 0)),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );
    assert_eq!(
        call!(C_SignFinal(1, null_mut(), null_mut())),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );
    assert_eq!(
        call!(C_Encrypt(1, null_mut(), 0, null_mut(), null_mut())),
        CKR_FUNCTION_NOT_SUPPORTED
    );

    // Not initialised yet.
    let mut count: CK_ULONG = 0;
    assert_eq!(
        call!(C_GetSlotList(CK_TRUE, null_mut(), &mut count)),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );
    assert_eq!(call!(C_Finalize(null_mut())), CKR_CRYPTOKI_NOT_INITIALIZED);

    // C_Initialize: malformed arguments, locking callbacks, twice,
    // re-initialisation after C_Finalize. The configuration lists two
    // keys (one twice, in another spelling).
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("derived-keys.conf");
    std::fs::write(
        &conf,
        "[pkcs11]\nkeys = [\"machine:a\", \"user:b,alg=ed25519\", \"machine:a,epoch=0\"]\n",
    )
    .unwrap();
    std::env::set_var("DERIVED_KEYS_PKCS11_CONFIG", &conf);
    std::env::set_var("DERIVED_KEYS_PKCS11_PREFIX", "dk-no-such-prefix");
    let mut args = CK_C_INITIALIZE_ARGS {
        CreateMutex: Some(create_mutex),
        DestroyMutex: None,
        LockMutex: None,
        UnlockMutex: None,
        flags: 0,
        pReserved: null_mut(),
    };
    assert_eq!(
        call!(C_Initialize(
            (&mut args as *mut CK_C_INITIALIZE_ARGS).cast()
        )),
        CKR_ARGUMENTS_BAD
    );
    args.DestroyMutex = Some(mutex_op);
    args.LockMutex = Some(mutex_op);
    args.UnlockMutex = Some(mutex_op);
    args.pReserved = std::ptr::dangling_mut();
    assert_eq!(
        call!(C_Initialize(
            (&mut args as *mut CK_C_INITIALIZE_ARGS).cast()
        )),
        CKR_ARGUMENTS_BAD
    );
    args.pReserved = null_mut();
    args.flags = CKF_OS_LOCKING_OK;
    assert_eq!(
        call!(C_Initialize(
            (&mut args as *mut CK_C_INITIALIZE_ARGS).cast()
        )),
        CKR_OK
    );
    assert_eq!(
        call!(C_Initialize(null_mut())),
        CKR_CRYPTOKI_ALREADY_INITIALIZED
    );
    assert_eq!(
        call!(C_Finalize(std::ptr::dangling_mut())),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(call!(C_Finalize(null_mut())), CKR_OK);
    assert_eq!(call!(C_Initialize(null_mut())), CKR_OK);

    // C_GetInfo, slots and token.
    assert_eq!(call!(C_GetInfo(null_mut())), CKR_ARGUMENTS_BAD);
    let mut info = CK_INFO::default();
    assert_eq!(call!(C_GetInfo(&mut info)), CKR_OK);
    assert_eq!(info.cryptokiVersion.major, 2);
    assert_eq!(
        call!(C_GetSlotList(CK_TRUE, null_mut(), null_mut())),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(C_GetSlotList(CK_TRUE, null_mut(), &mut count)),
        CKR_OK
    );
    assert_eq!(count, 1);
    let mut slots = [99 as CK_SLOT_ID; 2];
    count = 0;
    assert_eq!(
        call!(C_GetSlotList(CK_TRUE, slots.as_mut_ptr(), &mut count)),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(count, 1);
    count = 2;
    assert_eq!(
        call!(C_GetSlotList(CK_TRUE, slots.as_mut_ptr(), &mut count)),
        CKR_OK
    );
    assert_eq!((count, slots[0]), (1, 0));
    let mut slot = CK_SLOT_INFO::default();
    assert_eq!(call!(C_GetSlotInfo(0, &mut slot)), CKR_OK);
    assert_ne!(slot.flags & CKF_TOKEN_PRESENT, 0);
    assert_eq!(call!(C_GetSlotInfo(1, &mut slot)), CKR_SLOT_ID_INVALID);
    let mut token: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
    assert_eq!(call!(C_GetTokenInfo(0, null_mut())), CKR_ARGUMENTS_BAD);
    assert_eq!(call!(C_GetTokenInfo(1, &mut token)), CKR_SLOT_ID_INVALID);
    assert_eq!(call!(C_GetTokenInfo(0, &mut token)), CKR_OK);
    assert_eq!(&token.label, format!("{:<32}", "derived-keys").as_bytes());
    assert_ne!(token.flags & CKF_TOKEN_INITIALIZED, 0);
    assert_eq!(token.flags & CKF_LOGIN_REQUIRED, 0);

    // Mechanisms.
    count = 0;
    assert_eq!(call!(C_GetMechanismList(0, null_mut(), &mut count)), CKR_OK);
    assert_eq!(count, 3);
    let mut mechs = [0 as CK_MECHANISM_TYPE; 3];
    count = 2;
    assert_eq!(
        call!(C_GetMechanismList(0, mechs.as_mut_ptr(), &mut count)),
        CKR_BUFFER_TOO_SMALL
    );
    count = 3;
    assert_eq!(
        call!(C_GetMechanismList(0, mechs.as_mut_ptr(), &mut count)),
        CKR_OK
    );
    assert_eq!(mechs, [CKM_ECDSA, CKM_ECDSA_SHA256, CKM_EDDSA]);
    let mut mi = CK_MECHANISM_INFO::default();
    assert_eq!(
        call!(C_GetMechanismInfo(0, CKM_ECDSA_SHA256, &mut mi)),
        CKR_OK
    );
    assert_ne!(mi.flags & CKF_SIGN, 0);
    assert_eq!(
        call!(C_GetMechanismInfo(0, CKM_RSA_PKCS, &mut mi)),
        CKR_MECHANISM_INVALID
    );
    assert_eq!(
        call!(C_GetMechanismInfo(0, CKM_EDDSA, null_mut())),
        CKR_ARGUMENTS_BAD
    );

    // Sessions: flags, bound, login states.
    let mut s: CK_SESSION_HANDLE = 0;
    assert_eq!(
        call!(C_OpenSession(0, 0, null_mut(), None, &mut s)),
        CKR_SESSION_PARALLEL_NOT_SUPPORTED
    );
    assert_eq!(
        call!(C_OpenSession(
            0,
            CKF_SERIAL_SESSION,
            null_mut(),
            None,
            null_mut()
        )),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(C_OpenSession(
            3,
            CKF_SERIAL_SESSION,
            null_mut(),
            None,
            &mut s
        )),
        CKR_SLOT_ID_INVALID
    );
    let mut all = Vec::new();
    for _ in 0..64 {
        assert_eq!(
            call!(C_OpenSession(
                0,
                CKF_SERIAL_SESSION,
                null_mut(),
                None,
                &mut s
            )),
            CKR_OK
        );
        all.push(s);
    }
    assert_eq!(
        call!(C_OpenSession(
            0,
            CKF_SERIAL_SESSION,
            null_mut(),
            None,
            &mut s
        )),
        CKR_SESSION_COUNT
    );
    assert_eq!(call!(C_CloseSession(all[0])), CKR_OK);
    assert_eq!(call!(C_CloseSession(all[0])), CKR_SESSION_HANDLE_INVALID);
    assert_eq!(call!(C_CloseAllSessions(0)), CKR_OK);
    assert_eq!(
        call!(C_OpenSession(
            0,
            CKF_SERIAL_SESSION | CKF_RW_SESSION,
            null_mut(),
            None,
            &mut s
        )),
        CKR_OK
    );
    let mut si = CK_SESSION_INFO::default();
    assert_eq!(call!(C_GetSessionInfo(s, null_mut())), CKR_ARGUMENTS_BAD);
    assert_eq!(call!(C_GetSessionInfo(s, &mut si)), CKR_OK);
    assert_eq!(si.state, CKS_RW_PUBLIC_SESSION);
    assert_eq!(call!(C_Login(s, CKU_USER, null_mut(), 0)), CKR_OK);
    assert_eq!(
        call!(C_Login(s, CKU_USER, b"1234".as_ptr() as *mut _, 4)),
        CKR_USER_ALREADY_LOGGED_IN
    );
    assert_eq!(call!(C_GetSessionInfo(s, &mut si)), CKR_OK);
    assert_eq!(si.state, CKS_RW_USER_FUNCTIONS);
    assert_eq!(call!(C_Logout(s)), CKR_OK);
    assert_eq!(call!(C_Logout(s)), CKR_USER_NOT_LOGGED_IN);

    // Objects: the configured list, filters, a label, an ID.
    assert_eq!(find(s, &mut []).len(), 4);
    let mut class = CKO_PUBLIC_KEY.to_ne_bytes();
    let publics = find(s, &mut [attr(CKA_CLASS, &mut class)]);
    assert_eq!(publics.len(), 2);
    let mut ed = CKK_EC_EDWARDS.to_ne_bytes();
    assert_eq!(find(s, &mut [attr(CKA_KEY_TYPE, &mut ed)]).len(), 2);
    let mut cert = CKO_CERTIFICATE.to_ne_bytes();
    assert!(find(s, &mut [attr(CKA_CLASS, &mut cert)]).is_empty());
    let mut label = b"machine:web".to_vec();
    let mut private = CKO_PRIVATE_KEY.to_ne_bytes();
    let web = find(
        s,
        &mut [attr(CKA_LABEL, &mut label), attr(CKA_CLASS, &mut private)],
    );
    assert_eq!(web.len(), 1);
    let web_pub = find(
        s,
        &mut [attr(CKA_LABEL, &mut label), attr(CKA_CLASS, &mut class)],
    );
    assert_eq!(web_pub.len(), 1);
    let mut bad = b"no/such".to_vec();
    assert!(find(s, &mut [attr(CKA_LABEL, &mut bad)]).is_empty());
    // CKA_ID is the canonical selector: an ID finds its pair without a
    // label, configured or not (OpenSSH and GnuTLS search by CKA_ID).
    let mut id = get(s, web[0], CKA_ID).unwrap();
    assert_eq!(id, b"machine:web");
    assert_eq!(find(s, &mut [attr(CKA_ID, &mut id)]), [web[0], web_pub[0]]);
    assert_eq!(
        find(
            s,
            &mut [attr(CKA_CLASS, &mut private), attr(CKA_ID, &mut id)]
        ),
        web
    );
    let mut sign_true = [CK_TRUE];
    assert_eq!(
        find(
            s,
            &mut [
                attr(CKA_CLASS, &mut private),
                attr(CKA_ID, &mut id),
                attr(CKA_SIGN, &mut sign_true)
            ]
        ),
        web
    );
    // Only the canonical spelling is an ID; a label may be any spelling.
    let mut other_spelling = b"machine:web,epoch=0".to_vec();
    assert!(find(s, &mut [attr(CKA_ID, &mut other_spelling)]).is_empty());
    assert_eq!(
        find(s, &mut [attr(CKA_LABEL, &mut other_spelling)]).len(),
        2
    );
    let mut id_a = {
        let a = find(s, &mut [attr(CKA_LABEL, &mut b"machine:a".to_vec())]);
        get(s, a[0], CKA_ID).unwrap()
    };
    assert_eq!(id_a, b"machine:a");
    assert_eq!(find(s, &mut [attr(CKA_ID, &mut id_a)]).len(), 2);
    // Attributes that do not match find nothing: another pair's ID with
    // a label, a value the object does not have, one it has not at all,
    // a sensitive one, an ID that is no selector.
    assert!(find(
        s,
        &mut [attr(CKA_LABEL, &mut label), attr(CKA_ID, &mut id_a)]
    )
    .is_empty());
    let mut sign_false = [CK_FALSE];
    assert!(find(
        s,
        &mut [attr(CKA_ID, &mut id), attr(CKA_SIGN, &mut sign_false)]
    )
    .is_empty());
    let mut ec = CKK_EC.to_ne_bytes();
    assert_eq!(find(s, &mut [attr(CKA_KEY_TYPE, &mut ec)]).len(), 2);
    assert!(find(s, &mut [attr(CKA_ID, &mut id), attr(CKA_KEY_TYPE, &mut ed)]).is_empty());
    let mut modulus = [1u8; 4];
    assert!(find(
        s,
        &mut [attr(CKA_CLASS, &mut class), attr(CKA_MODULUS, &mut modulus)]
    )
    .is_empty());
    let mut value = [0u8; 32];
    assert!(find(
        s,
        &mut [attr(CKA_LABEL, &mut label), attr(CKA_VALUE, &mut value)]
    )
    .is_empty());
    assert!(find(s, &mut [attr(CKA_ID, &mut [0xff; 16])]).is_empty());
    let mut short_class = [1u8];
    assert!(find(s, &mut [attr(CKA_CLASS, &mut short_class)]).is_empty());
    assert_eq!(
        call!(C_FindObjectsInit(s, null_mut(), 1)),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(call!(C_FindObjectsInit(s, null_mut(), 0)), CKR_OK);
    assert_eq!(
        call!(C_FindObjectsInit(s, null_mut(), 0)),
        CKR_OPERATION_ACTIVE
    );
    assert_eq!(
        call!(C_FindObjects(s, null_mut(), 1, &mut count)),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(C_FindObjects(s, [0; 1].as_mut_ptr(), 1, null_mut())),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(call!(C_FindObjectsFinal(s)), CKR_OK);
    assert_eq!(call!(C_FindObjectsFinal(s)), CKR_OPERATION_NOT_INITIALIZED);

    // Attributes.
    let k = web[0];
    assert_eq!(ulong(&get(s, k, CKA_CLASS).unwrap()), CKO_PRIVATE_KEY);
    assert_eq!(ulong(&get(s, k, CKA_KEY_TYPE).unwrap()), CKK_EC);
    assert_eq!(get(s, k, CKA_LABEL).unwrap(), b"machine:web");
    assert_eq!(
        get(s, k, CKA_ID).unwrap(),
        get(s, web_pub[0], CKA_ID).unwrap()
    );
    for (ty, want) in [
        (CKA_TOKEN, 1),
        (CKA_SIGN, 1),
        (CKA_SENSITIVE, 1),
        (CKA_EXTRACTABLE, 0),
        (CKA_PRIVATE, 0),
    ] {
        assert_eq!(get(s, k, ty).unwrap(), [want], "attribute {ty:#x}");
    }
    assert_eq!(get(s, web_pub[0], CKA_VERIFY).unwrap(), [1]);
    assert_eq!(
        get(s, k, CKA_EC_PARAMS).unwrap(),
        [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]
    );
    assert_eq!(
        get(s, k, CKA_MODULUS),
        Err((CKR_ATTRIBUTE_TYPE_INVALID, CK_UNAVAILABLE_INFORMATION))
    );
    assert_eq!(
        get(s, k, CKA_VALUE),
        Err((CKR_ATTRIBUTE_SENSITIVE, CK_UNAVAILABLE_INFORMATION))
    );
    let mut two = [
        CK_ATTRIBUTE {
            type_: CKA_MODULUS,
            pValue: null_mut(),
            ulValueLen: 0,
        },
        CK_ATTRIBUTE {
            type_: CKA_CLASS,
            pValue: null_mut(),
            ulValueLen: 0,
        },
    ];
    assert_eq!(
        call!(C_GetAttributeValue(s, k, two.as_mut_ptr(), 2)),
        CKR_ATTRIBUTE_TYPE_INVALID
    );
    assert_eq!(two[0].ulValueLen, CK_UNAVAILABLE_INFORMATION);
    assert_eq!(two[1].ulValueLen as usize, std::mem::size_of::<CK_ULONG>());
    assert_eq!(
        call!(C_GetAttributeValue(s, k, null_mut(), 1)),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(C_GetAttributeValue(s, 9999, two.as_mut_ptr(), 2)),
        CKR_OBJECT_HANDLE_INVALID
    );
    let ed_key = find(
        s,
        &mut [
            attr(CKA_LABEL, &mut b"b,alg=ed25519".to_vec()),
            attr(CKA_CLASS, &mut private),
        ],
    );
    assert_eq!(get(s, ed_key[0], CKA_LABEL).unwrap(), b"user:b,alg=ed25519");
    assert_eq!(
        get(s, ed_key[0], CKA_EC_PARAMS).unwrap(),
        [0x06, 0x03, 0x2b, 0x65, 0x70]
    );

    // Signing: argument and state checks and the length convention (no
    // signature is made here: that takes the kernel, see real_programs.rs).
    let mut mech = CK_MECHANISM {
        mechanism: CKM_EDDSA,
        pParameter: null_mut(),
        ulParameterLen: 0,
    };
    assert_eq!(call!(C_SignInit(s, null_mut(), k)), CKR_ARGUMENTS_BAD);
    assert_eq!(
        call!(C_SignInit(s, &mut mech, k)),
        CKR_KEY_TYPE_INCONSISTENT
    );
    mech.mechanism = CKM_RSA_PKCS;
    assert_eq!(call!(C_SignInit(s, &mut mech, k)), CKR_MECHANISM_INVALID);
    mech.mechanism = CKM_ECDSA;
    assert_eq!(
        call!(C_SignInit(s, &mut mech, web_pub[0])),
        CKR_KEY_FUNCTION_NOT_PERMITTED
    );
    assert_eq!(
        call!(C_SignInit(s, &mut mech, 9999)),
        CKR_KEY_HANDLE_INVALID
    );
    let mut sig_len: CK_ULONG = 0;
    let mut data = [7u8; 32];
    assert_eq!(
        call!(C_Sign(s, data.as_mut_ptr(), 32, null_mut(), &mut sig_len)),
        CKR_OPERATION_NOT_INITIALIZED
    );
    assert_eq!(call!(C_SignInit(s, &mut mech, k)), CKR_OK);
    assert_eq!(call!(C_SignInit(s, &mut mech, k)), CKR_OPERATION_ACTIVE);
    assert_eq!(
        call!(C_Sign(s, data.as_mut_ptr(), 32, null_mut(), &mut sig_len)),
        CKR_OK
    );
    assert_eq!(sig_len, 64);
    let mut sig = [0u8; 64];
    sig_len = 10;
    assert_eq!(
        call!(C_Sign(
            s,
            data.as_mut_ptr(),
            32,
            sig.as_mut_ptr(),
            &mut sig_len
        )),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(sig_len, 64);
    assert_eq!(
        call!(C_Sign(
            s,
            data.as_mut_ptr(),
            32,
            sig.as_mut_ptr(),
            null_mut()
        )),
        CKR_ARGUMENTS_BAD
    );
    // That error ended the operation.
    assert_eq!(
        call!(C_Sign(s, data.as_mut_ptr(), 32, null_mut(), &mut sig_len)),
        CKR_OPERATION_NOT_INITIALIZED
    );
    let mut ph = [CK_TRUE];
    let mut ed_mech = CK_MECHANISM {
        mechanism: CKM_EDDSA,
        pParameter: ph.as_mut_ptr().cast(),
        ulParameterLen: 1,
    };
    assert_eq!(
        call!(C_SignInit(s, &mut ed_mech, ed_key[0])),
        CKR_MECHANISM_PARAM_INVALID
    );

    // Multi-part (CKM_ECDSA_SHA256 only): length queries keep the
    // operation, C_Sign cannot finish it, single-part mechanisms refuse
    // C_SignUpdate and C_SignFinal (and that ends them).
    mech.mechanism = CKM_ECDSA_SHA256;
    assert_eq!(
        call!(C_SignFinal(s, null_mut(), &mut sig_len)),
        CKR_OPERATION_NOT_INITIALIZED
    );
    assert_eq!(call!(C_SignInit(s, &mut mech, k)), CKR_OK);
    assert_eq!(call!(C_SignUpdate(s, data.as_mut_ptr(), 32)), CKR_OK);
    assert_eq!(call!(C_SignUpdate(s, null_mut(), 0)), CKR_OK);
    assert_eq!(call!(C_SignUpdate(s, null_mut(), 5)), CKR_ARGUMENTS_BAD);
    assert_eq!(
        call!(C_SignFinal(s, null_mut(), &mut sig_len)),
        CKR_OPERATION_NOT_INITIALIZED,
        "an error ended it"
    );
    assert_eq!(call!(C_SignInit(s, &mut mech, k)), CKR_OK);
    assert_eq!(call!(C_SignUpdate(s, data.as_mut_ptr(), 32)), CKR_OK);
    sig_len = 0;
    assert_eq!(call!(C_SignFinal(s, null_mut(), &mut sig_len)), CKR_OK);
    assert_eq!(sig_len, 64);
    sig_len = 63;
    assert_eq!(
        call!(C_SignFinal(s, sig.as_mut_ptr(), &mut sig_len)),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(sig_len, 64);
    assert_eq!(
        call!(C_SignFinal(s, sig.as_mut_ptr(), null_mut())),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(C_SignUpdate(s, data.as_mut_ptr(), 32)),
        CKR_OPERATION_NOT_INITIALIZED
    );
    assert_eq!(call!(C_SignInit(s, &mut mech, k)), CKR_OK);
    assert_eq!(call!(C_SignUpdate(s, data.as_mut_ptr(), 32)), CKR_OK);
    assert_eq!(
        call!(C_Sign(s, data.as_mut_ptr(), 32, null_mut(), &mut sig_len)),
        CKR_OPERATION_ACTIVE
    );
    assert_eq!(
        call!(C_SignFinal(s, null_mut(), &mut sig_len)),
        CKR_OPERATION_NOT_INITIALIZED
    );
    mech.mechanism = CKM_ECDSA;
    assert_eq!(call!(C_SignInit(s, &mut mech, k)), CKR_OK);
    assert_eq!(
        call!(C_SignUpdate(s, data.as_mut_ptr(), 32)),
        CKR_FUNCTION_NOT_SUPPORTED
    );
    assert_eq!(
        call!(C_Sign(s, data.as_mut_ptr(), 32, null_mut(), &mut sig_len)),
        CKR_OPERATION_NOT_INITIALIZED
    );
    assert_eq!(call!(C_SignInit(s, &mut mech, k)), CKR_OK);
    assert_eq!(
        call!(C_SignFinal(s, null_mut(), &mut sig_len)),
        CKR_FUNCTION_NOT_SUPPORTED
    );
    assert_eq!(
        call!(C_Sign(s, data.as_mut_ptr(), 32, null_mut(), &mut sig_len)),
        CKR_OPERATION_NOT_INITIALIZED
    );

    // Several threads at once.
    let threads: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(|| {
                for _ in 0..200 {
                    let mut s: CK_SESSION_HANDLE = 0;
                    let rv = call!(C_OpenSession(
                        0,
                        CKF_SERIAL_SESSION,
                        null_mut(),
                        None,
                        &mut s
                    ));
                    assert!(rv == CKR_OK || rv == CKR_SESSION_COUNT);
                    let mut t: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
                    assert_eq!(call!(C_GetTokenInfo(0, &mut t)), CKR_OK);
                    if rv == CKR_OK {
                        let mut label = b"machine:web".to_vec();
                        assert_eq!(find(s, &mut [attr(CKA_LABEL, &mut label)]).len(), 2);
                        assert_eq!(call!(C_CloseSession(s)), CKR_OK);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }

    // A forked child must initialise again; the parent is unaffected.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let mut n: CK_ULONG = 0;
        let before = call!(C_GetSlotList(CK_TRUE, null_mut(), &mut n));
        let init = call!(C_Initialize(null_mut()));
        let after = call!(C_GetSlotList(CK_TRUE, null_mut(), &mut n));
        let ok =
            before == CKR_CRYPTOKI_NOT_INITIALIZED && init == CKR_OK && after == CKR_OK && n == 1;
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child: {status:#x}"
    );
    assert_eq!(call!(C_GetSessionInfo(s, &mut si)), CKR_OK);

    assert_eq!(call!(C_Finalize(null_mut())), CKR_OK);
    assert_eq!(
        call!(C_GetSessionInfo(s, &mut si)),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );

    // A configuration that is invalid, writable by others, or missing:
    // C_Initialize succeeds, nothing is listed, a label or ID still finds.
    let insecure = dir.path().join("insecure.conf");
    std::fs::write(&insecure, "[pkcs11]\nkeys = [\"machine:a\"]\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&insecure, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    for (text, path) in [
        (
            Some("[pkcs11]\nkeys = [\"machine:a\", \"bad/one\"]\n"),
            conf.clone(),
        ),
        (
            Some("[tpm]\ntcti = \"floppy\"\n[pkcs11]\nkeys = [\"machine:a\"]\n"),
            conf.clone(),
        ),
        (None, insecure),
        (None, dir.path().join("missing.conf")),
    ] {
        if let Some(t) = text {
            std::fs::write(&path, t).unwrap();
        }
        std::env::set_var("DERIVED_KEYS_PKCS11_CONFIG", &path);
        assert_eq!(call!(C_Initialize(null_mut())), CKR_OK, "{path:?}");
        assert_eq!(
            call!(C_OpenSession(
                0,
                CKF_SERIAL_SESSION,
                null_mut(),
                None,
                &mut s
            )),
            CKR_OK
        );
        assert!(find(s, &mut []).is_empty(), "{path:?} {text:?}");
        assert_eq!(find(s, &mut [attr(CKA_LABEL, &mut label)]).len(), 2);
        assert_eq!(find(s, &mut [attr(CKA_ID, &mut id_a)]).len(), 2);
        assert_eq!(call!(C_Finalize(null_mut())), CKR_OK);
    }
}
