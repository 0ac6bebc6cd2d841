"""FLAME head model: shape/expression blendshapes, pose correctives and linear blend skinning (batched).

Joint order (FLAME): 0 root/global, 1 neck, 2 jaw, 3 left eye, 4 right eye. Posing follows the released NeRSemble
tracking (the official ``FlameProvider``): FLAME is skinned with zero global (root) rotation, full pose =
[0, neck, jaw, eyes] as 5 axis-angle vectors, and then placed by the model-to-world transform
``v_world = scale * R v_lbs + translation`` with ``R = Rotation.from_euler("XYZ", rotation)`` (intrinsic Euler
XYZ, as scipy and dreifus' ``Pose.from_euler`` define it). File formats live in ``flame_tracking``.
Skinning is evaluated in delta form, ``v + sum_j w_j ((R_j - I)(v - J_j) + d_j)`` with ``d_j`` the joint
displacement, which equals standard LBS (weights sum to one) and returns the rest mesh bit-exactly at zero pose.
UV coordinates follow FLAME/OpenGL: u to the right, v up (v = 1 is the top row of the texture image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import scipy.sparse
import torch
from torch import Tensor

from geodiff4d.datasets.flame_pkl import load_flame_pickle, load_pickled_npy

N_JOINTS = 5
REAL_FLAME_SPLIT = {400: (300, 100)}  # shapedirs components -> (shape, expression) of the official release


def rodrigues(axis_angle: Tensor) -> Tensor:
    """Rotation matrices [N, 3, 3] from axis-angle vectors [N, 3]; exactly the identity at zero."""
    angle = torch.linalg.norm(axis_angle + 1e-8, dim=1, keepdim=True)  # [N, 1]
    axis = axis_angle / angle
    cos, sin = torch.cos(angle)[:, :, None], torch.sin(angle)[:, :, None]
    x, y, z = axis.unbind(dim=1)
    zero = torch.zeros_like(x)
    skew = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=1).view(-1, 3, 3)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)[None]
    return eye + sin * skew + (1 - cos) * torch.bmm(skew, skew)


def euler_xyz_matrix(angles: Tensor) -> Tensor:
    """Rotation matrices [N, 3, 3] from intrinsic Euler XYZ angles [N, 3]: ``Rx(a) @ Ry(b) @ Rz(c)``.

    The same as scipy's ``Rotation.from_euler("XYZ", angles)``, differentiable.
    """
    (ca, cb, cc), (sa, sb, sc) = torch.cos(angles).unbind(1), torch.sin(angles).unbind(1)
    entries = [
        cb * cc,
        -cb * sc,
        sb,
        ca * sc + sa * sb * cc,
        ca * cc - sa * sb * sc,
        -sa * cb,
        sa * sc - ca * sb * cc,
        sa * cc + ca * sb * sc,
        ca * cb,
    ]
    return torch.stack(entries, dim=1).view(-1, 3, 3)


@dataclass
class FlameParams:
    """A batch of B frames of FLAME parameters (float32 tensors)."""

    shape: Tensor  # [B, n_shape]
    expression: Tensor  # [B, n_expr]
    rotation: Tensor  # [B, 3] model-to-world rotation, intrinsic Euler XYZ (radians)
    neck: Tensor  # [B, 3]
    jaw: Tensor  # [B, 3]
    eyes: Tensor  # [B, 6] left then right eye axis-angle
    translation: Tensor  # [B, 3] model-to-world translation (metres)
    scale: Tensor  # [B, 1] uniform scale of the model-to-world transform

    @classmethod
    def zeros(cls, batch: int, n_shape: int, n_expr: int) -> FlameParams:
        """Neutral parameters: everything zero except ``scale = 1``."""
        z = lambda n: torch.zeros(batch, n, dtype=torch.float32)  # noqa: E731
        return cls(z(n_shape), z(n_expr), z(3), z(3), z(3), z(6), z(3), torch.ones(batch, 1))

    @property
    def batch_size(self) -> int:
        return self.rotation.shape[0]

    def __getitem__(self, index: int | slice | Sequence[int]) -> FlameParams:
        """Frames ``index`` as a new batch (an int keeps a batch of one)."""
        index = slice(index, index + 1) if isinstance(index, int) else index
        return FlameParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @classmethod
    def cat(cls, batches: Sequence[FlameParams]) -> FlameParams:
        """One batch of all frames of ``batches``, in order (one model call instead of several)."""
        return cls(**{f.name: torch.cat([getattr(b, f.name) for b in batches]) for f in fields(cls)})

    def with_zero_expression(self) -> FlameParams:
        """Same pose, shape and placement with expression, jaw and eyes zeroed (the pose-map input)."""
        return FlameParams(
            self.shape,
            torch.zeros_like(self.expression),
            self.rotation,
            self.neck,
            torch.zeros_like(self.jaw),
            torch.zeros_like(self.eyes),
            self.translation,
            self.scale,
        )

    def full_pose(self) -> Tensor:
        """[B, 5, 3] axis-angle per joint in FLAME order; the root stays zero (``rotation`` places the model)."""
        root = torch.zeros_like(self.rotation)
        return torch.cat([root, self.neck, self.jaw, self.eyes], dim=1).view(-1, N_JOINTS, 3)

    def rotation_matrices(self) -> Tensor:
        """[B, 3, 3] the model-to-world rotation ``R`` (NeRSemble's ``rotation_matrices``)."""
        return euler_xyz_matrix(self.rotation)

    def model_to_world(self) -> Tensor:
        """[B, 4, 4] ``[[scale * R, translation], [0, 0, 0, 1]]``: FLAME model space -> world (metres)."""
        transform = torch.zeros(self.batch_size, 4, 4, dtype=self.rotation.dtype, device=self.rotation.device)
        transform[:, :3, :3] = self.scale[:, :, None] * self.rotation_matrices()
        transform[:, :3, 3] = self.translation
        transform[:, 3, 3] = 1.0
        return transform

    def to_numpy_dict(self) -> dict[str, np.ndarray]:
        """Arrays named and shaped as NeRSemble's ``flame2023_tracking.npz`` (without ``frames``).

        ``shape`` (1, n_shape) and ``scale`` (1, 1) are per sequence, so every frame must share them.
        """
        for name in ("shape", "scale"):
            value = getattr(self, name)
            if not torch.equal(value, value[:1].expand_as(value)):
                raise ValueError(
                    f"FlameParams.to_numpy_dict: {name} differs across frames; the npz stores one"
                )
        arrays = {
            "shape": self.shape[:1],
            "expression": self.expression,
            "rotation": self.rotation,
            "rotation_matrices": self.rotation_matrices(),
            "translation": self.translation,
            "jaw": self.jaw,
            "neck": self.neck,
            "eyes": self.eyes,
            "scale": self.scale[:1],
        }
        return {name: value.detach().cpu().numpy().astype(np.float32) for name, value in arrays.items()}

    @classmethod
    def from_numpy_dict(cls, arrays: dict[str, np.ndarray], n_shape: int, n_expr: int) -> FlameParams:
        """Read NeRSemble tracking arrays; shape/expression are truncated or zero-padded to the model's sizes."""
        missing = {"shape", "expression", "rotation", "translation", "jaw", "neck", "eyes", "scale"} - set(
            arrays
        )
        if missing:
            raise KeyError(f"FLAME tracking arrays lack {sorted(missing)}")
        frames = np.asarray(arrays["rotation"]).shape[0]

        def column(name: str, width: int) -> Tensor:
            value = np.asarray(arrays[name], dtype=np.float32)
            if value.ndim != 2 or value.shape[0] not in (1, frames):
                raise ValueError(
                    f"FLAME tracking array {name!r} has shape {value.shape}, expected (1|{frames}, D)"
                )
            fitted = np.zeros((frames, width), dtype=np.float32)
            kept = min(width, value.shape[1])
            fitted[:, :kept] = value[:, :kept]  # broadcasts per-sequence (1, D) rows to every frame
            return torch.from_numpy(fitted)

        return cls(
            column("shape", n_shape),
            column("expression", n_expr),
            column("rotation", 3),
            column("neck", 3),
            column("jaw", 3),
            column("eyes", 6),
            column("translation", 3),
            column("scale", 1),
        )


@dataclass
class FlameOutput:
    vertices: Tensor  # [B, V, 3] world space, metres
    joints: Tensor  # [B, 5, 3]
    landmarks: Tensor  # [B, 68, 3] (empty [B, 0, 3] when the model has no landmark embedding)


def _split_shapedirs(
    data: dict, source: str, n_shape: int | None, n_expr: int | None
) -> tuple[np.ndarray, int, int]:
    """The first n_shape shape and n_expr expression columns of the pkl's shapedirs, and both counts."""
    shapedirs = np.asarray(data["shapedirs"])
    total = shapedirs.shape[2]
    file_split = (data["n_shape"], data["n_expr"]) if "n_shape" in data else REAL_FLAME_SPLIT.get(total)
    if file_split is None and (n_shape is None or n_expr is None):
        raise ValueError(
            f"{source}: cannot split {total} shapedirs into shape/expression; pass n_shape/n_expr"
        )
    n_shape_file, n_expr_file = (int(v) for v in file_split) if file_split else (n_shape, n_expr)
    n_shape = n_shape_file if n_shape is None else n_shape
    n_expr = n_expr_file if n_expr is None else n_expr
    if n_shape > n_shape_file or n_expr > n_expr_file:
        raise ValueError(
            f"{source}: asked for {n_shape}/{n_expr} components, file has {n_shape_file}/{n_expr_file}"
        )
    shapedirs = np.concatenate(
        [shapedirs[:, :, :n_shape], shapedirs[:, :, n_shape_file : n_shape_file + n_expr]], axis=2
    )
    return shapedirs, n_shape, n_expr


def _check_field_shapes(
    data: dict,
    source: str,
    shapedirs: np.ndarray,
    j_regressor: np.ndarray,
    parents: np.ndarray,
    n_vertices: int,
) -> None:
    """Raise a ValueError naming the first pkl field whose shape does not fit ``n_vertices`` and the joints."""
    shapes = {
        "f": (np.asarray(data["f"]).shape[1:], (3,)),
        "shapedirs": (shapedirs.shape[:2], (n_vertices, 3)),
        "posedirs": (np.asarray(data["posedirs"]).shape, (n_vertices, 3, (N_JOINTS - 1) * 9)),
        "J_regressor": (j_regressor.shape, (N_JOINTS, n_vertices)),
        "weights": (np.asarray(data["weights"]).shape, (n_vertices, N_JOINTS)),
        "kintree_table": (parents.shape, (N_JOINTS,)),
    }
    for key, (got, expected) in shapes.items():
        if tuple(got) != tuple(expected):
            raise ValueError(f"{source}: field {key!r} has shape {tuple(got)}, expected {tuple(expected)}")


class FlameModel(torch.nn.Module):
    """FLAME-structured head model; build it with :meth:`from_pkl`."""

    def __init__(
        self,
        v_template: np.ndarray,  # [V, 3]
        faces: np.ndarray,  # [F, 3]
        shapedirs: np.ndarray,  # [V, 3, n_shape + n_expr]
        posedirs: np.ndarray,  # [V, 3, 36]
        j_regressor: np.ndarray,  # [5, V]
        parents: np.ndarray,  # [5], -1 for the root
        weights: np.ndarray,  # [V, 5]
        n_shape: int,
        n_expr: int,
        uv_coords: np.ndarray,  # [Vt, 2]
        uv_faces: np.ndarray,  # [F, 3]
        landmark_faces: np.ndarray,  # [68]
        landmark_bary: np.ndarray,  # [68, 3]
    ) -> None:
        super().__init__()
        n_vertices = v_template.shape[0]
        self.n_shape, self.n_expr, self.n_vertices = int(n_shape), int(n_expr), int(n_vertices)
        self.parents = [int(p) for p in parents]
        f32 = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
        i64 = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731
        self.register_buffer("v_template", f32(v_template))
        self.register_buffer("faces", i64(faces))
        # [V, 3, n_shape + n_expr] laid out component-major in memory, so blending is one contiguous matmul
        components = f32(shapedirs[:, :, : n_shape + n_expr]).permute(2, 0, 1).contiguous()
        self.register_buffer("shapedirs", components.permute(1, 2, 0))
        self.register_buffer("posedirs", f32(np.reshape(posedirs, (n_vertices * 3, -1)).T))  # [36, V*3]
        self.register_buffer("j_regressor", f32(j_regressor))
        self.register_buffer("weights", f32(weights))
        self.register_buffer("uv_coords", f32(uv_coords))
        self.register_buffer("uv_faces", i64(uv_faces))
        self.register_buffer("landmark_faces", i64(landmark_faces))
        self.register_buffer("landmark_bary", f32(landmark_bary))

    @classmethod
    def from_pkl(
        cls,
        path: str | Path,
        landmark_embedding: str | Path | None = None,
        uv_npz: str | Path | None = None,
        n_shape: int | None = None,
        n_expr: int | None = None,
    ) -> FlameModel:
        """Load a FLAME ``.pkl`` (official or procedural) through the restricted unpickler.

        Landmarks come from ``landmark_embedding`` (FLAME's ``landmark_embedding.npy`` dict with
        ``full_lmk_faces_idx``/``full_lmk_bary_coords``, or an ``.npz`` with ``lmk_faces_idx``/
        ``lmk_bary_coords``) or else from those keys inside the pkl. UVs come from ``uv_npz`` (``vt``, ``ft``,
        e.g. FLAME's texture-space file) or the pkl's ``vt``/``ft``. The shape/expression split of
        ``shapedirs`` comes from the arguments, the pkl's ``n_shape``/``n_expr``, or the official 300/100.
        """
        data = load_flame_pickle(path)
        return cls.from_dict(data, str(path), landmark_embedding, uv_npz, n_shape, n_expr)

    @classmethod
    def from_dict(
        cls,
        data: dict,
        source: str,
        landmark_embedding: str | Path | None = None,
        uv_npz: str | Path | None = None,
        n_shape: int | None = None,
        n_expr: int | None = None,
    ) -> FlameModel:
        """Build from a FLAME pkl dict; ``source`` names the file in errors."""
        required = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights")
        missing = [key for key in required if key not in data]
        if missing:
            raise KeyError(f"{source}: FLAME pkl lacks {missing}")
        v_template = np.asarray(data["v_template"], dtype=np.float64)
        n_vertices = v_template.shape[0]
        shapedirs, n_shape, n_expr = _split_shapedirs(data, source, n_shape, n_expr)
        j_regressor = data["J_regressor"]
        j_regressor = j_regressor.toarray() if scipy.sparse.issparse(j_regressor) else np.asarray(j_regressor)
        parents = np.asarray(data["kintree_table"], dtype=np.int64)[0].copy()
        parents[0] = -1  # the official file stores 2**32 - 1 for the root
        _check_field_shapes(data, source, shapedirs, j_regressor, parents, n_vertices)
        faces = np.asarray(data["f"], dtype=np.int64)
        vt, ft = _uv_arrays(data, source, uv_npz, faces)
        lmk_faces, lmk_bary = _landmark_arrays(data, landmark_embedding)
        return cls(
            v_template,
            faces,
            shapedirs,
            np.asarray(data["posedirs"]),
            j_regressor,
            parents,
            np.asarray(data["weights"]),
            n_shape,
            n_expr,
            vt,
            ft,
            lmk_faces,
            lmk_bary,
        )

    def forward(self, params: FlameParams) -> FlameOutput:
        """Posed world-space vertices, joints and landmarks of a batch.

        Products over the vertex axis are plain matmuls or elementwise: einsums and broadcast [3, 3] @ [3, 1]
        products over vertices become thousands of tiny GEMMs on CPU, which made posing a frame twice as slow.
        """
        batch = params.batch_size
        coefficients = torch.cat([params.shape, params.expression], dim=1)  # [B, n_shape + n_expr]
        blend = coefficients @ self.shapedirs.reshape(-1, self.shapedirs.shape[2]).T  # [B, V*3], no copy
        v_shaped = self.v_template + blend.view(batch, -1, 3)
        joints = self.j_regressor @ v_shaped  # [B, 5, 3]
        rotations = rodrigues(params.full_pose().reshape(-1, 3)).view(batch, N_JOINTS, 3, 3)
        eye = torch.eye(3, dtype=rotations.dtype, device=rotations.device)
        pose_feature = (rotations[:, 1:] - eye).reshape(batch, -1)  # [B, 36]
        v_posed = v_shaped + (pose_feature @ self.posedirs).view(batch, -1, 3)
        world_minus_eye, displacement = self._chain(rotations, joints)
        joint_offsets = displacement - (world_minus_eye @ joints[..., None])[..., 0]  # [B, 5, 3]
        per_joint = torch.cat(
            [world_minus_eye.reshape(batch, N_JOINTS, 9), joint_offsets], dim=2
        )  # [B, 5, 12]
        skinning = self.weights @ per_joint  # [B, V, 12]: blended (R - I) and offset per vertex
        blended = skinning[..., :9].reshape(batch, -1, 3, 3)
        x, y, z = v_posed[..., 0:1], v_posed[..., 1:2], v_posed[..., 2:3]
        v_lbs = (
            v_posed + (blended[..., 0] * x + blended[..., 1] * y + blended[..., 2] * z) + skinning[..., 9:]
        )
        transform = params.model_to_world()  # [B, 4, 4]
        linear, translation = transform[:, :3, :3], transform[:, :3, 3]
        vertices = torch.baddbmm(translation[:, None], v_lbs, linear.transpose(1, 2))
        posed_joints = torch.baddbmm(translation[:, None], joints + displacement, linear.transpose(1, 2))
        landmark_corners = vertices[:, self.faces[self.landmark_faces]]  # [B, 68, 3, 3]
        landmarks = torch.einsum("blkc,lk->blc", landmark_corners, self.landmark_bary)
        return FlameOutput(vertices=vertices, joints=posed_joints, landmarks=landmarks)

    def _chain(self, rotations: Tensor, joints: Tensor) -> tuple[Tensor, Tensor]:
        """World rotations minus identity [B, 5, 3, 3] and joint displacements [B, 5, 3] along the kinematic tree."""
        eye = torch.eye(3, dtype=rotations.dtype, device=rotations.device)
        world = [rotations[:, 0]]
        displacement = [torch.zeros_like(joints[:, 0])]
        for j in range(1, N_JOINTS):
            parent = self.parents[j]
            world.append(world[parent] @ rotations[:, j])
            bone = joints[:, j] - joints[:, parent]
            displacement.append(displacement[parent] + ((world[parent] - eye) @ bone[..., None])[..., 0])
        return torch.stack(world, dim=1) - eye, torch.stack(displacement, dim=1)


def _uv_arrays(
    data: dict, source: str, uv_npz: str | Path | None, faces: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    if uv_npz is not None:
        with np.load(uv_npz, allow_pickle=False) as uv:
            data, source = {"vt": uv["vt"], "ft": uv["ft"]}, str(uv_npz)
    if "vt" not in data or "ft" not in data:
        return np.zeros((0, 2)), np.zeros((0, 3), dtype=np.int64)
    vt, ft = np.asarray(data["vt"], dtype=np.float64), np.asarray(data["ft"], dtype=np.int64)
    if ft.shape != faces.shape or vt.ndim != 2 or vt.shape[1] != 2:
        raise ValueError(f"{source}: vt/ft have shapes {vt.shape}/{ft.shape}, expected [Vt, 2]/{faces.shape}")
    return vt, ft


def _landmark_arrays(data: dict, landmark_embedding: str | Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Landmark faces [L] and barycentrics [L, 3] (L = 0 when neither file nor pkl has an embedding)."""
    source = "FLAME pkl"
    faces_key, bary_key = "lmk_faces_idx", "lmk_bary_coords"
    if landmark_embedding is not None:
        path = Path(landmark_embedding)
        source = str(path)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                data = {key: npz[key] for key in npz.files}
        else:
            data = load_pickled_npy(path)
            faces_key, bary_key = "full_lmk_faces_idx", "full_lmk_bary_coords"
    if faces_key not in data or bary_key not in data:
        if landmark_embedding is not None:
            raise KeyError(f"{source}: landmark embedding lacks {faces_key!r}/{bary_key!r}")
        return np.zeros(0, dtype=np.int64), np.zeros((0, 3))
    faces = np.asarray(data[faces_key], dtype=np.int64).reshape(-1)
    bary = np.asarray(data[bary_key], dtype=np.float64).reshape(-1, 3)
    if faces.shape[0] != bary.shape[0]:
        raise ValueError(f"{source}: {faces.shape[0]} landmark faces but {bary.shape[0]} barycentric rows")
    return faces, bary
