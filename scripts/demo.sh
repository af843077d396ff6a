#!/usr/bin/env bash
# End to end, as a user would run it: RabbitMQ (started if none answers), the bundled mock (when no API
# key is set), the worker, one job from the bundled sample image followed to its terminal event, and a
# few of the worker's metrics. Everything it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
mkdir -p .demo
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

free_port() { "$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() {  # url, what
  for _ in $(seq 1 100); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "demo: $2 did not come up; its log is in .demo/" >&2; exit 1
}

if [ -z "${SEEDANCE_AMQP_URL:-}" ]; then
  scripts/ensure-rabbitmq.sh
  export SEEDANCE_AMQP_URL="amqp://guest:guest@127.0.0.1:5672/"
fi

if [ -z "${SEEDANCE_API_KEY:-}" ] && [ -z "${SEEDANCE_API_KEY_FILE:-}" ]; then
  port=$(free_port)
  # A time scale of 0.05 turns the ~60 s render of a 5 s clip into ~3 s.
  "$BIN/seedance-mock" --port "$port" --time-scale 0.05 --api-key demo-key --log-level warning > .demo/mock.log 2>&1 &
  pids+=($!)
  wait_http "http://127.0.0.1:$port/healthz" "the mock API"
  export SEEDANCE_API_BASE_URL="http://127.0.0.1:$port" SEEDANCE_API_KEY=demo-key SEEDANCE_POLL_SCALE=0.05
  export SEEDANCE_TRACKING_DELAYS_MS="${SEEDANCE_TRACKING_DELAYS_MS:-100,250,500,1000,5000}"
  echo "demo: no SEEDANCE_API_KEY set, so the bundled mock API runs on port $port"
else
  echo "demo: using the real API at ${SEEDANCE_API_BASE_URL:-https://api.highwayapi.ai}: this job is billed"
fi

# Keep the video: the gateway's URL dies (the mock's with the mock), the copy stays.
export SEEDANCE_STORAGE_URL="${SEEDANCE_STORAGE_URL:-file://$PWD/.demo/videos}"
metrics_port=$(free_port)
export SEEDANCE_METRICS_PORT=$metrics_port SEEDANCE_METRICS_HOST=127.0.0.1 SEEDANCE_LOG_FORMAT=text
export SEEDANCE_PROGRESS_INTERVAL_SECONDS="${SEEDANCE_PROGRESS_INTERVAL_SECONDS:-1}"
"$BIN/seedance-worker" > .demo/worker.log 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$metrics_port/readyz" "the worker"
echo "demo: worker ready; metrics on http://127.0.0.1:$metrics_port/metrics, log in .demo/worker.log"
echo "demo: enqueueing a job with worker/samples/boat.png and following its events:"
echo

"$BIN/seedance" enqueue --image worker/samples/boat.png --prompt 'a paper boat drifts across a calm pond' \
  --duration 5 --resolution 720p --metadata '{"source": "demo"}' --wait --timeout 600 | tee .demo/events.jsonl

echo
"$BIN/python" - .demo/events.jsonl <<'PY'
import json, sys
event = json.loads(open(sys.argv[1]).read().splitlines()[-1])
stored = event.get("stored_video")
if stored:
    where, size, digest = stored["url"].removeprefix("file://"), stored["bytes"], stored["sha256"]
    print(f"demo: the video is kept at {where} ({size} bytes, sha256 {digest[:16]}...)")
else:
    print(f"demo: no copy was kept: {event.get('storage_error')}")
PY

echo
echo "demo: a few of the worker's metrics:"
curl -fs "http://127.0.0.1:$metrics_port/metrics" \
  | grep -E '^seedance_(jobs_received_total|jobs_completed_total|polls_total|video_seconds_total|videos_stored_total|api_requests_total|worker_ready)' \
  | grep -v ' 0\.0$'
