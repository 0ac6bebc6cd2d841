"""GPU figures: gsplat vs our PyTorch Gaussian backend, and the paper-sized joint denoiser's training speed.

Needs CUDA; on a machine without it, says so and exits 0 (CPU figures are in the other bench scripts).
Prints, each against a reference measured in the same run:
  1. gsplat vs the PyTorch backend on the same scene: largest differences of rgb/alpha/depth/normal;
  2. render frames/s at 512 px for 100k Gaussians, gsplat vs the PyTorch backend on the same GPU;
  3. training steps/s of the SD-1.5-shaped joint denoiser at 512 px (64x64 latents, bf16 autocast,
     batch 1, gradient checkpointing): joint RGB+normal vs RGB-only, i.e. the joint model's cost ratio;
  4. sampling frames/s per GPU of the SD-1.5-shaped joint model at 512 px (random weights, an SD-shaped
     random VAE, bf16 autocast, DDIM 25 steps, CFG with 3 branches, a 16-frame window of 4 views denoised as
     one batch, as one `geodiff4d generate` unit): against the paper's 0.67 frames/s (200 frames x 12 views
     in 1 h on an H100); goal >= 3.3 frames/s;
  5. the same unit's views denoised as one batch vs one view at a time, at 256 and 512 px.
"""

from __future__ import annotations

import math
import sys
import time
import traceback
from pathlib import Path

import torch


def _timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def _scene(n: int, generator: torch.Generator, device: str):
    """A head-sized shell of Gaussians 1 m in front of a camera looking down +z."""
    direction = torch.randn(n, 3, generator=generator)
    direction = direction / direction.norm(dim=1, keepdim=True)
    means = 0.1 * direction * (1 + 0.05 * torch.rand(n, 1, generator=generator)) + torch.tensor(
        [0.0, 0.0, 1.0]
    )
    quats = torch.randn(n, 4, generator=generator)
    quats = quats / quats.norm(dim=1, keepdim=True)
    scales = 0.002 + 0.004 * torch.rand(n, 3, generator=generator)
    scales[:, 2] *= 0.1
    opacities = 0.3 + 0.7 * torch.rand(n, generator=generator)
    colors = torch.rand(n, 3, generator=generator)
    return [t.to(device) for t in (means, quats, scales, opacities, colors)]


def gaussian_figures() -> None:
    from geodiff4d.recon.rasterize import render_gaussians

    generator = torch.Generator().manual_seed(0)
    world_to_cam = torch.eye(4, device="cuda")
    for n, size in ((2_000, 128), (100_000, 512)):
        K = torch.tensor([[size * 2.0, 0, size / 2], [0, size * 2.0, size / 2], [0, 0, 1]], device="cuda")
        scene = _scene(n, generator, "cuda")

        def run(backend: str, scene=scene, K=K, size=size):
            return render_gaussians(*scene, world_to_cam, K, size, size, backend=backend)

        with torch.no_grad():
            ours, theirs = run("torch"), run("gsplat")
            diffs = {
                name: (getattr(ours, name) - getattr(theirs, name)).abs().max().item()
                for name in ("rgb", "alpha", "depth", "normal")
            }
            print(
                f"{n} Gaussians at {size} px, max |torch - gsplat|: "
                + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
            )
            t_ours, t_gsplat = _timed(lambda: run("torch"), 3), _timed(lambda: run("gsplat"), 20)
        print(
            f"  render frames/s: gsplat {1 / t_gsplat:.1f}, torch backend on GPU {1 / t_ours:.1f}, "
            f"ratio {t_ours / t_gsplat:.1f}x"
        )


def denoiser_figures() -> None:
    from geodiff4d.gen.build import model_kwargs
    from geodiff4d.gen.config import load_config
    from geodiff4d.gen.denoiser import JointDenoiser

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "paper.yaml")
    seconds = {}
    for joint in (True, False):
        torch.manual_seed(0)
        kwargs = model_kwargs(cfg, 1, latent_channels=4, latent_downscale=8)
        kwargs["joint_normals"] = joint
        model = JointDenoiser(**kwargs).cuda().train()
        model.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        domains = 2 if joint else 1
        batch = {
            "noisy": torch.randn(1, domains, 4, 1, 64, 64, device="cuda"),
            "timesteps": torch.randint(0, 1000, (1,), device="cuda"),
            "posemap": torch.rand(1, 1, 3, 512, 512, device="cuda"),
            "ref_latent": torch.randn(1, 4, 64, 64, device="cuda"),
            "ref_posemap": torch.rand(1, 3, 512, 512, device="cuda"),
            "driving": torch.rand(1, 1, 3, cfg.model.driving_size, cfg.model.driving_size, device="cuda"),
        }

        def step(model=model, optimizer=optimizer, batch=batch):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**batch).float().pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            assert math.isfinite(loss.item())

        seconds[joint] = _timed(step, 5)
        print(
            f"paper denoiser ({'joint RGB+normal' if joint else 'RGB only'}): {1 / seconds[joint]:.2f} steps/s, "
            f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        )
        del model, optimizer
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print(f"joint model cost ratio at 512 px (batch 1, bf16): {seconds[True] / seconds[False]:.2f}x")


def _paper_sampler():
    """The SD-1.5-shaped joint model with random weights and an SD-shaped random VAE, on the GPU, in eval mode."""
    from diffusers import AutoencoderKL

    from geodiff4d.gen.build import model_kwargs
    from geodiff4d.gen.config import load_config
    from geodiff4d.gen.denoiser import JointDenoiser
    from geodiff4d.gen.latents import VaeLatents

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "paper.yaml")
    torch.manual_seed(0)
    model = JointDenoiser(**model_kwargs(cfg, 2, latent_channels=4, latent_downscale=8)).cuda().eval()
    blocks = 4  # SD-1.5's VAE: 4 levels (8x downscale), 4 latent channels
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=4,
        layers_per_block=2,
    )
    return cfg, model, VaeLatents(vae).cuda()


def _unit_inputs(codec, size: int, driving_size: int, views: int, frames: int) -> dict[str, torch.Tensor]:
    """Random inputs of one `generate` unit: the reference and its pose map, driving crops, target pose maps, noise."""
    from geodiff4d.gen.pipeline import latent_shape

    g = torch.Generator().manual_seed(0)
    ref_rgb, ref_posemap = torch.rand(3, size, size, generator=g), torch.rand(3, size, size, generator=g)
    driving = torch.rand(frames, 3, driving_size, driving_size, generator=g)
    posemaps = torch.rand(views, frames, 3, size, size, generator=g)
    noise = torch.randn(latent_shape(codec, views, frames, (size, size)), generator=g)
    return {
        "ref_rgb": ref_rgb,
        "ref_posemap": ref_posemap,
        "driving": driving,
        "posemaps": posemaps,
        "noise": noise,
    }


def _denoise(model, codec, inputs: dict[str, torch.Tensor], guidance, views: slice = slice(None)):
    """The unit's views `views` denoised as one batch, DDIM, seed 0."""
    from geodiff4d.gen.pipeline import denoise_views, make_scheduler

    return denoise_views(
        model,
        codec,
        make_scheduler("ddim"),
        inputs["ref_rgb"],
        inputs["ref_posemap"],
        inputs["driving"],
        inputs["posemaps"][views],
        inputs["noise"][views],
        torch.Generator().manual_seed(0),
        guidance,
    )


def sampling_figures(views: int = 4, frames: int = 16, steps: int = 25) -> None:
    from geodiff4d.gen.pipeline import Guidance

    cfg, model, codec = _paper_sampler()
    size = cfg.data.resolution
    inputs = _unit_inputs(codec, size, cfg.model.driving_size, views, frames)
    guidance = Guidance(steps, 2.0, 2.0, 16, 4)

    def run():
        assert torch.isfinite(_denoise(model, codec, inputs, guidance).rgb).all()

    spent = {"denoiser": 0.0, "vae decode": 0.0}

    def timing(name, fn):
        def timed(*args, **kwargs):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
            spent[name] += time.perf_counter() - start
            return out

        return timed

    run()  # warm-up
    model.denoise, codec.decode = timing("denoiser", model.denoise), timing("vae decode", codec.decode)
    torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    fps = views * frames / seconds
    print(
        "  time per batch: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in spent.items())
        + f", total {seconds:.1f} s"
    )
    print(
        f"sampling at {size} px (bf16, DDIM {steps} steps, {views} views x {frames} frames per batch): "
        f"{fps:.2f} frames/s per GPU, {fps / 0.67:.1f}x the paper's 0.67 (goal 3.3); "
        f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB",
        flush=True,
    )


def batching_figures(frames: int = 16, steps: int = 10, sizes: tuple[int, ...] = (256, 512)) -> None:
    """One `generate` unit's views denoised as one batch vs one view at a time (same noise, so the same frames:
    views of a unit are independent), at 256 and 512 px: what `cameras_per_unit` buys on a GPU."""
    from geodiff4d.gen.pipeline import Guidance

    cfg, model, codec = _paper_sampler()
    views, guidance = 4, Guidance(steps, 2.0, 2.0, 16, 4)
    for size in sizes:
        inputs = _unit_inputs(codec, size, cfg.model.driving_size, views, frames)
        _denoise(model, codec, inputs, guidance, slice(0, 1))  # warm-up
        batched = _timed(lambda inputs=inputs: _denoise(model, codec, inputs, guidance), 1)
        alone = _timed(
            lambda inputs=inputs: [
                _denoise(model, codec, inputs, guidance, slice(v, v + 1)) for v in range(views)
            ],
            1,
        )
        print(
            f"{size} px, {views} views x {frames} frames, DDIM {steps}: batched {views * frames / batched:.2f} "
            f"frames/s, one view at a time {views * frames / alone:.2f} frames/s -> ratio {alone / batched:.2f}x",
            flush=True,
        )


SECTIONS = {
    "sampling": sampling_figures,
    "batching": batching_figures,
    "gaussians": gaussian_figures,
    "denoiser": denoiser_figures,
}


def main(names: list[str]) -> None:
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; GPU figures need one")
        return
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for name in names or SECTIONS:
        try:
            SECTIONS[name]()
        except Exception:  # noqa: BLE001 - one failing section must not hide the other's figures
            traceback.print_exc()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main(sys.argv[1:])  # section names (default: all): sampling, gaussians, denoiser
