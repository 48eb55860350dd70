"""`Encoder`: a Qwen3 base model + adapter loaded by the library, turning prompts into SDXL
conditioning (prompt embeds [B, 77, 2048] and pooled [B, 1280] for an SDXL adapter)."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from . import _buffers, _native
from ._closing import Closing


class Encoder(Closing):
    """One native encoder handle. Thread-safe: calls on one encoder run one at a time.

    `model`: a Qwen3 folder (Hugging Face layout), a `.gguf` file or a hub id read from the
    local Hugging Face cache. `adapter`: a qwenclip adapter folder (or a training run folder);
    without one the encoder has no resampler and cannot make SDXL conditioning. `device`:
    "cpu", or "cuda"/"cuda:N" with the CUDA build; `dtype`: "f32", "bf16" or "f16" for the
    frozen weights. `max_tokens` / `hidden_layer`: None keeps the adapter's.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        adapter: str | os.PathLike[str] | None = None,
        *,
        device: str = "cpu",
        dtype: str = "f32",
        max_tokens: int | None = None,
        hidden_layer: int | None = None,
    ):
        self.library = _native.get()
        config: dict = {"model": os.fspath(model), "device": device, "dtype": dtype}
        if max_tokens is not None:
            config["max_tokens"] = int(max_tokens)
        if hidden_layer is not None:
            config["hidden_layer"] = int(hidden_layer)
        self.config = config
        self._lock = threading.RLock()
        self._shape: tuple[int, int, int] | None = None
        self.adapter = None if adapter is None else os.fspath(adapter)
        self.warnings: list[str] = []
        self._handle: int | None = self.library.encoder_load({**config, "adapter": self.adapter})

    def __repr__(self) -> str:
        return f"qwenclip.Encoder({self.config['model']!r}, adapter={self.adapter!r}, device={self.config['device']!r})"

    @property
    def handle(self) -> int:
        """The C ABI handle (for `TrainingRun`); raises once the encoder is closed."""
        if self._handle is None:
            raise ValueError("qwenclip: this encoder was closed")
        return self._handle

    @property
    def closed(self) -> bool:
        return self._handle is None

    @property
    def lock(self) -> threading.RLock:
        """Held while the encoder is in use; hold it to make an adapter swap and an encode one
        step."""
        return self._lock

    def load_adapter(self, adapter: str | os.PathLike[str] | None) -> None:
        """Replaces the adapter (None removes it) without reloading the base model; on failure
        the previous adapter stays."""
        path = None if adapter is None else os.fspath(adapter)
        with self._lock:
            self.library.encoder_load_adapter(self.handle, path)
            self.adapter = path
            self._shape = None

    def output_shape(self) -> tuple[int, int, int]:
        """(tokens, embed width, pooled width) per prompt: (77, 2048, 1280) for SDXL."""
        with self._lock:
            if self._shape is None:
                self._shape = self.library.output_shape(self.handle)
            return self._shape

    def encode(self, prompts: str | Sequence[str], output: str = "torch", syntax: str = "none"):
        """Prompts -> (embeds [B, S, E], pooled [B, P]) as float32 CPU torch tensors
        (`output="numpy"`: numpy arrays), written by the library straight into their memory.
        Prompts cut at the token limit are listed in `self.warnings`. `syntax="comfy"` reads
        ComfyUI's prompt weighting (`(word:1.2)`, `(word)`, `\\(` escapes), `"a1111"` also
        A1111's `[word]`; the syntax is removed before the LLM reads the prompt and each token's
        weight scales the attention the resampler gives it. A malformed weight is a
        QwenclipError naming the span."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with self._lock:
            s, e, p = self.output_shape()
            embeds = _buffers.empty((len(prompts), s, e), output)
            pooled = _buffers.empty((len(prompts), p), output)
            self.encode_into(prompts, embeds, pooled, syntax=syntax)
        return embeds, pooled

    def encode_into(self, prompts: Sequence[str], embeds, pooled, syntax: str = "none") -> list[str]:
        """Encodes into caller buffers (contiguous float32 CPU tensors or arrays of n*S*E and
        n*P floats); returns the library's warnings. `syntax` as for `encode`."""
        e_ptr, e_len = _buffers.float_buffer(embeds, "embeds")
        p_ptr, p_len = _buffers.float_buffer(pooled, "pooled")
        with self._lock:
            self.warnings = self.library.encode_into(
                self.handle, list(prompts), e_ptr, e_len, p_ptr, p_len, syntax=syntax
            )
            return self.warnings

    def offload(self) -> None:
        """Drops the weights until the next call needs them (they reload from their files)."""
        with self._lock:
            self.library.encoder_offload(self.handle)

    def close(self) -> None:
        """Frees the native encoder (waits for a running encode). Idempotent."""
        with self._lock:
            h, self._handle = self._handle, None
        if h is not None:
            self.library.encoder_free(h)
