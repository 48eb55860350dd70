"""Encode two prompts through the shared library with ctypes, the route the ComfyUI node
pack takes. Usage: ctypes_smoke.py LIB MODEL_DIR ADAPTER_DIR"""
import ctypes
import json
import sys

lib = ctypes.CDLL(sys.argv[1])
lib.qwenclip_last_error.restype = ctypes.c_char_p
lib.qwenclip_encoder_load.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint64)]
lib.qwenclip_encoder_output_shape.argtypes = [ctypes.c_uint64] + [ctypes.POINTER(ctypes.c_size_t)] * 3
lib.qwenclip_encode.argtypes = [
    ctypes.c_uint64, ctypes.POINTER(ctypes.c_char_p), ctypes.c_size_t,
    ctypes.POINTER(ctypes.c_float), ctypes.c_size_t, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t,
]
lib.qwenclip_encoder_free.argtypes = [ctypes.c_uint64]


def check(status, what):
    if status != 0:
        raise SystemExit(f"{what}: status {status}: {lib.qwenclip_last_error().decode()}")


handle = ctypes.c_uint64()
config = json.dumps({"model": sys.argv[2], "adapter": sys.argv[3]}).encode()
check(lib.qwenclip_encoder_load(config, ctypes.byref(handle)), "load")
seq, embed, pooled = ctypes.c_size_t(), ctypes.c_size_t(), ctypes.c_size_t()
check(lib.qwenclip_encoder_output_shape(handle, ctypes.byref(seq), ctypes.byref(embed), ctypes.byref(pooled)), "shape")
prompts = ["a lighthouse under the stars", ""]
arr = (ctypes.c_char_p * len(prompts))(*[p.encode() for p in prompts])
n_e = len(prompts) * seq.value * embed.value
n_p = len(prompts) * pooled.value
emb = (ctypes.c_float * n_e)()
pool = (ctypes.c_float * n_p)()
check(lib.qwenclip_encode(handle, arr, len(prompts), emb, n_e, pool, n_p), "encode")
bad = lib.qwenclip_encode(handle, arr, len(prompts), emb, n_e - 1, pool, n_p)
assert bad == 4, f"a short buffer must give QWENCLIP_BUFFER_SIZE, got {bad}"
check(lib.qwenclip_encoder_free(handle), "free")
print(f"ok {len(prompts)} {emb[seq.value * embed.value]:.6f} {pool[pooled.value + 5]:.6f}")
