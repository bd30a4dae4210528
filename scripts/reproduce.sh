#!/usr/bin/env bash
# Reproduces the LoRA paper's questions (Hu et al., 2021, sections 7.1-7.3) on the default model
# (SmolLM2-135M-Instruct) and the shipped E2E task, and writes docs/REPRODUCTION.md with its images
# in docs/reproduction/.
#
#   scripts/reproduce.sh [--quick]
#
# 1. `lorakit sweep`: target sets at a fixed budget (r = 8 on q_proj; r per set chosen to match)
#    and ranks r in {1, 2, 4, 8, 64} per target set; held-out loss on E2E validation data.
# 2. One more run, r = 8 on q_proj,v_proj with seed 1, for the seed comparison.
# 3. `lorakit analyze subspace`: r = 8 vs r = 64 and seed 0 vs seed 1, on q_proj and v_proj, for
#    lora_A and lora_B, each with a random Gaussian baseline.
# 4. `lorakit analyze amplification` on the r = 8 and r = 64 adapters.
# 5. scripts/reproduction_report.py (Python standard library) turns the outputs into the document.
#
# --quick: 30 steps per run, 32 validation examples, rank table on q_proj,v_proj only; under
#          20 minutes on 2 cores. Full: 400 steps per run (about 4 epochs), all 96 validation
#          examples, rank table on {q}, {q,v}, {q,k,v,o}; a few hours.
# Runs go to runs/reproduce[-quick]/ (git-ignored); finished sweep cells are skipped on a rerun.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
quick=0
case "${1:-}" in
  --quick) quick=1 ;;
  "") ;;
  *) echo "usage: scripts/reproduce.sh [--quick]" >&2; exit 2 ;;
esac
start=$(date +%s)

bash scripts/fetch-model.sh
bash scripts/fetch-data.sh e2e
cargo build --release -p lorakit-cli
bin="$root/target/release/lorakit"
model="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"

# The middle layer of SmolLM2's 30 for the heatmaps and the amplification table (the paper shows
# layer 48 of GPT-3's 96). Layer 0 is avoided on purpose: with one seed, the first module's
# initial A of r = 8 equals the first rows of r = 64's (the same random stream).
layer=15
if [ "$quick" = 1 ]; then
  run="$root/runs/reproduce-quick"
  steps=30; lr=1e-3; eval_lines=32
  rank_targets='"q_proj,v_proj"'
  mode="quick"
else
  run="$root/runs/reproduce"
  steps=400; lr=5e-4; eval_lines=96
  rank_targets='"q_proj", "q_proj,v_proj", "q_proj,k_proj,v_proj,o_proj"'
  mode="full"
fi
mkdir -p "$run"
head -n "$eval_lines" data/e2e/validation.jsonl > "$run/eval.jsonl"

cat > "$run/sweep.toml" <<TOML
out = "$run/sweep"
metric = "loss"

[train]
model = "$model"
data = "$root/data/e2e/train.jsonl"
eval_data = "$run/eval.jsonl"
steps = $steps
batch_size = 8
max_seq_len = 128
lr = $lr
alpha = 16.0
seed = 0

[grid]
r = [1, 2, 4, 8, 64]
targets = [$rank_targets]

[budget]
r = 8
reference = "q_proj"
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "q_proj,k_proj", "q_proj,v_proj", "q_proj,k_proj,v_proj,o_proj"]
TOML

echo "== 1/5 sweep ($mode) ==" >&2
"$bin" sweep --config "$run/sweep.toml"

cells="$run/sweep/cells"
r8="$cells/q_proj+v_proj-r8-a16-lr${lr}-s0"
r64="$cells/q_proj+v_proj-r64-a16-lr${lr}-s0"
# The sweep names cells with Rust's `{:e}` float format (1e-3, 5e-4).
[ -d "$r8" ] && [ -d "$r64" ] || { echo "missing sweep cells $r8 / $r64" >&2; exit 1; }

echo "== 2/5 second seed ==" >&2
seed1="$run/seed1-r8-qv"
if [ ! -f "$seed1/adapter_model.safetensors" ]; then
  "$bin" train --model "$model" --data data/e2e/train.jsonl --eval-data "$run/eval.jsonl" \
    --out "$seed1" --r 8 --alpha 16 --targets q_proj,v_proj --steps "$steps" --batch-size 8 \
    --max-seq-len 128 --lr "$lr" --seed 1 --quiet 2> "$run/seed1.log"
fi

echo "== 3/5 subspace similarity ==" >&2
an="$run/analysis"
for m in A B; do
  "$bin" analyze subspace --a "$r8" --b "$r64" --label-a "r=8" --label-b "r=64" \
    --matrix "$m" --out "$an/r8-vs-r64-$m" > /dev/null
  "$bin" analyze subspace --a "$r8" --b "$seed1" --label-a "seed 0" --label-b "seed 1" \
    --matrix "$m" --out "$an/seed0-vs-seed1-$m" > /dev/null
done

echo "== 4/5 amplification ==" >&2
"$bin" analyze amplification --model "$model" --adapter "$r8" --out "$an/amp-r8" > /dev/null
"$bin" analyze amplification --model "$model" --adapter "$r64" --out "$an/amp-r64" > /dev/null

echo "== 5/5 report ==" >&2
mkdir -p docs/reproduction
rm -f docs/reproduction/*.png
for cmp in r8-vs-r64 seed0-vs-seed1; do
  for m in A B; do
    for mod in q_proj v_proj; do
      cp "$an/$cmp-$m/phi_${mod}_${layer}.png" "docs/reproduction/${cmp}-${m}-${mod}-L${layer}.png"
    done
  done
done
end=$(date +%s)
python3 scripts/reproduction_report.py --run "$run" --mode "$mode" --steps "$steps" --lr "$lr" \
  --eval-lines "$eval_lines" --layer "$layer" --seconds $((end - start)) > docs/REPRODUCTION.md
echo "wrote docs/REPRODUCTION.md ($mode run, $((end - start)) s)" >&2
