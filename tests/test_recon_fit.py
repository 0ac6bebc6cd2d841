"""Fitting: losses decrease, densification keeps the binding, and resume reproduces the loss sequence exactly."""

from __future__ import annotations

import torch

from geodiff4d.recon.binding import render_bound
from geodiff4d.recon.fit import FitConfig, Fitter, FixedVertices, View
from geodiff4d.recon.gaussians import BoundGaussians
from geodiff4d.recon.losses import ssim
from geodiff4d.recon.rotations import axis_angle_to_rotmat


def grid_mesh(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A bumpy n x n vertex sheet facing +z (toward cameras placed at -z... see _camera)."""
    ys, xs = torch.meshgrid(torch.linspace(-0.1, 0.1, n), torch.linspace(-0.1, 0.1, n), indexing="ij")
    vertices = torch.stack([xs, ys, 0.02 * torch.sin(20 * xs) * torch.cos(15 * ys)], -1).reshape(-1, 3)
    faces = []
    for r in range(n - 1):
        for c in range(n - 1):
            i = r * n + c
            faces += [[i, i + 1, i + n], [i + 1, i + n + 1, i + n]]
    return vertices, torch.tensor(faces)


def _camera(yaw: float) -> torch.Tensor:
    w2c = torch.eye(4)
    w2c[:3, :3] = axis_angle_to_rotmat(torch.tensor([0.0, yaw, 0.0])) @ torch.diag(
        torch.tensor([1.0, -1.0, -1.0])
    )
    w2c[2, 3] = 0.5
    return w2c


def make_problem(size: int = 24):
    vertices, faces = grid_mesh()
    frames = torch.stack(
        [vertices, vertices + torch.tensor([0.0, 0.0, 0.01]) * vertices[:, :1] * 10]
    )  # [2, V, 3]
    teacher = BoundGaussians.on_faces(len(faces), 2, torch.Generator().manual_seed(9), rgb=0.5)
    with torch.no_grad():
        teacher.sh_dc.copy_(torch.randn(len(teacher), 3, generator=torch.Generator().manual_seed(1)))
        teacher.opacity_logit.fill_(3.0)
    K = torch.tensor([[size * 1.2, 0, (size - 1) / 2], [0, size * 1.2, (size - 1) / 2], [0, 0, 1.0]])
    views = []
    for frame in range(2):
        for yaw in (-0.3, 0.0, 0.3):
            w2c = _camera(yaw)
            with torch.no_grad():
                out = render_bound(teacher, frames[frame], faces, w2c, K, size, size)
            mask = (out.alpha > 0.5).float()
            views.append(
                View(frame, w2c, K, out.rgb, mask, out.normal / out.alpha.clamp_min(1e-6)[None] * mask)
            )
    return frames, faces, views


def _student(n_faces: int) -> BoundGaussians:
    return BoundGaussians.on_faces(n_faces, 1, torch.Generator().manual_seed(4), sh_degree=1)


def test_ssim_of_identical_images_is_one():
    image = torch.rand(3, 20, 20, generator=torch.Generator().manual_seed(0))
    assert abs(float(ssim(image, image)) - 1.0) < 1e-6


def test_fit_reduces_loss():
    frames, faces, views = make_problem()
    fitter = Fitter(_student(len(faces)), FixedVertices(frames), faces, views, FitConfig(steps=40))
    fitter.run(40)
    first, last = sum(fitter.losses[:5]) / 5, sum(fitter.losses[-5:]) / 5
    assert last < 0.7 * first


def test_resume_reproduces_uninterrupted_losses(tmp_path):
    frames, faces, views = make_problem()
    config = FitConfig(
        steps=12,
        adaptive_control=True,
        densify_from=0,
        densify_every=4,
        densify_until=9,
        opacity_reset_every=10,
        densify_grad_threshold=1e-6,
        checkpoint_every=6,
        sh_increase_every=5,
    )
    full = Fitter(_student(len(faces)), FixedVertices(frames), faces, views, config)
    full.run(12)
    assert len(full.gaussians) > len(faces)  # densification happened, binding kept
    assert set(full.gaussians.face_index.tolist()) == set(range(len(faces)))
    interrupted = Fitter(_student(len(faces)), FixedVertices(frames), faces, views, config)
    ckpt = tmp_path / "ckpt.safetensors"
    interrupted.run(7, checkpoint=ckpt)  # saves at step 6 and at 7; keep the step-6 one
    interrupted = Fitter(_student(len(faces)), FixedVertices(frames), faces, views, config)
    interrupted.run(6, checkpoint=ckpt)
    resumed = Fitter.resume(ckpt, FixedVertices(frames), faces, views, config)
    assert resumed.step_index == 6 and resumed.losses == full.losses[:6]
    resumed.run(12)
    assert resumed.losses == full.losses  # bit-exact
    for name, value in full.gaussians.tensors().items():
        torch.testing.assert_close(resumed.gaussians.tensors()[name], value, atol=0, rtol=0)


def test_ssim_matches_depthwise_convolution_definition():
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(3, 17, 23, generator=g), torch.rand(3, 17, 23, generator=g)
    x = torch.arange(11, dtype=torch.float32) - 5
    w = torch.exp(-(x**2) / 4.5)
    w = (w[:, None] * w[None]) / w.sum() ** 2
    window = w[None, None].expand(3, 1, 11, 11)

    def blur(t):
        return F.conv2d(t[None], window, padding=5, groups=3)[0]

    mu_a, mu_b = blur(a), blur(b)
    num = (2 * mu_a * mu_b + 1e-4) * (2 * (blur(a * b) - mu_a * mu_b) + 9e-4)
    den = (mu_a**2 + mu_b**2 + 1e-4) * (blur(a * a) - mu_a**2 + blur(b * b) - mu_b**2 + 9e-4)
    assert abs(float(ssim(a, b)) - float((num / den).mean())) < 1e-5
