"""The compact frame store decodes RGB and mask exactly as the float32 path read them, normals within half a
degree, in a quarter of the memory."""

from __future__ import annotations

import numpy as np
import torch

from geodiff4d.datasets.frame_folder import read_frames, write_frame
from geodiff4d.datasets.normal_maps import angular_error_deg
from geodiff4d.recon.frame_store import FrameStore


def test_store_decodes_what_the_png_frames_hold_in_a_quarter_of_the_memory(tmp_path):
    g = torch.Generator().manual_seed(0)
    for frame in range(3):
        rgb = torch.rand(3, 16, 20, generator=g)
        alpha = (torch.rand(16, 20, generator=g) > 0.3).float()
        normal = torch.nn.functional.normalize(torch.randn(3, 16, 20, generator=g), dim=0)
        normal[2] = normal[2].abs()  # facing the camera, as rendered normals are
        write_frame(tmp_path, "s", "EXP-1", "cam", frame, rgb, alpha, normal)
    images = read_frames(tmp_path, "s", "EXP-1")
    store = FrameStore()
    w2c, K = torch.eye(4), torch.eye(3)
    for image in images:
        store.add(image.frame, w2c, K, image.rgb, image.mask, image.normal)
    float_bytes = 0
    for image, view in zip(images, store, strict=True):
        mask = torch.from_numpy(image.mask)  # the float32 views recon held before, built the same way
        float_rgb, float_normal = (
            torch.from_numpy(image.rgb).permute(2, 0, 1) * mask,
            torch.from_numpy(image.normal).permute(2, 0, 1) * mask,
        )
        float_bytes += sum(t.numel() * 4 for t in (float_rgb, mask, float_normal))
        assert view.frame == image.frame and view.rgb.dtype == torch.float32
        assert torch.equal(view.mask, mask) and torch.equal(view.rgb, float_rgb)
        fg = image.mask > 0.5
        error = angular_error_deg(
            view.normal.permute(1, 2, 0).numpy()[fg], float_normal.permute(1, 2, 0).numpy()[fg]
        )
        assert float(np.max(error)) < 0.5
        assert torch.equal(view.normal[:, ~torch.from_numpy(fg)], torch.zeros(3, int((~fg).sum())))
    assert store.nbytes == 3 * 16 * 20 * 7 and store.nbytes <= 0.3 * float_bytes
    assert [v.frame for v in store[1:]] == [1, 2]
