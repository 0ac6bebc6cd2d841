"""Evaluation throughput at 256 and 512 px: frames/s of the full metric set (what one eval actor does per
clip), and our batched PSNR+SSIM as a ratio to scikit-image's per-image loop on the same frames.

Everything runs on one torch thread, as in an eval actor (Ray gives a 1-CPU actor OMP_NUM_THREADS=1) and as
scikit-image runs; ours is timed again with the machine's default thread count. 1-2 minutes on 2 cores.
"""

from __future__ import annotations

import time

import cv2
import numpy as np
import skimage.data
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from geodiff4d.eval.image_metrics import psnr, ssim
from geodiff4d.eval.inputs import Clip
from geodiff4d.eval.scoring import MetricModels, score_clip
from geodiff4d.eval.settings import EvalSettings

DEFAULT_THREADS = torch.get_num_threads()
N = 8  # frames per clip for PSNR+SSIM
N_FULL = 3  # frames per clip for the full metric set (face metrics cost about a second a frame on CPU)


def _seconds(fn) -> float:  # noqa: ANN001
    """Best of two timed calls after one untimed warm-up (first-call allocations, lazy model init)."""
    fn()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _clips(size: int, rng: np.random.Generator) -> tuple[Clip, Clip]:
    """A panning face clip and a noisy copy of it."""
    face = cv2.resize(skimage.data.astronaut()[:320, 80:400], (size, size), interpolation=cv2.INTER_AREA)
    gt = np.stack([np.roll(face, k, axis=1) for k in range(N)])  # [N, S, S, 3]
    pred = np.clip(gt + rng.normal(0, 8, gt.shape), 0, 255).astype(np.uint8)
    return Clip(pred, None, 25.0, "pred"), Clip(gt, None, 25.0, "gt")


def bench_psnr_ssim(pred: Clip, gt: Clip) -> None:
    size = gt.frames.shape[1]
    tp = torch.from_numpy(pred.frames).permute(0, 3, 1, 2).float() / 255  # [N, 3, S, S]
    tg = torch.from_numpy(gt.frames).permute(0, 3, 1, 2).float() / 255
    fp, fg = pred.frames.astype(np.float32) / 255, gt.frames.astype(np.float32) / 255

    def reference() -> None:
        for p, g in zip(fp, fg, strict=True):
            peak_signal_noise_ratio(g, p, data_range=1)
            structural_similarity(
                g,
                p,
                channel_axis=-1,
                data_range=1,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
            )

    ref = N / _seconds(reference)
    ours_one = N / _seconds(lambda: (psnr(tp, tg), ssim(tp, tg)))
    threads = DEFAULT_THREADS
    torch.set_num_threads(threads)
    ours_all = N / _seconds(lambda: (psnr(tp, tg), ssim(tp, tg)))
    torch.set_num_threads(1)
    print(
        f"{size}px PSNR+SSIM  skimage {ref:6.1f} f/s | ours 1 thread {ours_one:6.1f} f/s "
        f"(ratio {ours_one / ref:.2f}x) | ours {threads} threads {ours_all:6.1f} f/s (ratio {ours_all / ref:.2f}x)"
    )


def bench_full(models: MetricModels, pred: Clip, gt: Clip) -> None:
    """One timed ``score_clip`` of N_FULL frames after a 2-frame warm-up (model initialisation)."""
    size = gt.frames.shape[1]
    head = lambda clip, n: Clip(clip.frames[:n], None, clip.fps, clip.source)  # noqa: E731
    score_clip(models, head(pred, 2), head(gt, 2))
    start = time.perf_counter()
    columns, video_jod = score_clip(models, head(pred, N_FULL), head(gt, N_FULL))
    rate = N_FULL / (time.perf_counter() - start)
    means = ", ".join(f"{m} {np.nanmean(v):.3f}" for m, v in columns.items())
    print(
        f"{size}px full metric set ({', '.join(models.settings.metrics)}): {rate:5.2f} frames/s "
        f"[{means}, jod {video_jod:.2f}]"
    )


def main() -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    models = MetricModels(EvalSettings())  # defaults: all seven metrics, facenet / dlib / mediapipe / alex
    for size in (256, 512):
        pred, gt = _clips(size, rng)
        bench_psnr_ssim(pred, gt)
        bench_full(models, pred, gt)


if __name__ == "__main__":
    main()
