#!/usr/bin/env bash
# tinyproxy, the real forward proxy of the proxy tests (HTTP_PROXY, HTTPS_PROXY, NO_PROXY): install
# Debian's package when missing. The tests run it themselves, in the foreground, on a port of their own.
set -euo pipefail
if command -v tinyproxy >/dev/null 2>&1; then exit 0; fi
echo "ensure-tinyproxy: installing tinyproxy from the system packages" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends tinyproxy >/dev/null
