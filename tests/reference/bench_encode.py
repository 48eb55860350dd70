"""CPU speed and memory of the qwenclip LLM forward pass against `transformers`, same weights.

What is measured
  The Qwen3 part of the encoder only: token ids -> hidden states of the last layer after the
  final RMSNorm (no tokenizer, no LoRA, no resampler). For every (batch, tokens) pair, one
  warm-up pass and then `--reps` timed passes; the table shows the median (and min) in ms.
  Also the time to load the weights and the peak resident memory (RSS high-water mark) of
  each process.

How
  1. `qwenclip-dev random-model --shape SHAPE` writes a Qwen3 of the real size with random f32
     weights in the Hugging Face layout (config.json, model.safetensors, tokenizer.json) into
     WORKDIR/SHAPE, once: it is reused when it is already there.
  2. `qwenclip-dev bench-encode` times our forward pass (candle, `ForwardMode::Fast`) and prints
     one JSON line.
  3. This script re-runs itself in a separate Python process (so that the peak RSS it reports,
     `getrusage(RUSAGE_SELF).ru_maxrss`, is transformers' own and includes `import torch`),
     loads `transformers.Qwen3Model.from_pretrained(dir, dtype=torch.float32)` with the
     default attention implementation (sdpa), `.eval()`, `torch.inference_mode()`,
     `torch.set_num_threads(os.cpu_count())`, and times `model(input_ids, attention_mask)`
     on the same token ids (the same SplitMix64 stream, seed 7, as `bench-encode`) with an
     all-ones mask.
  4. Both JSON reports are combined into a table with the ratio ours / transformers per
     configuration, for load time and for peak RSS; `--json` writes the combined report.
  The two runs are sequential, never concurrent, so they do not compete for cores.

Target
  The issue's goal is ratio <= 1.0 on CPU (we are no slower and use no more memory than
  `transformers`). It is checked by reading the table, not by a test: timings depend on the
  machine, its load and the build profile (a `target/debug` binary has the crate at
  opt-level 1 and dependencies at opt-level 3; a release build is the fair comparison).

Usage
  python tests/reference/bench_encode.py [--qwenclip-dev PATH_TO_BINARY] [--shape qwen3-0.6b]
      [--workdir DIR] [--reps 5] [--batches 1,2] [--tokens 77,256] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    DEFAULT_TOKENIZER, DEFAULT_WORKDIR, add_binary_option, cpu_label, ensure_model, int_list,
    machine_info, peak_rss_bytes, ratio, render, resolve_binary, run_json, write_json,
)

IDS_SEED = 7  # `bench-encode` draws its ids from `Rng::new(7)`
MAX_ID = 150_000  # ... below min(vocab_size, 150_000)


# --------------------------------------------------------------------------------------------
# Token ids: the exact stream of qwenclip::rng::Rng (SplitMix64), so both sides see the same ids.
# --------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


class SplitMix64:
    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK64

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def uniform(self) -> float:
        return (self.next_u64() >> 11) / float(1 << 53)

    def below(self, n: int) -> int:
        return int(self.uniform() * n) % max(n, 1)


def bench_ids(batches: list[int], tokens: list[int], vocab: int) -> dict[tuple[int, int], list[list[int]]]:
    """Ids per (batch, tokens), drawn in the same order as `bench-encode` (batches outer)."""
    rng = SplitMix64(IDS_SEED)
    n = min(vocab, MAX_ID)
    out = {}
    for b in batches:
        for t in tokens:
            flat = [rng.below(n) for _ in range(b * t)]
            out[(b, t)] = [flat[i * t : (i + 1) * t] for i in range(b)]
    return out


# --------------------------------------------------------------------------------------------
# The transformers side (runs in its own process: `--_torch-worker`).
# --------------------------------------------------------------------------------------------


def torch_worker(model_dir: Path, batches: list[int], tokens: list[int], reps: int) -> None:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    model = transformers.Qwen3Model.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0

    ids = bench_ids(batches, tokens, model.config.vocab_size)
    results = []
    with torch.inference_mode():
        for b in batches:
            for t in tokens:
                input_ids = torch.tensor(ids[(b, t)], dtype=torch.long)
                mask = torch.ones_like(input_ids)
                times = []
                for rep in range(reps + 1):  # rep 0 is the warm-up
                    s = time.perf_counter()
                    h = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
                    elapsed = (time.perf_counter() - s) * 1e3
                    assert h.shape == (b, t, model.config.hidden_size)
                    del h
                    if rep > 0:
                        times.append(elapsed)
                times.sort()
                results.append(
                    {"batch": b, "tokens": t, "median_ms": times[len(times) // 2], "min_ms": times[0]}
                )

    report = {
        "impl": "transformers",
        "load_s": load_s,
        "results": results,
        "peak_rss_bytes": peak_rss_bytes(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": model.config._attn_implementation,
        "mkl": torch.backends.mkl.is_available(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "parallel_backend": next(
            (l.split(":", 1)[1].strip() for l in torch.__config__.parallel_info().splitlines()
             if l.startswith("ATen parallel backend")),
            "?",
        ),
    }
    print(json.dumps(report))


# --------------------------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------------------------


def run_ours(binary: Path, model_dir: Path, args: argparse.Namespace) -> dict:
    cmd = [
        str(binary), "bench-encode", "--model", str(model_dir),
        "--batches", ",".join(map(str, args.batches)),
        "--tokens", ",".join(map(str, args.tokens)),
        "--reps", str(args.reps),
    ]
    return run_json("ours", cmd, "qwenclip-dev bench-encode")[0]


def run_theirs(model_dir: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--_torch-worker",
        "--model-dir", str(model_dir),
        "--batches", ",".join(map(str, args.batches)),
        "--tokens", ",".join(map(str, args.tokens)),
        "--reps", str(args.reps),
    ]
    return run_json("transformers", cmd, "the transformers worker")[0]


def table(ours: dict, theirs: dict) -> tuple[str, dict]:
    by_key = {(r["batch"], r["tokens"]): r for r in theirs["results"]}
    rows = []
    header = ("batch", "tokens", "ours med ms", "ours min ms", "hf med ms", "hf min ms", "ours/hf")
    lines = []
    for r in ours["results"]:
        h = by_key.get((r["batch"], r["tokens"]))
        if h is None:
            continue
        q = ratio(r["median_ms"], h["median_ms"])
        rows.append({"batch": r["batch"], "tokens": r["tokens"], "ours_median_ms": r["median_ms"],
                     "ours_min_ms": r["min_ms"], "transformers_median_ms": h["median_ms"],
                     "transformers_min_ms": h["min_ms"], "ratio_median": q,
                     "ratio_min": ratio(r["min_ms"], h["min_ms"])})
        lines.append((str(r["batch"]), str(r["tokens"]), f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}",
                      f"{h['median_ms']:.1f}", f"{h['min_ms']:.1f}",
                      f"{q:.2f}" + ("" if q <= 1.0 else "  (slower)")))
    out = render(header, lines)

    rss_o, rss_h = ours["peak_rss_bytes"], theirs["peak_rss_bytes"]
    rss_q = ratio(rss_o, rss_h)
    load_q = ratio(ours["load_s"], theirs["load_s"])
    gib = 1024**3
    out.append("")
    out.append(f"peak RSS   ours {rss_o / gib:7.2f} GiB   hf {rss_h / gib:7.2f} GiB   ours/hf {rss_q:.2f}"
               + ("" if rss_q <= 1.0 else "  (more)"))
    out.append(f"load       ours {ours['load_s']:7.2f} s     hf {theirs['load_s']:7.2f} s     ours/hf {load_q:.2f}")
    out.append(f"threads    ours {ours.get('threads')}   hf {theirs.get('threads')}"
               f"   (torch {theirs.get('torch')}, transformers {theirs.get('transformers')},"
               f" attn {theirs.get('attn_implementation')}, mkl {theirs.get('mkl')},"
               f" mkldnn {theirs.get('mkldnn')}, {theirs.get('parallel_backend')})")
    summary = {"rows": rows, "ratio_peak_rss": rss_q, "ratio_load": load_q,
               "worst_ratio_median": max((r["ratio_median"] for r in rows), default=float("nan"))}
    return "\n".join(out), summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_binary_option(p, "qwenclip-dev")
    p.add_argument("--shape", default="qwen3-0.6b", help="random-model shape (qwen3-0.6b, qwen3-1.7b, ...)")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help="where the random model is written once and reused")
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    p.add_argument("--reps", type=int, default=5, help="timed passes per configuration (after one warm-up)")
    p.add_argument("--batches", type=int_list, default=[1, 2])
    p.add_argument("--tokens", type=int_list, default=[77, 256])
    p.add_argument("--pause", type=float, default=0.0,
                   help="seconds to sleep between the two sides (lets the load average settle)")
    p.add_argument("--json", type=Path, default=None, help="write the combined report here")
    p.add_argument("--_torch-worker", dest="torch_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.reps < 1:
        p.error("--reps must be >= 1")

    if args.torch_worker:
        torch_worker(args.model_dir, args.batches, args.tokens, args.reps)
        return

    binary = resolve_binary(p, args.qwenclip_dev, "qwenclip-dev")
    model_dir = ensure_model(binary, args.shape, args.workdir, args.tokenizer)

    # The 1-minute load average around each side: anything well above 0 before a side starts
    # means another process shared the cores and that side's timings are not trustworthy.
    load = {"before_ours": os.getloadavg()[0]}
    ours = run_ours(binary, model_dir, args)
    load["after_ours"] = os.getloadavg()[0]
    print(json.dumps(ours), file=sys.stderr)
    time.sleep(args.pause)  # let the load average settle between the sides
    load["before_hf"] = os.getloadavg()[0]
    theirs = run_theirs(model_dir, args)
    load["after_hf"] = os.getloadavg()[0]
    print(json.dumps(theirs), file=sys.stderr)
    text, summary = table(ours, theirs)

    print(f"\n{args.shape}, f32, {cpu_label()}, "
          f"reps {args.reps} after 1 warm-up, binary {binary}")
    print(text)
    print("loadavg    ours {before_ours:.2f} -> {after_ours:.2f}   hf {before_hf:.2f} -> {after_hf:.2f}"
          "   (1-min average: near 0 before a side on a quiet machine; a side alone adds up to ~{n})"
          .format(n=os.cpu_count(), **load))
    print("\ntarget: ours/hf <= 1.0 everywhere (read from this table; not a test)")

    if args.json:
        combined = {
            "shape": args.shape, "model_dir": str(model_dir), "binary": str(binary),
            "reps": args.reps, "batches": args.batches, "tokens": args.tokens,
            "machine": machine_info(),
            "qwenclip": ours, "transformers": theirs, "comparison": summary, "loadavg_1min": load,
        }
        write_json(args.json, combined)


if __name__ == "__main__":
    main()
