"""JOD (ColorVideoVDP, standard_4k): a video against itself is 10, a blurred copy scores lower."""

from __future__ import annotations

import pytest
import skimage.data
import torch
import torchvision.transforms.functional as TF

from geodiff4d.eval.jod import jod


def test_jod_self_and_blur():
    frame = torch.from_numpy(skimage.data.astronaut()[::8, ::8].copy()).permute(2, 0, 1).float() / 255
    video = torch.stack([torch.roll(frame, k, dims=-1) for k in range(4)])  # [4, 3, 64, 64], a panning clip
    assert jod(video, video, fps=25) == pytest.approx(10.0, abs=1e-3)
    blurred = TF.gaussian_blur(video, 9, 2.0)
    assert jod(blurred, video, fps=25) < 9.0
    with pytest.raises(ValueError, match="fps"):
        jod(video, video, fps=0)
