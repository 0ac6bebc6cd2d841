"""Procedural FLAME-structured head: pkl round trip, determinism, anatomy of the template, texture."""

import dlib
import numpy as np
import scipy.sparse
import torch

from geodiff4d.datasets.cameras import intrinsics, look_at_camera
from geodiff4d.datasets.flame import FlameModel, FlameParams
from geodiff4d.datasets.flame_pkl import load_flame_pickle
from geodiff4d.datasets.procedural_head import build_procedural_head, save_flame_pickle
from geodiff4d.datasets.render import render_head
from geodiff4d.datasets.textures import face_photos, skin_texture


def test_pkl_round_trip_through_the_restricted_loader(tmp_path):
    built = build_procedural_head(seed=3)
    path = tmp_path / "head.pkl"
    save_flame_pickle(built, path)
    loaded = load_flame_pickle(path)
    assert set(loaded) == set(built)
    for key, value in built.items():
        if scipy.sparse.issparse(value):
            assert scipy.sparse.issparse(loaded[key]) and (loaded[key] != value).nnz == 0, key
        else:
            assert np.array_equal(np.asarray(loaded[key]), np.asarray(value)), key
    from_file, from_dict = FlameModel.from_pkl(path), FlameModel.from_dict(built, "memory")
    for name, buffer in from_dict.named_buffers():
        assert torch.equal(buffer, dict(from_file.named_buffers())[name]), name


def test_same_seed_gives_byte_identical_pkl(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        save_flame_pickle(build_procedural_head(seed), tmp_path / f"{name}.pkl")
    assert (tmp_path / "a.pkl").read_bytes() == (tmp_path / "b.pkl").read_bytes()
    assert (tmp_path / "a.pkl").read_bytes() != (tmp_path / "c.pkl").read_bytes()


def test_template_is_head_sized_and_rigged(head_model):
    template = head_model.v_template
    width, height, depth = (template.max(0).values - template.min(0).values).tolist()
    assert 0.14 < width < 0.2 and 0.3 < height < 0.4 and 0.18 < depth < 0.25
    assert (head_model.n_shape, head_model.n_expr) == (20, 10)
    assert torch.allclose(head_model.weights.sum(1), torch.ones(head_model.n_vertices), atol=1e-6)
    joints = head_model.j_regressor @ template
    root, neck, jaw, left_eye, right_eye = joints
    assert root[1] < neck[1] < jaw[1] < left_eye[1] and left_eye[0] > 0 > right_eye[0]
    assert torch.allclose(left_eye * torch.tensor([-1, 1, 1]), right_eye, atol=1e-6)
    eyeball = head_model.weights[:, 3] == 1  # eyeball vertices sit on a sphere around the eye joint
    radii = (template[eyeball] - left_eye).norm(dim=1)
    assert radii.std() < 1e-6 and 0.01 < radii.mean() < 0.014
    assert head_model.uv_coords.min() >= 0 and head_model.uv_coords.max() <= 1
    assert head_model.uv_faces.shape == head_model.faces.shape


def test_eye_rotation_moves_only_the_eyeball(head_model):
    params = FlameParams.zeros(1, head_model.n_shape, head_model.n_expr)
    params.eyes[0, 1] = 0.4  # left eye looks to the side
    moved = (head_model(params).vertices[0] - head_model.v_template).norm(dim=1) > 1e-7
    assert torch.equal(moved, (head_model.weights[:, 3] == 1) & moved)
    assert moved.sum() > 50


def test_landmarks_sit_on_the_front_of_the_face(head_model):
    landmarks = head_model(FlameParams.zeros(1, head_model.n_shape, head_model.n_expr)).landmarks[0]
    x, y, z = landmarks.T
    assert int(z.argmax()) == 30  # nose tip is the frontmost landmark
    assert (z > 0.02).all()
    assert y[36:48].min() > y[48:68].max()  # eyes above the mouth
    assert y[17:27].min() > y[36:48].max() - 0.005  # brows over the eyes
    assert int(y[:17].argmin()) == 8  # chin is the lowest jaw point
    assert (x[36:42] < 0).all() and (x[42:48] > 0).all()  # iBUG right eye (image left) at -x
    assert y[27] > y[30] > y[33] > y[51]  # nose bridge, tip, base, upper lip


def test_textured_frontal_render_has_a_detectable_face(head_model):
    assert len(face_photos()) == 3
    texture = skin_texture(head_model, identity_seed=1, size=512)
    assert texture.shape == (512, 512, 3) and texture.dtype == np.float32
    params = FlameParams.zeros(1, head_model.n_shape, head_model.n_expr)
    camera = look_at_camera(
        np.array([0, 0, 1.0]), np.zeros(3), np.array([0, 1.0, 0]), intrinsics(820, 256, 256), 256, 256
    )
    image = (render_head(head_model, params, camera, texture).rgb.permute(1, 2, 0).numpy() * 255).astype(
        np.uint8
    )
    boxes = dlib.get_frontal_face_detector()(image, 0)
    assert len(boxes) == 1
    nose = camera.project(head_model(params).landmarks[0, 30:31].double().numpy())[0]
    box = boxes[0]
    assert box.left() < nose[0] < box.right() and box.top() < nose[1] < box.bottom()
    assert not np.array_equal(
        texture, skin_texture(head_model, identity_seed=4, size=512)
    )  # same photo, new tone
