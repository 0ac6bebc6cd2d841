"""GaussianAvatars' adaptive density control on vs off: procedural fits of the same length, held-out PSNR.

A procedural NeRSemble subject at 128 px (16 cameras, ground-truth FLAME tracking) is fitted from 12 cameras
twice, with the same steps, seed and start (one Gaussian per face): once with adaptive control (its schedule
in proportion to the run: densify every steps/300 from steps/60, opacity reset every steps/10), once without.
Both are scored on the 4 held-out cameras (PSNR on black, as trained). One torch thread by default, so the
figures do not depend on what else the machine runs as much as wall time does.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_recon_quality import HELD_OUT, held_out_scores  # noqa: E402

from geodiff4d.datasets.frame_folder import export_frame_folder, read_cameras  # noqa: E402
from geodiff4d.datasets.procedural import SynthJob, SynthSpec, synth_units  # noqa: E402
from geodiff4d.datasets.procedural_head import procedural_head_model  # noqa: E402
from geodiff4d.recon.run import ReconConfig, load_subject, new_fitter  # noqa: E402


def parse_args() -> argparse.Namespace:
    """Work folder, frames, steps, threads and an optional explicit densification schedule."""
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--out", type=Path, default=None, help="work folder (default: a temp folder; reused if given)"
    )
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--schedule",
        type=int,
        nargs=4,
        default=None,
        metavar=("FROM", "EVERY", "UNTIL", "RESET"),
        help="explicit densify_from, densify_every, densify_until, opacity_reset_every "
        "(default: the run's own schedule from recon.adaptive)",
    )
    return parser.parse_args()


def write_subject(work: Path, frames: int) -> Path:
    """One procedural subject's frame folder under ``work``, written in this process unless it is there."""
    root = work / "frames"
    if not root.exists():  # one subject, written in this process (no Ray to start on a busy machine)
        job = SynthJob(
            work / "synth",
            SynthSpec(subjects=1, sequences=1, frames=frames, cameras=16, resolution=128, synthetic=0),
        )
        job.setup()
        for unit in synth_units(job.spec):
            job.run(unit)
        export_frame_folder(work / "synth" / "nersemble", root)
    return root


def main() -> None:
    args = parse_args()
    schedule_overrides = {}
    if args.schedule:
        names = ("densify_from", "densify_every", "densify_until", "opacity_reset_every")
        schedule_overrides = dict(zip(names, args.schedule, strict=True))
    torch.set_num_threads(args.threads)
    work = args.out or Path(tempfile.mkdtemp(prefix="bench_adaptive_"))
    print(f"work folder {work}; load average {os.getloadavg()}; {args.threads} torch thread(s)")
    root = write_subject(work, args.frames)
    subject, sequence = "001", "EXP-1-head"
    train = sorted(set(read_cameras(root / "cameras" / subject / f"{sequence}.json")) - set(HELD_OUT))
    model = procedural_head_model(0)
    for adaptive in (True, False):
        config = ReconConfig(
            steps=args.steps,
            per_face=1,
            train_cameras=train,
            fit={"adaptive_control": adaptive, **schedule_overrides},
        )
        fitter = new_fitter(load_subject(root, subject, model, config), model, config)
        start = time.perf_counter()
        fitter.run(args.steps)
        seconds = time.perf_counter() - start
        score, normal_error = held_out_scores(fitter, root, subject, sequence)
        schedule = fitter.schedule
        plan = (
            f"densify every {schedule.densify_every} from {schedule.densify_from} until {schedule.densify_until}, "
            f"opacity reset every {schedule.opacity_reset_every}"
            if schedule
            else "no densification"
        )
        print(
            f"adaptive control {'on ' if adaptive else 'off'}: held-out PSNR {score:.2f} dB, median normal error "
            f"{normal_error:.2f} deg, {len(fitter.gaussians)} Gaussians from {len(fitter.faces)} "
            f"({args.steps} steps, {plan}; {seconds / 60:.1f} min; {len(train)} train / {len(HELD_OUT)} held-out "
            f"cameras, {args.frames} frames, 128 px)"
        )
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
