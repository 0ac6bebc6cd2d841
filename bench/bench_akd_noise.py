"""AKD noise floor of each landmark backend: the AKD between a face photo and the same photo with Gaussian
noise of sigma = 1/255 (invisible; a perfect method cannot do better), over real photos shipped by installed
packages. Printed beside the AKD of a 1 px horizontal shift measured in the same run (ratio floor / shift).

dlib rounds its points to whole pixels, so tiny noise flips points by a pixel; FAN (face-alignment) keeps
sub-pixel coordinates. FAN needs the real 2DFAN-4 weights, which cannot be downloaded here: give them with
``--fan-weights PATH`` or $GEODIFF4D_FAN_WEIGHTS; without them the script says so and measures dlib only.

    python bench/bench_akd_noise.py [--fan-weights PATH] [--seeds 10]
"""

from __future__ import annotations

import argparse
import os
import time

import cv2
import numpy as np
import skimage.data

from geodiff4d.core.io.images import read_rgb8
from geodiff4d.datasets.packaged import ModelFileNotFound
from geodiff4d.eval.landmarks import Landmarker, keypoint_distance, make_landmarker
from geodiff4d.eval.model_files import packaged_photo

SIGMA = 1.0 / 255.0


def photos() -> dict[str, np.ndarray]:
    """Single-face crops: scikit-image's astronaut, insightface's Tom Hanks and two faces of its t1.jpg group."""
    group = read_rgb8(packaged_photo("t1.jpg"))
    hanks = read_rgb8(packaged_photo("Tom_Hanks_54745.png"))
    return {
        "astronaut": skimage.data.astronaut()[:320, 80:400].copy(),
        "tom_hanks": cv2.resize(hanks, (320, 320), interpolation=cv2.INTER_AREA),
        "t1_left": group[:, : group.shape[1] // 3].copy(),
        "t1_right": group[:, 2 * group.shape[1] // 3 :].copy(),
    }


def noise_floor(landmarker: Landmarker, images: dict[str, np.ndarray], seeds: int) -> dict[str, float]:
    """Mean AKD (pixels) of clean vs noisy copies over photos and seeds, the 1 px shift's AKD, and the misses."""
    floors, shifts, misses = [], [], 0
    for name, image in images.items():
        clean = landmarker(image)
        if clean is None:
            misses += 1
            print(f"  {name}: no face found, left out")
            continue
        shifts.append(keypoint_distance(landmarker(np.roll(image, 1, axis=1)), clean))
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            noisy = np.clip(np.rint(image + rng.normal(0.0, SIGMA * 255.0, image.shape)), 0, 255).astype(
                np.uint8
            )
            d = keypoint_distance(landmarker(noisy), clean)
            misses += d is None
            if d is not None:
                floors.append(d)
    return {
        "floor": float(np.mean(floors)),
        "floor_max": float(np.max(floors)),
        "shift_1px": float(np.nanmean(np.array(shifts, dtype=float))),
        "measured": len(floors),
        "misses": misses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fan-weights", default=None, help="2DFAN-4 checkpoint or a folder holding it")
    parser.add_argument("--seeds", type=int, default=10, help="noise draws per photo")
    args = parser.parse_args()
    images = photos()
    print(
        f"AKD noise floor, sigma = 1/255, {len(images)} photos x {args.seeds} noise draws; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    backends = {"dlib": lambda: make_landmarker("dlib")}
    backends["fan"] = lambda: make_landmarker("fan", fan_weights=args.fan_weights)
    for name, build in backends.items():
        try:
            landmarker = build()
        except ModelFileNotFound as missing:
            print(
                f"{name:>5}: not measured: needs the real face-alignment weights ({missing}); "
                "give --fan-weights PATH or $GEODIFF4D_FAN_WEIGHTS"
            )
            continue
        start = time.perf_counter()
        r = noise_floor(landmarker, images, args.seeds)
        print(
            f"{name:>5}: noise floor {r['floor']:.3f} px (max {r['floor_max']:.3f}) over {r['measured']} pairs, "
            f"{r['misses']} misses; 1 px shift reads {r['shift_1px']:.3f} px; "
            f"floor / shift = {r['floor'] / r['shift_1px']:.2f}  ({time.perf_counter() - start:.0f} s)"
        )


if __name__ == "__main__":
    main()
