import numpy as np
import pytest
import torch

from geodiff4d.datasets.cameras import nersemble_rig
from geodiff4d.datasets.render import render_head, render_pose_map, sample_texture

NOSE_TIP = 30  # iBUG-68 index of the nose tip
SIZE = 128


def test_sample_texture_follows_flame_uv_orientation():
    size = 16
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    # texel centres carry their own UV: u grows to the right, v grows upward (row 0 is v = 1)
    texture = torch.tensor(np.stack([(cols + 0.5) / size, 1 - (rows + 0.5) / size, np.zeros_like(rows)], -1))
    uv = torch.rand(5, 7, 2, generator=torch.Generator().manual_seed(0)) * (1 - 1 / size) + 0.5 / size
    sampled = sample_texture(texture, uv)
    torch.testing.assert_close(sampled[..., :2], uv, atol=1e-5, rtol=0)  # bilinear is exact on linear data


@pytest.fixture(scope="module")
def head():
    from geodiff4d.datasets.flame import FlameParams
    from geodiff4d.datasets.procedural_head import procedural_head_model

    model = procedural_head_model(seed=0)
    params = FlameParams.zeros(1, model.n_shape, model.n_expr)
    generator = torch.Generator().manual_seed(0)
    params.expression = torch.randn(1, model.n_expr, generator=generator) * 1.5
    params.jaw = torch.tensor([[0.2, 0.0, 0.0]])
    params.rotation = torch.tensor([[0.05, 0.3, 0.0]])
    return model, params


def _frontal():
    return nersemble_rig(width=SIZE, height=SIZE)["222200037"]


def test_head_render_buffers_are_consistent(head):
    from geodiff4d.datasets.normal_maps import normals_from_depth

    model, params = head
    camera = _frontal()
    texture = np.full((32, 32, 3), 0.5, dtype=np.float32)
    render = render_head(model, params, camera, texture)
    mask = render.mask.numpy() > 0.5
    assert render.rgb.shape == (3, SIZE, SIZE) and render.normal.shape == (3, SIZE, SIZE)
    assert 0.1 < mask.mean() < 0.9
    normal = render.normal.permute(1, 2, 0).numpy()
    np.testing.assert_allclose(np.linalg.norm(normal[mask], axis=-1), 1.0, atol=1e-5)
    assert np.all(normal[~mask] == 0) and np.all(render.depth.numpy()[~mask] == 0)
    assert np.median(normal[mask][:, 2]) > 0.5  # outward normals face the camera (z toward it)
    depth = render.depth.numpy()
    assert 0.75 < depth[mask].min() and depth[mask].max() < 1.25  # metres, head near the 1 m look-at point
    # shading of a constant texture: ambient .. ambient + diffuse, times the albedo
    rgb = render.rgb.permute(1, 2, 0).numpy()[mask]
    assert rgb.min() >= 0.5 * 0.65 - 1e-6 and rgb.max() <= 0.5 + 1e-6
    # interpolated normals agree with normals derived from the rendered depth (convention cross-check)
    derived = normals_from_depth(depth, camera.K, mask)
    both = mask & (np.linalg.norm(derived, axis=-1) > 0.5)
    angle = np.degrees(np.arccos(np.clip((derived[both] * normal[both]).sum(-1), -1, 1)))
    assert np.median(angle) < 10.0


def test_nose_tip_lands_on_the_rendered_head(head):
    model, params = head
    camera = _frontal()
    render = render_head(model, params, camera, None)
    nose = model(params).landmarks[0, NOSE_TIP].double().numpy()[None]
    u, v = np.round(camera.project(nose)[0]).astype(int)
    assert render.mask[v, u] == 1
    # the nose tip is the visible surface there
    assert abs(render.depth[v, u].item() - camera.to_cam(nose)[0, 2]) < 0.01


def test_compiled_normal_image_equals_the_tensor_ops(head):
    from geodiff4d.datasets.render import _normal_image, _rasterize_head

    model, params = head
    for camera in list(nersemble_rig(width=SIZE, height=SIZE).values())[::4]:
        vertices_cam, fragments = _rasterize_head(model, params, camera)
        reference = _normal_image(vertices_cam, model.faces, fragments, backend="torch")
        torch.testing.assert_close(
            _normal_image(vertices_cam, model.faces, fragments), reference, atol=1e-6, rtol=0
        )


def test_pose_map_ignores_expression(head):
    model, params = head
    camera = _frontal()
    pose_map = render_pose_map(model, params, camera)
    neutral = render_head(model, params.with_zero_expression(), camera, None)
    assert torch.equal(pose_map, torch.where(neutral.mask > 0, (neutral.normal + 1) / 2, 0.0))
    other = params.with_zero_expression()
    other.rotation, other.translation = params.rotation, params.translation
    other.expression = torch.randn(1, model.n_expr, generator=torch.Generator().manual_seed(1)) * 2.0
    other.jaw = torch.tensor([[0.35, 0.0, 0.0]])
    assert torch.equal(render_pose_map(model, other, camera), pose_map)
    changed = render_head(model, other, camera, None).normal - render_head(model, params, camera, None).normal
    assert changed.abs().amax(dim=0).gt(0.05).sum() > 20  # the expression render itself does change
    rotated = params.with_zero_expression()
    rotated.rotation = torch.tensor([[0.05, -0.3, 0.0]])
    assert not torch.equal(render_pose_map(model, rotated, camera), pose_map)  # but head pose does


def test_pose_map_is_what_training_reads_from_a_packed_posemap(head):
    """Sampling conditions on render_pose_map; training on the packer's posemap.png as the loader decodes it.
    Both must be one encoding ((n + 1) / 2 on the head, 0 elsewhere): raw normals in [-1, 1] at sampling time
    made every generated frame noisy while the training previews were clean."""
    from geodiff4d.core.io.images import encode_png
    from geodiff4d.datasets.loader import _decode_png
    from geodiff4d.datasets.render import _frame_vertices, render_normal_codes

    model, params = head
    camera = _frontal()
    codes, mask = render_normal_codes(
        _frame_vertices(model, params.with_zero_expression()), model.faces, camera
    )
    packed = torch.from_numpy(_decode_png(encode_png(codes), "posemap"))  # [3, H, W]
    assert mask.mean() > 0.05
    torch.testing.assert_close(render_pose_map(model, params, camera), packed.float(), atol=2e-5, rtol=0)


def test_normal_codes_in_one_pass_equal_the_float_render_encoded(head):
    """Packing writes render_normal_codes; it must be bit for bit the float normal map (rasterizer fragments,
    interpolated normals) encoded as normal.png, including views where the head leaves the image."""
    from geodiff4d.datasets.normal_maps import normal_codes
    from geodiff4d.datasets.render import _frame_vertices, render_normal_codes, render_normals

    model, params = head
    vertices = _frame_vertices(model, params)
    cameras = list(nersemble_rig(width=SIZE, height=SIZE).values())
    cameras.append(cameras[0].cropped(SIZE // 3, -SIZE // 4, SIZE, SIZE))  # head partly outside the image
    for camera in cameras:
        normal, mask = render_normals(vertices, model.faces, camera)
        codes, code_mask = render_normal_codes(vertices, model.faces, camera)
        assert code_mask.any()
        np.testing.assert_array_equal(code_mask, mask.numpy())
        np.testing.assert_array_equal(codes, normal_codes(normal.numpy(), mask.numpy()))
