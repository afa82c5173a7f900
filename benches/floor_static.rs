// The lowest floor: a do-nothing request-key handler with no std and no
// libc start-up, linked statically against musl like derived-key-helper
// (see build.rs). Compiled by the benchmark with rustc when musl is there.
#![no_std]
#![no_main]

extern "C" {
    fn syscall(n: i64, ...) -> i64;
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[no_mangle]
extern "C" fn rust_eh_personality() {}

#[no_mangle]
pub extern "C" fn main(argc: i32, argv: *const *const u8) -> i32 {
    if argc < 2 {
        return 2;
    }
    // SAFETY: argv[1] is a NUL-terminated string from the C runtime.
    let arg = unsafe { core::ffi::CStr::from_ptr((*argv.add(1)).cast()) };
    let key: i64 = core::str::from_utf8(arg.to_bytes())
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    const SYS_KEYCTL: i64 = 250;
    const KEYCTL_INSTANTIATE: i64 = 12;
    let payload = b"ok";
    // SAFETY: KEYCTL_INSTANTIATE reads `payload` for its length; no other memory.
    unsafe { syscall(SYS_KEYCTL, KEYCTL_INSTANTIATE, key, payload.as_ptr(), 2i64, 0i64) };
    0
}
