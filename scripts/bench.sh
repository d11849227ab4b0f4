#!/usr/bin/env bash
# End-to-end load figures for the persons example, all in one run:
# CACHE=off vs cache on Redis (hits, misses) vs the memory store, a bare
# Redis GET as the floor, Redis commands per request, and Redis hung
# (SIGSTOP) vs CACHE=off. Needs redis-server and redis-benchmark on PATH.
#
#   bash scripts/bench.sh            # REQUESTS=4000 by default
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=${REQUESTS:-4000}
cargo build --release --example persons >/dev/null 2>&1
cargo build --release -p tower-redis-cache-load >/dev/null 2>&1
BIN=target/release/examples

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --save '' --appendonly no >/dev/null 2>&1 &
REDIS_PID=$!
PIDS=("$REDIS_PID")
cleanup() { kill -CONT "$REDIS_PID" 2>/dev/null || true; kill "${PIDS[@]}" 2>/dev/null || true; }
trap cleanup EXIT
sleep 0.5

start_server() { # name, env...
  local port; port=$(free_port)
  env PERSONS_ADDR="127.0.0.1:$port" RUST_LOG=error "${@:2}" "$BIN/persons" >/dev/null 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do curl -s "127.0.0.1:$port/health" >/dev/null && break; sleep 0.05; done
  eval "$1=127.0.0.1:$port"
}
start_server OFF CACHE=off
start_server REDIS REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
start_server MEMORY
ITEM=/persons/1
LIST='/persons?limit=20&name=Ana&sort=-name'

load() { target/release/load --requests "$REQUESTS" "$@"; }
row() { # label, load args...
  local out; out=$(load "${@:2}")
  printf '| %-34s | %s |\n' "$1" "$(echo "$out" | sed -E 's/requests=[0-9]+ //; s/ seen=.*//')"
}
per_request() { # label, load args... (Redis round trips per request, from MONITOR:
  # top-level commands carry the client address, script-internal ones "lua")
  local log; log=$(mktemp)
  redis-cli -p "$REDIS_PORT" monitor >"$log" &
  local monitor=$!
  sleep 0.3
  load --requests 200 "${@:2}" >/dev/null
  sleep 0.3
  kill "$monitor"; wait "$monitor" 2>/dev/null || true
  local top; top=$(grep -c '\[0 127.0.0.1:' "$log" || true)
  printf '| %-34s | %s |\n' "$1" "$(python3 -c "print(round($top / 200, 3))")"
  rm -f "$log"
}

echo "machine: $(nproc) cores, $(uname -m), $(redis-server --version | cut -d' ' -f3)"
echo
echo "| scenario | latency and throughput |"
echo "| --- | --- |"
for c in 1 16 64; do row "CACHE=off item, c=$c" --addr "$OFF" --path "$ITEM" --concurrency "$c"; done
row "CACHE=off list, c=1" --addr "$OFF" --path "$LIST"
load --addr "$REDIS" --path "$ITEM" --requests 10 >/dev/null
load --addr "$REDIS" --path "$LIST" --requests 10 >/dev/null
for c in 1 16 64; do row "redis item hit, c=$c" --addr "$REDIS" --path "$ITEM" --concurrency "$c"; done
row "redis list hit, c=1" --addr "$REDIS" --path "$LIST"
row "redis list miss (distinct skip), c=1" --addr "$REDIS" --path "$LIST" --vary skip
row "redis list miss (distinct skip), c=16" --addr "$REDIS" --path "/persons?limit=20&name=Bruno" --vary skip --concurrency 16
row "redis list miss (distinct skip), c=64" --addr "$REDIS" --path "/persons?limit=20&name=Carla" --vary skip --concurrency 64
row "CACHE=off list (distinct skip), c=1" --addr "$OFF" --path "$LIST" --vary skip
row "memory item hit, c=1" --addr "$MEMORY" --path "$ITEM"
echo
echo "Bare Redis GET round trip (redis-benchmark, 1 client), ms:"
redis-benchmark -p "$REDIS_PORT" -t get -n 20000 -c 1 --csv | tail -1
echo
echo "| Redis round trips per request | count |"
echo "| --- | --- |"
per_request "item hit" --addr "$REDIS" --path "$ITEM"
per_request "list hit" --addr "$REDIS" --path "$LIST"
per_request "list miss" --addr "$REDIS" --path '/persons?limit=5&name=Carla' --vary skip
echo
echo "Redis hung (SIGSTOP) vs CACHE=off, sequential:"
kill -STOP "$REDIS_PID"
echo "| scenario | latency and throughput |"
echo "| --- | --- |"
row "redis hung, item, c=1" --addr "$REDIS" --path "$ITEM"
row "CACHE=off, item, c=1" --addr "$OFF" --path "$ITEM"
echo "(the first requests pay the 100 ms deadline until the breaker opens)"
curl -s "$REDIS/cache/health"; echo
kill -CONT "$REDIS_PID"
