"""The report's side-by-side strip: per protocol one frame per subject, the ground truth beside every method, as
small embedded JPEG thumbnails composited the way the run scored them, so a reader sees what the numbers mean.

An evaluation run records where its frames are (``run.json`` "sources"); a run without them gets no strip.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from geodiff4d.core.io.images import encode_jpeg
from geodiff4d.eval.inputs import (
    Clip,
    FolderSource,
    InputError,
    match_cameras,
    open_ground_truth,
    sibling_tree,
)
from geodiff4d.eval.scoring import composite_on_background
from geodiff4d.eval.settings import MASKED_BACKGROUND, EvalSettings

THUMB_HEIGHT = 96  # pixels: a few KB of JPEG per thumbnail
JPEG_QUALITY = 80
MAX_SUBJECTS = 8  # rows per protocol, so the page stays bounded: at most MAX_SUBJECTS x (methods + 1) images


@dataclass(frozen=True)
class Thumbnail:
    label: str  # "ground truth" or the method's name
    subject: str
    jpeg_base64: str | None  # None: the method has no frame there


@dataclass(frozen=True)
class StripRow:
    subject: str
    sequence: str
    camera: str
    frame: int  # index into the scored sequence
    thumbnails: list[Thumbnail]


def thumbnail(image: np.ndarray) -> str:
    """[H, W, 3] uint8 -> a THUMB_HEIGHT px high JPEG, base64 (aspect kept)."""
    height, width = image.shape[:2]
    size = (max(1, round(width * THUMB_HEIGHT / height)), THUMB_HEIGHT)
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return base64.b64encode(encode_jpeg(small, quality=JPEG_QUALITY)).decode()


def _backdrop(settings: EvalSettings) -> float | None:
    """The grey the run composited on (``--background``, else ``--masked``'s), None for frames as they are."""
    return (
        settings.background
        if settings.background is not None
        else (MASKED_BACKGROUND if settings.masked else None)
    )


def _scored_frame(clip: Clip, alpha: np.ndarray | None, grey: float | None, index: int) -> np.ndarray:
    """Frame ``index`` of ``clip`` as scored: composited on ``grey`` with ``alpha`` when the run did."""
    if grey is None or alpha is None:
        return clip.frames[index]
    return composite_on_background(clip, alpha, grey).frames[index]


def _method_frame(
    name: str, root: Path, truth: Clip, unit: tuple[str, str], camera: str, index: int, settings: EvalSettings
) -> str | None:
    """One method's thumbnail at the strip's frame, None where it has none (not that unit, camera or frame)."""
    cross = settings.protocol == "cross"
    source = FolderSource(name, root, sibling_tree(root, "mask") if cross else None, truth.fps)
    try:
        clip = source.clip(*unit, next(iter(match_cameras(name, source.cameras(*unit), [camera], ""))))
    except (InputError, OSError):
        return None
    if len(clip.frames) <= index:
        return None
    image = _scored_frame(clip, clip.masks if cross else truth.masks, _backdrop(settings), index)
    if image.shape[:2] != truth.frames.shape[1:3]:
        image = cv2.resize(image, truth.frames.shape[2:0:-1], interpolation=cv2.INTER_AREA)
    return thumbnail(image)


def strip_rows(meta: dict, units: set[tuple[str, str]], not_covered: list[str]) -> list[StripRow]:
    """Per subject (the first MAX_SUBJECTS, each at its first unit every method covered, first camera, middle
    frame) the ground truth and every method's frame; methods in ``not_covered`` show as empty."""
    sources = meta.get("sources")
    if not sources or not units:
        return []
    settings = EvalSettings(**meta["settings"])
    truth_source = open_ground_truth(sources["gt"], sources.get("gt_mask"), sources.get("fps", 25.0))
    methods = {**sources["methods"], **dict.fromkeys(not_covered)}
    rows = []
    for subject in sorted({s for s, _ in units})[:MAX_SUBJECTS]:
        unit = min(u for u in units if u[0] == subject)
        camera = truth_source.cameras(*unit)[0]
        truth = truth_source.clip(*unit, camera)
        index = len(truth.frames) // 2
        grey = _backdrop(settings)
        thumbs = [
            Thumbnail("ground truth", subject, thumbnail(_scored_frame(truth, truth.masks, grey, index)))
        ]
        for name, root in sorted(methods.items()):
            frame = (
                None
                if root is None
                else _method_frame(name, Path(root), truth, unit, camera, index, settings)
            )
            thumbs.append(Thumbnail(name, subject, frame))
        rows.append(StripRow(subject, unit[1], camera, index, thumbs))
    return rows
