"""GPU figures: `geodiff4d generate` at 512 px with the paper-size model, the >= 64 px demo checkpoint, and
the older component figures. Every part also runs on the CPU at tiny size (`--device cpu --tiny`), which proves
the script end to end without a GPU.

Parts (positional; default: generate):
  generate     the real `geodiff4d generate` CLI (Ray actor, real units) on a spec of 4 views x 36 frames
               (frames_per_unit 32: one 32-frame unit with 4 context frames, then the last 4 frames):
               scikit-image's astronaut as the reference (identity fitted by our tracker), random expressions
               driving the procedural FLAME head, an orbit of cameras; the paper-size model of
               configs/paper.yaml (random weights, an SD-shaped random VAE) at 512 px. Per setting
               (`--settings`, default `default,24gb`): frames/s per GPU (written frames over the units' own
               time; the 32-frame unit alone beside it) and the actor's peak memory
               (torch.cuda.max_memory_allocated inside the actor, reported back in the unit's stats).
               Settings: default (configs/paper.yaml's sample block), 24gb (configs/sample-24gb.yaml merged
               in), fast (UniPC 10 steps; bench/bench_samplers.py measures what it costs in quality).
               Goals on an H100: >= 3.3 frames/s, peak <= 75 GB by default and <= 22 GB with 24gb.
  demo64-train scripts/make_demo_checkpoint.py's recipe at 64 px into configs/checkpoints/demo-64px
               (MADE.json beside it, <= 20 MB), synth + pack + both training stages.
  demo64-e2e   bench/benchmark_end_to_end.py on configs/benchmark-demo.yaml with generation.run naming
               configs/checkpoints/demo-64px: oracle > geodiff4d > reference copy on PSNR and LPIPS.
  sampling, batching, gaussians, denoiser: the component figures of bench/results/gpu-h*.txt (CUDA only).

--quick: a sanity pass of `generate` (1 view x 8 frames, 2 steps, both default settings). --tiny:
configs/demo.yaml's model at 32 px (pixel latents), 2 views x 6 frames, 2 steps, and a demo64 training of
2 + 2 steps into a scratch folder (never the committed one).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


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
    from geodiff4d.gen.build import model_kwargs
    from geodiff4d.gen.config import load_config
    from geodiff4d.gen.denoiser import JointDenoiser
    from geodiff4d.gen.latents import VaeLatents

    cfg = load_config(ROOT / "configs" / "paper.yaml")
    torch.manual_seed(0)
    model = JointDenoiser(**model_kwargs(cfg, 2, latent_channels=4, latent_downscale=8)).cuda().eval()
    return cfg, model, VaeLatents(sd_shaped_vae()).cuda()


def sd_shaped_vae():
    """SD-1.5's VAE shape with random weights: 4 levels (8x downscale), 4 latent channels."""
    from diffusers import AutoencoderKL

    blocks = 4
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=4,
        layers_per_block=2,
    )


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


# --- generate through the CLI

SETTINGS = {
    "default": {},
    "24gb": yaml.safe_load((ROOT / "configs" / "sample-24gb.yaml").read_text())["sample"],
    "fast": {"scheduler": "unipc", "steps": 10},
}


def base_run(work: Path, tiny: bool, steps: int | None) -> Path:
    """A run folder (config.yaml, scheduler, random EMA weights) of the paper-size model with an SD-shaped random
    VAE (tiny: configs/demo.yaml's model, pixel latents)."""
    from geodiff4d.gen.build import build_codec, build_model
    from geodiff4d.gen.config import GenConfig, load_config
    from geodiff4d.gen.model_run import write_run_files

    raw = load_config(ROOT / "configs" / ("demo.yaml" if tiny else "paper.yaml")).model_dump(mode="json")
    if not tiny:
        sd_shaped_vae().save_pretrained(work / "sd-vae" / "vae")
        raw["model"].update(pretrained=None, vae=str(work / "sd-vae"))
    if steps is not None:
        raw["sample"]["steps"] = steps
    cfg, run = GenConfig.model_validate(raw), work / "run"
    torch.manual_seed(0)
    build_model(cfg, 2, build_codec(cfg)).save_pretrained(run / "checkpoints" / "step_0000000" / "ema")
    write_run_files(run, cfg)
    return run


def setting_run(base: Path, name: str, steps: int | None) -> Path:
    """The base run with a setting's sample fields merged in (weights linked, not copied)."""
    from geodiff4d.gen.config import GenConfig, load_config
    from geodiff4d.gen.model_run import write_run_files

    raw = load_config(base / "config.yaml").model_dump(mode="json")
    raw["sample"].update(SETTINGS[name])
    if steps is not None:
        raw["sample"]["steps"] = steps
    run = base.with_name(f"run-{name}")
    write_run_files(run, GenConfig.model_validate(raw))
    (run / "checkpoints").symlink_to(base / "checkpoints", target_is_directory=True)
    return run


def generate_cli(spec: Path, out: Path, device: str) -> list[dict]:
    """`geodiff4d generate SPEC --out OUT` (the console script's own entry point) on one actor; its units' stats."""
    from geodiff4d.core.io.json_yaml import read_json

    entry = "from geodiff4d.cluster.cli import app; app(prog_name='geodiff4d')"
    gpus = "1" if device == "cuda" else "0"
    command = [
        sys.executable,
        "-c",
        entry,
        "generate",
        str(spec),
        "--out",
        str(out),
        "--gpus-per-worker",
        gpus,
    ]
    subprocess.run(command, check=True)
    return [read_json(path) for path in sorted((out / "_generate" / "commits").glob("*.stats.json"))]


def generate_figures(args: argparse.Namespace, work: Path) -> None:
    """Frames/s per GPU and the actor's peak memory of `geodiff4d generate`, per setting."""
    from bench_generate import make_spec

    views, frames, per_unit, steps = (1, 8, 8, 2) if args.quick else (4, 36, 32, None)
    if args.tiny:
        views, frames, per_unit, steps = 2, 6, 4, 2
    base = base_run(work, args.tiny, steps)
    spec = yaml.safe_load(make_spec(work, frames, views, views, per_unit).read_text())
    for name in args.settings.split(","):
        run = setting_run(base, name, steps)
        path = work / f"spec-{name}.yaml"
        path.write_text(yaml.safe_dump({**spec, "run": str(run)}))
        stats = generate_cli(path, work / f"out-{name}", args.device)
        sample = yaml.safe_load((run / "config.yaml").read_text())["sample"]
        written, seconds = sum(s["frames"] for s in stats), sum(s["seconds"] for s in stats)
        longest = max(stats, key=lambda s: s["frames"])
        peak = max(s["peak_memory_bytes"] for s in stats) / 2**30
        memory = "GPU memory allocated" if args.device == "cuda" else "resident set size (CPU)"
        print(
            f"generate, setting {name} ({sample}): {views} views x {frames} frames, {per_unit} per unit, "
            f"{len(stats)} units: {written / seconds:.2f} frames/s per {args.device} (the {longest['frames']}-frame "
            f"unit alone {longest['frames'] / longest['seconds']:.2f}); actor's peak {memory} {peak:.1f} GiB",
            flush=True,
        )


# --- the >= 64 px demo checkpoint

DEMO64 = ROOT / "configs" / "checkpoints" / "demo-64px"
DEMO64_RECIPE = [
    "--steps1",
    "2000",
    "--steps2",
    "600",
    "--batch1",
    "32",
    "--batch2",
    "2",
    "--loader-workers",
    "8",
]
TINY_RECIPE = ["--steps1", "2", "--steps2", "2", "--batch1", "2", "--batch2", "1", "--checkpoint-every", "2"]


def demo64_out(args: argparse.Namespace, work: Path) -> Path:
    return work / "demo-64px" if args.tiny else DEMO64


def demo64_train(args: argparse.Namespace, work: Path) -> None:
    """scripts/make_demo_checkpoint.py at 64 px (resumes from --demo64-work when rerun with the same arguments)."""
    out, scratch = demo64_out(args, work), Path(args.demo64_work or work / "demo64-work")
    recipe = TINY_RECIPE + ["--loader-workers", "0"] if args.tiny else DEMO64_RECIPE
    command = [sys.executable, str(ROOT / "scripts" / "make_demo_checkpoint.py"), "--work", str(scratch)]
    command += ["--resolution", "64", "--out", str(out), "--device", args.device, *recipe]
    subprocess.run(command, check=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(
        f"demo64-train: {out} written, {size:.1f} MB (limit 20 MB); MADE.json: {(out / 'MADE.json').read_text()}"
    )


def demo64_e2e(args: argparse.Namespace, work: Path) -> None:
    """The end-to-end direction check with the 64 px checkpoint as the benchmark's diffusion model."""
    config = yaml.safe_load((ROOT / "configs" / "benchmark-demo.yaml").read_text())
    config["generation"]["run"] = str(demo64_out(args, work).resolve())
    path = work / "benchmark-demo-64px.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    script = ROOT / "bench" / "benchmark_end_to_end.py"
    subprocess.run(
        [sys.executable, str(script), "--config", str(path), "--out", str(work / "e2e")], check=True
    )


PARTS = {
    "generate": generate_figures,
    "demo64-train": demo64_train,
    "demo64-e2e": demo64_e2e,
    "sampling": lambda args, work: sampling_figures(),
    "batching": lambda args, work: batching_figures(),
    "gaussians": lambda args, work: gaussian_figures(),
    "denoiser": lambda args, work: denoiser_figures(),
}
CUDA_ONLY = ("sampling", "batching", "gaussians", "denoiser")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", metavar="PART", help=f"of {', '.join(PARTS)} (default: generate)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the demo model at 32 px, a few frames and steps")
    parser.add_argument("--quick", action="store_true", help="generate only: 1 view x 8 frames, 2 steps")
    parser.add_argument("--settings", default="default,24gb", help=f"generate's, of {', '.join(SETTINGS)}")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed after)")
    parser.add_argument("--demo64-work", type=Path, help="make_demo_checkpoint's --work (keep it to resume)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(0, "bench_gpu: no CUDA device here; run with --device cpu --tiny for the CPU path\n")
    if args.quick or not args.parts:
        args.parts = ["generate"]
    if set(args.parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(set(args.parts) - set(PARTS))}; known: {', '.join(PARTS)}")
    unknown = set(args.settings.split(",")) - set(SETTINGS)
    if unknown:
        parser.error(f"--settings: unknown {sorted(unknown)}; known: {', '.join(SETTINGS)}")
    return args


def main() -> None:
    args = parse_args()
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"device: {device}, torch {torch.__version__}, parts {args.parts}", flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-gpu-"))
    failed = []
    for name in args.parts:
        started = time.perf_counter()
        try:
            if name in CUDA_ONLY and args.device != "cuda":
                raise RuntimeError(f"{name} needs CUDA")
            PARTS[name](args, work)
        except Exception:  # noqa: BLE001 - one failing part must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
        print(f"part {name}: {time.perf_counter() - started:.0f} s", flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    if failed:
        sys.exit(f"failed parts: {failed}")


if __name__ == "__main__":
    main()
