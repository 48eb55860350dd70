"""CPU vision-distillation step of qwenclip against diffusers + transformers + peft.

What is measured
  One step of vision-based distillation, as the training run takes it, with an SDXL-shaped
  UNet and a real-size Qwen3 student, all random f32 weights:
    at the middle denoising step of a trajectory (Euler, SDXL's schedule, `--denoise-steps`),
    random latents [B, 4, R/8, R/8]: the UNet's prediction with the teacher's conditioning and
    with the unconditional one (no gradient; guidance 5 advances the latents), then the
    student (Qwen3 + LoRA r16 on q/k/v/o + resampler, as bench_train.py) conditions the same
    UNet; loss = per-sample MSE of the two predictions, batch mean; backward through the
    frozen UNet into LoRA and resampler; grad-norm clip 1.0; AdamW.
  One warm-up step, then `--reps` timed steps (median), and each process's peak RSS.

How
  1. `qwenclip-dev random-model --shape SHAPE` and `qwenclip-dev random-unet --shape sdxl` write
     the random student and UNet once into WORKDIR (the UNet in diffusers' layout: both sides
     read the same file).
  2. `qwenclip-dev bench-train --objective vision --unet DIR --resolution R` times ours
     (`Judge::teacher_step`, `Judge::predict`, `Trainer::step_with`: the run's vision step).
     By default the UNet recomputes each block in the backward instead of keeping its
     activations (what training does); `--modes ours-keep` adds a row without that.
  3. This script re-runs itself in a separate Python process: `diffusers.UNet2DConditionModel
     .from_pretrained(DIR)` (frozen, eval), `EulerDiscreteScheduler` with SDXL's settings, the
     student of bench_train.py (`build_student`), the same step in torch;
     `--modes hf-ckpt` adds a row with diffusers' gradient checkpointing on.
  Runs are sequential, never concurrent (`--wait-load` as in bench_train.py).

Target (issue 13): ours <= 1.0x diffusers' step time and peak memory on this CPU.

Usage
  python tests/reference/bench_vision.py [--qwenclip-dev BIN] [--shape qwen3-0.6b]
      [--resolution 256,512] [--batch 1] [--tokens 77] [--reps 2] [--denoise-steps 20]
      [--modes ours,hf[,ours-keep,hf-ckpt]] [--workdir DIR] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, resampler, bench_train
from bench_train import (  # noqa: E402
    EMBED, LORA_TARGETS, MAX_GRAD_NORM, POOLED, SEQ, build_student, versions,
)
from benchlib import (  # noqa: E402
    DEFAULT_TOKENIZER, DEFAULT_WORKDIR, add_binary_option, add_wait_options, cpu_label,
    ensure_model, ensure_written, int_list, machine_info, peak_rss_bytes, ratio,
    render, resolve_binary, run_json, timed, wait_for_load, write_json,
)

UNET_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
GUIDANCE = 5.0
LORA_R, WIDTH, HEADS = 16, 1024, 16


def ensure_unet(binary: Path, workdir: Path) -> Path:
    """WORKDIR/sdxl-unet: an SDXL-shaped UNet with random f32 weights, written once."""
    return ensure_written(
        workdir, "sdxl-unet", UNET_FILES, "unet", "a random SDXL UNet (10 GB)",
        lambda tmp: [str(binary), "random-unet", "--shape", "sdxl", "--out", str(tmp)],
    )


def load_unet(unet_dir: Path | None, unet_file: Path | None, unet_config: Path | None):
    """A diffusers folder, or a single file in the original layout with its diffusers config
    (converted by diffusers' own single-file code)."""
    import diffusers
    import torch

    if unet_dir is not None:
        return diffusers.UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=torch.float32)
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from safetensors.torch import load_file

    config = {k: v for k, v in json.loads(unet_config.read_text()).items() if not k.startswith("_")}
    unet = diffusers.UNet2DConditionModel(**config)
    sd = convert_ldm_unet_checkpoint(load_file(str(unet_file)), {"sample_size": 32, **config})
    unet.load_state_dict(sd)
    return unet


def torch_worker(model_dir: Path, unet: tuple, batch: int, tokens: int, reps: int,
                 resolution: int, denoise_steps: int, checkpointing: bool) -> None:
    import diffusers
    import torch

    st = build_student(model_dir, LORA_R, WIDTH, HEADS)
    unet = load_unet(*unet)
    unet.requires_grad_(False)
    if checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()  # diffusers checkpoints only in training mode
    else:
        unet.eval()
    sched = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        timestep_spacing="leading", steps_offset=1,
    )
    sched.set_timesteps(denoise_steps)
    k = denoise_steps // 2
    t, sigma, sigma_next = sched.timesteps[k], sched.sigmas[k], sched.sigmas[k + 1]

    g = torch.Generator().manual_seed(0)
    side = resolution // 8
    x = torch.randn(batch, 4, side, side, generator=g)
    x_in = x / (sigma**2 + 1) ** 0.5
    ids = torch.randint(0, min(st.config.vocab_size, 150_000), (batch, tokens), generator=g)
    mask = torch.ones_like(ids)
    te = torch.randn(batch, SEQ, EMBED, generator=g)
    tp = torch.randn(batch, POOLED, generator=g)
    ue = torch.randn(1, SEQ, EMBED, generator=g).expand(batch, -1, -1)
    up = torch.randn(1, POOLED, generator=g).expand(batch, -1)
    r = float(resolution)
    time_ids = torch.tensor([[r, r, 0.0, 0.0, r, r]] * batch)

    def predict(e, p):
        cond = {"text_embeds": p, "time_ids": time_ids}
        return unet(x_in, t, encoder_hidden_states=e, added_cond_kwargs=cond).sample

    def step() -> float:
        st.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            want = predict(te, tp)
            free = predict(ue, up)
            guided = free + GUIDANCE * (want - free)
            _next = x + (sigma_next - sigma) * guided  # the trajectory's next latents
        e, p = st.forward(ids, mask)
        got = predict(e, p)
        loss = (got - want).pow(2).flatten(1).mean(1).mean()
        lv = loss.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(st.params, MAX_GRAD_NORM)
        st.opt.step()
        return lv

    times, losses = timed(step, reps)
    median = times[len(times) // 2]
    print(json.dumps({
        "impl": "diffusers+peft", "checkpointing": checkpointing, "resolution": resolution,
        "batch": batch, "tokens": tokens, "median_step_s": median, "min_step_s": times[0],
        "peak_rss_bytes": peak_rss_bytes(), "trainable_params": st.n_lora + st.n_resampler,
        "losses": losses, "diffusers": diffusers.__version__, **versions(st.config),
    }))


def run_mode(mode: str, binary: Path, model_dir: Path, unet_dir: Path, res: int,
             args: argparse.Namespace) -> dict:
    b, t = args.batch, args.tokens
    if mode.startswith("ours"):
        cmd = [
            str(binary), "bench-train", "--objective", "vision", "--model", str(model_dir),
            "--unet", str(unet_dir), "--resolution", str(res), "--batch", str(b), "--tokens", str(t),
            "--reps", str(args.reps), "--denoise-steps", str(args.denoise_steps),
            "--lora-r", str(LORA_R), "--resampler-width", str(WIDTH),
            "--resampler-heads", str(HEADS),
        ] + (["--no-checkpointing"] if mode == "ours-keep" else [])
    else:
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "--_torch-worker",
            "--model-dir", str(model_dir), "--unet-dir", str(unet_dir), "--resolution", str(res),
            "--batch", str(b), "--tokens", str(t), "--reps", str(args.reps),
            "--denoise-steps", str(args.denoise_steps),
        ] + (["--hf-checkpointing"] if mode == "hf-ckpt" else [])
    r, wall = run_json(mode, cmd, mode)
    r["process_wall_s"] = wall
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_binary_option(p, "qwenclip-dev")
    p.add_argument("--shape", default="qwen3-0.6b", help="random-model shape of the student")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    p.add_argument("--resolution", type=int_list, default=[256, 512], help="comma list, pixels")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=77)
    p.add_argument("--reps", type=int, default=2, help="timed steps (after one warm-up step)")
    p.add_argument("--denoise-steps", type=int, default=20)
    p.add_argument("--modes", default="ours,hf", help="ours, ours-keep, hf, hf-ckpt (comma list)")
    add_wait_options(p)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--_torch-worker", dest="torch_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--unet-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--unet-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--unet-config", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--hf-checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torch_worker:
        torch_worker(args.model_dir, (args.unet_dir, args.unet_file, args.unet_config), args.batch,
                     args.tokens, args.reps,
                     args.resolution[0], args.denoise_steps, args.hf_checkpointing)
        return

    binary = resolve_binary(p, args.qwenclip_dev, "qwenclip-dev")
    model_dir = ensure_model(binary, args.shape, args.workdir, args.tokenizer)
    unet_dir = ensure_unet(binary, args.workdir)
    modes = args.modes.split(",")
    runs = []
    for res in args.resolution:
        row = {"resolution": res, "load": {}}
        for mode in modes:
            row["load"][mode] = wait_for_load(args.wait_load, args.wait_max, mode)
            row[mode] = run_mode(mode, binary, model_dir, unet_dir, res, args)
            print(json.dumps(row[mode]), file=sys.stderr)
        runs.append(row)

    gib = 1024**3
    base = next((m for m in modes if m.startswith("hf")), modes[0])
    header = ("px", "mode", "step s", "peak RSS GiB", f"time / {base}", f"RSS / {base}", "trainable")
    lines = []
    for row in runs:
        ref = row[base]
        for mode in modes:
            r = row[mode]
            lines.append((str(row["resolution"]), mode, f"{r['median_step_s']:.2f}",
                          f"{r['peak_rss_bytes'] / gib:.2f}",
                          f"{ratio(r['median_step_s'], ref['median_step_s']):.2f}",
                          f"{ratio(r['peak_rss_bytes'], ref['peak_rss_bytes']):.2f}",
                          f"{r['trainable_params']:,}"))
    print(f"\nvision-distillation step, SDXL-shaped UNet + {args.shape} student, f32, batch "
          f"{args.batch}, {args.tokens} tokens, {cpu_label()}, LoRA r{LORA_R} ({', '.join(LORA_TARGETS)})"
          f" + resampler {WIDTH}/{HEADS}, median of {args.reps} after 1 warm-up, binary {binary}")
    print("\n".join(render(header, lines)))
    for row in runs:
        print(f"1-minute load before each run at {row['resolution']} px: " + ", ".join(
            f"{m} {row['load'][m]['load_before']:.2f}" for m in modes))
    print("\ntarget: ours <= 1.0x diffusers' step time and peak RSS (read from this table; not a test)")
    if args.json:
        write_json(args.json, {"shape": args.shape, "machine": machine_info(), "runs": runs,
                               "binary": str(binary), "reps": args.reps})


if __name__ == "__main__":
    main()
