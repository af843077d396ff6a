#!/usr/bin/env bash
# Make sure a RabbitMQ answers on 127.0.0.1:5672: start the local one, installing it first if missing.
# Does nothing when SEEDANCE_AMQP_URL points elsewhere or a broker already answers.
set -euo pipefail

reachable() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if reachable; then exit 0; fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "ensure-rabbitmq: installing rabbitmq-server from the system packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq rabbitmq-server >/dev/null
fi
echo "ensure-rabbitmq: starting rabbitmq-server" >&2
rabbitmq-server -detached >/dev/null 2>&1 || true
for _ in $(seq 1 90); do
  if reachable; then
    rabbitmqctl await_startup >/dev/null 2>&1 || true
    exit 0
  fi
  sleep 1
done
echo "ensure-rabbitmq: RabbitMQ did not come up on 127.0.0.1:5672 within 90 s" >&2
exit 1
