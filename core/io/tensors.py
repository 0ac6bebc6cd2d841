"""Float image tensors <-> the arrays image files hold: the project's convention at the I/O edge.

Torch code keeps images float32 in ``[0, 1]``, channel-first ``(..., C, H, W)``; files and numpy image code are
channel-last ``(..., H, W, C)``. These two functions are the only crossing, so the scale, the rounding and the
axis order are written once.
"""

from __future__ import annotations

import numpy as np
import torch

from geodiff4d.core.io.images import Rounding, from_float, to_float


def tensor_to_image(
    image: torch.Tensor, dtype: type = np.uint8, rounding: Rounding = "nearest"
) -> np.ndarray:
    """Float ``(..., C, H, W)`` in ``[0, 1]`` -> ``dtype`` ``(..., H, W, C)`` numpy (see :func:`from_float`)."""
    channels_last = image.detach().cpu().movedim(-3, -1).numpy()  # (..., C, H, W) -> (..., H, W, C)
    return from_float(channels_last, dtype, rounding)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8/uint16 ``(..., H, W, C)`` -> float32 ``(..., C, H, W)`` in ``[0, 1]`` (divided by the dtype's max)."""
    return torch.from_numpy(to_float(image)).movedim(-1, -3)  # (..., H, W, C) -> (..., C, H, W)
