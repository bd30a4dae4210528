#!/usr/bin/env bash
# A 10-minute mixed load against `lorakit serve` (bench/serve_soak.py: completions and chats,
# streamed and not, the base and two adapters plus one loaded and unloaded at run time, short
# and long prompts, some clients disconnecting mid-stream), sampling the server's RSS every
# second from /proc; reports the peak against the memory budget the server prints at start.
# RSS does not need a quiet machine.
# Usage: bench/serve_soak.sh [SECONDS=600] [CLIENTS=6] [KV_BUDGET_MIB=256]
# (a KV budget small enough that the load fills it: requests then wait for room, and the
# budget the peak is held to is tight)
# LORAKIT=path/to/lorakit skips the release build. Exits 1 if the peak exceeds the budget.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seconds="${1:-600}"
clients="${2:-6}"
kv_mib="${3:-256}"
"$root/scripts/fetch-model.sh"
bin="${LORAKIT:-}"
if [ -z "$bin" ]; then
  cargo build --release -q -p lorakit-cli --manifest-path "$root/Cargo.toml"
  bin="${CARGO_TARGET_DIR:-$root/target}/release/lorakit"
fi
ad="$root/tests/fixtures/smollm2-peft-r8-qv/adapter"
log="$(mktemp)"
"$bin" serve --port 0 --served-model-name base --max-batch 16 --kv-budget-mib "$kv_mib" \
  --adapter a1="$ad" --adapter a2="$ad" 2>"$log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 600); do
  grep -q '^listening on ' "$log" && break
  kill -0 $pid 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.1
done
url="$(sed -n 's/^listening on //p' "$log" | head -1)"
[ -n "$url" ] || { cat "$log"; echo "the server did not start" >&2; exit 1; }
grep -E '^(KV cache budget|memory budget)' "$log"
budget="$(sed -n 's/^memory budget: .* = \([0-9]*\) MiB$/\1/p' "$log")"
[ -n "$budget" ] || { cat "$log"; echo "the server printed no memory budget" >&2; exit 1; }
status=0
python3 "$root/bench/serve_soak.py" --url "$url" --pid "$pid" --budget-mib "$budget" \
  --models base,a1,a2 --dyn-path "$ad" --seconds "$seconds" --clients "$clients" || status=$?
kill -TERM $pid
wait $pid
exit $status
