"""AED alternative: the head model's expression fitted to a face's 68 detected landmarks.

A 3DMM regressor (DECA/EMOCA/SMIRK) needs weights we cannot ship; fitting FLAME's expression to the 68
iBUG points needs only the head model and a landmark detector. Pose (rotation), weak-perspective scale and
image translation, identity shape and the jaw rotation are fitted alongside as nuisance parameters, with
Gaussian priors on the coefficients, so that the reported expression vector describes the deformation only.
The coefficients depend on the head model, so they are comparable within one report only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from geodiff4d.datasets.flame import FlameModel, FlameParams

# Prior weights of |coefficients|^2 against the mean squared landmark residual (face RMS radius = 1). Weaker
# priors recover more of the expression from exact landmarks but let a detector's 1-2 px jitter move the
# coefficients: at 1e-4, a 4 px image shift changed them by 0.08 on average, at 1e-3 by 0.02.
EXPRESSION_PRIOR = 1e-3
SHAPE_PRIOR = 1e-3
JAW_PRIOR = 1e-3
ITERATIONS = 60


@dataclass
class LandmarkFit:
    expression: np.ndarray  # [n_expr]
    jaw: np.ndarray  # [3] axis-angle
    rotation: np.ndarray  # [3] axis-angle of the head
    scale: float  # pixels per metre (weak perspective)
    translation: np.ndarray  # [2] pixels
    residual_px: float  # RMS landmark error after the fit

    @property
    def coefficients(self) -> np.ndarray:
        """What AED compares: expression coefficients followed by the jaw rotation, [n_expr + 3]."""
        return np.concatenate([self.expression, self.jaw])


_FLIP = (1.0, -1.0, -1.0)  # FLAME (y up, face toward +z) -> OpenCV camera facing it (y down, z forward)


def landmark_submodel(model: FlameModel) -> FlameModel:
    """The same head cut down to what its 68 landmarks depend on, so a fit step costs ~40x less.

    Keeps the vertices of the landmark triangles and adds the 5 joints as extra vertices: a joint's rest
    position is linear in shape and expression (``J_regressor @ v_shaped``), so a vertex with template
    ``J @ v_template`` and blend shapes ``J @ shapedirs`` reproduces it exactly, and the new J_regressor
    just selects those vertices. Landmarks of the submodel equal the full model's.
    """
    faces = model.faces[model.landmark_faces].numpy()  # [68, 3]
    kept, remapped = np.unique(faces, return_inverse=True)
    n_kept, n_joints = len(kept), model.j_regressor.shape[0]
    j_regressor = model.j_regressor.numpy().astype(np.float64)  # [5, V]
    shapedirs = model.shapedirs.numpy().astype(np.float64)  # [V, 3, n_shape + n_expr]
    posedirs = model.posedirs.numpy().T.reshape(model.n_vertices, 3, -1)  # [V, 3, 36]
    weights = np.concatenate([model.weights.numpy()[kept], np.eye(n_joints)])  # [n_kept + 5, 5]
    return FlameModel(
        v_template=np.concatenate([model.v_template.numpy()[kept], j_regressor @ model.v_template.numpy()]),
        faces=remapped.reshape(-1, 3),
        shapedirs=np.concatenate([shapedirs[kept], np.einsum("jv,vcl->jcl", j_regressor, shapedirs)]),
        posedirs=np.concatenate([posedirs[kept], np.zeros((n_joints, *posedirs.shape[1:]))]),
        j_regressor=np.concatenate([np.zeros((n_joints, n_kept)), np.eye(n_joints)], axis=1),
        parents=np.asarray(model.parents),
        weights=weights,
        n_shape=model.n_shape,
        n_expr=model.n_expr,
        uv_coords=np.zeros((0, 2)),
        uv_faces=np.zeros((0, 3), np.int64),
        landmark_faces=np.arange(len(faces)),
        landmark_bary=model.landmark_bary.numpy(),
    )


def _project(
    model: FlameModel, params: FlameParams, scale: torch.Tensor, shift: torch.Tensor, focal: float | None
) -> torch.Tensor:
    """Image points [68, 2] (x right, y down) in units of the normalised target.

    Weak perspective (``focal`` None): ``scale * (x, -y) + shift``. Perspective: the head sits at depth
    ``focal / scale`` in front of a camera with that focal length (normalised units), ``shift`` its offset.
    """
    landmarks = model(params).landmarks[0] * params.rotation.new_tensor(_FLIP)  # [68, 3] camera axes
    if focal is None:
        return scale * landmarks[:, :2] + shift
    depth = focal / scale + landmarks[:, 2:]  # [68, 1]
    return focal * landmarks[:, :2] / depth + shift


def _neutral_scale(model: FlameModel, target: torch.Tensor) -> float:
    """Least-squares similarity scale from the neutral head's centred landmarks to ``target`` [68, 2]."""
    params = FlameParams.zeros(1, model.n_shape, model.n_expr)
    with torch.no_grad():
        neutral = _project(model, params, torch.tensor(1.0), torch.zeros(2), None)
        neutral = neutral - neutral.mean(dim=0)
        return float((neutral * target).sum() / (neutral * neutral).sum())


def fit_expression(
    model: FlameModel, points: np.ndarray, K: np.ndarray | None = None, iterations: int = ITERATIONS
) -> LandmarkFit:
    """Fit expression, jaw, shape, rotation, scale and 2D shift so the model's landmarks match ``points`` [68, 2].

    With intrinsics ``K`` the projection is perspective with that focal length (the head's depth follows from
    the fitted scale), else weak perspective.
    """
    points = np.asarray(points, np.float64)
    if points.shape != (68, 2):
        raise ValueError(f"expected 68 landmarks [68, 2], got {points.shape}")
    if model.landmark_faces.shape[0] != 68:
        raise ValueError(f"the head model has {model.landmark_faces.shape[0]} landmarks, the fit needs 68")
    # normalise the target so the priors mean the same at any resolution: centred, RMS radius 1
    centre = points.mean(axis=0)
    radius = float(np.sqrt(((points - centre) ** 2).sum(axis=1).mean()))
    target = torch.as_tensor((points - centre) / radius, dtype=torch.float32)
    focal = None if K is None else float(np.sqrt(K[0, 0] * K[1, 1])) / radius
    init_scale = _neutral_scale(model, target)
    expression = torch.zeros(1, model.n_expr, requires_grad=True)
    shape = torch.zeros(1, model.n_shape, requires_grad=True)
    jaw = torch.zeros(1, 3, requires_grad=True)
    rotation = torch.zeros(1, 3, requires_grad=True)
    log_scale = torch.tensor(np.log(init_scale), dtype=torch.float32, requires_grad=True)
    shift = torch.zeros(2, requires_grad=True)
    variables = [expression, shape, jaw, rotation, log_scale, shift]
    optimizer = torch.optim.LBFGS(variables, lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def current() -> FlameParams:
        p = FlameParams.zeros(1, model.n_shape, model.n_expr)
        p.expression, p.shape, p.jaw, p.rotation = expression, shape, jaw, rotation
        return p

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        residual = _project(model, current(), log_scale.exp(), shift, focal) - target  # [68, 2]
        loss = (
            (residual**2).sum(dim=1).mean()
            + EXPRESSION_PRIOR * (expression**2).sum()
            + SHAPE_PRIOR * (shape**2).sum()
            + JAW_PRIOR * (jaw**2).sum()
        )
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        residual = _project(model, current(), log_scale.exp(), shift, focal) - target
        rms = float(residual.pow(2).sum(dim=1).mean().sqrt()) * radius
    return LandmarkFit(
        expression=expression.detach()[0].numpy().astype(np.float64),
        jaw=jaw.detach()[0].numpy().astype(np.float64),
        rotation=rotation.detach()[0].numpy().astype(np.float64),
        scale=float(log_scale.detach().exp()) * radius,
        translation=shift.detach().numpy().astype(np.float64) * radius + centre,
        residual_px=rms,
    )


def load_head_model(path: str | Path | None) -> FlameModel:
    """A FLAME ``.pkl`` (with its landmark embedding) or, with no path, the procedural head (seed 0)."""
    if path is None:
        from geodiff4d.datasets.procedural_head import procedural_head_model

        return procedural_head_model(seed=0)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"head model for the landmark_fit AED regressor not found: {path}")
    return FlameModel.from_pkl(path)
