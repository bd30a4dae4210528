#!/usr/bin/env bash
# lorakit and HF PEFT side by side, in one run, on the same model, data and configuration.
#
#   bench/compare.sh [--rounds R] [--steps N] [--parts train,decode,peak,e2e] [--new-tokens T]
#                    [--threads K] [--lorakit-precision auto|f32|f32,bf16] [--results FILE]
#                    [--epoch-data ner|e2e] [--epoch-precision P1,P2…] [--no-build | --bin PATH]
#
# Defaults: 3 rounds, 8 training steps, train and decode, 128 new tokens, 2 threads, results printed only.
# --epoch-precision: lorakit's precisions in the e2e part (default: the train part's, plus gguf-int8
# where the binary has it); e.g. bf16 alone makes a round of the NER epoch about 7 minutes, not 17.
# Quick smoke run: bench/compare.sh --rounds 1 --steps 2 --parts train      (a few minutes)
#
# What it sets up, once (later runs reuse it):
#   bench/.venv               torch, transformers, peft, gguf… pinned in bench/requirements.txt,
#                             from PyPI with pip (~5.5 GB: torch's CUDA wheels; never loaded here).
#                             LORAKIT_BENCH_PY=/path/to/python uses that interpreter instead.
#   bench/.cache/smollm2-hf   the dequantised float32 HF model, made by transformers' own GGUF
#                             loader from the same GGUF lorakit reads (scripts/fetch-model.sh), and
#                             checked against the fixture logits lorakit's tests use.
# What it measures, alternating the tools inside each round:
#   train   batch 4 × 256 tokens (the fixture's token stream, every token a target), LoRA r=8 α=16
#           on q_proj,v_proj and on all-linear (q,k,v,o,gate,up,down), AdamW lr 1e-4 wd 0.01,
#           N steps, fp32; PEFT also with bf16 autocast; lorakit also --precision bf16 when it has
#           the flag, and QLoRA (--precision gguf-bf16: the frozen base only in the GGUF's Q4_1
#           blocks, bf16 products over them) and gguf-int8 (the same, the backward's input
#           gradients in 8-bit integers) when it has those. The report adds QLoRA's tokens/s
#           over lorakit bf16's. tokens/s = tokens per step / median step time after the first step.
#           Peak RSS of the whole process (/usr/bin/time -f %M), model loading included.
#   decode  batch 1, greedy, T new tokens (EOS ignored), the prompt of bench/decode.sh: base model,
#           the fixture adapter unmerged, and merged (PEFT merge_and_unload / lorakit merge).
#           Both sides: decode tokens/s = (new tokens − 1) / (time after the first new token), the
#           definition of `lorakit generate --stats` (prefill and first token excluded).
#   e2e     one epoch of the quickstart's recipe on a real data set's training split, the
#           quickstart's financial NER (915 examples) by default, or E2E's 785 with --epoch-data e2e
#           where the bigbench archive is at hand (scripts/fetch-data.sh; the part keeps its old
#           name, under which every earlier report measured E2E) (LoRA r=4 α=32 on
#           q,v, batches of 8, lr 2e-3, 10 warm-up steps, linear decay): PEFT + transformers with
#           padded batches grouped by length (the best CPU setting: TRL's padding-free packing needs
#           flash attention) against lorakit padded and lorakit --packing with micro-batches of
#           about the tokens of 8 examples (E2E: --max-tokens-per-batch 512; NER: rows of 1024).
#           Seconds = the training steps' time (loading excluded), target tokens/s over them.
#   peak    matmul throughput: crates/lorakit/examples/matmul_peak.rs (the CPU's instruction roof
#           for 512-bit f32 FMA and bf16 dot products, and lorakit's kernels on SmolLM2's training
#           shapes) beside torch.matmul on the same shapes. With train, the report adds model FLOP
#           utilisation (MFU): training tokens/s × model FLOPs per token / those peaks.
# Every figure is the median over the rounds (min–max beside it); ratio = lorakit / PEFT.
# Numbers depend on the load: run it on a quiet machine (the load average is reported).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cmdline="bench/compare.sh$(printf ' %q' "$@")"

die() { echo "compare.sh: error: $*" >&2; exit 1; }
# die_log MESSAGE LOGFILE: fail with the end of the log that explains it.
die_log() { { echo "compare.sh: error: $1"; echo "--- last lines of $2:"; tail -n 25 "$2"; } >&2; exit 1; }
log() { echo "compare.sh: $*" >&2; }
usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

rows="" rounds=3 steps=8 parts="train,decode" new_tokens=128 threads=2 results="" build=1 lk_prec="auto"
epoch_data=ner epoch_prec=""
bin="$root/target/release/lorakit"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rounds) rounds="${2:?--rounds needs a value}"; shift 2 ;;
    --steps) steps="${2:?--steps needs a value}"; shift 2 ;;
    --parts) parts="${2:?--parts needs a value}"; shift 2 ;;
    --new-tokens) new_tokens="${2:?--new-tokens needs a value}"; shift 2 ;;
    --threads) threads="${2:?--threads needs a value}"; shift 2 ;;
    --lorakit-precision) lk_prec="${2:?--lorakit-precision needs a value}"; shift 2 ;;
    --results) results="${2:?--results needs a file}"; shift 2 ;;
    --epoch-data) epoch_data="${2:?--epoch-data needs a data set}"; shift 2 ;;
    --epoch-precision) epoch_prec="${2:?--epoch-precision needs a list}"; shift 2 ;;
    --no-build) build=0; shift ;;
    --bin) bin="${2:?--bin needs a path}"; build=0; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
for v in rounds steps new_tokens threads; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "--${v//_/-} must be a positive integer, got '${!v}'"
done
[[ "$steps" -ge 2 ]] || die "--steps must be at least 2 (the first step is the warm-up, not timed)"
[[ "$new_tokens" -ge 2 ]] || die "--new-tokens must be at least 2"
do_train=0 do_decode=0 do_peak=0 do_e2e=0
IFS=',' read -ra part_list <<<"$parts"
for p in "${part_list[@]}"; do
  case "$p" in train) do_train=1 ;; decode) do_decode=1 ;; peak) do_peak=1 ;; e2e) do_e2e=1 ;; *) die "--parts takes train, decode, peak and/or e2e, got '$p'" ;; esac
done
case "$lk_prec" in auto|f32|f32,bf16|bf16,f32) ;; *) die "--lorakit-precision takes auto, f32 or f32,bf16, got '$lk_prec'" ;; esac
[[ -x /usr/bin/time ]] || die "/usr/bin/time is missing (Debian: apt-get install time); it measures peak RSS"

fixture="$root/tests/fixtures/smollm2-peft-r8-qv"
gguf="${LORAKIT_MODELS_DIR:-$root/models}/SmolLM2-135M-Instruct.Q4_1.gguf"
cache="$here/.cache"
hf="$cache/smollm2-hf"
prompt="Once upon a time, there was a little girl named Lily who"
mkdir -p "$cache"

# --- lorakit -------------------------------------------------------------------------------------
"$root/scripts/fetch-model.sh" || die "scripts/fetch-model.sh failed: no model to compare on"
[[ -f "$gguf" ]] || die "no model at $gguf after scripts/fetch-model.sh"
if [[ "$do_e2e" -eq 1 ]]; then
  "$root/scripts/fetch-data.sh" "$epoch_data" || die "scripts/fetch-data.sh $epoch_data failed: no data for the epoch part"
fi
if [[ "$build" -eq 1 ]]; then
  log "cargo build --release -p lorakit-cli ..."
  cargo build --release -q -p lorakit-cli --manifest-path "$root/Cargo.toml" || die "cargo build failed"
  if [[ "$do_peak" -eq 1 ]]; then
    cargo build --release -q -p lorakit --example matmul_peak --manifest-path "$root/Cargo.toml" \
      || die "cargo build --example matmul_peak failed"
  fi
fi
peak_bin="$root/target/release/examples/matmul_peak"
[[ "$do_peak" -eq 0 || -x "$peak_bin" ]] || die "no $peak_bin (cargo build --release -p lorakit --example matmul_peak)"
[[ -x "$bin" ]] || die "no lorakit binary at $bin (build it, or give --bin PATH)"
# Precisions of lorakit to measure: f32, plus bf16 where the binary has --precision.
has_precision() { "$bin" "$1" --help 2>/dev/null | grep -q -- '--precision'; }
case "$lk_prec" in
  auto) train_prec="f32" dec_prec="f32"
        if has_precision train; then train_prec="f32 bf16"; fi
        if has_precision generate; then dec_prec="f32 bf16"; fi
        # --precision gguf: the GGUF's own 4-bit blocks (base and unmerged; a merged model is f32).
        if "$bin" generate --help 2>/dev/null | grep -q 'gguf'; then dec_prec="$dec_prec gguf"; fi ;;
  f32) train_prec="f32" dec_prec="f32" ;;
  *) train_prec="f32 bf16" dec_prec="f32 bf16" ;;
esac
# QLoRA in the train part: bf16 products over the file's blocks; and, where the binary has it,
# the same with the backward's input-gradient products in 8 bits (gguf-int8), which the E2E
# epoch also runs.
train_q="" e2e_q=""
if [[ "$lk_prec" == auto ]] && "$bin" train --help 2>/dev/null | grep -q 'gguf-bf16'; then train_q="gguf-bf16"; fi
if [[ "$lk_prec" == auto ]] && "$bin" train --help 2>/dev/null | grep -q 'gguf-int8'; then
  train_q="$train_q gguf-int8" e2e_q="gguf-int8"
fi
# The epoch part's precisions: --epoch-precision, else the train part's and gguf-int8.
if [[ -n "$epoch_prec" ]]; then
  epoch_prec="${epoch_prec//,/ }"
  for p in $epoch_prec; do
    case "$p" in f32|bf16|gguf-bf16|gguf-int8) ;; *) die "--epoch-precision takes f32, bf16, gguf-bf16 and/or gguf-int8, got '$p'" ;; esac
    [[ "$p" == f32 ]] || "$bin" train --help 2>/dev/null | grep -q -- "$p" \
      || die "this lorakit has no 'train --precision $p'"
  done
else
  epoch_prec="$train_prec $e2e_q"
fi
if [[ "$train_prec" == *bf16* && "$do_train" -eq 1 ]]; then
  has_precision train || die "this lorakit has no 'train --precision'; use --lorakit-precision f32"
fi
if [[ "$dec_prec" == *bf16* && "$do_decode" -eq 1 ]]; then
  has_precision generate || die "this lorakit has no 'generate --precision'; use --lorakit-precision f32"
fi
# The flag for one precision: nothing for f32 on a binary that predates --precision.
prec_flag() { # COMMAND PRECISION
  if has_precision "$1"; then
    printf '%s\n' --precision "$2"
  elif [[ "$2" != f32 ]]; then
    die "no --precision on lorakit $1"
  fi
  return 0
}

# --- the PEFT side's Python (set up once; concurrent runs wait for each other) -----------------
exec 9>"$cache/.setup.lock"
flock 9
if [[ -n "${LORAKIT_BENCH_PY:-}" ]]; then
  py="$LORAKIT_BENCH_PY"
  [[ -x "$py" ]] || die "LORAKIT_BENCH_PY=$py is not an executable"
else
  venv="$here/.venv"
  py="$venv/bin/python"
  want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
  if [[ ! -x "$py" || "$(cat "$venv/.requirements.sha256" 2>/dev/null || true)" != "$want" ]]; then
    log "creating bench/.venv from bench/requirements.txt (pip, PyPI; ~5.5 GB, several minutes) ..."
    rm -rf "$venv"
    python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    "$py" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt" \
      || die "pip install -r bench/requirements.txt failed (see pip's message above)"
    echo "$want" >"$venv/.requirements.sha256"
  fi
fi
versions="$("$py" -c 'import torch, transformers, peft, gguf, safetensors, numpy
print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")' 2>"$cache/.import.err")" \
  || die_log "$py cannot import torch, transformers, peft, gguf, safetensors and numpy" "$cache/.import.err"

# --- the HF model, dequantised from the same GGUF -------------------------------------------------
gguf_sha="$(sha256sum "$gguf" | cut -d' ' -f1)"
if [[ ! -f "$hf/model.safetensors" || "$(cat "$hf/.source.sha256" 2>/dev/null || true)" != "$gguf_sha" ]]; then
  log "converting $(basename "$gguf") to a float32 HF model in bench/.cache/smollm2-hf (transformers' GGUF loader) ..."
  rm -rf "$hf" "$hf.tmp"
  "$py" "$here/compare_peft.py" convert --gguf "$gguf" --out "$hf" --fixture "$fixture" \
    >"$cache/convert.log" 2>&1 || die_log "converting the GGUF with transformers failed" "$cache/convert.log"
  echo "$gguf_sha" >"$hf/.source.sha256"
  log "$(grep '^{' "$cache/convert.log" | tail -1)"
fi
flock -u 9

# --- the runs ------------------------------------------------------------------------------------
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
runs="$work/runs.jsonl"
: >"$runs"
if [[ "$do_train" -eq 1 ]]; then
  rows="$(python3 "$here/compare_report.py" data --batches "$fixture/training/batches.safetensors" \
    --out "$work/train.jsonl" --seq-len 256 --min-rows 4)" || die "cannot build the training rows"
fi
if [[ "$do_decode" -eq 1 ]]; then
  "$bin" merge --model "$gguf" --adapter "$fixture/adapter" --out "$work/merged" >"$work/merge.log" 2>&1 \
    || die_log "lorakit merge failed" "$work/merge.log"
fi

# record ARGS...: append one run's result line and show it.
record() {
  python3 "$here/compare_report.py" record "$@" >>"$runs" 2>"$work/record.err" \
    || die_log "cannot read the result of that run" "$work/record.err"
  cat "$work/record.err" >&2  # its one-line summary
}

peft_train() { # CONFIG PRECISION ROUND
  /usr/bin/time -f %M -o "$work/rss" env OMP_NUM_THREADS="$threads" "$py" "$here/compare_peft.py" train \
    --model "$hf" --data "$work/train.jsonl" --targets "$1" --precision "$2" --steps "$steps" \
    --batch-size 4 --r 8 --alpha 16 --lr 1e-4 --weight-decay 0.01 --threads "$threads" \
    >"$work/peft.out" 2>"$work/peft.err" || die_log "PEFT training ($1, $2) failed" "$work/peft.err"
  record --part train --config "$1" --tool peft --precision "$2" --round "$3" --rss "$work/rss" --peft-json "$work/peft.out"
}

lorakit_train() { # CONFIG PRECISION ROUND
  local targets=q_proj,v_proj
  [[ "$1" == all ]] && targets=all-linear
  local flags
  flags="$(prec_flag train "$2")"
  rm -rf "$work/lk"
  # shellcheck disable=SC2086  # $flags: zero or two words
  RAYON_NUM_THREADS="$threads" /usr/bin/time -f %M -o "$work/rss" "$bin" train --model "$gguf" \
    --data "$work/train.jsonl" --out "$work/lk" --r 8 --alpha 16 --dropout 0 --targets "$targets" \
    --batch-size 4 --max-seq-len 256 --steps "$steps" --no-shuffle --lr 1e-4 --weight-decay 0.01 \
    --quiet $flags >"$work/lk.out" 2>"$work/lk.err" || die_log "lorakit train ($1, $2) failed" "$work/lk.err"
  record --part train --config "$1" --tool lorakit --precision "$2" --round "$3" --rss "$work/rss" --metrics "$work/lk/metrics.jsonl"
}

peft_decode() { # VARIANT ROUND
  local extra=()
  case "$1" in unmerged) extra=(--adapter "$fixture/adapter") ;; merged) extra=(--adapter "$fixture/adapter" --merge) ;; esac
  /usr/bin/time -f %M -o "$work/rss" env OMP_NUM_THREADS="$threads" "$py" "$here/compare_peft.py" decode \
    --model "$hf" "${extra[@]}" --prompt "$prompt" --new-tokens "$new_tokens" --threads "$threads" \
    >"$work/peft.out" 2>"$work/peft.err" || die_log "transformers decode ($1) failed" "$work/peft.err"
  record --part decode --config "$1" --tool peft --precision fp32 --round "$2" --rss "$work/rss" --peft-json "$work/peft.out"
}

lorakit_decode() { # VARIANT PRECISION ROUND
  local model="$gguf" extra=() flags
  case "$1" in unmerged) extra=(--adapter "$fixture/adapter") ;; merged) model="$work/merged" ;; esac
  flags="$(prec_flag generate "$2")"
  # shellcheck disable=SC2086
  RAYON_NUM_THREADS="$threads" /usr/bin/time -f %M -o "$work/rss" "$bin" generate --model "$model" "${extra[@]}" \
    --prompt "$prompt" --max-new-tokens "$new_tokens" --ignore-eos --stats $flags \
    >"$work/lk.out" 2>"$work/lk.err" || die_log "lorakit generate ($1, $2) failed" "$work/lk.err"
  record --part decode --config "$1" --tool lorakit --precision "$2" --round "$3" --rss "$work/rss" \
    --stats "$work/lk.err" --stdout "$work/lk.out" --prompt "$prompt"
}

e2e_data="${LORAKIT_BENCH_E2E_DATA:-$root/data/$epoch_data/train.jsonl}"  # override: a quick smoke run on fewer lines
peft_e2e() { # PRECISION ROUND
  /usr/bin/time -f %M -o "$work/rss" env OMP_NUM_THREADS="$threads" "$py" "$here/compare_peft.py" epoch \
    --model "$hf" --data "$e2e_data" --precision "$1" --threads "$threads" \
    >"$work/peft.out" 2>"$work/peft.err" || die_log "PEFT $epoch_data epoch ($1) failed" "$work/peft.err"
  record --part e2e --config padded --tool peft --precision "$1" --round "$2" --rss "$work/rss" --peft-json "$work/peft.out"
}

lorakit_e2e() { # LAYOUT PRECISION ROUND
  local flags extra=()
  flags="$(prec_flag train "$2")"
  # Packed micro-batches of about the tokens of 8 examples, in rows that hold the longest one
  # (E2E: about 50 tokens an example, the longest under 256; NER: about 100, the longest 527).
  if [[ "$1" == packed ]]; then
    case "$epoch_data" in
      e2e) extra=(--packing --max-tokens-per-batch 512) ;;
      *) extra=(--packing --max-seq-len 1024 --max-tokens-per-batch 1024) ;;
    esac
  fi
  rm -rf "$work/lk"
  # shellcheck disable=SC2086
  RAYON_NUM_THREADS="$threads" /usr/bin/time -f %M -o "$work/rss" "$bin" train --model "$gguf" \
    --data "$e2e_data" --out "$work/lk" --r 4 --alpha 32 --targets q_proj,v_proj --epochs 1 \
    --batch-size 8 --lr 2e-3 --warmup 10 --schedule linear --seed 0 "${extra[@]}" \
    --quiet $flags >"$work/lk.out" 2>"$work/lk.err" || die_log "lorakit $epoch_data epoch ($1, $2) failed" "$work/lk.err"
  record --part e2e --config "$1" --tool lorakit --precision "$2" --round "$3" --rss "$work/rss" --metrics "$work/lk/metrics.jsonl"
}

peak() { # TOOL ROUND
  if [[ "$1" == lorakit ]]; then
    RAYON_NUM_THREADS="$threads" "$peak_bin" >"$work/peak.out" 2>"$work/peak.err" \
      || die_log "matmul_peak failed" "$work/peak.err"
  else
    env OMP_NUM_THREADS="$threads" "$py" "$here/compare_peft.py" peak --threads "$threads" \
      >"$work/peak.out" 2>"$work/peak.err" || die_log "torch matmul peak failed" "$work/peak.err"
  fi
  python3 "$here/compare_report.py" record-peak --tool "$1" --round "$2" --lines "$work/peak.out" >>"$runs" \
    || die "cannot read $work/peak.out"
}

# CPU time the hypervisor gave to other guests ("steal", /proc/stat's 8th field): on a shared
# virtual machine it slows every timed run without showing in the load average.
cpu_ticks() { awk '/^cpu / { t = 0; for (i = 2; i <= 9; i++) t += $i; print t, $9 }' /proc/stat; }
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
ticks_before="$(cpu_ticks)"
started="$(date '+%Y-%m-%d %H:%M:%S %Z')"
for r in $(seq "$rounds"); do
  if [[ "$do_peak" -eq 1 ]]; then
    log "round $r/$rounds: matmul peak"
    peak lorakit "$r"
    peak peft "$r"
  fi
  if [[ "$do_train" -eq 1 ]]; then
    for c in qv all; do
      log "round $r/$rounds: train, $( [[ $c == qv ]] && echo 'LoRA q,v' || echo 'LoRA all-linear'), $steps steps"
      peft_train "$c" fp32 "$r"
      lorakit_train "$c" f32 "$r"
      peft_train "$c" bf16 "$r"
      if [[ "$train_prec" == *bf16* ]]; then lorakit_train "$c" bf16 "$r"; fi
      for q in $train_q; do lorakit_train "$c" "$q" "$r"; done
    done
  fi
  if [[ "$do_e2e" -eq 1 ]]; then
    log "round $r/$rounds: $epoch_data epoch"
    peft_e2e bf16 "$r"
    for p in $epoch_prec; do lorakit_e2e padded "$p" "$r"; done
    for p in $epoch_prec; do lorakit_e2e packed "$p" "$r"; done
  fi
  if [[ "$do_decode" -eq 1 ]]; then
    for v in base unmerged merged; do
      log "round $r/$rounds: decode, $v, $new_tokens new tokens"
      peft_decode "$v" "$r"
      for p in $dec_prec; do
        if [[ "$v" == merged && "$p" == gguf ]]; then continue; fi
        lorakit_decode "$v" "$p" "$r"
      done
    done
  fi
done
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
steal="$(awk -v b="$ticks_before" -v a="$(cpu_ticks)" 'BEGIN { split(b, x, " "); split(a, y, " ");
  t = y[1] - x[1]; printf "%.1f", (t > 0 ? 100 * (y[2] - x[2]) / t : 0) }')"
busy=""
if awk -v l="${load_before%% *}" 'BEGIN { exit !(l >= 0.5) }'; then
  busy=$'\n- **WARNING: the machine was busy when the run began (1-min load average ≥ 0.5): the numbers are not a clean measurement.**'
fi
if awk -v s="$steal" 'BEGIN { exit !(s >= 2) }'; then
  busy+=$'\n- **WARNING: the hypervisor took '"$steal"$'% of the CPU time during the run (steal ≥ 2%): the numbers are not a clean measurement.**'
fi

# --- the report ----------------------------------------------------------------------------------
table="$(python3 "$here/compare_report.py" table --runs "$runs" --epoch-data "$epoch_data")" || die "cannot summarise the runs"
what=""
[[ "$do_train" -eq 1 ]] && what+="; train: $steps steps (first one untimed) of batch 4 × 256 from $rows rows of the fixture's tokens, LoRA r=8 α=16, AdamW lr 1e-4 wd 0.01"
[[ "$do_e2e" -eq 1 ]] && what+="; e2e: one epoch of the quickstart recipe over ${e2e_data#"$root/"} (see the header of bench/compare.sh)"
[[ "$do_peak" -eq 1 ]] && what+="; peak: examples/matmul_peak.rs and torch.matmul, best of 10 (3 for lm_head) per shape"
[[ "$do_decode" -eq 1 ]] && what+="; decode: $new_tokens new tokens after the prompt of bench/decode.sh, greedy, batch 1"
rev="$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
[[ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]] && rev="$rev (with uncommitted changes)"
cpu="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || echo unknown)"
report="$(cat <<EOF
## lorakit vs PEFT — $started

\`$cmdline\`

- lorakit $("$bin" --version 2>/dev/null | awk '{print $2}') at $rev; $versions; $threads threads; $(nproc) cores: $cpu
- $rounds round(s), alternating the tools$what
- each cell: median over the rounds (min–max); tokens/s higher is better, RSS lower is better
- for scale, DESIGN.md's PEFT reference on this machine, quiet: train 286 tok/s (q,v fp32), 403 (bf16 autocast), 241 (all-linear); decode 22 / 20 / 22 tok/s (base / unmerged / merged)
- load average (1, 5, 15 min) before: $load_before; after: $load_after (anything else running skews the numbers); CPU steal during the run: $steal%$busy

$table
EOF
)"
echo "$report"
if [[ -n "$results" ]]; then
  { echo; echo "$report"; } >>"$results" || die "cannot append to $results"
  log "appended to $results"
fi
