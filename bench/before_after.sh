#!/usr/bin/env bash
# Training and decode speed of this tree's `lorakit` against another revision's, side by side in
# one run on the default model (SmolLM2-135M): the two binaries alternate A B A B … so that a
# drifting machine affects both alike; medians and the after/before ratio are printed.
#
# Usage: bench/before_after.sh REV [ROUNDS]        (default 5 rounds)
#   REV is built once into a git worktree under bench/.cache/before-REV (release profile).
# Per round and binary:
#   train: LoRA r=8 α=16 on q_proj,v_proj, batch 4 × 256 tokens (bench/train.sh's data), 6 steps,
#          in bf16 (when the CPU has AVX512-BF16) and in f32; tokens/s = tokens per step over the
#          median step time after the first step
#   decode: `generate` greedy 96 new tokens in f32, the decode tokens/s it reports
# Do not run while anything else compiles or benchmarks: the machine has 2 cores.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rev="${1:?usage: bench/before_after.sh REV [ROUNDS]}"
rounds="${2:-5}"
"$root/scripts/fetch-model.sh"
cargo build --release -q -p lorakit-cli --manifest-path "$root/Cargo.toml"
after="$root/target/release/lorakit"

sha="$(git -C "$root" rev-parse --short "$rev")"
tree="$root/bench/.cache/before-$sha"
if [[ ! -d "$tree" ]]; then
  git -C "$root" worktree add --detach "$tree" "$sha" >/dev/null
fi
# The other revision's own target directory; the model is shared.
(cd "$tree" && cargo build --release -q -p lorakit-cli)
mkdir -p "$tree/models"
ln -sf "$root/models/SmolLM2-135M-Instruct.Q4_1.gguf" "$tree/models/"
before="$tree/target/release/lorakit"
model="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 "$root/bench/train_rows.py" "$work/data.jsonl"

precisions="f32"
if grep -q avx512_bf16 /proc/cpuinfo; then precisions="bf16 f32"; fi

# train BIN PRECISION -> tokens/s
train() {
  rm -rf "$work/out"
  "$1" train --model "$model" --data "$work/data.jsonl" --out "$work/out" --r 8 --alpha 16 \
    --targets q_proj,v_proj --batch-size 4 --max-seq-len 256 --steps 6 --no-shuffle --lr 1e-4 \
    --precision "$2" --quiet 2>/dev/null
  python3 - "$work/out/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
print(f'{rows[1]["tokens"] / statistics.median(r["seconds"] for r in rows[1:]):.1f}')
PY
}

# decode BIN -> tokens/s
decode() {
  "$1" generate --model "$model" --prompt "Once upon a time, there was a little girl named Lily who" \
    --max-new-tokens 96 --ignore-eos --stats 2>&1 >/dev/null | tail -1 |
    sed -E 's/.*decode ([0-9.]+) tokens\/s.*/\1/'
}

declare -A results
for i in $(seq "$rounds"); do
  for side in before after; do
    bin="$before"; [[ $side == after ]] && bin="$after"
    for p in $precisions; do results[$side.train.$p]+="$(train "$bin" "$p") "; done
    results[$side.decode]+="$(decode "$bin") "
  done
  echo "round $i done" >&2
done

echo "lorakit $sha (before) vs this tree (after), $rounds alternating rounds, $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
printf '%-22s %28s %28s %8s\n' "measure (tokens/s)" "before: median [min, max]" "after: median [min, max]" "ratio"
for m in $(for p in $precisions; do echo "train.$p"; done) decode; do
  python3 - "$m" "${results[before.$m]}" "${results[after.$m]}" <<'PY'
import statistics, sys
name, b, a = sys.argv[1], [float(x) for x in sys.argv[2].split()], [float(x) for x in sys.argv[3].split()]
fmt = lambda v: f"{statistics.median(v):.1f} [{min(v):.1f}, {max(v):.1f}]"
print(f"{name:<22} {fmt(b):>28} {fmt(a):>28} {statistics.median(a) / statistics.median(b):8.3f}")
PY
done
