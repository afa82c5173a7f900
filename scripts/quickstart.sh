#!/usr/bin/env bash
# Quick start, as root on Debian: installs what is needed, builds, installs
# derived-keys (with an embedded software TPM where there is no TPM device)
# and shows the main job through plain keyctl and openssl.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "quickstart: run as root" >&2
    exit 1
fi
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "system packages"
bash scripts/install-deps.sh
say "build (release)"
cargo build --release --locked
cargo build --release --locked --manifest-path pkcs11/Cargo.toml
bin="${CARGO_TARGET_DIR:-target}/release"
say "install: handler, request-key rule, configuration"
"$bin/dkey" install
"$bin/dkey" status

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Everything below is plain keyctl and openssl, in a fresh session keyring.
keyctl session - bash -euo pipefail -c '
work=$1
say() { printf "\n\033[1m== %s\033[0m\n" "$*"; }

say "a 32-byte key for this user: keyctl request2 user derived:quickstart \"32 user\" @s"
id=$(keyctl request2 user derived:quickstart "32 user" @s)
keyctl pipe "$id" | od -An -tx1 | tr -d " \n"; echo
again=$(keyctl request2 user "derived:quickstart#again" "32 user" @s)
if [ "$(keyctl pipe "$id" | od -An -tx1)" = "$(keyctl pipe "$again" | od -An -tx1)" ]; then
    echo "asked again: the same key (nothing was stored; the TPM re-derived it)"
else
    echo "asked again: a DIFFERENT key"; exit 1
fi

say "the host P-256 public key: derived:quickstart-host:pub \"p256 machine\""
keyctl request2 user derived:quickstart-host:pub "p256 machine" @s | xargs keyctl pipe > "$work/host.der"
openssl pkey -pubin -inform DER -in "$work/host.der" -out "$work/host.pem"
cat "$work/host.pem"

say "sign a message with it (the private key never leaves the handler), verify with openssl"
printf "hello from %s\n" "$(hostname)" > "$work/message"
digest=$(openssl dgst -sha256 -r "$work/message" | cut -c1-64)
keyctl request2 user "derived:quickstart-host:sign:$digest" "p256 machine" @s | xargs keyctl pipe > "$work/sig.der"
openssl dgst -sha256 -verify "$work/host.pem" -signature "$work/sig.der" "$work/message"
' quickstart "$work"

say "done: see README.md for the library, dkey and the configuration"
