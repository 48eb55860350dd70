#!/usr/bin/env bash
# The C ABI under AddressSanitizer + LeakSanitizer (nightly; docs/reliability.md):
#   1. tests/ffi.rs built with -Zsanitizer=address and linked -rdynamic, so that the shared
#      library it dlopens finds the sanitizer runtime in the test executable; run with leak
#      detection (every test but the two that start other programs);
#   2. the C program: compiled by that run with gcc -fsanitize=address (gcc's runtime serves
#      the Rust library too), leak detection at its exit;
#   3. Python's ctypes with gcc's runtime preloaded (CPython's own allocations are not freed
#      at exit by design: leak detection off there).
# Usage: bash scripts/asan-ffi.sh   (the first build takes about 11 minutes on 2 cores; its
#        folder: QWENCLIP_ASAN_TARGET, default target/asan)
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=x86_64-unknown-linux-gnu
export CARGO_TARGET_DIR=${QWENCLIP_ASAN_TARGET:-$PWD/target/asan} RUSTFLAGS="-Zsanitizer=address"
DEPS=$CARGO_TARGET_DIR/$TARGET/debug/deps
CC_ASAN=$CARGO_TARGET_DIR/cc-asan
mkdir -p "$CARGO_TARGET_DIR"
printf '#!/bin/sh\nexec gcc -fsanitize=address "$@"\n' > "$CC_ASAN"
chmod +x "$CC_ASAN"

cargo +nightly rustc --target "$TARGET" --test ffi --profile test -- -Clink-arg=-rdynamic
exe=$(ls -t "$DEPS"/ffi-* | grep -v '\.d$' | head -1)
echo "== tests/ffi.rs under ASan + LSan (the C program built with gcc -fsanitize=address)"
CC=$CC_ASAN ASAN_OPTIONS=detect_leaks=1 "$exe" --skip bench_ffi --skip python_ctypes

echo "== Python ctypes with the sanitizer runtime preloaded"
tiny=$(mktemp -d)
trap 'rm -rf "$tiny"' EXIT
cargo +nightly run -q --target "$TARGET" --features dev --bin qwenclip-dev -- tiny --out "$tiny" >/dev/null
ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD=$(gcc -print-file-name=libasan.so) \
    python3 tests/ffi/ctypes_smoke.py "$DEPS/libqwenclip.so" "$tiny/model" "$tiny/adapter"
