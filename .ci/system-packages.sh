#!/usr/bin/env bash
# System (Debian) packages the tests need beyond python3/gcc/make: a real Prometheus Pushgateway
# and headless Chromium (report screenshot). Idempotent: installs only what is missing.
set -euo pipefail
missing=()
command -v prometheus-pushgateway >/dev/null || [ -x /usr/bin/prometheus-pushgateway ] || missing+=(prometheus-pushgateway)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "installing system packages: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
