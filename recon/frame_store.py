"""Training frames kept compact: uint8 RGB and mask, int8 normals, decoded to a float32 :class:`View` only
when a step draws it.

Why: a subject at the paper's scale (200 frames x 12 views x 512 px) takes 17.6 GB as float32 views
(28 bytes a pixel: RGB 12, mask 4, normal 12) and 4.4 GB here (7 bytes a pixel), so several subjects' actors
fit on one node. RGB and mask decode exactly to what the 8-bit PNGs hold; a normal is quantized to 1/127 per
component (under half a degree) and renormalized on decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from geodiff4d.core.io.images import from_float, to_float
from geodiff4d.core.io.tensors import image_to_tensor
from geodiff4d.datasets.cameras import Camera
from geodiff4d.datasets.frame_folder import FrameImage
from geodiff4d.recon.fit import View

NORMAL_LEVELS = 127  # int8 snorm: -1..1 -> -127..127


@dataclass(frozen=True)
class _CompactView:
    frame: int
    world_to_cam: Tensor  # [4, 4]
    K: Tensor  # [3, 3]
    rgb: np.ndarray  # [H, W, 3] uint8, as captured (not yet on black)
    mask: np.ndarray  # [H, W] uint8
    normal: np.ndarray | None  # [H, W, 3] int8 unit normals x 127

    @property
    def nbytes(self) -> int:
        return self.rgb.nbytes + self.mask.nbytes + (self.normal.nbytes if self.normal is not None else 0)


class FrameStore(Sequence[View]):
    """A subject's training views, compact in memory; ``store[i]`` decodes view ``i`` to a float32 View."""

    def __init__(self) -> None:
        self._views: list[_CompactView] = []

    def add(
        self,
        frame: int,
        world_to_cam: Tensor,
        K: Tensor,
        rgb: np.ndarray,
        mask: np.ndarray,
        normal: np.ndarray | None,
    ) -> None:
        """One view from float arrays in [0, 1] (rgb [H, W, 3], mask [H, W]) and unit normals [H, W, 3]."""
        quantized = None
        if normal is not None:
            quantized = np.rint(np.clip(normal, -1, 1) * NORMAL_LEVELS).astype(np.int8)
        self._views.append(_CompactView(frame, world_to_cam, K, from_float(rgb), from_float(mask), quantized))

    def add_image(self, frame: int, camera: Camera, image: FrameImage) -> None:
        """One frame folder image seen by ``camera``, as the subject's frame ``frame``."""
        self.add(
            frame,
            torch.tensor(camera.world_to_cam, dtype=torch.float32),
            torch.tensor(camera.K, dtype=torch.float32),
            image.rgb,
            image.mask,
            image.normal,
        )

    def __len__(self) -> int:
        return len(self._views)

    @overload
    def __getitem__(self, index: int) -> View: ...

    @overload
    def __getitem__(self, index: slice) -> list[View]: ...

    def __getitem__(self, index: int | slice) -> View | list[View]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return _decode(self._views[index])

    @property
    def nbytes(self) -> int:
        """Bytes of pixel data held (what the float32 views would take: 4x RGB and mask, 4x normals)."""
        return sum(v.nbytes for v in self._views)


def _decode(view: _CompactView) -> View:
    mask = torch.from_numpy(to_float(view.mask))  # [H, W]
    rgb = image_to_tensor(view.rgb) * mask  # [3, H, W] on black
    normal = None
    if view.normal is not None:
        unit = F.normalize(torch.from_numpy(view.normal).permute(2, 0, 1).float(), dim=0)  # [3, H, W]
        normal = unit * mask
    return View(view.frame, view.world_to_cam, view.K, rgb, mask, normal)
