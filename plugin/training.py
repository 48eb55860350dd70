"""Qwen Adapter Train's glue: the library owns the training run (captions, data order,
evaluation, checkpoints, resume, the loss picture); this file only answers it with targets
from ComfyUI's CLIP (torch) and reports progress, cancel and the picture to ComfyUI."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from . import library
from .encoder import QwenEncoder

log = logging.getLogger("qwenclip")

# The library's caption files (src/data/captions.rs), for listing folders that hold some.
CAPTION_SUFFIXES = (".txt", ".caption", ".jsonl", ".csv")
# Teacher targets kept in memory for the run (a held-out caption is asked for at every
# evaluation): about 0.6 MB each for SDXL, so at most ~1.3 GB.
TEACHER_CACHE_ENTRIES = 2048


def escape_weights(caption: str) -> str:
    """Captions are plain text: escape ComfyUI's prompt-weight syntax so the teacher CLIP reads
    '(' and ')' literally, as the Qwen student does."""
    return caption.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


class Teacher:
    """Targets from the checkpoint's own CLIP, cached per caption for the run."""

    def __init__(self, clip, dims: tuple[int, int, int]):
        self.clip = clip
        self.seq, self.embed, self.pooled = dims
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.truncated = 0

    def targets(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self.cache.get(caption)
        if hit is None:
            tokens = self.clip.tokenize(escape_weights(caption))
            cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
            cond = cond.detach().to("cpu", torch.float32)
            pooled = pooled.detach().to("cpu", torch.float32)
            if cond.ndim != 3 or cond.shape[-1] != self.embed or cond.shape[1] < self.seq:
                raise ValueError(
                    f"qwenclip: the CLIP gives conditioning of shape {tuple(cond.shape)}, the "
                    f"adapter needs [1, {self.seq}, {self.embed}]: connect the CLIP of an SDXL "
                    "checkpoint"
                )
            if pooled.shape[-1] != self.pooled:
                raise ValueError(
                    f"qwenclip: the CLIP gives a pooled output of shape {tuple(pooled.shape)}, "
                    f"the adapter needs [1, {self.pooled}]: connect the CLIP of an SDXL checkpoint"
                )
            if cond.shape[1] > self.seq:  # long caption: ComfyUI concatenated 77-token chunks
                self.truncated += 1
            hit = (cond[0, : self.seq].contiguous(), pooled[0].contiguous())
            if len(self.cache) < TEACHER_CACHE_ENTRIES:
                self.cache[caption] = hit
        return hit

    def batch(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.targets(c) for c in captions]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def to_image_tensor(rgb) -> torch.Tensor:
    """uint8 [H, W, 3] -> ComfyUI IMAGE float [1, H, W, 3] in 0..1."""
    return torch.from_numpy(rgb.astype("float32") / 255.0)[None]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _describe(event: dict, steps: int) -> str | None:
    if event["kind"] == "step":
        r = event["report"]
        parts = ", ".join(f"{k[5:]} {v:.5f}" for k, v in r.items() if k.startswith("loss_"))
        return f"step {r['step']}/{steps}  loss {r['loss']:.5f}  ({parts})"
    if event["kind"] == "eval":
        m = event["metrics"]
        if not m["count"]:
            return None
        return (
            f"step {event['step']} held-out: MSE embeds {m['mse_embeds']:.5f} pooled "
            f"{m['mse_pooled']:.5f}, cosine {m['cos_tokens']:.4f} ({m['count']} captions)"
        )
    return None


def _judged_step(run, state, teacher: Teacher, judge) -> str:
    """A training batch the MODEL judges: the run's noise and the student's conditioning out,
    the loss and its gradient (and the teacher's targets) back. Returns a progress line."""
    traj = state["trajectory"]
    n, side = len(state["captions"]), traj["resolution"] // 8
    noise = torch.empty((n, 4, side, side))
    run.noise(noise, channels=4)
    student = torch.empty((n, teacher.seq, teacher.embed)), torch.empty((n, teacher.pooled))
    run.conditioning(*student)
    embeds, pooled = teacher.batch(state["captions"])
    ue, up = teacher.targets("")
    loss, ge, gp = judge.step(traj, noise, (embeds, pooled), (ue[None], up[None]), student)
    run.supply_gradient((embeds, pooled), (ge, gp), loss)
    return f"denoising step {traj['step'] + 1}/{traj['denoise_steps']}  vision loss {loss:.5f}"


def train(
    encoder: QwenEncoder,
    clip,
    out_dir: Path,
    captions: dict,
    settings: dict,
    init_from_encoder_adapter: bool,
    hooks,
    judge=None,
) -> tuple[QwenEncoder, torch.Tensor]:
    """One call of Qwen Adapter Train: opens the run in `out_dir` (resuming it when it holds a
    checkpoint), answers it until it is done or ComfyUI cancels, and returns the encoder with
    the trained adapter and the loss picture. `hooks` are ComfyUI's (progress, cancel, text);
    `judge` (vision.ComfyJudge) judges the vision and mixed objectives with the graph's MODEL."""
    # The vision objective differentiates through the MODEL: no inference mode here.
    with torch.inference_mode(False), torch.enable_grad():
        return _train(encoder, clip, out_dir, captions, settings, init_from_encoder_adapter, hooks, judge)


def _train(encoder, clip, out_dir, captions, settings, init_from_encoder_adapter, hooks, judge):
    qwenclip = library.package()
    base = encoder.base
    t0 = time.perf_counter()
    spec = {"out": str(out_dir), "captions": captions, "settings": settings, "resume": "auto"}
    if judge is not None:
        spec["judge"] = "host"
    with base.lock:
        # A new run starts from the encoder's current adapter; a resumed one ignores it.
        base.select(encoder.adapter if init_from_encoder_adapter else None)
        run = qwenclip.TrainingRun(base.encoder, spec)
    teacher = None
    try:
        state = run.state()
        steps = state["steps"]
        for note in state["notes"]:
            log.warning("qwenclip: %s: %s", out_dir.name, note)
            hooks.text(state["step"], note, force=True)
        if state["step"]:
            log.info("qwenclip: resuming %s from step %d", out_dir, state["step"])
        sizes = state["save_sizes"]
        written = (
            f"each save writes {_mib(sizes['adapter_bytes'] + sizes['checkpoint_bytes'])} "
            f"(adapter {_mib(sizes['adapter_bytes'])}, checkpoint {_mib(sizes['checkpoint_bytes'])}) "
            f"into {out_dir}"
        )
        log.info("qwenclip: %s", written)
        hooks.text(state["step"], written, force=True)
        teacher = Teacher(clip, (77, 2048, 1280))
        if judge is not None:
            judge.load()
        hooks.progress(state["step"], steps, None)
        while not state["done"]:
            hooks.check_interrupt()
            if judge is not None and state["need"] == "train":
                line = _judged_step(run, state, teacher, judge)
                hooks.text(state["step"] + 1, f"step {state['step'] + 1}/{steps}  {line}")
            else:
                embeds, pooled = teacher.batch(state["captions"])
                run.supply(embeds, pooled)
            state = run.state()
            for event in state["events"]:
                text = _describe(event, steps)
                if text:
                    hooks.text(state["step"], text, force=event["kind"] == "eval")
            preview = None
            if hooks.wants_preview(state["step"], steps):
                preview = run.loss_image()
            hooks.progress(state["step"], steps, preview)
        image = to_image_tensor(run.loss_image())
    except BaseException as e:
        # Cancel (ComfyUI raises from the progress bar), a non-finite loss (nothing was
        # changed by that step) or any other failure: keep what was learned so far.
        try:
            if run.state()["step"] > 0:
                run.save()
                log.info("qwenclip: saved %s (stopped: %s)", out_dir, type(e).__name__)
        except Exception as e2:
            log.error("qwenclip: could not save after %s: %s", type(e).__name__, e2)
        raise
    finally:
        run.close()
    if teacher is not None and teacher.truncated:
        log.warning(
            "qwenclip: %d captions were longer than one CLIP chunk (75 tokens): "
            "the teacher's first chunk was used",
            teacher.truncated,
        )
    log.info("qwenclip: trained %s to step %d in %.1f s", out_dir, state["step"], time.perf_counter() - t0)
    return encoder.with_adapter(state["adapter"], label=out_dir.name), image
