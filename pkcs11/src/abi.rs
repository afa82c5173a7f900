//! The C ABI edge: every function PKCS#11 consumers call. Each body runs
//! inside `catch_unwind` (a panic answers CKR_GENERAL_ERROR instead of
//! unwinding into C), checks every pointer and length, then calls the safe
//! logic in `token.rs`. `unsafe` lives here only, in the few helpers below
//! and where a C struct is read or written.

#![allow(non_snake_case)]

use std::os::raw::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use cryptoki_sys::*;

use crate::token::{self, Attr};

fn guard(f: impl FnOnce() -> Result<(), CK_RV>) -> CK_RV {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => CKR_OK,
        Ok(Err(rv)) => rv,
        Err(_) => CKR_GENERAL_ERROR,
    }
}

/// Reads a `T` the caller passed by pointer.
///
/// # Safety
/// `p` is NULL or points to a readable `T` (the PKCS#11 caller's contract).
unsafe fn get<T: Copy>(p: *const T) -> Result<T, CK_RV> {
    if p.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: not NULL, and by the caller's contract a readable T; read
    // unaligned so a misaligned caller buffer is not undefined behaviour.
    Ok(unsafe { p.read_unaligned() })
}

/// Writes `v` where the caller asked.
///
/// # Safety
/// `p` is NULL or points to a writable `T`.
unsafe fn put<T>(p: *mut T, v: T) -> Result<(), CK_RV> {
    if p.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: not NULL, and by the caller's contract a writable T.
    unsafe { p.write_unaligned(v) };
    Ok(())
}

fn len_of<T>(n: CK_ULONG) -> Result<usize, CK_RV> {
    usize::try_from(n)
        .ok()
        .filter(|&n| {
            n.checked_mul(std::mem::size_of::<T>().max(1))
                .is_some_and(|b| b <= isize::MAX as usize)
        })
        .ok_or(CKR_ARGUMENTS_BAD)
}

/// The caller's array of `n` elements (empty when `n` is 0, whatever `p`).
///
/// # Safety
/// `p` is NULL or points to `n` readable, initialised `T`s that nothing
/// writes during the call.
unsafe fn slice<'a, T>(p: *const T, n: CK_ULONG) -> Result<&'a [T], CK_RV> {
    let n = len_of::<T>(n)?;
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() || (p as usize) % std::mem::align_of::<T>() != 0 {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: not NULL, aligned, length checked against isize::MAX, and by
    // the caller's contract `n` readable elements.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// As [`slice`], writable.
///
/// # Safety
/// `p` is NULL or points to `n` writable, initialised `T`s only we touch
/// during the call.
unsafe fn slice_mut<'a, T>(p: *mut T, n: CK_ULONG) -> Result<&'a mut [T], CK_RV> {
    let n = len_of::<T>(n)?;
    if n == 0 {
        return Ok(&mut []);
    }
    if p.is_null() || (p as usize) % std::mem::align_of::<T>() != 0 {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: as in `slice`, and writable by the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, n) })
}

/// PKCS#11's output convention: `buf` NULL asks for the count only; a
/// count too small answers CKR_BUFFER_TOO_SMALL with the count needed.
///
/// # Safety
/// `count` is NULL or a readable and writable CK_ULONG; `buf` is NULL or
/// holds `*count` writable `T`s.
unsafe fn out_array<T: Copy>(buf: *mut T, count: *mut CK_ULONG, data: &[T]) -> Result<(), CK_RV> {
    // SAFETY: forwarded caller contract on `count`.
    let have = unsafe { get(count) }?;
    // SAFETY: as above.
    unsafe { put(count, data.len() as CK_ULONG) }?;
    if buf.is_null() {
        return Ok(());
    }
    if have < data.len() as CK_ULONG {
        return Err(CKR_BUFFER_TOO_SMALL);
    }
    // SAFETY: `buf` has room for `have` >= data.len() elements (contract).
    let dst = unsafe { slice_mut(buf, data.len() as CK_ULONG) }?;
    dst.copy_from_slice(data);
    Ok(())
}

/// # Safety
/// `pInitArgs` is NULL or a CK_C_INITIALIZE_ARGS.
pub(crate) unsafe extern "C" fn C_Initialize(pInitArgs: *mut c_void) -> CK_RV {
    guard(|| {
        if !pInitArgs.is_null() {
            // SAFETY: not NULL; PKCS#11 says it points to CK_C_INITIALIZE_ARGS.
            let args = unsafe { get(pInitArgs as *const CK_C_INITIALIZE_ARGS) }?;
            if !args.pReserved.is_null() {
                return Err(CKR_ARGUMENTS_BAD);
            }
            let given = [
                args.CreateMutex.is_some(),
                args.DestroyMutex.is_some(),
                args.LockMutex.is_some(),
                args.UnlockMutex.is_some(),
            ];
            if given.iter().any(|&g| g) && !given.iter().all(|&g| g) {
                return Err(CKR_ARGUMENTS_BAD);
            }
            // With or without callbacks we lock with the OS's primitives
            // (std's Mutex), which every caller that passes callbacks
            // accepts in practice (CKF_OS_LOCKING_OK or not).
        }
        token::initialize()
    })
}

/// # Safety
/// `pReserved` must be NULL.
pub(crate) unsafe extern "C" fn C_Finalize(pReserved: *mut c_void) -> CK_RV {
    guard(|| {
        if !pReserved.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        token::finalize()
    })
}

/// # Safety
/// `pInfo` is NULL or a writable CK_INFO.
pub(crate) unsafe extern "C" fn C_GetInfo(pInfo: *mut CK_INFO) -> CK_RV {
    guard(|| {
        token::with(|_| Ok(()))?;
        // SAFETY: caller contract on pInfo; NULL is refused.
        unsafe { put(pInfo, token::info()) }
    })
}

/// # Safety
/// `ppFunctionList` is NULL or a writable pointer.
pub(crate) unsafe extern "C" fn C_GetFunctionList(
    ppFunctionList: *mut *mut CK_FUNCTION_LIST,
) -> CK_RV {
    // SAFETY: forwarded caller contract.
    unsafe { crate::C_GetFunctionList(ppFunctionList) }
}

/// # Safety
/// `pulCount` is a CK_ULONG; `pSlotList` NULL or `*pulCount` slot ids.
pub(crate) unsafe extern "C" fn C_GetSlotList(
    _tokenPresent: CK_BBOOL,
    pSlotList: *mut CK_SLOT_ID,
    pulCount: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        token::with(|_| Ok(()))?;
        // SAFETY: caller contract (see the function's).
        unsafe { out_array(pSlotList, pulCount, &[token::SLOT_ID]) }
    })
}

/// # Safety
/// `pInfo` is NULL or a writable CK_SLOT_INFO.
pub(crate) unsafe extern "C" fn C_GetSlotInfo(
    slotID: CK_SLOT_ID,
    pInfo: *mut CK_SLOT_INFO,
) -> CK_RV {
    guard(|| {
        token::with(|_| Ok(()))?;
        token::check_slot(slotID)?;
        // SAFETY: caller contract on pInfo; NULL is refused.
        unsafe { put(pInfo, token::slot_info()) }
    })
}

/// # Safety
/// `pInfo` is NULL or a writable CK_TOKEN_INFO.
pub(crate) unsafe extern "C" fn C_GetTokenInfo(
    slotID: CK_SLOT_ID,
    pInfo: *mut CK_TOKEN_INFO,
) -> CK_RV {
    guard(|| {
        let info = token::with(|s| Ok(token::token_info(s)))?;
        token::check_slot(slotID)?;
        // SAFETY: caller contract on pInfo; NULL is refused.
        unsafe { put(pInfo, info) }
    })
}

/// # Safety
/// `pulCount` is a CK_ULONG; `pMechanismList` NULL or `*pulCount` entries.
pub(crate) unsafe extern "C" fn C_GetMechanismList(
    slotID: CK_SLOT_ID,
    pMechanismList: *mut CK_MECHANISM_TYPE,
    pulCount: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        token::with(|_| Ok(()))?;
        token::check_slot(slotID)?;
        // SAFETY: caller contract (see the function's).
        unsafe { out_array(pMechanismList, pulCount, &token::MECHANISMS) }
    })
}

/// # Safety
/// `pInfo` is NULL or a writable CK_MECHANISM_INFO.
pub(crate) unsafe extern "C" fn C_GetMechanismInfo(
    slotID: CK_SLOT_ID,
    type_: CK_MECHANISM_TYPE,
    pInfo: *mut CK_MECHANISM_INFO,
) -> CK_RV {
    guard(|| {
        token::with(|_| Ok(()))?;
        token::check_slot(slotID)?;
        let info = token::mechanism_info(type_)?;
        // SAFETY: caller contract on pInfo; NULL is refused.
        unsafe { put(pInfo, info) }
    })
}

/// # Safety
/// `phSession` is NULL or a writable handle.
pub(crate) unsafe extern "C" fn C_OpenSession(
    slotID: CK_SLOT_ID,
    flags: CK_FLAGS,
    _pApplication: *mut c_void,
    _Notify: CK_NOTIFY,
    phSession: *mut CK_SESSION_HANDLE,
) -> CK_RV {
    guard(|| {
        if phSession.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let h = token::with(|s| {
            token::check_slot(slotID)?;
            s.open_session(flags)
        })?;
        // SAFETY: not NULL, and the caller's writable handle.
        unsafe { put(phSession, h) }
    })
}

pub(crate) extern "C" fn C_CloseSession(hSession: CK_SESSION_HANDLE) -> CK_RV {
    guard(|| token::with(|s| s.close_session(hSession)))
}

pub(crate) extern "C" fn C_CloseAllSessions(slotID: CK_SLOT_ID) -> CK_RV {
    guard(|| {
        token::with(|s| {
            token::check_slot(slotID)?;
            s.close_all();
            Ok(())
        })
    })
}

/// # Safety
/// `pInfo` is NULL or a writable CK_SESSION_INFO.
pub(crate) unsafe extern "C" fn C_GetSessionInfo(
    hSession: CK_SESSION_HANDLE,
    pInfo: *mut CK_SESSION_INFO,
) -> CK_RV {
    guard(|| {
        if pInfo.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let info = token::with(|s| s.session_info(hSession))?;
        // SAFETY: not NULL, the caller's writable struct.
        unsafe { put(pInfo, info) }
    })
}

/// # Safety
/// `pPin` is NULL or `ulPinLen` bytes (never read: there is no PIN).
pub(crate) unsafe extern "C" fn C_Login(
    hSession: CK_SESSION_HANDLE,
    userType: CK_USER_TYPE,
    _pPin: *mut CK_UTF8CHAR,
    _ulPinLen: CK_ULONG,
) -> CK_RV {
    guard(|| token::with(|s| s.login(hSession, userType)))
}

pub(crate) extern "C" fn C_Logout(hSession: CK_SESSION_HANDLE) -> CK_RV {
    guard(|| token::with(|s| s.logout(hSession)))
}

/// # Safety
/// `pTemplate` is NULL (with `ulCount` 0) or `ulCount` attributes whose
/// values are readable.
pub(crate) unsafe extern "C" fn C_FindObjectsInit(
    hSession: CK_SESSION_HANDLE,
    pTemplate: *mut CK_ATTRIBUTE,
    ulCount: CK_ULONG,
) -> CK_RV {
    guard(|| {
        // SAFETY: caller contract on the template array.
        let attrs = unsafe { slice(pTemplate as *const CK_ATTRIBUTE, ulCount) }?;
        let mut template = Vec::with_capacity(attrs.len());
        for a in attrs {
            // SAFETY: each value is `ulValueLen` readable bytes (contract).
            let v = unsafe { slice(a.pValue as *const u8, a.ulValueLen) }?;
            template.push((a.type_, v.to_vec()));
        }
        token::with(|s| s.find_init(hSession, &template))
    })
}

/// # Safety
/// `phObject` holds `ulMaxObjectCount` handles; `pulObjectCount` writable.
pub(crate) unsafe extern "C" fn C_FindObjects(
    hSession: CK_SESSION_HANDLE,
    phObject: *mut CK_OBJECT_HANDLE,
    ulMaxObjectCount: CK_ULONG,
    pulObjectCount: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        if pulObjectCount.is_null() || (phObject.is_null() && ulMaxObjectCount > 0) {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let max = len_of::<CK_OBJECT_HANDLE>(ulMaxObjectCount)?;
        let found = token::with(|s| s.find_next(hSession, max))?;
        // SAFETY: the caller's array of ulMaxObjectCount >= found.len().
        let dst = unsafe { slice_mut(phObject, found.len() as CK_ULONG) }?;
        dst.copy_from_slice(&found);
        // SAFETY: not NULL, the caller's count.
        unsafe { put(pulObjectCount, found.len() as CK_ULONG) }
    })
}

pub(crate) extern "C" fn C_FindObjectsFinal(hSession: CK_SESSION_HANDLE) -> CK_RV {
    guard(|| token::with(|s| s.find_final(hSession)))
}

/// # Safety
/// `pTemplate` is `ulCount` attributes; each `pValue` NULL or
/// `ulValueLen` writable bytes.
pub(crate) unsafe extern "C" fn C_GetAttributeValue(
    hSession: CK_SESSION_HANDLE,
    hObject: CK_OBJECT_HANDLE,
    pTemplate: *mut CK_ATTRIBUTE,
    ulCount: CK_ULONG,
) -> CK_RV {
    guard(|| {
        // SAFETY: caller contract on the template array.
        let template = unsafe { slice_mut(pTemplate, ulCount) }?;
        let (obj, prefix) = token::with(|s| {
            s.session(hSession)?;
            Ok((s.object(hObject)?.clone(), s.prefix.clone()))
        })?;
        let needs = template.iter().any(|a| {
            token::attribute(&obj.selector, obj.class, a.type_, obj.spki.as_deref())
                == Attr::NeedsSpki
        });
        let spki = match (&obj.spki, needs) {
            (None, true) => {
                // Asked of the kernel without holding the lock.
                let k = token::public_key(&obj.selector, prefix.as_deref())?;
                token::with(|s| {
                    s.cache_spki(&obj.selector, &k);
                    Ok(())
                })?;
                Some(k)
            }
            (k, _) => k.clone(),
        };
        let mut rv = CKR_OK;
        for a in template.iter_mut() {
            match token::attribute(&obj.selector, obj.class, a.type_, spki.as_deref()) {
                Attr::Value(v) => {
                    if a.pValue.is_null() {
                        a.ulValueLen = v.len() as CK_ULONG;
                    } else if a.ulValueLen < v.len() as CK_ULONG {
                        a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                        rv = CKR_BUFFER_TOO_SMALL;
                    } else {
                        // SAFETY: pValue holds ulValueLen >= v.len() writable bytes.
                        let dst = unsafe { slice_mut(a.pValue as *mut u8, v.len() as CK_ULONG) }?;
                        dst.copy_from_slice(&v);
                        a.ulValueLen = v.len() as CK_ULONG;
                    }
                }
                Attr::Sensitive => {
                    a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                    rv = CKR_ATTRIBUTE_SENSITIVE;
                }
                Attr::Invalid | Attr::NeedsSpki => {
                    a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                    rv = CKR_ATTRIBUTE_TYPE_INVALID;
                }
            }
        }
        if rv == CKR_OK {
            Ok(())
        } else {
            Err(rv)
        }
    })
}

/// # Safety
/// `pMechanism` is NULL or a CK_MECHANISM whose parameter (if any) is
/// `ulParameterLen` readable bytes.
pub(crate) unsafe extern "C" fn C_SignInit(
    hSession: CK_SESSION_HANDLE,
    pMechanism: *mut CK_MECHANISM,
    hKey: CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(|| {
        // SAFETY: caller contract; NULL is refused.
        let mech = unsafe { get(pMechanism as *const CK_MECHANISM) }?;
        // SAFETY: the parameter is ulParameterLen readable bytes (contract).
        let param = unsafe { slice(mech.pParameter as *const u8, mech.ulParameterLen) }?;
        // CK_EDDSA_PARAMS starts with phFlag: only pure Ed25519 is ours.
        if mech.mechanism == CKM_EDDSA && param.first().is_some_and(|&ph| ph != CK_FALSE) {
            return Err(CKR_MECHANISM_PARAM_INVALID);
        }
        token::with(|s| s.sign_init(hSession, mech.mechanism, hKey))
    })
}

/// Ends the session's signature operation (after a signature, or an error
/// other than a length answer, as PKCS#11 says).
fn end_sign(hSession: CK_SESSION_HANDLE) {
    let _ = token::with(|s| {
        s.sign_end(hSession);
        Ok(())
    });
}

/// PKCS#11's convention for a signature of SIG_LEN bytes: `pSignature`
/// NULL asks for the length, a buffer too small answers
/// CKR_BUFFER_TOO_SMALL with it (both leave the operation active);
/// otherwise `make` signs and the operation ends, whatever the outcome.
///
/// # Safety
/// `pulSignatureLen` is NULL or a readable and writable CK_ULONG;
/// `pSignature` NULL or `*pulSignatureLen` writable bytes.
unsafe fn signature_out(
    hSession: CK_SESSION_HANDLE,
    pSignature: *mut CK_BYTE,
    pulSignatureLen: *mut CK_ULONG,
    make: impl FnOnce() -> Result<Vec<u8>, CK_RV>,
) -> Result<(), CK_RV> {
    let result = (|| {
        // SAFETY: caller contract on pulSignatureLen; NULL is refused.
        let have = unsafe { get(pulSignatureLen as *const CK_ULONG) }?;
        if pSignature.is_null() {
            // SAFETY: as above.
            return unsafe { put(pulSignatureLen, token::SIG_LEN as CK_ULONG) };
        }
        if have < token::SIG_LEN as CK_ULONG {
            // SAFETY: as above.
            unsafe { put(pulSignatureLen, token::SIG_LEN as CK_ULONG) }?;
            return Err(CKR_BUFFER_TOO_SMALL);
        }
        let sig = make();
        end_sign(hSession);
        let sig = sig?;
        // SAFETY: pSignature holds `have` >= SIG_LEN writable bytes.
        let dst = unsafe { slice_mut(pSignature, sig.len() as CK_ULONG) }?;
        dst.copy_from_slice(&sig);
        // SAFETY: as above.
        unsafe { put(pulSignatureLen, sig.len() as CK_ULONG) }
    })();
    if matches!(result, Err(rv) if rv != CKR_BUFFER_TOO_SMALL) {
        end_sign(hSession);
    }
    result
}

/// # Safety
/// `pData` is `ulDataLen` readable bytes; `pulSignatureLen` a CK_ULONG;
/// `pSignature` NULL or `*pulSignatureLen` writable bytes.
pub(crate) unsafe extern "C" fn C_Sign(
    hSession: CK_SESSION_HANDLE,
    pData: *mut CK_BYTE,
    ulDataLen: CK_ULONG,
    pSignature: *mut CK_BYTE,
    pulSignatureLen: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        let (mech, sel, prefix) = match token::with(|s| s.sign_op(hSession)) {
            Err(CKR_OPERATION_ACTIVE) => {
                // Multi-part: only C_SignFinal finishes it.
                end_sign(hSession);
                return Err(CKR_OPERATION_ACTIVE);
            }
            other => other?,
        };
        let make = || {
            // SAFETY: caller contract on the data.
            let data = unsafe { slice(pData as *const u8, ulDataLen) }?;
            token::sign(mech, &sel, prefix.as_deref(), data)
        };
        // SAFETY: forwarded caller contract on the signature arguments.
        unsafe { signature_out(hSession, pSignature, pulSignatureLen, make) }
    })
}

/// # Safety
/// `pPart` is `ulPartLen` readable bytes.
pub(crate) unsafe extern "C" fn C_SignUpdate(
    hSession: CK_SESSION_HANDLE,
    pPart: *mut CK_BYTE,
    ulPartLen: CK_ULONG,
) -> CK_RV {
    guard(|| {
        // SAFETY: caller contract on the part.
        let part = unsafe { slice(pPart as *const u8, ulPartLen) };
        let result = part.and_then(|p| token::with(|s| s.sign_update(hSession, p)));
        // An error ends the operation (one that is there).
        if matches!(result, Err(rv) if rv != CKR_OPERATION_NOT_INITIALIZED
            && rv != CKR_SESSION_HANDLE_INVALID
            && rv != CKR_CRYPTOKI_NOT_INITIALIZED)
        {
            end_sign(hSession);
        }
        result
    })
}

/// # Safety
/// `pulSignatureLen` a CK_ULONG; `pSignature` NULL or `*pulSignatureLen`
/// writable bytes.
pub(crate) unsafe extern "C" fn C_SignFinal(
    hSession: CK_SESSION_HANDLE,
    pSignature: *mut CK_BYTE,
    pulSignatureLen: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        let (sel, prefix, digest) = match token::with(|s| s.sign_final_op(hSession)) {
            Err(rv @ CKR_FUNCTION_NOT_SUPPORTED) => {
                end_sign(hSession);
                return Err(rv);
            }
            other => other?,
        };
        // SAFETY: forwarded caller contract on the signature arguments.
        unsafe {
            signature_out(hSession, pSignature, pulSignatureLen, || {
                token::sign_digest(&sel, prefix.as_deref(), &digest)
            })
        }
    })
}
