"""`TrainingRun`: the library's whole training loop in one folder (captions, data order,
evaluation, atomic checkpoints, exact resume), answered by the host with teacher targets
(`supply`) or, for a host-judged vision run, with the gradient of its loss
(`supply_gradient`). docs/c-api.md describes the protocol and the spec."""

from __future__ import annotations

import os
from collections.abc import Sequence

from . import _native
from ._buffers import float_buffer
from ._closing import Closing
from .encoder import Encoder


def train_defaults() -> dict:
    """Every training setting with its default (the library's TrainConfig)."""
    return _native.get().train_defaults()


def read_captions(paths: Sequence[str | os.PathLike[str]], text: str | None = None) -> dict:
    """A caption set read by the library's caption rule: {"captions": [...], counts...}."""
    return _native.get().captions_read([os.fspath(p) for p in paths], text)


class TrainingRun(Closing):
    """One run on `encoder` (kept alive by the run). `spec` is run_open's JSON (out folder,
    captions, settings, judge); a folder holding a checkpoint resumes."""

    def __init__(self, encoder: Encoder, spec: dict):
        self.encoder = encoder
        self.library = encoder.library
        self._handle: int | None = self.library.run_open(encoder.handle, spec)

    @property
    def handle(self) -> int:
        if self._handle is None:
            raise ValueError("qwenclip: this training run was closed")
        return self._handle

    def state(self) -> dict:
        """What the run wants next: {"done", "step", "captions", "trajectory", "events", ...}."""
        return self.library.run_state(self.handle)

    def supply(self, embeds, pooled) -> None:
        """The teacher's targets for the captions `state()` asked for: [n, S, E] and [n, P]."""
        self.library.run_supply(self.handle, *float_buffer(embeds, "embeds"), *float_buffer(pooled, "pooled"))

    def noise(self, out, channels: int = 4) -> None:
        """The pending trajectory's starting noise (standard normal) into `out` [n, C, h, w]."""
        self.library.run_noise(self.handle, channels, *float_buffer(out, "noise"))

    def conditioning(self, embeds, pooled) -> None:
        """The student's conditioning for the pending batch of a host-judged run, into
        `embeds` [n, S, E] and `pooled` [n, P]."""
        self.library.run_conditioning(
            self.handle, *float_buffer(embeds, "embeds"), *float_buffer(pooled, "pooled")
        )

    def supply_gradient(self, targets, grads, loss: float) -> None:
        """A host-judged step: the teacher's targets (embeds, pooled), d(loss)/d(student
        conditioning) (embeds, pooled) and the loss value."""
        (te, tp), (ge, gp) = targets, grads
        self.library.run_supply_gradient(
            self.handle,
            (float_buffer(te, "target embeds"), float_buffer(tp, "target pooled")),
            (float_buffer(ge, "embeds gradient"), float_buffer(gp, "pooled gradient")),
            loss,
        )

    def save(self) -> None:
        """Checkpoints now (atomically) and exports the adapter."""
        self.library.run_save(self.handle)

    def loss_image(self):
        """The run's loss picture, a uint8 numpy array [H, W, 3]."""
        return self.library.run_loss_image(self.handle)

    def close(self) -> None:
        h, self._handle = self._handle, None
        if h is not None:
            self.library.run_free(h)
