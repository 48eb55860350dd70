"""PyTorch reference for the qwenclip Perceiver Resampler.

Follows docs/adapter-format.md to the letter: module/parameter names are chosen so that
`state_dict()` keys are exactly the tensor names in the doc (`proj_in.weight`, `latents`,
`layers.{i}.attn.to_q.weight`, ...). Nothing here is clever on purpose: it is the oracle the
Rust implementation is compared against.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ResamplerConfig:
    input_dim: int = 2560
    width: int = 2048
    heads: int = 16
    ff_mult: int = 4
    layers: int = 4
    num_latents: int = 77
    output_dim: int = 2048
    pooled_dim: int = 1280
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.width % self.heads != 0:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, s: str) -> "ResamplerConfig":
        return cls(**json.loads(s))


class Attention(nn.Module):
    """Latents-as-queries cross attention. No biases on any projection (per the doc)."""

    def __init__(self, cfg: ResamplerConfig) -> None:
        super().__init__()
        w = cfg.width
        self.heads = cfg.heads
        self.to_q = nn.Linear(w, w, bias=False)
        self.to_k = nn.Linear(w, w, bias=False)
        self.to_v = nn.Linear(w, w, bias=False)
        self.to_out = nn.Linear(w, w, bias=False)

    def forward(self, l: torch.Tensor, kv: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        # l: [B,N,W] normed latents; kv: [B,T+N,W]; key_bias: [B,T+N] (0 or -inf).
        b, n, w = l.shape
        h = self.heads
        d = w // h

        def split(x: torch.Tensor) -> torch.Tensor:  # [B,S,W] -> [B,h,S,d]
            return x.view(b, x.shape[1], h, d).transpose(1, 2)

        q, k, v = split(self.to_q(l)), split(self.to_k(kv)), split(self.to_v(kv))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # [B,h,N,T+N]
        # Broadcast the per-key bias over heads and queries. The latent keys are never masked,
        # so every row has at least N finite entries and softmax never sees an all -inf row
        # (this is what makes an empty prompt valid).
        scores = scores + key_bias[:, None, None, :]
        a = scores.softmax(dim=-1)
        out = (a @ v).transpose(1, 2).reshape(b, n, w)
        return self.to_out(out)


class FeedForward(nn.Module):
    def __init__(self, cfg: ResamplerConfig) -> None:
        super().__init__()
        w = cfg.width
        self.norm = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(w, w * cfg.ff_mult)
        self.fc2 = nn.Linear(w * cfg.ff_mult, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # approximate="none" = exact erf GELU, as the doc requires (not the tanh approximation).
        return self.fc2(F.gelu(self.fc1(self.norm(x)), approximate="none"))


class Block(nn.Module):
    def __init__(self, cfg: ResamplerConfig) -> None:
        super().__init__()
        self.norm_media = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.norm_latents = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ff = FeedForward(cfg)

    def forward(self, x: torch.Tensor, lat: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        m = self.norm_media(x)
        l = self.norm_latents(lat)
        kv = torch.cat([m, l], dim=1)
        lat = lat + self.attn(l, kv, key_bias)
        lat = lat + self.ff(lat)
        return lat


class PerceiverResampler(nn.Module):
    def __init__(self, cfg: ResamplerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.proj_in = nn.Linear(cfg.input_dim, w)
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, w))
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.layers)])
        self.norm_out = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.proj_out = nn.Linear(w, cfg.output_dim)
        self.pooled_norm = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.pooled_proj = nn.Linear(w, cfg.pooled_dim)

    def forward(
        self, hidden: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: [B,T,input_dim]; mask: [B,T] (1 = token, 0 = padding), default all ones.

        Returns (prompt_embeds [B,N,output_dim], pooled [B,pooled_dim]).
        """
        b, t, _ = hidden.shape
        if mask is None:
            mask = torch.ones(b, t, dtype=torch.long, device=hidden.device)
        x = self.proj_in(hidden)
        lat = self.latents.unsqueeze(0).expand(b, -1, -1)
        n = lat.shape[1]

        # Additive key bias over concat([media, latents]): -inf on padded media keys, 0 on
        # real media keys and on all latent keys.
        media_bias = torch.zeros(b, t, dtype=x.dtype, device=x.device)
        media_bias = media_bias.masked_fill(mask == 0, float("-inf"))
        latent_bias = torch.zeros(b, n, dtype=x.dtype, device=x.device)
        key_bias = torch.cat([media_bias, latent_bias], dim=1)

        for block in self.layers:
            lat = block(x, lat, key_bias)

        prompt_embeds = self.proj_out(self.norm_out(lat))
        # Pooled comes from the mean of the final latents BEFORE norm_out, through its own norm.
        pooled = self.pooled_proj(self.pooled_norm(lat.mean(dim=1)))
        return prompt_embeds, pooled
