"""An avatar fit at one resolution and rendered at a finer one shows the footprints the fit saw.

The rasterizer adds EPS2D px^2 to every projected Gaussian (3DGS's low-pass, gsplat's eps2d); a fit on coarse
views relies on it, and a finer render shrinks it with the pixel. resolution_dilation puts it back in world units.
"""

from __future__ import annotations

import torch

from geodiff4d.recon.rasterize import pixel_size, render_gaussians, resolution_dilation


def _footprint(size: int, scale: float, dilation: float = 0.0) -> tuple[float, float]:
    """(variance in m^2, alpha mass in m^2) of one tiny Gaussian 1 m in front of a size x size camera."""
    focal = 2.0 * size
    K = torch.tensor([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1]])
    scales = torch.full((1, 3), scale**2 + dilation).sqrt()
    image = render_gaussians(
        torch.tensor([[0.0, 0.0, 1.0]]),
        torch.tensor([[1.0, 0, 0, 0]]),
        scales,
        torch.tensor([0.5]),
        torch.ones(1, 3),
        torch.eye(4),
        K,
        size,
        size,
        backend="torch",
    )
    alpha = image.alpha.double()
    pixel = pixel_size(torch.eye(4), K, torch.tensor([0.0, 0.0, 1.0]))
    xs = torch.arange(size, dtype=torch.float64) + 0.5
    weight = alpha / alpha.sum()
    mean_x = (weight.sum(0) * xs).sum()
    variance = (weight.sum(0) * (xs - mean_x) ** 2).sum() * pixel**2
    return float(variance), float(alpha.sum() * pixel**2)


def test_a_finer_render_with_the_dilation_shows_the_training_footprint():
    scale, coarse, fine = 0.0005, 32, 128  # a Gaussian of 0.5 mm: under a pixel of either camera
    trained = pixel_size(
        torch.eye(4),
        torch.tensor([[2.0 * coarse, 0, 0], [0, 2.0 * coarse, 0], [0, 0, 1]]),
        torch.tensor([0.0, 0.0, 1.0]),
    )
    rendered = trained * coarse / fine
    seen, seen_mass = _footprint(coarse, scale)
    shrunk, _ = _footprint(fine, scale)
    restored, restored_mass = _footprint(fine, scale, resolution_dilation(trained, rendered))
    assert (
        shrunk < 0.2 * seen
    )  # without it the Gaussian shrinks with the pixel: the gaps of an aliased avatar
    # within 10 %: the coarse render samples a Gaussian of 0.55 px std, whose moments on the pixel grid read low
    assert abs(restored / seen - 1) < 0.1 and abs(restored_mass / seen_mass - 1) < 0.1
    assert resolution_dilation(trained, trained) == 0.0 and resolution_dilation(rendered, trained) == 0.0
