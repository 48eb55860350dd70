"""Benchmark (not a test) of the installed wheel, run by `bash .ci/wheel.sh bench [--big]`:
wheel size, `import qwenclip` time (fresh interpreters), and one encode through the package
(`Encoder.encode`) next to the same call made straight on the C ABI (`qwenclip_encode` through
ctypes into preallocated buffers), in one process, alternating, on the seeded tiny model and
(--big) on a Qwen3-0.6B of random weights with an untrained adapter. Prints JSON lines."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import qwenclip

PROMPTS = ["a red cube left of a blue sphere, studio photo", "a cat sitting under a wooden table"]


def cpu() -> str:
    flags = set()
    model = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    wanted = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni") if f in flags]
    return f"{model}, {os.cpu_count()} cores, {' '.join(wanted)}"


def import_ms(rounds: int) -> float:
    code = "import time; t = time.perf_counter(); import qwenclip; print((time.perf_counter() - t) * 1e3)"
    times = [float(subprocess.check_output([sys.executable, "-c", code])) for _ in range(rounds)]
    return statistics.median(times)


def direct_call(enc: qwenclip.Encoder):
    """The C ABI call with nothing around it: prompts, buffers and the pointer array made once."""
    lib = enc.library._lib
    s, e, p = enc.output_shape()
    n = len(PROMPTS)
    embeds = np.empty((n, s, e), np.float32)
    pooled = np.empty((n, p), np.float32)
    arr = (ctypes.c_char_p * n)(*[x.encode() for x in PROMPTS])
    handle = enc.handle

    def call():
        status = lib.qwenclip_encode(
            handle, arr, n, embeds.ctypes.data, embeds.size, pooled.ctypes.data, pooled.size
        )
        assert status == 0

    return call, embeds


def compare(enc: qwenclip.Encoder, rounds: int) -> dict:
    direct, direct_out = direct_call(enc)
    for _ in range(3):  # warm-up: weights paged in, thread pool up
        direct()
        ours = enc.encode(PROMPTS, output="numpy")[0]
    assert np.array_equal(ours, direct_out)
    t_pkg, t_abi = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        enc.encode(PROMPTS, output="numpy")
        t_pkg.append(time.perf_counter() - t)
        t = time.perf_counter()
        direct()
        t_abi.append(time.perf_counter() - t)
    pkg, abi = statistics.median(t_pkg), statistics.median(t_abi)
    return {
        "package_ms": pkg * 1e3,
        "c_abi_ms": abi * 1e3,
        "overhead_pct": (pkg / abi - 1) * 100,
        "rounds": rounds,
    }


def untrained_adapter(model: Path, out: Path) -> Path:
    """LoRA + a default-size resampler, saved before any step: what a trained adapter costs."""
    if not (out / "adapter" / "qwenclip.json").is_file():
        with (
            qwenclip.Encoder(model) as enc,
            qwenclip.TrainingRun(
                enc, {"out": str(out), "captions": {"text": "a"}, "settings": {"held_out": 0.0}}
            ) as run,
        ):
            run.save()
    return out / "adapter"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--big", type=Path, help="a work folder for the Qwen3-0.6B shape (kept between runs)")
    ap.add_argument("--rounds", type=int, default=30)
    a = ap.parse_args()
    wheel = Path(os.environ["QWENCLIP_WHEEL"])
    print(json.dumps({"cpu": cpu(), "library": qwenclip.library().describe()}))
    print(
        json.dumps(
            {"wheel": wheel.name, "wheel_mb": wheel.stat().st_size / 2**20, "import_ms": import_ms(15)}
        )
    )
    work = Path(tempfile.mkdtemp())
    dev = os.environ["QWENCLIP_DEV_BIN"]
    subprocess.run([dev, "tiny", "--out", str(work / "tiny")], check=True, capture_output=True)
    with qwenclip.Encoder(work / "tiny" / "model", adapter=work / "tiny" / "adapter") as enc:
        print(json.dumps({"model": "tiny", **compare(enc, a.rounds * 10)}), flush=True)
    if a.big:
        model = a.big / "qwen3-0.6b"
        if not (model / "config.json").is_file():
            subprocess.run([dev, "random-model", "--shape", "qwen3-0.6b", "--out", str(model)], check=True)
        adapter = untrained_adapter(model, a.big / "untrained")
        with qwenclip.Encoder(model, adapter=adapter) as enc:
            print(json.dumps({"model": "qwen3-0.6b (random)", **compare(enc, a.rounds)}), flush=True)


if __name__ == "__main__":
    main()
