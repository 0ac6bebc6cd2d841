"""Export to the standard 3DGS ``point_cloud.ply`` (what 3DGS viewers and tools read), via plyfile.

Properties, in order: x y z nx ny nz f_dc_0..2 f_rest_0..44 opacity scale_0..2 rot_0..3, float32: the
62-property layout of SH degree 3 whatever degree was fitted (lower degrees padded with zeros), since many
viewers read that fixed layout only. As in 3DGS, opacity is the logit, scales are log world scales, rot is
the wxyz quaternion, and f_rest is stored channel-major (all R coefficients, then G, then B).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from plyfile import PlyData, PlyElement

from geodiff4d.core.io.atomic import atomic_output
from geodiff4d.recon.sh import n_coefficients

PLY_SH_DEGREE = 3


def property_names(n_rest: int) -> list[str]:
    """Standard names for ``n_rest`` higher-order SH coefficients per channel."""
    return (
        ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
        + [f"f_rest_{i}" for i in range(3 * n_rest)]
        + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    )


def write_point_cloud_ply(
    path: str | Path,
    means: np.ndarray,  # [N, 3]
    normals: np.ndarray,  # [N, 3]
    sh_dc: np.ndarray,  # [N, 3]
    sh_rest: np.ndarray,  # [N, K-1, 3], K <= 16 (padded to 16)
    opacity_logit: np.ndarray,  # [N]
    log_scales: np.ndarray,  # [N, 3]
    quats: np.ndarray,  # [N, 4] wxyz
) -> None:
    n, n_rest = means.shape[0], n_coefficients(PLY_SH_DEGREE) - 1
    if sh_rest.shape[1] > n_rest:
        raise ValueError(
            f"write_point_cloud_ply: {sh_rest.shape[1]} higher-order SH coefficients, at most {n_rest}"
        )
    sh_rest = np.concatenate([sh_rest, np.zeros((n, n_rest - sh_rest.shape[1], 3), sh_rest.dtype)], axis=1)
    columns = [
        means,
        normals,
        sh_dc,
        np.transpose(sh_rest, (0, 2, 1)).reshape(n, 3 * n_rest),  # [N, 3 * (K-1)] channel-major
        opacity_logit.reshape(n, 1),
        log_scales,
        quats,
    ]
    table = np.concatenate([np.asarray(c, dtype=np.float32).reshape(n, -1) for c in columns], axis=1)
    names = property_names(n_rest)
    if table.shape[1] != len(names):
        raise ValueError(f"write_point_cloud_ply: got {table.shape[1]} columns for {len(names)} properties")
    vertex = np.empty(n, dtype=[(name, "f4") for name in names])
    for i, name in enumerate(names):
        vertex[name] = table[:, i]
    with atomic_output(path) as tmp:
        PlyData([PlyElement.describe(vertex, "vertex")]).write(str(tmp))


def read_point_cloud_ply(path: str | Path) -> dict[str, np.ndarray]:
    """Read a 3DGS PLY back into arrays named like :func:`write_point_cloud_ply`'s arguments."""
    vertex = PlyData.read(str(path))["vertex"]
    names = [p.name for p in vertex.properties]
    n_rest = sum(name.startswith("f_rest_") for name in names) // 3
    missing = [name for name in property_names(n_rest) if name not in names]
    if missing:
        raise ValueError(f"{path}: not a 3DGS point cloud, missing properties {missing}")

    def stack(keys: list[str]) -> np.ndarray:
        return np.stack([np.asarray(vertex[k], dtype=np.float32) for k in keys], axis=1)

    n = len(vertex["x"])
    rest = np.zeros((n, 3, 0), np.float32)
    if n_rest:
        rest = stack([f"f_rest_{i}" for i in range(3 * n_rest)]).reshape(n, 3, n_rest)
    rest = rest.transpose(0, 2, 1)  # [N, K-1, 3]
    return {
        "means": stack(["x", "y", "z"]),
        "normals": stack(["nx", "ny", "nz"]),
        "sh_dc": stack(["f_dc_0", "f_dc_1", "f_dc_2"]),
        "sh_rest": np.ascontiguousarray(rest),
        "opacity_logit": np.asarray(vertex["opacity"], dtype=np.float32),
        "log_scales": stack(["scale_0", "scale_1", "scale_2"]),
        "quats": stack(["rot_0", "rot_1", "rot_2", "rot_3"]),
    }
