#!/usr/bin/env bash
# Installs what building, running and testing derived-keys needs on Debian.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: run as root (apt-get)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    keyutils swtpm swtpm-tools libtss2-dev pkg-config tpm2-tools openssl \
    python3 util-linux procps ca-certificates gcc libc6-dev >/dev/null
if ! command -v cargo >/dev/null 2>&1; then
    # Debian's own toolchain; the project needs Rust 1.75 or newer.
    apt-get install -y -qq --no-install-recommends cargo rustc >/dev/null
fi
echo "install-deps: system packages ready ($(cargo --version))"
