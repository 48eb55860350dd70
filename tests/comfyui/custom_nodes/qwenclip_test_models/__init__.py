"""Test-only ComfyUI node: a tiny SDXL-shaped checkpoint (MODEL, CLIP, VAE) built in memory
from ComfyUI's own classes (see tests/comfyui/tiny_sdxl.py). It stands in for
CheckpointLoaderSimple in the end-to-end tests, so a real KSampler, a real SDXL CLIP encode
and a real VAE decode run on the CPU in seconds."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))))
import tiny_sdxl  # noqa: E402


class QwenclipTestTinySDXL:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "build"
    CATEGORY = "qwenclip/testing"

    def build(self, seed):
        return (tiny_sdxl.tiny_model(seed), tiny_sdxl.tiny_clip(seed + 1), tiny_sdxl.tiny_vae(seed + 2))


NODE_CLASS_MAPPINGS = {"QwenclipTestTinySDXL": QwenclipTestTinySDXL}
NODE_DISPLAY_NAME_MAPPINGS = {"QwenclipTestTinySDXL": "Tiny SDXL (qwenclip tests)"}
