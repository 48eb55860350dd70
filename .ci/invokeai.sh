#!/usr/bin/env bash
# The InvokeAI node pack (integrations/invokeai), proven in a real InvokeAI 6.14.2 from PyPI:
#   a server started with the pack in its nodes/ folder registers the node; a tiny SDXL model
#   (seeded random weights, written by the test) is installed through its model manager; an
#   SDXL graph (Qwen Text Encode -> Denoise Latents -> Latents to Image) runs through the
#   queue API to an image; errors fail the queue item, not the server. One pytest run.
#
# Usage: bash .ci/invokeai.sh           the tests (what CI runs)
#        bash .ci/invokeai.sh install   only prepare the cached environment
# Needs: python3 3.11 or 3.12 (InvokeAI's range), network access to PyPI on the first run,
# cargo (unless QWENCLIP_WHEEL is given).
# Environment:
#   QWENCLIP_CI_CACHE   where the InvokeAI environment is kept (default ~/.cache/qwenclip-ci);
#                       one folder per versions hash, reused when complete
#   QWENCLIP_WHEEL      the qwenclip wheel to install into the environment (default: built
#                       here by .ci/wheel.sh build)
#   QWENCLIP_DEV_BIN    the qwenclip-dev command, for the tiny Qwen3 model (default
#                       target/debug/qwenclip-dev)
#   PYTEST_ARGS         extra pytest arguments (e.g. "-k errors")
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

INVOKEAI=6.14.2
RECIPE=1                     # bump when the install steps below change
PY=${PYTHON:-python3}
REQ=tests/invokeai/requirements.txt

KEY=$( { echo "$RECIPE $INVOKEAI"; "$PY" -c 'import sys; print(sys.version)'; cat "$REQ"; } | sha256sum | cut -c1-16)
CACHE=${QWENCLIP_CI_CACHE:-${HOME:-/tmp}/.cache/qwenclip-ci}
ENV=$CACHE/invokeai-$KEY
VENV=$ENV/venv

step() { echo "== $*"; }

install_env() {
    if [ -f "$ENV/.complete" ]; then
        step "InvokeAI environment: cached at $ENV"
        return
    fi
    local t0=$SECONDS
    step "InvokeAI environment: installing into $ENV (cold: a few minutes, ~7 GB)"
    rm -rf "$ENV"
    mkdir -p "$ENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q -r "$REQ"
    "$VENV/bin/python" -c "import invokeai.version as v; assert v.__version__ == '$INVOKEAI', v.__version__"
    touch "$ENV/.complete"
    step "InvokeAI environment: installed in $((SECONDS - t0)) s"
}

install_env
if [ "${1:-}" = "install" ]; then
    exit 0
fi

# The library as InvokeAI users get it: the qwenclip wheel, installed into InvokeAI's Python on
# every run (the wheel changes, the cached environment does not).
WHEEL=${QWENCLIP_WHEEL:-$(bash .ci/wheel.sh build | tail -1)}
step "qwenclip from $(basename "$WHEEL")"
# --no-index: the wheel under test, never a qwenclip from PyPI.
"$VENV/bin/python" -m pip install -q --force-reinstall --no-deps --no-index --find-links "$(dirname "$WHEEL")" qwenclip
unset QWENCLIP_LIB
export QWENCLIP_DEV_BIN=${QWENCLIP_DEV_BIN:-$ROOT/target/debug/qwenclip-dev}
"$VENV/bin/python" -c "import qwenclip; print('qwenclip from', qwenclip.__file__)"

step "pytest tests/invokeai"
# shellcheck disable=SC2086
exec "$VENV/bin/python" -m pytest tests/invokeai -p no:cacheprovider ${PYTEST_ARGS:-}
