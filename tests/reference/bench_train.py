"""CPU training-step throughput and peak memory of qwenclip against `transformers` + `peft`.

What is measured
  One distillation training step on a Qwen3 of a real size with random f32 weights:
    token ids -> Qwen3 forward with LoRA (r=16, alpha=16, no dropout, unmerged, base frozen) on
    q_proj/k_proj/v_proj/o_proj -> last hidden state (after the final RMSNorm) -> Perceiver
    resampler (width 1024, 16 heads, ff_mult 4, 4 layers, 77 latents, outputs [B,77,2048] +
    [B,1280]) -> MSE(prompt_embeds) + MSE(pooled) against random targets -> backward ->
    global grad-norm clip 1.0 -> AdamW (lr 1e-4 LoRA, 5e-4 resampler, weight decay 0.01).
  One warm-up step, then `--reps` timed steps; the median step time gives samples/s
  (batch / median). Also the peak resident memory (RSS high-water mark) of each process, and
  the number of trainable values on each side (they must match).

How
  1. `qwenclip-dev random-model --shape SHAPE` writes the random model (Hugging Face layout) into
     WORKDIR/SHAPE once; it is reused when it is already there (same cache as bench_encode.py).
  2. `qwenclip-dev bench-train` runs our steps (candle, `Trainer::step`) and prints one JSON line.
     Its prompts are " a" repeated (exactly `tokens` Qwen tokens each); the ids do not change
     the amount of work.
  3. This script re-runs itself in a separate Python process (so that its peak RSS,
     `getrusage(RUSAGE_SELF).ru_maxrss`, is the reference's own and includes `import torch`):
     `transformers.Qwen3ForCausalLM.from_pretrained(dir, dtype=torch.float32)` (default
     attention: sdpa), `peft.get_peft_model(model, LoraConfig(r, lora_alpha=r,
     target_modules=[q,k,v,o]_proj, lora_dropout=0))` (freezes the base), `.train()`; the
     hidden states come from the inner `Qwen3Model` (`peft_model.base_model.model.model(...)
     .last_hidden_state`, `use_cache=False`), so no LM head is computed, as in ours. The
     resampler is tests/reference/resampler.py with the same config; loss
     `F.mse_loss(embeds) + F.mse_loss(pooled)`, `loss.item()` (ours reads the loss back too),
     `torch.nn.utils.clip_grad_norm_(..., 1.0)`, `torch.optim.AdamW` with the two learning-rate
     groups (LoRA 1e-4, resampler 5e-4; the resampler group is split by weight decay exactly as
     ours decays: 0.01 on matrices except `latents`, 0 on vectors and `latents`, so three torch
     param groups), `torch.set_num_threads(os.cpu_count())`, random ids (seed 0), all-ones mask.
  4. Both JSON reports are combined into a table; `--json` writes the combined report.
  The two sides run one after the other, never concurrently. With `--wait-load X` the script
  waits (up to `--wait-max` seconds) before each side until the 1-minute load average is
  below X; the load averages around each side are printed next to the numbers.

Target
  ours/hf samples/s >= 1.0 on CPU (and peak RSS ratio <= 1.0). Read from the table; not a
  test. A `target/debug` binary has the crate at opt-level 1 and dependencies at opt-level 3;
  a release build is the fair comparison.

Usage
  python tests/reference/bench_train.py [--qwenclip-dev BIN] [--shape qwen3-0.6b] [--workdir DIR]
      [--batch 2] [--tokens 77] [--reps 3] [--lora-r 16] [--resampler-width 1024]
      [--resampler-heads 16] [--wait-load 1.5] [--wait-max 600] [--json OUT.json]
  (--batch and --tokens take comma lists; every (batch, tokens) pair is one row.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, resampler
from benchlib import (  # noqa: E402
    DEFAULT_TOKENIZER, DEFAULT_WORKDIR, add_binary_option, add_wait_options, cpu_label,
    ensure_model, int_list, loadavg_line, machine_info, peak_rss_bytes, ratio, render,
    resolve_binary, run_json, timed, wait_for_load, write_json,
)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]

# Fixed parts of the step (the same constants as qwenclip's TrainConfig::default and
# TargetDims::SDXL).
RESAMPLER_FF_MULT = 4
RESAMPLER_LAYERS = 4
SEQ, EMBED, POOLED = 77, 2048, 1280
LR_LORA, LR_RESAMPLER, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-4, 5e-4, 0.01, 1.0
BETAS, EPS = (0.9, 0.999), 1e-8


# --------------------------------------------------------------------------------------------
# The transformers + peft side (runs in its own process: `--_torch-worker`).
# --------------------------------------------------------------------------------------------


def build_student(model_dir: Path, lora_r: int, width: int, heads: int):
    """The student of the step: Qwen3 (random f32 weights from `model_dir`) with peft's LoRA on
    q/k/v/o, the Perceiver resampler, AdamW over both as qwenclip steps them. Returns a
    namespace: `forward(ids, mask) -> (embeds, pooled)`, `opt`, `params` (for the clip),
    `n_lora`, `n_resampler`, `load_s`, `config`."""
    import types

    import peft
    import torch
    import transformers

    from resampler import PerceiverResampler, ResamplerConfig

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = transformers.Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    lcfg = peft.LoraConfig(r=lora_r, lora_alpha=lora_r, target_modules=LORA_TARGETS,
                           lora_dropout=0.0, bias="none")
    pm = peft.get_peft_model(model, lcfg)
    pm.train()
    backbone = pm.base_model.model.model  # the Qwen3Model, LoRA layers injected
    hidden = model.config.hidden_size

    rcfg = ResamplerConfig(input_dim=hidden, width=width, heads=heads, ff_mult=RESAMPLER_FF_MULT,
                           layers=RESAMPLER_LAYERS, num_latents=SEQ, output_dim=EMBED,
                           pooled_dim=POOLED)
    resampler = PerceiverResampler(rcfg).train()

    lora_params = [p for p in pm.parameters() if p.requires_grad]
    r_decay = [p for n, p in resampler.named_parameters() if p.dim() >= 2 and n != "latents"]
    r_nodecay = [p for n, p in resampler.named_parameters() if not (p.dim() >= 2 and n != "latents")]
    opt = torch.optim.AdamW(
        [
            {"params": lora_params, "lr": LR_LORA, "weight_decay": WEIGHT_DECAY},
            {"params": r_decay, "lr": LR_RESAMPLER, "weight_decay": WEIGHT_DECAY},
            {"params": r_nodecay, "lr": LR_RESAMPLER, "weight_decay": 0.0},
        ],
        betas=BETAS, eps=EPS,
    )
    n_frozen_trainable = sum(p.numel() for n, p in pm.named_parameters()
                             if p.requires_grad and "lora_" not in n)
    assert n_frozen_trainable == 0, "peft left base weights trainable"

    def forward(ids, mask):
        h = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return resampler(h, mask)

    return types.SimpleNamespace(
        forward=forward, opt=opt, params=lora_params + r_decay + r_nodecay,
        n_lora=sum(p.numel() for p in lora_params),
        n_resampler=sum(p.numel() for p in resampler.parameters()),
        load_s=load_s, config=model.config,
    )


def versions(config) -> dict:
    """The reference's library versions and settings, for the report."""
    import peft
    import torch
    import transformers

    return {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__,
        "attn_implementation": config._attn_implementation,
        "mkldnn": torch.backends.mkldnn.is_available(),
    }


def torch_worker(model_dir: Path, batch: int, tokens: int, reps: int, lora_r: int,
                 width: int, heads: int) -> None:
    import torch
    import torch.nn.functional as F

    st = build_student(model_dir, lora_r, width, heads)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(st.config.vocab_size, 150_000), (batch, tokens), generator=g)
    mask = torch.ones_like(ids)
    te = torch.randn(batch, SEQ, EMBED, generator=g)
    tp = torch.randn(batch, POOLED, generator=g)

    def step() -> float:
        st.opt.zero_grad(set_to_none=True)
        e, p = st.forward(ids, mask)
        loss = F.mse_loss(e, te) + F.mse_loss(p, tp)
        lv = loss.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(st.params, MAX_GRAD_NORM)
        st.opt.step()
        return lv

    times, losses = timed(step, reps)
    median = times[len(times) // 2]
    report = {
        "impl": "transformers+peft", "batch": batch, "tokens": tokens,
        "median_step_s": median, "min_step_s": times[0],
        "samples_per_s": batch / median,
        "peak_rss_bytes": peak_rss_bytes(),
        "trainable_params": st.n_lora + st.n_resampler, "trainable_lora": st.n_lora,
        "trainable_resampler": st.n_resampler,
        "load_s": st.load_s, "losses": losses, **versions(st.config),
    }
    print(json.dumps(report))


# --------------------------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------------------------


def run_ours(binary: Path, model_dir: Path, b: int, t: int, args: argparse.Namespace) -> dict:
    cmd = [
        str(binary), "bench-train", "--model", str(model_dir), "--batch", str(b), "--tokens", str(t),
        "--reps", str(args.reps), "--lora-r", str(args.lora_r),
        "--resampler-width", str(args.resampler_width), "--resampler-heads", str(args.resampler_heads),
    ]
    r, wall = run_json("ours", cmd, "qwenclip-dev bench-train")
    r["process_wall_s"] = wall
    return r


def run_theirs(model_dir: Path, b: int, t: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--_torch-worker", "--model-dir", str(model_dir),
        "--batch", str(b), "--tokens", str(t), "--reps", str(args.reps), "--lora-r", str(args.lora_r),
        "--resampler-width", str(args.resampler_width), "--resampler-heads", str(args.resampler_heads),
    ]
    r, wall = run_json("transformers+peft", cmd, "the transformers worker")
    r["process_wall_s"] = wall
    return r


def table(pairs: list[dict]) -> tuple[str, list[dict]]:
    gib = 1024**3
    header = ("batch", "tokens", "ours step s", "hf step s", "ours samp/s", "hf samp/s",
              "ours/hf samp/s", "ours RSS GiB", "hf RSS GiB", "RSS ours/hf", "load ours/hf")
    lines, rows = [], []
    for p in pairs:
        o, h = p["ours"], p["theirs"]
        q = ratio(o["samples_per_s"], h["samples_per_s"])
        m = ratio(o["peak_rss_bytes"], h["peak_rss_bytes"])
        rows.append({"batch": o["batch"], "tokens": o["tokens"],
                     "ours_median_step_s": o["median_step_s"], "hf_median_step_s": h["median_step_s"],
                     "ours_samples_per_s": o["samples_per_s"], "hf_samples_per_s": h["samples_per_s"],
                     "ratio_samples_per_s": q, "ours_peak_rss_bytes": o["peak_rss_bytes"],
                     "hf_peak_rss_bytes": h["peak_rss_bytes"], "ratio_peak_rss": m,
                     "ours_trainable_params": o["trainable_params"],
                     "hf_trainable_params": h["trainable_params"],
                     "trainable_params_match": o["trainable_params"] == h["trainable_params"],
                     "load": p["load"]})
        ld = p["load"]
        lines.append((str(o["batch"]), str(o["tokens"]), f"{o['median_step_s']:.2f}",
                      f"{h['median_step_s']:.2f}", f"{o['samples_per_s']:.3f}", f"{h['samples_per_s']:.3f}",
                      f"{q:.2f}" + ("" if q >= 1.0 else " (slower)"),
                      f"{o['peak_rss_bytes'] / gib:.2f}", f"{h['peak_rss_bytes'] / gib:.2f}",
                      f"{m:.2f}" + ("" if m <= 1.0 else " (more)"),
                      f"{ld['ours']['load_before']:.2f} / {ld['hf']['load_before']:.2f}"))
    out = render(header, lines)
    out.append("")
    for r in rows:
        out.append(f"trainable params ({r['batch']}x{r['tokens']}): ours {r['ours_trainable_params']:,}"
                   f"   hf {r['hf_trainable_params']:,}"
                   f"   {'match' if r['trainable_params_match'] else 'MISMATCH'}")
    return "\n".join(out), rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_binary_option(p, "qwenclip-dev")
    p.add_argument("--shape", default="qwen3-0.6b", help="random-model shape")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help="where the random model is written once and reused")
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    p.add_argument("--batch", type=int_list, default=[2], help="batch size(s), comma list")
    p.add_argument("--tokens", type=int_list, default=[77], help="prompt length(s), comma list")
    p.add_argument("--reps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--resampler-width", type=int, default=1024)
    p.add_argument("--resampler-heads", type=int, default=16)
    add_wait_options(p)
    p.add_argument("--json", type=Path, default=None, help="write the combined report here")
    p.add_argument("--_torch-worker", dest="torch_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.reps < 1:
        p.error("--reps must be >= 1")

    if args.torch_worker:
        torch_worker(args.model_dir, args.batch[0], args.tokens[0], args.reps, args.lora_r,
                     args.resampler_width, args.resampler_heads)
        return

    binary = resolve_binary(p, args.qwenclip_dev, "qwenclip-dev")
    model_dir = ensure_model(binary, args.shape, args.workdir, args.tokenizer)

    pairs = []
    for b in args.batch:
        for t in args.tokens:
            load = {}
            load["ours"] = wait_for_load(args.wait_load, args.wait_max, "ours")
            ours = run_ours(binary, model_dir, b, t, args)
            load["ours"]["load_after"] = os.getloadavg()[0]
            print(json.dumps(ours), file=sys.stderr)
            load["hf"] = wait_for_load(args.wait_load, args.wait_max, "transformers+peft")
            theirs = run_theirs(model_dir, b, t, args)
            load["hf"]["load_after"] = os.getloadavg()[0]
            print(json.dumps(theirs), file=sys.stderr)
            pairs.append({"ours": ours, "theirs": theirs, "load": load})

    text, rows = table(pairs)
    h0 = pairs[0]["theirs"]
    print(f"\ntraining step, {args.shape}, f32, {cpu_label()}, "
          f"LoRA r={args.lora_r} on q,k,v,o + resampler width {args.resampler_width}/"
          f"{args.resampler_heads} heads, reps {args.reps} after 1 warm-up (median), binary {binary}")
    print(text)
    for pr in pairs:
        print(loadavg_line(f"loadavg ({pr['ours']['batch']}x{pr['ours']['tokens']})", pr["load"]))
    print(f"reference: torch {h0['torch']}, transformers {h0['transformers']}, peft {h0['peft']}, "
          f"attn {h0['attn_implementation']}, threads {h0['threads']}")
    print("\ntarget: ours/hf samples/s >= 1.0 (read from this table; not a test)")

    if args.json:
        combined = {
            "shape": args.shape, "model_dir": str(model_dir), "binary": str(binary), "reps": args.reps,
            "lora_r": args.lora_r, "resampler_width": args.resampler_width,
            "resampler_heads": args.resampler_heads,
            "machine": machine_info(),
            "runs": pairs, "comparison": rows,
        }
        write_json(args.json, combined)


if __name__ == "__main__":
    main()
