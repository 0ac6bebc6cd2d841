"""3DGS point_cloud.ply export reads back with plyfile under the standard names."""

from __future__ import annotations

import numpy as np
import pytest
from plyfile import PlyData

from geodiff4d.recon.ply import read_point_cloud_ply, write_point_cloud_ply


def test_ply_round_trip_with_standard_names(tmp_path):
    rng = np.random.default_rng(0)
    n, k = 7, 16  # SH degree 3: 15 rest coefficients per channel
    arrays = {
        "means": rng.normal(size=(n, 3)), "normals": rng.normal(size=(n, 3)), "sh_dc": rng.normal(size=(n, 3)),
        "sh_rest": rng.normal(size=(n, k - 1, 3)), "opacity_logit": rng.normal(size=n),
        "log_scales": rng.normal(size=(n, 3)), "quats": rng.normal(size=(n, 4)),
    }  # fmt: skip
    arrays = {key: value.astype(np.float32) for key, value in arrays.items()}
    path = tmp_path / "point_cloud.ply"
    write_point_cloud_ply(path, **arrays)
    vertex = PlyData.read(str(path))["vertex"]
    names = [p.name for p in vertex.properties]
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[9:54] == [f"f_rest_{i}" for i in range(45)]
    assert names[54:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert all(p.val_dtype in ("f4", "float32", "float") for p in vertex.properties)
    np.testing.assert_array_equal(vertex["y"], arrays["means"][:, 1])
    np.testing.assert_array_equal(vertex["rot_0"], arrays["quats"][:, 0])
    np.testing.assert_array_equal(vertex["opacity"], arrays["opacity_logit"])
    # 3DGS layout of f_rest: channel-major, f_rest_{c * 15 + j} = coefficient j+1 of channel c
    np.testing.assert_array_equal(vertex["f_rest_16"], arrays["sh_rest"][:, 1, 1])
    back = read_point_cloud_ply(path)
    for key, value in arrays.items():
        np.testing.assert_array_equal(back[key], value)


def test_missing_property_is_named(tmp_path):
    from plyfile import PlyElement

    vertex = np.zeros(2, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    path = tmp_path / "bad.ply"
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(path))
    with pytest.raises(ValueError, match="bad.ply.*missing properties"):
        read_point_cloud_ply(path)
