"""Temporal attention over the frames of a clip (stage 2), starting as the identity.

Each spatial token attends to itself across T frames; the output projection is zero-initialized, so
adding the layers to a trained stage-1 model changes nothing until training moves them.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.attention_processor import Attention
from torch import nn


def frame_position_embedding(frames: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal embedding of frame index -> [T, dim] (lets attention tell frame order)."""
    half = dim // 2
    freq = torch.exp(
        -math.log(10_000.0) * torch.arange(half, device=device, dtype=torch.float32) / max(half, 1)
    )
    angles = torch.arange(frames, device=device, dtype=torch.float32)[:, None] * freq[None]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros(frames, 1, device=device)], dim=1)
    return emb.to(dtype)


class TemporalAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        heads = max(1, min(heads, dim // 8))
        while dim % heads:
            heads -= 1
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(query_dim=dim, heads=heads, dim_head=dim // heads, bias=False)
        nn.init.zeros_(self.attn.to_out[0].weight)
        nn.init.zeros_(self.attn.to_out[0].bias)

    def forward(self, tokens: torch.Tensor, frames: int) -> torch.Tensor:
        """tokens [(G*T), L, C] (frames innermost among groups) -> residual update of the same shape."""
        gt, length, dim = tokens.shape
        x = (
            tokens.view(gt // frames, frames, length, dim).permute(0, 2, 1, 3).reshape(-1, frames, dim)
        )  # [G*L, T, C]
        x = x + frame_position_embedding(frames, dim, x.device, x.dtype)
        x = self.attn(self.norm(x))
        return x.view(gt // frames, length, frames, dim).permute(0, 2, 1, 3).reshape(gt, length, dim)
