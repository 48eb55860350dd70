"""The node classes (ComfyUI V1 API). Thin: validate inputs, call the library, shape outputs.

The library is loaded on first use (library.get()), never at import, so the pack imports in
milliseconds and a missing library shows one clear message when a node runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path

import folder_paths
import torch

from . import encoder as enc
from . import hub, library, training

log = logging.getLogger("qwenclip")

MODELS_KEY = "qwenclip"
BASE_KEY = "text_encoders"
GGUF_KEY = "qwenclip_gguf"
GGUF_EXTENSIONS = {".gguf"}
MAX_RESOLUTION = 16384
NO_ADAPTER = "none"
NO_FOLDER = "none (use captions_text)"
ENCODER = "QWEN_ENCODER"
RUN_ADAPTER_DIR = "adapter"  # where a training run folder keeps its adapter (the library's layout)


def register_models_folder() -> None:
    """`models/qwenclip` (adapters, and training output) as a ComfyUI model folder; an
    extra_model_paths.yaml entry `qwenclip: PATH` adds more places (the first one listed is
    where training writes)."""
    folder_paths.add_model_folder_path(MODELS_KEY, os.path.join(folder_paths.models_dir, MODELS_KEY))
    _sync_gguf_folders()


def _sync_gguf_folders() -> None:
    """`qwenclip_gguf`: our own key for quantized base models, listing only `.gguf` files from
    the `text_encoders` and `qwenclip` folders (where people put them). ComfyUI's shared
    `text_encoders` extension set is left alone: widening it would put .gguf files in every
    other text-encoder loader's list. Re-run at listing time because folders can be added
    after the pack is imported (extra_model_paths.yaml, tests); an extra_model_paths.yaml
    entry `qwenclip_gguf: PATH` adds more places."""
    if GGUF_KEY not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[GGUF_KEY] = ([], set(GGUF_EXTENSIONS))
    paths, exts = folder_paths.folder_names_and_paths[GGUF_KEY]
    exts.update(GGUF_EXTENSIONS)
    for root in _paths(BASE_KEY) + _paths(MODELS_KEY):
        if root not in paths:
            paths.append(root)


# -- listing model folders ----------------------------------------------------------------------


def _subfolders(roots: list[str], marker) -> dict[str, str]:
    """name -> path for folders up to two levels below each root that `marker` recognises
    (it returns the path to use, or None)."""
    found: dict[str, str] = {}

    def dirs(p: Path) -> list[Path]:
        try:
            return sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
        except OSError:  # unreadable or gone: list what can be listed
            return []

    for root in roots:
        for d1 in dirs(Path(root)):
            hit = marker(d1)
            if hit:
                found.setdefault(d1.name, hit)
                continue
            for d2 in dirs(d1):
                hit = marker(d2)
                if hit:
                    found.setdefault(f"{d1.name}/{d2.name}", hit)
    return found


def _model_path(d: Path) -> str | None:
    return str(d) if (d / "config.json").is_file() else None


def _is_adapter(d: Path) -> bool:
    return (d / "qwenclip.json").is_file() or (d / "adapter_config.json").is_file()


def _adapter_path(d: Path) -> str | None:
    """An adapter folder, or a training run folder (its adapter is `adapter/`)."""
    if _is_adapter(d):
        return str(d)
    if _is_adapter(d / RUN_ADAPTER_DIR):
        return str(d / RUN_ADAPTER_DIR)
    return None


def _paths(key: str) -> list[str]:
    try:
        return folder_paths.get_folder_paths(key)
    except KeyError:
        return []


def gguf_models() -> dict[str, str]:
    """`.gguf` files under the `qwenclip_gguf` key (name relative to its folder -> path)."""
    _sync_gguf_folders()
    found = {}
    for name in folder_paths.get_filename_list(GGUF_KEY):
        path = folder_paths.get_full_path(GGUF_KEY, name)
        if path:
            found[name] = path
    return found


def base_models() -> dict[str, str]:
    """Model folders under `text_encoders` (and `qwenclip`) that hold a config.json, and
    `.gguf` files (quantized Qwen3) in the same places."""
    found = _subfolders(_paths(BASE_KEY), _model_path)
    for name, path in _subfolders(_paths(MODELS_KEY), _model_path).items():
        found.setdefault(name, path)
    for name, path in gguf_models().items():
        found.setdefault(name, path)
    return found


def adapters() -> dict[str, str]:
    return _subfolders(_paths(MODELS_KEY), _adapter_path)


def adapter_choices() -> list[str]:
    return [NO_ADAPTER] + sorted(adapters())


def resolve_adapter(name: str) -> str | None:
    if not name or name == NO_ADAPTER:
        return None
    found = adapters()
    if name in found:
        return found[name]
    raise ValueError(
        f"qwenclip: adapter '{name}' was not found in the qwenclip models folder "
        f"({', '.join(_paths(MODELS_KEY)) or 'none registered'}); an adapter is a folder "
        "holding qwenclip.json (or a PEFT adapter_config.json)"
    )


def adapter_changed_key(name: str) -> str:
    """ComfyUI's IS_CHANGED key for an adapter choice: a retrained adapter folder must reload,
    so its files' sizes and times are the key ("" when the name does not resolve; the node
    then reports that when it runs)."""
    try:
        return repr(enc.adapter_fingerprint(resolve_adapter(name)))
    except ValueError:
        return ""


def _where_models_go() -> str:
    return ", ".join(_paths(BASE_KEY)) or "models/text_encoders"


def resolve_base(name: str, hub_id: str = "", progress=None) -> str:
    """A local model folder or .gguf file: from the model folders, or a hub id from the
    Hugging Face cache, downloaded first when it is not there (`progress(done, total)`)."""
    hub_id = (hub_id or "").strip()
    if hub_id and Path(hub_id).expanduser().exists():
        return str(Path(hub_id).expanduser())
    found = base_models()
    if not hub_id and name in found:
        return found[name]
    repo = hub_id or hub.repo_of(name)
    if repo in hub.HUB_IDS or hub_id:
        return hub.resolve(repo, progress or (lambda done, total: None), _where_models_go())
    raise ValueError(
        f"qwenclip: base model '{name}' was not found: put a Qwen3 model folder (config.json, "
        f"*.safetensors, tokenizer.json) or a Qwen3 .gguf file under {_where_models_go()}, "
        "or pick a hub id (e.g. Qwen/Qwen3-4B)"
    )


def _estimate_bytes(model: str, dtype: str) -> int:
    """Rough size of the model's weights in `dtype`, to ask ComfyUI for room first."""
    p = Path(model)
    if p.is_file():  # a .gguf stays quantized in memory: its size is what it takes
        return p.stat().st_size
    size = sum(f.stat().st_size for f in p.glob("*.safetensors"))
    stored = 2
    try:
        stored = 4 if json.loads((p / "config.json").read_text()).get("torch_dtype") == "float32" else 2
    except (OSError, ValueError):
        pass
    want = 4 if dtype == "f32" else 2
    return size * want // stored


# -- devices ----------------------------------------------------------------------------------


def pick_device(device: str, lib) -> str:
    if device == "auto":
        try:
            import comfy.model_management as mm

            cpu_only = mm.cpu_state == mm.CPUState.CPU
        except Exception:
            cpu_only = False
        import torch

        return "cuda" if lib.has_cuda and torch.cuda.is_available() and not cpu_only else "cpu"
    if device.startswith("cuda") and not lib.has_cuda:
        raise ValueError(
            f"qwenclip: device {device} needs the CUDA build of the library, and "
            f"{lib.path} is the CPU build: install the CUDA build of the qwenclip package (see the pack's README)."
        )
    return device


def pick_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "bf16" if device.startswith("cuda") else "f32"
    return dtype


def _torch_device(device: str):
    import torch

    return torch.device(device)


# -- nodes ------------------------------------------------------------------------------------


def _finite(**values) -> None:
    """Refuses a NaN (or infinite) number input, naming it. ComfyUI's min/max check lets NaN
    through (every comparison with NaN is false), which an API client sends as `NaN` or "nan";
    the library would otherwise get JSON it cannot read, or NaN conditioning."""
    for name, value in values.items():
        if value is not None and not math.isfinite(float(value)):
            raise ValueError(
                f"qwenclip: {name} is {value}; it must be a finite number (in the widget's range)"
            )


class QwenEncoderLoader:
    """Qwen3 base model (+ adapter) -> QWEN_ENCODER."""

    @classmethod
    def INPUT_TYPES(cls):
        bases = sorted(base_models()) + hub.choices()
        return {
            "required": {
                "base_model": (
                    bases,
                    {
                        "tooltip": "A Qwen3 model folder or .gguf file (4/5/6/8-bit, llama.cpp's or `qwenclip quantize`'s) in models/text_encoders, or a Hugging Face hub id: as it is when it is in the Hugging Face cache, with '(download)' when running the node downloads it first (size in the log, progress on the node, resumed if stopped)."
                    },
                ),
                "adapter": (
                    adapter_choices(),
                    {
                        "tooltip": "An adapter folder in models/qwenclip (LoRA + resampler). Without one there is no SDXL conditioning."
                    },
                ),
                "device": (["auto", "cpu", "cuda"], {"default": "auto"}),
                "dtype": (
                    ["auto", "f32", "bf16", "f16"],
                    {"default": "auto", "tooltip": "auto: bf16 on CUDA, f32 on the CPU."},
                ),
            },
            "optional": {
                "hub_id": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Any hub id or model folder path; overrides base_model when set.",
                    },
                ),
                "max_tokens": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 32768,
                        "tooltip": "Prompt token limit; 0 = the adapter's (256 by default).",
                    },
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = (ENCODER,)
    RETURN_NAMES = ("encoder",)
    FUNCTION = "load"
    CATEGORY = "qwenclip"
    DESCRIPTION = "Loads a Qwen3 text encoder and a qwenclip adapter (LoRA + Perceiver Resampler) that turns it into an SDXL text encoder."

    @classmethod
    def IS_CHANGED(cls, adapter=NO_ADAPTER, **_inputs):
        return adapter_changed_key(adapter)

    def load(self, base_model, adapter, device, dtype, hub_id="", max_tokens=0, unique_id=None):
        lib = library.get()
        model = resolve_base(base_model, hub_id, _download_progress(unique_id))
        adapter_dir = resolve_adapter(adapter)
        dev = pick_device(device, lib)
        dt = pick_dtype(dtype, dev)
        config = {"model": model, "device": dev, "dtype": dt}
        if max_tokens:
            config["max_tokens"] = int(max_tokens)
        try:
            import comfy.model_management as mm

            need = _estimate_bytes(model, dt)
            if need:
                with enc.loading():
                    mm.free_memory(need, _torch_device(dev))
        except ImportError:
            pass
        t0 = time.perf_counter()
        base = enc.base_for(config, adapter_dir)
        log.info(
            "qwenclip: encoder %s (%s, %s) adapter %s ready in %.2f s",
            model,
            dev,
            dt,
            adapter_dir,
            time.perf_counter() - t0,
        )
        return (enc.QwenEncoder(base, adapter_dir, label=adapter if adapter_dir else base_model),)


def _download_progress(node_id):
    """ComfyUI's progress bar for a download, in thousandths (it raises when the user
    cancels; the partial files stay and the next run resumes)."""
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        import comfy.utils

        if bar is None:
            bar = comfy.utils.ProgressBar(1000, node_id=node_id)
        bar.update_absolute(done * 1000 // max(total, 1), 1000)

    return update


class QwenAdapterSelect:
    """Same base model, another adapter (no reload of the base)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"encoder": (ENCODER,), "adapter": (adapter_choices(),)}}

    RETURN_TYPES = (ENCODER,)
    RETURN_NAMES = ("encoder",)
    FUNCTION = "select"
    CATEGORY = "qwenclip"
    DESCRIPTION = "Gives the encoder another adapter from models/qwenclip, sharing the loaded base model."

    @classmethod
    def IS_CHANGED(cls, adapter=NO_ADAPTER, **_inputs):
        return adapter_changed_key(adapter)

    def select(self, encoder, adapter):
        library.get()
        path = resolve_adapter(adapter)
        return (encoder.with_adapter(path, label=adapter),)


PROMPT_SYNTAXES = ("comfy", "a1111", "none")

# ComfyUI's textual-inversion references (comfy/sd1_clip.py): "embedding:NAME" at the start of
# the text, after whitespace or after an opening bracket (where ComfyUI's weight parser starts a
# segment), NAME running to whitespace with trailing commas dropped; or a whole weighted group
# "(embedding:NAME:1.2)". A name also stops at ":" and brackets (no file name has a colon), so a
# group's weight is not read as part of the name. Escaped brackets are text. The reference's
# trailing commas and spaces go with it: "a, embedding:x, b" -> "a, b".
_EMBEDDING = re.compile(
    r"(?:(?P<group>(?<!\\)\(embedding:(?P<group_name>[^\s():]+)(?::[^()]*)?\))"
    r"|(?:^|(?<=\s)|(?<=\()(?<!\\\())embedding:(?P<name>[^\s():]+))"
    r"[, \t]*"
)


def split_embeddings(text: str) -> tuple[str, list[str], list[str]]:
    """(the prompt without its textual-inversion references, the references as CLIP text, their
    names). An LLM cannot read a CLIP embedding; the CLIP branch can."""
    refs: list[str] = []
    names: list[str] = []

    def cut(m: re.Match) -> str:
        name = (m.group("group_name") or m.group("name")).rstrip(",")
        names.append(name)
        refs.append(m.group("group") or f"embedding:{name}")
        return ""

    out = _EMBEDDING.sub(cut, text)
    return (out.strip(" \t\n,") if refs else text), refs, names


class QwenTextEncodeSDXL:
    """Text -> SDXL CONDITIONING, in CLIPTextEncodeSDXL's exact format."""

    @classmethod
    def INPUT_TYPES(cls):
        res = {"default": 1024, "min": 0, "max": MAX_RESOLUTION}
        zero = {"default": 0, "min": 0, "max": MAX_RESOLUTION}
        return {
            "required": {
                "encoder": (ENCODER,),
                "text": (
                    "STRING",
                    {
                        "multiline": True,
                        "dynamicPrompts": True,
                        "tooltip": "The prompt. (word:1.2) weights as in CLIP Text Encode (prompt_syntax); "
                        "embedding:name goes to the CLIP branch.",
                    },
                ),
                "width": ("INT", res),
                "height": ("INT", res),
                "crop_w": ("INT", zero),
                "crop_h": ("INT", zero),
                "target_width": ("INT", res),
                "target_height": ("INT", res),
            },
            "optional": {
                "prompt_syntax": (
                    list(PROMPT_SYNTAXES),
                    {
                        "default": "comfy",
                        "tooltip": "comfy: (word) x1.1, (word:1.3), \\( \\) for literal brackets, as CLIP Text "
                        "Encode reads them. a1111: also [word] /1.1. none: the LLM reads the text as written.",
                    },
                ),
                "clip": (
                    "CLIP",
                    {
                        "tooltip": "The checkpoint's CLIP (after your LoRA): encodes clip_text and embedding: names."
                    },
                ),
                "clip_text": (
                    "STRING",
                    {
                        "multiline": True,
                        "dynamicPrompts": True,
                        "tooltip": "Trigger words, tags, embedding:name: encoded by the connected CLIP and "
                        "appended after the Qwen tokens.",
                    },
                ),
                "clip_strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 10.0,
                        "step": 0.05,
                        "tooltip": "Scales the CLIP tokens.",
                    },
                ),
                "clip_pooled_blend": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.05,
                        "tooltip": "0: the pooled vector stays Qwen's; 1: CLIP's; between: a blend.",
                    },
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "qwenclip"
    DESCRIPTION = "Encodes a prompt into SDXL conditioning ([1,77,2048] + pooled [1,1280] + size conditioning), a drop-in for CLIPTextEncodeSDXL."

    def encode(
        self,
        encoder,
        text,
        width,
        height,
        crop_w,
        crop_h,
        target_width,
        target_height,
        prompt_syntax="comfy",
        clip=None,
        clip_text="",
        clip_strength=1.0,
        clip_pooled_blend=0.0,
        unique_id=None,
    ):
        _finite(clip_strength=clip_strength, clip_pooled_blend=clip_pooled_blend)
        library.get()
        pkg = library.package()
        text, refs, names = split_embeddings(text)
        if names:
            where = (
                "it goes through the connected CLIP instead"
                if clip is not None
                else "it was ignored: connect the checkpoint's CLIP to this node's clip input to use it"
            )
            listed = ", ".join(f"embedding:{n}" for n in names)
            warn(
                unique_id,
                "QwenTextEncodeSDXL",
                f"{listed}: a CLIP textual inversion cannot feed the LLM; {where}",
            )
        try:
            cond, pooled, warnings = encoder.encode([text], syntax=prompt_syntax)
        except pkg.QwenclipError as e:
            reason = str(e).split("invalid argument: ", 1)[-1].replace("prompt 0", "the prompt", 1)
            raise ValueError(
                f"qwenclip: {reason} (prompt_syntax {prompt_syntax}: write \\( \\) for literal brackets, "
                "or set prompt_syntax to none)"
            ) from e
        for w in warnings:
            warn(unique_id, "QwenTextEncodeSDXL", w.replace("prompt 0", "the prompt", 1))
        typed = clip_text.strip()
        clip_text = ", ".join(t for t in (typed, *refs) if t)
        if clip is not None and clip_text:
            cond, pooled = _with_clip(cond, pooled, clip, clip_text, clip_strength, clip_pooled_blend)
        elif typed:
            # A warning, not an error: the Qwen prompt is complete on its own, so the picture
            # still renders; the toast says why the trigger words did nothing and how to fix it.
            warn(
                unique_id,
                "QwenTextEncodeSDXL",
                "clip_text was ignored: no CLIP is connected. Connect the checkpoint's CLIP (after your "
                "LoRA loader) to this node's clip input for trigger words and tags.",
            )
        return (
            [
                [
                    cond,
                    {
                        "pooled_output": pooled,
                        "width": width,
                        "height": height,
                        "crop_w": crop_w,
                        "crop_h": crop_h,
                        "target_width": target_width,
                        "target_height": target_height,
                    },
                ]
            ],
        )


def _with_clip(cond, pooled, clip, text: str, strength: float, blend: float):
    """Our conditioning with `text` encoded by the checkpoint's own CLIP (as CLIPTextEncode does,
    so ComfyUI's weighting and embeddings work there) appended along the sequence, as
    ConditioningConcat does: a LoRA trained on CLIP still sees its trigger tokens."""
    c, p = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    if c.shape[-1] != cond.shape[-1] or p is None or p.shape[-1] != pooled.shape[-1]:
        raise ValueError(
            f"qwenclip: the CLIP connected to clip makes {c.shape[-1]}-wide tokens; SDXL's makes "
            f"{cond.shape[-1]}: connect the SDXL checkpoint's CLIP"
        )
    c, p = c.to(cond), p.to(pooled)
    return torch.cat([cond, c * strength], dim=1), torch.lerp(pooled, p, blend)


def warn(node_id, node_type: str, message: str) -> None:
    """A warning for the user: the server log, and a toast in the frontend (web/warnings.js)
    for the client that queued the prompt."""
    title = NODE_DISPLAY_NAME_MAPPINGS.get(node_type, node_type)
    log.warning("qwenclip: %s (node %s): %s", title, node_id, message)
    try:
        from server import PromptServer

        server = PromptServer.instance
        event = {"node": node_id, "type": node_type, "title": title, "message": message}
        server.send_sync("qwenclip.warning", event, server.client_id)
    except Exception:  # no server (scripts, unit tests): the log has it
        pass


class _ComfyHooks:
    """What the training loop needs from ComfyUI: progress (raises on Cancel), text, previews."""

    def __init__(self, total: int, node_id):
        import comfy.model_management
        import comfy.utils

        self.mm = comfy.model_management
        try:
            self.pbar = comfy.utils.ProgressBar(total, node_id=node_id)
        except TypeError:  # ComfyUI before node_id was added
            self.pbar = comfy.utils.ProgressBar(total)
        self.node_id = node_id
        self.last_preview = 0.0
        self.last_log = 0.0
        self.every = max(1, total // 20)

    def progress(self, value, total, preview_rgb):
        preview = None
        if preview_rgb is not None:
            from PIL import Image

            preview = ("PNG", Image.fromarray(preview_rgb), 640)
        self.pbar.update_absolute(value, total, preview)

    def check_interrupt(self):
        self.mm.throw_exception_if_processing_interrupted()

    def wants_preview(self, step, total):
        now = time.monotonic()
        if step >= total or now - self.last_preview > 2.0:
            self.last_preview = now
            return True
        return False

    def text(self, step, message, force=False):
        if force or step % self.every == 0 or step == 1:
            log.info("qwenclip: %s", message)
        try:
            from server import PromptServer

            if self.node_id is not None and hasattr(PromptServer.instance, "send_progress_text"):
                PromptServer.instance.send_progress_text(message, self.node_id)
        except Exception:
            pass


def caption_folders() -> list[str]:
    """Folders under the input directory that hold caption files (read by the library)."""
    root = Path(folder_paths.get_input_directory())
    out = []
    if root.is_dir():
        for d in sorted(root.rglob("*")):
            if d.is_dir() and not any(part.startswith(".") for part in d.relative_to(root).parts):
                if any(f.suffix.lower() in training.CAPTION_SUFFIXES for f in d.iterdir() if f.is_file()):
                    out.append(d.relative_to(root).as_posix())
    return [NO_FOLDER] + out


def _adapter_name_ok(name: str) -> str:
    name = name.strip()
    if not name or name.startswith(".") or any(c in name for c in '\\:*?"<>|') or ".." in Path(name).parts:
        raise ValueError(f"qwenclip: adapter_name '{name}' is not a usable folder name")
    return name


def train_defaults() -> dict:
    """The library's training defaults (TrainConfig::default(), the one place they are
    written); empty when there is no library (the node then says so when it runs)."""
    try:
        return library.get().train_defaults()
    except library.LibraryMissing:
        return {}


def _scheduler_names() -> list[str]:
    try:
        import comfy.samplers

        return list(comfy.samplers.SCHEDULER_NAMES)
    except ImportError:  # outside ComfyUI (the pack's own checks)
        return ["normal"]


def _widget(kind: str, defaults: dict, key: str, **opts) -> tuple:
    if key in defaults:
        opts["default"] = defaults[key]
    return (kind, opts)


# Widget -> training setting, for the settings the node exposes.
TRAIN_WIDGETS = {
    "steps": int,
    "batch_size": int,
    "grad_accum": int,
    "lr_lora": float,
    "lr_resampler": float,
    "save_every": int,
    "seed": int,
    "lora_r": int,
    "lora_alpha": float,
    "resampler_width": int,
    "resampler_heads": int,
    "resampler_layers": int,
    "resampler_ff_mult": int,
    "warmup_steps": int,
    "schedule": str,
}


class QwenAdapterTrain:
    """Distils the connected SDXL CLIP into a qwenclip adapter, step by step."""

    @classmethod
    def INPUT_TYPES(cls):
        d = train_defaults()
        v = d.get("vision", {})
        return {
            "required": {
                "encoder": (
                    ENCODER,
                    {
                        "tooltip": "The Qwen3 base model to train on (its adapter is the starting point when init is 'encoder adapter')."
                    },
                ),
                "clip": (
                    "CLIP",
                    {
                        "tooltip": "The SDXL checkpoint's CLIP: the teacher whose conditioning the adapter learns to reproduce."
                    },
                ),
                "adapter_name": (
                    "STRING",
                    {
                        "default": "my_adapter",
                        "tooltip": "The run folder under models/qwenclip (checkpoint, adapter/, metrics.jsonl, loss.png); training resumes when it holds a checkpoint, and never writes over an adapter without one.",
                    },
                ),
                "captions_folder": (
                    caption_folders(),
                    {
                        "default": NO_FOLDER,
                        "tooltip": "A folder under ComfyUI's input directory: each .txt/.caption file beside an image of the same name is that image's caption; other .txt/.caption files hold one caption per line (# starts a comment); .jsonl and .csv files hold a caption column. The same rule as `qwenclip cache-targets`.",
                    },
                ),
                "captions_text": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "More captions, one per line (# starts a comment).",
                    },
                ),
                "steps": _widget(
                    "INT",
                    d,
                    "steps",
                    min=1,
                    max=1_000_000,
                    tooltip="Optimizer steps in total. A resumed run continues up to this; a larger value extends a finished run (the learning-rate schedule is re-planned over it).",
                ),
                "batch_size": _widget("INT", d, "batch_size", min=1, max=256),
                "grad_accum": _widget(
                    "INT", d, "grad_accum", min=1, max=256, tooltip="Micro-batches per optimizer step."
                ),
                "lr_lora": _widget("FLOAT", d, "lr_lora", min=0.0, max=1.0, step=1e-5, round=False),
                "lr_resampler": _widget("FLOAT", d, "lr_resampler", min=0.0, max=1.0, step=1e-5, round=False),
                "save_every": _widget(
                    "INT",
                    d,
                    "save_every",
                    min=1,
                    max=1_000_000,
                    tooltip="Checkpoint + adapter every N optimizer steps (and on Cancel, and at the end).",
                ),
                "seed": _widget(
                    "INT",
                    d,
                    "seed",
                    min=0,
                    max=0xFFFFFFFF,
                    control_after_generate=False,
                    tooltip="Caption order, held-out split and initial weights. Fixed when a run starts: a resumed run keeps its own.",
                ),
            },
            "optional": {
                "init": (
                    ["encoder adapter", "scratch"],
                    {
                        "default": "encoder adapter",
                        "tooltip": "A new adapter starts from the encoder's adapter (when it has one) or from scratch.",
                    },
                ),
                "lora_r": _widget("INT", d, "lora_r", min=1, max=1024),
                "lora_alpha": _widget("FLOAT", d, "lora_alpha", min=0.0, max=4096.0, step=1.0),
                "resampler_width": _widget(
                    "INT",
                    d,
                    "resampler_width",
                    min=0,
                    max=8192,
                    step=8,
                    tooltip="0: derived from the base model's width (its hidden size, at most 2048), so a small base gets a small resampler.",
                ),
                "resampler_heads": _widget(
                    "INT", d, "resampler_heads", min=0, max=128, tooltip="0: the width / 64, at most 16."
                ),
                "resampler_layers": _widget("INT", d, "resampler_layers", min=1, max=64),
                "resampler_ff_mult": _widget("INT", d, "resampler_ff_mult", min=1, max=16),
                "warmup_steps": _widget("INT", d, "warmup_steps", min=0, max=1_000_000),
                "schedule": (["cosine", "constant"], {"default": d.get("schedule", "cosine")}),
                "objective": (
                    ["mse", "vision", "mixed"],
                    {
                        "default": d.get("objective", "mse"),
                        "tooltip": "mse: match the CLIP's conditioning. vision: match what the connected MODEL predicts with it, along the teacher's own sampling trajectories (no images needed; guards against different prompts collapsing together). mixed: both.",
                    },
                ),
                "model": (
                    "MODEL",
                    {
                        "tooltip": "The SDXL checkpoint's MODEL, with whatever the graph applied (LoRAs, FreeU): the judge of the vision and mixed objectives."
                    },
                ),
                "resolution": _widget(
                    "INT",
                    v,
                    "resolution",
                    min=64,
                    max=4096,
                    step=64,
                    tooltip="Vision: the image size the trajectories are sampled at.",
                ),
                "denoise_steps": _widget(
                    "INT",
                    v,
                    "denoise_steps",
                    min=1,
                    max=1000,
                    tooltip="Vision: denoising steps per trajectory, one training step each.",
                ),
                "guidance_min": _widget("FLOAT", v, "guidance_min", min=0.0, max=30.0, step=0.5),
                "guidance_max": _widget(
                    "FLOAT",
                    v,
                    "guidance_max",
                    min=0.0,
                    max=30.0,
                    step=0.5,
                    tooltip="Vision: each trajectory draws its CFG scale from guidance_min..guidance_max.",
                ),
                "scheduler": (
                    _scheduler_names(),
                    {
                        "default": "normal",
                        "tooltip": "Vision: the sigmas the trajectories walk (Euler steps), as in KSampler.",
                    },
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = (ENCODER, "IMAGE")
    RETURN_NAMES = ("encoder", "loss_curve")
    FUNCTION = "train"
    OUTPUT_NODE = True
    CATEGORY = "qwenclip"
    DESCRIPTION = "Trains a qwenclip adapter so the Qwen encoder reproduces the connected SDXL CLIP's conditioning. Saves into models/qwenclip/<adapter_name>, resumes from there, stops cleanly on Cancel."

    def train(
        self,
        encoder,
        clip,
        adapter_name,
        captions_folder,
        captions_text,
        steps,
        batch_size,
        grad_accum,
        lr_lora,
        lr_resampler,
        save_every,
        seed,
        init="encoder adapter",
        lora_r=None,
        lora_alpha=None,
        resampler_width=None,
        resampler_heads=None,
        resampler_layers=None,
        resampler_ff_mult=None,
        warmup_steps=None,
        schedule=None,
        objective=None,
        model=None,
        resolution=None,
        denoise_steps=None,
        guidance_min=None,
        guidance_max=None,
        scheduler="normal",
        unique_id=None,
    ):
        _finite(
            lr_lora=lr_lora,
            lr_resampler=lr_resampler,
            lora_alpha=lora_alpha,
            guidance_min=guidance_min,
            guidance_max=guidance_max,
        )
        library.get()
        name = _adapter_name_ok(adapter_name)
        paths = []
        if captions_folder and captions_folder != NO_FOLDER:
            paths.append(os.path.join(folder_paths.get_input_directory(), captions_folder))
        captions = {"paths": paths, "text": captions_text or None}
        given = dict(
            steps=steps,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lr_lora=lr_lora,
            lr_resampler=lr_resampler,
            save_every=save_every,
            seed=seed,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            resampler_width=resampler_width,
            resampler_heads=resampler_heads,
            resampler_layers=resampler_layers,
            resampler_ff_mult=resampler_ff_mult,
            warmup_steps=warmup_steps,
            schedule=schedule,
        )
        # Settings left unset take the library's defaults (or, resuming, the run's own).
        config = {k: TRAIN_WIDGETS[k](v) for k, v in given.items() if v is not None}
        vision = dict(
            resolution=resolution,
            denoise_steps=denoise_steps,
            guidance_min=guidance_min,
            guidance_max=guidance_max,
        )
        vision = {k: v for k, v in vision.items() if v is not None}
        if vision:
            config["vision"] = vision
        judge = None
        if objective is not None:
            config["objective"] = objective
        if objective in ("vision", "mixed"):
            if model is None:
                raise ValueError(
                    f"qwenclip: the {objective} objective needs a judge: connect the SDXL "
                    "checkpoint's MODEL to Qwen Adapter Train's model input"
                )
            from .vision import ComfyJudge

            judge = ComfyJudge(model, scheduler)
        out_dir = Path(_paths(MODELS_KEY)[0]) / name
        hooks = _ComfyHooks(int(steps), unique_id)
        return training.train(
            encoder,
            clip,
            out_dir,
            captions,
            config,
            init_from_encoder_adapter=(init == "encoder adapter"),
            hooks=hooks,
            judge=judge,
        )


from .demo import QwenDemoTinySDXL  # noqa: E402  (the offline demo's checkpoint)

NODE_CLASS_MAPPINGS = {
    "QwenEncoderLoader": QwenEncoderLoader,
    "QwenTextEncodeSDXL": QwenTextEncodeSDXL,
    "QwenAdapterTrain": QwenAdapterTrain,
    "QwenAdapterSelect": QwenAdapterSelect,
    "QwenDemoTinySDXL": QwenDemoTinySDXL,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "QwenEncoderLoader": "Qwen Encoder Loader",
    "QwenTextEncodeSDXL": "Qwen Text Encode (SDXL)",
    "QwenAdapterTrain": "Qwen Adapter Train",
    "QwenAdapterSelect": "Qwen Adapter Select",
    "QwenDemoTinySDXL": "Tiny SDXL (offline demo)",
}
