#!/usr/bin/env bash
# Training throughput and peak memory of `lorakit train` on the default model: LoRA r=8 α=16,
# batch 4 × 256 tokens, AdamW, every token a target (as PEFT's reference run on this machine).
# Usage: bench/train.sh [RUNS] [STEPS] [TARGETS]      (defaults: 3 runs, 8 steps, q_proj,v_proj)
# Reports per run: median step time after the first step → tokens/s, and peak RSS
# (/usr/bin/time). Do not run while anything else compiles or benchmarks.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
runs="${1:-3}"
steps="${2:-8}"
targets="${3:-q_proj,v_proj}"
"$root/scripts/fetch-model.sh"
cargo build --release -q -p lorakit-cli --manifest-path "$root/Cargo.toml"
bin="$root/target/release/lorakit"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# 4 × 256-token rows from the reference fixture's token stream (real SmolLM2 tokens).
python3 "$root/bench/train_rows.py" "$work/data.jsonl"
for i in $(seq "$runs"); do
  rm -rf "$work/out"
  /usr/bin/time -f "%M" -o "$work/rss" "$bin" train --data "$work/data.jsonl" --out "$work/out" \
    --r 8 --alpha 16 --targets "$targets" --batch-size 4 --max-seq-len 256 --steps "$steps" \
    --no-shuffle --lr 1e-4 --quiet 2>/dev/null
  python3 - "$work/out/metrics.jsonl" "$work/rss" "$i" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
t = statistics.median(r["seconds"] for r in rows[1:])
tok = rows[1]["tokens"]
rss_kb = int(open(sys.argv[2]).read().split()[-1])
print(f"run {sys.argv[3]}: {tok / t:.0f} tokens/s (median step {t:.2f} s over {len(rows) - 1} steps), peak RSS {rss_kb / 1e6:.2f} GB")
PY
done
echo "PEFT reference on this machine (DESIGN.md): 286 tokens/s and 3.8 GB (fp32), 403 tokens/s (bf16 autocast)"
