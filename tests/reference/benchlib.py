"""Helpers shared by the CPU benchmarks bench_encode.py, bench_train.py and bench_cache.py.

Not a script. Each benchmark puts its own directory (this one) first on `sys.path` and imports
this module, so the import works both in the driver and in the `--_torch-worker` (and
`--_write-teacher`) child processes it starts by re-running itself.

What is here
  - the binaries, `qwenclip` or `qwenclip-dev`: the default path (target/release, else
    target/debug) and the `--qwenclip` / `--qwenclip-dev` option;
  - inputs written once and reused: `ensure_written` (a directory written by a command into
    `.NAME.partial` and renamed when complete) and `ensure_model` (a random Qwen3 from
    `qwenclip-dev random-model`, used by bench_encode.py and bench_train.py);
  - running a side: `run_json` (a process that prints one JSON report as its last `{` line,
    with its wall time), `last_json_line`, `peak_rss_bytes` (a worker's own RSS high-water
    mark);
  - the load average: `wait_for_load` (`--wait-load`, `--wait-max`) and `loadavg_line`;
  - reporting: `ratio`, `render` (a right-aligned text table), `cpu_label`, `machine_info`,
    `write_json` (`--json`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TOKENIZER = REPO / "tests" / "fixtures" / "tokenizers" / "qwen_tokenizer.json"
DEFAULT_WORKDIR = Path("/tmp/qwenclip-bench")  # one cache of random models for all benchmarks
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


# --------------------------------------------------------------------------------------------
# Options and the binary.
# --------------------------------------------------------------------------------------------


def default_binary(name: str = "qwenclip") -> Path:
    for profile in ("release", "debug"):
        p = REPO / "target" / profile / name
        if p.exists():
            return p
    return REPO / "target" / "release" / name


def add_binary_option(p: argparse.ArgumentParser, name: str = "qwenclip") -> None:
    """`--NAME`: the `qwenclip` command, or `qwenclip-dev` (the benchmarks and random models)."""
    p.add_argument(f"--{name}", type=Path, default=None,
                   help=f"{name} binary (default: target/release/{name}, else target/debug/{name})")


def resolve_binary(p: argparse.ArgumentParser, binary: Path | None, name: str = "qwenclip") -> Path:
    """`--NAME` (or the default), resolved; a parser error when it does not exist."""
    binary = (binary or default_binary(name)).resolve()
    if not binary.exists():
        p.error(f"no {name} binary at {binary} (build it with `cargo build --release --features dev`,"
                f" or pass --{name})")
    print(f"binary: {binary}", file=sys.stderr)
    return binary


def add_wait_options(p: argparse.ArgumentParser) -> None:
    """`--wait-load` and `--wait-max`, the arguments of `wait_for_load`."""
    p.add_argument("--wait-load", type=float, default=0.0,
                   help="before each side, wait until the 1-min load average is below this (0: no wait)")
    p.add_argument("--wait-max", type=float, default=600.0, help="longest wait per side, seconds")


def int_list(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


# --------------------------------------------------------------------------------------------
# Inputs written once.
# --------------------------------------------------------------------------------------------


def ensure_written(workdir: Path, name: str, files: Iterable[str], what: str, description: str,
                   command: Callable[[Path], list[str]]) -> Path:
    """WORKDIR/NAME when all of `files` are in it; else runs `command(tmp)` (its stdout goes to
    stderr), which must write the directory `tmp` = WORKDIR/.NAME.partial, and renames `tmp`
    to WORKDIR/NAME, so only a complete directory is ever found under its real name."""
    dest = workdir / name
    if all((dest / f).exists() for f in files):
        print(f"{what}: {dest} (cached)", file=sys.stderr)
        return dest
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    print(f"{what}: writing {description} to {dest} ...", file=sys.stderr)
    subprocess.run(command(tmp), check=True, stdout=sys.stderr)
    tmp.rename(dest)
    return dest


def ensure_model(binary: Path, shape: str, workdir: Path, tokenizer: Path) -> Path:
    """WORKDIR/SHAPE: a Qwen3 with random f32 weights (`qwenclip-dev random-model`, `binary`),
    written once."""
    return ensure_written(
        workdir, shape, MODEL_FILES, "model", f"a random {shape}",
        lambda tmp: [str(binary), "random-model", "--shape", shape, "--out", str(tmp),
                     "--tokenizer", str(tokenizer)],
    )


# --------------------------------------------------------------------------------------------
# Running a side.
# --------------------------------------------------------------------------------------------


def timed(step: Callable[[], object], reps: int) -> tuple[list[float], list]:
    """One warm-up call of `step`, then `reps` timed ones: (the timed seconds, sorted; every
    call's result, warm-up first)."""
    times, results = [], []
    for rep in range(reps + 1):
        t0 = time.perf_counter()
        results.append(step())
        if rep > 0:
            times.append(time.perf_counter() - t0)
    return sorted(times), results


def last_json_line(stdout: str, what: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{what} printed no JSON line:\n{stdout}")


def run_json(label: str, cmd: list[str], what: str) -> tuple[dict, float]:
    """Prints `LABEL: CMD` to stderr, runs `cmd` (stderr passes through, a non-zero exit raises)
    and returns (its last JSON line, wall seconds of the process)."""
    print(f"{label}: " + " ".join(cmd), file=sys.stderr)
    s = time.perf_counter()
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    r = last_json_line(out.stdout, what)
    return r, time.perf_counter() - s


def peak_rss_bytes() -> int:
    """This process's peak resident memory (RSS high-water mark), bytes (Linux: KiB * 1024)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------------------------
# The load average.
# --------------------------------------------------------------------------------------------


def wait_for_load(limit: float, max_s: float, what: str) -> dict:
    """Polls the 1-minute load average until it is below `limit` (0: don't wait)."""
    t0 = time.time()
    waited = False
    while limit > 0 and os.getloadavg()[0] >= limit and time.time() - t0 < max_s:
        if not waited:
            print(f"{what}: load {os.getloadavg()[0]:.2f} >= {limit}, waiting (max {max_s:.0f} s)",
                  file=sys.stderr)
            waited = True
        time.sleep(10)
    load = os.getloadavg()[0]
    quiet = limit <= 0 or load < limit
    if not quiet:
        print(f"{what}: load still {load:.2f} after {max_s:.0f} s; running anyway", file=sys.stderr)
    return {"load_before": load, "waited_s": time.time() - t0, "quiet": quiet}


def loadavg_line(label: str, load: dict) -> str:
    """`load` = {"ours": .., "hf": ..}, each a `wait_for_load` result with `load_after` added."""
    o, h = load["ours"], load["hf"]
    return (f"{label}   ours {o['load_before']:.2f} -> {o['load_after']:.2f}"
            f"   hf {h['load_before']:.2f} -> {h['load_after']:.2f}"
            f"   (each side alone keeps ~{os.cpu_count()} cores busy; more before a side means contention)")


# --------------------------------------------------------------------------------------------
# Reporting.
# --------------------------------------------------------------------------------------------


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def render(header: Sequence[str], lines: list[Sequence[str]], first_left: bool = False) -> list[str]:
    """A text table: header, a dashed rule, one row per line; columns two spaces apart and
    right-aligned (the first one left-aligned with `first_left`)."""
    widths = [max(len(header[i]), *(len(l[i]) for l in lines)) if lines else len(header[i])
              for i in range(len(header))]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if first_left and i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines]


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile")


def _cpuinfo() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags as Linux lists them ("", {} elsewhere)."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, flags


def cpu_label() -> str:
    """The CPU, its SIMD flags, and an OpenBLAS kernel set forced by the environment (it
    decides the speed of every product on the system BLAS: a VM may pin AVX2 kernels on an
    AVX-512 CPU)."""
    model, flags = _cpuinfo()
    simd = " ".join(f for f in SIMD_FLAGS if f in flags)
    label = f"CPU {model or '?'} ({platform.machine()}, {os.cpu_count()} cores; {simd})"
    core = os.environ.get("OPENBLAS_CORETYPE")
    return label + (f", OPENBLAS_CORETYPE={core}" if core else ", OpenBLAS picks its kernels")


def machine_info() -> dict:
    model, flags = _cpuinfo()
    return {
        "arch": platform.machine(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "simd": [f for f in SIMD_FLAGS if f in flags],
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
        "python": platform.python_version(),
    }


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
