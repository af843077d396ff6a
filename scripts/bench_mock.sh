#!/usr/bin/env bash
# Requests per second the mock serves over a real socket, measured with wrk (installed when missing):
# three 5 s runs per endpoint, 32 connections, one wrk thread; prints each run and the median.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
port=${BENCH_MOCK_PORT:-18931}
.venv/bin/seedance-mock --port "$port" --time-scale 0.001 --log-level warning &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
base="http://127.0.0.1:$port"
curl -fs -XPOST "$base/_mock/config" -d '{"model_rpm":null,"quotas":{"default":{},"flex":{}}}' >/dev/null
body='{"image":"https://example.com/a.png","prompt":"a cat","duration":5}'
task=$(curl -fs -XPOST "$base/v3/async/seedance-v1.5-pro-i2v" -H 'Authorization: Bearer k' -d "$body" \
  | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["task_id"])')
lua=$(mktemp)
cat > "$lua" <<LUA
wrk.method = "POST"
wrk.body = '$body'
wrk.headers["Authorization"] = "Bearer k"
wrk.headers["Content-Type"] = "application/json"
LUA

measure() {  # name, then wrk arguments
  local name=$1; shift
  local runs=()
  local out
  for _ in 1 2 3; do
    out=$(wrk -t1 -c32 -d5s "$@")
    if grep -q "Non-2xx" <<<"$out"; then echo "mock $name: some answers were not 2xx:" >&2; echo "$out" >&2; exit 1; fi
    runs+=("$(awk '/Requests\/sec/ {print int($2)}' <<<"$out")")
  done
  local median
  median=$(printf '%s\n' "${runs[@]}" | sort -n | sed -n 2p)
  echo "mock $name: runs ${runs[*]} req/s, median $median req/s"
}
measure "GET task-result" -H 'Authorization: Bearer k' "$base/v3/async/task-result?task_id=$task"
measure "POST submit" -s "$lua" "$base/v3/async/seedance-v1.5-pro-i2v"
rm -f "$lua"
