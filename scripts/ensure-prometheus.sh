#!/usr/bin/env bash
# promtool and prometheus for the alert-rule tests and the live dashboard check: install Debian's
# package when missing (it brings both binaries; no service is started).
set -euo pipefail
if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then exit 0; fi
echo "ensure-prometheus: installing prometheus from the system packages" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
