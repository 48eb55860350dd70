"""CPU speed, memory and hidden states of our GGUF encoder against llama.cpp: same file, same ids.

Why
  Issue 18: 4-bit on the CPU should be as fast as llama.cpp on the same GGUF and give the same
  hidden states. `bench_encode.py` compares the f32 path with transformers; this compares the
  quantized path with the reference implementation of the format, on the very same file.

What is measured, per GGUF file and per length (`--tokens`, batch 1)
  The Qwen3 part only: token ids -> hidden states of the last layer after the final RMSNorm.
  One warm-up and `--reps` timed passes per input (median and min, ms; `--stat` picks the one
  the table shows), each a fresh evaluation of the whole prompt; the load time; the peak
  resident memory (VmHWM) of each process; the agreement of the two sides' hidden states per
  token: cosine (min, mean over tokens), relative L2 |ours - llama| / |llama|, max |diff|.

How
  1. Token ids: drawn (seed `--seed`) from the NORMAL tokens of the file's
     `tokenizer.ggml.token_type` (no control or special ids), independently per length; the same
     ids go to both sides (an `--ids` JSON file) and into the `--json` report.
  2. Ours: `qwenclip-dev bench-encode --model F.gguf --ids IDS.json --hidden-out H.safetensors`
     with RAYON_NUM_THREADS=`--threads`, one process per file.
  3. llama.cpp: this file re-run as `--_llama-worker` under `--llama-python`, one process per
     file, through llama-cpp-python's low-level API (`Llama.embed()` takes text, not ids): the
     model (mmap unless `--no-mmap`), a context with embeddings on, pooling NONE (per-token
     output of the final norm), n_ctx = n_batch = n_ubatch = the longest input (one ubatch per
     prompt), n_threads = n_threads_batch = `--threads`, flash attention `--flash-attn` and KV
     cache type `--kv-type` (llama.cpp's defaults: auto, f16). Each pass: `llama_memory_clear`
     (untimed: nothing is cached), then `llama_decode` + `llama_synchronize` (timed); afterwards
     `llama_get_embeddings_ith` per token.
  4. llama.cpp in embedding mode still runs the LM head: every token is an output and its graph
     always ends in `output` (vocab x hidden, here tied to token_embd): ~26 % of the matmul work
     of a Qwen3-0.6B, ~10 % of a 4B, which we do not compute. So the worker also times a second
     context whose `cb_eval` stops the graph after the final norm ("llama-head" in the table,
     the fair comparison). That run still pays a Python callback per graph node (~1000 nodes,
     ~1 us each) and the copy of the uncomputed logits; its hidden states must equal the full
     run's (checked, a line is printed otherwise).
  5. Peak RSS is VmHWM (/proc/self/status). With mmap (llama.cpp's default) llama.cpp's figure
     counts the file pages it touched (file-backed, shared with the page cache) plus its own
     allocations (repacked q4_0/q4_K weights, KV cache, compute and logits buffers) plus the
     Python interpreter with llama_cpp and numpy imported (`rss_before_load_bytes` in the JSON;
     the anonymous and file parts are printed below the table). It is taken after the full
     runs, before the "-head" context exists. Ours is the Rust process alone.
  6. `--reference` runs ours once more with QWENCLIP_QMATMUL=dequantize (weights expanded to
     f32, f32 activations: only the file's own rounding) and shows both sides' min cosine to it.
     Random-weight models amplify rounding: on the 0.6B, llama.cpp against itself with an f16
     instead of an f32 KV cache differs by cos ~0.9995 / rel L2 ~2.5e-2, so that is the noise
     floor; a side well below it against the reference is the one that is wrong.
  The sides run one after the other, never concurrently. llama.cpp's OpenMP threads spin at
  their barriers: with another process on the cores its times degrade far more than ours, so
  use `--wait-load` (and read the load averages printed) before trusting a ratio.

Interpreters
  The driver needs only the standard library (python3 >= 3.10). The worker needs llama_cpp:
  `--llama-python` defaults to the venv `tests/reference/llamacpp_env.sh` makes (and prints):
  llama-cpp-python 0.3.36 built from source with this CPU's flags, cached in
  ~/.cache/qwenclip-ref-llamacpp/0.3.36 (~6 min the first time on 2 cores).

Usage
  python3 tests/reference/bench_llamacpp.py [F.gguf ...] [--make qwen3-0.6b:q8_0,qwen3-0.6b:q4_k]
      [--workdir /tmp/qwenclip-bench] [--threads N] [--tokens 77,256] [--reps 5] [--seed 7]
      [--stat median|min] [--reference] [--compare-f32-layers 4] [--no-mmap]
      [--flash-attn auto|on|off] [--kv-type f16|f32] [--wait-load 0.5 --wait-max 600]
      [--llama-python PY] [--llama-verbose] [--qwenclip-dev BIN] [--json OUT.json]
  `--make SHAPE:TYPE,...` writes WORKDIR/SHAPE-TYPE.gguf with `qwenclip-dev random-model` when
  missing (random weights, real size; a 4B q4_k is ~2.5 GB and takes minutes).
  Threads default to all cores. Not a test: read the table.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from operator import mul, sub
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    DEFAULT_WORKDIR,
    add_binary_option,
    add_wait_options,
    int_list,
    last_json_line,
    ratio,
    render,
    resolve_binary,
    wait_for_load,
    write_json,
)

GIB = 1024**3

# --------------------------------------------------------------------------------------------
# GGUF header (metadata and tensor types), standard library only.
# --------------------------------------------------------------------------------------------

GGML_TYPES = {
    0: "f32",
    1: "f16",
    2: "q4_0",
    3: "q4_1",
    6: "q5_0",
    7: "q5_1",
    8: "q8_0",
    10: "q2_K",
    11: "q3_K",
    12: "q4_K",
    13: "q5_K",
    14: "q6_K",
    15: "q8_K",
    30: "bf16",
}
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
KV_TYPES = {"f16": 1, "f32": 0}  # ggml_type of llama.cpp's KV cache (its default: f16)
TOKEN_NORMAL = 1  # llama.cpp's LLAMA_TOKEN_TYPE_NORMAL
WARN, CONT = 3, 5  # ggml_log_level: DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5


class _Header:
    def __init__(self, buf) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return v if len(v) > 1 else v[0]

    def string(self) -> str:
        n = self.take("Q")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8", "replace")

    def value(self, ty: int):
        """A metadata value; an array of strings comes back as its length only."""
        if ty == 8:
            return self.string()
        if ty != 9:
            return self.take(_SCALARS[ty])
        et, n = self.take("I"), self.take("Q")
        if et == 8:
            for _ in range(n):
                self.string()
            return n
        start, fmt = self.pos, f"<{n}{_SCALARS[et]}"
        self.pos += struct.calcsize(fmt)
        return list(struct.unpack_from(fmt, self.buf, start))


def gguf_info(path: Path) -> dict:
    """The metadata and tensor types of a GGUF file: what the ids and the table need."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        h = _Header(m)
        if h.take("4s") != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version, n_tensors, n_kv = h.take("I"), h.take("Q"), h.take("Q")
        meta = {}
        for _ in range(n_kv):
            key = h.string()
            meta[key] = h.value(h.take("I"))
        tensors = {}
        for _ in range(n_tensors):
            name = h.string()
            dims = [h.take("Q") for _ in range(h.take("I"))]
            tensors[name] = (dims, h.take("I"))
            h.take("Q")  # offset
    arch = meta.get("general.architecture", "?")
    embd = tensors.get("token_embd.weight", ([0, 0], -1))
    vocab = meta.get("tokenizer.ggml.tokens") or embd[0][1]
    linear = Counter(
        GGML_TYPES.get(t, str(t)) for n, (d, t) in tensors.items() if n.startswith("blk.") and len(d) == 2
    )
    token_type = meta.get("tokenizer.ggml.token_type")
    normal = [i for i, t in enumerate(token_type[:vocab]) if t == TOKEN_NORMAL] if token_type else None
    return {
        "gguf_version": version,
        "architecture": arch,
        "name": meta.get("general.name"),
        "file_type": meta.get("general.file_type"),
        "vocab": vocab,
        "hidden": meta.get(f"{arch}.embedding_length"),
        "layers": meta.get(f"{arch}.block_count"),
        "linear_types": dict(linear.most_common()),
        "embedding_type": GGML_TYPES.get(embd[1], str(embd[1])),
        "tied": "output.weight" not in tensors,
        "keys": sorted(meta),
        "normal_ids": normal,
    }


def make_ids(info: dict, lengths: list[int], seed: int) -> list[list[int]]:
    """One id list per length: NORMAL tokens (all ids below the vocab if the file has no types)."""
    rng = random.Random(seed)
    pool = info["normal_ids"] or range(info["vocab"])
    return [[pool[rng.randrange(len(pool))] for _ in range(t)] for t in lengths]


# --------------------------------------------------------------------------------------------
# safetensors (f32 only), standard library only: the two sides' hidden states.
# --------------------------------------------------------------------------------------------


def write_f32_safetensors(path: Path, tensors: dict[str, tuple[list[int], bytes]]) -> None:
    header, off = {}, 0
    for name, (shape, raw) in tensors.items():
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for _, raw in tensors.values():
            f.write(raw)


def read_f32_safetensors(path: Path) -> dict[str, tuple[list[int], array]]:
    data = path.read_bytes()
    n = struct.unpack_from("<Q", data)[0]
    out = {}
    for name, meta in json.loads(data[8 : 8 + n]).items():
        if name == "__metadata__":
            continue
        if meta["dtype"] != "F32":
            raise ValueError(f"{path}: {name} is {meta['dtype']}, expected F32")
        a, b = meta["data_offsets"]
        values = array("f")
        values.frombytes(data[8 + n + a : 8 + n + b])
        if sys.byteorder != "little":
            values.byteswap()
        out[name] = (meta["shape"], values)
    return out


def agreement(ours: array, theirs: array, hidden: int) -> dict:
    """Per-token cosine (min, mean), relative L2 |ours - llama| / |llama| and max |diff|."""
    cos, diff2, ref2, max_abs = [], 0.0, 0.0, 0.0
    for i in range(0, len(ours), hidden):
        x, y = ours[i : i + hidden], theirs[i : i + hidden]
        xy, xx, yy = sum(map(mul, x, y)), sum(map(mul, x, x)), sum(map(mul, y, y))
        d = list(map(sub, x, y))
        diff2 += sum(map(mul, d, d))
        ref2 += yy
        max_abs = max(max_abs, max(map(abs, d)))
        cos.append(xy / math.sqrt(xx * yy) if xx > 0 and yy > 0 else float("nan"))
    return {
        "cos_min": float("nan") if any(math.isnan(c) for c in cos) else min(cos),  # NaN: a side broke
        "cos_mean": sum(cos) / len(cos),
        "rel_l2": math.sqrt(diff2 / ref2) if ref2 else float("nan"),
        "max_abs_diff": max_abs,
    }


# --------------------------------------------------------------------------------------------
# The llama.cpp side (its own process, under the llama-cpp-python interpreter).
# --------------------------------------------------------------------------------------------


def proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def llama_worker(a: argparse.Namespace) -> None:
    import ctypes

    import llama_cpp as ll

    logs: list[tuple[int, str]] = []

    @ll.llama_log_callback
    def on_log(level: int, text: bytes, _user) -> None:
        s = text.decode("utf-8", "replace") if text else ""
        if level == CONT and logs:
            logs[-1] = (logs[-1][0], logs[-1][1] + s)
        else:
            logs.append((level, s))
        if a.llama_verbose:
            sys.stderr.write(s)

    def fail(what: str) -> None:
        tail = [s.rstrip() for lv, s in logs if lv >= WARN][-20:] or [s.rstrip() for _, s in logs[-20:]]
        print(json.dumps({"impl": "llama.cpp", "error": what, "log": tail}))
        sys.exit(3)

    ll.llama_log_set(on_log, ctypes.c_void_p(0))
    ll.llama_backend_init()
    ids = json.loads(Path(a.ids).read_text())
    max_len = max(map(len, ids))
    rss_before = proc_status_bytes("VmRSS")

    t0 = time.perf_counter()
    mp = ll.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.load_mode = ll.LLAMA_LOAD_MODE_NONE if a.no_mmap else ll.LLAMA_LOAD_MODE_MMAP
    model = ll.llama_model_load_from_file(str(a.model).encode(), mp)
    if not model:
        fail(f"llama_model_load_from_file({a.model}) returned NULL")
    n_embd = ll.llama_model_n_embd(model)
    flash = {
        "auto": ll.LLAMA_FLASH_ATTN_TYPE_AUTO,
        "on": ll.LLAMA_FLASH_ATTN_TYPE_ENABLED,
        "off": ll.LLAMA_FLASH_ATTN_TYPE_DISABLED,
    }[a.flash_attn]

    def new_context(cb=None):
        cp = ll.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = max_len
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = a.threads
        cp.embeddings = True
        cp.pooling_type = ll.LLAMA_POOLING_TYPE_NONE
        cp.flash_attn_type = flash
        cp.type_k = cp.type_v = KV_TYPES[a.kv_type]
        if cb is not None:
            cp.cb_eval = cb
        ctx = ll.llama_init_from_model(model, cp)
        if not ctx:
            fail("llama_init_from_model returned NULL")
        return ctx

    ctx = new_context()
    load_s = time.perf_counter() - t0

    batch = ll.llama_batch_init(max_len, 0, 1)

    def evaluate(ctx, toks: list[int]) -> tuple[list[float], bytes]:
        """Warm-up + `reps` timed full-prompt decodes; the last one's hidden states."""
        batch.n_tokens = len(toks)
        for i, t in enumerate(toks):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
            batch.seq_id[i][0] = 0
        mem = ll.llama_get_memory(ctx)
        times = []
        for rep in range(a.reps + 1):
            if mem:
                ll.llama_memory_clear(mem, True)  # a fresh prompt every time, nothing cached
            s = time.perf_counter()
            rc = ll.llama_decode(ctx, batch)
            ll.llama_synchronize(ctx)
            elapsed = (time.perf_counter() - s) * 1e3
            if rc != 0:
                fail(f"llama_decode returned {rc} ({len(toks)} tokens)")
            if rep > 0:
                times.append(elapsed)
        rows = []
        for i in range(len(toks)):
            p = ll.llama_get_embeddings_ith(ctx, i)
            if not p:
                fail(f"no embeddings for token {i}")
            rows.append(ctypes.string_at(ctypes.cast(p, ctypes.c_void_p).value, n_embd * 4))
        return sorted(times), b"".join(rows)

    results, hidden = [], {}
    for n, toks in enumerate(ids):
        times, h = evaluate(ctx, toks)
        hidden[f"hidden.{n}"] = ([1, len(toks), n_embd], h)
        results.append(
            {"batch": 1, "tokens": len(toks), "median_ms": times[len(times) // 2], "min_ms": times[0]}
        )
    report = {
        "impl": "llama.cpp",
        "llama_cpp_python": ll.__version__,
        "system_info": ll.llama_print_system_info().decode(errors="replace").strip(),
        "load_s": load_s,
        "results": results,
        "peak_rss_bytes": proc_status_bytes("VmHWM"),
        "rss_before_load_bytes": rss_before,
        "rss_anon_bytes": proc_status_bytes("RssAnon"),
        "rss_file_bytes": proc_status_bytes("RssFile"),
        "mmap": not a.no_mmap,
        "flash_attn": a.flash_attn,
        "kv_type": a.kv_type,
        "n_ctx": ll.llama_n_ctx(ctx),
        "n_batch": ll.llama_n_batch(ctx),
        "n_ubatch": ll.llama_n_ubatch(ctx),
        "n_threads": ll.llama_n_threads(ctx),
        "n_threads_batch": ll.llama_n_threads_batch(ctx),
        "n_embd": n_embd,
        "model_size_bytes": ll.llama_model_size(model),
        "model_desc": _model_desc(ll, model),
    }
    write_f32_safetensors(Path(a.hidden_out), hidden)
    ll.llama_free(ctx)

    # The same without the LM head: stop the graph once the final norm (the embeddings) is done;
    # with pooling NONE that node is renamed from `result_norm` to `result_embd_pooled`.
    ggml = ctypes.CDLL(str(Path(ll.__file__).parent / "lib" / "libggml-base.so"))
    ggml.ggml_get_name.restype, ggml.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    seen = {"stops": 0, "asks": 0}

    @ll.ggml_backend_sched_eval_callback
    def stop_after_norm(t, ask: bool, _user) -> bool:
        if ask:
            seen["asks"] += 1
            return ggml.ggml_get_name(t) in (b"result_norm", b"result_embd_pooled")
        seen["stops"] += 1
        return False  # the node is computed: skip the rest of the graph (the LM head)

    ctx = new_context(stop_after_norm)
    max_diff = 0.0
    for n, (r, toks) in enumerate(zip(results, ids, strict=True)):
        times, h = evaluate(ctx, toks)
        r["nohead_median_ms"], r["nohead_min_ms"] = times[len(times) // 2], times[0]
        full = array("f", hidden[f"hidden.{n}"][1])
        max_diff = max(max_diff, max(map(abs, map(sub, array("f", h), full))))
    decodes = len(ids) * (a.reps + 1)
    report["nohead"] = {
        "stopped_every_decode": seen["stops"] == decodes,
        "graph_nodes_per_decode": seen["asks"] / decodes,
        "max_abs_diff_vs_full": max_diff,
    }
    ll.llama_free(ctx)
    ll.llama_batch_free(batch)
    report["warnings"] = [s.rstrip() for lv, s in logs if lv >= WARN]
    print(json.dumps(report))


def _model_desc(ll, model) -> str:
    import ctypes

    buf = ctypes.create_string_buffer(256)
    ll.llama_model_desc(model, buf, len(buf))
    return buf.value.decode(errors="replace")


# --------------------------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------------------------


def run_side(label: str, cmd: list[str], env: dict | None = None) -> dict:
    """Runs one side; its stderr is shown afterwards. A failure comes back as {"error": ...}."""
    print(f"{label}: " + " ".join(cmd), file=sys.stderr)
    s = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    except OSError as e:  # e.g. the binary is being replaced by a build
        return {"error": str(e), "wall_s": time.perf_counter() - s}
    sys.stderr.write(out.stderr)
    try:
        r = last_json_line(out.stdout, label)
    except (RuntimeError, json.JSONDecodeError):
        r = {}
    if out.returncode != 0:
        tail = "\n".join(out.stderr.strip().splitlines()[-15:])
        r.setdefault("error", f"exit status {out.returncode}: {tail}")
    r["wall_s"] = time.perf_counter() - s
    return r


def make_models(binary: Path, specs: list[str], workdir: Path) -> list[Path]:
    """WORKDIR/SHAPE-TYPE.gguf for each SHAPE:TYPE, written (into .partial/, then renamed) if missing."""
    paths = []
    for spec in specs:
        shape, _, ty = spec.partition(":")
        if not ty:
            raise SystemExit(f"--make wants SHAPE:TYPE, got {spec!r}")
        dest = workdir / f"{shape}-{ty}.gguf"
        if not dest.exists():
            tmp = workdir / ".partial" / dest.name
            tmp.parent.mkdir(parents=True, exist_ok=True)
            print(f"model: writing a random {shape}, {ty}, to {dest} ...", file=sys.stderr)
            subprocess.run(
                [str(binary), "random-model", "--shape", shape, "--gguf", ty, "--out", str(tmp)],
                check=True,
                stdout=sys.stderr,
            )
            tmp.rename(dest)
        paths.append(dest)
    return paths


def cpu_summary() -> dict:
    model, flags = "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name" and model == "?":
                model = val.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(val.split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    return {"model": model, "cores": os.cpu_count(), "flags": {f: f in flags for f in wanted}}


def bench_file(path: Path, args: argparse.Namespace, binary: Path, tmp: Path) -> dict:
    info = gguf_info(path)
    ids = make_ids(info, args.tokens, args.seed)
    ids_path, ours_h, llama_h = tmp / "ids.json", tmp / "ours.safetensors", tmp / "llama.safetensors"
    ids_path.write_text(json.dumps(ids))
    for p in (ours_h, llama_h):
        p.unlink(missing_ok=True)

    cmd = [
        str(binary),
        "bench-encode",
        "--model",
        str(path),
        "--ids",
        str(ids_path),
        "--hidden-out",
        str(ours_h),
        "--reps",
        str(args.reps),
    ]
    if args.compare_f32_layers:
        cmd += ["--compare-f32-layers", str(args.compare_f32_layers)]
    mtime = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(binary.stat().st_mtime))  # builds go on
    load = {"ours": wait_for_load(args.wait_load, args.wait_max, "ours")}
    ours = run_side("ours", cmd, env={**os.environ, "RAYON_NUM_THREADS": str(args.threads)})
    load["ours"]["load_after"] = os.getloadavg()[0]
    load["llama"] = wait_for_load(args.wait_load, args.wait_max, "llama.cpp")
    cmd = [
        str(args.llama_python),
        str(Path(__file__).resolve()),
        "--_llama-worker",
        "--model",
        str(path),
        "--ids",
        str(ids_path),
        "--hidden-out",
        str(llama_h),
        "--threads",
        str(args.threads),
        "--reps",
        str(args.reps),
        "--flash-attn",
        args.flash_attn,
        "--kv-type",
        args.kv_type,
    ]
    cmd += ["--no-mmap"] * args.no_mmap + ["--llama-verbose"] * args.llama_verbose
    llama = run_side("llama.cpp", cmd)
    load["llama"]["load_after"] = os.getloadavg()[0]

    vs_ref = {}
    if args.reference:
        ref_h = tmp / "reference.safetensors"
        ref_h.unlink(missing_ok=True)
        cmd = [str(binary), "bench-encode", "--model", str(path), "--ids", str(ids_path)]
        cmd += ["--hidden-out", str(ref_h), "--reps", "1"]
        env = {**os.environ, "RAYON_NUM_THREADS": str(args.threads), "QWENCLIP_QMATMUL": "dequantize"}
        if "error" not in run_side("reference (ours, QWENCLIP_QMATMUL=dequantize)", cmd, env=env):
            vs_ref = {"ours": compare(ours_h, ref_h, len(ids)), "llama": compare(llama_h, ref_h, len(ids))}
    info = {k: v for k, v in info.items() if k != "normal_ids"}
    return {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "gguf": info,
        "ids": ids,
        "binary_mtime": mtime,
        "qwenclip": ours,
        "llama": llama,
        "agreement": compare(ours_h, llama_h, len(ids)),
        "vs_reference": vs_ref,
        "loadavg_1min": load,
    }


def compare(a: Path, b: Path, n: int) -> list[dict]:
    """`agreement` of `a` against `b` (hidden.0 .. hidden.N-1); [] when a side wrote nothing."""
    if not (a.exists() and b.exists()):
        return []
    x, y = read_f32_safetensors(a), read_f32_safetensors(b)
    out = []
    for i in range(n):
        (sx, vx), (sy, vy) = x[f"hidden.{i}"], y[f"hidden.{i}"]
        out.append(agreement(vx, vy, sx[-1]) if sx == sy else {"error": f"shapes differ: {sx} vs {sy}"})
    return out


def rows_of(r: dict, stat: str, width: int) -> list[tuple[str, ...]]:
    name = Path(r["file"]).name
    ty = "+".join(r["gguf"]["linear_types"]) or "?"
    ours, llama = r["qwenclip"], r["llama"]
    if "error" in ours or "error" in llama:
        what = " and ".join(k for k, v in (("ours", ours), ("llama.cpp", llama)) if "error" in v) + " failed"
        return [(name, ty, "-", what) + ("",) * (width - 4)]
    lines = []
    n = len(ours["results"])
    ref = r["vs_reference"] or {"ours": [{}] * n, "llama": [{}] * n}
    for o, t, ag, ro, rl in zip(
        ours["results"], llama["results"], r["agreement"] or [{}] * n, ref["ours"], ref["llama"], strict=True
    ):
        om, tm, nohead = o[f"{stat}_ms"], t[f"{stat}_ms"], t.get(f"nohead_{stat}_ms", float("nan"))
        lines.append(
            (
                name,
                ty,
                str(o["tokens"]),
                f"{om:.1f}",
                f"{tm:.1f}",
                f"{ratio(om, tm):.2f}",
                f"{nohead:.1f}",
                f"{ratio(om, nohead):.2f}",
                f"{ours['peak_rss_bytes'] / GIB:.2f}",
                f"{llama['peak_rss_bytes'] / GIB:.2f}",
                f"{ratio(ours['peak_rss_bytes'], llama['peak_rss_bytes']):.2f}",
                f"{ours['load_s']:.2f}",
                f"{llama['load_s']:.2f}",
                f"{ag.get('cos_min', float('nan')):.6f}",
                f"{ag.get('cos_mean', float('nan')):.6f}",
                f"{ag.get('rel_l2', float('nan')):.2e}",
                f"{ag.get('max_abs_diff', float('nan')):.2e}",
                f"{ro.get('cos_min', float('nan')):.6f}",
                f"{rl.get('cos_min', float('nan')):.6f}",
            )[:width]
        )
    return lines


HEADER = (
    "file",
    "type",
    "tokens",
    "ours ms",
    "llama ms",
    "ours/llama",
    "llama-head ms",
    "ours/-head",
    "ours GiB",
    "llama GiB",
    "rss o/l",
    "ours load s",
    "llama load s",
    "cos min",
    "cos mean",
    "rel L2",
    "max |d|",
)
# llama.cpp warnings expected here (kept in the JSON, not printed): pooling NONE is asked for
# on purpose; Qwen's control tokens are not end-of-generation ones.
BENIGN = ("pooling_type is [-1], but [0] was specified", "is not marked as EOG")
REFERENCE_HEADER = ("ours~ref cos", "llama~ref cos")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("gguf", nargs="*", type=Path, help="GGUF files (Qwen3) to benchmark")
    add_binary_option(p, "qwenclip-dev")
    p.add_argument(
        "--make", default="", help="SHAPE:TYPE,... : also WORKDIR/SHAPE-TYPE.gguf, written if missing"
    )
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where --make writes")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of both sides")
    p.add_argument("--tokens", type=int_list, default=[77, 256], help="prompt lengths (batch 1)")
    p.add_argument("--reps", type=int, default=5, help="timed passes per input (after one warm-up)")
    p.add_argument("--seed", type=int, default=7, help="seed of the token ids")
    p.add_argument(
        "--compare-f32-layers",
        type=int,
        default=0,
        help="N > 0: ours also times its f32 path on the first N layers (bench-encode)",
    )
    p.add_argument("--no-mmap", action="store_true", help="llama.cpp reads the weights instead of mmapping")
    p.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto", help="llama.cpp's")
    p.add_argument(
        "--kv-type", choices=tuple(KV_TYPES), default="f16", help="llama.cpp's KV cache type (f32: exact)"
    )
    p.add_argument("--stat", choices=("median", "min"), default="median", help="which timing the table shows")
    p.add_argument(
        "--reference",
        action="store_true",
        help="also run ours with QWENCLIP_QMATMUL=dequantize (f32 activations: only the weights'"
        " own rounding) and show each side's min cosine to it: which side is off",
    )
    add_wait_options(p)
    p.add_argument(
        "--llama-python",
        type=Path,
        default=None,
        help="interpreter with llama_cpp (default: the one tests/reference/llamacpp_env.sh builds)",
    )
    p.add_argument("--llama-verbose", action="store_true", help="show llama.cpp's log")
    p.add_argument("--json", type=Path, default=None, help="write everything here")
    p.add_argument("--_llama-worker", dest="llama_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--ids", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--hidden-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.reps < 1:
        p.error("--reps must be >= 1")
    if args.llama_worker:
        llama_worker(args)
        return

    binary = resolve_binary(p, args.qwenclip_dev, "qwenclip-dev")
    files = list(args.gguf) + make_models(
        binary, [s for s in args.make.split(",") if s.strip()], args.workdir
    )
    if not files:
        p.error("no GGUF file: pass paths or --make SHAPE:TYPE")
    if args.llama_python is None:
        # llamacpp_env.sh builds llama-cpp-python once (cached outside the clone) and prints
        # its interpreter.
        env_sh = Path(__file__).with_name("llamacpp_env.sh")
        out = subprocess.run(["bash", str(env_sh)], check=True, capture_output=True, text=True)
        args.llama_python = Path(out.stdout.strip().splitlines()[-1])

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as tmp:
        for f in files:
            results.append(bench_file(f, args, binary, Path(tmp)))

    cpu = cpu_summary()
    llama0 = next((r["llama"] for r in results if "error" not in r["llama"]), {})
    flags = " ".join(f"{k}={'y' if v else 'n'}" for k, v in cpu["flags"].items())
    print(
        f"\nCPU {cpu['model']} ({cpu['cores']} cores; {flags}); threads {args.threads} both sides;"
        f" batch 1; reps {args.reps} after 1 warm-up; binary {binary}"
    )
    print(
        f"llama-cpp-python {llama0.get('llama_cpp_python', '?')}, mmap {not args.no_mmap},"
        f" flash-attn {args.flash_attn}, kv {args.kv_type}; system info: {llama0.get('system_info', '?')}"
    )
    header = HEADER + REFERENCE_HEADER * args.reference
    lines = [line for r in results for line in rows_of(r, args.stat, len(header))]
    print("\n".join(render(header, lines, first_left=True)))
    print(
        f"ms = {args.stat} of the timed passes; llama-head = llama.cpp stopped after the final norm"
        " (no LM head: the fair comparison);"
        " GiB = peak RSS (VmHWM); cos/rel L2/max |d| = ours vs llama.cpp, per token; ~ref = min cos to"
        " the dequantized reference (--reference)"
    )

    for r in results:
        name = Path(r["file"]).name
        for side in ("qwenclip", "llama"):
            if "error" in r[side]:
                print(f"\n{name}: {side} FAILED: {r[side]['error']}")
                for line in r[side].get("log", []):
                    print(f"    {line}")
        nh = r["llama"].get("nohead")
        if nh and not (nh["stopped_every_decode"] and nh["max_abs_diff_vs_full"] == 0.0):
            print(f"{name}: llama-head run suspect: {nh}")
        for c in r["qwenclip"].get("f32_compare", []):
            print(
                f"{name}: {c['tokens']} tokens, first {c['layers']} layers: quantized/f32"
                f" {c['quantized_over_f32']:.2f}, f32 whole model ~{c['f32_whole_model_ms_extrapolated']:.0f} ms"
                " (extrapolated)"
            )
        warn = [w for w in dict.fromkeys(r["llama"].get("warnings", [])) if not any(b in w for b in BENIGN)]
        if warn:
            print(f"{name}: llama.cpp warnings: " + " | ".join(warn[:8]))
        load = r["loadavg_1min"]
        o, t = load["ours"], load["llama"]
        if "error" in r["llama"]:
            continue
        print(
            f"{name}: 1-min loadavg ours {o['load_before']:.2f} -> {o['load_after']:.2f},"
            f" llama {t['load_before']:.2f} -> {t['load_after']:.2f}; llama rss before load"
            f" {r['llama'].get('rss_before_load_bytes', 0) / GIB:.2f} GiB,"
            f" anon {r['llama'].get('rss_anon_bytes', 0) / GIB:.2f} GiB,"
            f" file {r['llama'].get('rss_file_bytes', 0) / GIB:.2f} GiB"
        )

    if args.json:
        write_json(
            args.json,
            {
                "cpu": cpu,
                "threads": args.threads,
                "reps": args.reps,
                "seed": args.seed,
                "tokens": args.tokens,
                "binary": str(binary),
                "mmap": not args.no_mmap,
                "flash_attn": args.flash_attn,
                "kv_type": args.kv_type,
                "files": results,
            },
        )


if __name__ == "__main__":
    main()
