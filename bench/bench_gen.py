"""Joint image-normal diffusion: training cost of the joint model vs RGB-only, and (--quality) that it learns.

Default: denoiser training steps/s at 64 px on CPU for the demo model with joint_normals on and off, printed
with the joint model's cost ratio (it denoises two domains per sample, so about 2x is expected).
--quality: procedural data -> pack -> stage 1 then stage 2 through Ray Train (as `geodiff4d train` runs) ->
the stage-1 loss must fall to at most half its first-50-step mean, and normals sampled for held-out subjects
must beat a constant facing-the-camera normal map in median angular error against the exact ground truth.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from geodiff4d.gen.build import build_codec, build_model
from geodiff4d.gen.config import GenConfig, load_config
from geodiff4d.gen.pipeline import make_scheduler
from geodiff4d.gen.train import diffusion_loss

ROOT = Path(__file__).resolve().parents[1]


def load_average() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def random_batch(g: torch.Generator, batch: int, res: int, crop: int) -> dict:
    """A batch of the loader's contract; timing needs the shapes, not the content."""
    image = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    return {
        "rgb": image(batch, 3, res, res),
        "normal": image(batch, 3, res, res),
        "posemap": image(batch, 3, res, res),
        "ref_rgb": image(batch, 3, res, res),
        "ref_posemap": image(batch, 3, res, res),
        "driving": image(batch, 3, crop, crop),
        "has_normal": torch.ones(batch, dtype=torch.bool),
    }


def steps_per_second(cfg: GenConfig, steps: int, warmup: int = 2) -> float:
    torch.manual_seed(0)
    codec = build_codec(cfg)
    model = build_model(cfg, 1, codec).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler, g = make_scheduler("ddpm"), torch.Generator().manual_seed(0)
    batch = random_batch(g, cfg.train.stage1.batch_size, cfg.data.resolution, cfg.model.driving_size)
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        diffusion_loss(model, codec, batch, scheduler, g, cfg, torch.device("cpu")).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - start)


def throughput(config: Path, resolution: int, steps: int) -> None:
    base = load_config(config).model_dump()
    base["data"]["resolution"] = resolution
    rates = {}
    for joint in (True, False):
        base["model"]["joint_normals"] = joint
        rates[joint] = steps_per_second(GenConfig.model_validate(base), steps)
    batch = base["train"]["stage1"]["batch_size"]
    print(
        f"denoiser training at {resolution} px, batch {batch}, {torch.get_num_threads()} thread(s), {load_average()}"
    )
    print(f"  joint RGB+normals: {rates[True]:.3f} steps/s")
    print(f"  RGB only:          {rates[False]:.3f} steps/s")
    print(f"  joint model cost ratio (time per step, joint / RGB-only): {rates[False] / rates[True]:.2f}")


def make_data(root: Path, resolution: int, seed: int, subjects: int, frames: int, synthetic: int) -> Path:
    from geodiff4d.datasets.packing import pack
    from geodiff4d.datasets.procedural import SynthSpec, synthesize

    spec = SynthSpec(
        subjects=subjects,
        sequences=1,
        frames=frames,
        cameras=4,
        resolution=128,
        synthetic=synthetic,
        seed=seed,
    )
    if not synthesize(root / "raw", spec, workers=2, progress=False).ok:
        raise RuntimeError(f"{root}: synthesis failed")
    sources = [("nersemble", root / "raw/nersemble")] + (
        [("synthhuman", root / "raw/synthhuman")] if synthetic else []
    )
    report = pack(root / "shards", sources, resolution=resolution, workers=2, progress=False)
    if not report.ok:
        raise RuntimeError(report.summary())
    return root / "shards"


def step_losses(run: Path) -> np.ndarray:
    """The per-step training loss from the run's TensorBoard scalars (the config logs every step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((run / "tensorboard").glob("events.*"))
    values = {}
    for path in events:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        values.update({e.step: e.value for e in acc.Scalars("train/loss")})
    return np.array([values[s] for s in sorted(values)])


def normal_errors(
    frame_root: Path, shards: Path, subject: str, sequence: str
) -> tuple[np.ndarray, np.ndarray]:
    """Angular errors (deg) over the ground truth's foreground: sampled normals, and a constant (0, 0, 1) map."""
    from geodiff4d.datasets.normal_maps import angular_error_deg, decode_normal_png
    from geodiff4d.gen.sample_frames import read_sequence

    data = read_sequence(shards, subject, sequence)
    sampled, constant = [], []
    for path in sorted((frame_root / "normal" / subject / sequence).glob("*/*.png")):
        truth = data[(path.parent.name, int(path.stem))]["normal"]
        gt = truth.permute(1, 2, 0).numpy() * 2 - 1
        mask = truth.sum(0).numpy() > 0
        pred, _ = decode_normal_png(path)
        sampled.append(angular_error_deg(pred, gt, mask))
        constant.append(angular_error_deg(np.broadcast_to([0.0, 0.0, 1.0], gt.shape), gt, mask))
    if not sampled:
        raise RuntimeError(f"{frame_root}: no sampled normal maps")
    return np.concatenate(sampled), np.concatenate(constant)


def quality(config: Path, work: Path, frames: int) -> bool:
    import ray

    from geodiff4d.gen.sample_frames import sample_to_frame_folder
    from geodiff4d.gen.train import train

    cfg = load_config(config)
    res = cfg.data.resolution
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    started = time.perf_counter()
    train_shards = make_data(work / "train", res, seed=0, subjects=3, frames=frames, synthetic=16)
    held_out = make_data(work / "held_out", res, seed=1, subjects=1, frames=8, synthetic=0)
    print(f"data: {time.perf_counter() - started:.0f} s", flush=True)
    times = {}
    for stage, init in ((1, None), (2, work / "stage1")):
        t = time.perf_counter()
        train(config, stage, train_shards, work / f"stage{stage}", init=init, quiet=False)
        times[stage] = time.perf_counter() - t
    losses = step_losses(work / "stage1")
    first, last = losses[:50].mean(), losses[-50:].mean()
    t = time.perf_counter()
    sample_to_frame_folder(
        config, work / "stage2", held_out, "001", "EXP-1-head", None, None, work / "frames", seed=0
    )
    sample_time = time.perf_counter() - t
    errors, baseline = normal_errors(work / "frames", held_out, "001", "EXP-1-head")
    s2 = step_losses(work / "stage2")
    print(
        f"stage 1: {len(losses)} steps in {times[1]:.0f} s (Ray start included); stage 2: {len(s2)} steps "
        f"in {times[2]:.0f} s; sampling the held-out subject: {sample_time:.0f} s; {load_average()}"
    )
    print(
        f"stage-1 loss: first-50-step mean {first:.4f}, last-50-step mean {last:.4f}, ratio {last / first:.3f} "
        f"(must be <= 0.5); stage-2 loss first/last 10-step mean {s2[:10].mean():.4f} / {s2[-10:].mean():.4f}"
    )
    print(
        f"held-out normals: median angular error {np.median(errors):.1f} deg sampled vs {np.median(baseline):.1f} "
        f"deg constant facing-the-camera map ({errors.size} foreground pixels); grid: {work}/frames/grids/"
    )
    return last <= 0.5 * first and np.median(errors) < np.median(baseline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, default=ROOT / "configs/demo.yaml")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (a Ray Train CPU worker runs 1)"
    )
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--frames", type=int, default=24, help="--quality: frames per training sequence")
    parser.add_argument(
        "--work", type=Path, default=None, help="--quality: keep outputs here (default: temp)"
    )
    parser.add_argument("--max-steps", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.quality:
        throughput(args.config, args.resolution, args.steps)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        config = args.config
        if args.max_steps:  # short development runs: the same config with fewer steps
            raw = yaml.safe_load(args.config.read_text())
            for stage in ("stage1", "stage2"):
                raw["train"][stage]["steps"] = min(raw["train"][stage]["steps"], args.max_steps)
            config = work / "config.yaml"
            config.write_text(yaml.safe_dump(raw))
        ok = quality(config, work, args.frames)
    print("quality: PASS" if ok else "quality: FAIL")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
