#!/usr/bin/env bash
# Data-parallel training on this machine: the same LoRA run (default model, r=8 on q,v, 4 × 256
# token micro-batches, 2 micro-batches per step) on 1 process with 2 threads and on 2 MPI ranks
# with 1 thread each, side by side. Reports per configuration the median step time and, for
# the ranks, the median time spent gathering the gradients (metrics.jsonl `gather_seconds`),
# then projects the gather cost to more machines (see bench/RESULTS.md for the formula).
# Usage: bench/mpi.sh [STEPS]   (default 8). Do not run while anything else compiles.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
steps="${1:-8}"
"$root/scripts/fetch-model.sh"
"$root/scripts/install-mpi.sh"
cargo build --release -q -p lorakit-cli --features mpi --bin lorakit-mpi --manifest-path "$root/Cargo.toml"
bin="$root/target/release/lorakit-mpi"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 "$root/bench/train_rows.py" "$work/data.jsonl"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
args=(train --data "$work/data.jsonl" --r 8 --alpha 16 --batch-size 4 --grad-accum 2
      --max-seq-len 256 --steps "$steps" --no-shuffle --lr 1e-4 --precision f32 --quiet)
RAYON_NUM_THREADS=2 "$bin" "${args[@]}" --out "$work/one" 2>/dev/null
RAYON_NUM_THREADS=1 mpirun --oversubscribe -np 2 -x RAYON_NUM_THREADS --mca btl self,vader \
    "$bin" "${args[@]}" --out "$work/two" 2>/dev/null
python3 - "$work/one/metrics.jsonl" "$work/two/metrics.jsonl" <<'PY'
import json, statistics, sys
def rows(p):
    return [json.loads(l) for l in open(p) if '"loss"' in l][1:]  # the first step warms up
one, two = rows(sys.argv[1]), rows(sys.argv[2])
t1 = statistics.median(r["seconds"] for r in one)
t2 = statistics.median(r["seconds"] for r in two)
g2 = statistics.median(r["gather_seconds"] for r in two)
same = [r["loss"] for r in one] == [r["loss"] for r in two]
print(f"1 process × 2 threads: median step {t1:.3f} s")
print(f"2 ranks × 1 thread:    median step {t2:.3f} s, of which gathering gradients {g2 * 1e3:.1f} ms ({100 * g2 / t2:.2f}%)")
print(f"per-step losses identical: {same}")
PY
