"""Score one camera clip against its reference with every requested metric: per-frame rows + one JOD.

Loads each metric's model once (:class:`MetricModels`), so a Ray actor pays model loading once per run.
A face metric whose face is not found in either frame records NaN and a miss; nothing is dropped.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from geodiff4d.core.io.tensors import image_to_tensor
from geodiff4d.datasets.packaged import ModelFileNotFound
from geodiff4d.eval.expression import expression_distance, make_expression_regressor
from geodiff4d.eval.identity import cosine, embed, make_embedder
from geodiff4d.eval.image_metrics import psnr, ssim
from geodiff4d.eval.inputs import Clip
from geodiff4d.eval.jod import jod
from geodiff4d.eval.landmarks import keypoint_distance, make_landmarker
from geodiff4d.eval.lpips_metric import load_lpips
from geodiff4d.eval.settings import EvalSettings

PIXEL_BATCH = 16


class MetricModels:
    """The networks behind the requested metrics, loaded once; LPIPS may be unavailable (``lpips_missing``)."""

    def __init__(self, settings: EvalSettings):
        m = set(settings.metrics)
        self.settings = settings
        self.embedder = make_embedder(settings.csim_backend, settings.arcface_model) if "csim" in m else None
        self.landmarker = (
            make_landmarker(
                settings.akd_backend, settings.fan_weights, settings.fan_detector, settings.device
            )
            if "akd" in m
            else None
        )
        self.regressor = (
            make_expression_regressor(settings.aed_backend, settings.aed_head_model) if "aed" in m else None
        )
        self.lpips, self.lpips_missing = None, None
        if "lpips" in m:
            try:
                self.lpips = load_lpips(settings.lpips_net, settings.lpips_checkpoint, settings.device)
            except ModelFileNotFound as missing:
                self.lpips_missing = missing


def resize_clip(clip: Clip, height: int | None) -> Clip:
    """Resize frames (area filter) and masks to ``height`` rows, keeping the aspect ratio."""
    if height is None or clip.frames.shape[1] == height:
        return clip
    width = round(clip.frames.shape[2] * height / clip.frames.shape[1])
    frames = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in clip.frames])
    masks = (
        None
        if clip.masks is None
        else np.stack([cv2.resize(m, (width, height), interpolation=cv2.INTER_AREA) for m in clip.masks])
    )
    return Clip(frames, masks, clip.fps, clip.source)


def composite_on_background(clip: Clip, alpha: np.ndarray, background: float) -> Clip:
    """``clip`` over a constant grey ``background`` (in [0,1]) with ``alpha`` [T, H, W], the ground truth's: applied
    to prediction and ground truth alike, a method that renders no backdrop is judged on the head alone."""
    a = alpha[..., None].astype(np.float32)  # [T, H, W, 1]
    mixed = clip.frames.astype(np.float32) * a + np.float32(background * 255.0) * (1.0 - a)
    return Clip(np.rint(mixed).astype(np.uint8), clip.masks, clip.fps, clip.source)


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _pixel_columns(
    models: MetricModels, pred: Clip, ref: Clip, mask: torch.Tensor | None
) -> dict[str, list[float]]:
    """PSNR, SSIM and LPIPS per frame (those requested), computed in batches of ``PIXEL_BATCH`` frames."""
    metrics, device, n = set(models.settings.metrics), models.settings.device, len(pred.frames)
    columns: dict[str, list[float]] = {}
    for name, fn in (("psnr", psnr), ("ssim", ssim), ("lpips", models.lpips)):
        if name not in metrics:
            continue
        if fn is None:  # LPIPS weights missing: reported as unavailable, no number filled in
            columns[name] = [math.nan] * n
            continue
        values = []
        for start in range(0, n, PIXEL_BATCH):
            sl = slice(start, start + PIXEL_BATCH)
            m = None if mask is None else mask[sl].to(device)
            predicted, reference = image_to_tensor(pred.frames[sl]), image_to_tensor(ref.frames[sl])
            values.append(fn(predicted.to(device), reference.to(device), m).cpu())
        columns[name] = torch.cat(values).tolist()
    return columns


def score_clip(
    models: MetricModels, pred: Clip, ref: Clip, identity: np.ndarray | None = None
) -> tuple[dict, float]:
    """Per-frame metric columns ``{metric: [T] floats}`` and the clip's JOD (NaN when not requested).

    ``ref`` is the ground truth (self protocol) or the driving clip (cross); with ``identity`` given, CSIM
    compares each predicted frame with that source image instead of the reference frame.
    """
    metrics, settings = set(models.settings.metrics), models.settings
    mask = torch.from_numpy(ref.masks).float() if settings.masked and ref.masks is not None else None
    if settings.masked and ref.masks is None and metrics & {"psnr", "ssim", "lpips"}:
        raise ValueError(f"masked evaluation needs ground-truth masks, none for {ref.source}")
    columns: dict[str, list[float]] = _pixel_columns(models, pred, ref, mask)
    if "csim" in metrics:
        ref_embedding = embed(models.embedder, identity) if identity is not None else None
        columns["csim"] = [
            _nan(
                cosine(
                    embed(models.embedder, p),
                    ref_embedding if identity is not None else embed(models.embedder, r),
                )
            )
            for p, r in zip(pred.frames, ref.frames, strict=True)
        ]
    if "akd" in metrics:
        columns["akd"] = [
            _nan(keypoint_distance(models.landmarker(p), models.landmarker(r)))
            for p, r in zip(pred.frames, ref.frames, strict=True)
        ]
    if "aed" in metrics:
        columns["aed"] = [
            _nan(expression_distance(models.regressor(p), models.regressor(r)))
            for p, r in zip(pred.frames, ref.frames, strict=True)
        ]
    video_jod = math.nan
    if "jod" in metrics:
        video_jod = jod(
            image_to_tensor(pred.frames),
            image_to_tensor(ref.frames),
            fps=ref.fps,
            display=settings.jod_display,
            device=settings.device,
        )
    return columns, video_jod
