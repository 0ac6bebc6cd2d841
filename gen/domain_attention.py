"""Attention processors of the joint denoiser: domain-spatial self-attention with reference injection.

The UNet runs on a flat batch ordered (B, D, T) so that convolutions and norms never mix domains. Only
self-attention sees across domains: tokens of the D domains of one frame are concatenated (the same as
concatenating the feature maps along width, since SD's attention has no positional encoding) and attend
jointly. ReferenceNet-style identity transfer joins the reference net's self-attention inputs of the
same layer to the keys and values. Both are attention processors so the UNet itself stays stock diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from geodiff4d.gen.temporal import TemporalAttention


@dataclass(frozen=True)
class Layout:
    """How the UNet's flat batch factorizes: (batch, domains, frames), frames innermost."""

    batch: int
    domains: int
    frames: int


def _attend(attn: Attention, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Multi-head attention of queries [N, Lq, C] over context [N, Lk, C] with attn's projections."""
    n = queries.shape[0]
    q, k, v = attn.to_q(queries), attn.to_k(context), attn.to_v(context)
    head_dim = k.shape[-1] // attn.heads
    q, k, v = (x.view(n, -1, attn.heads, head_dim).transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, Lq, head_dim]
    out = out.transpose(1, 2).reshape(n, -1, attn.heads * head_dim)
    return attn.to_out[1](attn.to_out[0](out))


class CrossAttnProcessor(AttnProcessor2_0):
    """Stock cross-attention that accepts (and ignores) the joint model's kwargs without warnings."""

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        layout: Layout | None = None,
        reference_bank: dict | None = None,
    ):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class ReferenceWriteProcessor(AttnProcessor2_0):
    """Reference net self-attention: plain attention that also records its input tokens [B, L, C]."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        layout: Layout | None = None,
        reference_bank: dict | None = None,
    ):
        if reference_bank is not None:
            reference_bank[self.name] = hidden_states
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class JointSelfAttnProcessor(nn.Module):
    """Denoiser self-attention: domain-spatial attention, reference keys/values, optional temporal layer."""

    def __init__(self, name: str, domain_attention: bool, temporal: TemporalAttention | None = None):
        super().__init__()
        self.name = name
        self.domain_attention = domain_attention
        self.temporal = temporal

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        layout: Layout | None = None,
        reference_bank: dict | None = None,
    ) -> torch.Tensor:
        n, length, dim = hidden_states.shape
        lay = layout or Layout(n, 1, 1)
        b, d, t = lay.batch, lay.domains, lay.frames
        tokens = hidden_states.view(b, d, t, length, dim)
        if self.domain_attention:
            groups = tokens.permute(0, 2, 1, 3, 4).reshape(b * t, d * length, dim)  # [B*T, D*L, C]
        else:
            groups = tokens.reshape(b * d * t, length, dim)  # [B*D*T, L, C]
        context = groups
        if reference_bank is not None and self.name in reference_bank:
            ref = reference_bank[self.name]  # [B, Lr, C]
            per_group = t if self.domain_attention else d * t
            ref = ref[:, None].expand(b, per_group, *ref.shape[1:]).reshape(b * per_group, *ref.shape[1:])
            context = torch.cat([groups, ref], dim=1)
        out = _attend(attn, groups, context)
        if self.domain_attention:
            out = out.view(b, t, d, length, dim).permute(0, 2, 1, 3, 4)  # [B, D, T, L, C]
        out = out.reshape(n, length, dim)
        if self.temporal is not None:
            out = out + self.temporal(hidden_states, t)
        return out


def _set_processors(unet: nn.Module, make_self, make_cross) -> None:
    """Set processors on the UNet's own attention layers (a snapshot, so processors' inner layers are skipped)."""
    layers = [(name, m) for name, m in unet.named_modules() if isinstance(m, Attention)]
    for name, m in layers:
        m.set_processor(make_self(f"{name}.processor", m) if name.endswith("attn1") else make_cross())


def install_denoiser_processors(unet: nn.Module, domain_attention: bool, temporal_heads: int | None) -> None:
    """Every attn1 gets a JointSelfAttnProcessor (with a temporal layer if temporal_heads), attn2 a plain one."""
    _set_processors(
        unet,
        lambda name, m: JointSelfAttnProcessor(
            name, domain_attention, TemporalAttention(m.query_dim, temporal_heads) if temporal_heads else None
        ),
        CrossAttnProcessor,
    )


def install_reference_processors(unet: nn.Module) -> None:
    _set_processors(unet, lambda name, m: ReferenceWriteProcessor(name), CrossAttnProcessor)
