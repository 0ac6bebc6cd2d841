"""CPU Gaussian renderer against a brute-force per-pixel reference; shortest-axis normals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geodiff4d.recon.normals import camera_normals, shortest_axis
from geodiff4d.recon.rasterize import render_gaussians
from geodiff4d.recon.rotations import axis_angle_to_rotmat, quat_to_rotmat, rotmat_to_quat


def _scene(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * torch.tensor([0.25, 0.2, 0.15])
    quats = torch.randn(n, 4, generator=g)
    scales = torch.exp(torch.randn(n, 3, generator=g) * 0.5 - 2.8)
    opacities = torch.rand(n, generator=g) * 0.95 + 0.02
    colors = torch.rand(n, 3, generator=g)
    angle = 0.3
    rotation = axis_angle_to_rotmat(torch.tensor([0.1, angle, 0.05]))
    world_to_cam = torch.eye(4)
    world_to_cam[:3, :3] = rotation
    world_to_cam[:3, 3] = torch.tensor([0.02, -0.03, 1.2])
    K = torch.tensor([[40.0, 0.0, 13.7], [0.0, 42.0, 10.2], [0.0, 0.0, 1.0]])
    return means, quats, scales, opacities, colors, world_to_cam, K


def _reference_render(means, quats, scales, opacities, colors, world_to_cam, K, width, height):
    """Straightforward loops: every pixel visits every Gaussian in depth order (float64 numpy)."""
    means, quats, scales = means.double().numpy(), quats.double().numpy(), scales.double().numpy()
    opacities, colors = opacities.double().numpy(), colors.double().numpy()
    w2c, K = world_to_cam.double().numpy(), K.double().numpy()
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    projected = []
    for i in range(len(means)):
        w, x, y, z = quats[i] / np.linalg.norm(quats[i])
        R = np.array(
            [
                [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
            ]
        )
        cov_world = R @ np.diag(scales[i] ** 2) @ R.T
        p = w2c[:3, :3] @ means[i] + w2c[:3, 3]
        if p[2] <= 0.01:
            continue
        lim_x = ((width - cx) / fx + 0.15 * width / fx, cx / fx + 0.15 * width / fx)
        lim_y = ((height - cy) / fy + 0.15 * height / fy, cy / fy + 0.15 * height / fy)
        tx = p[2] * min(max(p[0] / p[2], -lim_x[1]), lim_x[0])
        ty = p[2] * min(max(p[1] / p[2], -lim_y[1]), lim_y[0])
        J = np.array([[fx / p[2], 0, -fx * tx / p[2] ** 2], [0, fy / p[2], -fy * ty / p[2] ** 2]])
        cov2d = J @ w2c[:3, :3] @ cov_world @ w2c[:3, :3].T @ J.T + 0.3 * np.eye(2)
        center = np.array([fx * p[0] / p[2] + cx, fy * p[1] / p[2] + cy])
        # normal: rotation column of the smallest scale, toward the camera, camera space, y up, z toward camera
        n_world = R[:, np.argmin(scales[i])]
        n_cam = w2c[:3, :3] @ n_world
        if n_cam @ p > 0:
            n_cam = -n_cam
        normal = n_cam * np.array([1.0, -1.0, -1.0])
        projected.append((p[2], center, np.linalg.inv(cov2d), opacities[i], colors[i], normal))
    projected.sort(key=lambda item: item[0])
    rgb, alpha = np.zeros((3, height, width)), np.zeros((height, width))
    depth, normal = np.zeros((height, width)), np.zeros((3, height, width))
    for row in range(height):
        for col in range(width):
            T = 1.0
            for z, center, conic, opacity, color, n in projected:
                d = center - np.array([col, row], dtype=np.float64)
                sigma = 0.5 * d @ conic @ d
                a = min(0.999, opacity * math.exp(-sigma))
                if sigma < 0 or a < 1 / 255:
                    continue
                if T * (1 - a) <= 1e-4:
                    break
                rgb[:, row, col] += a * T * color
                depth[row, col] += a * T * z
                normal[:, row, col] += a * T * n
                alpha[row, col] += a * T
                T *= 1 - a
    return rgb, alpha, depth, normal


@pytest.mark.parametrize("backend", ["torch", "torch-dense"])
@pytest.mark.parametrize("tile_size", [16, 4])
def test_cpu_backend_matches_brute_force_reference(tile_size, backend):
    means, quats, scales, opacities, colors, w2c, K = _scene(40, seed=3)
    opacities[:5] = 0.999  # opaque ones make early termination happen
    width, height = 27, 21
    out = render_gaussians(
        means, quats, scales, opacities, colors, w2c, K, width, height, backend=backend, tile_size=tile_size
    )
    rgb, alpha, depth, normal = _reference_render(
        means, quats, scales, opacities, colors, w2c, K, width, height
    )
    assert alpha.max() > 0.9 and (alpha > 0.01).mean() > 0.3  # the scene covers the image
    np.testing.assert_allclose(out.rgb.numpy(), rgb, atol=1e-4)
    np.testing.assert_allclose(out.alpha.numpy(), alpha, atol=1e-4)
    np.testing.assert_allclose(out.depth.numpy(), depth, atol=1e-4)
    np.testing.assert_allclose(out.normal.numpy(), normal, atol=1e-4)


def test_background_and_sh_degree_zero():
    means, quats, scales, opacities, colors, w2c, K = _scene(30, seed=4)
    dc = (colors - 0.5) / 0.28209479177387814
    background = torch.tensor([0.2, 0.4, 0.9])
    plain = render_gaussians(means, quats, scales, opacities, colors, w2c, K, 20, 16)
    sh = render_gaussians(
        means, quats, scales, opacities, dc[:, None], w2c, K, 20, 16, sh_degree=0, background=background
    )
    expected = plain.rgb + (1 - plain.alpha)[None] * background[:, None, None]
    torch.testing.assert_close(sh.rgb, expected, atol=1e-5, rtol=0)


def test_renderer_is_differentiable():
    means, quats, scales, opacities, colors, w2c, K = _scene(30, seed=5)
    params = [t.requires_grad_() for t in (means, quats, scales, opacities, colors)]
    out = render_gaussians(*params, w2c, K, 20, 16)
    (out.rgb.sum() + out.normal.sum() + out.depth.sum()).backward()
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # gradient of one colour channel = sum of that Gaussian's blending weights (exact linearity)
    colors2 = colors.detach().clone().requires_grad_()
    out2 = render_gaussians(
        means.detach(), quats.detach(), scales.detach(), opacities.detach(), colors2, w2c, K, 20, 16
    )
    out2.rgb[0].sum().backward()
    eps = 1.0  # colour enters linearly: a large step is exact and avoids float32 cancellation
    bumped = colors.detach().clone()
    bumped[7, 0] += eps
    out3 = render_gaussians(
        means.detach(), quats.detach(), scales.detach(), opacities.detach(), bumped, w2c, K, 20, 16
    )
    numeric = (out3.rgb[0].sum() - out2.rgb[0].sum().detach()) / eps
    assert abs(float(colors2.grad[7, 0]) - float(numeric)) < 1e-4 * max(1.0, abs(float(numeric)))


def test_shortest_axis_is_the_rotation_column_not_the_row():
    rotation = axis_angle_to_rotmat(torch.tensor([0.4, -0.9, 0.3]))
    assert not torch.allclose(rotation, rotation.T, atol=1e-3)  # rows differ from columns
    quat = rotmat_to_quat(rotation)[None]
    torch.testing.assert_close(quat_to_rotmat(quat)[0], rotation, atol=1e-6, rtol=0)
    scales = torch.tensor([[0.05, 0.001, 0.04]])  # flattened along local y
    axis = shortest_axis(quat, scales)[0]
    torch.testing.assert_close(axis, rotation[:, 1], atol=1e-6, rtol=0)
    assert (axis - rotation[1, :]).abs().max() > 0.1  # the row would be wrong
    # toward the camera, in our convention: identity camera at the origin, Gaussian at z = 1 in front
    w2c = torch.eye(4)
    n = camera_normals(torch.tensor([[0.0, 0.0, 1.0]]), quat, scales, w2c)[0]
    expected = rotation[:, 1] if rotation[2, 1] < 0 else -rotation[:, 1]  # OpenCV: toward camera = -z
    torch.testing.assert_close(n, expected * torch.tensor([1.0, -1.0, -1.0]), atol=1e-6, rtol=0)
    assert n[2] > 0  # facing the camera = +z in our convention


def test_facing_disc_renders_normal_toward_camera():
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    scales = torch.tensor([[0.2, 0.2, 0.001]])  # disc in the xy plane, faces the camera along z
    w2c = torch.eye(4)
    w2c[2, 3] = 2.0
    K = torch.tensor([[20.0, 0, 7.5], [0, 20.0, 7.5], [0, 0, 1]])
    out = render_gaussians(
        torch.zeros(1, 3), quats, scales, torch.tensor([0.9]), torch.ones(1, 3), w2c, K, 16, 16
    )
    center = out.normal[:, 7, 7] / out.alpha[7, 7]
    torch.testing.assert_close(center, torch.tensor([0.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    assert abs(float(out.depth[7, 7] / out.alpha[7, 7]) - 2.0) < 1e-5


def test_bad_shapes_are_named():
    means, quats, scales, opacities, colors, w2c, K = _scene(5, seed=0)
    with pytest.raises(ValueError, match="quats"):
        render_gaussians(means, quats[:, :3], scales, opacities, colors, w2c, K, 8, 8)
    with pytest.raises(ValueError, match="backend"):
        render_gaussians(means, quats, scales, opacities, colors, w2c, K, 8, 8, backend="vulkan")


def test_blend_backward_matches_autograd_reference():
    from geodiff4d.recon.blend import BlendTiles, blend_tiles_reference

    g = torch.Generator().manual_seed(7)
    T, K, S, C = 3, 9, 4, 5
    mean_x = (torch.rand(T, K, generator=g) * 6 - 1).double()
    mean_y = (torch.rand(T, K, generator=g) * 6 - 1).double()
    cov = torch.rand(T, K, 2, 2, generator=g).double()
    conic = torch.linalg.inv(cov @ cov.transpose(-1, -2) * 4 + 0.3 * torch.eye(2, dtype=torch.float64))
    conic = torch.stack([conic[..., 0, 0], conic[..., 0, 1], conic[..., 1, 1]], -1)
    opacity = (torch.rand(T, K, generator=g) * 0.9 + 0.05).double()
    opacity[0, :4] = 0.9999  # clamped and terminating pixels
    values = torch.randn(T, K, C, generator=g).double()
    valid = torch.ones(T, K, dtype=torch.bool)
    valid[2, 6:] = False
    px = (torch.arange(S, dtype=torch.float64) + torch.tensor([0.0, 4.0, 0.0], dtype=torch.float64)[:, None])[
        :, None
    ]
    py = (torch.arange(S, dtype=torch.float64) + torch.zeros(3, 1, dtype=torch.float64))[:, None]
    grad_out = torch.randn(T, S * S, C, generator=g).double()
    grads = []
    for fn in (BlendTiles.apply, blend_tiles_reference):
        inputs = [t.clone().requires_grad_() for t in (mean_x, mean_y, conic, opacity, values)]
        out = fn(*inputs, valid, px, py)
        (out * grad_out).sum().backward()
        grads.append((out.detach(), [t.grad for t in inputs]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for mine, reference in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-10, rtol=1e-8)


def test_gathered_blend_matches_per_slot_blend():
    """BlendGathered (per-Gaussian inputs, one scatter in backward) equals BlendTiles fed gathered slots."""
    from geodiff4d.recon.blend import BlendGathered, BlendTiles

    g = torch.Generator().manual_seed(3)
    N, T, K, S, C = 6, 2, 5, 4, 3
    means2d = (torch.rand(N, 2, generator=g) * 5).double()
    conic = torch.stack(
        [
            torch.rand(N, generator=g) + 0.3,
            torch.rand(N, generator=g) * 0.1,
            torch.rand(N, generator=g) + 0.3,
        ],
        -1,
    ).double()
    opacity = (torch.rand(N, generator=g) * 0.8 + 0.1).double()
    values = torch.randn(N, C, generator=g).double()
    slots = torch.randint(N, (T, K), generator=g)  # a Gaussian may appear in both tiles
    valid = torch.ones(T, K, dtype=torch.bool)
    valid[1, 3:] = False
    px = (torch.arange(S, dtype=torch.float64) + torch.tensor([0.0, 2.0], dtype=torch.float64)[:, None])[
        :, None
    ]
    py = torch.arange(S, dtype=torch.float64).expand(T, 1, S).clone()
    grad_out = torch.randn(T, S * S, C, generator=g).double()
    leaves = [t.clone().requires_grad_() for t in (means2d, conic, opacity, values)]
    out = BlendGathered.apply(*leaves, slots, valid, px, py)
    (out * grad_out).sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in (means2d, conic, opacity, values)]
    m, c, o, v = ref_leaves
    reference = BlendTiles.apply(
        m[slots, 0], m[slots, 1], c[slots], torch.where(valid, o[slots], 1.0), v[slots], valid, px, py
    )
    (reference * grad_out).sum().backward()
    torch.testing.assert_close(out, reference)
    for mine, theirs in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("tile_size", [16, 8])
def test_compiled_compositor_matches_dense_compositor_forward_and_backward(tile_size):
    """recon.composite (per-pixel loops, hand-written backward) against recon.blend (padded tensors), in float64
    so that any difference beyond rounding shows; opaque Gaussians exercise the clamp and early termination."""
    scene = [t.double() for t in _scene(150, seed=11)]
    means, quats, scales, opacities, colors, w2c, K = scene
    opacities[:20] = 0.9995
    width, height = 45, 38
    results = {}
    for backend in ("torch", "torch-dense"):
        leaves = [t.clone().requires_grad_() for t in (means, quats, scales, opacities, colors)]
        out = render_gaussians(*leaves, w2c, K, width, height, backend=backend, tile_size=tile_size)
        weights = torch.randn(
            8, height, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64
        )
        images = torch.cat([out.rgb, out.normal, out.depth[None], out.alpha[None]])  # [8, H, W]
        (images * weights).sum().backward()
        results[backend] = (images.detach(), [t.grad for t in leaves])
    (fast, fast_grads), (dense, dense_grads) = results["torch"], results["torch-dense"]
    assert (dense[7] > 0.999).any()  # some pixels saturate
    torch.testing.assert_close(fast, dense, atol=1e-12, rtol=0)
    for name, mine, reference in zip(
        ("means", "quats", "scales", "opacities", "colors"), fast_grads, dense_grads, strict=True
    ):
        assert reference.abs().sum() > 0, name
        torch.testing.assert_close(mine, reference, atol=1e-9, rtol=1e-9, msg=name)
