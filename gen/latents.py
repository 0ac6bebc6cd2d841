"""Latent spaces the denoiser works in: SD's AutoencoderKL applied per domain (`vae`), or pixels (`pixel`).

Normal maps are encoded like images ((n+1)/2 in [0,1], background 0), so one frozen VAE serves both
domains. `pixel` is the identity up to scaling to [-1, 1], for small CPU runs without any weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn


class PixelLatents(nn.Module):
    channels, downscale = 3, 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, H, W] in [0,1] -> latents [N, 3, H, W] in [-1,1]."""
        return images * 2 - 1

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents + 1) / 2).clamp(0, 1)


class VaeLatents(nn.Module):
    """A frozen AutoencoderKL (from a local diffusers folder's vae/ subfolder, or a pipeline's component)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.channels = self.vae.config.latent_channels
        self.downscale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scale = self.vae.config.scaling_factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        # the posterior mean, not a sample: encoding stays deterministic without a generator
        return self.vae.encode(images * 2 - 1).latent_dist.mean * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((self.vae.decode(latents / self.scale).sample + 1) / 2).clamp(0, 1)


def make_latents(mode: str, folder: str | Path | None = None) -> PixelLatents | VaeLatents:
    if mode == "pixel":
        return PixelLatents()
    if mode == "vae":
        if folder is None:
            raise ValueError("latents: vae needs a diffusers folder with a vae/ subfolder")
        return VaeLatents(
            AutoencoderKL.from_pretrained(str(folder), subfolder="vae", low_cpu_mem_usage=False)
        )
    raise ValueError(f"latents must be 'vae' or 'pixel', got {mode!r}")


def encode_domains(codec, images: torch.Tensor) -> torch.Tensor:
    """images [B, D, T, 3, H, W] -> latents [B, D, C, T, h, w]."""
    b, d, t = images.shape[:3]
    lat = codec.encode(images.flatten(0, 2))
    return lat.view(b, d, t, *lat.shape[1:]).permute(0, 1, 3, 2, 4, 5)


def decode_domains(codec, latents: torch.Tensor, max_images: int | None = None) -> torch.Tensor:
    """latents [B, D, C, T, h, w] -> images [B, D, T, 3, H, W] in [0,1], decoded ``max_images`` at a time (None:
    all in one call), so the decoder's activations stay bounded however many views and frames there are."""
    b, d, _, t = latents.shape[:4]
    flat = latents.permute(0, 1, 3, 2, 4, 5).flatten(0, 2)  # [B*D*T, C, h, w]
    img = torch.cat([codec.decode(chunk) for chunk in flat.split(max_images or len(flat))])
    return img.view(b, d, t, *img.shape[1:])
