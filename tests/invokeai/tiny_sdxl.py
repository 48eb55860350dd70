"""A tiny SDXL pipeline folder (diffusers layout) with seeded random weights.

It is SDXL to InvokeAI's model probe (model_index.json names StableDiffusionXLPipeline, the
UNet's cross_attention_dim is 2048) and to its denoiser (text_time added conditioning: pooled
[1280] + 6 time ids of 256 each = 2816), but a few MB: nothing to download. There are no CLIP
text encoders: the graph under test conditions with the Qwen node instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def make(out: Path, seed: int = 0) -> Path:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    # Four levels: the VAE must scale by 8, as InvokeAI assumes for SD latents.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    scheduler.save_pretrained(out / "scheduler")
    import diffusers

    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": [None, None],
        "text_encoder_2": [None, None],
        "tokenizer": [None, None],
        "tokenizer_2": [None, None],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


if __name__ == "__main__":
    print(make(Path(sys.argv[1])))
