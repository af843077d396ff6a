#!/usr/bin/env bash
# RabbitMQ 4.x for the tests that must also pass on it: Debian 13's rabbitmq-server (4.0.5, Erlang 27)
# in a Debian 13 root of its own, made once with debootstrap (about a minute) and kept in
# $SEEDANCE_RABBITMQ4_ROOT (default /var/cache/seedance/rabbitmq4-root). The tests start the node in that
# root (tests/brokers.py), on ports of their own and with its own EPMD port, and stop it by PID.
set -euo pipefail
root="${SEEDANCE_RABBITMQ4_ROOT:-/var/cache/seedance/rabbitmq4-root}"
if [ -x "$root/usr/sbin/rabbitmq-server" ]; then exit 0; fi
export DEBIAN_FRONTEND=noninteractive
if ! command -v debootstrap >/dev/null 2>&1; then
  echo "ensure-rabbitmq4: installing debootstrap from the system packages" >&2
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi
echo "ensure-rabbitmq4: building a Debian 13 root with rabbitmq-server in $root (about a minute)" >&2
rm -rf "$root.partial"
mkdir -p "$(dirname "$root")"
debootstrap --variant=minbase --include=rabbitmq-server trixie "$root.partial" >"$root.log" 2>&1 || {
  echo "ensure-rabbitmq4: debootstrap failed; its log: $root.log" >&2
  tail -n 20 "$root.log" >&2
  exit 1
}
mv "$root.partial" "$root"
"$root/usr/sbin/rabbitmq-server" --help >/dev/null 2>&1 || true
echo "ensure-rabbitmq4: ready: $(ls "$root"/usr/lib/rabbitmq/lib/ 2>/dev/null | head -n 1)" >&2
