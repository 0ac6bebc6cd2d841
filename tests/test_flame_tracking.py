"""Tracking files: v2 preferred over v1, VHAP and NeRSemble files of one motion give one mesh, no silent truncation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from geodiff4d.datasets.flame import FlameParams
from geodiff4d.datasets.flame_tracking import (
    TRACKING_V1,
    TRACKING_V2,
    TrackingError,
    load_tracking,
    missing_tracking_message,
    sequence_tracking,
    write_nersemble_tracking,
    write_npz,
)

FRAMES = 5


def _motion(model, seed: int = 0) -> FlameParams:
    gen = torch.Generator().manual_seed(seed)
    params = FlameParams.zeros(FRAMES, model.n_shape, model.n_expr)
    params.shape = torch.randn(1, model.n_shape, generator=gen).expand(FRAMES, -1).clone()
    params.expression = torch.randn(FRAMES, model.n_expr, generator=gen)
    params.rotation = (torch.rand(FRAMES, 3, generator=gen) * 2 - 1) * torch.tensor([1.2, 1.4, 2.5])
    params.translation = 0.1 * torch.randn(FRAMES, 3, generator=gen)
    for name in ("neck", "jaw", "eyes"):
        setattr(params, name, 0.2 * torch.randn(getattr(params, name).shape, generator=gen))
    return params


def test_v2_is_preferred_then_v1_then_an_error_naming_both(tmp_path, head_model):
    sequence = tmp_path / "EXP-1-head"
    v1_params, v2_params = _motion(head_model, 1), _motion(head_model, 2)
    write_nersemble_tracking(sequence / "tracking" / TRACKING_V1, v1_params)
    write_nersemble_tracking(sequence / "tracking" / TRACKING_V2, v2_params)
    tracking = sequence_tracking(sequence, head_model.n_shape, head_model.n_expr)
    assert tracking.kind == "v2" and tracking.path.name == TRACKING_V2
    assert torch.equal(tracking.params.expression, v2_params.expression)
    (sequence / "tracking" / TRACKING_V2).unlink()
    tracking = sequence_tracking(sequence, head_model.n_shape, head_model.n_expr)
    assert tracking.kind == "v1" and torch.equal(tracking.params.expression, v1_params.expression)
    (sequence / "tracking" / TRACKING_V1).unlink()
    assert sequence_tracking(sequence) is None
    message = missing_tracking_message(sequence)
    assert (
        str(sequence / "tracking" / TRACKING_V2) in message
        and str(sequence / "tracking" / TRACKING_V1) in message
    )


def _vhap_arrays(model, params: FlameParams) -> dict[str, np.ndarray]:
    """The same motion as VHAP stores it: axis-angle about the root joint, translation added after skinning.

    v = s R v0 + t (ours, s = 1) equals R (v0 - J0) + J0 + t_vhap with t_vhap = t - J0 + R J0.
    """
    unplaced = FlameParams(
        **{**vars(params), "rotation": torch.zeros(FRAMES, 3), "translation": torch.zeros(FRAMES, 3)}
    )
    root = model(unplaced).joints[:, 0].double().numpy()  # [T, 3]
    rotation = Rotation.from_euler("XYZ", params.rotation.double().numpy())
    return {
        "shape": params.shape[0].numpy(),
        "expr": params.expression.numpy(),
        "rotation": rotation.as_rotvec().astype(np.float32),
        "neck_pose": params.neck.numpy(),
        "jaw_pose": params.jaw.numpy(),
        "eyes_pose": params.eyes.numpy(),
        "translation": (params.translation.double().numpy() - root + rotation.apply(root)).astype(np.float32),
        "static_offset": np.zeros((1, model.n_vertices, 3), np.float32),
        "dynamic_offset": np.zeros((FRAMES, model.n_vertices, 3), np.float32),
    }


def test_vhap_and_nersemble_files_of_one_motion_give_the_same_meshes(tmp_path, head_model):
    motion = _motion(head_model, 3)
    write_nersemble_tracking(tmp_path / TRACKING_V2, motion)
    write_npz(tmp_path / "flame_param.npz", _vhap_arrays(head_model, motion))
    nersemble = load_tracking(tmp_path / TRACKING_V2, head_model)
    vhap = load_tracking(tmp_path / "flame_param.npz", head_model)
    assert (nersemble.kind, vhap.kind) == ("v2", "vhap")
    with torch.no_grad():
        a, b = head_model(nersemble.params).vertices, head_model(vhap.params).vertices
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_vhap_per_vertex_offsets_are_refused_not_dropped(tmp_path, head_model):
    arrays = _vhap_arrays(head_model, _motion(head_model))
    arrays["static_offset"][0, 10] = 0.001
    write_npz(tmp_path / "flame_param.npz", arrays)
    with pytest.raises(TrackingError, match="flame_param.npz.*static_offset"):
        load_tracking(tmp_path / "flame_param.npz", head_model)


def test_real_sized_tracking_is_not_truncated_to_a_smaller_model(tmp_path, head_model):
    real = FlameParams.zeros(FRAMES, 300, 100)
    real.shape[:, 250] = 0.5  # identity beyond the procedural head's components
    write_nersemble_tracking(tmp_path / TRACKING_V2, real)
    with pytest.raises(TrackingError, match=r"flame2023_tracking_v2.npz.*shape has 300 .*--flame"):
        load_tracking(tmp_path / TRACKING_V2, head_model)
    padded = FlameParams.zeros(FRAMES, head_model.n_shape, head_model.n_expr)  # zero padding is no loss
    write_nersemble_tracking(tmp_path / TRACKING_V2, padded)
    assert load_tracking(tmp_path / TRACKING_V2, head_model).params.shape.shape == (
        FRAMES,
        head_model.n_shape,
    )


def test_rotation_matrices_of_another_convention_are_refused(tmp_path, head_model):
    path = tmp_path / TRACKING_V2
    write_nersemble_tracking(path, _motion(head_model))
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["rotation_matrices"] = Rotation.from_rotvec(arrays["rotation"]).as_matrix().astype(np.float32)
    write_npz(path, arrays)
    with pytest.raises(TrackingError, match="rotation_matrices differ from the Euler XYZ"):
        load_tracking(path, head_model)
