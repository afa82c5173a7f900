//! One OpenSSL library context for the TPM stack's own crypto, instead of
//! one per operation.
//!
//! tpm2-tss 3.x (ESYS with OpenSSL 3) computes each session's nonces,
//! cpHash, rpHash, HMACs and parameter-encryption keys in a library context
//! it creates for that one operation with `OSSL_LIB_CTX_new` and frees
//! right after: a TPM2 provider loaded in the global context must not
//! serve the TPM's own session crypto. Every new context loads the default
//! provider, builds its algorithm tables and seeds a DRBG afresh, so a
//! TPM2_HMAC in the broker's salted, encrypted session cost ~4 ms on
//! swtpm, all of it in the client (benches/tpm.rs; docs/SPEED.md).
//!
//! The broker exports these two functions (build.rs:
//! `--export-dynamic-symbol`), so the dynamic linker binds libtss2-esys's
//! calls to them: the first call creates one private context with the real
//! `OSSL_LIB_CTX_new` (found with `dlsym(RTLD_NEXT)`), later calls return
//! it, and freeing it is a no-op. It is still a context of its own, never
//! the global one and loading no configuration, so the isolation that
//! tpm2-tss wanted holds; OpenSSL library contexts are thread-safe. Only
//! this executable interposes: the library and the PKCS#11 module, which
//! load into other programs, define nothing of the kind.

use std::ffi::c_void;
use std::sync::OnceLock;

/// The real functions' addresses and the shared context, as integers
/// (raw pointers are not `Sync`).
static REAL_NEW: OnceLock<usize> = OnceLock::new();
static REAL_FREE: OnceLock<usize> = OnceLock::new();
static SHARED: OnceLock<usize> = OnceLock::new();

type NewFn = unsafe extern "C" fn() -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void);

fn next(name: &'static std::ffi::CStr) -> usize {
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name only looks the
    // symbol up in the objects loaded after this executable.
    unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) as usize }
}

fn real_new() -> *mut c_void {
    let f = *REAL_NEW.get_or_init(|| next(c"OSSL_LIB_CTX_new"));
    if f == 0 {
        return std::ptr::null_mut();
    }
    // SAFETY: `f` is libcrypto's OSSL_LIB_CTX_new, whose C signature is
    // `OSSL_LIB_CTX *OSSL_LIB_CTX_new(void)`.
    unsafe { std::mem::transmute::<usize, NewFn>(f)() }
}

/// `OSSL_LIB_CTX *OSSL_LIB_CTX_new(void)`, for libtss2-esys.
#[no_mangle]
pub extern "C" fn OSSL_LIB_CTX_new() -> *mut c_void {
    if let Some(&c) = SHARED.get() {
        return c as *mut c_void;
    }
    let fresh = real_new();
    if fresh.is_null() {
        return fresh;
    }
    // Two first callers at once: one context wins, the other is freed.
    let kept = *SHARED.get_or_init(|| fresh as usize);
    if kept != fresh as usize {
        free_real(fresh);
    }
    kept as *mut c_void
}

/// `void OSSL_LIB_CTX_free(OSSL_LIB_CTX *)`: the shared context stays.
#[no_mangle]
pub extern "C" fn OSSL_LIB_CTX_free(ctx: *mut c_void) {
    if ctx.is_null() || SHARED.get() == Some(&(ctx as usize)) {
        return;
    }
    free_real(ctx);
}

fn free_real(ctx: *mut c_void) {
    let f = *REAL_FREE.get_or_init(|| next(c"OSSL_LIB_CTX_free"));
    if f != 0 {
        // SAFETY: `f` is libcrypto's `void OSSL_LIB_CTX_free(OSSL_LIB_CTX *)`
        // and `ctx` a context it made that nobody else holds.
        unsafe { std::mem::transmute::<usize, FreeFn>(f)(ctx) }
    }
}

#[cfg(test)]
mod tests {
    // The test binary does not link libtss2-esys (which brings libcrypto
    // into the broker); link libcrypto itself for RTLD_NEXT to find.
    #[link(name = "crypto")]
    extern "C" {
        fn OPENSSL_version_major() -> std::ffi::c_uint;
    }

    #[test]
    fn one_context_is_handed_out_and_never_freed() {
        // SAFETY: a constant getter without arguments.
        assert_eq!(unsafe { OPENSSL_version_major() }, 3);
        let a = super::OSSL_LIB_CTX_new();
        assert!(!a.is_null());
        super::OSSL_LIB_CTX_free(a);
        let b = super::OSSL_LIB_CTX_new();
        assert_eq!(a, b);
    }
}
