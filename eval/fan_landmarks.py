"""AKD backend ``fan``: the ``face-alignment`` package's 2D FAN (2DFAN-4), from local weights only.

Papers measure AKD with FAN. The package downloads its checkpoint into ``torch.hub.get_dir()/checkpoints``
under the file name of its URL; we load the same file through the package's own loading code by pointing
its hub folder at a private folder holding (a link to) the user's checkpoint, after checking that the file
exists, so nothing is ever downloaded. Faces come from our best-scoring dlib face (default) or from the
package's own S3FD detector, whose weights must then lie beside the FAN checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from geodiff4d.datasets.packaged import ModelFileNotFound
from geodiff4d.eval.face_detection import DlibDetector, Face, best_face

FAN_CHECKPOINT = "2DFAN4-11f355bf06.pth.tar"  # face_alignment's cache name of its 2DFAN-4 URL
S3FD_CHECKPOINT = "s3fd-619a316812.pth"  # ... and of its S3FD face detector
FAN_WEIGHTS_ENV = "GEODIFF4D_FAN_WEIGHTS"
FAN_DETECTORS = ("dlib", "sfd")


def fan_checkpoint_candidates(weights: str | Path | None = None, name: str = FAN_CHECKPOINT) -> list[Path]:
    """Where ``name`` is looked for: ``weights`` (a checkpoint file, a checkpoints folder, a torch hub folder or
    a TORCH_HOME), else ``$GEODIFF4D_FAN_WEIGHTS``, else the package's own cache ``torch.hub.get_dir()``."""
    given = weights if weights is not None else os.environ.get(FAN_WEIGHTS_ENV)
    if given is None:
        return [Path(torch.hub.get_dir()) / "checkpoints" / name]
    path = Path(given)
    if path.is_file():
        return [path]
    return [path / name, path / "checkpoints" / name, path / "hub" / "checkpoints" / name]


def find_fan_file(weights: str | Path | None = None, name: str = FAN_CHECKPOINT) -> Path:
    """The existing checkpoint; :class:`ModelFileNotFound` names it and every place looked in."""
    candidates = fan_checkpoint_candidates(weights, name)
    for path in candidates:
        if path.is_file():
            return path
    source = (
        f"--fan-weights {weights}"
        if weights is not None
        else (f"${FAN_WEIGHTS_ENV}" if os.environ.get(FAN_WEIGHTS_ENV) else "torch hub cache")
    )
    raise ModelFileNotFound(f"face-alignment weights {name} (from {source})", candidates)


@contextmanager
def _package_cache_holding(checkpoint: Path) -> Iterator[None]:
    """Point ``torch.hub.get_dir()`` at a private folder whose ``checkpoints/`` holds ``checkpoint`` under the
    package's own file name, so ``face_alignment`` finds it there instead of downloading."""
    previous = torch.hub._hub_dir  # noqa: SLF001 - None unless set_dir was called; restored exactly
    with tempfile.TemporaryDirectory(prefix="fan-hub-") as hub:
        (Path(hub) / "checkpoints").mkdir()
        (Path(hub) / "checkpoints" / FAN_CHECKPOINT).symlink_to(checkpoint.resolve())
        torch.hub.set_dir(hub)
        try:
            yield
        finally:
            torch.hub._hub_dir = previous  # noqa: SLF001


class FanLandmarks:
    """68 float landmarks [68, 2] (x, y pixels, sub-pixel) of the best-scoring face, None when there is none."""

    name = "fan"

    def __init__(self, weights: str | Path | None = None, detector: str = "dlib", device: str = "cpu"):
        if detector not in FAN_DETECTORS:
            raise ValueError(f"FAN face detector must be one of {FAN_DETECTORS}, got {detector!r}")
        import face_alignment

        self.checkpoint = find_fan_file(weights)
        package_detector, detector_kwargs = "folder", {}  # "folder": boxes are given, no detector weights
        if detector == "sfd":
            s3fd = find_fan_file(self.checkpoint.parent, S3FD_CHECKPOINT)
            package_detector, detector_kwargs = "sfd", {"path_to_detector": str(s3fd)}
        with _package_cache_holding(self.checkpoint):
            self._fan = face_alignment.FaceAlignment(
                face_alignment.LandmarksType.TWO_D,
                device=device,
                face_detector=package_detector,
                face_detector_kwargs=detector_kwargs,
                compile=False,
            )
        self.detector = DlibDetector() if detector == "dlib" else None

    def faces(self, image: np.ndarray) -> list[Face]:
        if self.detector is not None:
            return self.detector.detect(image)
        boxes = self._fan.face_detector.detect_from_image(
            np.ascontiguousarray(image)
        )  # [x0, y0, x1, y1, score]
        return [Face(tuple(float(v) for v in b[:4]), float(b[4])) for b in boxes]

    @torch.no_grad()
    def landmarks_of(self, image: np.ndarray, face: Face) -> np.ndarray:
        """``FaceAlignment.get_landmarks_from_image`` for one box, step for step with the package's own functions,
        except that the heatmap maxima go back to image pixels in float: the package's ``transform_np`` truncates
        them to int32, which would bring back the whole-pixel noise floor this backend exists to avoid."""
        from face_alignment.utils import (
            CENTER_Y_OFFSET,
            HEATMAP_RESOLUTION,
            SCALE_FACTOR,
            crop,
            flip,
            get_preds_fromhm,
        )

        x0, y0, x1, y1 = face.box
        center = np.array([(x0 + x1) / 2.0, (y0 + y1) / 2.0 - (y1 - y0) * CENTER_Y_OFFSET])
        scale = (x1 - x0 + y1 - y0) / self._fan.face_detector.reference_scale
        patch = crop(np.ascontiguousarray(image), center, scale).transpose(2, 0, 1).astype(np.float32) / 255.0
        net, fan = self._fan.face_alignment_net, self._fan
        x = torch.from_numpy(patch)[None].to(fan.device, dtype=fan.dtype)  # [1, 3, 256, 256]
        heatmaps = net(x)[-1]  # [1, 68, 64, 64]
        if fan.flip_input:
            heatmaps = heatmaps + flip(net(flip(x))[-1], is_label=True)
        points, _, _ = get_preds_fromhm(
            heatmaps.to("cpu", torch.float32).numpy()
        )  # [1, 68, 2] heatmap pixels
        side = SCALE_FACTOR * scale  # the crop's side in image pixels
        return points[0].astype(np.float64) * side / HEATMAP_RESOLUTION + center - side / 2  # [68, 2]

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        face = best_face(self.faces(image))
        return None if face is None else self.landmarks_of(image, face)
