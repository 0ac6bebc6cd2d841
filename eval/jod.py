"""JOD: ColorVideoVDP (``cvvdp``, calibration shipped with it) of a test video against a reference video.

The display model changes the score (it sets the physical luminance and pixels per degree), so it is a
reported setting; ``standard_4k`` by default, with the sequence's own frame rate.
"""

from __future__ import annotations

from functools import cache

import torch

DEFAULT_DISPLAY = "standard_4k"


@cache
def _metric(display: str, device: str):  # noqa: ANN202 - pycvvdp.cvvdp
    import pycvvdp

    return pycvvdp.cvvdp(display_name=display, device=torch.device(device), quiet=True)


def jod(
    pred: torch.Tensor,
    reference: torch.Tensor,
    fps: float,
    display: str = DEFAULT_DISPLAY,
    device: str = "cpu",
) -> float:
    """JOD (10 = indistinguishable) of videos ``(T, 3, H, W)`` in [0,1] (display-encoded sRGB)."""
    if pred.shape != reference.shape or pred.ndim != 4 or pred.shape[1] != 3:
        raise ValueError(
            f"expected matching (T, 3, H, W) videos, got {tuple(pred.shape)} and {tuple(reference.shape)}"
        )
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    metric = _metric(display, device)
    test = pred.permute(0, 2, 3, 1).float().to(device)  # [T, H, W, 3]
    ref = reference.permute(0, 2, 3, 1).float().to(device)
    if test.shape[0] == 1:  # a single frame is an image for cvvdp
        score, _ = metric.predict(test[0], ref[0], dim_order="HWC")
    else:
        score, _ = metric.predict(test, ref, dim_order="FHWC", frames_per_second=fps)
    return float(score)
