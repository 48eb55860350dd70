#!/usr/bin/env bash
# Builds the fuzz targets once, then fuzzes every target (or those named) for SECONDS each,
# one after the other, starting from the seed inputs. Prints, per target, libFuzzer's last
# status line (executions, coverage), when its edge count (`cov:`) last grew, and how many
# edges of qwenclip's own src/ its corpus covers (libFuzzer's count is mostly dependencies)
# and how many of those lie outside `#[derive(Deserialize, Serialize)]` impls (serde_json's
# parser is inlined into those, so they grow with every new JSON shape). The corpus's
# coverage dump stays in the log folder as <target>.coverage; `python3 fuzz/coverage_diff.py
# OLD NEW` says which of our own source lines a later corpus newly covers, apart from code
# inlined into our functions: a target has plateaued when that finds no new hand-written
# line. Each log line starts with the seconds since its target started.
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
SRC="$(cd .. && pwd)/src/"
LIMITS=(-timeout=30 -rss_limit_mb=3072 -malloc_limit_mb=2048)
own_edges() {
    "$BIN/$1" "corpus/$1" -runs=0 -print_coverage=1 "${LIMITS[@]}" > "$LOGS/$1.coverage" 2>&1
    awk -v src="$SRC" '/^COVERED_FUNC/ && index($0, src) {
        for (i = 1; i < NF; i++) if ($i == "edges:") { split($(i + 1), n, "/"); sum += n[1] }
        if ($0 !~ / as serde_core::(de::Deserialize|ser::Serialize)>::/) hand += n[1] }
        END { printf "%d (%d outside serde-derived code)\n", sum, hand }' "$LOGS/$1.coverage"
}
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    start=$SECONDS
    "$BIN/$t" "corpus/$t" -artifact_prefix="artifacts/$t/" \
        -max_total_time="$SECONDS_EACH" "${LIMITS[@]}" -print_final_stats=1 2>&1 |
        while IFS= read -r line; do printf '%ds %s\n' $((SECONDS - start)) "$line"; done \
            > "$LOGS/$t.log"
    status=${PIPESTATUS[0]}
    last=$(grep -E "^[0-9]+s #[0-9]+" "$LOGS/$t.log" | tail -1 | cut -d' ' -f2-)
    grew=$(awk '/^[0-9]+s #[0-9]+.* cov: / { for (i = 1; i < NF; i++) if ($i == "cov:" && $(i + 1) + 0 > max) { max = $(i + 1) + 0; at = $1 } } END { print at }' "$LOGS/$t.log")
    echo "$t (exit $status): $last; coverage last grew at ${grew:-never} of ${SECONDS_EACH}s;" \
        "own-code edges covered by the corpus: $(own_edges "$t")"
done
