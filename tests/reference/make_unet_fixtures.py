"""Generate the SDXL-UNet fixtures under tests/fixtures/unet/ (see that folder's README.md).

What is written (the folder is wiped and rewritten, its README.md is kept):
  * diffusers/unet/{config.json,diffusion_pytorch_model.fp16.safetensors}: a tiny random
    diffusers `UNet2DConditionModel` with SDXL's structure (`text_time` addition embedding,
    linear projections, DownBlock2D + 2 x CrossAttnDownBlock2D, mirrored up blocks), saved by
    diffusers with `variant="fp16"`;
  * sdxl_single.safetensors: the SAME weights as a single-file SDXL checkpoint (float16), in
    the original LDM/SGM layout under `model.diffusion_model.` (our own inverse of diffusers'
    `convert_ldm_unet_checkpoint`, checked by running diffusers' conversion on it), plus a
    text-encoder and a VAE tensor the loader must ignore;
  * expected.safetensors: inputs and float64 reference outputs (`case{N}.*`) and, for one
    case, torch autograd gradients of `sum(out * probe)` with respect to the conditioning,
    the pooled vector and the latents.

Every weight is rounded to float16 before anything is saved, so both files hold exactly the
same values and must give the same outputs (tests/unet.rs writes float32, bfloat16 and sharded
copies itself).

Run:  ~/.cache/qwenclip-ref/bin/python tests/reference/make_unet_fixtures.py
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
from pathlib import Path

import diffusers
import safetensors
import safetensors.torch
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "unet"

SEED = 20250611
SIZE_BUDGET = 3_000_000  # bytes, all UNet fixtures together
LDM_PREFIX = "model.diffusion_model."

# SDXL's structure at toy width (= `qwenclip::tiny::unet::unet_shape("tiny")`): three levels,
# two resnets per down block, transformer depth 2 in the last level and the mid block, heads
# [1, 2, 2] (head widths 8 and 16, not 64), cross-attention width 24, pooled width 20, size-id
# embedding width 8, 4 groups per group norm.
POOLED = 20
ADD_TIME = 8
CONFIG = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[8, 16, 32],
    layers_per_block=2,
    transformer_layers_per_block=[1, 1, 2],
    attention_head_dim=[1, 2, 2],
    cross_attention_dim=24,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=ADD_TIME,
    projection_class_embeddings_input_dim=POOLED + 6 * ADD_TIME,
    norm_num_groups=4,
)

# (latent height, width, batch, conditioning length, timesteps). 10x14 is not a multiple of
# 2^upsamplers: the up path then resizes to the skips' sizes (diffusers' `upsample_size`).
CASES = [
    (8, 8, 2, 77, [999.0, 1.0]),
    (16, 16, 1, 5, [500.0]),
    (16, 24, 2, 77, [250.0, 750.5]),
    (10, 14, 1, 12, [42.0]),
]
GRAD_CASE = 0

TOL_F64 = 1e-12


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(f"self-check failed: {msg}")


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Norm weights around 1, visible biases, matrices and kernels at 1/sqrt(fan_in); all
    values rounded to float16 so both fixture layouts hold them exactly."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        shape = p.shape
        if p.dim() == 1 and "norm" in name and name.endswith("weight"):
            v = 1 + 0.2 * torch.randn(shape, generator=gen)
        elif p.dim() == 1:
            v = 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = p[0].numel()
            v = torch.randn(shape, generator=gen) / fan_in**0.5
        p.data = v.half().float()


RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
]


def ldm_prefixes(cfg: dict) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix, for a config with int layers_per_block."""
    L = cfg["layers_per_block"]
    n = len(cfg["block_out_channels"])
    p = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    for b in range(n):
        for j in range(L):
            i = 1 + b * (L + 1) + j
            p[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{i}.0"
            p[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
        if b < n - 1:
            p[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{(b + 1) * (L + 1)}.0.op"
    for b in range(n):
        for j in range(L + 1):
            i = b * (L + 1) + j
            p[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{i}.0"
            p[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{i}.1"
        if b < n - 1:
            slot = 2 if cfg["up_block_types"][b] == "CrossAttnUpBlock2D" else 1
            p[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{b * (L + 1) + L}.{slot}.conv"
    return p


def to_ldm(sd: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """diffusers state dict -> LDM/SGM names (the inverse of convert_ldm_unet_checkpoint)."""
    prefixes = ldm_prefixes(cfg)
    out = {}
    for k, v in sd.items():
        p = max((p for p in prefixes if k.startswith(p + ".")), key=len)
        rest = k[len(p) + 1 :]
        if ".resnets." in p:
            for d, l in RESNET:
                if rest.startswith(d + "."):
                    rest = l + rest[len(d) :]
        out[prefixes[p] + "." + rest] = v
    return out


def inputs(case: int, h: int, w: int, b: int, s: int, ts: list[float]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED + 100 + case)
    sizes = [[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 32, 16, 832, 1216]]
    return {
        "sample": torch.randn(b, 4, h, w, generator=gen).float(),
        "timesteps": torch.tensor(ts, dtype=torch.float32),
        "encoder_hidden_states": torch.randn(b, s, CONFIG["cross_attention_dim"], generator=gen).float(),
        "text_embeds": torch.randn(b, POOLED, generator=gen).float(),
        "time_ids": torch.tensor([sizes[i % 2] for i in range(b)], dtype=torch.float32),
    }


def run(model, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(
        x["sample"],
        x["timesteps"],
        encoder_hidden_states=x["encoder_hidden_states"],
        added_cond_kwargs={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]},
    ).sample


def main() -> int:
    readme = (OUT / "README.md").read_text() if (OUT / "README.md").exists() else None
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "diffusers" / "unet").mkdir(parents=True)
    if readme is not None:
        (OUT / "README.md").write_text(readme)

    torch.manual_seed(SEED)
    model = UNet2DConditionModel(**CONFIG).eval()
    randomise(model, SEED)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}

    unet_dir = OUT / "diffusers" / "unet"
    model.half().save_pretrained(unet_dir, variant="fp16", safe_serialization=True)
    check((unet_dir / "diffusion_pytorch_model.fp16.safetensors").is_file(), "fp16 variant file")

    ldm = {LDM_PREFIX + k: v.half().contiguous() for k, v in to_ldm(sd, CONFIG).items()}
    check(len(ldm) == len(sd), "one LDM name per tensor")
    back = convert_ldm_unet_checkpoint(dict(ldm), dict(CONFIG))
    check(set(back) == set(sd), f"diffusers' conversion of our LDM names: {set(sd) ^ set(back)}")
    for k, v in sd.items():
        check(torch.equal(back[k].float(), v.float()), f"converted back {k}")
    single = dict(ldm)
    gen = torch.Generator().manual_seed(SEED + 1)
    single["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.randn(8, generator=gen).half()
    single["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 4, 3, 3, generator=gen).half()
    safetensors.torch.save_file(single, OUT / "sdxl_single.safetensors", metadata={"format": "pt"})

    # Reference: reload what was saved, in float64.
    ref = UNet2DConditionModel.from_pretrained(unet_dir, variant="fp16", torch_dtype=torch.float64).eval()
    for name, t in ref.state_dict().items():
        check(torch.equal(t.float(), sd[name].float()), f"reload {name}")
    try:
        from_single = UNet2DConditionModel.from_single_file(
            str(OUT / "sdxl_single.safetensors"), config=str(unet_dir), local_files_only=True,
            torch_dtype=torch.float64)
        for name, t in from_single.state_dict().items():
            check(torch.equal(t.float(), sd[name].float()), f"from_single_file {name}")
        print("diffusers' from_single_file reads the single file back")
    except Exception as e:  # offline or API drift: the conversion check above still holds
        print(f"note: from_single_file not checked ({type(e).__name__}: {e})")

    expected = {}
    for i, (h, w, b, s, ts) in enumerate(CASES):
        x = inputs(i, h, w, b, s, ts)
        x64 = {k: v.double() for k, v in x.items()}
        with torch.no_grad():
            out = run(ref, x64)
        check(out.shape == (b, 4, h, w), f"case {i} shape {out.shape}")
        check(out.abs().max() > 0.1, f"case {i} output not trivial")
        for k, v in x.items():
            expected[f"case{i}.{k}"] = v
        expected[f"case{i}.out"] = out.contiguous()

    # Gradients of sum(out * probe) by torch autograd, float64.
    x = {k: v.double() for k, v in inputs(GRAD_CASE, *CASES[GRAD_CASE]).items()}
    for k in ("sample", "encoder_hidden_states", "text_embeds"):
        x[k].requires_grad_(True)
    out = run(ref, x)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(SEED + 7)).float()
    (out * probe.double()).sum().backward()
    expected["grad.probe"] = probe
    for k in ("sample", "encoder_hidden_states", "text_embeds"):
        g = x[k].grad
        check(g is not None and g.abs().max() > 1e-6, f"grad {k} not trivial")
        expected[f"grad.{k}"] = g.contiguous()

    info = {"seed": SEED, "config": CONFIG, "cases": CASES, "grad_case": GRAD_CASE,
            "compute": "float64 (diffusers, SDPA)", "store": "inputs float32, outputs float64"}
    safetensors.torch.save_file(expected, OUT / "expected.safetensors",
                                metadata={"qwenclip.cases": json.dumps(info, sort_keys=True)})

    files = sorted(p for p in OUT.rglob("*") if p.is_file() and p.name != "MANIFEST.json")
    total = sum(p.stat().st_size for p in files)
    check(total < SIZE_BUDGET, f"fixtures take {total} bytes (budget {SIZE_BUDGET})")
    manifest = {
        "generator": "tests/reference/make_unet_fixtures.py",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "safetensors": safetensors.__version__,
        "seed": SEED,
        "files": {str(p.relative_to(OUT)): {"bytes": p.stat().st_size,
                                            "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                  for p in files},
    }
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(files)} files, {total} bytes, under {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
