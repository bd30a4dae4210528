#!/usr/bin/env bash
# Loss trajectory of the bf16 path against the f32 path: the quickstart's configuration (LoRA r=4
# α=32 on q,v, batch 8, lr 2e-3 with 10 warm-up steps and linear decay) on DATA_SET (default ner,
# the quickstart's; e2e where the bigbench archive is at hand) for STEPS optimiser steps (default
# 200) with the same seed and data order, then the per-step and the smoothed (20-step mean)
# relative difference of the losses. Usage: bench/bf16_vs_f32.sh [STEPS [DATA_SET]]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
steps="${1:-200}"
data_set="${2:-ner}"
"$root/scripts/fetch-model.sh"
"$root/scripts/fetch-data.sh" "$data_set"
cargo build --release -q -p lorakit-cli --manifest-path "$root/Cargo.toml"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for p in f32 bf16; do
  "$root/target/release/lorakit" train --data "$root/data/$data_set/train.jsonl" --out "$work/$p" \
    --r 4 --alpha 32 --targets q_proj,v_proj --batch-size 8 --lr 2e-3 --warmup 10 --schedule linear \
    --steps "$steps" --seed 0 --precision "$p" --quiet 2>/dev/null
done
python3 - "$work/f32/metrics.jsonl" "$work/bf16/metrics.jsonl" <<'PY'
import json, sys
def losses(p):
    return [json.loads(l)["loss"] for l in open(p) if '"loss"' in l]
a, b = losses(sys.argv[1]), losses(sys.argv[2])
rel = [abs(x - y) / x for x, y in zip(a, b)]
w = 20
sa = [sum(a[i:i + w]) / w for i in range(0, len(a) - w + 1, w)]
sb = [sum(b[i:i + w]) / w for i in range(0, len(b) - w + 1, w)]
srel = [abs(x - y) / x for x, y in zip(sa, sb)]
print(f"{len(a)} steps: per-step |bf16 - f32| / f32: max {max(rel):.4f}, mean {sum(rel) / len(rel):.4f}")
print(f"{w}-step means: max relative difference {max(srel):.4f}; f32 {sa[0]:.4f} → {sa[-1]:.4f}, bf16 {sb[0]:.4f} → {sb[-1]:.4f}")
PY
