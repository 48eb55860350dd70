"""Text to image with diffusers' SDXL pipeline, qwenclip as its text encoder.

    python examples/sdxl_diffusers.py --model Qwen/Qwen3-4B --adapter path/to/adapter \
        --sdxl stabilityai/stable-diffusion-xl-base-1.0 --prompt "a cat under a wooden table" --out cat.png

--sdxl takes a hub id or a local diffusers folder; the pipeline is loaded without its CLIP
text encoders (qwenclip replaces them). Needs `pip install qwenclip[diffusers]`.
"""

from __future__ import annotations

import argparse

import qwenclip
import qwenclip.diffusers
import torch
from diffusers import StableDiffusionXLPipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Qwen3: a folder, a .gguf file or a hub id")
    ap.add_argument("--adapter", required=True, help="a qwenclip adapter folder")
    ap.add_argument("--sdxl", required=True, help="an SDXL diffusers folder or hub id")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--negative-prompt", default=None)
    ap.add_argument("--out", required=True, help="the picture (.png)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--size", type=int, default=1024, help="width and height in pixels")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    cuda = torch.cuda.is_available()
    pipe = StableDiffusionXLPipeline.from_pretrained(
        a.sdxl,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        torch_dtype=torch.float16 if cuda else torch.float32,
    ).to("cuda" if cuda else "cpu")
    # The LLM on the CPU keeps the GPU for the UNet; a CUDA build of qwenclip takes device="cuda".
    with qwenclip.Encoder(a.model, adapter=a.adapter) as enc:
        pe, npe, ppe, nppe = qwenclip.diffusers.encode_prompt(pipe, enc, a.prompt, a.negative_prompt)
    image = pipe(
        prompt_embeds=pe,
        negative_prompt_embeds=npe,
        pooled_prompt_embeds=ppe,
        negative_pooled_prompt_embeds=nppe,
        num_inference_steps=a.steps,
        guidance_scale=a.guidance,
        height=a.size,
        width=a.size,
        generator=torch.Generator().manual_seed(a.seed),
    ).images[0]
    image.save(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
