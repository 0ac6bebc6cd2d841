"""FLAME parameterization, LBS and the restricted pkl loader."""

import os
import pickle
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse
import torch
from dreifus.matrix import Pose
from nersemble_benchmark.models.flame import FlameProvider
from scipy.spatial.transform import Rotation

from geodiff4d.datasets.flame import FlameModel, FlameParams, rodrigues
from geodiff4d.datasets.flame_pkl import UnsafePickleError, load_flame_pickle
from geodiff4d.datasets.procedural_head import build_procedural_head


def random_params(model: FlameModel, batch: int, seed: int, pose_scale: float = 0.3) -> FlameParams:
    gen = torch.Generator().manual_seed(seed)
    params = FlameParams.zeros(batch, model.n_shape, model.n_expr)
    params.shape = torch.randn(1, model.n_shape, generator=gen).expand(batch, -1).clone()
    params.expression = torch.randn(batch, model.n_expr, generator=gen)
    for name in ("rotation", "neck", "jaw", "eyes", "translation"):
        value = getattr(params, name)
        setattr(params, name, pose_scale * torch.randn(value.shape, generator=gen))
    params.scale = torch.full((batch, 1), 1.1)
    return params


def reference_lbs(model: FlameModel, params: FlameParams) -> np.ndarray:
    """Textbook FLAME/SMPL forward (float64 numpy): blendshapes, correctives, 4x4 chain, LBS with zero root
    rotation, then NeRSemble's model-to-world transform built by dreifus (``Pose.from_euler``, 3x3 part * scale)."""

    def arr(t):
        return t.detach().double().numpy()

    vertices = []
    for b in range(params.batch_size):
        betas = np.concatenate([arr(params.shape[b]), arr(params.expression[b])])
        v_shaped = arr(model.v_template) + arr(model.shapedirs) @ betas
        joints = arr(model.j_regressor) @ v_shaped
        pose = np.concatenate([np.zeros(3), arr(params.neck[b]), arr(params.jaw[b]), arr(params.eyes[b])])
        rotations = Rotation.from_rotvec(pose.reshape(5, 3)).as_matrix()
        feature = (rotations[1:] - np.eye(3)).reshape(-1)
        v_posed = v_shaped + (feature @ arr(model.posedirs)).reshape(-1, 3)
        world = []
        for j, parent in enumerate(model.parents):
            local = np.eye(4)
            local[:3, :3] = rotations[j]
            local[:3, 3] = joints[j] - (joints[parent] if parent >= 0 else 0)
            world.append(local if parent < 0 else world[parent] @ local)
        skinning = []
        for j in range(5):
            relative = world[j].copy()
            relative[:3, 3] -= world[j][:3, :3] @ joints[j]
            skinning.append(relative)
        blended = np.einsum("vj,jab->vab", arr(model.weights), np.stack(skinning))
        homogeneous = np.concatenate([v_posed, np.ones((len(v_posed), 1))], axis=1)
        v_lbs = np.einsum("vab,vb->va", blended, homogeneous)[:, :3]
        model_to_world = np.array(
            Pose.from_euler(arr(params.rotation[b]), arr(params.translation[b]), "XYZ"), np.float64
        )
        model_to_world[:3, :3] *= arr(params.scale[b])
        vertices.append(v_lbs @ model_to_world[:3, :3].T + model_to_world[:3, 3])
    return np.stack(vertices)


def test_zero_params_give_the_template_exactly(head_model):
    out = head_model(FlameParams.zeros(2, head_model.n_shape, head_model.n_expr))
    assert torch.equal(out.vertices, head_model.v_template.expand(2, -1, -1))
    assert out.landmarks.shape == (2, 68, 3)
    assert torch.allclose(out.joints[0], head_model.j_regressor @ head_model.v_template, atol=1e-7)


def test_rodrigues_matches_scipy():
    axis_angle = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = Rotation.from_rotvec(axis_angle.numpy()).as_matrix()
    np.testing.assert_allclose(
        rodrigues(axis_angle).numpy(), expected, atol=1e-7
    )  # smplx-style 1e-8 angle guard
    assert torch.equal(rodrigues(torch.zeros(1, 3)), torch.eye(3)[None])


def test_forward_matches_textbook_lbs(head_model):
    params = random_params(head_model, batch=3, seed=1)
    ours = head_model(params).vertices.double().numpy()
    np.testing.assert_allclose(ours, reference_lbs(head_model, params), atol=2e-6)


def test_world_vertices_equal_the_official_flame_provider_transform(head_model):
    """Oracle: nersemble_benchmark's FlameProvider.apply_model_to_world_transformation (dreifus Pose.from_euler,
    3x3 part * scale) applied to FLAME skinned with zero global rotation, for random rotations and scales."""
    gen = torch.Generator().manual_seed(3)
    params = random_params(head_model, batch=6, seed=2)
    params.rotation = (torch.rand(6, 3, generator=gen) * 2 - 1) * torch.tensor([np.pi, np.pi / 2, np.pi])
    params.scale = 0.5 + 1.5 * torch.rand(6, 1, generator=gen)
    params.translation = torch.randn(6, 3, generator=gen)
    unplaced = FlameParams(
        **{
            **vars(params),
            "rotation": torch.zeros(6, 3),
            "translation": torch.zeros(6, 3),
            "scale": torch.ones(6, 1),
        }
    )
    model_space = head_model(unplaced).vertices  # [T, V, 3]
    provider = SimpleNamespace(  # the attributes FlameProvider.__init__ sets from a FlameTracking
        _separate_transformation=True, rotation=params.rotation, translation=params.translation, scale=None
    )
    ours = head_model(params).vertices
    for t in range(6):
        provider.scale = params.scale[t : t + 1]  # the provider keeps one scale per sequence
        official = FlameProvider.apply_model_to_world_transformation(provider, model_space[t : t + 1], t)[0]
        torch.testing.assert_close(ours[t], official, atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        params.rotation_matrices().numpy(),
        Rotation.from_euler("XYZ", params.rotation.numpy()).as_matrix(),
        atol=1e-6,
    )


def test_expression_moves_the_mouth_not_the_back_of_the_skull(head_model):
    params = FlameParams.zeros(1, head_model.n_shape, head_model.n_expr)
    params.expression[0, 1] = 1.5  # smile
    moved = (head_model(params).vertices[0] - head_model.v_template).norm(dim=1)
    template = head_model.v_template
    mouth_corner = head_model(FlameParams.zeros(1, head_model.n_shape, head_model.n_expr)).landmarks[0, 54]
    near_corner = (template - mouth_corner).norm(dim=1) < 0.01
    back_of_skull = template[:, 2] < -0.04
    assert moved[near_corner].max() > 0.005
    assert moved[back_of_skull].max() < 1e-7


def test_jaw_rotation_opens_the_mouth(head_model):
    neutral = head_model(FlameParams.zeros(1, head_model.n_shape, head_model.n_expr)).landmarks[0]
    params = FlameParams.zeros(1, head_model.n_shape, head_model.n_expr)
    params.jaw[0, 0] = 0.25
    opened = head_model(params).landmarks[0]
    lower_lip, upper_lip = [56, 57, 58, 65, 66, 67], [50, 51, 52, 61, 62, 63]
    assert (neutral[lower_lip, 1] - opened[lower_lip, 1]).min() > 0.01  # lower lip drops > 1 cm
    assert (opened[upper_lip] - neutral[upper_lip]).norm(dim=1).max() < 5e-4
    assert (opened[8, 1] - neutral[8, 1]) < -0.01  # chin goes down


def test_params_numpy_round_trip_and_resizing(head_model):
    params = random_params(head_model, batch=4, seed=2)
    arrays = params.to_numpy_dict()
    assert arrays["shape"].shape == (1, head_model.n_shape) and arrays["scale"].shape == (1, 1)
    assert arrays["rotation_matrices"].shape == (4, 3, 3)
    back = FlameParams.from_numpy_dict(arrays, head_model.n_shape, head_model.n_expr)
    for name in ("shape", "expression", "rotation", "neck", "jaw", "eyes", "translation", "scale"):
        assert torch.equal(getattr(back, name), getattr(params, name)), name
    wide = FlameParams.from_numpy_dict(arrays, n_shape=300, n_expr=100)  # zero-padded to FLAME's sizes
    assert torch.equal(wide.shape[:, : head_model.n_shape], params.shape) and not wide.shape[:, 20:].any()
    narrow = FlameParams.from_numpy_dict(arrays, n_shape=5, n_expr=3)
    assert torch.equal(narrow.expression, params.expression[:, :3])
    assert torch.equal(params[2].jaw, params.jaw[2:3])


def test_to_numpy_dict_refuses_varying_shape(head_model):
    params = random_params(head_model, batch=2, seed=3)
    params.shape[1] += 1
    with pytest.raises(ValueError, match="shape"):
        params.to_numpy_dict()


def test_with_zero_expression_keeps_pose(head_model):
    params = random_params(head_model, batch=2, seed=4)
    zeroed = params.with_zero_expression()
    assert not zeroed.expression.any() and not zeroed.jaw.any() and not zeroed.eyes.any()
    assert torch.equal(zeroed.rotation, params.rotation) and torch.equal(zeroed.neck, params.neck)


def test_one_call_on_concatenated_frames_equals_one_call_per_frame(head_model):
    """Packing poses a frame and its expression-free twin in one call; the vertices must not change."""
    params = random_params(head_model, batch=1, seed=5)
    both = FlameParams.cat([params, params.with_zero_expression()])
    with torch.no_grad():
        batched = head_model(both).vertices
        torch.testing.assert_close(batched[0], head_model(params).vertices[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(
            batched[1], head_model(params.with_zero_expression()).vertices[0], atol=1e-6, rtol=0
        )


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"v_template": _Exploit()}, protocol=2))
    with pytest.raises(UnsafePickleError) as error:
        load_flame_pickle(path)
    assert "system" in str(error.value) and str(path) in str(error.value)


def _fake_chumpy(monkeypatch) -> type:
    """A class pickled as ``chumpy.ch.Ch`` whose state holds the array under 'x', like chumpy's."""
    module = types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, x):
            self.x, self._cache = x, {"r": None}

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    module.Ch = Ch
    monkeypatch.setitem(sys.modules, "chumpy", types.ModuleType("chumpy"))
    monkeypatch.setitem(sys.modules, "chumpy.ch", module)
    return Ch


def test_official_style_pkl_with_chumpy_and_landmark_npy(tmp_path, monkeypatch, head_model):
    """A file shaped like the official release (chumpy shapedirs with 300 + 100 components, uint32 kintree root,
    sparse regressor, separate landmark_embedding.npy) loads without chumpy and gives the same mesh."""
    data = build_procedural_head(seed=0)
    n_shape, n_expr = data["n_shape"], data["n_expr"]
    shapedirs = np.zeros(data["shapedirs"].shape[:2] + (400,))
    shapedirs[:, :, :n_shape] = data["shapedirs"][:, :, :n_shape]
    shapedirs[:, :, 300 : 300 + n_expr] = data["shapedirs"][:, :, n_shape:]
    Ch = _fake_chumpy(monkeypatch)
    official = {key: data[key] for key in ("v_template", "f", "posedirs", "weights")}
    official.update(
        shapedirs=Ch(shapedirs),
        J_regressor=scipy.sparse.csc_matrix(data["J_regressor"]),
        kintree_table=data["kintree_table"].astype(np.uint32),
        bs_style="lbs",
    )
    pkl = tmp_path / "generic_model.pkl"
    pkl.write_bytes(pickle.dumps(official, protocol=2))
    embedding = {
        "full_lmk_faces_idx": data["lmk_faces_idx"][None],
        "full_lmk_bary_coords": data["lmk_bary_coords"][None],
    }
    npy = tmp_path / "landmark_embedding.npy"
    np.save(npy, np.array(embedding, dtype=object), allow_pickle=True)
    monkeypatch.delitem(sys.modules, "chumpy.ch")  # loading must not need it
    monkeypatch.delitem(sys.modules, "chumpy")

    assert isinstance(load_flame_pickle(pkl)["shapedirs"], np.ndarray)
    model = FlameModel.from_pkl(pkl, landmark_embedding=npy)
    assert (model.n_shape, model.n_expr) == (300, 100)
    params = FlameParams.zeros(1, 300, 100)
    small = FlameParams.zeros(1, n_shape, n_expr)
    params.shape[0, 3] = small.shape[0, 3] = 1.0
    params.expression[0, 1] = small.expression[0, 1] = 1.0
    params.jaw[0, 0] = small.jaw[0, 0] = 0.2
    out, expected = model(params), head_model(small)
    assert torch.allclose(out.vertices, expected.vertices, atol=1e-6)
    assert torch.allclose(out.landmarks, expected.landmarks, atol=1e-6)


def test_bad_pkl_field_is_named(tmp_path):
    data = build_procedural_head(seed=0)
    data["weights"] = data["weights"][:, :4]
    path = tmp_path / "broken.pkl"
    path.write_bytes(pickle.dumps(data, protocol=4))
    with pytest.raises(ValueError, match="weights") as error:
        FlameModel.from_pkl(path)
    assert str(path) in str(error.value)
