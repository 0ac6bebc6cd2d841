"""A heuristic reference score for a benchmark run: its ground truth resampled to the generated views' pitch.

geodiff4d reconstructs each avatar from generated crops: the model's resolution over the packed head box. At the
hold-out cameras' resolution, detail finer than a generated pixel cannot come back, however good the generation
and the reconstruction. This script resamples the run's own ground truth to the generated views' pixel pitch
(area filter) and back up (bilinear), and scores it with the benchmark's own evaluation (same masks, backdrop,
metrics). It is a reference, not a bound: a reconstruction can recover detail across views and frames, and
other resampling filters score differently; if the reference already loses to a baseline on a metric, the
generation resolution likely decides that comparison.

    python bench/resampled_truth_reference.py RUN [--method geodiff4d] [--ratio R]   # RUN: a finished run

Writes RUN/../RUN-resampled-truth-RATIO/ (frames and evaluation), prints the reference beside the self board.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import yaml

from geodiff4d.core.io.images import read_rgb8, write_png
from geodiff4d.core.io.json_yaml import read_json
from geodiff4d.datasets.frame_folder import read_cameras
from geodiff4d.eval.run import evaluate


def sampling_ratio(run: Path, method: str) -> float:
    """Generated pixels per ground-truth pixel at the head: the median ratio of focal lengths of the generated
    crops' cameras and the capture's cameras of the same serials (a crop + resize only rescales K)."""
    generated = Path(read_json(run / "variants.json")[method]["generated"])
    ratios = []
    for crops in sorted((generated / "cameras").glob("*/*.json")):
        capture = read_cameras(run / "frames" / "cameras" / crops.parent.name / crops.name)
        ratios += [crop.K[0][0] / capture[serial].K[0][0] for serial, crop in read_cameras(crops).items()]
    if not ratios:
        sys.exit(f"{generated}/cameras: no generated cameras for {method}")
    return float(np.median(ratios))


def write_resampled(gt: Path, out: Path, ratio: float) -> int:
    """Every ground-truth frame under ``gt`` (subject/sequence/camera/*.png), down to ``ratio`` of its size and
    back; returns the frame count. Frames already there are kept, so a rerun resumes the evaluation."""
    count = 0
    for frame in sorted(gt.glob("*/*/*/*.png")):
        target = out / frame.relative_to(gt)
        count += 1
        if target.is_file():
            continue
        image = read_rgb8(frame)
        h, w = image.shape[:2]
        low = cv2.resize(
            image, (max(1, round(w * ratio)), max(1, round(h * ratio))), interpolation=cv2.INTER_AREA
        )
        write_png(target, cv2.resize(low, (w, h), interpolation=cv2.INTER_LINEAR))
    return count


def resampled_truth_reference(
    run: Path, method: str = "geodiff4d", ratio: float | None = None
) -> pd.DataFrame:
    """Mean PSNR and LPIPS of the resampled ground truth over the self protocol's frames; ``ratio`` overrides the
    generated views' (to ask what a model at another resolution could reach)."""
    config = yaml.safe_load((run / "benchmark.yaml").read_text())
    eval_config = config.get("eval", {})
    ratio = ratio or sampling_ratio(run, method)
    work = run.parent / f"{run.name}-resampled-truth-{ratio:.3f}"
    frames = write_resampled(run / "gt" / "self" / "rgb", work / "pred" / "rgb", ratio)
    evaluate(
        {"resampled_truth": work / "pred" / "rgb"},
        run / "gt" / "self" / "rgb",
        "self",
        work / "eval",
        metrics=["psnr", "lpips"],
        gt_mask=run / "gt" / "self" / "mask",
        masked=eval_config.get("masked", True),
        background=eval_config.get("background", 0.5),
        resolution=eval_config.get("resolution"),
        progress=False,
    )
    scored = pd.concat([pd.read_parquet(p) for p in (work / "eval" / "frames").glob("*.parquet")])
    print(
        f"generated views sampling the head at {ratio:.3f} of the ground truth's pixels: "
        f"{frames} hold-out frames resampled, scored in {work / 'eval'}"
    )
    return scored[["psnr", "lpips"]].mean().to_frame("resampled_truth").T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished `geodiff4d benchmark` run folder")
    parser.add_argument(
        "--method", default="geodiff4d", help="the geodiff4d method whose generated views count"
    )
    parser.add_argument(
        "--ratio", type=float, help="generated pixels per ground-truth pixel (default: the run's)"
    )
    args = parser.parse_args()
    run = args.run.resolve()
    if (
        not (run / "variants.json").is_file()
        or not (run / "leaderboard" / "self_leaderboard.parquet").is_file()
    ):
        sys.exit(f"{run}: not a finished `geodiff4d benchmark` run (no variants.json or self leaderboard)")
    reference = resampled_truth_reference(run, args.method, args.ratio)
    board = pd.read_parquet(run / "leaderboard" / "self_leaderboard.parquet").set_index("method")
    print(pd.concat([board[["psnr", "lpips"]], reference]).round(3).to_string())


if __name__ == "__main__":
    main()
