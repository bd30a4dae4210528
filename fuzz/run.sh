#!/usr/bin/env bash
# Fuzzes lorakit's untrusted-input readers with libFuzzer (cargo-fuzz, nightly toolchain):
#   fuzz/run.sh [TARGET...]          every target (safetensors gguf adapter_config jsonl) or those named
#   FUZZ_SECONDS=600 fuzz/run.sh     seconds per target (default 600)
# Each target starts from fuzz/seeds/TARGET plus the corpus it grew before (fuzz/corpus/, git-ignored).
# A crash stops that target and leaves its input in fuzz/artifacts/TARGET/; copy it into
# fuzz/regressions/TARGET/ (run by `cargo test` through tests/integration/fuzz_regressions.rs)
# once fixed. Prints one line per target with libFuzzer's execution count.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
secs="${FUZZ_SECONDS:-600}"
if [ $# -gt 0 ]; then targets=("$@"); else targets=(safetensors gguf adapter_config jsonl); fi
if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked
fi
mkdir -p logs
status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    cargo +nightly fuzz build "$t" >/dev/null
    set +e
    cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 -timeout=20 \
        -artifact_prefix="artifacts/$t/" -print_final_stats=1 >"logs/$t.log" 2>&1
    rc=$?
    set -e
    runs="$(grep -oE 'Done [0-9]+ runs in [0-9]+ second' "logs/$t.log" | tail -1 || true)"
    execs="$(grep -E '^stat::number_of_executed_units' "logs/$t.log" | awk '{print $2}' || true)"
    if [ $rc -eq 0 ]; then
        echo "$t: no crash; ${execs:-?} executions (${runs:-see fuzz/logs/$t.log}); corpus $(ls "corpus/$t" | wc -l) inputs"
    else
        echo "$t: FAILED (exit $rc) after ${execs:-?} executions; see fuzz/logs/$t.log and fuzz/artifacts/$t/"
        status=1
    fi
done
exit $status
