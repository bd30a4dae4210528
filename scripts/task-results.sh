#!/usr/bin/env bash
# Base model vs LoRA vs full fine-tuning on the shipped tasks, each scored on its held-out test
# split: the table of docs/RESULTS.md, printed by one command.
#
#   scripts/task-results.sh [--reuse] [ner] [sarcasm] [sql] [e2e] [nli]
#                                     (no task: ner, sarcasm and sql, which the package registry
#                                      serves; e2e and nli need the bigbench archive at hand, see
#                                      scripts/fetch-data.sh)
#
# Per task: `lorakit eval` of the base model, `lorakit train` (LoRA) + eval, `lorakit train
# --full` + eval. The settings are fixed here (nothing was tuned on a test split):
#   ner  exact match of the entity list (greedy, 128 new tokens) + ROUGE-L of the same
#        predictions; LoRA r=4 a=32 q,v, the quickstart's recipe for 2 epochs.
#   sarcasm  label accuracy (highest log-likelihood of " yes"/" no") on the first 500 test
#        headlines; LoRA r=8 a=16 q,v, 300 steps.
#   e2e  BLEU (greedy, 64 new tokens) + ROUGE-L of the same predictions, and BLEU with the
#        paper's E2E decoding (beam 10, length penalty 0.9, no-repeat-ngram 4); LoRA r=4 a=32 q,v.
#        Both LoRA and full fine-tuning train 3 epochs with a snapshot per epoch; the epoch
#        with the best greedy BLEU on the validation split is the one scored on test (as one
#        picks a checkpoint in practice; the test split plays no part in the choice).
#   sql  SQL execution match + exact match of the same predictions;      LoRA r=8 a=16 q,v
#   nli  label accuracy (highest log-likelihood of " True"/" False"/" Neither") on the first 500
#        test examples; LoRA r=8 a=16 q,v
# Full fine-tuning uses the same data order, batch, steps, warm-up and schedule as the task's
# LoRA run, with Hugging Face Trainer's default learning rate
# for full fine-tuning (5e-5).
# Runs go to runs/results/TASK/{base,lora,full}/ (git-ignored). --reuse keeps a finished
# training run (its adapter or model is there) and a finished score (TASK/KIND.METRIC.score,
# newer than the run's output) instead of making them again: a rerun then only prints the table.
# Time on this 2-core machine: e2e about 20 min, sql about 45 min, nli about 50 min (ner and
# sarcasm: not timed yet).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
reuse=0
tasks=()
for a in "$@"; do
  case "$a" in
    --reuse) reuse=1 ;;
    ner | sarcasm | sql | e2e | nli) tasks+=("$a") ;;
    *) echo "usage: scripts/task-results.sh [--reuse] [ner] [sarcasm] [sql] [e2e] [nli]" >&2; exit 2 ;;
  esac
done
[ ${#tasks[@]} -gt 0 ] || tasks=(ner sarcasm sql)

bash scripts/fetch-model.sh
bash scripts/fetch-data.sh "${tasks[@]}"
cargo build --release -p lorakit-cli
bin="$root/target/release/lorakit"

# train TASK KIND ARGS...: trains runs/results/TASK/KIND unless --reuse finds it finished.
train() {
  local task="$1" kind="$2"
  shift 2
  local out="runs/results/$task/$kind"
  local done_marker="$out/adapter_model.safetensors"
  [ "$kind" = full ] && done_marker="$out/model/model.safetensors"
  if [ "$reuse" = 1 ] && [ -f "$done_marker" ]; then
    echo "[$task/$kind] reusing $out" >&2
    return
  fi
  rm -rf "$out"
  mkdir -p "runs/results/$task"
  echo "[$task/$kind] training -> $out" >&2
  local t0=$SECONDS
  "$bin" train --data "data/$task/train.jsonl" --eval-data "data/$task/validation.jsonl" \
    --out "$out" --seed 0 --quiet "$@" 2> "runs/results/$task/$kind.train.log"
  echo "$((SECONDS - t0))" > "runs/results/$task/$kind.train.seconds"
}

# model_args TASK KIND: the --model/--adapter flags that select the row's model (the snapshot
# chosen on validation data, where the task chooses one).
model_args() {
  local chosen="runs/results/$1/$2.chosen"
  case "$2" in
    base) ;;
    lora) echo "--adapter $(cat "$chosen" 2>/dev/null || echo "runs/results/$1/lora")" ;;
    full) echo "--model $(cat "$chosen" 2>/dev/null || echo "runs/results/$1/full/model")" ;;
  esac
}

# choose TASK KIND METRIC [ARGS]: scores every snapshot of the run (and the final model) on the
# validation split and writes the best one's path to TASK/KIND.chosen (ties: the earliest);
# the scores go to TASK/KIND.validation.
choose() {
  local task="$1" kind="$2" metric="$3"
  shift 3
  local run="runs/results/$task/$kind" chosen="runs/results/$task/$kind.chosen"
  if [ "$reuse" = 1 ] && [ -f "$chosen" ] && [ "$chosen" -nt "$run" ]; then
    return
  fi
  local candidates=("$run"/checkpoints/step-*) flag=--adapter
  if [ "$kind" = full ]; then
    candidates+=("$run/model")
    flag=--model
  fi
  local best="" best_score="" c s
  : > "$run.validation"
  for c in "${candidates[@]}"; do
    s=$("$bin" eval "$flag" "$c" --data "data/$task/validation.jsonl" --metric "$metric" \
      --json "$@" 2> "$run.validation.log" | json_score)
    echo "$c $s" >> "$run.validation"
    echo "[$task/$kind] validation $metric of $c: $s" >&2
    if [ -z "$best" ] || python3 -c "import sys; sys.exit(not float('$s') > float('$best_score'))"; then
      best="$c" best_score="$s"
    fi
  done
  echo "$best" > "$chosen"
}

# json_score: the "score" (already in percent) of `lorakit eval --json`'s summary on stdin.
json_score() {
  python3 -c 'import json, sys; print("%.2f" % json.load(sys.stdin)["score"])'
}

# score TASK KIND METRIC [--label NAME] [ARGS]: prints the metric's score (percent) of the row's model on the
# test split; predictions (for generating metrics) go to runs/results/TASK/KIND.predictions.
score() {
  local task="$1" kind="$2" metric="$3" name="$3"
  shift 3
  # --label NAME (anywhere in ARGS): the score and log are saved under NAME, not METRIC.
  local args=()
  while [ $# -gt 0 ]; do
    if [ "$1" = --label ]; then name="$2"; shift 2; else args+=("$1"); shift; fi
  done
  local saved="runs/results/$task/$kind.$name.score" trained="runs/results/$task/$kind"
  # The model a score belongs to: the run, or the snapshot chosen from it.
  [ -f "$trained.chosen" ] && trained="$trained.chosen"
  if [ "$reuse" = 1 ] && [ -f "$saved" ] && { [ "$kind" = base ] || [ "$saved" -nt "$trained" ]; }; then
    cat "$saved"
    return
  fi
  # shellcheck disable=SC2046
  "$bin" eval $(model_args "$task" "$kind") --data "data/$task/test.jsonl" --metric "$metric" \
    --json ${args[@]+"${args[@]}"} 2> "runs/results/$task/$kind.$name.log" | json_score > "$saved.new"
  mv "$saved.new" "$saved"
  cat "$saved"
}

# rescore TASK KIND METRIC: scores the saved predictions with another metric.
rescore() {
  "$bin" eval --predictions "runs/results/$1/$2.predictions" --data "data/$1/test.jsonl" \
    --metric "$3" --json | json_score
}

# trainable TASK KIND: the "trainable parameters" line of the run's log, shortened.
trainable() {
  [ "$2" = base ] && { echo "0"; return; }
  sed -n 's/^trainable parameters: \([0-9]*\) of [0-9]* (\([^)]*\)).*/\1 (\2)/p' \
    "runs/results/$1/$2.train.log" | head -n 1
}

table="runs/results/table.md"
mkdir -p runs/results
{
  echo "| task | model | trainable parameters | test metric | score | second metric | score | third metric | score |"
  echo "|---|---|---|---|---|---|---|---|---|"
} > "$table.new"

for task in "${tasks[@]}"; do
  third="" third_label="" third_args=() select=0
  case "$task" in
    ner)
      lora=(--r 4 --alpha 32 --targets q_proj,v_proj)
      sched=(--epochs 2 --batch-size 8 --warmup 10 --schedule linear)
      lora_lr=2e-3
      metric=exact; second=rouge-l
      gen=(--max-new-tokens 128)
      ;;
    e2e)
      lora=(--r 4 --alpha 32 --targets q_proj,v_proj)
      # 785 training lines = 99 steps of 8 per epoch: a snapshot per epoch, all three kept.
      sched=(--epochs 3 --batch-size 8 --warmup 10 --schedule linear --save-every 99 --keep-checkpoints 3)
      select=1
      lora_lr=2e-3
      metric=bleu; second=rouge-l
      gen=(--max-new-tokens 64)
      third=bleu; third_label="bleu (beam 10, lp 0.9, no-repeat 4)"
      third_args=(--decode beam --beams 10 --length-penalty 0.9 --no-repeat-ngram 4 --max-new-tokens 64)
      ;;
    sql)
      lora=(--r 8 --alpha 16 --targets q_proj,v_proj)
      sched=(--epochs 2 --batch-size 8 --warmup 5 --schedule linear)
      lora_lr=1e-3
      metric=sql-exec; second=exact
      gen=(--max-new-tokens 128)
      ;;
    sarcasm|nli)
      # Two-way (sarcasm) and three-way (nli) classification, scored by accuracy over the choices.
      # --eval-every: the validation loss every 100 steps, to watch for over-fitting.
      lora=(--r 8 --alpha 16 --targets q_proj,v_proj --eval-every 100)
      sched=(--steps 300 --batch-size 8 --warmup 10 --schedule linear)
      lora_lr=2e-3
      metric=accuracy; second=""
      # The first 500 of the 1000 test examples: each costs a forward pass per choice and
      # model in f32, and three models over all 1000 would take most of an hour here.
      gen=(--limit 500)
      ;;
  esac
  train "$task" lora "${lora[@]}" "${sched[@]}" --lr "$lora_lr"
  train "$task" full --full --precision f32 "${sched[@]}" --lr 5e-5
  if [ "$select" = 1 ]; then
    choose "$task" lora "$metric" "${gen[@]}"
    choose "$task" full "$metric" "${gen[@]}"
  fi
  for kind in base lora full; do
    if [ -n "$second" ]; then
      s1=$(score "$task" "$kind" "$metric" "${gen[@]}" \
        --save-predictions "runs/results/$task/$kind.predictions")
      s2=$(rescore "$task" "$kind" "$second")
    else
      s1=$(score "$task" "$kind" "$metric" "${gen[@]}")
      s2=""
    fi
    s3=""
    if [ -n "$third" ]; then
      s3=$(score "$task" "$kind" "$third" "${third_args[@]}" --label beam \
        --save-predictions "runs/results/$task/$kind.beam.predictions")
    fi
    echo "[$task/$kind] $metric $s1 ${second:+$second $s2} ${third:+$third_label $s3}" >&2
    name="$kind"
    if [ -f "runs/results/$task/$kind.chosen" ]; then
      name="$kind ($(basename "$(cat "runs/results/$task/$kind.chosen")" | sed 's/^model$/final/'))"
    fi
    echo "| $task | $name | $(trainable "$task" "$kind") | $metric | $s1 | $second | $s2 | $third_label | $s3 |" >> "$table.new"
  done
done
mv "$table.new" "$table"
cat "$table"
