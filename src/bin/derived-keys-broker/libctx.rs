//! One OpenSSL library context for the TPM stack's own crypto, instead of
//! one per operation, and no OpenSSL configuration in the broker.
//!
//! tpm2-tss 3.x (ESYS with OpenSSL 3) computes each session's nonces,
//! cpHash, rpHash, HMACs and parameter-encryption keys in a library context
//! it creates for that one operation with `OSSL_LIB_CTX_new` and frees
//! right after: a TPM2 provider loaded in the global context must not
//! serve the TPM's own session crypto. Every new context loads the default
//! provider, builds its algorithm tables and seeds a DRBG afresh, so a
//! TPM2_HMAC in the broker's salted, encrypted session cost ~4 ms on
//! swtpm, all of it in the client (benches/stages.rs; docs/SPEED.md).
//!
//! The broker exports these functions (build.rs: `--export-dynamic-symbol`),
//! so the dynamic linker binds libtss2-esys's calls to them: the first call
//! creates one private context with the real `OSSL_LIB_CTX_new` (found with
//! `dlsym(RTLD_NEXT)`), later calls return it, and freeing it is a no-op.
//!
//! libcrypto's own calls bind to them too, and one of its callers must get
//! a fresh context: `OSSL_LIB_CTX_new_from_dispatch` (behind
//! `OSSL_LIB_CTX_new_child`, which a provider such as `legacy` calls when
//! it loads) turns the context it is given into a child of the global one,
//! mirroring the global context's providers. So that function is wrapped
//! too, and inside it `OSSL_LIB_CTX_new` and `OSSL_LIB_CTX_free` pass
//! through. And [`no_config`] keeps openssl.cnf out of the broker, which
//! does its own cryptography with RustCrypto: no configured provider (a
//! TPM2 one included) is loaded into the global context, which ESYS 3.2
//! itself uses for AES-CFB and HMAC keys. The shared context then has the
//! default provider alone, as tpm2-tss's fresh ones had.
//!
//! Only this executable interposes: the library and the PKCS#11 module,
//! which load into other programs, define nothing of the kind.

use std::cell::Cell;
use std::ffi::c_void;
use std::sync::OnceLock;

/// The real functions' addresses and the shared context, as integers
/// (raw pointers are not `Sync`).
static REAL_NEW: OnceLock<usize> = OnceLock::new();
static REAL_FREE: OnceLock<usize> = OnceLock::new();
static REAL_FROM_DISPATCH: OnceLock<usize> = OnceLock::new();
static SHARED: OnceLock<usize> = OnceLock::new();

thread_local! {
    /// Inside `OSSL_LIB_CTX_new_from_dispatch` on this thread: contexts
    /// are libcrypto's own, made and freed for real.
    static IN_DISPATCH: Cell<u32> = const { Cell::new(0) };
}

type NewFn = unsafe extern "C" fn() -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void);
type FromDispatchFn = unsafe extern "C" fn(*const c_void, *const c_void) -> *mut c_void;

/// `OPENSSL_INIT_NO_LOAD_CONFIG` (openssl/crypto.h, OpenSSL 3.0).
const OPENSSL_INIT_NO_LOAD_CONFIG: u64 = 0x0000_0080;

#[link(name = "crypto")]
extern "C" {
    fn OPENSSL_init_crypto(opts: u64, settings: *const c_void) -> std::ffi::c_int;
}

/// Initialises libcrypto without reading openssl.cnf: call before any TPM
/// work. Returns whether libcrypto accepted it.
pub fn no_config() -> bool {
    // SAFETY: OPENSSL_init_crypto takes option bits and an optional
    // settings pointer (NULL: none); it may be called any number of times.
    unsafe { OPENSSL_init_crypto(OPENSSL_INIT_NO_LOAD_CONFIG, std::ptr::null()) == 1 }
}

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

/// # Safety
/// `ctx` is a library context made by libcrypto that nobody uses any more.
unsafe fn free_real(ctx: *mut c_void) {
    let f = *REAL_FREE.get_or_init(|| next(c"OSSL_LIB_CTX_free"));
    if f != 0 {
        // SAFETY: `f` is libcrypto's `void OSSL_LIB_CTX_free(OSSL_LIB_CTX *)`;
        // the caller vouches for `ctx`.
        unsafe { std::mem::transmute::<usize, FreeFn>(f)(ctx) }
    }
}

fn in_dispatch() -> bool {
    IN_DISPATCH.with(|d| d.get() > 0)
}

/// `OSSL_LIB_CTX *OSSL_LIB_CTX_new(void)`: the shared context, except for
/// libcrypto's own child contexts.
///
/// # Safety
/// None beyond the C function's: it takes no arguments.
#[no_mangle]
pub unsafe extern "C" fn OSSL_LIB_CTX_new() -> *mut c_void {
    if in_dispatch() {
        return real_new();
    }
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
        // SAFETY: `fresh` was made above and nobody else has it.
        unsafe { free_real(fresh) };
    }
    kept as *mut c_void
}

/// `void OSSL_LIB_CTX_free(OSSL_LIB_CTX *)`: the shared context stays.
///
/// # Safety
/// As the C function: `ctx` is NULL or a context from `OSSL_LIB_CTX_new`
/// (or libcrypto) that the caller no longer uses.
#[no_mangle]
pub unsafe extern "C" fn OSSL_LIB_CTX_free(ctx: *mut c_void) {
    if ctx.is_null() || SHARED.get() == Some(&(ctx as usize)) {
        return;
    }
    // SAFETY: not the shared context; the caller gives it up.
    unsafe { free_real(ctx) }
}

/// `OSSL_LIB_CTX *OSSL_LIB_CTX_new_from_dispatch(const OSSL_CORE_HANDLE *,
/// const OSSL_DISPATCH *)`: libcrypto's, with the contexts it makes inside
/// fresh ones (see the module's documentation).
///
/// # Safety
/// As the C function: the arguments are a provider's core handle and
/// dispatch table.
#[no_mangle]
pub unsafe extern "C" fn OSSL_LIB_CTX_new_from_dispatch(
    handle: *const c_void,
    dispatch: *const c_void,
) -> *mut c_void {
    let f = *REAL_FROM_DISPATCH.get_or_init(|| next(c"OSSL_LIB_CTX_new_from_dispatch"));
    if f == 0 {
        return std::ptr::null_mut();
    }
    IN_DISPATCH.with(|d| d.set(d.get().saturating_add(1)));
    // SAFETY: `f` is libcrypto's function of this signature; the arguments
    // are the caller's, passed on unchanged.
    let ctx = unsafe { std::mem::transmute::<usize, FromDispatchFn>(f)(handle, dispatch) };
    IN_DISPATCH.with(|d| d.set(d.get().saturating_sub(1)));
    ctx
}

#[cfg(test)]
mod tests {
    // The test binary does not link libtss2-esys (which brings libcrypto
    // into the broker); these are libcrypto's, for the test to drive it.
    #[link(name = "crypto")]
    extern "C" {
        fn OPENSSL_version_major() -> std::ffi::c_uint;
        fn OSSL_PROVIDER_load(
            ctx: *mut std::ffi::c_void,
            name: *const std::ffi::c_char,
        ) -> *mut std::ffi::c_void;
        fn OSSL_PROVIDER_available(
            ctx: *mut std::ffi::c_void,
            name: *const std::ffi::c_char,
        ) -> std::ffi::c_int;
    }

    #[test]
    fn one_context_is_handed_out_and_never_freed() {
        // SAFETY: a constant getter without arguments.
        assert_eq!(unsafe { OPENSSL_version_major() }, 3);
        // SAFETY: no arguments; the context is only compared and "freed"
        // (which keeps it).
        let (a, b) = unsafe {
            let a = super::OSSL_LIB_CTX_new();
            super::OSSL_LIB_CTX_free(a);
            (a, super::OSSL_LIB_CTX_new())
        };
        assert!(!a.is_null());
        assert_eq!(a, b);
    }

    /// A provider loaded into the global context makes a child context of
    /// its own (the legacy provider does): that must not be the shared one,
    /// or the shared one would mirror the global context's providers.
    #[test]
    fn a_provider_loaded_globally_stays_out_of_the_shared_context() {
        assert!(super::no_config());
        // SAFETY: NULL is the global context; the names are NUL-terminated.
        unsafe {
            let shared = super::OSSL_LIB_CTX_new();
            assert!(!OSSL_PROVIDER_load(std::ptr::null_mut(), c"legacy".as_ptr()).is_null());
            assert_eq!(
                OSSL_PROVIDER_available(std::ptr::null_mut(), c"legacy".as_ptr()),
                1
            );
            assert_eq!(OSSL_PROVIDER_available(shared, c"legacy".as_ptr()), 0);
        }
    }
}
