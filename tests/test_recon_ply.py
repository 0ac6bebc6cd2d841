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
        "means": rng.normal(size=(n, 3)),
        "normals": rng.normal(size=(n, 3)),
        "sh_dc": rng.normal(size=(n, 3)),
        "sh_rest": rng.normal(size=(n, k - 1, 3)),
        "opacity_logit": rng.normal(size=n),
        "log_scales": rng.normal(size=(n, 3)),
        "quats": rng.normal(size=(n, 4)),
    }
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


STANDARD_DEGREE3_LAYOUT = (
    ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    + [f"f_rest_{i}" for i in range(45)]
    + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
)


def _fixed_layout_reader(path) -> np.ndarray:
    """A viewer's reader that knows one layout only: 62 float32 properties in the 3DGS order (degree 3), read
    straight into an [N, 62] table: what fixed-layout WebGL/Unity viewers and 3DGS's own ``load_ply`` with
    ``max_sh_degree=3`` (which asserts 45 ``f_rest`` properties) expect."""
    vertex = PlyData.read(str(path))["vertex"]
    assert [p.name for p in vertex.properties] == STANDARD_DEGREE3_LAYOUT
    table = vertex.data.view(np.float32).reshape(len(vertex.data), -1)  # fails unless every field is float32
    assert table.shape[1] == 62
    return table


@pytest.mark.parametrize("degree", [0, 1, 2])
def test_lower_degrees_are_padded_to_the_fixed_degree3_layout(tmp_path, degree):
    rng = np.random.default_rng(degree)
    n, rest = 5, (degree + 1) ** 2 - 1
    arrays = {
        "means": rng.normal(size=(n, 3)),
        "normals": rng.normal(size=(n, 3)),
        "sh_dc": rng.normal(size=(n, 3)),
        "sh_rest": rng.normal(size=(n, rest, 3)),
        "opacity_logit": rng.normal(size=n),
        "log_scales": rng.normal(size=(n, 3)),
        "quats": rng.normal(size=(n, 4)),
    }
    arrays = {key: value.astype(np.float32) for key, value in arrays.items()}
    path = tmp_path / "point_cloud.ply"
    write_point_cloud_ply(path, **arrays)
    table = _fixed_layout_reader(path)
    np.testing.assert_array_equal(table[:, 0:3], arrays["means"])
    np.testing.assert_array_equal(table[:, 6:9], arrays["sh_dc"])
    f_rest = table[:, 9:54].reshape(n, 3, 15)  # channel-major, as 3DGS's load_ply reshapes it
    np.testing.assert_array_equal(f_rest[:, :, :rest], arrays["sh_rest"].transpose(0, 2, 1))
    assert not f_rest[:, :, rest:].any()
    np.testing.assert_array_equal(table[:, 54], arrays["opacity_logit"])
    np.testing.assert_array_equal(table[:, 55:58], arrays["log_scales"])
    np.testing.assert_array_equal(table[:, 58:62], arrays["quats"])


def test_more_than_degree3_is_refused(tmp_path):
    n = 2
    with pytest.raises(ValueError, match="at most 15"):
        write_point_cloud_ply(
            tmp_path / "x.ply",
            np.zeros((n, 3)),
            np.zeros((n, 3)),
            np.zeros((n, 3)),
            np.zeros((n, 24, 3)),
            np.zeros(n),
            np.zeros((n, 3)),
            np.zeros((n, 4)),
        )
