"""Reference network: a UNet twin of the denoiser that reads the reference image once per sample.

ReferenceNet style (Animate Anyone): run on the clean reference latent (plus its pose map) at timestep 0,
it records the input tokens of every self-attention layer; the denoiser's layer of the same name joins
them to its keys and values, so identity and appearance flow in at every resolution. Built with the
denoiser's UNet config so SD-1.5 weights initialize both.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from geodiff4d.gen.domain_attention import install_reference_processors


class ReferenceNet(nn.Module):
    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet
        install_reference_processors(self.unet)

    def forward(self, sample: torch.Tensor, context: torch.Tensor) -> dict[str, torch.Tensor]:
        """sample [B, C_in, h, w] (pose-joined reference latent), context [B, K, C] -> {layer: tokens [B, L, C]}."""
        bank: dict[str, torch.Tensor] = {}
        b = sample.shape[0]
        zeros = torch.zeros(b, dtype=torch.long, device=sample.device)
        self.unet(
            sample,
            zeros,
            encoder_hidden_states=context,
            class_labels=zeros,
            cross_attention_kwargs={"reference_bank": bank},
        )
        return bank
