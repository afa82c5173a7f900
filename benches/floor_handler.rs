// The floor: a request-key handler that does nothing but instantiate the
// key with two bytes. Plain std Rust, no crates, compiled by the benchmark
// with `rustc -O`, so the comparison with derived-key-helper is fair.
extern "C" {
    fn syscall(n: i64, ...) -> i64;
}

fn main() {
    let key: i64 = std::env::args()
        .nth(1)
        .and_then(|k| k.parse().ok())
        .unwrap_or(0);
    const SYS_KEYCTL: i64 = 250;
    const KEYCTL_INSTANTIATE: i64 = 12;
    let payload = b"ok";
    // SAFETY: KEYCTL_INSTANTIATE reads `payload` for its length; no other memory.
    unsafe {
        syscall(
            SYS_KEYCTL,
            KEYCTL_INSTANTIATE,
            key,
            payload.as_ptr(),
            2i64,
            0i64,
        )
    };
}
