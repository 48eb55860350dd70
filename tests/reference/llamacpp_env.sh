#!/usr/bin/env bash
# The llama.cpp side of tests/reference/bench_llamacpp.py: llama-cpp-python built from source
# (its sdist vendors llama.cpp; pip fetches cmake and ninja from PyPI) with this CPU's
# instruction sets, in a venv cached outside the clone, keyed on the version. ~6 min on 2
# cores the first time, instant afterwards. Prints the venv's python.
set -euo pipefail
version=0.3.36
dir="${QWENCLIP_LLAMACPP_CACHE:-$HOME/.cache/qwenclip-ref-llamacpp}/$version"
py="$dir/venv/bin/python"
if ! "$py" -c "import llama_cpp" 2>/dev/null; then
    rm -rf "$dir"
    mkdir -p "$dir"
    python3 -m venv "$dir/venv"
    # GGML_NATIVE: -march=native, as a user building llama.cpp on their machine gets.
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" \
        "$dir/venv/bin/pip" install --quiet "llama-cpp-python==$version" numpy >"$dir/build.log" 2>&1 ||
        { tail -20 "$dir/build.log" >&2; exit 1; }
fi
echo "$py"
