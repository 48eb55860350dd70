#!/usr/bin/env bash
# Builds the fuzz targets once, then fuzzes every target (or those named) for SECONDS each,
# one after the other, starting from the seed inputs. Prints, per target, libFuzzer's last
# status line (executions, coverage) and when its edge count (`cov:`) last grew: a target has plateaued
# when that moment is long before the end. Each log line is prefixed with the seconds
# since its target started.
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
    start=$SECONDS
    "$BIN/$t" "corpus/$t" -artifact_prefix="artifacts/$t/" \
        -max_total_time="$SECONDS_EACH" -timeout=30 -rss_limit_mb=3072 -malloc_limit_mb=2048 \
        -print_final_stats=1 2>&1 |
        while IFS= read -r line; do printf '%ds %s\n' $((SECONDS - start)) "$line"; done \
            > "$LOGS/$t.log"
    status=${PIPESTATUS[0]}
    last=$(grep -E "^[0-9]+s #[0-9]+" "$LOGS/$t.log" | tail -1 | cut -d' ' -f2-)
    grew=$(awk '/^[0-9]+s #[0-9]+.* cov: / { for (i = 1; i < NF; i++) if ($i == "cov:" && $(i + 1) + 0 > max) { max = $(i + 1) + 0; at = $1 } } END { print at }' "$LOGS/$t.log")
    echo "$t (exit $status): $last; coverage last grew at ${grew:-never} of ${SECONDS_EACH}s"
done
