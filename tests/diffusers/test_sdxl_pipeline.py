"""qwenclip.diffusers with a real diffusers StableDiffusionXLPipeline: a tiny SDXL-shaped
pipeline with seeded random weights (made here: nothing is downloaded) renders from our
conditioning, and the helper hands the pipeline exactly what the library returns.

Run by .ci/comfyui.sh in the test environment (torch, diffusers 0.39, the qwenclip wheel);
QWENCLIP_DEV_BIN writes the seeded tiny Qwen3 + adapter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import qwenclip
import qwenclip.diffusers
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    subprocess.run(
        [os.environ["QWENCLIP_DEV_BIN"], "tiny", "--out", str(out)], check=True, capture_output=True
    )
    with qwenclip.Encoder(out / "model", adapter=out / "adapter") as enc:
        yield enc


@pytest.fixture(scope="module")
def pipe():
    """SDXL's conditioning interface (cross-attention width 2048, text_time with the pooled
    1280 + six size ids) on a UNet and VAE small enough for the CPU."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 1280,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32),
        latent_channels=4,
        norm_num_groups=32,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=scheduler,
    )


def render(pipe, embeds, seed: int = 7) -> np.ndarray:
    pe, npe, ppe, nppe = embeds
    out = pipe(
        prompt_embeds=pe,
        negative_prompt_embeds=npe,
        pooled_prompt_embeds=ppe,
        negative_pooled_prompt_embeds=nppe,
        num_inference_steps=4,
        guidance_scale=5.0,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return out.images


def test_the_helper_returns_what_the_library_returns(pipe, encoder):
    pe, npe, ppe, nppe = qwenclip.diffusers.encode_prompt(
        pipe, encoder, "a red cube", negative_prompt="blurry"
    )
    embeds, pooled = encoder.encode(["a red cube"])
    neg, neg_pooled = encoder.encode(["blurry"])
    assert pe.shape == (1, 77, 2048) and ppe.shape == (1, 1280)
    assert torch.equal(pe, embeds) and torch.equal(ppe, pooled)
    assert torch.equal(npe, neg) and torch.equal(nppe, neg_pooled)
    assert pe.device == pipe.device and pe.dtype == pipe.unet.dtype


def test_no_negative_prompt_gives_zeros_as_sdxl_does_and_images_per_prompt_repeat(pipe, encoder):
    assert pipe.config.force_zeros_for_empty_prompt
    pe, npe, ppe, nppe = qwenclip.diffusers.encode_prompt(pipe, encoder, ["a", "b"], num_images_per_prompt=2)
    assert pe.shape == (4, 77, 2048) and ppe.shape == (4, 1280)
    assert not npe.any() and not nppe.any()
    embeds, _ = encoder.encode(["a", "b"])
    assert torch.equal(pe[0], embeds[0]) and torch.equal(pe[1], embeds[0]) and torch.equal(pe[2], embeds[1])
    with pytest.raises(ValueError, match="3 negative prompts for 2 prompts"):
        qwenclip.diffusers.encode_prompt(pipe, encoder, ["a", "b"], negative_prompt=["x", "y", "z"])


def test_the_dtype_follows_the_pipeline(pipe, encoder):
    pipe.unet.to(torch.bfloat16)
    try:
        pe, npe, ppe, nppe = qwenclip.diffusers.encode_prompt(pipe, encoder, "a red cube")
        assert {t.dtype for t in (pe, npe, ppe, nppe)} == {torch.bfloat16}
    finally:
        pipe.unet.to(torch.float32)


def test_the_pipeline_renders_from_our_conditioning(pipe, encoder):
    a = render(pipe, qwenclip.diffusers.encode_prompt(pipe, encoder, "a red cube left of a blue sphere"))
    again = render(pipe, qwenclip.diffusers.encode_prompt(pipe, encoder, "a red cube left of a blue sphere"))
    b = render(pipe, qwenclip.diffusers.encode_prompt(pipe, encoder, "a cat under a wooden table"))
    assert a.shape == (1, 32, 32, 3)
    assert np.isfinite(a).all() and a.std() > 1e-3  # a picture, not a flat field
    assert np.array_equal(a, again)  # same seed, same prompt
    assert np.abs(a - b).max() > 1e-3  # the prompt reaches the picture


def test_the_readme_example_script_renders_with_a_saved_pipeline(pipe, encoder, tmp_path):
    """examples/sdxl_diffusers.py as the README runs it, on the tiny pipeline saved as a
    diffusers folder."""
    from PIL import Image

    sdxl = tmp_path / "sdxl"
    pipe.save_pretrained(sdxl)
    pictures = []
    for prompt in ("a red cube left of a blue sphere", "a cat under a wooden table"):
        out = tmp_path / f"{len(pictures)}.png"
        args = ["--model", encoder.config["model"], "--adapter", encoder.adapter, "--sdxl", str(sdxl)]
        args += ["--prompt", prompt, "--out", str(out), "--steps", "3", "--size", "32"]
        r = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "sdxl_diffusers.py"), *args],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        pictures.append(np.asarray(Image.open(out), dtype=np.float32))
    assert pictures[0].shape == (32, 32, 3) and pictures[0].std() > 1.0  # 0..255, not flat
    assert np.abs(pictures[0] - pictures[1]).max() > 1.0
