"""The training loop behind Qwen Adapter Train: captions, teacher targets from ComfyUI's CLIP,
one library step at a time, saves, cancel and resume, and the loss-curve picture."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from . import library
from .encoder import QwenEncoder

log = logging.getLogger("qwenclip")

CHECKPOINT = "checkpoint.safetensors"
STATE = "train_state.json"
CAPTION_SUFFIXES = (".txt", ".caption")


# -- captions ---------------------------------------------------------------------------------


def read_captions(folder: str | None, text: str | None) -> list[str]:
    """Every non-empty line of every .txt/.caption file under `folder` (sorted by path), then
    every non-empty line of `text`. Lines starting with '#' are comments."""
    out: list[str] = []
    if folder:
        root = Path(folder)
        if not root.is_dir():
            raise ValueError(f"qwenclip: captions folder {root} does not exist")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in CAPTION_SUFFIXES and p.is_file())
        for f in files:
            out += _lines(f.read_text(encoding="utf-8", errors="replace"))
    if text:
        out += _lines(text)
    return out


def _lines(text: str) -> list[str]:
    return [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]


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
            self.cache[caption] = hit
        return hit

    def batch(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.targets(c) for c in captions]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class Order:
    """Caption order: a fresh seeded shuffle per epoch, resumable from a micro-batch count."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def batch(self, micro: int, batch_size: int) -> list[int]:
        out = []
        start = micro * batch_size
        for k in range(start, start + batch_size):
            epoch, i = divmod(k, self.n)
            perm = list(range(self.n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
            out.append(perm[i])
        return out


# -- the loss curve ---------------------------------------------------------------------------


def loss_curve(losses: list[tuple[int, float]], width: int = 640, height: int = 360, title: str = "") -> np.ndarray:
    """An RGB uint8 picture [H, W, 3] of loss against optimizer step (log scale when the loss
    spans more than a decade). PIL when available, else plain numpy lines."""
    img = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 64, 16, 28, 36
    pw, ph = width - left - right, height - top - bottom
    pts = [(s, v) for s, v in losses if math.isfinite(v)]
    ys = [v for _, v in pts]
    log_y = bool(ys) and min(ys) > 0 and max(ys) / min(ys) > 10
    f = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    if pts:
        x0, x1 = pts[0][0], max(pts[-1][0], pts[0][0] + 1)
        lo, hi = min(f(v) for v in ys), max(f(v) for v in ys)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        xy = [
            (left + (s - x0) / (x1 - x0) * pw, top + (1 - (f(v) - lo) / (hi - lo)) * ph)
            for s, v in pts
        ]
    else:
        x0, x1, lo, hi, xy = 0, 1, 0.0, 1.0, []
    fmt = (lambda t: f"{10 ** t:.3g}") if log_y else (lambda t: f"{t:.3g}")
    try:
        from PIL import Image, ImageDraw

        im = Image.fromarray(img)
        d = ImageDraw.Draw(im)
        d.rectangle([left, top, left + pw, top + ph], outline=(160, 160, 160))
        for k in range(5):
            y = top + k * ph / 4
            d.line([left, y, left + pw, y], fill=(230, 230, 230))
            d.text((4, y - 6), fmt(hi - k * (hi - lo) / 4), fill=(60, 60, 60))
        d.text((left, height - bottom + 8), f"step {x0}", fill=(60, 60, 60))
        d.text((left + pw - 70, height - bottom + 8), f"step {x1}", fill=(60, 60, 60))
        label = title or "loss"
        if pts:
            label += f"   last {pts[-1][1]:.4g} at step {pts[-1][0]}" + ("   (log scale)" if log_y else "")
        d.text((left, 8), label, fill=(20, 20, 20))
        if len(xy) > 1:
            d.line(xy, fill=(200, 40, 40), width=2)
        elif xy:
            x, y = xy[0]
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(200, 40, 40))
        return np.asarray(im, dtype=np.uint8).copy()
    except ImportError:
        img[top, left : left + pw] = 160
        img[top + ph, left : left + pw] = 160
        img[top : top + ph, left] = 160
        img[top : top + ph, left + pw] = 160
        for (xa, ya), (xb, yb) in zip(xy, xy[1:]):
            n = int(max(abs(xb - xa), abs(yb - ya))) + 1
            for t in np.linspace(0, 1, n):
                img[int(ya + (yb - ya) * t), int(xa + (xb - xa) * t)] = (200, 40, 40)
        return img


def to_image_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> ComfyUI IMAGE float [1, H, W, 3] in 0..1."""
    return torch.from_numpy(rgb.astype(np.float32) / 255.0)[None]


# -- the run ------------------------------------------------------------------------------------


def _write_json_atomic(path: Path, value) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def read_state(folder: Path) -> dict:
    p = folder / STATE
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except ValueError:
            log.warning("qwenclip: %s is unreadable; the loss history starts over", p)
    return {}


class Run:
    """One call of Qwen Adapter Train. `hooks` are ComfyUI's (progress, interrupt, text)."""

    def __init__(self, encoder: QwenEncoder, clip, captions: list[str], out_dir: Path,
                 steps: int, batch_size: int, grad_accum: int, save_every: int, seed: int,
                 config: dict, init_from_encoder_adapter: bool, hooks):
        if not captions:
            raise ValueError("qwenclip: no captions: give a captions folder under the input "
                             "directory (.txt files, one caption per line) or captions text")
        self.encoder = encoder
        self.clip = clip
        self.captions = captions
        self.out_dir = Path(out_dir)
        self.steps = steps
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.save_every = max(1, save_every)
        self.seed = seed
        self.config = config
        self.init_from_encoder_adapter = init_from_encoder_adapter
        self.hooks = hooks
        self.lib = library.get()
        self.losses: list[tuple[int, float]] = []
        self.micro = 0
        self.step = 0
        self.saved_step = -1
        self.trainer: int | None = None

    # checkpoint + adapter + sidecar (loss history, data position)
    def save(self, why: str) -> None:
        if self.trainer is None or self.saved_step == self.step:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.lib.trainer_save(self.trainer, str(self.out_dir / CHECKPOINT))
        self.lib.trainer_save_adapter(self.trainer, str(self.out_dir))
        _write_json_atomic(self.out_dir / STATE, {
            "step": self.step,
            "micro": self.micro,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "seed": self.seed,
            "captions": len(self.captions),
            "losses": self.losses,
        })
        self.saved_step = self.step
        log.info("qwenclip: saved %s at step %d (%s)", self.out_dir, self.step, why)

    def _start(self) -> None:
        base = self.encoder.base
        ckpt = self.out_dir / CHECKPOINT
        with base.lock:
            if ckpt.is_file():
                self.trainer = self.lib.trainer_load(base.handle, str(ckpt))
                state = read_state(self.out_dir)
                self.step = int(state.get("step", 0))
                self.micro = int(state.get("micro", self.step * self.grad_accum))
                self.losses = [tuple(x) for x in state.get("losses", []) if x[0] <= self.step]
                self.saved_step = self.step
                log.info("qwenclip: resuming %s from step %d", self.out_dir, self.step)
            else:
                base.select(self.encoder.adapter if self.init_from_encoder_adapter else None)
                cfg = {**self.config, "total_steps": self.steps, "grad_accum": self.grad_accum,
                       "seed": self.seed}
                self.trainer = self.lib.trainer_new(base.handle, cfg)

    def run(self) -> tuple[QwenEncoder, torch.Tensor]:
        hooks = self.hooks
        t0 = time.perf_counter()
        self._start()
        try:
            dims = self._dims()
            teacher = Teacher(self.clip, dims)
            order = Order(len(self.captions), self.seed)
            hooks.progress(self.step, self.steps, None)
            while self.step < self.steps:
                hooks.check_interrupt()
                idx = order.batch(self.micro, self.batch_size)
                batch = [self.captions[i] for i in idx]
                embeds, pooled = teacher.batch(batch)
                r = self.lib.trainer_step(
                    self.trainer, batch, embeds.data_ptr(), embeds.numel(), pooled.data_ptr(), pooled.numel()
                )
                self.micro += 1
                if not r["optimizer_stepped"]:
                    continue
                self.step = int(r["step"])
                self.losses.append((self.step, float(r["loss"])))
                hooks.text(self.step, f"step {self.step}/{self.steps}  loss {r['loss']:.5f}  "
                           f"(embeds {r['loss_embeds']:.5f}, pooled {r['loss_pooled']:.5f})")
                if self.step % self.save_every == 0 or self.step >= self.steps:
                    self.save("save_every" if self.step < self.steps else "done")
                preview = None
                if hooks.wants_preview(self.step, self.steps):
                    preview = loss_curve(self.losses, title=self.out_dir.name)
                hooks.progress(self.step, self.steps, preview)
            self.save("done")
        except BaseException as e:
            # Cancel (ComfyUI raises from the progress bar), a non-finite loss (nothing was
            # changed by that step) or any other failure: keep what was learned so far.
            try:
                self.save(f"stopped: {type(e).__name__}")
            except Exception as e2:
                log.error("qwenclip: could not save after %s: %s", type(e).__name__, e2)
            raise
        finally:
            self._free()
        if teacher.truncated:
            log.warning("qwenclip: %d captions were longer than one CLIP chunk (75 tokens): "
                        "the teacher's first chunk was used", teacher.truncated)
        log.info("qwenclip: trained %s to step %d in %.1f s", self.out_dir, self.step,
                 time.perf_counter() - t0)
        image = to_image_tensor(loss_curve(self.losses, title=self.out_dir.name))
        return self.encoder.with_adapter(str(self.out_dir), label=self.out_dir.name), image

    def _dims(self) -> tuple[int, int, int]:
        # The trainer's target shape: SDXL unless told otherwise.
        d = self.config.get("dims") or {"seq": 77, "embed": 2048, "pooled": 1280}
        return d["seq"], d["embed"], d["pooled"]

    def _free(self) -> None:
        t, self.trainer = self.trainer, None
        if t is not None:
            self.lib.trainer_free(t)
