"""Evaluation throughput (frames/s) per metric at 256 and 512 px, with same-run references:
our batched PSNR+SSIM vs scikit-image's per-image loop, LPIPS batched vs one pair at a time."""

from __future__ import annotations

import time

import cv2
import numpy as np
import skimage.data
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from geodiff4d.eval.expression import make_expression_regressor
from geodiff4d.eval.identity import embed, make_embedder
from geodiff4d.eval.image_metrics import psnr, ssim
from geodiff4d.eval.jod import jod
from geodiff4d.eval.landmarks import make_landmarker
from geodiff4d.eval.lpips_metric import load_lpips

N = 8


def _rate(fn, n: int) -> float:
    """Frames/s of ``fn`` over ``n`` frames, after one untimed warm-up call (first-call allocations)."""
    fn()
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def main() -> None:
    rng = np.random.default_rng(0)
    lpips = load_lpips("alex")
    models = {"csim facenet": make_embedder("facenet"), "akd dlib": make_landmarker("dlib"),
              "aed mediapipe": make_expression_regressor("mediapipe")}
    for size in (256, 512):
        bench_size(size, lpips, models, rng)


def bench_size(size: int, lpips, models: dict, rng: np.random.Generator) -> None:  # noqa: ANN001
    face = cv2.resize(skimage.data.astronaut()[:320, 80:400], (size, size), interpolation=cv2.INTER_AREA)
    gt = np.stack([np.roll(face, k, axis=1) for k in range(N)])
    pred = np.clip(gt + rng.normal(0, 8, gt.shape), 0, 255).astype(np.uint8)
    tp = torch.from_numpy(pred).permute(0, 3, 1, 2).float() / 255
    tg = torch.from_numpy(gt).permute(0, 3, 1, 2).float() / 255
    fp, fg = pred.astype(np.float32) / 255, gt.astype(np.float32) / 255
    ours = _rate(lambda: (psnr(tp, tg), ssim(tp, tg)), N)
    ref = _rate(lambda: [(peak_signal_noise_ratio(g, p, data_range=1),
                          structural_similarity(g, p, channel_axis=-1, data_range=1, gaussian_weights=True,
                                                sigma=1.5, use_sample_covariance=False))
                         for p, g in zip(fp, fg, strict=True)], N)
    print(f"{size}px PSNR+SSIM batched {ours:7.1f} f/s | skimage loop {ref:7.1f} f/s | ratio {ours / ref:.2f}x")
    batched = _rate(lambda: lpips(tp, tg), N)
    single = _rate(lambda: [lpips(tp[i:i + 1], tg[i:i + 1]) for i in range(N)], N)
    print(f"{size}px LPIPS-alex batched {batched:7.1f} f/s | one at a time {single:7.1f} f/s | "
          f"ratio {batched / single:.2f}x")
    for name, model in models.items():
        call = (lambda im, m=model: embed(m, im)) if name.startswith("csim") else model
        rate = _rate(lambda c=call: [c(p) for p in pred], N)
        print(f"{size}px {name:14s} {rate:7.1f} f/s (one frame side)")
    print(f"{size}px JOD cvvdp       {_rate(lambda: jod(tp, tg, fps=25), N):7.1f} f/s (standard_4k)")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
