#!/usr/bin/env bash
# QLoRA against the float paths on the quickstart's recipe: does training over the GGUF's own
# blocks follow training over the same weights dequantised to f32, and does it gain as much on
# held-out data?
#
#   bench/qlora_trajectory.sh [--steps N] [--model FILE.gguf] [--data ner|e2e] [--keep DIR] [RUN ...]
#
# --keep DIR keeps every run's output there, and a later call with the same DIR reuses a run whose
# name, flags, steps and model are unchanged (so new runs can join earlier ones); the report names
# the lorakit binary (sha256 prefix) each run used.
#
# A RUN is NAME=PRECISION[,EXTRA FLAGS...] for `lorakit train`, e.g. gguf=gguf or
# gguf-f32=gguf,--gguf-compute,f32. Default runs: f32=f32 bf16=bf16 gguf=gguf.
# Every run: LoRA r=4 α=32 on q_proj,v_proj, batches of 8 examples of the data set (default: the
# quickstart's financial NER; e2e where the bigbench archive is at hand, as every run before
# 2026-12-07), lr 2e-3, 10 warm-up steps, linear decay, seed 0 (the quickstart's recipe), N steps
# (default 200). Then the mean loss on the data set's held-out test split, base and adapted, with
# the run's own precision.
# Reports: every 20-step mean loss of each run against the f32 run (relative difference), and each
# run's held-out gain (base − adapted) / base against the bf16 run's. The first run named f32 is
# the reference; bf16 the gain reference. Not a timing: the load does not matter.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
die() { echo "qlora_trajectory.sh: error: $*" >&2; exit 1; }

steps=200 model="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf" keep="" runs=() data_set=ner
bin="${LORAKIT_BIN:-$root/target/release/lorakit}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --steps) steps="${2:?--steps needs a value}"; shift 2 ;;
    --model) model="${2:?--model needs a file}"; shift 2 ;;
    --keep) keep="${2:?--keep needs a directory}"; shift 2 ;;
    --data) data_set="${2:?--data needs a data set}"; shift 2 ;;
    -h|--help) sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown argument: $1" ;;
    *=*) runs+=("$1"); shift ;;
    *) die "a run is NAME=PRECISION[,FLAGS...], got '$1'" ;;
  esac
done
[[ ${#runs[@]} -gt 0 ]] || runs=(f32=f32 bf16=bf16 gguf=gguf)
[[ "$steps" =~ ^[1-9][0-9]*$ ]] || die "--steps must be a positive integer, got '$steps'"
[[ -x "$bin" ]] || die "no lorakit binary at $bin (cargo build --release -p lorakit-cli, or LORAKIT_BIN)"
[[ -f "$model" ]] || die "no model $model (scripts/fetch-model.sh)"
"$root/scripts/fetch-data.sh" "$data_set" >/dev/null || die "scripts/fetch-data.sh $data_set failed"
data="$root/data/$data_set"

if [[ -n "$keep" ]]; then mkdir -p "$keep"; work="$keep"; else work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT; fi
echo "qlora_trajectory.sh: $(basename "$model"), $steps steps, runs: ${runs[*]}; work in $work" >&2
for spec in "${runs[@]}"; do
  name="${spec%%=*}"
  IFS=',' read -ra flags <<<"${spec#*=}"
  prec="${flags[0]}"
  extra=("${flags[@]:1}")
  out="$work/$name"
  stamp="$spec $steps $data_set $(sha256sum "$model" | cut -c1-16)"
  if [[ -n "$keep" && -f "$work/$name.adapted.eval" && "$(head -n1 "$work/$name.stamp" 2>/dev/null)" == "$stamp" ]]; then
    echo "== $name: reusing the run in $out" >&2
    continue
  fi
  rm -rf "$out" "$work/$name.stamp" "$work/$name.adapted.eval"
  echo "== $name: lorakit train --precision $prec ${extra[*]}" >&2
  /usr/bin/time -f %M -o "$work/$name.rss" "$bin" train --model "$model" --data "$data/train.jsonl" --out "$out" \
    --r 4 --alpha 32 --targets q_proj,v_proj --steps "$steps" --batch-size 8 --lr 2e-3 --warmup 10 \
    --schedule linear --seed 0 --quiet --precision "$prec" "${extra[@]}" 2>"$work/$name.log" \
    || { tail -n 20 "$work/$name.log" >&2; die "training $name failed"; }
  for which in base adapted; do
    adapter=()
    [[ "$which" == adapted ]] && adapter=(--adapter "$out")
    "$bin" eval --model "$model" "${adapter[@]}" --precision "$prec" --data "$data/test.jsonl" \
      --metric loss >"$work/$name.$which.eval" 2>"$work/$name.$which.err" \
      || { cat "$work/$name.$which.err" >&2; die "eval of $name ($which) failed"; }
  done
  printf '%s\n%s\n' "$stamp" "$(sha256sum "$bin" | cut -c1-12)" >"$work/$name.stamp"
done

python3 - "$work" "$steps" "${runs[@]}" <<'EOF'
import json, re, statistics, sys
work, steps, specs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
names = [s.split("=", 1)[0] for s in specs]

def losses(name):
    out = {}
    for line in open(f"{work}/{name}/metrics.jsonl"):
        d = json.loads(line)
        if "loss" in d and "step" in d and "eval_loss" not in d:
            out[d["step"]] = d["loss"]
    return [out[s] for s in sorted(out)]

def eval_loss(path):
    text = open(path).read()
    m = re.search(r'"loss"\s*:\s*([0-9.eE+-]+)', text) or re.search(r"loss[^0-9]*([0-9]+\.[0-9]+)", text)
    if not m:
        sys.exit(f"no loss in {path}: {text[:200]!r}")
    return float(m.group(1))

curves = {n: losses(n) for n in names}
for n, c in curves.items():
    if len(c) != steps:
        sys.exit(f"{n}: {len(c)} step losses in metrics.jsonl, expected {steps}")
ref = "f32" if "f32" in curves else names[0]
means = {n: [statistics.fmean(c[i:i + 20]) for i in range(0, steps, 20)] for n, c in curves.items()}
print(f"20-step mean training loss (relative difference to {ref}):")
print("steps     " + "".join(f"{n:>22s}" for n in names))
worst = {n: 0.0 for n in names}
for i, m_ref in enumerate(means[ref]):
    row = f"{20 * i + 1:>4}-{min(20 * i + 20, steps):<4} "
    for n in names:
        rel = (means[n][i] - m_ref) / m_ref
        worst[n] = max(worst[n], abs(rel))
        row += f"{means[n][i]:>12.4f} ({rel:+7.2%})"
    print(row)
print("worst |relative difference| of a 20-step mean: " + ", ".join(f"{n} {worst[n]:.2%}" for n in names))
gains = {}
for n in names:
    base, after = eval_loss(f"{work}/{n}.base.eval"), eval_loss(f"{work}/{n}.adapted.eval")
    gains[n] = (base - after) / base
    peak = int(open(f"{work}/{n}.rss").read().split()[-1]) / 1e6
    binary = open(f"{work}/{n}.stamp").read().split("\n")[1]
    print(f"{n}: held-out loss {base:.4f} -> {after:.4f}, gain {gains[n]:.2%}; peak RSS {peak:.2f} GB; lorakit {binary}")
gref = "bf16" if "bf16" in gains else ref
for n in names:
    print(f"held-out gain {n} / {gref}: {gains[n] / gains[gref]:.4f} ({gains[n] / gains[gref] - 1:+.2%})")
EOF
