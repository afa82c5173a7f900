//! `derived-keys-pkcs11`: a PKCS#11 (2.40) module whose one token,
//! `derived-keys`, holds no state: a key pair is named by a key selector
//! (CONTRACT.md, "Key selectors (v2)") in `CKA_LABEL`, derived on demand,
//! and every signature is asked of the kernel through the request-key
//! upcall. The module never holds a private key and writes no file.
//!
//! Types and constants come from `cryptoki-sys`; the dispatch table and the
//! functions are ours (see README.md for why). Unsupported entries answer
//! CKR_FUNCTION_NOT_SUPPORTED.
//!
//! A search without a label lists the configuration's `[pkcs11] keys`
//! (/etc/derived-keys/derived-keys.conf, read at `C_Initialize`; if it
//! cannot be read or is invalid, nothing is listed and C_Initialize still
//! succeeds: labelled searches need no configuration).
//!
//! Environment, read at `C_Initialize`, test only (hidden):
//! - `DERIVED_KEYS_PKCS11_PREFIX`: the description prefix of the requests,
//!   for a test's private request-key rule.
//! - `DERIVED_KEYS_PKCS11_CONFIG`: the configuration read instead.
//!
//! For `path:` and `csum:` selectors the key belongs to the program that
//! loaded the module (the keyring request is that process's).

#![allow(non_snake_case)]

mod abi;
pub mod token;
mod unsupported;

use cryptoki_sys::*;

static FUNCTION_LIST: CK_FUNCTION_LIST = CK_FUNCTION_LIST {
    version: CK_VERSION {
        major: 2,
        minor: 40,
    },
    C_Initialize: Some(crate::abi::C_Initialize),
    C_Finalize: Some(crate::abi::C_Finalize),
    C_GetInfo: Some(crate::abi::C_GetInfo),
    C_GetFunctionList: Some(crate::abi::C_GetFunctionList),
    C_GetSlotList: Some(crate::abi::C_GetSlotList),
    C_GetSlotInfo: Some(crate::abi::C_GetSlotInfo),
    C_GetTokenInfo: Some(crate::abi::C_GetTokenInfo),
    C_GetMechanismList: Some(crate::abi::C_GetMechanismList),
    C_GetMechanismInfo: Some(crate::abi::C_GetMechanismInfo),
    C_InitToken: Some(crate::unsupported::C_InitToken),
    C_InitPIN: Some(crate::unsupported::C_InitPIN),
    C_SetPIN: Some(crate::unsupported::C_SetPIN),
    C_OpenSession: Some(crate::abi::C_OpenSession),
    C_CloseSession: Some(crate::abi::C_CloseSession),
    C_CloseAllSessions: Some(crate::abi::C_CloseAllSessions),
    C_GetSessionInfo: Some(crate::abi::C_GetSessionInfo),
    C_GetOperationState: Some(crate::unsupported::C_GetOperationState),
    C_SetOperationState: Some(crate::unsupported::C_SetOperationState),
    C_Login: Some(crate::abi::C_Login),
    C_Logout: Some(crate::abi::C_Logout),
    C_CreateObject: Some(crate::unsupported::C_CreateObject),
    C_CopyObject: Some(crate::unsupported::C_CopyObject),
    C_DestroyObject: Some(crate::unsupported::C_DestroyObject),
    C_GetObjectSize: Some(crate::unsupported::C_GetObjectSize),
    C_GetAttributeValue: Some(crate::abi::C_GetAttributeValue),
    C_SetAttributeValue: Some(crate::unsupported::C_SetAttributeValue),
    C_FindObjectsInit: Some(crate::abi::C_FindObjectsInit),
    C_FindObjects: Some(crate::abi::C_FindObjects),
    C_FindObjectsFinal: Some(crate::abi::C_FindObjectsFinal),
    C_EncryptInit: Some(crate::unsupported::C_EncryptInit),
    C_Encrypt: Some(crate::unsupported::C_Encrypt),
    C_EncryptUpdate: Some(crate::unsupported::C_EncryptUpdate),
    C_EncryptFinal: Some(crate::unsupported::C_EncryptFinal),
    C_DecryptInit: Some(crate::unsupported::C_DecryptInit),
    C_Decrypt: Some(crate::unsupported::C_Decrypt),
    C_DecryptUpdate: Some(crate::unsupported::C_DecryptUpdate),
    C_DecryptFinal: Some(crate::unsupported::C_DecryptFinal),
    C_DigestInit: Some(crate::unsupported::C_DigestInit),
    C_Digest: Some(crate::unsupported::C_Digest),
    C_DigestUpdate: Some(crate::unsupported::C_DigestUpdate),
    C_DigestKey: Some(crate::unsupported::C_DigestKey),
    C_DigestFinal: Some(crate::unsupported::C_DigestFinal),
    C_SignInit: Some(crate::abi::C_SignInit),
    C_Sign: Some(crate::abi::C_Sign),
    C_SignUpdate: Some(crate::abi::C_SignUpdate),
    C_SignFinal: Some(crate::abi::C_SignFinal),
    C_SignRecoverInit: Some(crate::unsupported::C_SignRecoverInit),
    C_SignRecover: Some(crate::unsupported::C_SignRecover),
    C_VerifyInit: Some(crate::unsupported::C_VerifyInit),
    C_Verify: Some(crate::unsupported::C_Verify),
    C_VerifyUpdate: Some(crate::unsupported::C_VerifyUpdate),
    C_VerifyFinal: Some(crate::unsupported::C_VerifyFinal),
    C_VerifyRecoverInit: Some(crate::unsupported::C_VerifyRecoverInit),
    C_VerifyRecover: Some(crate::unsupported::C_VerifyRecover),
    C_DigestEncryptUpdate: Some(crate::unsupported::C_DigestEncryptUpdate),
    C_DecryptDigestUpdate: Some(crate::unsupported::C_DecryptDigestUpdate),
    C_SignEncryptUpdate: Some(crate::unsupported::C_SignEncryptUpdate),
    C_DecryptVerifyUpdate: Some(crate::unsupported::C_DecryptVerifyUpdate),
    C_GenerateKey: Some(crate::unsupported::C_GenerateKey),
    C_GenerateKeyPair: Some(crate::unsupported::C_GenerateKeyPair),
    C_WrapKey: Some(crate::unsupported::C_WrapKey),
    C_UnwrapKey: Some(crate::unsupported::C_UnwrapKey),
    C_DeriveKey: Some(crate::unsupported::C_DeriveKey),
    C_SeedRandom: Some(crate::unsupported::C_SeedRandom),
    C_GenerateRandom: Some(crate::unsupported::C_GenerateRandom),
    C_GetFunctionStatus: Some(crate::unsupported::C_GetFunctionStatus),
    C_CancelFunction: Some(crate::unsupported::C_CancelFunction),
    C_WaitForSlotEvent: Some(crate::unsupported::C_WaitForSlotEvent),
};

/// The module's one exported symbol: its function table.
///
/// # Safety
/// `ppFunctionList` is NULL or a writable pointer to a function list.
#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionList(ppFunctionList: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    std::panic::catch_unwind(|| {
        if ppFunctionList.is_null() {
            return CKR_ARGUMENTS_BAD;
        }
        // SAFETY: not NULL; the caller passes a writable pointer. The table
        // is a static that consumers only read (PKCS#11's CK_FUNCTION_LIST_PTR
        // is not const, so the pointer is cast).
        unsafe {
            ppFunctionList.write_unaligned(&FUNCTION_LIST as *const CK_FUNCTION_LIST as *mut _)
        };
        CKR_OK
    })
    .unwrap_or(CKR_GENERAL_ERROR)
}
