"""Model construction from a GenConfig: one place that maps config fields to JointDenoiser arguments."""

from __future__ import annotations

from geodiff4d.gen.config import GenConfig
from geodiff4d.gen.denoiser import JointDenoiser
from geodiff4d.gen.latents import PixelLatents, VaeLatents, make_latents


def model_kwargs(cfg: GenConfig, stage: int, latent_channels: int, latent_downscale: int) -> dict:
    m = cfg.model
    if cfg.data.resolution % latent_downscale:
        raise ValueError(
            f"data.resolution {cfg.data.resolution} is not divisible by the latent downscale {latent_downscale}"
        )
    return dict(
        backbone=m.unet.model_dump(),
        sample_size=cfg.data.resolution // latent_downscale,
        latent_channels=latent_channels,
        latent_downscale=latent_downscale,
        pose_injection=m.pose_injection,
        pose_guider_channels=m.pose_guider_channels,
        expression_tokens=m.expression_tokens,
        expression_dim=m.expression_dim,
        expression_channels=m.expression_channels,
        joint_normals=m.joint_normals,
        domain_attention=m.domain_attention,
        temporal=cfg.train.stage(stage).frames > 1,
        temporal_heads=m.temporal_heads,
    )


def build_codec(cfg: GenConfig) -> PixelLatents | VaeLatents:
    return make_latents(cfg.model.latents, cfg.model.vae or cfg.model.pretrained)


def build_model(cfg: GenConfig, stage: int, codec, from_pretrained: bool = True) -> JointDenoiser:
    """A fresh model for `stage`; SD-initialized when the config names `pretrained` and from_pretrained is set."""
    kwargs = model_kwargs(cfg, stage, codec.channels, codec.downscale)
    if cfg.model.pretrained and from_pretrained:
        return JointDenoiser.from_stable_diffusion(cfg.model.pretrained, **kwargs)
    return JointDenoiser(**kwargs)
