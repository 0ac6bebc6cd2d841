"""Poseless expression encoder E_mot: a driving face crop -> a few low-dimensional 1D latent tokens.

Global pooling before the bottleneck discards spatial layout, so the tokens cannot carry where the face
is or how it is posed; trained on cross-view pairs by the denoising loss alone, they learn expression only.
The low-dimensional tokens are the "expression latents" handed to reconstruction; a linear map lifts
them to the UNet's cross-attention width. A learned null token set stands in for a dropped expression
(classifier-free guidance).
"""

from __future__ import annotations

import torch
from torch import nn


class ExpressionEncoder(nn.Module):
    def __init__(
        self,
        num_tokens: int,
        token_dim: int,
        context_dim: int,
        channels: tuple[int, ...] = (32, 64, 128, 256),
    ):
        super().__init__()
        self.num_tokens, self.token_dim = num_tokens, token_dim
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.bottleneck = nn.Linear(c_in, num_tokens * token_dim)
        self.to_context = nn.Linear(token_dim, context_dim)
        self.null_tokens = nn.Parameter(torch.zeros(num_tokens, token_dim))

    def encode(self, crops: torch.Tensor) -> torch.Tensor:
        """crops [N, 3, r, r] in [0,1] -> expression latents [N, num_tokens, token_dim]."""
        pooled = self.features(crops * 2 - 1).mean(dim=(2, 3))  # [N, C]: spatial layout discarded
        return self.bottleneck(pooled).view(-1, self.num_tokens, self.token_dim)

    def context(self, latents: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """latents [N, K, d] -> cross-attention tokens [N, K, context_dim]; drop [N] bool selects null tokens."""
        if drop is not None:
            latents = torch.where(drop[:, None, None], self.null_tokens.expand_as(latents), latents)
        return self.to_context(latents)

    def null_context(self, n: int) -> torch.Tensor:
        return self.to_context(self.null_tokens).expand(n, -1, -1)
