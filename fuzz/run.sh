#!/usr/bin/env bash
# Builds the fuzz targets once, then fuzzes every target (or those named) for SECONDS each,
# one after the other, starting from the seed inputs; prints each target's last libFuzzer status line (executions, coverage).
# Crashing inputs land in fuzz/artifacts/<target>/; once fixed, keep them in
# fuzz/regressions/<target>/ (docs/reliability.md). Needs nightly and cargo-fuzz.
#   bash fuzz/run.sh [SECONDS] [TARGET...]
set -uo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-60}
shift || true
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    mapfile -t TARGETS < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v "^qwenclip[-_]fuzz$")
fi
if [ ! -d fuzz/corpus ]; then
    QWENCLIP_FUZZ_SEEDS="$PWD/fuzz/corpus" cargo test --test fuzz_regressions the_seed_inputs_load
fi
LOGS=${QWENCLIP_FUZZ_LOGS:-fuzz/logs}
mkdir -p "$LOGS"
LOGS=$(cd "$LOGS" && pwd)
cd fuzz
cargo +nightly fuzz build || exit 1
BIN=target/x86_64-unknown-linux-gnu/release
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    "$BIN/$t" "corpus/$t" -artifact_prefix="artifacts/$t/" \
        -max_total_time="$SECONDS_EACH" -timeout=30 -rss_limit_mb=3072 -malloc_limit_mb=2048 \
        -print_final_stats=1 > "$LOGS/$t.log" 2>&1
    status=$?
    last=$(grep -E "^#[0-9]+" "$LOGS/$t.log" | tail -1)
    echo "$t (exit $status): $last"
done
