"""Architecture claims of the joint image-normal denoiser (geodiff4d.gen)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from geodiff4d.gen.build import build_codec, build_model, model_kwargs
from geodiff4d.gen.config import GenConfig, load_config
from geodiff4d.gen.denoiser import JointDenoiser

sys.path.insert(0, str(Path(__file__).parent))
from gen_synthetic import one_torch_thread  # noqa: E402, F401

TINY_UNET = dict(
    block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    attention_head_dim=8,
    cross_attention_dim=32,
    norm_num_groups=8,
)
SD15_UNET_PARAMS = 859_520_964  # runwayml/stable-diffusion-v1-5 unet/


def tiny(**kw) -> JointDenoiser:
    torch.manual_seed(0)
    args = dict(
        backbone=TINY_UNET,
        sample_size=16,
        latent_channels=3,
        latent_downscale=1,
        pose_injection="concat",
        expression_tokens=2,
        expression_dim=4,
        expression_channels=(8, 16),
    )
    model = JointDenoiser(**{**args, **kw}).eval()
    with torch.no_grad():  # the domain embedding starts at zero; make it matter
        model.unet.class_embedding.weight.normal_()
    return model


def inputs(t: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        noisy=torch.randn(2, 2, 3, t, 16, 16, generator=g),
        timesteps=torch.tensor([5, 700]),
        posemap=torch.rand(2, t, 3, 16, 16, generator=g),
        ref_latent=torch.randn(2, 3, 16, 16, generator=g),
        ref_posemap=torch.rand(2, 3, 16, 16, generator=g),
        driving=torch.rand(2, t, 3, 16, 16, generator=g),
    )


def with_other_normals(x: dict) -> dict:
    noisy = x["noisy"].clone()
    noisy[:, 1] = torch.randn_like(noisy[:, 1])
    return {**x, "noisy": noisy}


@torch.no_grad()
def test_domain_attention_is_the_only_path_between_domains():
    x = inputs()
    off = tiny(domain_attention=False)
    rgb_a, rgb_b = off(**x)[:, 0], off(**with_other_normals(x))[:, 0]
    torch.testing.assert_close(rgb_a, rgb_b, rtol=0, atol=1e-6)
    on = tiny(domain_attention=True)
    assert (on(**x)[:, 0] - on(**with_other_normals(x))[:, 0]).abs().max() > 1e-3


@torch.no_grad()
def test_convolutions_never_mix_domains():
    """A conv block on the flat (B*D) batch: changing the normal-domain rows leaves the RGB rows bit-identical."""
    model = tiny(domain_attention=True)
    block = model.unet.down_blocks[0]  # resnets + downsampler, no attention
    temb = torch.randn(4, model.unet.time_embedding.linear_2.out_features)
    h = torch.randn(4, 16, 16, 16)  # [B*D, C, h, w], D innermost
    h2 = h.clone()
    h2[1::2] = torch.randn_like(h2[1::2])
    out, out2 = block(h, temb)[0], block(h2, temb)[0]
    torch.testing.assert_close(out[0::2], out2[0::2], rtol=0, atol=0)
    assert not torch.equal(out[1::2], out2[1::2])


@torch.no_grad()
def test_domain_embedding_tells_domains_apart():
    model = tiny(domain_attention=False)
    x = inputs()
    same = x["noisy"].clone()
    same[:, 1] = same[:, 0]
    out = model(**{**x, "noisy": same})
    assert (out[:, 0] - out[:, 1]).abs().max() > 1e-3
    torch.nn.init.zeros_(model.unet.class_embedding.weight)
    out = model(**{**x, "noisy": same})
    torch.testing.assert_close(out[:, 0], out[:, 1], rtol=0, atol=1e-6)


@torch.no_grad()
def test_reference_features_flow_in_and_drop_cuts_them():
    model = tiny()
    x = inputs()
    other = {**x, "ref_latent": torch.randn_like(x["ref_latent"])}
    assert (model(**x) - model(**other)).abs().max() > 1e-4
    drop = torch.ones(2, dtype=torch.bool)
    torch.testing.assert_close(model(**x, drop_reference=drop), model(**other, drop_reference=drop))


@torch.no_grad()
def test_temporal_layers_start_as_identity_then_mix_frames():
    stage1 = tiny()
    stage2 = tiny(temporal=True, temporal_heads=2)
    missing, unexpected = stage2.load_state_dict(stage1.state_dict(), strict=False)
    assert missing and all(".processor.temporal." in k for k in missing) and not unexpected
    x = inputs(t=3)
    torch.testing.assert_close(stage2(**x), stage1(**x), rtol=0, atol=1e-6)
    for name, p in stage2.named_parameters():
        if ".temporal.attn.to_out" in name:
            p.normal_()
    changed = {**x, "noisy": x["noisy"].clone()}
    changed["noisy"][:, :, :, 2] = torch.randn_like(changed["noisy"][:, :, :, 2])
    # frame 0 now depends on frame 2 through temporal attention; without it, it would not
    assert (stage2(**x)[:, :, :, 0] - stage2(**changed)[:, :, :, 0]).abs().max() > 1e-4
    torch.testing.assert_close(stage1(**x)[:, :, :, 0], stage1(**changed)[:, :, :, 0], rtol=0, atol=1e-6)


@torch.no_grad()
def test_save_pretrained_roundtrip(tmp_path):
    model = tiny(temporal=True, temporal_heads=2)
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = JointDenoiser.from_pretrained(tmp_path / "m").eval()
    x = inputs(t=2)
    torch.testing.assert_close(loaded(**x), model(**x), rtol=0, atol=0)


def test_paper_config_has_sd15_parameter_count_on_meta_device():
    cfg = load_config("configs/paper.yaml")
    with torch.device("meta"):
        model = JointDenoiser(**model_kwargs(cfg, 2, latent_channels=4, latent_downscale=8))
    assert all(p.is_meta for p in model.parameters())

    def count(m):
        return sum(p.numel() for p in m.parameters())

    temporal = sum(p.numel() for n, p in model.unet.named_parameters() if ".temporal." in n)
    domain = model.unet.class_embedding.weight.numel()
    assert count(model.unet) - temporal - domain == SD15_UNET_PARAMS
    assert count(model.reference_net) - domain == SD15_UNET_PARAMS
    added = count(model.pose_guider) + count(model.expression_encoder) + temporal + 2 * domain
    assert count(model) == 2 * SD15_UNET_PARAMS + added
    assert 0 < added < 0.15 * SD15_UNET_PARAMS


def _sd_shaped_folder(root):
    torch.manual_seed(3)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32,
        sample_size=16,
    )
    unet.save_pretrained(root / "unet", safe_serialization=True)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    return unet


@torch.no_grad()
def test_sd_shaped_folder_loads_through_from_pretrained(tmp_path):
    sd_unet = _sd_shaped_folder(tmp_path)
    cfg = GenConfig.model_validate(
        {
            "model": {
                "pretrained": str(tmp_path),
                "latents": "vae",
                "pose_injection": "add",
                "unet": {
                    "block_out_channels": [32, 64],
                    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                    "layers_per_block": 1,
                    "attention_head_dim": 8,
                    "cross_attention_dim": 32,
                    "norm_num_groups": 32,
                },
                "expression_channels": [8, 16],
                "pose_guider_channels": [8, 8],
            },
            "data": {"resolution": 16},
        }
    )
    codec = build_codec(cfg)
    assert (codec.channels, codec.downscale) == (4, 2)
    model = build_model(cfg, 1, codec).eval()
    for unet in (model.unet, model.reference_net.unet):
        own = unet.state_dict()
        for key, value in sd_unet.state_dict().items():
            torch.testing.assert_close(own[key], value, rtol=0, atol=0)
        assert not own[
            "class_embedding.weight"
        ].any()  # domain embedding zero: the SD UNet starts undisturbed
    assert build_model(cfg, 1, codec, from_pretrained=False).unet.class_embedding.weight.abs().min() > 0
    latent = codec.encode(torch.rand(2, 3, 16, 16))
    assert latent.shape == (2, 4, 8, 8)
    noisy = torch.randn(2, 2, 4, 1, 8, 8)
    out = model(
        noisy,
        torch.tensor([1, 2]),
        torch.rand(2, 1, 3, 16, 16),
        latent,
        torch.rand(2, 3, 16, 16),
        torch.rand(2, 1, 3, 16, 16),
    )
    assert out.shape == noisy.shape and torch.isfinite(out).all()
