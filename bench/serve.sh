#!/usr/bin/env bash
# Throughput of `lorakit serve` on the default model: 1, 4, 8 and 16 concurrent streams, each
# over the base model and four adapters in turn (the PEFT fixture adapter loaded under four
# names, so each is a separate adapter to the server), greedy, 64 tokens per request.
# Prints aggregate tokens/s and p50/p99 time to first token and between tokens (bench/serve.py).
# Usage: bench/serve.sh [CONCURRENCY=1,4,8,16] [TOKENS=64] [REQUESTS_PER_STREAM=2]
# LORAKIT=path/to/lorakit skips the release build. Do not run while something else compiles
# or benchmarks: the machine has 2 cores.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
levels="${1:-1,4,8,16}"
tokens="${2:-64}"
requests="${3:-2}"
"$root/scripts/fetch-model.sh"
bin="${LORAKIT:-}"
if [ -z "$bin" ]; then
  cargo build --release -q -p lorakit-cli --manifest-path "$root/Cargo.toml"
  bin="$root/target/release/lorakit"
fi
ad="$root/tests/fixtures/smollm2-peft-r8-qv/adapter"
log="$(mktemp)"
"$bin" serve --port 0 --served-model-name base --max-batch 16 \
  --adapter a1="$ad" --adapter a2="$ad" --adapter a3="$ad" --adapter a4="$ad" 2>"$log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 600); do
  grep -q '^listening on ' "$log" && break
  kill -0 $pid 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.1
done
url="$(sed -n 's/^listening on //p' "$log" | head -1)"
[ -n "$url" ] || { cat "$log"; echo "the server did not start" >&2; exit 1; }
python3 "$root/bench/serve.py" --url "$url" --models base,a1,a2,a3,a4 \
  --concurrency "$levels" --tokens "$tokens" --requests "$requests"
kill -TERM $pid
wait $pid
