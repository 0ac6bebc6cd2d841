"""The joint image-normal denoiser: P(I_rgb, I_norm | I_ref, M_ref, I_exp, M_drv).

Latents are [B, D, C, T, h, w] with D = 2 domains (RGB, normals; D = 1 with `joint_normals` off). The UNet
is stock diffusers run on a flat (B*D*T) batch, so convolutions and norms never mix domains; the attention
processors of `domain_attention` make self-attention span the domains of a frame and join the reference
net's features; a learned domain embedding (the UNet's class embedding, zero-initialized) tells the
domains apart. Temporal layers (stage 2) live in the self-attention processors and start as identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from torch import nn

from geodiff4d.gen.domain_attention import Layout, install_denoiser_processors
from geodiff4d.gen.expression_encoder import ExpressionEncoder
from geodiff4d.gen.pose_guider import PoseGuider
from geodiff4d.gen.reference_net import ReferenceNet

DOMAINS = ("rgb", "normal")


@dataclass
class Conditions:
    """Everything the denoiser needs besides the noisy latent; computed once per sample, reused every step."""

    reference: dict[str, torch.Tensor]  # layer -> reference tokens [B, L, C]
    context: torch.Tensor  # expression cross-attention tokens [B, T, K, C_ctx]
    expression: torch.Tensor  # expression latents [B, T, K, d]


class JointDenoiser(ModelMixin, ConfigMixin):
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        backbone: dict,
        sample_size: int = 64,
        latent_channels: int = 4,
        latent_downscale: int = 8,
        pose_injection: str = "add",
        pose_guider_channels: tuple[int, ...] = (16, 32, 64, 128),
        expression_tokens: int = 4,
        expression_dim: int = 16,
        expression_channels: tuple[int, ...] = (32, 64, 128, 256),
        joint_normals: bool = True,
        domain_attention: bool = True,
        temporal: bool = False,
        temporal_heads: int = 8,
    ):
        super().__init__()
        self.pose_guider = PoseGuider(
            pose_injection, latent_channels, latent_downscale, tuple(pose_guider_channels)
        )
        in_channels = latent_channels + self.pose_guider.extra_channels()
        self.unet = self._make_unet(backbone, sample_size, in_channels, latent_channels)
        install_denoiser_processors(self.unet, domain_attention, temporal_heads if temporal else None)
        self.reference_net = ReferenceNet(
            self._make_unet(backbone, sample_size, in_channels, latent_channels)
        )
        self.expression_encoder = ExpressionEncoder(
            expression_tokens, expression_dim, backbone["cross_attention_dim"], tuple(expression_channels)
        )

    @staticmethod
    def _make_unet(
        fields: dict, sample_size: int, in_channels: int, out_channels: int
    ) -> UNet2DConditionModel:
        return UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            num_class_embeds=len(DOMAINS),
            **fields,
        )

    @property
    def num_domains(self) -> int:
        return 2 if self.config.joint_normals else 1

    def encode_conditions(
        self,
        ref_latent: torch.Tensor,
        ref_posemap: torch.Tensor,
        driving: torch.Tensor,
        drop_reference: torch.Tensor | None = None,
        drop_expression: torch.Tensor | None = None,
    ) -> Conditions:
        """ref_latent [B, C, h, w], ref_posemap [B, 3, H, W], driving [B, T, 3, r, r]; drop_* [B] bool (CFG)."""
        b, t = driving.shape[:2]
        expression = self.expression_encoder.encode(driving.flatten(0, 1))  # [B*T, K, d]
        drop_exp = None if drop_expression is None else drop_expression.repeat_interleave(t)
        context = self.expression_encoder.context(expression, drop_exp)
        ref_in = self.pose_guider.join(ref_latent, self.pose_guider.encode(ref_posemap))
        if drop_reference is not None:
            ref_in = ref_in * (~drop_reference).to(ref_in.dtype)[:, None, None, None]
        bank = self.reference_net(ref_in, self.expression_encoder.null_context(b))
        return Conditions(
            bank, context.view(b, t, *context.shape[1:]), expression.view(b, t, *expression.shape[1:])
        )

    def denoise(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, posemap: torch.Tensor, cond: Conditions
    ) -> torch.Tensor:
        """noisy [B, D, C, T, h, w], timesteps [B], posemap [B, T, 3, H, W] -> predicted noise [B, D, C, T, h, w]."""
        b, d, c, t, h, w = noisy.shape
        if d != self.num_domains:
            raise ValueError(
                f"latent has {d} domains, model expects {self.num_domains} (joint_normals={self.config.joint_normals})"
            )
        pose = self.pose_guider.encode(posemap.flatten(0, 1))  # [B*T, Cp, h, w]
        pose = (
            pose.view(b, 1, t, *pose.shape[1:]).expand(b, d, t, *pose.shape[1:]).flatten(0, 2)
        )  # [B*D*T, Cp, h, w]
        flat = noisy.permute(0, 1, 3, 2, 4, 5).flatten(0, 2)  # [B*D*T, C, h, w]
        sample = self.pose_guider.join(flat, pose)
        steps = timesteps.view(b, 1, 1).expand(b, d, t).flatten()
        domains = torch.arange(d, device=noisy.device).view(1, d, 1).expand(b, d, t).flatten()
        context = cond.context[:, None].expand(b, d, *cond.context.shape[1:]).flatten(0, 2)  # [B*D*T, K, C]
        out = self.unet(
            sample,
            steps,
            encoder_hidden_states=context,
            class_labels=domains,
            cross_attention_kwargs={"layout": Layout(b, d, t), "reference_bank": cond.reference},
        ).sample
        return out.view(b, d, t, c, h, w).permute(0, 1, 3, 2, 4, 5)  # [B, D, C, T, h, w]

    def forward(
        self,
        noisy,
        timesteps,
        posemap,
        ref_latent,
        ref_posemap,
        driving,
        drop_reference=None,
        drop_expression=None,
    ) -> torch.Tensor:
        cond = self.encode_conditions(ref_latent, ref_posemap, driving, drop_reference, drop_expression)
        return self.denoise(noisy, timesteps, posemap, cond)

    def load_backbone_weights(self, unet_state: dict[str, torch.Tensor], source: str) -> None:
        """Initialize both UNets from an SD-shaped UNet state dict (SD-1.5 in the paper).

        Keys the SD UNet lacks keep their init (temporal layers) or start at zero (the domain embedding, so the
        SD UNet starts undisturbed; from scratch it starts random, telling the domains apart from step one); an
        input conv with extra pose channels gets the SD weights for the latent channels and zeros for the rest.
        """
        for unet in (self.unet, self.reference_net.unet):
            state = dict(unet_state)
            own = unet.state_dict()
            w = state.get("conv_in.weight")
            if w is not None and w.shape != own["conv_in.weight"].shape:
                padded = torch.zeros_like(own["conv_in.weight"])
                padded[:, : w.shape[1]] = w
                state["conv_in.weight"] = padded
            nn.init.zeros_(unet.class_embedding.weight)
            missing, unexpected = unet.load_state_dict(state, strict=False)
            bad = [k for k in missing if not (k.startswith("class_embedding") or ".processor.temporal." in k)]
            if bad or unexpected:
                raise ValueError(
                    f"{source}: UNet weights do not match the configured shape; "
                    f"missing {bad[:5]}, unexpected {list(unexpected)[:5]}"
                )

    @classmethod
    def from_stable_diffusion(cls, folder: str | Path, **config) -> JointDenoiser:
        """Build with `config` and initialize both UNets from a local SD-shaped diffusers folder (unet/)."""
        sd_unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", low_cpu_mem_usage=False)
        model = cls(**config)
        for key in (
            "block_out_channels",
            "down_block_types",
            "up_block_types",
            "layers_per_block",
            "cross_attention_dim",
        ):
            want, have = (
                tuple(v) if isinstance(v, list | tuple) else v
                for v in (model.unet.config[key], sd_unet.config[key])
            )
            if want != have:
                raise ValueError(f"{folder}/unet/config.json: {key} is {have}, the model config says {want}")
        model.load_backbone_weights(sd_unet.state_dict(), f"{folder}/unet")
        return model
