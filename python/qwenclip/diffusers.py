"""qwenclip conditioning for diffusers' `StableDiffusionXLPipeline` (and its img2img/inpaint
relatives: anything taking `prompt_embeds` and `pooled_prompt_embeds`).

    from diffusers import StableDiffusionXLPipeline
    import qwenclip, qwenclip.diffusers

    pipe = StableDiffusionXLPipeline.from_pretrained(..., text_encoder=None, text_encoder_2=None,
                                                      tokenizer=None, tokenizer_2=None)
    enc = qwenclip.Encoder("Qwen/Qwen3-4B", adapter="path/to/adapter")
    pe, npe, ppe, nppe = qwenclip.diffusers.encode_prompt(pipe, enc, "a cat under a table")
    image = pipe(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
                 negative_pooled_prompt_embeds=nppe).images[0]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .encoder import Encoder


def _as_list(prompt: str | Sequence[str]) -> list[str]:
    return [prompt] if isinstance(prompt, str) else list(prompt)


def _place(pipe) -> tuple[torch.device, torch.dtype]:
    """Where the pipeline's UNet reads its conditioning: its execution device (which follows
    model offloading) and the UNet's dtype, as the pipeline's own encode_prompt does."""
    device = getattr(pipe, "_execution_device", None) or pipe.device
    return torch.device(device), pipe.unet.dtype


def encode_prompt(
    pipe,
    encoder: Encoder,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] | None = None,
    num_images_per_prompt: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
    negative_pooled_prompt_embeds` for `pipe`, on its device and in its UNet's dtype.

    No negative prompt (None or all empty) gives zeros when the pipeline is configured with
    `force_zeros_for_empty_prompt` (SDXL base), as the pipeline itself does; otherwise the
    negative prompts are encoded. Each prompt is repeated `num_images_per_prompt` times, in
    the pipeline's order."""
    prompts = _as_list(prompt)
    if negative_prompt is None:
        negatives = [""] * len(prompts)
    else:
        negatives = _as_list(negative_prompt)
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(
                f"qwenclip: {len(negatives)} negative prompts for {len(prompts)} prompts: give one, "
                "or one per prompt"
            )
    embeds, pooled = encoder.encode(prompts)
    zeros = all(n == "" for n in negatives) and bool(
        getattr(pipe.config, "force_zeros_for_empty_prompt", False)
    )
    if zeros:
        neg_embeds, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    else:
        neg_embeds, neg_pooled = encoder.encode(negatives)
    device, dtype = _place(pipe)
    return tuple(
        t.repeat_interleave(num_images_per_prompt, dim=0).to(device=device, dtype=dtype)
        for t in (embeds, neg_embeds, pooled, neg_pooled)
    )
