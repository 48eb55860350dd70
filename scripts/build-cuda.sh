#!/usr/bin/env bash
# Builds the CUDA 13.0 variant of the library (target/cuda/release/libqwenclip_cuda.so) on any
# Linux x86_64 machine, GPU or not:
#   - nvcc and the CUDA headers come from NVIDIA's PyPI wheels (CUDA 13), cached outside the
#     repository in $QWENCLIP_CUDA_CACHE (default ~/.cache/qwenclip-cuda);
#   - kernels are compiled for the cards users own: Ampere (sm_80, sm_86), Ada (sm_89),
#     Hopper (sm_90), with PTX for newer ones (CUDA_COMPUTE_CAP picks the SASS targets);
#   - the CUDA libraries the build links against (driver, cuBLAS, cuBLASLt, cuRAND, NVRTC)
#     are replaced by empty stub libraries with the real sonames, so no driver is needed to
#     link; the real ones are found at run time (the ComfyUI node pack picks this build only
#     when they load).
# Usage: scripts/build-cuda.sh [extra cargo args]
#        scripts/build-cuda.sh --wheel DIR   the CUDA wheel of the Python package instead:
#          qwenclip-X+cu130 (a local version tag on the same name, so the node pack's
#          `qwenclip` requirement takes either wheel; `pip install` the one you want); the
#          NVIDIA libraries stay outside the wheel (they come with the driver and CUDA 13)
set -euo pipefail
cd "$(dirname "$0")/.."
wheel_dir=""
if [ "${1:-}" = "--wheel" ]; then
  wheel_dir="${2:?--wheel needs a folder}"
  shift 2
fi
cache="${QWENCLIP_CUDA_CACHE:-$HOME/.cache/qwenclip-cuda}"
wheels="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85"
key=$(echo "$wheels" | sha256sum | cut -c1-12)
toolkit="$cache/toolkit-$key"

if [ ! -x "$toolkit/cuda/bin/nvcc" ]; then
  echo "== installing nvcc from PyPI into $toolkit"
  rm -rf "$toolkit.tmp" && mkdir -p "$toolkit.tmp"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$toolkit.tmp/whl" $wheels
  for w in "$toolkit.tmp"/whl/*.whl; do python3 -m zipfile -e "$w" "$toolkit.tmp/site"; done
  # Every wheel unpacks into nvidia/cu13/{bin,include,lib,nvvm}: one folder usable as CUDA_HOME.
  mv "$toolkit.tmp/site/nvidia/cu13" "$toolkit.tmp/cuda"
  chmod +x "$toolkit.tmp"/cuda/bin/* "$toolkit.tmp"/cuda/nvvm/bin/* 2>/dev/null || true
  [ -e "$toolkit.tmp/cuda/lib64" ] || ln -s lib "$toolkit.tmp/cuda/lib64"
  rm -rf "$toolkit.tmp/whl" "$toolkit.tmp/site" "$toolkit"
  mv "$toolkit.tmp" "$toolkit"
fi
export CUDA_HOME="$toolkit/cuda" CUDA_PATH="$toolkit/cuda" CUDA_ROOT="$toolkit/cuda"
export PATH="$CUDA_HOME/bin:$PATH"
nvcc --version | tail -2

echo "== stub libraries"
# Empty functions with the names cudarc declares, in libraries with the real sonames: enough
# to link executables and the cdylib; at run time the real libraries of the same soname load.
cargo fetch --quiet
cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | tail -1)
stubs="$toolkit/stubs"
mkdir -p "$stubs"
for pair in driver:libcuda.so.1 cublas:libcublas.so.13 cublaslt:libcublasLt.so.13 curand:libcurand.so.10 nvrtc:libnvrtc.so.13; do
  module="${pair%%:*}"; lib="${pair#*:}"
  grep -hoE '^\s+(pub )?fn [A-Za-z_][A-Za-z0-9_]*\(' "$cudarc/src/$module/sys/"*.rs \
    | sed -E 's/.*fn ([A-Za-z0-9_]+)\(/void \1(void) {}/' | sort -u > "$stubs/$module.c"
  cc -shared -fPIC -Wl,-soname,"$lib" -o "$stubs/$lib" "$stubs/$module.c"
  ln -sf "$lib" "$stubs/${lib%%.so*}.so"
done
[ -e "$CUDA_HOME/lib/libcudart.so" ] || ln -sf "$(ls "$CUDA_HOME"/lib/libcudart.so.* | head -1)" "$CUDA_HOME/lib/libcudart.so"

echo "== cargo build --features cuda"
# One SASS target per family users own plus PTX (the driver JITs it for newer cards).
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export LIBRARY_PATH="$stubs:$CUDA_HOME/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export RUSTFLAGS="${RUSTFLAGS:-} -L $stubs"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"
if [ -n "$wheel_dir" ]; then
  # setup.py reads these: the cuda feature for both the library and the command
  QWENCLIP_FEATURES=cuda QWENCLIP_LOCAL_VERSION=cu130 python3 -m pip wheel --no-deps -w "$wheel_dir" .
  echo "built $(ls "$wheel_dir"/qwenclip-*+cu130-*.whl)"
  exit 0
fi
cargo build --release --features cuda --lib --bin qwenclip "$@"
cp "$CARGO_TARGET_DIR/release/libqwenclip.so" "$CARGO_TARGET_DIR/release/libqwenclip_cuda.so"
echo "built $CARGO_TARGET_DIR/release/libqwenclip_cuda.so (compute cap $CUDA_COMPUTE_CAP + PTX)"
readelf -d "$CARGO_TARGET_DIR/release/libqwenclip_cuda.so" | grep NEEDED
