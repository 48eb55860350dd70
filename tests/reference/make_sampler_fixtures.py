"""Generate the sampler fixtures under tests/fixtures/sampling/ (see that folder's README.md).

diffusers' `EulerDiscreteScheduler` and `DDIMScheduler` (float32, CPU) are run from SDXL base
1.0's scheduler config, for 20 and 50 steps, leading / trailing / linspace spacing, epsilon and
v-prediction, on fixed random inputs. Written (the folder is wiped, its README.md kept):
  * sdxl_scheduler_config.json: SDXL base 1.0's scheduler/scheduler_config.json, verbatim;
  * cases.json: every case's name, scheduler class, steps, recorded step indices and the full
    `scheduler.config` diffusers built (all fields, as `save_config` would write them);
  * expected.safetensors: inputs and diffusers' outputs (see the README).

Run:  python tests/reference/make_sampler_fixtures.py
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
from pathlib import Path

import diffusers
import numpy as np
import safetensors
import safetensors.torch
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "sampling"

SEED = 20250611
SIZE_BUDGET = 400_000  # bytes, all sampler fixtures together
SHAPE = (2, 4, 3, 5)  # [batch, channels, height, width]: small, nothing square
POOL = 50  # model outputs, one per step of the longest run

# SDXL base 1.0, scheduler/scheduler_config.json (stabilityai/stable-diffusion-xl-base-1.0).
SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

CLASSES = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler}
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction"}
SPACINGS = ["leading", "trailing", "linspace"]
STEPS = [20, 50]
SPACING_STEPS = [1, 2, 3, 7, 10, 25, 30, 33, 40, 60, 100]


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(f"self-check failed: {msg}")


def recorded_steps(n: int) -> list[int]:
    return [0, 1, n // 2, n - 2, n - 1]


def make(cls, overrides: dict, n: int):
    cfg = {k: v for k, v in SDXL.items() if not k.startswith("_")}
    cfg.update(overrides)
    sched = cls.from_config(cfg)
    sched.set_timesteps(n)
    return sched


def single_step(kind: str, sched, i: int, model_output, sample):
    """scale_model_input and step at index `i` alone, as a pipeline at step `i` calls them."""
    t = sched.timesteps[i]
    if kind == "euler":
        sched._step_index = i
        scaled = sched.scale_model_input(sample, t)
        out = sched.step(model_output, t, sample)
    else:
        scaled = sched.scale_model_input(sample, t)
        out = sched.step(model_output, t, sample, eta=0.0)
    return scaled, out.prev_sample, out.pred_original_sample


def trajectory(kind: str, sched, noise, pool):
    """A whole run the way diffusers' pipelines loop: model output `pool[i]` at step `i`."""
    x = noise * sched.init_noise_sigma
    kept = []
    for i, t in enumerate(sched.timesteps):
        _ = sched.scale_model_input(x, t)
        x = sched.step(pool[i], t, x, **({} if kind == "euler" else {"eta": 0.0})).prev_sample
        kept.append(x)
    return torch.stack(kept)


def ddim_alphas(sched, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_prod_t and alpha_prod_t_prev exactly as `DDIMScheduler.step` picks them."""
    now, prev = [], []
    for t in sched.timesteps.tolist():
        p = t - sched.config.num_train_timesteps // sched.num_inference_steps
        now.append(sched.alphas_cumprod[t])
        prev.append(sched.alphas_cumprod[p] if p >= 0 else sched.final_alpha_cumprod)
    return torch.stack(now).float(), torch.stack(prev).float()


def main() -> None:
    torch.set_grad_enabled(False)
    keep = (OUT / "README.md").read_text() if (OUT / "README.md").exists() else None
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    if keep is not None:
        (OUT / "README.md").write_text(keep)
    (OUT / "sdxl_scheduler_config.json").write_text(json.dumps(SDXL, indent=2) + "\n")

    gen = torch.Generator().manual_seed(SEED)
    sample = torch.randn(SHAPE, generator=gen)
    noise = torch.randn(SHAPE, generator=gen)
    pool = torch.randn((POOL, *SHAPE), generator=gen)
    uncond, cond = pool[0], pool[1]
    t = {
        "sample": sample,
        "noise": noise,
        "model_outputs": pool,
        # The SDXL pipeline's classifier-free guidance, shared scale and one per sample.
        "cfg_7_5": uncond + 7.5 * (cond - uncond),
        "cfg_each": uncond + torch.tensor([2.0, 5.0]).view(2, 1, 1, 1) * (cond - uncond),
    }

    # Training schedules: SDXL's scaled_linear, and diffusers' default linear.
    for name, sched in [("scaled_linear", EulerDiscreteScheduler.from_config(SDXL)),
                        ("linear", EulerDiscreteScheduler())]:
        t[f"schedule/{name}/betas"] = sched.betas
        t[f"schedule/{name}/alphas_cumprod"] = sched.alphas_cumprod
        # Euler's training sigmas, ascending in t (diffusers stores them flipped, then a 0).
        t[f"schedule/{name}/sigmas"] = sched.sigmas[:-1].flip(0).contiguous()

    # Timestep spacing for more step counts (numpy's linspace / arange / round in diffusers).
    for kind, cls in CLASSES.items():
        for spacing in SPACINGS:
            for n in SPACING_STEPS:
                sched = make(cls, {"timestep_spacing": spacing}, n)
                t[f"spacing/{kind}/{spacing}/{n}/timesteps"] = sched.timesteps
                if kind == "euler":
                    t[f"spacing/{kind}/{spacing}/{n}/sigmas"] = sched.sigmas

    cases = []
    variants = [(k, p, s, n, {}) for k in CLASSES for p in PREDICTIONS for s in SPACINGS
                for n in STEPS]
    # DDIM's own defaults for the two settings SDXL's file turns off: x0 clipped to [-1, 1]
    # and a final alpha of 1.
    variants.append(("ddim", "eps", "leading", 20,
                     {"clip_sample": True, "set_alpha_to_one": True}))
    for kind, pred, spacing, n, extra in variants:
        name = f"{kind}_{pred}_{spacing}_{n}" + ("_clip_alpha1" if extra else "")
        overrides = {"prediction_type": PREDICTIONS[pred], "timestep_spacing": spacing, **extra}
        sched = make(CLASSES[kind], overrides, n)
        steps = recorded_steps(n)
        scaled, stepped, x0 = [], [], []
        for i in steps:
            s, p, o = single_step(kind, sched, i, pool[i], sample)
            scaled.append(s)
            stepped.append(p)
            x0.append(o)
        if kind == "euler":
            t[f"{name}/timesteps"] = sched.timesteps
            t[f"{name}/sigmas"] = sched.sigmas
            t[f"{name}/init_noise_sigma"] = torch.as_tensor(sched.init_noise_sigma).reshape(1)
            check(sched.timesteps.dtype == torch.float32, "Euler timesteps are float32")
        else:
            t[f"{name}/timesteps"] = sched.timesteps
            check(sched.timesteps.dtype == torch.int64, "DDIM timesteps are int64")
            t[f"{name}/alpha_prod"], t[f"{name}/alpha_prod_prev"] = ddim_alphas(sched, n)
        t[f"{name}/scaled"] = torch.stack(scaled)
        t[f"{name}/step"] = torch.stack(stepped)
        t[f"{name}/x0"] = torch.stack(x0)

        # A whole run, stepped as pipelines do (the scheduler finds its own step index).
        run = trajectory(kind, make(CLASSES[kind], overrides, n), noise, pool)
        t[f"{name}/trajectory"] = run[steps]
        # Self-check: the single steps use the same model output and step index as the run,
        # so the first single step from the run's start equals the run's first step.
        s0 = make(CLASSES[kind], overrides, n)
        _, first, _ = single_step(kind, s0, 0, pool[0], noise * s0.init_noise_sigma)
        check(torch.equal(first, run[0]), f"{name}: first step alone == first step of the run")

        config = dict(sched.config)
        config["_class_name"] = type(sched).__name__
        config = {k: v for k, v in config.items() if k != "_use_default_values"}
        cases.append({"name": name, "class": type(sched).__name__, "steps": n,
                      "recorded_steps": steps, "config": config})

    t = {k: v.contiguous() for k, v in t.items()}
    for k, v in t.items():
        check(v.dtype in (torch.float32, torch.int64), f"{k} dtype {v.dtype}")
        check(bool(torch.isfinite(v.double()).all()), f"{k} is finite")
    safetensors.torch.save_file(t, OUT / "expected.safetensors", metadata={
        "generator": "tests/reference/make_sampler_fixtures.py",
        "diffusers": diffusers.__version__, "torch": torch.__version__})
    (OUT / "cases.json").write_text(json.dumps(cases, indent=1, sort_keys=True) + "\n")

    files = sorted(p for p in OUT.rglob("*") if p.is_file() and p.name != "MANIFEST.json")
    total = sum(p.stat().st_size for p in files)
    check(total < SIZE_BUDGET, f"fixtures take {total} bytes (budget {SIZE_BUDGET})")
    manifest = {
        "generator": "tests/reference/make_sampler_fixtures.py",
        "seed": SEED,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
        "files": {str(p.relative_to(OUT)): {"bytes": p.stat().st_size,
                                            "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                  for p in files},
    }
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(files) + 1} files, {total} bytes, {len(cases)} cases", file=sys.stderr)


if __name__ == "__main__":
    main()
