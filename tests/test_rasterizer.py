import numpy as np
import pytest
import torch
from torch import Tensor

from geodiff4d.datasets.rasterizer import (
    NEAR,
    Fragments,
    face_normals,
    interpolate,
    normals_to_convention,
    rasterize,
    vertex_normals,
)

_ICOSAHEDRON_FACES = [
    (0, 11, 5),
    (0, 5, 1),
    (0, 1, 7),
    (0, 7, 10),
    (0, 10, 11),
    (1, 5, 9),
    (5, 11, 4),
    (11, 10, 2),
    (10, 7, 6),
    (7, 1, 8),
    (3, 9, 4),
    (3, 4, 2),
    (3, 2, 6),
    (3, 6, 8),
    (3, 8, 9),
    (4, 9, 5),
    (2, 4, 11),
    (6, 2, 10),
    (8, 6, 7),
    (9, 8, 1),
]


def icosphere(subdivisions: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit icosphere, counter-clockwise (outward) faces."""
    t = (1 + 5**0.5) / 2
    corners = [
        (-1, t, 0),
        (1, t, 0),
        (-1, -t, 0),
        (1, -t, 0),
        (0, -1, t),
        (0, 1, t),
        (0, -1, -t),
        (0, 1, -t),
        (t, 0, -1),
        (t, 0, 1),
        (-t, 0, -1),
        (-t, 0, 1),
    ]
    vertices = np.array(corners, dtype=np.float64)
    vertices /= np.linalg.norm(vertices, axis=1, keepdims=True)
    faces = np.array(_ICOSAHEDRON_FACES)
    for _ in range(subdivisions):
        edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
        unique, inverse = np.unique(edges, axis=0, return_inverse=True)
        middles = vertices[unique[:, 0]] + vertices[unique[:, 1]]
        middles /= np.linalg.norm(middles, axis=1, keepdims=True)
        ab, bc, ca = inverse.reshape(3, -1) + len(vertices)  # midpoint index of each face edge
        vertices = np.concatenate([vertices, middles])
        a, b, c = faces.T
        faces = np.concatenate(
            [np.stack(tri, axis=1) for tri in ([a, ab, ca], [b, bc, ab], [c, ca, bc], [ab, bc, ca])]
        )
    return vertices, faces


def _intrinsics(focal: float, cx: float, cy: float) -> torch.Tensor:
    return torch.tensor([[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]], dtype=torch.float64)


def _pixel_rays(K: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Unnormalised camera rays [H, W, 3] through pixel centres (z = 1)."""
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    pixels = np.stack([u, v, np.ones_like(u)], axis=-1)
    return pixels @ np.linalg.inv(K.numpy()).T


SIZE = 160
RADIUS = 0.1
CENTRE = np.array([0.0, 0.0, 0.6])  # on the optical axis: the silhouette is an exact disc


@pytest.fixture(scope="module")
def sphere():
    unit, faces = icosphere(4)
    vertices = torch.tensor(unit * RADIUS + CENTRE, dtype=torch.float32)
    faces = torch.tensor(faces)
    K = _intrinsics(300.0, (SIZE - 1) / 2, (SIZE - 1) / 2)
    fragments = rasterize(vertices, faces, K, SIZE, SIZE)
    # analytic ray-sphere intersection (nearest root) at each pixel centre
    rays = _pixel_rays(K, SIZE, SIZE)
    a = (rays**2).sum(-1)
    b = -2 * rays @ CENTRE
    c = CENTRE @ CENTRE - RADIUS**2
    disc = b**2 - 4 * a * c
    t = (-b - np.sqrt(np.clip(disc, 0, None))) / (2 * a)
    points = rays * t[..., None]
    return {
        "vertices": vertices,
        "faces": faces,
        "K": K,
        "fragments": fragments,
        "hit": disc > 0,
        "depth": points[..., 2],
        "normal": (points - CENTRE) / RADIUS,
    }


def test_icosphere_faces_point_outward():
    unit, faces = icosphere(2)
    normals = face_normals(torch.tensor(unit), torch.tensor(faces))
    centroids = unit[faces].mean(axis=1)
    assert np.all((normals.numpy() * centroids).sum(-1) > 0.9)


def test_sphere_normals_match_analytic(sphere):
    fragments = sphere["fragments"]
    normals = interpolate(vertex_normals(sphere["vertices"], sphere["faces"]), sphere["faces"], fragments)
    ours = normals_to_convention(torch.nn.functional.normalize(normals, dim=-1)).numpy()
    analytic = normals_to_convention(torch.tensor(sphere["normal"])).numpy()
    inside = fragments.mask.numpy() & sphere["hit"]
    cosine = np.clip((ours[inside] * analytic[inside]).sum(-1), -1, 1)
    angle = np.degrees(np.arccos(cosine))
    assert np.median(angle) < 1.0
    assert np.percentile(angle, 95) < 2.0
    assert np.median(ours[inside][:, 2]) > 0.5  # our convention: surfaces facing the camera have z > 0
    assert np.all(ours[~fragments.mask.numpy()] == 0)


def test_sphere_depth_matches_ray_intersection(sphere):
    fragments = sphere["fragments"]
    facing = sphere["hit"] & (-sphere["normal"][..., 2] > 0.3)  # away from the grazing silhouette
    assert fragments.mask.numpy()[facing].all()
    error = np.abs(fragments.depth.numpy()[facing] - sphere["depth"][facing])
    # inscribed flat triangles lie up to the sagitta (~1e-3 of the radius here, more along oblique rays) behind
    assert np.median(error) < 2e-4 and error.max() < 1e-3
    assert np.isinf(fragments.depth.numpy()[~fragments.mask.numpy()]).all()


def test_sphere_mask_area_matches_projected_disc(sphere):
    distance = np.linalg.norm(CENTRE)
    disc_radius = 300.0 * RADIUS / np.sqrt(distance**2 - RADIUS**2)  # tangent cone cut by the image plane
    area = int(sphere["fragments"].mask.sum())
    assert abs(area / (np.pi * disc_radius**2) - 1) < 0.01
    assert (sphere["fragments"].mask.numpy() != sphere["hit"]).sum() < 0.01 * area


def test_chunked_rasterization_is_identical(sphere):
    small = rasterize(
        sphere["vertices"], sphere["faces"], sphere["K"], SIZE, SIZE, max_pairs=997, backend="torch"
    )
    full = rasterize(sphere["vertices"], sphere["faces"], sphere["K"], SIZE, SIZE, backend="torch")
    assert torch.equal(small.face_index, full.face_index)
    assert torch.equal(small.depth, full.depth)
    assert torch.equal(small.bary, full.bary)


def test_backface_culling_keeps_the_visible_side(sphere):
    culled = rasterize(sphere["vertices"], sphere["faces"], sphere["K"], SIZE, SIZE, cull_backfaces=True)
    assert torch.equal(culled.face_index, sphere["fragments"].face_index)
    inverted = rasterize(
        sphere["vertices"], sphere["faces"].flip(1), sphere["K"], SIZE, SIZE, cull_backfaces=True
    )
    # with inverted winding only the inside of the far hemisphere remains (seen through the missing front)
    assert torch.all(inverted.depth[inverted.mask] > sphere["fragments"].depth[inverted.mask])


def _brute_force(vertices: torch.Tensor, faces: torch.Tensor, K: torch.Tensor, height: int, width: int):
    """Dense reference: every pixel against every face in float64, nearest depth then smallest index."""
    v = vertices.double() @ K.T
    uv = (v[:, :2] / v[:, 2:]).numpy()[faces.numpy()]  # [F, 3, 2]
    z = vertices.double().numpy()[faces.numpy(), 2]  # [F, 3]
    py, px = np.mgrid[0:height, 0:width].reshape(2, -1, 1).astype(np.float64)  # [2, N, 1]

    def edge(a, b):  # [N, F]
        return (b[:, 0] - a[:, 0]) * (py - a[:, 1]) - (b[:, 1] - a[:, 1]) * (px - a[:, 0])

    u0, u1, u2 = uv[:, 0], uv[:, 1], uv[:, 2]
    d1, d2 = u1 - u0, u2 - u0
    area = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]  # [F] twice the signed area
    bary = np.stack([edge(u1, u2), edge(u2, u0), edge(u0, u1)], -1) / area[:, None]  # [N, F, 3]
    inside = (bary >= 0).all(-1)
    depth = 1.0 / (bary / z).sum(-1)
    depth = np.where(inside, depth, np.inf)
    # argmin returns the first, i.e. smallest, face index among equal depths
    face = np.where(np.isfinite(depth.min(1)), depth.argmin(1), -1)
    return face.reshape(height, width), depth.min(1).reshape(height, width)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_matches_dense_reference(backend):
    unit, faces = icosphere(2)
    rng = np.random.default_rng(0)
    vertices = unit * (1 + 0.15 * rng.standard_normal((len(unit), 1))) * 0.12 + [0.02, -0.01, 0.7]
    vertices = torch.tensor(vertices, dtype=torch.float32)
    faces = torch.tensor(faces)
    K = _intrinsics(150.0, 30.3, 27.8)
    fragments = rasterize(vertices, faces, K, 56, 64, backend=backend)
    face_ref, depth_ref = _brute_force(vertices, faces, K, 56, 64)
    agree = fragments.face_index.numpy() == face_ref
    assert agree.mean() > 0.99  # exact up to float ties on shared edges
    assert np.array_equal(fragments.mask.numpy(), face_ref >= 0)
    covered = face_ref >= 0
    np.testing.assert_allclose(fragments.depth.numpy()[covered], depth_ref[covered], rtol=1e-5)


def test_perspective_correct_barycentrics_are_exact_for_linear_attributes():
    # a large triangle receding from z = 0.5 to z = 2.5
    vertices = torch.tensor([[-0.4, -0.3, 0.5], [0.4, -0.3, 0.5], [0.0, 2.0, 2.5]], dtype=torch.float32)
    faces = torch.tensor([[0, 1, 2]])
    K = _intrinsics(60.0, 31.5, 31.5)
    attrs = vertices.double() * torch.tensor([2.0, -3.0, 0.5], dtype=torch.float64) + 1.0  # linear in 3D
    rays = torch.tensor(_pixel_rays(K, 64, 64))
    errors = {}
    for correct in (True, False):
        fragments = rasterize(vertices, faces, K, 64, 64, perspective_correct=correct)
        mask = fragments.mask
        assert mask.sum() > 300
        interpolated = interpolate(attrs, faces, fragments)[mask]
        # the pixel's ray meets the triangle's plane at the fragment depth z
        surface = rays[mask] * fragments.depth[mask, None].double()
        expected = surface * torch.tensor([2.0, -3.0, 0.5], dtype=torch.float64) + 1.0
        errors[correct] = (interpolated - expected).abs().max().item()
    assert errors[True] < 1e-4
    assert errors[False] > 0.05


def test_depth_is_exact_on_a_plane():
    vertices = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 2.0], [0.0, 1.0, 3.0]], dtype=torch.float32)
    K = _intrinsics(40.0, 20.0, 20.0)
    fragments = rasterize(vertices, torch.tensor([[0, 1, 2]]), K, 40, 40)
    normal = np.cross(vertices[1] - vertices[0], vertices[2] - vertices[0]).astype(np.float64)
    rays = _pixel_rays(K, 40, 40)
    depth = (normal @ vertices[0].double().numpy()) / (rays @ normal)  # z of ray-plane hit (rays have z = 1)
    mask = fragments.mask.numpy()
    np.testing.assert_allclose(fragments.depth.numpy()[mask], depth[mask], rtol=1e-5)


def test_triangles_behind_the_camera_are_culled():
    # would project into the image if it were not culled
    behind = [[-0.3, -0.3, -1.0], [0.3, -0.3, -1.0], [0.0, 0.3, -1.0]]
    straddling = [[-0.3, -0.3, 1.0], [0.3, -0.3, 1.0], [0.0, 0.3, -0.5]]
    K = _intrinsics(50.0, 31.5, 31.5)
    for triangle in (behind, straddling):
        fragments = rasterize(torch.tensor(triangle), torch.tensor([[0, 1, 2]]), K, 64, 64)
        assert not fragments.mask.any()
    visible = torch.tensor(behind) * torch.tensor([1.0, 1.0, -1.0])
    assert rasterize(visible, torch.tensor([[0, 1, 2]]), K, 64, 64).mask.sum() > 100


def test_zbuffer_nearest_wins_and_ties_pick_smallest_face():
    near = [[-0.5, -0.5, 1.0], [0.5, -0.5, 1.0], [0.0, 0.5, 1.0]]
    far = [[-0.5, -0.5, 2.0], [0.5, -0.5, 2.0], [0.0, 0.5, 2.0]]
    K = _intrinsics(30.0, 15.5, 15.5)
    for order in ([near, far], [far, near]):
        vertices = torch.tensor(order[0] + order[1])
        fragments = rasterize(vertices, torch.tensor([[0, 1, 2], [3, 4, 5]]), K, 32, 32)
        nearest = 0 if order[0] is near else 1
        assert torch.all(fragments.face_index[15:18, 15:18] == nearest)
        assert torch.allclose(fragments.depth[fragments.mask], torch.tensor(1.0))
    twin = torch.tensor(near + near)
    fragments = rasterize(twin, torch.tensor([[3, 4, 5], [0, 1, 2]]), K, 32, 32)
    assert set(fragments.face_index[fragments.mask].tolist()) == {0}


def _posed_head() -> tuple[Tensor, Tensor]:
    """World vertices [V, 3] and faces [F, 3] of the procedural head with an expression, turned aside."""
    from geodiff4d.datasets.flame import FlameParams
    from geodiff4d.datasets.procedural_head import procedural_head_model

    model = procedural_head_model(seed=0)
    params = FlameParams.zeros(1, model.n_shape, model.n_expr)
    params.expression = torch.randn(1, model.n_expr, generator=torch.Generator().manual_seed(1))
    params.rotation = torch.tensor([[0.1, -0.4, 0.05]])
    return model(params).vertices[0], model.faces


def _assert_compiled_equals_tensor_path(vertices_cam, faces, K, height, width, **kw) -> Fragments:
    """Same fragments from the compiled CPU path and the tensor path (depth to float32 rounding)."""
    ref = rasterize(vertices_cam, faces, K, height, width, backend="torch", **kw)
    ours = rasterize(vertices_cam, faces, K, height, width, **kw)  # CPU: compiled
    assert torch.equal(ours.face_index, ref.face_index)
    torch.testing.assert_close(ours.bary, ref.bary, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.depth, ref.depth, rtol=3e-7, atol=0)
    return ref


@pytest.mark.parametrize("cull_backfaces", [False, True])
@pytest.mark.parametrize("perspective_correct", [True, False])
def test_compiled_cpu_path_equals_the_tensor_path_on_a_posed_head(cull_backfaces, perspective_correct):
    """The numba loop packing uses is the tensor algorithm: same fragments (depth to float32 rounding)."""
    from geodiff4d.datasets.cameras import nersemble_rig

    vertices, faces = _posed_head()
    for camera in list(nersemble_rig(width=200, height=240).values())[::5]:
        vertices_cam = _in_camera(vertices, camera)
        kw = {"cull_backfaces": cull_backfaces, "perspective_correct": perspective_correct}
        ref = _assert_compiled_equals_tensor_path(vertices_cam, faces, torch.tensor(camera.K), 240, 200, **kw)
        assert ref.mask.sum() > 5000


def _in_camera(vertices: Tensor, camera) -> Tensor:
    """World vertices [V, 3] in ``camera``'s frame."""
    world_to_cam = torch.tensor(camera.world_to_cam, dtype=torch.float32)
    return vertices @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]


@pytest.mark.parametrize("principal_point", [(-20.0, 120.0), (100.0, 250.0), (230.0, -15.0)])
def test_compiled_path_equals_the_tensor_path_where_the_head_leaves_the_image(principal_point):
    """The compiled z-buffer spans only the box of the projected vertices, clipped to the image: a head cut by
    an image edge (left, bottom, a corner) gives the tensor path's fragments."""
    from geodiff4d.datasets.cameras import nersemble_rig

    camera = nersemble_rig(width=200, height=240)["222200037"]
    vertices, faces = _posed_head()
    vertices_cam = _in_camera(vertices, camera)
    whole = _assert_compiled_equals_tensor_path(vertices_cam, faces, torch.tensor(camera.K), 240, 200)
    K = torch.tensor(camera.K)
    K[0, 2], K[1, 2] = principal_point
    cut = _assert_compiled_equals_tensor_path(vertices_cam, faces, K, 240, 200)
    assert 500 < cut.mask.sum() < 0.8 * whole.mask.sum()


def test_compiled_path_equals_the_tensor_path_with_the_camera_inside_the_head():
    """A camera inside the head, looking at its far side (the faces reaching behind the near plane are culled,
    and their vertices there project anywhere), gives the tensor path's fragments."""
    from geodiff4d.datasets.cameras import intrinsics, nersemble_rig

    vertices, faces = _posed_head()
    vertices_cam = _in_camera(vertices, nersemble_rig(width=200, height=240)["222200037"])
    z = vertices_cam[:, 2]
    inside = vertices_cam - torch.tensor([0.0, 0.0, float(z.min() + 0.4 * (z.max() - z.min()))])
    assert (inside[:, 2] < NEAR).sum() > 100
    wide = torch.tensor(intrinsics(60.0, 200, 240))
    assert _assert_compiled_equals_tensor_path(inside, faces, wide, 240, 200).mask.sum() > 500


def _screen_area2(vertices: Tensor, faces: Tensor, K: Tensor) -> Tensor:
    """Twice each face's signed pixel area [F] (positive: facing away, with image y down)."""
    projected = vertices[faces].double() @ K.double().T  # [F, 3, 3]
    xy = projected[..., :2] / projected[..., 2:]
    edge1, edge2 = xy[:, 1] - xy[:, 0], xy[:, 2] - xy[:, 0]
    return edge1[:, 0] * edge2[:, 1] - edge2[:, 0] * edge1[:, 1]


def test_compiled_path_skips_back_faces_only_where_they_lose():
    """The compiled path draws front faces first and skips back faces behind them. A front-facing wall at
    z = 0.7 with a soup of both windings through it, within 0.2 % of its depth (in front, behind, crossing it):
    the tensor path's fragments, back faces' pixels included."""
    rng = np.random.default_rng(3)
    K = _intrinsics(300.0, 40.0, 36.0)
    wall = torch.tensor([[-1, -1, 0.7], [3, -1, 0.7], [-1, 3, 0.7]], dtype=torch.float64)  # one face: no seam
    wall_faces = torch.tensor([[0, 1, 2]])
    wall_faces = torch.where(
        (_screen_area2(wall, wall_faces, K) < 0)[:, None], wall_faces, wall_faces.flip(1)
    )
    xy = rng.uniform(-0.06, 0.06, (500, 1, 2)) + rng.normal(0, 0.01, (500, 3, 2))
    z = 0.7 * (1 + rng.uniform(-0.002, 0.002, (500, 3, 1)))
    soup = torch.tensor(np.concatenate([xy * z / 0.7, z], -1).reshape(-1, 3))
    soup_faces = torch.arange(len(soup)).reshape(-1, 3) + len(wall)
    vertices = torch.cat([wall, soup]).float()
    faces = torch.cat([wall_faces, soup_faces])
    ref = rasterize(vertices, faces, K, 72, 80, backend="torch")
    ours = rasterize(vertices, faces, K, 72, 80)  # CPU: compiled
    winners = ref.face_index[ref.mask]
    assert ref.mask.all() and (winners == 0).sum() > 500  # the wall fills the view and shows between
    assert (_screen_area2(vertices, faces, K)[winners] > 0).sum() > 500  # back faces win pixels
    assert torch.equal(ours.face_index, ref.face_index)
    torch.testing.assert_close(ours.depth, ref.depth, rtol=3e-7, atol=0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="vertices_cam"):
        rasterize(torch.zeros(3, 2), torch.tensor([[0, 1, 2]]), torch.eye(3), 8, 8)
    with pytest.raises(ValueError, match="out of range"):
        rasterize(torch.zeros(3, 3), torch.tensor([[0, 1, 3]]), torch.eye(3), 8, 8)


def test_vertex_normals_of_sphere_are_radial():
    unit, faces = icosphere(3)
    normals = vertex_normals(torch.tensor(unit), torch.tensor(faces)).numpy()
    angle = np.degrees(np.arccos(np.clip((normals * unit).sum(-1), -1, 1)))
    # area weighting over irregular vertex fans is close to, not exactly, radial
    assert angle.max() < 1.0 and np.median(angle) < 0.3


def test_normal_convention():
    facing_camera = torch.tensor([0.0, 0.0, -1.0])  # OpenCV: pointing back along -z, toward the camera
    assert torch.equal(normals_to_convention(facing_camera), torch.tensor([0.0, 0.0, 1.0]))
    up_in_image = torch.tensor([0.0, -1.0, 0.0])
    assert torch.equal(normals_to_convention(up_in_image), torch.tensor([0.0, 1.0, 0.0]))
