#!/usr/bin/env bash
# lorakit serve against llama.cpp's llama-server on the same load, in one run, alternating:
# the same f32 base (the default SmolLM2-135M, its Q4_1 GGUF dequantised and written as an F32
# GGUF by `lorakit merge`, so both servers do f32 arithmetic on the same weights), the same
# adapter under four names (the PEFT fixture; for llama-server exported with `lorakit export`
# to f32 GGUF, one `--lora` per name, `--lora-init-without-apply`, each request selecting its
# adapter with the per-request `lora` field), greedy, TOKENS tokens per request, 1/4/8/16
# concurrent streams over the base and the four adapters in turn (bench/serve.py), 2 threads
# each, llama-server with -np 16 slots (>= the streams). Each round starts lorakit serve, runs
# every level, stops it, then does the same with llama-server; ROUNDS rounds.
# Prints each run's table (aggregate tokens/s, p50/p99 TTFT and time between tokens) and, per
# level, the best round of each server and the ratio lorakit / llama-server.
#
# Usage: bench/serve_vs_llama.sh [CONCURRENCY=1,4,8,16] [TOKENS=64] [REQUESTS_PER_STREAM=2] [ROUNDS=2]
# LORAKIT=path/to/lorakit skips the release build; LLAMA_SERVER=path/to/llama-server skips
# `scripts/build-llama-cpp.sh --server` (about 15 minutes the first time). Do not run while
# something else compiles or benchmarks: the machine has 2 cores.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
levels="${1:-1,4,8,16}"
tokens="${2:-64}"
requests="${3:-2}"
rounds="${4:-2}"
threads=2
"$root/scripts/fetch-model.sh"
bin="${LORAKIT:-}"
if [ -z "$bin" ]; then
  cargo build --release -q -p lorakit-cli --manifest-path "$root/Cargo.toml"
  bin="${CARGO_TARGET_DIR:-$root/target}/release/lorakit"
fi
llama="${LLAMA_SERVER:-}"
if [ -z "$llama" ]; then
  llama="$("$root/scripts/build-llama-cpp.sh" --server)"
fi
ad="$root/tests/fixtures/smollm2-peft-r8-qv/adapter"
work="$(mktemp -d)"
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# The f32 base: merging the adapter with weight 0 adds nothing, so this is the base's weights.
"$bin" merge --adapter "$ad:0" --out "$work/base-f32.gguf" --type f32 >&2
"$bin" export --model "$work/base-f32.gguf" --adapter "$ad" --out "$work/a.gguf" --type f32 >&2
for i in 1 2 3 4; do cp "$work/a.gguf" "$work/a$i.gguf"; done

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_ready URL LOG: until GET URL/health answers 200 (llama-server says 503 while loading).
wait_ready() {
  for _ in $(seq 1200); do
    if python3 - "$1" <<'EOF' 2>/dev/null; then return 0; fi
import sys, urllib.request
sys.exit(0 if urllib.request.urlopen(sys.argv[1] + "/health", timeout=2).status == 200 else 1)
EOF
    kill -0 "$pid" 2>/dev/null || { cat "$2" >&2; echo "the server exited" >&2; exit 1; }
    sleep 0.1
  done
  cat "$2" >&2
  echo "the server did not become ready" >&2
  exit 1
}

stop() {
  kill -TERM "$pid"
  wait "$pid" || true
  pid=""
}

for round in $(seq "$rounds"); do
  port="$(free_port)"
  log="$work/lorakit.log"
  RAYON_NUM_THREADS=$threads "$bin" serve --model "$work/base-f32.gguf" --port "$port" \
    --served-model-name base --max-batch 16 \
    --adapter a1="$ad" --adapter a2="$ad" --adapter a3="$ad" --adapter a4="$ad" 2>"$log" &
  pid=$!
  wait_ready "http://127.0.0.1:$port" "$log"
  echo "## round $round: lorakit serve"
  python3 "$root/bench/serve.py" --url "http://127.0.0.1:$port" --models base,a1,a2,a3,a4 \
    --concurrency "$levels" --tokens "$tokens" --requests "$requests" \
    --json-out "$work/lorakit-$round.json" | sed '$d'
  stop

  port="$(free_port)"
  log="$work/llama.log"
  # -c: 16 slots of 256 positions (prompt + 64 tokens fit); no web UI.
  "$llama" -m "$work/base-f32.gguf" --host 127.0.0.1 --port "$port" -t $threads -tb $threads \
    -np 16 -c 4096 --no-webui --lora-init-without-apply \
    --lora "$work/a1.gguf" --lora "$work/a2.gguf" --lora "$work/a3.gguf" --lora "$work/a4.gguf" \
    >"$log" 2>&1 &
  pid=$!
  wait_ready "http://127.0.0.1:$port" "$log"
  echo "## round $round: llama-server"
  python3 "$root/bench/serve.py" --url "http://127.0.0.1:$port" --models base,a1,a2,a3,a4 \
    --llama-lora --concurrency "$levels" --tokens "$tokens" --requests "$requests" \
    --json-out "$work/llama-$round.json" | sed '$d'
  stop
done

python3 - "$work" "$rounds" <<'EOF'
import json, sys
work, rounds = sys.argv[1], int(sys.argv[2])
def best(side):
    runs = [json.load(open(f"{work}/{side}-{r}.json")) for r in range(1, rounds + 1)]
    return [max((run[i] for run in runs), key=lambda row: row["tokens_per_s"])
            for i in range(len(runs[0]))]
ours, theirs = best("lorakit"), best("llama")
print(f"## best of {rounds} rounds")
print("| streams | lorakit tokens/s | llama-server tokens/s | lorakit / llama-server | "
      "TTFT p50 / p99 ms (lorakit; llama-server) | between tokens p50 / p99 ms (lorakit; llama-server) | errors |")
print("|---|---|---|---|---|---|---|")
for a, b in zip(ours, theirs):
    print(f"| {a['streams']} | {a['tokens_per_s']} | {b['tokens_per_s']} | "
          f"{a['tokens_per_s'] / b['tokens_per_s']:.2f} | "
          f"{a['ttft_p50_ms']} / {a['ttft_p99_ms']}; {b['ttft_p50_ms']} / {b['ttft_p99_ms']} | "
          f"{a['itl_p50_ms']} / {a['itl_p99_ms']}; {b['itl_p50_ms']} / {b['itl_p99_ms']} | "
          f"{a['errors']}; {b['errors']} |")
EOF
