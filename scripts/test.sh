#!/usr/bin/env bash
# The full test suite: unit tests, derivation vectors, swtpm tests, and the
# tests that go through the real kernel request-key upcall. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "test: run as root: the tests install request-key rules and talk to the kernel" >&2
    exit 1
fi
# The kernel keeps a uid's user and user-session keyrings, made by its
# first request, until the host reboots (and every key in the system
# costs each plain read of /proc/keys). Those of the uids the tests run
# as in 4200 to 4399 (none of them an account here) are invalidated when
# the suite ends, however it ends, unless another run of the suite is
# still going (each holds a shared lock; the last one out cleans up).
# Both serials are looked up before either is invalidated: a lookup of one
# remakes the other if it has gone.
suite_lock=/run/derived-keys-tests.lock
exec 9>>"$suite_lock"
flock -s 9
forget_test_uids() {
    local u id ids
    flock -xn 9 || return 0
    for u in $(awk -F: '{ u = $1 + 0 } u >= 4200 && u <= 4399 { print u }' /proc/key-users); do
        getent passwd "$u" >/dev/null && continue
        local as=(setpriv --reuid "$u" --regid "$u" --clear-groups)
        ids="$("${as[@]}" keyctl id @u) $("${as[@]}" keyctl id @us)" || continue
        for id in $ids; do
            "${as[@]}" keyctl invalidate "$id" || true
        done
    done
}
trap forget_test_uids EXIT
# Every target but the handler binary's own test harness: the handler is
# no_std and linked statically (its pure parts are tested in the library
# and in derived-keys-core).
cargo test --locked -p derived-keys-core
# The fairness test bounds other uids' latency during a flood: it runs on
# its own, after the rest, so that the suite's own load does not count.
fair=a_csum_flood_by_one_uid_leaves_others_answered_in_time
cargo test --locked --lib --tests --benches --bin dkey --bin derived-keys-broker -- --test-threads=4 --skip "$fair"
cargo test --locked --test fairness -- --exact "$fair"
cargo test --locked --doc
# The PKCS#11 module: a crate of its own (a cdylib with the C ABI), tested
# through its C interface and with p11tool, pkcs11-tool and openssl.
# (The tests load the cdylib `cargo test` builds beside them.)
cargo build --locked --manifest-path pkcs11/Cargo.toml
cargo test --locked --manifest-path pkcs11/Cargo.toml
# Its TLS benchmark once, as a smoke test (3 handshakes each, seconds).
cargo test --locked --manifest-path pkcs11/Cargo.toml --benches
