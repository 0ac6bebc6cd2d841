"""Reconstruction quality on procedural data (issue 6's figures), all from one run on this machine.

1. Procedural NeRSemble subject at 128 px (16 cameras), exported to a frame folder with exact normals.
2. Fit from 12 cameras (ground-truth FLAME tracking), score the 4 held-out cameras of the same frames:
   PSNR (images on black, as trained) and wall time against the 15-minute budget.
3. The same fit without the normal term: held-out median normal angle error against ground truth, both ways.
4. Our tracker on the 12 training cameras: max global-rotation and jaw errors (degrees), expression correlation.
5. Render frames/s of the CPU backend at 512 px for 100k Gaussians (bench_gaussians' head-like scene).
``--quick`` shrinks every stage to a smoke run (minutes); the figures then mean little.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from geodiff4d.datasets.flame import FlameModel, FlameParams
from geodiff4d.datasets.frame_folder import export_frame_folder, read_cameras, read_frames
from geodiff4d.datasets.normal_maps import angular_error_deg
from geodiff4d.datasets.procedural import SynthSpec, gt_flame_path, synthesize
from geodiff4d.datasets.procedural_head import procedural_head_model
from geodiff4d.recon.fit import Fitter
from geodiff4d.recon.losses import psnr
from geodiff4d.recon.run import ReconConfig, load_subject, new_fitter
from geodiff4d.recon.tracking import TrackingConfig, track_frame_folder, tracking_errors

HELD_OUT = ["222200046", "220700191", "222200039", "222200038"]  # the benchmark's three + one more


def fit_within(fitter: Fitter, steps: int, seconds: float) -> float:
    """Train to ``steps`` or until ``seconds`` pass, whichever is first; returns the wall time."""
    start = time.perf_counter()
    while fitter.step_index < steps and time.perf_counter() - start < seconds:
        fitter.run(min(steps, fitter.step_index + 25))
    return time.perf_counter() - start


def held_out_scores(fitter: Fitter, root: Path, subject: str, sequence: str) -> tuple[float, float]:
    """Mean PSNR and median normal angle error (degrees, over the GT foreground) on the held-out cameras."""
    cameras = read_cameras(root / "cameras" / subject / f"{sequence}.json")
    scores, errors = [], []
    with torch.no_grad():
        for image in read_frames(root, subject, sequence, HELD_OUT):
            cam = cameras[image.camera]
            w2c, K = (torch.tensor(m, dtype=torch.float32) for m in (cam.world_to_cam, cam.K))
            render = fitter.render(image.frame, w2c, K, cam.width, cam.height)
            target = torch.from_numpy(image.rgb).permute(2, 0, 1) * torch.from_numpy(image.mask)
            scores.append(psnr(render.rgb.clamp(0, 1), target))
            normal = (render.normal / render.alpha.clamp_min(1e-6)[None]).permute(1, 2, 0).numpy()
            errors.append(angular_error_deg(normal, image.normal, image.mask > 0.5))
    return float(np.mean(scores)), float(np.median(np.concatenate(errors)))


def render_fps(n: int, size: int) -> float:
    path = Path(__file__).with_name("bench_gaussians.py")
    spec = importlib.util.spec_from_file_location("bench_gaussians", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from geodiff4d.recon.rasterize import render_gaussians

    scene = bench.head_like_scene(n, seed=1)
    f = 1.2 * size / (2 * 0.25)
    K = torch.tensor([[f, 0, (size - 1) / 2], [0, f, (size - 1) / 2], [0, 0, 1.0]])
    with torch.no_grad():
        render_gaussians(*scene[:5], scene[5], K, size, size, backend="torch")
        start, frames = time.perf_counter(), 0
        while time.perf_counter() - start < 5.0 or frames < 2:
            render_gaussians(*scene[:5], scene[5], K, size, size, backend="torch")
            frames += 1
    return frames / (time.perf_counter() - start)


def compare_normal_term(
    root: Path, subject: str, sequence: str, model: FlameModel, train: list[str], args: argparse.Namespace
) -> None:
    """Fit with and without the normal term in the same budget; print held-out PSNR and normal errors."""
    results = {}
    for name, lambda_normal in (("with normal term", 0.1), ("without normal term", 0.0)):
        config = ReconConfig(
            steps=args.steps, per_face=2, train_cameras=train, fit={"lambda_normal": lambda_normal}
        )
        fitter = new_fitter(load_subject(root, subject, model, config), model, config)
        seconds = fit_within(fitter, args.steps, args.minutes * 60)
        results[name] = (*held_out_scores(fitter, root, subject, sequence), fitter.step_index, seconds)
        print(
            f"{name:>20}: held-out PSNR {results[name][0]:.2f} dB, median normal error {results[name][1]:.2f} deg "
            f"({fitter.step_index} steps, {len(fitter.gaussians)} Gaussians, {seconds / 60:.1f} min, "
            f"{len(train)} train / {len(HELD_OUT)} held-out cameras, {args.frames} frames, 128 px)"
        )
    with_n, without_n = results["with normal term"][1], results["without normal term"][1]
    print(
        f"normal term lowers the held-out median normal error: {with_n < without_n} ({without_n:.2f} -> {with_n:.2f} deg)"
    )


def check_tracking(
    work: Path, subject: str, sequence: str, model: FlameModel, train: list[str], args: argparse.Namespace
) -> None:
    """Track the training cameras and print the errors against the procedural ground-truth FLAME."""
    tracking_config = (
        TrackingConfig(rigid_steps=20, landmark_steps=20, steps=10) if args.quick else TrackingConfig()
    )
    start = time.perf_counter()
    estimated = track_frame_folder(work / "frames", subject, sequence, model, tracking_config, cameras=train)
    with np.load(gt_flame_path(work / "synth" / "nersemble", subject, sequence)) as data:
        truth = FlameParams.from_numpy_dict(dict(data), model.n_shape, model.n_expr)
    errors = tracking_errors(estimated, truth)
    print(
        f"tracking ({len(train)} cameras, {args.frames} frames, {time.perf_counter() - start:.0f} s): "
        f"global rotation max error {errors['rotation_deg_max']:.2f} deg, jaw max error {errors['jaw_deg_max']:.2f} deg, "
        f"expression correlation {errors['expression_corr']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny budgets, figures not meaningful"
    )
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temp folder)")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--minutes", type=float, default=6.0, help="wall budget of each fit")
    args = parser.parse_args()
    if args.quick:
        args.frames, args.steps, args.minutes = 2, 40, 1.0
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    work = args.out or Path(tempfile.mkdtemp(prefix="bench_recon_"))
    print(f"work folder {work}; load average {os.getloadavg()}")
    synthesize(
        work / "synth",
        SynthSpec(subjects=1, sequences=1, frames=args.frames, cameras=16, resolution=128, synthetic=0),
        workers=1,
        progress=False,
    )
    root = work / "frames"
    export_frame_folder(work / "synth" / "nersemble", root)
    subject, sequence = "001", "EXP-1-head"
    train = sorted(set(read_cameras(root / "cameras" / subject / f"{sequence}.json")) - set(HELD_OUT))
    model = procedural_head_model(0)
    compare_normal_term(root, subject, sequence, model, train, args)
    check_tracking(work, subject, sequence, model, train, args)
    n, size = (20000, 256) if args.quick else (100000, 512)
    print(f"render torch backend N={n} {size}px on cpu: {render_fps(n, size):.2f} frames/s")
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
