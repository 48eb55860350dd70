"""The QWEN_ENCODER value that flows between nodes, and where its memory goes.

A `QwenEncoder` is a base model (one library encoder handle, `_Base`) plus the adapter it
encodes with. Encoders made from the same base model, device and dtype share one handle: the
adapter is swapped in when an encoder is used (the library re-reads the base weights from
their memory-mapped files; no second copy of the model is held). A handle is freed when the
last encoder using it is dropped, which is what happens when ComfyUI resets its caches
(`/free` with `free_memory`); `comfy.model_management.unload_all_models` (`/free` with
`unload_models`) and memory pressure in `free_memory` release the weights, which reload on
the next encode.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from pathlib import Path

import torch

from . import library

log = logging.getLogger("qwenclip")

_BASES: weakref.WeakValueDictionary[str, _Base] = weakref.WeakValueDictionary()
_BASES_LOCK = threading.Lock()


def adapter_fingerprint(adapter: str | None) -> tuple | None:
    """Identifies an adapter folder's current contents (path + file sizes and mtimes), so a
    folder rewritten by training is reloaded."""
    if adapter is None:
        return None
    p = Path(adapter)
    files = []
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.suffix in (".json", ".safetensors") and f.name != "checkpoint.safetensors":
                st = f.stat()
                files.append((f.name, st.st_size, st.st_mtime_ns))
    return (str(p), tuple(files))


class _Base:
    """One library encoder (base model + whichever adapter was used last)."""

    def __init__(self, config: dict, adapter: str | None):
        self.config = dict(config)
        self.encoder = library.package().Encoder(adapter=adapter, **self.config)
        self.adapter = adapter_fingerprint(adapter)
        self._shapes: dict = {}

    @property
    def lock(self):
        return self.encoder.lock

    @property
    def handle(self) -> int | None:
        """The C ABI handle; None once freed."""
        return None if self.encoder.closed else self.encoder.handle

    def select(self, adapter: str | None, fp: tuple | None = None) -> None:
        """Makes `adapter` the encoder's adapter (no-op when it already is). Hold `lock`."""
        fp = adapter_fingerprint(adapter) if fp is None else fp
        if fp != self.adapter:
            self.encoder.load_adapter(adapter)
            self.adapter = fp

    def shape(self, adapter: str | None, fp: tuple | None = None) -> tuple[int, int, int]:
        fp = adapter_fingerprint(adapter) if fp is None else fp
        if fp not in self._shapes:
            with self.lock:
                self.select(adapter, fp)
                self._shapes[fp] = self.encoder.output_shape()
        return self._shapes[fp]

    def free(self) -> None:
        if not self.encoder.closed:
            self.encoder.close()
            log.info("qwenclip: freed encoder (%s)", self.config.get("model"))

    def __del__(self):  # the last QwenEncoder using it is gone (ComfyUI reset its caches)
        try:
            self.free()
        except Exception:  # interpreter shutdown or library gone: nothing left to free
            pass


def base_for(config: dict, adapter: str | None) -> _Base:
    """The shared handle for `config` (model, device, dtype, ...), loading it if needed."""
    key = repr(sorted(config.items()))
    with _BASES_LOCK:
        base = _BASES.get(key)
        if base is None or base.handle is None:
            library.get()  # a missing package or library: the pack's message
            base = _Base(config, adapter)
            _BASES[key] = base
        return base


def live_bases() -> list[_Base]:
    return [b for b in list(_BASES.values()) if b.handle is not None]


class QwenEncoder:
    """The QWEN_ENCODER type: a base model handle + an adapter folder (or None)."""

    def __init__(self, base: _Base, adapter: str | None, label: str = ""):
        self.base = base
        self.adapter = None if adapter is None else str(adapter)
        self.label = label or os.path.basename(str(base.config.get("model", "")))

    def __repr__(self):
        return f"QwenEncoder({self.label}, adapter={self.adapter})"

    @property
    def config(self) -> dict:
        return self.base.config

    def with_adapter(self, adapter: str | None, label: str = "") -> QwenEncoder:
        """The same base model with another adapter (shares the handle; loads nothing now)."""
        return QwenEncoder(self.base, adapter, label or self.label)

    def shape(self, fp: tuple | None = None) -> tuple[int, int, int]:
        if self.adapter is None:
            raise ValueError(
                "qwenclip: this encoder has no adapter, so it cannot make SDXL conditioning. "
                "Pick an adapter in Qwen Encoder Loader (or Qwen Adapter Select), or train one "
                "with Qwen Adapter Train."
            )
        return self.base.shape(self.adapter, fp)

    def encode(self, texts: list[str], syntax: str = "none") -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Prompts -> (cond [n, 77, 2048], pooled [n, 1280]) float32 CPU tensors, written by
        the library straight into the tensors' memory, and the library's warnings (a prompt
        cut at the token limit). `syntax` ("comfy", "a1111", "none"): how the library reads
        prompt weighting."""
        fp = adapter_fingerprint(self.adapter)  # once per call: it stats the adapter's files
        s, e, p = self.shape(fp)
        n = len(texts)
        cond = torch.empty((n, s, e), dtype=torch.float32)
        pooled = torch.empty((n, p), dtype=torch.float32)
        with self.base.lock:
            self.base.select(self.adapter, fp)
            warnings = self.base.encoder.encode_into(texts, cond, pooled, syntax=syntax)
        return cond, pooled, warnings


# -- ComfyUI memory management --------------------------------------------------------------


def release_all(reason: str) -> None:
    """Releases the weights of every encoder (they reload on their next encode)."""
    lib = library.loaded()
    if lib is None:
        return
    try:
        before = lib.memory()
        lib.release_memory()
        if before["cpu_bytes"] or before["cuda_bytes"]:
            log.info(
                "qwenclip: released encoder weights (%s): %.1f MB CPU, %.1f MB CUDA",
                reason,
                before["cpu_bytes"] / 2**20,
                before["cuda_bytes"] / 2**20,
            )
    except Exception as e:  # never break ComfyUI's own memory management
        log.warning("qwenclip: could not release memory: %s", e)


_loading = threading.local()


def install_memory_hooks() -> bool:
    """Wraps `comfy.model_management.unload_all_models` (release everything: ComfyUI's /free
    and "unload models" buttons) and `free_memory` (release when ComfyUI still lacks memory on
    a device we hold weights on). Idempotent; returns False outside ComfyUI."""
    try:
        import comfy.model_management as mm
    except Exception:
        return False
    if getattr(mm.unload_all_models, "_qwenclip_hook", False):
        return True

    orig_unload = mm.unload_all_models
    orig_free = mm.free_memory

    def unload_all_models(*args, **kwargs):
        with loading():  # it calls free_memory(1e30): release once, below, under its own name
            out = orig_unload(*args, **kwargs)
        release_all("unload_all_models")
        return out

    def free_memory(memory_required, device, *args, **kwargs):
        out = orig_free(memory_required, device, *args, **kwargs)
        lib = library.loaded()
        if lib is not None and not getattr(_loading, "active", False):
            try:
                held = lib.memory()
                kind = getattr(device, "type", str(device))
                ours = held["cuda_bytes"] if kind == "cuda" else held["cpu_bytes"]
                if ours and mm.get_free_memory(device) < memory_required:
                    release_all(f"ComfyUI needs {memory_required / 2**20:.0f} MB on {device}")
            except Exception as e:
                log.warning("qwenclip: memory check failed: %s", e)
        return out

    unload_all_models._qwenclip_hook = True
    free_memory._qwenclip_hook = True
    mm.unload_all_models = unload_all_models
    mm.free_memory = free_memory
    return True


class loading:
    """Context: `free_memory` calls made inside do not release our weights (our own call
    before a load, and unload_all_models' call, which releases everything itself)."""

    def __enter__(self):
        self.before = getattr(_loading, "active", False)
        _loading.active = True

    def __exit__(self, *exc):
        _loading.active = self.before
