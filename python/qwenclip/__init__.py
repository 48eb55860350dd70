"""qwenclip: Qwen3 + LoRA + Perceiver Resampler as the SDXL text encoder.

    import qwenclip
    with qwenclip.Encoder("Qwen/Qwen3-4B", adapter="path/to/adapter") as enc:
        embeds, pooled = enc.encode(["a red cube left of a blue sphere"])  # [1,77,2048], [1,1280]

The compiled library is loaded on first use (importing this package loads nothing and imports
neither torch nor numpy). `qwenclip.diffusers` feeds a diffusers SDXL pipeline.
"""

from ._native import ABI_VERSION, Library, LibraryMissing, QwenclipError
from ._native import get as library
from ._native import loaded as loaded_library
from .encoder import Encoder
from .training import TrainingRun, read_captions, train_defaults


def parse_prompt(prompt: str, syntax: str = "comfy") -> list[tuple[str, float]]:
    """How the library reads a weighted prompt: (text, weight) segments; joined, the texts are
    what the LLM reads. `syntax`: "comfy", "a1111" or "none"."""
    return library().prompt_weights(prompt, syntax)


__all__ = [
    "ABI_VERSION",
    "Encoder",
    "Library",
    "LibraryMissing",
    "QwenclipError",
    "TrainingRun",
    "library",
    "loaded_library",
    "parse_prompt",
    "read_captions",
    "train_defaults",
]
