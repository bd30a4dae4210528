#!/usr/bin/env bash
# Batch-1 greedy decode of any GGUF: lorakit over the file's own blocks (--precision gguf) and
# over f32 weights, beside transformers' fp32 decode of the same file (dequantised by
# transformers' own GGUF loader), alternating the three inside each round.
#
#   bench/decode_gguf.sh [--rounds R] [--new-tokens T] [--threads K] [--bin PATH] MODEL.gguf
#
# Defaults: 3 rounds, 64 new tokens, 2 threads. Prints every run, then the medians, the ratio
# lorakit gguf / transformers, and whether the three greedy texts are identical.
# decode tokens/s = (new tokens − 1) / (time after the first new token) on both sides, the
# definition of `lorakit generate --stats`. Uses bench/.venv (made by bench/compare.sh) and caches
# the converted HF model in bench/.cache/<file name>-hf. Run it on a quiet machine.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
die() { echo "decode_gguf.sh: error: $*" >&2; exit 1; }

rounds=3 new=64 threads=2 bin="$root/target/release/lorakit" gguf=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rounds) rounds="${2:?--rounds needs a value}"; shift 2 ;;
    --new-tokens) new="${2:?--new-tokens needs a value}"; shift 2 ;;
    --threads) threads="${2:?--threads needs a value}"; shift 2 ;;
    --bin) bin="${2:?--bin needs a path}"; shift 2 ;;
    -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown argument: $1" ;;
    *) [[ -z "$gguf" ]] || die "one MODEL.gguf, got '$gguf' and '$1'"; gguf="$1"; shift ;;
  esac
done
[[ -n "$gguf" ]] || die "give the GGUF file to decode with (e.g. models/gemma-3-270m.Q4_K_M.gguf)"
[[ -f "$gguf" ]] || die "no file $gguf (scripts/fetch-model.sh fetches the project's models)"
for v in rounds new threads; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "--${v//_/-} must be a positive integer, got '${!v}'"
done
[[ "$new" -ge 2 ]] || die "--new-tokens must be at least 2"
[[ -x "$bin" ]] || die "no lorakit binary at $bin (cargo build --release -p lorakit-cli)"
py="${LORAKIT_BENCH_PY:-$here/.venv/bin/python}"
[[ -x "$py" ]] || die "no $py: run bench/compare.sh once to create bench/.venv"

hf="$here/.cache/$(basename "$gguf" .gguf)-hf"
sha="$(sha256sum "$gguf" | cut -d' ' -f1)"
if [[ ! -f "$hf/model.safetensors" || "$(cat "$hf/.source.sha256" 2>/dev/null || true)" != "$sha" ]]; then
  echo "decode_gguf.sh: converting $(basename "$gguf") with transformers' GGUF loader into $hf ..." >&2
  rm -rf "$hf" "$hf.tmp"
  "$py" "$here/compare_peft.py" convert --gguf "$gguf" --out "$hf" >"$here/.cache/convert-decode.log" 2>&1 \
    || { tail -n 20 "$here/.cache/convert-decode.log" >&2; die "conversion failed"; }
  echo "$sha" >"$hf/.source.sha256"
fi

prompt="Once upon a time, there was a little girl named Lily who"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
runs="$work/runs.tsv"
: >"$runs"
lorakit_run() { # PRECISION ROUND
  RAYON_NUM_THREADS="$threads" "$bin" generate --model "$gguf" --precision "$1" --prompt "$prompt" \
    --max-new-tokens "$new" --ignore-eos --stats >"$work/text" 2>"$work/err" \
    || { cat "$work/err" >&2; die "lorakit generate --precision $1 failed"; }
  local rate
  rate="$(sed -nE 's/.*decode ([0-9.]+) tokens\/s.*/\1/p' "$work/err" | tail -1)"
  [[ -n "$rate" ]] || die "no decode rate in lorakit's --stats line"
  # lorakit prints the prompt and the continuation; keep the continuation.
  python3 -c 'import sys; t=open(sys.argv[1]).read(); p=sys.argv[2]; print(repr(t[len(p):].rstrip("\n") if t.startswith(p) else t))' \
    "$work/text" "$prompt" >"$work/cont"
  printf 'lorakit-%s\t%s\t%s\t%s\n' "$1" "$2" "$rate" "$(cat "$work/cont")" | tee -a "$runs"
}
transformers_run() { # ROUND
  OMP_NUM_THREADS="$threads" "$py" "$here/compare_peft.py" decode --model "$hf" --prompt "$prompt" \
    --new-tokens "$new" --threads "$threads" >"$work/hf.out" 2>"$work/hf.err" \
    || { tail -n 20 "$work/hf.err" >&2; die "transformers decode failed"; }
  python3 -c 'import json,sys; d=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); print("transformers-fp32", sys.argv[2], d["tokens_per_s"], repr(d["text"]), sep="\t")' \
    "$work/hf.out" "$1" | tee -a "$runs"
}

echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for r in $(seq "$rounds"); do
  lorakit_run gguf "$r"
  transformers_run "$r"
  lorakit_run f32 "$r"
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
python3 - "$runs" "$gguf" "$new" <<'EOF'
import statistics, sys
rows = [l.rstrip("\n").split("\t", 3) for l in open(sys.argv[1])]
by = {}
for tool, _, rate, text in rows:
    by.setdefault(tool, []).append((float(rate), text))
med = {t: statistics.median(r for r, _ in v) for t, v in by.items()}
print(f"{sys.argv[2]}, {sys.argv[3]} new tokens, greedy, batch 1, medians over {len(by['lorakit-gguf'])} rounds:")
for t, v in by.items():
    rates = [r for r, _ in v]
    print(f"  {t:18s} {med[t]:7.2f} tokens/s  (min {min(rates):.2f}, max {max(rates):.2f})")
print(f"  lorakit gguf / transformers fp32: {med['lorakit-gguf'] / med['transformers-fp32']:.2f}x")
print(f"  lorakit f32  / transformers fp32: {med['lorakit-f32'] / med['transformers-fp32']:.2f}x")
texts = {t: {x for _, x in v} for t, v in by.items()}
same = texts["lorakit-gguf"] == texts["lorakit-f32"] and len(texts["lorakit-gguf"]) == 1
print(f"  greedy text lorakit gguf == lorakit f32: {'yes' if same else 'NO'}")
print(f"  greedy text lorakit gguf == transformers: {'yes' if texts['lorakit-gguf'] == texts['transformers-fp32'] else 'no'}")
EOF
