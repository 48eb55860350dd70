"""Generate tests/fixtures/vision/: a PyTorch reference of one vision-distillation step.

`tests/vision_reference.rs` runs the same step through the library's training run
(`src/training/run/mod.rs` -> `src/training/vision/mod.rs`) and compares.

The step, as the issue defines it: per denoising step k of the teacher's trajectory, the frozen
SDXL UNet predicts noise for the same latents, timestep and size ids under the teacher's
conditioning (no gradient) and the student's (gradient to the student only); loss = per-sample
mean of the squared difference, averaged over the batch; the latents advance with the teacher's
classifier-free-guided prediction (uncond = the teacher's empty-prompt conditioning, guidance
per sample), by diffusers' `EulerDiscreteScheduler` with SDXL's config.

Weights (the same ones the Rust side loads):
  * the base Qwen3: `qwenclip-dev tiny` (seed 0; the library's generator, 19 MB, so it is
    regenerated, not committed: MANIFEST.json records its sha256, which the test checks);
  * the LoRA: the tiny adapter's PEFT files from the same command (r 4, alpha 8, q/k/v/o,
    non-zero B, so the A gradients are not trivially zero), copied into adapter/;
  * the resampler: a small random one made here with tests/reference/resampler.py (8 latents,
    24-wide embeddings, 20-wide pooled: the widths of the UNet below), in adapter/;
  * the judge: the committed diffusers UNet of tests/fixtures/unet/ (made by
    make_unet_fixtures.py; its sha256 is recorded and checked).

The run's own draws (data order, the trajectory's noise seed and guidance, the noise) come from
the library's SplitMix64 generator, ported below; the test checks the run drew the same.

Computed in float64 (transformers' Qwen3 keeps float32 islands: RMSNorm, RoPE, softmax;
diffusers' timestep embeddings and Euler's update are float32), stored in float32 except the
losses and guidance (float64).

Run:  ~/.cache/qwenclip-ref-vision/bin/python tests/reference/make_vision_step_fixture.py
      (needs target/debug/qwenclip-dev: `cargo build --features dev --bin qwenclip-dev`, or
      pass --qwenclip-dev PATH)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import diffusers
import numpy as np
import peft
import safetensors
import safetensors.torch
import tokenizers
import torch
import transformers
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from peft import PeftModel
from transformers import Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resampler import PerceiverResampler, ResamplerConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "vision"
UNET_DIR = ROOT / "tests" / "fixtures" / "unet" / "diffusers" / "unet"
UNET_FILE = UNET_DIR / "diffusion_pytorch_model.fp16.safetensors"

SEED = 20250720
SIZE_BUDGET = 600_000  # bytes, everything under tests/fixtures/vision
BASE_SEED = 0  # `qwenclip-dev tiny` (qwenclip::dev::tiny::write_tiny(out, tokenizer, 0))

# Two captions of different token lengths (the shorter one is padded in the batch).
CAPTIONS = ["a red cube on a blue table, studio light", "a cat"]
RESAMPLER_CFG = ResamplerConfig(input_dim=32, width=32, heads=4, ff_mult=2, layers=2,
                                num_latents=8, output_dim=24, pooled_dim=20, norm_eps=1e-5)
RESOLUTION = 64  # latents 8 x 8
DENOISE_STEPS = 4
STEPS_CHECKED = 2  # trajectory steps 0 and 1: the second starts from guided latents
GRAD_ACCUM = 4  # > STEPS_CHECKED: both micro-steps accumulate before any optimizer step
GUIDANCE = dict(guidance_min=1.5, guidance_max=7.5, guidance_step=1.5)

# SDXL base 1.0, scheduler/scheduler_config.json: what `SchedulerConfig::sdxl()` holds (the
# judge is a bare `unet/` folder, so the library falls back to it).
SDXL_SCHEDULER = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
    "trained_betas": None, "use_karras_sigmas": False,
}

# Private constants of the library this mirrors (a change there shows up as "the run drew
# other ..." in the test, not as a silent mismatch).
VISION_SEED = 0x715_1011  # src/training/run/mod.rs
ORDER_SEED = 0x5EED  # src/training/run/order.rs
MASK64 = (1 << 64) - 1


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(f"self-check failed: {msg}")


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


class Rng:
    """src/rng.rs: SplitMix64, Box-Muller with one value per call."""

    def __init__(self, seed: int) -> None:
        self.state = seed & MASK64

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def uniform(self) -> float:
        return (self.next_u64() >> 11) / float(1 << 53)

    def normal(self) -> float:
        u1 = max(self.uniform(), sys.float_info.min)
        u2 = self.uniform()
        return math.sqrt(-2.0 * math.log(u1)) * math.cos(math.tau * u2)

    def below(self, n: int) -> int:
        return int(self.uniform() * n) % max(n, 1)

    def shuffle(self, items: list) -> None:
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]


def guidance_grid() -> list[float]:
    g = GUIDANCE
    n = math.floor((g["guidance_max"] - g["guidance_min"]) / g["guidance_step"] + 1e-9)
    return [g["guidance_min"] + i * g["guidance_step"] for i in range(n + 1)]


def run_draws(seed: int, n: int) -> tuple[list[int], int, list[float]]:
    """The first batch (held_out 0, batch_size n) and its trajectory's noise seed and guidance."""
    order = list(range(n))
    Rng(seed).shuffle(order)  # split_indices: the split's shuffle; held_out 0 keeps all, sorted
    order = sorted(order)
    Rng(seed ^ ORDER_SEED).shuffle(order)  # DataOrder::new: the first epoch's order
    batch = order[:n]
    rng = Rng(seed ^ VISION_SEED)  # Trajectory::new
    noise_seed = rng.next_u64()
    grid = guidance_grid()
    guidance = [grid[rng.below(len(grid))] for _ in batch]
    return batch, noise_seed, guidance


def run_settings(seed: int) -> dict:
    """The run's settings (a `TrainConfig` overlay): what the test passes to `Run::open`."""
    return {
        "objective": "vision", "seed": seed, "steps": 1, "batch_size": len(CAPTIONS),
        "grad_accum": GRAD_ACCUM, "held_out": 0.0, "eval_every": 0, "save_every": 0,
        "schedule": "constant",
        "vision": {"resolution": RESOLUTION, "denoise_steps": DENOISE_STEPS, "sampler": "euler",
                   "lambda_vision": 1.0, **GUIDANCE},
    }


def scheduler() -> EulerDiscreteScheduler:
    s = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    s.set_timesteps(DENOISE_STEPS)
    return s


def init_noise_sigma(s: EulerDiscreteScheduler) -> float:
    # As the library computes it (float32, then widened); diffusers' must agree.
    m = np.float32(s.sigmas.max().item())
    sigma = float(np.sqrt(m * m + np.float32(1.0)))
    check(abs(sigma - float(s.init_noise_sigma)) <= 1e-6 * sigma, "init_noise_sigma")
    return sigma


def build_resampler() -> PerceiverResampler:
    torch.manual_seed(SEED + 1)
    r = PerceiverResampler(RESAMPLER_CFG)
    with torch.no_grad():
        # LayerNorms off their (1, 0) init so a missing affine is caught; latents at N(0,1).
        for m in r.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn_like(m.weight))
                m.bias.copy_(0.1 * torch.randn_like(m.bias))
        r.latents.copy_(torch.randn_like(r.latents))
    return r


def write_adapter(tiny_adapter: Path, out: Path, r: PerceiverResampler) -> None:
    out.mkdir(parents=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(tiny_adapter / f, out / f)
    manifest = json.loads((tiny_adapter / "qwenclip.json").read_text())
    manifest["resampler"] = json.loads(RESAMPLER_CFG.to_json())
    (out / "qwenclip.json").write_text(json.dumps(manifest, indent=2) + "\n")
    sd = {k: v.detach().float().contiguous() for k, v in r.state_dict().items()}
    safetensors.torch.save_file(sd, out / "resampler.safetensors",
                                metadata={"qwenclip.resampler": RESAMPLER_CFG.to_json()})


def load_student(model_dir: Path, adapter: Path):
    base = Qwen3ForCausalLM.from_pretrained(model_dir, dtype="auto", attn_implementation="eager")
    pm = PeftModel.from_pretrained(base, adapter).double().eval()
    n = 0
    for m in pm.modules():
        if isinstance(m, peft.tuners.lora.Linear):
            check(m.scaling["default"] == 8.0 / 4, f"PEFT scaling {m.scaling}")
            n += 1
    check(n == 2 * 4, f"{n} LoRA layers")
    sd = safetensors.torch.load_file(adapter / "resampler.safetensors")
    with safetensors.safe_open(adapter / "resampler.safetensors", "pt") as f:
        check(ResamplerConfig.from_json(f.metadata()["qwenclip.resampler"]) == RESAMPLER_CFG,
              "resampler config in the metadata")
    r = PerceiverResampler(RESAMPLER_CFG)
    r.load_state_dict(sd, strict=True)
    return pm, r.double().eval()


def trainable(pm: PeftModel, r: PerceiverResampler) -> dict[str, torch.nn.Parameter]:
    """The trainer's parameter names (`lora.<PEFT key>`, `resampler.<name>`) -> parameter."""
    out = {}
    for name, p in pm.named_parameters():
        if "lora_" in name:
            out["lora." + name.replace(".default", "")] = p
            p.requires_grad_(True)
        else:
            p.requires_grad_(False)
    for name, p in r.named_parameters():
        out["resampler." + name] = p
        p.requires_grad_(True)
    return out


def student_conditioning(pm, r, ids, mask):
    # hidden_layer -1: the last layer's output after the final RMSNorm.
    h = pm.base_model.model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    return r(h.last_hidden_state, mask)


def unet_eps(unet, sched, k, x, time_ids, cond):
    t = sched.timesteps[k]
    inp = sched.scale_model_input(x, t)
    e, p = cond
    return unet(inp, t, encoder_hidden_states=e,
                added_cond_kwargs={"text_embeds": p, "time_ids": time_ids}).sample


def vision_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (student - teacher).pow(2).flatten(1).mean(dim=1).mean()


def f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qwenclip-dev", type=Path, default=ROOT / "target/debug/qwenclip-dev")
    args = ap.parse_args()
    check(args.qwenclip_dev.is_file(),
          f"{args.qwenclip_dev} is missing: cargo build --features dev --bin qwenclip-dev")
    torch.use_deterministic_algorithms(True)

    readme = (OUT / "README.md").read_text() if (OUT / "README.md").exists() else None
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    if readme is not None:
        (OUT / "README.md").write_text(readme)

    tmp = Path(tempfile.mkdtemp(prefix="qwenclip-vision-ref-"))
    try:
        subprocess.run([str(args.qwenclip_dev), "tiny", "--out", str(tmp)], check=True,
                       stdout=subprocess.DEVNULL)
        model_dir = tmp / "model"
        base_sha = sha256(model_dir / "model.safetensors")
        write_adapter(tmp / "adapter", OUT / "adapter", build_resampler())
        pm, r = load_student(model_dir, OUT / "adapter")
        tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))

        # The run: the first run seed from SEED whose two guidance draws differ.
        seed = next(s for s in range(SEED, SEED + 1000) if len(set(run_draws(s, 2)[2])) == 2)
        batch, noise_seed, guidance = run_draws(seed, len(CAPTIONS))
        prompts = [CAPTIONS[i] for i in batch]
        rows = [tok.encode(p, add_special_tokens=True).ids for p in prompts]
        t_max = max(len(x) for x in rows)
        check(len({len(x) for x in rows}) == 2, "the captions' token counts differ")
        # Right padded with <|endoftext|>, as src/tokenizer pads (the mask hides it anyway).
        ids = torch.full((len(rows), t_max), tok.token_to_id("<|endoftext|>"), dtype=torch.int64)
        mask = torch.zeros(len(rows), t_max, dtype=torch.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1

        # The teacher's targets (any values do: they are inputs): two captions, the empty prompt.
        gen = torch.Generator().manual_seed(SEED + 2)
        n, c = len(prompts), RESAMPLER_CFG
        te = torch.randn(n, c.num_latents, c.output_dim, generator=gen)
        tp = torch.randn(n, c.pooled_dim, generator=gen)
        ue = torch.randn(1, c.num_latents, c.output_dim, generator=gen)
        up = torch.randn(1, c.pooled_dim, generator=gen)

        sched = scheduler()
        sigma = init_noise_sigma(sched)
        side = RESOLUTION // 8
        nrng = Rng(noise_seed)
        noise = np.array([nrng.normal() * sigma for _ in range(n * 4 * side * side)],
                         dtype=np.float64).astype(np.float32).reshape(n, 4, side, side)
        noise = torch.from_numpy(noise)
        time_ids = torch.tensor([[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]] * n,
                                dtype=torch.float32)

        unet = UNet2DConditionModel.from_pretrained(UNET_DIR, variant="fp16",
                                                    torch_dtype=torch.float64).eval()
        for p in unet.parameters():
            p.requires_grad_(False)
        check(unet.config.cross_attention_dim == c.output_dim, "UNet context width")
        check(unet.config.projection_class_embeddings_input_dim == c.pooled_dim + 6 * 8,
              "UNet pooled width")

        params = trainable(pm, r)
        check(len(params) == 2 * 4 * 2 + len(list(r.parameters())), f"{len(params)} parameters")
        d = torch.float64
        teacher = (te.to(d), tp.to(d))
        uncond = (ue.to(d).expand(n, -1, -1), up.to(d).expand(n, -1))
        tid = time_ids.to(d)
        g = torch.tensor(guidance, dtype=d).view(n, 1, 1, 1)

        out = {
            "input_ids": ids, "attention_mask": mask,
            "teacher_embeds": te, "teacher_pooled": tp, "uncond_embeds": ue, "uncond_pooled": up,
            "noise": noise, "guidance": torch.tensor(guidance, dtype=torch.float64),
            "time_ids": time_ids,
        }
        with torch.no_grad():
            se, sp = student_conditioning(pm, r, ids, mask)
        out["student_embeds"], out["student_pooled"] = f32(se), f32(sp)

        x = noise.to(d)
        notes = {}
        for k in range(STEPS_CHECKED):
            with torch.no_grad():
                eps_t = unet_eps(unet, sched, k, x, tid, teacher)
                eps_u = unet_eps(unet, sched, k, x, tid, uncond)
            e, p = student_conditioning(pm, r, ids, mask)
            eps_s = unet_eps(unet, sched, k, x, tid, (e, p))
            loss = vision_loss(eps_s, eps_t)
            grads = torch.autograd.grad(loss, list(params.values()))
            with torch.no_grad():
                guided = eps_u + g * (eps_t - eps_u)
                nxt = sched.step(guided, sched.timesteps[k], x).prev_sample.to(d)
            # How far apart the two predictions are, relative to the predictions: the
            # gradient is proportional to the difference, so this sets how much float32
            # rounding in the predictions shows in it.
            rel = ((eps_s - eps_t).abs().max() / eps_t.abs().max()).item()
            check(rel > 1e-2, f"step {k}: the student's prediction is too close ({rel})")
            check(torch.isfinite(loss) and loss > 0, f"step {k}: loss {loss}")
            pre = f"step{k}."
            out[pre + "latents"] = f32(x)
            out[pre + "eps_teacher"] = f32(eps_t)
            out[pre + "eps_uncond"] = f32(eps_u)
            out[pre + "eps_student"] = f32(eps_s)
            out[pre + "next_latents"] = f32(nxt)
            out[pre + "loss"] = loss.detach().reshape(1).to(torch.float64)
            for name, gr in zip(params, grads):
                check(torch.isfinite(gr).all() and gr.abs().max() > 1e-8,
                      f"step {k}: gradient of {name} is trivial")
                out[pre + "grad." + name] = f32(gr)
            notes[f"step{k}"] = {"timestep": sched.timesteps[k].item(), "loss": loss.item(),
                                 "max_rel_prediction_gap": rel}
            x = nxt
        check((out["step1.latents"] - out["step0.latents"]).abs().max() > 0.1,
              "the latents moved")

        meta = {
            "captions": CAPTIONS, "batch": batch, "noise_seed": str(noise_seed),
            "guidance": guidance, "init_noise_sigma": sigma, "resolution": RESOLUTION,
            "denoise_steps": DENOISE_STEPS, "steps_checked": STEPS_CHECKED,
            "settings": run_settings(seed), "base_seed": BASE_SEED,
            "base_model_sha256": base_sha, "unet_sha256": sha256(UNET_FILE),
            "timesteps": [t.item() for t in sched.timesteps], "notes": notes,
            "compute": "float64", "store": "float32 (loss, guidance: float64)",
        }
        safetensors.torch.save_file(
            {k: v.contiguous() for k, v in out.items()}, OUT / "step.safetensors",
            metadata={"qwenclip.vision_step": json.dumps(meta, sort_keys=True)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    files = sorted(p for p in OUT.rglob("*") if p.is_file() and p.name != "MANIFEST.json")
    total = sum(p.stat().st_size for p in files)
    check(total < SIZE_BUDGET, f"fixtures take {total} bytes (budget {SIZE_BUDGET})")
    manifest = {
        "generator": "tests/reference/make_vision_step_fixture.py",
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "diffusers": diffusers.__version__, "safetensors": safetensors.__version__,
        "seed": SEED, "base_model_sha256": base_sha, "unet_sha256": sha256(UNET_FILE),
        "files": {str(p.relative_to(OUT)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
                  for p in files},
    }
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(json.dumps(notes, indent=1))
    print(f"run seed {seed}, batch {batch}, guidance {guidance}")
    print(f"wrote {len(files)} files, {total} bytes, under {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
