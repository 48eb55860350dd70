"""Tiny SDXL (offline demo): a tiny SDXL-shaped checkpoint built in memory from ComfyUI's
own classes, seeded, for checking an install offline and for the tests: with the tiny Qwen3
and adapter `qwenclip-dev tiny` writes, a text-to-image graph runs on the CPU in seconds to a
picture that is finite and depends on the prompt but means nothing (random weights). Nothing
is downloaded. ComfyUI's Load Checkpoint cannot load a model this small (its model detection
knows SDXL by its real sizes), hence a node.

- MODEL: `comfy.supported_models.SDXL` with a small UNet (32 channels, context_dim 2048,
  adm_in_channels 2816), wrapped in a ModelPatcher: takes real SDXL conditioning through a
  real KSampler in seconds.
- CLIP: ComfyUI's real `SDXLClipModel` + `SDXLTokenizer` (the CLIP-L/CLIP-G tokenizers that
  ship with ComfyUI), shrunk through ComfyUI's own `clip_l_model_config` /
  `clip_g_model_config` model options to 3 layers and small MLPs, keeping the widths (768 +
  1280): `encode_from_tokens(..., return_pooled=True)` gives [1,77,2048] and [1,1280] exactly
  as for a real SDXL checkpoint (penultimate layer, projected pooled output).
- VAE: TAESD (ComfyUI's tiny autoencoder) with random weights, LeCun-scaled so a decoded
  picture keeps the latents' structure (finite, not constant, different for other latents).

Every weight is set from a seed (ComfyUI's ops leave them uninitialised: memory garbage, up to
1e37 and NaN), so everything is deterministic. Needs ComfyUI importable (its folder on
sys.path).
"""

from __future__ import annotations

import torch

TINY_UNET = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "transformer_depth": [0, 1],
    "channel_mult": [1, 2],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "num_head_channels": 32,
    "transformer_depth_output": [0, 0, 1, 1],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

# The same UNet in diffusers' terms (ComfyUI's SDXL puts 64 channels in a head: one head at
# 64 channels), for loading its weights elsewhere: qwenclip's own judge, diffusers.
TINY_UNET_DIFFUSERS = {
    "_class_name": "UNet2DConditionModel",
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "transformer_layers_per_block": [1, 1],
    "attention_head_dim": [1, 1],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}

TINY_CLIP_OPTIONS = {
    "clip_l_model_config": {"num_hidden_layers": 3, "intermediate_size": 64},
    "clip_g_model_config": {"num_hidden_layers": 3, "intermediate_size": 64},
}


def _init(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Seeded weights: N(0, std) matrices, unit scales, zero biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, std, generator=g)


def tiny_model(seed: int = 0):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    cfg = comfy.supported_models.SDXL(dict(TINY_UNET))
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    _init(model.diffusion_model, seed)
    model.diffusion_model.to(torch.float32)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def tiny_clip(seed: int = 1):
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models_base
    import folder_paths

    target = comfy.supported_models_base.ClipTarget(
        comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel
    )
    # embedding: names work in its prompts as in a loaded checkpoint's CLIP
    clip = comfy.sd.CLIP(
        target=target,
        embedding_directory=folder_paths.get_folder_paths("embeddings"),
        model_options={**TINY_CLIP_OPTIONS, "dtype": torch.float32},
    )
    _init(clip.cond_stage_model, seed)
    return clip


def tiny_vae(seed: int = 2):
    import comfy.sd
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in taesd.named_parameters():
            if p.ndim == 4:  # convolutions: N(0, 1/fan_in) keeps activations at unit scale
                p.normal_(0.0, (1.0 / p[0].numel()) ** 0.5, generator=g)
            else:  # biases, the latent shift: 0; the latent scale: 1
                p.fill_(1.0 if name == "vae_scale" else 0.0)
    return comfy.sd.VAE(sd=taesd.state_dict())


class QwenDemoTinySDXL:
    """MODEL, CLIP and VAE of a tiny SDXL with seeded random weights (see the module doc)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "build"
    CATEGORY = "qwenclip/demo"
    DESCRIPTION = (
        "A tiny SDXL with random weights (MODEL, CLIP, VAE) for checking an install offline: "
        "pictures are meaningless but real. Use a real checkpoint with Load Checkpoint for real work."
    )

    def build(self, seed):
        return (tiny_model(seed), tiny_clip(seed + 1), tiny_vae(seed + 2))
