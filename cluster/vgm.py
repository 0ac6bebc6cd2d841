"""The ``vgm`` method kind: the diffusion model's own frames ("VGM" in the paper) scored at the hold-out cameras.

Per scored unit of the self and cross protocols, ``geodiff4d generate`` samples the unit's sequence at the
hold-out cameras from the avatar subject's reference (the train camera's first frame, as the geodiff4d method
generates from), with its identity from that subject's training-sequence tracking and the motion from the
scored sequence's tracking; no avatar is built. Generation samples square head crops at the model's
resolution, so each frame is warped back into the hold-out camera's full image (grey outside the crop) and
scored there like every other method's frames.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from geodiff4d.core.io.images import read_rgb8, write_png
from geodiff4d.datasets.cameras import Camera
from geodiff4d.datasets.frame_folder import read_cameras


def crop_window(full: Camera, crop: Camera) -> tuple[float, float, float]:
    """(x, y, side) of the square window of ``full``'s image that ``crop`` sees: generation's cameras are
    ``full.cropped(x, y, side, side).resized(R, R)``, so the scale is the ratio of focal lengths and the offset
    follows from the principal points (pixel-centre convention, as ``Camera.resized``)."""
    scale = crop.K[0, 0] / full.K[0, 0]  # R / side
    x = full.K[0, 2] - ((crop.K[0, 2] + 0.5) / scale - 0.5)
    y = full.K[1, 2] - ((crop.K[1, 2] + 0.5) / scale - 0.5)
    return float(x), float(y), float(crop.width / scale)


def uncrop(
    image: np.ndarray, window: tuple[float, float, float], width: int, height: int, fill: int
) -> np.ndarray:
    """A square crop [R, R, 3] put back at ``window`` of a ``width`` x ``height`` image (bilinear), ``fill``
    grey outside it: full-image pixel u lies at crop pixel (u - x + 0.5) * R / side - 0.5."""
    x, y, side = window
    scale = image.shape[1] / side
    to_crop = np.array([[scale, 0, scale * (0.5 - x) - 0.5], [0, scale, scale * (0.5 - y) - 0.5]])
    return cv2.warpAffine(
        image,
        to_crop,
        (width, height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(fill, fill, fill),
    )


def place_frames(
    generated: Path, subject: str, sequence: str, full_cameras: Path, truth: Path, out: Path, fill: int
) -> int:
    """Generated frames of ``subject``/``sequence`` warped into the full hold-out images of ``full_cameras``
    (a cameras JSON), written under ``out/{camera}/`` with the file names of the ground truth's frames in
    ``truth/{camera}/`` (the i-th generated frame is the i-th scored frame); returns the frames written."""
    crops = read_cameras(generated / "cameras" / subject / f"{sequence}.json")
    full, written = read_cameras(full_cameras), 0
    for serial, crop in crops.items():
        names = sorted(p.name for p in (truth / serial).glob("*.png"))
        window, camera = crop_window(full[serial], crop), full[serial]
        sampled = sorted((generated / "rgb" / subject / sequence / serial).glob("*.png"))
        if len(sampled) != len(names):
            raise RuntimeError(
                f"vgm: {len(sampled)} generated frames of {subject}/{sequence}/{serial}, {len(names)} scored"
            )
        for path, name in zip(sampled, names, strict=True):
            write_png(out / serial / name, uncrop(read_rgb8(path), window, camera.width, camera.height, fill))
            written += 1
    return written
