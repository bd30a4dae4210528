#!/usr/bin/env bash
# Batch-1 decode speed of `lorakit generate` on the default model (f32 weights, greedy, KV cache).
# Prints each run's tokens/s and the median. Usage: bench/decode.sh [RUNS] [NEW_TOKENS]
# Do not run while something else compiles or benchmarks: the machine has 2 cores.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
runs="${1:-7}"
new="${2:-128}"
"$root/scripts/fetch-model.sh"
cargo build --release -q -p lorakit-cli --manifest-path "$root/Cargo.toml"
bin="$root/target/release/lorakit"
rates=()
for i in $(seq "$runs"); do
  line="$("$bin" generate --prompt "Once upon a time, there was a little girl named Lily who" \
           --max-new-tokens "$new" --ignore-eos --stats 2>&1 >/dev/null | tail -1)"
  rate="$(sed -E 's/.*decode ([0-9.]+) tokens\/s.*/\1/' <<<"$line")"
  echo "run $i: $line"
  rates+=("$rate")
done
printf '%s\n' "${rates[@]}" | sort -g | awk '{a[NR]=$1} END {printf "median decode: %.1f tokens/s over %d runs (transformers fp32 reference on this machine: 22 tokens/s)\n", (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2), NR}'
