"""Qwen Text Encode (SDXL): qwenclip in place of InvokeAI's CLIP prompt nodes."""

import os
import sys
import threading
from typing import Literal

import torch
from invokeai.app.invocations.baseinvocation import BaseInvocation, invocation
from invokeai.app.invocations.fields import (
    ConditioningField,
    InputField,
    TensorField,
    UIComponent,
)
from invokeai.app.invocations.primitives import ConditioningOutput
from invokeai.app.services.shared.invocation_context import InvocationContext
from invokeai.backend.stable_diffusion.diffusion.conditioning_data import (
    ConditioningFieldData,
    SDXLConditioningInfo,
)

# One loaded encoder, reused while its settings stay the same: loading an LLM takes far longer
# than encoding a prompt, and InvokeAI's model cache does not know about it.
_lock = threading.Lock()
_cached: tuple[tuple, object] | None = None


def _encoder(model: str, adapter: str, device: str, dtype: str, logger):
    global _cached
    try:
        import qwenclip
    except ImportError as e:
        exe = sys.executable
        # InvokeAI's launcher makes its venv with uv, which leaves pip out: name both ways.
        raise RuntimeError(
            f"Qwen Text Encode needs the qwenclip package in InvokeAI's Python ({e}): "
            f"`uv pip install --python {exe} qwenclip` or `{exe} -m pip install qwenclip`"
        ) from e
    key = (model, adapter, device, dtype)
    if _cached is not None and _cached[0] == key:
        return _cached[1]
    if _cached is not None:
        _cached[1].close()
        _cached = None
    logger.info(f"Qwen Text Encode: loading {model} with adapter {adapter} ({device}, {dtype})")
    encoder = qwenclip.Encoder(model=model, adapter=adapter, device=device, dtype=dtype)
    _cached = (key, encoder)
    return encoder


def _path(value: str, what: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError(f"Qwen Text Encode: no {what} given")
    # A hub id ("Qwen/Qwen3-4B") goes through unchanged; only local paths get ~ expanded.
    return os.path.expanduser(value)


@invocation(
    "qwenclip_sdxl_text_encode",
    title="Qwen Text Encode (SDXL)",
    tags=["sdxl", "prompt", "qwen", "qwenclip"],
    category="prompt",
    version="1.0.0",
)
class QwenTextEncodeSDXLInvocation(BaseInvocation):
    """Encodes a prompt with Qwen3 + a qwenclip adapter into SDXL conditioning (replaces both CLIP encoders)."""

    prompt: str = InputField(
        default="",
        description="The prompt, as plain text (Compel's weighting syntax is not parsed)",
        ui_component=UIComponent.Textarea,
    )
    model: str = InputField(
        default="",
        description="Qwen3 model: a local Hugging Face folder, a .gguf file or a hub id (Qwen/Qwen3-4B)",
    )
    adapter: str = InputField(default="", description="qwenclip adapter folder (LoRA + resampler)")
    device: str = InputField(default="cpu", description="Where the encoder runs: cpu, cuda or cuda:N")
    dtype: Literal["f32", "bf16", "f16"] = InputField(default="f32", description="Encoder precision")
    # The size conditioning, as InvokeAI's own SDXL prompt node takes it.
    original_width: int = InputField(default=1024, description="")
    original_height: int = InputField(default=1024, description="")
    crop_top: int = InputField(default=0, description="")
    crop_left: int = InputField(default=0, description="")
    target_width: int = InputField(default=1024, description="")
    target_height: int = InputField(default=1024, description="")
    mask: TensorField | None = InputField(
        default=None, description="A mask defining the region that this conditioning prompt applies to."
    )

    def invoke(self, context: InvocationContext) -> ConditioningOutput:
        model = _path(self.model, "model")
        adapter = _path(self.adapter, "adapter")
        with _lock:
            embeds, pooled = _encoder(model, adapter, self.device, self.dtype, context.logger).encode(
                [self.prompt]
            )
        if tuple(embeds.shape) != (1, 77, 2048) or tuple(pooled.shape) != (1, 1280):
            raise ValueError(
                f"Qwen Text Encode: the adapter gives embeddings {list(embeds.shape)} and pooled {list(pooled.shape)}, "
                "SDXL needs [1, 77, 2048] and [1, 1280] (is it an SDXL adapter?)"
            )
        if self.prompt == "":
            # InvokeAI's SDXL prompt node (like diffusers' SDXL pipeline) conditions an empty
            # prompt with zeros; do the same so negative prompts behave alike.
            embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        # As InvokeAI's SDXL prompt node computes them: (h, w) + (top, left) + (h, w).
        add_time_ids = torch.tensor(
            [
                (self.original_height, self.original_width)
                + (self.crop_top, self.crop_left)
                + (self.target_height, self.target_width)
            ]
        )
        info = SDXLConditioningInfo(embeds=embeds, pooled_embeds=pooled, add_time_ids=add_time_ids)
        name = context.conditioning.save(ConditioningFieldData(conditionings=[info]))
        return ConditioningOutput(conditioning=ConditioningField(conditioning_name=name, mask=self.mask))
