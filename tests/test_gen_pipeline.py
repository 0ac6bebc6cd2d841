"""Sampler, schedulers, FLOP counting and config validation of geodiff4d.gen."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention

from geodiff4d.core.config import ConfigError
from geodiff4d.gen.config import load_config
from geodiff4d.gen.flops import module_counts
from geodiff4d.gen.latents import PixelLatents
from geodiff4d.gen.pipeline import sample_sequence, temporal_windows

sys.path.insert(0, str(Path(__file__).parent))
from gen_synthetic import one_torch_thread  # noqa: E402, F401
from test_gen_model import tiny  # noqa: E402


@pytest.mark.parametrize(
    "frames,window,overlap", [(1, 4, 1), (4, 4, 1), (10, 4, 1), (17, 16, 4), (40, 16, 4)]
)
def test_temporal_windows_cover_every_frame_with_overlap(frames, window, overlap):
    wins = temporal_windows(frames, window, overlap)
    covered = sorted({f for w in wins for f in w})
    assert covered == list(range(frames))
    assert all(len(w) == min(window, frames) for w in wins)
    for a, b in zip(wins, wins[1:], strict=False):
        assert a.stop - b.start >= overlap  # neighbours share at least `overlap` frames
    with pytest.raises(ValueError, match="overlap"):
        temporal_windows(frames, window, window)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++", "unipc"])
def test_sampler_runs_end_to_end_over_windows(scheduler):
    model = tiny(temporal=True, temporal_heads=2)
    g = torch.Generator().manual_seed(0)
    frames = 5
    out = sample_sequence(
        model,
        PixelLatents(),
        torch.rand(3, 16, 16, generator=g),
        torch.rand(3, 16, 16, generator=g),
        torch.rand(frames, 3, 16, 16, generator=g),
        torch.rand(frames, 3, 16, 16, generator=g),
        torch.Generator().manual_seed(1),
        scheduler=scheduler,
        steps=3,
        window=3,
        overlap=1,
    )
    assert out.rgb.shape == out.normal.shape == (frames, 3, 16, 16)
    assert out.expression.shape == (frames, 2, 4)
    for x in (out.rgb, out.normal):
        assert torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1


def test_sampler_is_deterministic_and_rgb_only_without_joint_normals():
    model = tiny(joint_normals=False)
    args = (
        PixelLatents(),
        torch.rand(3, 16, 16),
        torch.rand(3, 16, 16),
        torch.rand(2, 3, 16, 16),
        torch.rand(2, 3, 16, 16),
    )
    a = sample_sequence(model, *args, torch.Generator().manual_seed(7), steps=2)
    b = sample_sequence(model, *args, torch.Generator().manual_seed(7), steps=2)
    assert a.normal is None
    torch.testing.assert_close(a.rgb, b.rgb, rtol=0, atol=0)


def test_flop_count_includes_scaled_dot_product_attention():
    attn = Attention(query_dim=32, heads=4, dim_head=8)
    x = torch.randn(2, 10, 32)
    counts = module_counts(attn, (x,))
    projections = 4 * 2 * 10 * 32 * 32  # q, k, v, out: each [2*10, 32] x [32, 32]
    sdpa = 2 * 4 * 10 * 10 * (8 + 8)  # batch*heads * Lq * Lk * (E + Ev)
    assert counts["total"][0] == projections + sdpa
    assert counts["total"][1] == sum(p.numel() for p in attn.parameters())


def test_config_errors_name_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model:\n  latents: pixel\n  joint_normalz: true\ntrain:\n  stage1: {batch_size: 0, steps: 1}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert str(bad) in msg and "model.joint_normalz" in msg and "train.stage1.batch_size" in msg
    cfg = load_config("configs/demo.yaml")
    assert cfg.train.stage1.frames == 1 and cfg.train.stage2.frames == 16


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "dpmsolver++", "unipc"])
def test_initial_latents_carry_the_domain_means_at_the_first_steps_signal_level(scheduler):
    """At the first timestep the schedule keeps sqrt(alpha_bar) of the image: the start latents' mean over the
    image is that much of each domain's mean; the rest is the noise, shared by the domains, with mean zero."""
    from geodiff4d.gen.pipeline import initial_latents, make_scheduler

    sched = make_scheduler(scheduler)
    sched.set_timesteps(20)
    noise = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # [N, C, T, h, w]
    means = torch.tensor([[0.5, -0.2, 0.1], [-0.9, 0.3, 0.0]])  # [D, C]
    x = initial_latents(sched, noise, means)
    assert x.shape == (2, 2, 3, 4, 8, 8)
    alpha_bar = sched.alphas_cumprod[int(sched.timesteps[0])]
    expected_mean = alpha_bar.sqrt() * means[None, :, :, None].expand(2, 2, 3, 4)
    torch.testing.assert_close(x.mean(dim=(-2, -1)), expected_mean, atol=1e-5, rtol=0)
    zero_mean = (1 - alpha_bar).sqrt() * (noise - noise.mean(dim=(-2, -1), keepdim=True))
    for domain in range(2):
        torch.testing.assert_close(
            x[:, domain] - x[:, domain].mean(dim=(-2, -1), keepdim=True), zero_mean, atol=1e-5, rtol=0
        )


# Runs in a fresh process (its peak RSS is its own): one denoising step of `frames` frames of 2 views, 32 px, with
# a VAE of 64/128 channels (random weights) and the tiny temporal denoiser; prints the RSS before the call and the
# process's peak RSS after it, in MB
PEAK_RSS = """
import json, resource, sys
sys.path.insert(0, {tests!r})
import torch
from diffusers import AutoencoderKL
from test_gen_model import tiny
from geodiff4d.gen.latents import VaeLatents
from geodiff4d.gen.pipeline import Guidance, denoise_views, latent_shape, make_scheduler

torch.set_num_threads(1)
torch.manual_seed(0)
frames, views, size = {frames}, 2, 32
blocks = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
vae = AutoencoderKL(**blocks, block_out_channels=(64, 128), layers_per_block=1, latent_channels=4)
codec, model = VaeLatents(vae), tiny(temporal=True, temporal_heads=2, latent_channels=4, latent_downscale=2)
g = torch.Generator().manual_seed(0)
ref, ref_pose = torch.rand(3, size, size, generator=g), torch.rand(3, size, size, generator=g)
driving = torch.rand(frames, 3, 16, 16, generator=g)
posemaps = torch.rand(views, frames, 3, size, size, generator=g)
noise = torch.randn(latent_shape(codec, views, frames, (size, size)), generator=g)
before = int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])
guidance = Guidance(1, 2.0, 2.0, 16, 4, max_batch={max_batch})
denoise_views(model, codec, make_scheduler("ddim"), ref, ref_pose, driving, posemaps, noise, g, guidance)
print(json.dumps([before / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))
"""


def _memory_growth_mb(frames: int, max_batch: int) -> float:
    """How far a unit's sampling raises the process's peak RSS above what it held before, in MB."""
    import json
    import subprocess

    script = PEAK_RSS.format(tests=str(Path(__file__).parent), frames=frames, max_batch=max_batch)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=280, check=True
    )
    before, peak = json.loads(done.stdout.splitlines()[-1])
    return peak - before


@pytest.mark.timeout(600)
def test_sampling_memory_does_not_grow_with_the_frames_of_a_unit():
    """Measured 2026-12-06: 85 MB for 16 frames, 91 MB for 64 with max_batch 4 (the decoder takes 4 images at a
    time); all 64 frames' images in one VAE call, as before, took 183 and 504 MB."""
    sixteen, sixty_four = _memory_growth_mb(16, 4), _memory_growth_mb(64, 4)
    assert sixty_four <= 1.2 * sixteen, (sixteen, sixty_four)


def _sample_views(model, views: int = 1, frames: int = 4, window: int = 2, max_batch: int | None = None):
    """rgb and normal of `views` views x `frames` frames, 2 DDIM steps from seed-0 inputs:
    [2 * views, 3, frames, 16, 16]."""
    from geodiff4d.gen.pipeline import Guidance, denoise_views, make_scheduler

    g = torch.Generator().manual_seed(0)
    ref, ref_pose = torch.rand(3, 16, 16, generator=g), torch.rand(3, 16, 16, generator=g)
    driving, posemaps = (
        torch.rand(frames, 3, 16, 16, generator=g),
        torch.rand(views, frames, 3, 16, 16, generator=g),
    )
    noise = torch.randn(views, 3, frames, 16, 16, generator=g)
    guidance, generator = Guidance(2, 2.0, 2.0, window, 1, max_batch), torch.Generator().manual_seed(0)
    args = (ref, ref_pose, driving, posemaps, noise, generator, guidance)
    out = denoise_views(model, PixelLatents(), make_scheduler("ddim"), *args)
    return torch.cat([out.rgb, out.normal])


def test_micro_batches_predict_what_one_batch_does():
    """max_batch splits guidance branches and views into several denoiser calls (and the decode into several
    VAE calls); samples never attend to each other, so the frames are the same up to float rounding."""
    model = tiny(temporal=True, temporal_heads=2)

    def sample(max_batch: int | None) -> torch.Tensor:
        return _sample_views(model, views=2, frames=6, window=4, max_batch=max_batch)

    # float rounding of other batch shapes: up to 1.7e-5 with torch's own CPU convolutions (sampling avoids oneDNN's,
    # whose results depend on the thread count), 1e-5 with oneDNN's
    torch.testing.assert_close(sample(1), sample(None), rtol=0, atol=5e-5)


def test_frames_do_not_depend_on_the_thread_count():
    """`generate`'s actors share a node's CPUs, so the worker count sets their torch threads; with oneDNN's
    convolutions one view (12 samples per denoiser call) came out with other last bits at 1 and at 2 threads,
    so generate's bytes changed with the worker count."""
    model = tiny(temporal=True, temporal_heads=2)

    def sample(threads: int) -> torch.Tensor:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return _sample_views(model)
        finally:
            torch.set_num_threads(before)

    one = sample(1)
    for threads in (2, 3):
        assert torch.equal(sample(threads), one), threads


def test_speed_options_sample_the_same_frames_on_the_cpu(monkeypatch):
    """channels_last: the same frames up to float rounding; bf16 weights are for CUDA and compile falls back to
    eager where its backend fails (here: inductor's C++ compiler made missing), each with a warning that says so.
    (torch.compile with a working compiler: max difference 2.5e-6 on this model, measured 2026-12-06; it takes
    minutes on this machine, so it is not part of the suite.)"""
    from torch._inductor import config as inductor

    from geodiff4d.gen.pipeline import speed_options

    cpu, plain = torch.device("cpu"), _sample_views(tiny(temporal=True, temporal_heads=2))
    fast = speed_options(tiny(temporal=True, temporal_heads=2), cpu, channels_last=True)
    torch.testing.assert_close(_sample_views(fast), plain, rtol=0, atol=1e-5)
    with pytest.warns(UserWarning, match="bf16_weights ignored on cpu"):
        kept = speed_options(tiny(temporal=True, temporal_heads=2), cpu, bf16_weights=True)
    assert kept.dtype == torch.float32 and torch.equal(_sample_views(kept), plain)
    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))
    with pytest.warns(UserWarning, match="sample.compile skipped: torch.compile does not work here"):
        eager = speed_options(tiny(temporal=True, temporal_heads=2), cpu, compile=True)
    assert torch.equal(_sample_views(eager), plain)


def test_the_24gb_setting_merges_into_the_paper_config():
    """configs/sample-24gb.yaml is a `sample:` block to merge into a run's config: it must validate there."""
    import yaml

    from geodiff4d.gen.config import GenConfig

    root = Path(__file__).resolve().parents[1]
    raw = load_config(root / "configs" / "paper.yaml").model_dump(mode="json")
    raw["sample"].update(yaml.safe_load((root / "configs" / "sample-24gb.yaml").read_text())["sample"])
    small = GenConfig.model_validate(raw).sample
    assert small.max_batch == 1 and small.bf16_weights and small.context_frames == small.overlap
