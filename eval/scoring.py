"""Score one camera clip against its reference with every requested metric: per-frame rows + one JOD.

Loads each metric's model once (:class:`MetricModels`), so a Ray actor pays model loading once per run.
A face metric scores the frames whose reference (ground truth, driving frame or identity image) has a face: the
same frames for every method. A prediction without a face on such a frame is a miss and gets the metric's worst
value (:func:`worst_face_score`), so failing is never better than any prediction; docs/metrics.md states the rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np
import torch

from geodiff4d.core.io.tensors import image_to_tensor
from geodiff4d.datasets.packaged import ModelFileNotFound
from geodiff4d.eval.expression import expression_distance, make_expression_regressor
from geodiff4d.eval.identity import cosine, embed, make_embedder
from geodiff4d.eval.image_metrics import psnr, ssim
from geodiff4d.eval.inputs import Clip, InputError
from geodiff4d.eval.jod import jod
from geodiff4d.eval.landmarks import keypoint_distance, make_landmarker
from geodiff4d.eval.lpips_metric import load_lpips
from geodiff4d.eval.settings import HIGHER_IS_BETTER, MASKED_BACKGROUND, EvalSettings

PIXEL_BATCH = 16
CSIM_MISS = -1.0  # the minimum of a cosine: no pair of real faces can score lower
AED_CEILING = {  # the largest mean absolute coefficient difference an AED frame can score
    "mediapipe": 1.0,  # blendshape scores lie in [0,1], so 1 is the exact maximum
    "landmark_fit": 3.0,  # FLAME coefficients in standard deviations; larger fitted differences are clamped
}


def worst_face_score(settings: EvalSettings, metric: str, height: int, width: int) -> float:
    """What a miss scores (a frame whose reference has a face and whose prediction has none): CSIM -1, AKD the
    image diagonal in pixels, AED the regressor's ceiling. Measured values are bounded by it as well, so a miss
    is never better than a face, however wrong."""
    if metric == "csim":
        return CSIM_MISS
    if metric == "akd":
        return math.hypot(height, width)
    if metric == "aed":
        return AED_CEILING[settings.aed_backend]
    raise ValueError(f"{metric!r} is not a face metric")


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


def composite_pair(pred: Clip, ref: Clip, settings: EvalSettings, background: float) -> tuple[Clip, Clip]:
    """Prediction and reference on one grey ``background``. Self protocol: both with the ground truth's alpha.
    Cross protocol: each with its own (the avatar's render alpha, the driver's), never another head's silhouette."""
    pred_alpha = pred.masks if settings.protocol == "cross" else ref.masks
    for alpha, clip in ((pred_alpha, pred), (ref.masks, ref)):
        if alpha is None:
            raise InputError(f"compositing needs an alpha for {clip.source}, none found beside it")
    return composite_on_background(pred, pred_alpha, background), composite_on_background(
        ref, ref.masks, background
    )


def face_scores(
    frames: np.ndarray,
    references: list,
    extract: Callable[[np.ndarray], object | None],
    distance: Callable[[object, object], float | None],
    worst: float,
    higher_is_better: bool,
) -> tuple[list[float], list[bool]]:
    """Per-frame face metric of ``frames`` [T, H, W, 3] against the reference features (None: no face there).
    A frame whose reference has no face is not scored (NaN, no miss); a prediction without a face scores
    ``worst`` and is a miss; a measured value is bounded by ``worst``. Returns the values and the miss flags."""
    bounded = max if higher_is_better else min
    values, missed = [], []
    for frame, reference in zip(frames, references, strict=True):
        value = None if reference is None else distance(extract(frame), reference)
        missed.append(reference is not None and value is None)
        if reference is None:
            values.append(math.nan)
        else:
            values.append(worst if value is None else bounded(float(value), worst))
    return values, missed


ALPHA_METRICS = {"psnr", "ssim", "lpips", "jod"}  # what --masked restricts to the GT foreground
# a GT alpha with no pixel at least this opaque has no foreground: the frame is not scored
EMPTY_FOREGROUND = 0.5


def scored_foreground(ref: Clip, settings: EvalSettings) -> np.ndarray:
    """[T] bool, the frames pixel metrics and JOD score: every frame unless the GT alpha is in use (``masked`` or
    ``background``); then only frames whose GT alpha has a foreground, since an empty one scores perfect."""
    if ref.masks is None or not (settings.masked or settings.background is not None):
        return np.ones(len(ref.frames), bool)
    return ref.masks.reshape(len(ref.masks), -1).max(axis=1) >= EMPTY_FOREGROUND


def pixel_clips(pred: Clip, ref: Clip, settings: EvalSettings) -> tuple[Clip, Clip]:
    """What the pixel metrics and JOD see. ``masked``: prediction and GT composited on one grey
    (:func:`composite_pair`; ``background`` has done it already), so no pixel of the prediction outside the mask
    reaches a score, not even through SSIM's window, LPIPS's receptive fields or JOD's spatial pooling."""
    if not settings.masked or settings.background is not None or not set(settings.metrics) & ALPHA_METRICS:
        return pred, ref
    return composite_pair(pred, ref, settings, MASKED_BACKGROUND)


def pixel_columns(models: MetricModels, pred: Clip, ref: Clip, keep: np.ndarray) -> dict[str, list[float]]:
    """PSNR/SSIM/LPIPS per frame (masked: averaged over the GT foreground), NaN where ``keep`` [T] is False."""
    settings, n = models.settings, len(pred.frames)
    mask = torch.from_numpy(ref.masks).float() if settings.masked else None  # [T, H, W]
    columns = {}
    for name, fn in (("psnr", psnr), ("ssim", ssim), ("lpips", models.lpips)):
        if name not in settings.metrics:
            continue
        if fn is None:  # LPIPS weights missing: reported as unavailable, no number filled in
            columns[name] = [math.nan] * n
            continue
        values = []
        for start in range(0, n, PIXEL_BATCH):
            sl, device = slice(start, start + PIXEL_BATCH), settings.device
            m = None if mask is None else mask[sl].to(device)
            values.append(
                fn(
                    image_to_tensor(pred.frames[sl]).to(device), image_to_tensor(ref.frames[sl]).to(device), m
                ).cpu()
            )
        columns[name] = np.where(keep, torch.cat(values).numpy(), np.nan).tolist()
    return columns


def face_columns(models: MetricModels, pred: Clip, ref: Clip, identity: np.ndarray | None) -> dict[str, list]:
    """CSIM/AKD/AED per frame and their ``{metric}_miss`` flags (:func:`face_scores`)."""
    settings, n = models.settings, len(pred.frames)
    height, width = pred.frames.shape[1:3]
    columns = {}
    for name, extract, distance in (
        ("csim", lambda image: embed(models.embedder, image), cosine),
        ("akd", models.landmarker, keypoint_distance),
        ("aed", models.regressor, expression_distance),
    ):
        if name not in settings.metrics:
            continue
        if name == "csim" and identity is not None:
            references = [extract(identity)] * n
        else:
            references = [extract(r) for r in ref.frames]
        columns[name], columns[f"{name}_miss"] = face_scores(
            pred.frames,
            references,
            extract,
            distance,
            worst_face_score(settings, name, height, width),
            HIGHER_IS_BETTER[name],
        )
    return columns


def score_clip(
    models: MetricModels, pred: Clip, ref: Clip, identity: np.ndarray | None = None
) -> tuple[dict, float]:
    """Per-frame metric columns ``{metric: [T] floats}`` (face metrics also ``{metric}_miss: [T] bools``) and
    the clip's JOD (NaN when not requested, or when no frame has a GT foreground to score).

    ``ref`` is the ground truth (self protocol) or the driving clip (cross); with ``identity`` given, CSIM
    compares each predicted frame with that source image instead of the reference frame.
    """
    settings = models.settings
    keep = scored_foreground(ref, settings)
    pixel_pred, pixel_ref = pixel_clips(pred, ref, settings)
    columns = pixel_columns(models, pixel_pred, pixel_ref, keep)
    columns.update(face_columns(models, pred, ref, identity))
    video_jod = math.nan
    if "jod" in settings.metrics and keep.any():  # JOD of the frames with a foreground, in their order
        video_jod = jod(
            image_to_tensor(pixel_pred.frames[keep]),
            image_to_tensor(pixel_ref.frames[keep]),
            fps=ref.fps,
            display=settings.jod_display,
            device=settings.device,
        )
    return columns, video_jod
