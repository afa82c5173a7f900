#!/usr/bin/env bash
# Installs what building, running and testing derived-keys needs on Debian.
# Skips apt entirely when everything is already there.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: run as root (apt-get)" >&2
    exit 1
fi
packages=(keyutils swtpm swtpm-tools libtss2-dev pkg-config tpm2-tools openssl
          python3 python3-cryptography util-linux procps ca-certificates gcc binutils libc6-dev musl-dev git
          openssh-client openssh-server cryptsetup-bin wireguard-tools e2fsprogs
          systemd opensc gnutls-bin)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
need_rust=0
command -v cargo >/dev/null 2>&1 || need_rust=1
if [ "${#missing[@]}" -gt 0 ] || [ "$need_rust" -eq 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    if [ "${#missing[@]}" -gt 0 ]; then
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if [ "$need_rust" -eq 1 ]; then
        # Debian 12's plain rustc is too old (1.63); rustc-web tracks current Rust.
        apt-get install -y -qq --no-install-recommends cargo-web rustc-web >/dev/null \
            || apt-get install -y -qq --no-install-recommends cargo rustc >/dev/null
    fi
fi
echo "install-deps: system packages ready ($(cargo --version))"
