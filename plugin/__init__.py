"""qwenclip for ComfyUI: Qwen3 + LoRA + Perceiver Resampler as the SDXL text encoder.

Mappings only. The library is loaded on first use, so importing the pack is fast.
"""

import sys

from .encoder import install_memory_hooks
from .nodes import (
    NODE_CLASS_MAPPINGS,
    NODE_DISPLAY_NAME_MAPPINGS,
    register_models_folder,
)

register_models_folder()
install_memory_hooks()

if getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None) is not None:
    from . import api  # noqa: F401  (GET /qwenclip/status, only inside a running server)

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
