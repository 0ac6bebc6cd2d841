"""A procedural FLAME-structured head model for demos and tests (no licensed FLAME file needed).

The skin is a lathe-like grid (rows from crown to neck, columns around the head, denser at the front) whose
three profiles (front, side, back) are keyed to a canonical iBUG-68 face layout; a nose, brow ridge, eye
sockets, cheekbones, lips and chin are smooth displacements on top, and the rows at the lip line are split
into a mouth opening. Separate eyeballs sit in the sockets and a dark mouth cavity behind the lips. Shape
bases (16 designed + 4 random smooth fields from the seed), expression bases (lips parting, smile, brows,
...), a sparse joint regressor, smooth skinning weights, small volume-preserving pose correctives (neck and
jaw; the rigid eyes need none) and UVs are saved in the FLAME ``.pkl`` structure and loaded back through the
same restricted loader as the real model. Units: metres; y up, face toward +z.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.sparse
from scipy.interpolate import PchipInterpolator

from geodiff4d.core.io.atomic import atomic_write_bytes
from geodiff4d.datasets.flame import FlameModel

N_ROWS, N_COLS = 90, 88  # skin grid: rows crown -> neck bottom, columns around the head (seam at the back)
FRONT_DENSITY = 0.55  # column spacing at the front is (1 - FRONT_DENSITY) of the mean
MOUTH_ROW = 50  # upper-lip row; MOUTH_ROW + 1 is the lower lip
LIP_GAP = 0.0016
EYE_RADIUS = 0.0115
FACE_SCALE = 0.16  # metres per unit of the normalised landmark layout
N_DESIGNED_SHAPE, N_RANDOM_SHAPE, N_EXPR = 16, 4, 10
SKIN_V_RANGE = (0.04, 1.0)  # skin occupies this v band of the UV square; the mouth cavity lies below it
CAVITY_V_RANGE = (0.0, 0.03)

# Canonical 68-point iBUG layout (x right, y down, unit face box), mirrored to symmetry in _landmark_layout.
_IBUG_TEMPLATE = np.array(
    [
        (0.0792, 0.3392),
        (0.0829, 0.4570),
        (0.0968, 0.5756),
        (0.1221, 0.6919),
        (0.1687, 0.8003),
        (0.2398, 0.8957),
        (0.3257, 0.9771),
        (0.4223, 1.0433),
        (0.5318, 1.0608),
        (0.6413, 1.0398),
        (0.7381, 0.9723),
        (0.8244, 0.8896),
        (0.8948, 0.7925),
        (0.9394, 0.6815),
        (0.9611, 0.5622),
        (0.9706, 0.4418),
        (0.9712, 0.3221),
        (0.1638, 0.2492),
        (0.2178, 0.2043),
        (0.2913, 0.1924),
        (0.3675, 0.2036),
        (0.4393, 0.2331),
        (0.5864, 0.2281),
        (0.6602, 0.1959),
        (0.7375, 0.1824),
        (0.8132, 0.1928),
        (0.8708, 0.2353),
        (0.5153, 0.3186),
        (0.5162, 0.3962),
        (0.5171, 0.4738),
        (0.5182, 0.5532),
        (0.4337, 0.6041),
        (0.4755, 0.6208),
        (0.5207, 0.6343),
        (0.5659, 0.6188),
        (0.6071, 0.6016),
        (0.2524, 0.3311),
        (0.2987, 0.3026),
        (0.3557, 0.3030),
        (0.4037, 0.3387),
        (0.3525, 0.3500),
        (0.2968, 0.3505),
        (0.6313, 0.3341),
        (0.6791, 0.2965),
        (0.7360, 0.2947),
        (0.7829, 0.3213),
        (0.7403, 0.3418),
        (0.6850, 0.3437),
        (0.3532, 0.7462),
        (0.4146, 0.7191),
        (0.4777, 0.7068),
        (0.5227, 0.7171),
        (0.5698, 0.7054),
        (0.6352, 0.7157),
        (0.6995, 0.7394),
        (0.6394, 0.8052),
        (0.5764, 0.8354),
        (0.5254, 0.8417),
        (0.4764, 0.8375),
        (0.4138, 0.8100),
        (0.3801, 0.7500),
        (0.4780, 0.7451),
        (0.5234, 0.7489),
        (0.5711, 0.7433),
        (0.6724, 0.7442),
        (0.5725, 0.7766),
        (0.5240, 0.7834),
        (0.4776, 0.7785),
    ]
)
_MIRROR = np.array(
    list(range(16, -1, -1))
    + list(range(26, 16, -1))
    + [27, 28, 29, 30]
    + [35, 34, 33, 32, 31]
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]
    + [64, 63, 62, 61, 60, 67, 66, 65]
)
INNER_UPPER_LIP, INNER_LOWER_LIP = [60, 61, 62, 63, 64], [65, 66, 67]


def _landmark_layout() -> np.ndarray:
    """[68, 2] frontal-plane (x, y) positions in metres, symmetric, closed mouth; eyes at y = 0.02."""
    centred = _IBUG_TEMPLATE - [_IBUG_TEMPLATE[:, 0].mean(), 0]
    xy = (centred + centred[_MIRROR] * [-1, 1]) / 2 * [1, -1]  # mirror-average, y up
    eye_y = xy[36:48, 1].mean()
    xy = (xy - [0, eye_y]) * FACE_SCALE + [0, 0.02]
    lip_line = xy[60:68, 1].mean()
    xy[INNER_UPPER_LIP, 1] = lip_line + LIP_GAP / 2 + 0.0006  # just above the split: on the upper lip
    xy[INNER_LOWER_LIP, 1] = lip_line - LIP_GAP / 2 - 0.0006
    xy[[60, 64], 0] *= 0.9  # inner corners inside the mouth opening
    return xy


class _Face:
    """Key heights and feature centres derived from the landmark layout (metres)."""

    def __init__(self, layout: np.ndarray) -> None:
        self.layout = layout
        self.y_brow = layout[17:27, 1].mean()
        self.y_eye = layout[36:48, 1].mean()
        self.y_nose_tip, self.y_nose_base, self.y_bridge = layout[30, 1], layout[33, 1], layout[27, 1]
        self.y_mouth = layout[60:68, 1].mean()
        self.y_chin = layout[8, 1]
        self.eye_x = layout[42:48, 0].mean()  # subject's left eye (+x); the right one mirrors it
        self.mouth_half_width = layout[54, 0]
        self.slit_half_width = layout[64, 0] / 0.9 + 0.0015
        self.top = self.y_chin + 0.225


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _gauss(points: np.ndarray, centre, sigma) -> np.ndarray:
    return np.exp(-(((points - np.asarray(centre)) / np.asarray(sigma)) ** 2).sum(axis=1))


def _fold_x(points: np.ndarray) -> np.ndarray:
    """Points with x replaced by |x|: one Gaussian then covers a symmetric left/right feature pair."""
    return np.abs(points) * [1, 0, 0] + points * [0, 1, 1]


def _profiles(face: _Face) -> dict[str, tuple[PchipInterpolator, PchipInterpolator]]:
    """Radius and height along the rows for the front (z), side (x) and back (-z) profiles."""
    f = face
    rows = [0, 8, 16, 24, 30, 40, MOUTH_ROW, MOUTH_ROW + 1, 58, 63, 67, 71, 76, N_ROWS - 1]
    lip_up, lip_down = f.y_mouth + LIP_GAP / 2, f.y_mouth - LIP_GAP / 2
    face_y = [f.top, f.top - 0.012, f.y_brow + 0.035, f.y_brow, f.y_eye, f.y_nose_base, lip_up, lip_down]
    keys = {
        "front": (
            [0, 0.05, 0.082, 0.094, 0.092, 0.094, 0.092, 0.092, 0.087, 0.072, 0.05, 0.042, 0.043, 0.046],
            face_y
            + [
                f.y_chin + 0.012,
                f.y_chin - 0.006,
                f.y_chin - 0.008,
                f.y_chin - 0.022,
                f.y_chin - 0.045,
                f.y_chin - 0.12,
            ],
        ),
        "side": (
            [0, 0.045, 0.07, 0.077, 0.078, 0.076, 0.071, 0.0708, 0.064, 0.058, 0.054, 0.053, 0.053, 0.055],
            face_y[:-2]
            + [f.y_mouth, f.y_mouth - 0.0035]  # evenly spaced rows: the lip split is frontal only
            + [
                f.y_chin + 0.02,
                f.y_chin + 0.005,
                f.y_chin - 0.01,
                f.y_chin - 0.025,
                f.y_chin - 0.045,
                f.y_chin - 0.12,
            ],
        ),
        "back": (
            [0, 0.05, 0.085, 0.098, 0.1, 0.096, 0.085, 0.084, 0.072, 0.066, 0.065, 0.066, 0.067, 0.068],
            [
                f.top,
                f.top - 0.008,
                f.y_brow + 0.045,
                f.y_brow + 0.01,
                f.y_eye,
                f.y_nose_base,
                f.y_mouth + 0.008,
                f.y_mouth + 0.006,
                f.y_chin + 0.03,
                f.y_chin + 0.015,
                f.y_chin,
                f.y_chin - 0.02,
                f.y_chin - 0.045,
                f.y_chin - 0.12,
            ],
        ),
    }
    return {name: (PchipInterpolator(rows, r), PchipInterpolator(rows, y)) for name, (r, y) in keys.items()}


def _column_params() -> np.ndarray:
    """Column parameter s in [-1, 1] (N_COLS + 1 values, the last duplicates the seam at the back)."""
    return np.linspace(-1.0, 1.0, N_COLS + 1)


def _azimuth(s: np.ndarray) -> np.ndarray:
    return np.pi * (s - FRONT_DENSITY * np.sin(np.pi * s) / np.pi)


def _base_grid(face: _Face) -> np.ndarray:
    """Skin grid points [N_ROWS, N_COLS, 3] before facial features (row 0 collapses to the crown)."""
    rows = np.arange(N_ROWS, dtype=np.float64)[:, None]
    phi = _azimuth(_column_params()[:-1])[None, :]
    cos, sin = np.cos(phi), np.sin(phi)
    prof = {name: (r(rows), y(rows)) for name, (r, y) in _profiles(face).items()}
    w_front, w_back, w_side = np.maximum(cos, 0) ** 2, np.maximum(-cos, 0) ** 2, sin**2
    y = w_front * prof["front"][1] + w_side * prof["side"][1] + w_back * prof["back"][1]
    x = prof["side"][0] * sin
    z = np.where(cos >= 0, prof["front"][0], prof["back"][0]) * cos
    return np.stack(np.broadcast_arrays(x, y, z), axis=-1)


def _nose(points: np.ndarray, face: _Face) -> np.ndarray:
    """Forward displacement [V] of the nose: a ridge from the bridge to the tip, alae at its base."""
    x, y = points[:, 0], points[:, 1]
    f = face
    along = np.clip((f.y_bridge - y) / (f.y_bridge - f.y_nose_tip), 0, None)  # 0 at the bridge, 1 at the tip
    height = np.where(
        y > f.y_bridge,
        0.009 * np.exp(-(((y - f.y_bridge) / 0.012) ** 2)),
        np.where(
            y > f.y_nose_tip,
            0.009 + 0.015 * along**1.5,
            0.024
            * np.cos(np.clip((f.y_nose_tip - y) / (f.y_nose_tip - f.y_nose_base + 0.004), 0, 1) * np.pi / 2)
            ** 2,
        ),
    )
    width = 0.007 + 0.005 * np.clip(along, 0, 1.3)
    ridge = height * np.exp(-((x / width) ** 2))
    alae = 0.007 * np.exp(-(((np.abs(x) - 0.015) / 0.006) ** 2) - ((y - f.y_nose_base - 0.005) / 0.006) ** 2)
    return ridge + alae


def _features(points: np.ndarray, face: _Face) -> tuple[np.ndarray, np.ndarray]:
    """Forward displacement [V] of the facial features, and the nose part of it (a shape basis scales it)."""
    f = face
    front = _smoothstep((points[:, 2] - 0.02) / 0.04)  # only the front of the head
    x, y = points[:, 0], points[:, 1]
    ax = np.abs(x)
    nose = _nose(points, face) * front
    dz = (
        -0.010 * np.exp(-(((ax - f.eye_x) / 0.015) ** 2) - ((y - f.y_eye) / 0.009) ** 2)  # eye sockets
        + 0.005 * np.exp(-(((y - f.y_brow - 0.002) / 0.008) ** 2) - (x / 0.05) ** 4)  # brow ridge
        + 0.006 * np.exp(-(((ax - 0.042) / 0.015) ** 2) - ((y - f.y_eye + 0.02) / 0.015) ** 2)  # cheekbones
        + 0.004 * np.exp(-(((y - f.y_mouth - 0.005) / 0.005) ** 2) - (x / 0.022) ** 4)  # upper lip
        + 0.004 * np.exp(-(((y - f.y_mouth + 0.006) / 0.005) ** 2) - (x / 0.02) ** 4)  # lower lip
        - 0.003
        * np.exp(-(((ax - f.mouth_half_width) / 0.005) ** 2) - ((y - f.y_mouth) / 0.006) ** 2)  # corners
        - 0.003 * np.exp(-(((y - f.y_mouth + 0.015) / 0.004) ** 2) - (x / 0.02) ** 2)  # below the lower lip
        + 0.006 * np.exp(-((x / 0.016) ** 2) - ((y - f.y_chin - 0.012) / 0.012) ** 2)  # chin
    )
    return dz * front + nose, nose


class _Mesh:
    """Template parts: skin grid, two eyeballs and the mouth cavity, with their UVs."""

    def __init__(self, face: _Face, perturbation) -> None:
        grid = _base_grid(face).reshape(-1, 3)
        grid = grid + perturbation(grid)
        bumps, self.nose = _features(grid, face)
        grid[:, 2] += bumps
        self.skin = np.concatenate([grid[N_COLS - 1 : N_COLS], grid[N_COLS:]])  # crown pole + rows 1..
        self.skin_faces, self.skin_uv, self.skin_uv_faces = _skin_topology(face, self.skin)
        self.nose = np.concatenate([self.nose[:1], self.nose[N_COLS:]])
        self.eye_centres = [self._eye_centre(face, sign) for sign in (1.0, -1.0)]  # left (+x), right (-x)
        self.eye_vertices, self.eye_faces = _sphere(self.eye_centres[0], EYE_RADIUS, 10, 16)
        self.cavity_centre = np.array([0.0, face.y_mouth, self._skin_z(0.0, face.y_mouth) - 0.027])
        self.cavity_vertices, self.cavity_faces = _sphere(self.cavity_centre, 1.0, 8, 12)
        self.cavity_vertices = (self.cavity_vertices - self.cavity_centre) * [
            0.022,
            0.014,
            0.018,
        ] + self.cavity_centre

    def _skin_z(self, x: float, y: float) -> float:
        """z of the skin vertex nearest to (x, y) on the front of the head."""
        front = self.skin[:, 2] > 0
        distance = np.hypot(self.skin[:, 0] - x, self.skin[:, 1] - y) + np.where(front, 0, np.inf)
        return float(self.skin[np.argmin(distance), 2])

    def _eye_centre(self, face: _Face, sign: float) -> np.ndarray:
        x = sign * face.eye_x
        return np.array([x, face.y_eye, self._skin_z(x, face.y_eye) + 0.0015 - EYE_RADIUS])


def _skin_topology(face: _Face, skin: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Skin faces [F, 3] (with the mouth opening), UVs [Vt, 2] and UV faces; vertex 0 is the crown."""

    def vid(row, col):  # skin vertex of grid (row >= 1, col)
        return 1 + (row - 1) * N_COLS + col % N_COLS

    s = _column_params()
    v_of_row = SKIN_V_RANGE[1] - (SKIN_V_RANGE[1] - SKIN_V_RANGE[0]) * np.arange(N_ROWS) / (N_ROWS - 1)
    uv = np.stack(np.meshgrid((s + 1) / 2, v_of_row), axis=-1).reshape(-1, 2)  # [(N_ROWS)*(N_COLS+1), 2]
    uv[:N_COLS, 0] += 0.5 / N_COLS  # crown: one UV per column, between its neighbours

    def tid(row, col):
        return row * (N_COLS + 1) + col

    faces, uv_faces = [], []
    for col in range(N_COLS):
        faces.append((0, vid(1, col), vid(1, col + 1)))
        uv_faces.append((tid(0, col), tid(1, col), tid(1, col + 1)))
    x_lip = skin[[vid(MOUTH_ROW, c) for c in range(N_COLS)], 0]
    z_lip = skin[[vid(MOUTH_ROW, c) for c in range(N_COLS)], 2]
    in_slit = (np.abs(x_lip) < face.slit_half_width) & (z_lip > 0)
    for row in range(1, N_ROWS - 1):
        for col in range(N_COLS):
            if row == MOUTH_ROW and in_slit[col] and in_slit[(col + 1) % N_COLS]:
                continue  # the mouth opening between the lips
            a, b, c, d = vid(row, col), vid(row, col + 1), vid(row + 1, col), vid(row + 1, col + 1)
            ta, tb, tc, td = tid(row, col), tid(row, col + 1), tid(row + 1, col), tid(row + 1, col + 1)
            faces += [(a, d, b), (a, c, d)]  # counter-clockwise seen from outside
            uv_faces += [(ta, td, tb), (ta, tc, td)]
    return np.array(faces), uv, np.array(uv_faces)


def _sphere(centre: np.ndarray, radius: float, n_lat: int, n_lon: int) -> tuple[np.ndarray, np.ndarray]:
    """Latitude-longitude sphere with its poles on the z axis (front pole first); faces face outward."""
    theta = np.pi * np.arange(1, n_lat) / n_lat
    lon = 2 * np.pi * np.arange(n_lon) / n_lon
    ring = np.stack(
        [
            np.sin(theta)[:, None] * np.cos(lon),
            np.sin(theta)[:, None] * np.sin(lon),
            np.cos(theta)[:, None] + 0 * lon,
        ],
        axis=-1,
    ).reshape(-1, 3)
    unit = np.concatenate([[[0, 0, 1.0]], ring, [[0, 0, -1.0]]])
    last = len(unit) - 1

    def vid(i, j):
        return 1 + i * n_lon + j % n_lon

    faces = [(0, vid(0, j), vid(0, j + 1)) for j in range(n_lon)]
    for i in range(n_lat - 2):
        for j in range(n_lon):
            faces += [
                (vid(i, j), vid(i + 1, j), vid(i + 1, j + 1)),
                (vid(i, j), vid(i + 1, j + 1), vid(i, j + 1)),
            ]
    faces += [(last, vid(n_lat - 2, j + 1), vid(n_lat - 2, j)) for j in range(n_lon)]
    return centre + radius * unit, np.array(faces)


def _random_fields(rng: np.random.Generator, skin: np.ndarray, count: int, amplitude: float):
    """``count`` random smooth displacement fields: sums of 3 Gaussian RBFs centred on the skin."""
    centres = skin[rng.integers(0, len(skin), size=(count, 3))]  # [count, 3, 3]
    directions = rng.normal(size=(count, 3, 3)) * amplitude
    sigmas = rng.uniform(0.02, 0.04, size=(count, 3))

    def evaluate(points: np.ndarray) -> np.ndarray:  # -> [len(points), 3, count]
        out = np.zeros((len(points), 3, count))
        for k in range(count):
            for c in range(3):
                out[:, :, k] += _gauss(points, centres[k, c], sigmas[k, c])[:, None] * directions[k, c]
        return out

    return evaluate


def _shape_fields(points: np.ndarray, face: _Face, nose: np.ndarray) -> np.ndarray:
    """Designed identity bases [N, 3, 16] (one unit ~ one standard deviation, a few millimetres)."""
    f = face
    x, y, z = points.T
    zeros = np.zeros_like(x)
    side = np.tanh(x / 0.005)
    front = _smoothstep((z - 0.03) / 0.04)
    lower_face = _smoothstep((f.y_nose_base - y) / 0.02) * _smoothstep((y - f.y_chin + 0.03) / 0.02)
    cheek = _gauss(_fold_x(points), (0.042, f.y_eye - 0.02, 0.08), (0.015, 0.015, 0.03))
    lips = _gauss(points, (0, f.y_mouth, 0.09), (0.025, 0.01, 0.03))
    neck = _smoothstep((f.y_chin - 0.01 - y) / 0.02)
    fields = [
        (0.05 * x, zeros, zeros),  # head width
        (zeros, 0.04 * (y - f.y_eye), zeros),  # head height
        (zeros, zeros, 0.04 * z),  # head depth
        (zeros, -0.005 * lower_face * front, zeros),  # face length
        (zeros, zeros, 0.35 * nose),  # nose size
        (
            0.25 * x * _gauss(points, (0, f.y_nose_base + 0.005, 0.1), (0.02, 0.015, 0.03)),
            zeros,
            zeros,
        ),  # nose width
        (0.06 * x * lower_face, zeros, zeros),  # jaw width
        (
            zeros,
            -0.002 * _gauss(points, (0, f.y_chin, 0.08), (0.02, 0.015, 0.03)),
            0.005 * _gauss(points, (0, f.y_chin, 0.08), (0.02, 0.015, 0.03)),
        ),  # chin protrusion
        (0.003 * side * cheek, zeros, 0.003 * cheek),  # cheekbones
        (zeros, zeros, 0.004 * _gauss(points, (0, f.y_brow, 0.095), (0.045, 0.009, 0.03))),  # brow ridge
        (
            0.003 * side * _gauss(_fold_x(points), (f.eye_x, f.y_eye, 0.08), (0.02, 0.02, 0.04)),
            zeros,
            zeros,
        ),  # eye spacing
        (
            zeros,
            zeros,
            -0.003 * _gauss(_fold_x(points), (f.eye_x, f.y_eye, 0.08), (0.018, 0.012, 0.03)),
        ),  # eye depth
        (zeros, zeros, 0.003 * lips),  # lip thickness
        (0.15 * x * lips, zeros, zeros),  # mouth width
        (zeros, zeros, 0.12 * (y - f.y_brow) * _smoothstep((y - f.y_brow) / 0.02) * front),  # forehead slope
        (0.1 * x * neck, zeros, 0.1 * (z + 0.012) * neck),  # neck thickness
    ]
    return np.stack([np.stack(field, axis=1) for field in fields], axis=2)


def _expression_fields(points: np.ndarray, face: _Face) -> np.ndarray:
    """Expression bases [N, 3, 10]: lips parting, smile, brow raise, furrow, pucker, stretch, ...

    None of them moves the chin: opening the jaw is the jaw joint's alone, so tracking can tell jaw pose
    from expression (a jaw-hinge expression basis would make the two interchangeable).
    """
    f = face
    x, y, _ = points.T
    zeros = np.zeros_like(x)
    side = np.tanh(x / 0.005)
    ap = _fold_x(points)
    corner = _gauss(ap, (f.mouth_half_width, f.y_mouth, 0.085), (0.012, 0.012, 0.03))
    cheek = _gauss(ap, (0.04, f.y_eye - 0.02, 0.08), (0.018, 0.015, 0.03))
    lips = _gauss(points, (0, f.y_mouth, 0.09), (0.025, 0.012, 0.03))
    brow = _gauss(ap, (0.03, f.y_brow, 0.09), (0.03, 0.012, 0.03))
    inner_brow = _gauss(ap, (0.015, f.y_brow, 0.095), (0.012, 0.01, 0.03))
    lid = _gauss(ap, (f.eye_x, f.y_eye + 0.006, 0.085), (0.013, 0.005, 0.02))
    puff = _gauss(ap, (0.04, f.y_mouth + 0.005, 0.07), (0.018, 0.018, 0.03))
    upper_lip = _gauss(points, (0, f.y_mouth + 0.006, 0.09), (0.02, 0.006, 0.03))
    above_split = np.tanh((y - f.y_mouth) / 0.003)  # +1 on the upper lip, -1 on the lower lip
    fields = [
        (
            zeros,
            (0.005 * above_split - 0.002) * lips,
            zeros,
        ),  # lips parting: upper lip up 3 mm, lower lip down 7 mm
        (0.005 * side * corner, 0.006 * corner + 0.002 * cheek, -0.002 * corner + 0.002 * cheek),  # smile
        (zeros, 0.005 * brow, zeros),  # brow raise
        (-0.003 * side * inner_brow, -0.003 * inner_brow, 0.001 * inner_brow),  # brow furrow
        (-0.3 * x * lips, zeros, 0.006 * lips),  # lip pucker
        (0.004 * side * corner, -0.001 * corner, -0.001 * corner),  # mouth stretch
        (zeros, 0.003 * upper_lip, 0.001 * upper_lip),  # upper lip raise
        (0.005 * side * puff, zeros, 0.003 * puff),  # cheek puff
        (zeros, -0.004 * lid, zeros),  # eye closing
        (zeros, -0.004 * corner, zeros),  # frown (corners down)
    ]
    return np.stack([np.stack(field, axis=1) for field in fields], axis=2)


def _jaw_weight(points: np.ndarray, face: _Face) -> np.ndarray:
    """Skin weight of the jaw joint: everything below the lip split at the front, smooth toward cheeks/neck."""
    f = face
    x, y, z = points.T
    ramp = 0.0016 + 0.025 * _smoothstep((np.abs(x) - f.slit_half_width) / 0.015)
    below_lips = _smoothstep((f.y_mouth + LIP_GAP / 2 - y) / ramp)
    in_front = _smoothstep(z / 0.03)
    above_throat = _smoothstep((y - f.y_chin + 0.03) / 0.022)
    return below_lips * in_front * above_throat


def _ring(row: int) -> np.ndarray:
    """Skin vertex ids of grid row ``row`` (>= 1)."""
    return 1 + (row - 1) * N_COLS + np.arange(N_COLS)


def _landmark_embedding(
    layout: np.ndarray, vertices: np.ndarray, faces: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Faces [68] and barycentrics [68, 3] of the frontmost surface point under each layout (x, y)."""
    corners = vertices[faces]  # [F, 3, 3]
    a, b, c = corners[:, 0, :2], corners[:, 1, :2], corners[:, 2, :2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    valid = np.abs(area) > 1e-12
    p = layout[:, None, :]  # [68, 1, 2]

    def edge(u, v):  # signed area of (u, v, p) -> [68, F]
        return (v[:, 0] - u[:, 0]) * (p[..., 1] - u[:, 1]) - (v[:, 1] - u[:, 1]) * (p[..., 0] - u[:, 0])

    safe_area = np.where(valid, area, 1.0)
    bary = np.stack([edge(b, c), edge(c, a), edge(a, b)], axis=-1) / safe_area[:, None]  # [68, F, 3]
    inside = (bary >= -1e-9).all(axis=-1) & valid
    depth = np.where(inside, np.einsum("lfk,fk->lf", bary, corners[:, :, 2]), -np.inf)
    chosen = np.argmax(depth, axis=1)
    if not np.isfinite(depth[np.arange(68), chosen]).all():
        raise RuntimeError("procedural head: a landmark of the layout lies outside the face surface")
    weights = np.clip(bary[np.arange(68), chosen], 0, None)
    return chosen, weights / weights.sum(axis=1, keepdims=True)


def _eye_uv(layout: np.ndarray, lmk_uv: np.ndarray, eye_vertices: np.ndarray, eye: slice) -> np.ndarray:
    """Eyeball UVs: the affine map from frontal (x, y) to UV fitted on that eye's landmarks."""
    xy1 = np.concatenate([layout[eye], np.ones((6, 1))], axis=1)
    affine, *_ = np.linalg.lstsq(xy1, lmk_uv[eye], rcond=None)  # [3, 2]
    return np.concatenate([eye_vertices[:, :2], np.ones((len(eye_vertices), 1))], axis=1) @ affine


class _Assembly(NamedTuple):
    """The template's vertex and face arrays with each part's vertex range."""

    vertices: np.ndarray  # [V, 3]: skin, left eyeball, right eyeball, mouth cavity
    faces: np.ndarray  # [F, 3]
    parts: dict[str, slice]  # "skin", "left", "right", "cavity"
    eye_right_faces: np.ndarray  # the right eyeball's faces, local vertex ids


def _template_mesh(rng: np.random.Generator, face: _Face) -> _Mesh:
    """Template parts with a seeded smooth noise on the back of the head (the face layout stays exact)."""
    template_noise = _random_fields(rng, _base_grid(face).reshape(-1, 3)[N_COLS:], 1, 0.0015)

    def back_of_head_noise(points: np.ndarray) -> np.ndarray:
        """Offsets [N, 3] fading out toward the face (z > 0)."""
        return template_noise(points)[:, :, 0] * _smoothstep((0.02 - points[:, 2]) / 0.04)[:, None]

    return _Mesh(face, back_of_head_noise)


def _assemble(mesh: _Mesh) -> _Assembly:
    """Concatenate skin, both eyeballs (the right one mirrored) and the cavity into one vertex/face list."""
    n_skin, n_eye = len(mesh.skin), len(mesh.eye_vertices)
    eye_right = mesh.eye_vertices * [-1, 1, 1]  # mirror of the left eyeball
    eye_right_faces = mesh.eye_faces[:, ::-1]  # mirroring flips the winding back outward
    vertices = np.concatenate([mesh.skin, mesh.eye_vertices, eye_right, mesh.cavity_vertices])
    offsets = np.cumsum([0, n_skin, n_eye, n_eye])
    faces = np.concatenate(
        [
            mesh.skin_faces,
            mesh.eye_faces + offsets[1],
            eye_right_faces + offsets[2],
            mesh.cavity_faces + offsets[3],
        ]
    )
    parts = {
        "skin": slice(0, n_skin),
        "left": slice(offsets[1], offsets[2]),
        "right": slice(offsets[2], offsets[3]),
        "cavity": slice(offsets[3], len(vertices)),
    }
    return _Assembly(vertices, faces, parts, eye_right_faces)


def _joint_regressor(skin: np.ndarray, face: _Face, parts: dict[str, slice], n_vertices: int) -> np.ndarray:
    """J_regressor [5, V]: root and neck from neck rings, jaw from the hinges, eyes from their balls."""
    n_eye = parts["left"].stop - parts["left"].start
    regressor = np.zeros((5, n_vertices))
    regressor[0, _ring(80)] = 1 / N_COLS
    regressor[1, _ring(67)] = 1 / N_COLS
    for sign in (1, -1):
        hinge = np.array([sign * 0.08, face.y_eye - 0.03, 0.0])
        nearest = np.argsort(np.linalg.norm(skin - hinge, axis=1))[:4]
        regressor[2, nearest] = 1 / 8
    regressor[3, parts["left"]] = 1 / n_eye
    regressor[4, parts["right"]] = 1 / n_eye
    return regressor


def _skinning_weights(mesh: _Mesh, face: _Face, parts: dict[str, slice], n_vertices: int) -> np.ndarray:
    """Skinning weights [V, 5]: skin blends root/neck/jaw, eyes follow theirs, the cavity neck/jaw."""
    skin = mesh.skin
    weights = np.zeros((n_vertices, 5))
    neck_part = _smoothstep(
        (skin[:, 1] - skin[_ring(80), 1].mean()) / (face.y_chin - 0.01 - skin[_ring(80), 1].mean())
    )
    jaw = _jaw_weight(skin, face)
    weights[parts["skin"]] = np.stack(
        [(1 - jaw) * (1 - neck_part), (1 - jaw) * neck_part, jaw], axis=1
    ) @ np.eye(3, 5)
    weights[parts["left"], 3] = 1.0
    weights[parts["right"], 4] = 1.0
    cavity_jaw = _smoothstep((face.y_mouth + 0.004 - mesh.cavity_vertices[:, 1]) / 0.008)
    weights[parts["cavity"], 1] = 1 - cavity_jaw
    weights[parts["cavity"], 2] = cavity_jaw
    return weights


def _shape_bases(rng: np.random.Generator, mesh: _Mesh, face: _Face, assembly: _Assembly) -> np.ndarray:
    """Shape bases [V, 3, n_shape]: designed and seeded random fields, rigid on the eyeballs."""
    vertices, parts = assembly.vertices, assembly.parts
    random_fields = _random_fields(rng, mesh.skin, N_RANDOM_SHAPE, 0.002)
    nose = np.concatenate([mesh.nose, np.zeros(len(vertices) - len(mesh.skin))])

    def shape_fields(points: np.ndarray, nose_part: np.ndarray) -> np.ndarray:
        return np.concatenate([_shape_fields(points, face, nose_part), random_fields(points)], axis=2)

    shapedirs = shape_fields(vertices, nose)
    for part, centre in (("left", mesh.eye_centres[0]), ("right", mesh.eye_centres[0] * [-1, 1, 1])):
        shapedirs[parts[part]] = shape_fields(centre[None], np.zeros(1))
    return shapedirs


def _expression_bases(face: _Face, assembly: _Assembly) -> np.ndarray:
    """Expression bases [V, 3, N_EXPR] of the skin; eyeballs and cavity move with their joints only."""
    parts = assembly.parts
    shapedirs = _expression_fields(assembly.vertices, face)
    shapedirs[parts["left"].start : parts["right"].stop] = 0.0  # eyeballs move only with the eye joints
    shapedirs[parts["cavity"]] = 0.0  # the cavity follows the jaw only
    return shapedirs


def _pose_correctives(skin: np.ndarray, weights: np.ndarray, n_vertices: int) -> np.ndarray:
    """Posedirs [V, 3, 36]: blend-zone skin bulges outward by k * (1 - cos angle)."""
    n_skin = len(skin)
    jaw = weights[:, 2]
    posedirs = np.zeros((n_vertices, 3, 36))
    outward = np.zeros((n_vertices, 3))
    outward[:n_skin] = skin * [1, 0, 1] + [0, 0, 0.012]
    outward /= np.maximum(np.linalg.norm(outward, axis=1, keepdims=True), 1e-9)
    for joint, blend in ((1, weights[:, 0] * weights[:, 1] * 4), (2, jaw * (1 - jaw) * 4)):
        for diagonal in (0, 4, 8):
            posedirs[:, :, (joint - 1) * 9 + diagonal] = (
                -0.01 * blend[:, None] * outward * (np.arange(n_vertices) < n_skin)[:, None]
            )
    return posedirs


def _uv_layout(
    layout: np.ndarray, mesh: _Mesh, assembly: _Assembly, lmk_faces: np.ndarray, lmk_bary: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """UVs vt [Vt, 2] and faces ft [F, 3]: skin grid, eyeballs on the photo eyes, cavity in its band."""
    parts = assembly.parts
    n_eye = len(mesh.eye_vertices)
    lmk_uv = np.einsum("lk,lkc->lc", lmk_bary, mesh.skin_uv[mesh.skin_uv_faces[lmk_faces]])
    cavity_uv = np.stack(
        [
            0.5 + 0.4 * (mesh.cavity_vertices[:, 0] - mesh.cavity_centre[0]) / 0.022,
            np.mean(CAVITY_V_RANGE) + 0.01 * (mesh.cavity_vertices[:, 1] - mesh.cavity_centre[1]) / 0.014,
        ],
        axis=1,
    )
    vt = np.concatenate(
        [
            mesh.skin_uv,
            _eye_uv(layout, lmk_uv, assembly.vertices[parts["left"]], slice(42, 48)),
            _eye_uv(layout, lmk_uv, assembly.vertices[parts["right"]], slice(36, 42)),
            cavity_uv,
        ]
    )
    n_skin_uv = len(mesh.skin_uv)
    ft = np.concatenate(
        [
            mesh.skin_uv_faces,
            mesh.eye_faces + n_skin_uv,
            assembly.eye_right_faces + n_skin_uv + n_eye,
            mesh.cavity_faces + n_skin_uv + 2 * n_eye,
        ]
    )
    return vt, ft


def build_procedural_head(seed: int = 0) -> dict:
    """The FLAME ``.pkl`` dict of a procedural head (plain numpy/scipy), deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    layout = _landmark_layout()
    face = _Face(layout)
    mesh = _template_mesh(rng, face)  # draws from rng before the shape bases do
    assembly = _assemble(mesh)
    n_vertices = len(assembly.vertices)
    weights = _skinning_weights(mesh, face, assembly.parts, n_vertices)
    shapedirs_shape = _shape_bases(rng, mesh, face, assembly)
    shapedirs_expr = _expression_bases(face, assembly)
    lmk_faces, lmk_bary = _landmark_embedding(layout, mesh.skin, mesh.skin_faces)
    vt, ft = _uv_layout(layout, mesh, assembly, lmk_faces, lmk_bary)
    kintree = np.array([[2**32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64)
    return {
        "v_template": assembly.vertices,
        "f": assembly.faces.astype(np.uint32),
        "shapedirs": np.concatenate([shapedirs_shape, shapedirs_expr], axis=2),
        "posedirs": _pose_correctives(mesh.skin, weights, n_vertices),
        "J_regressor": scipy.sparse.csc_matrix(_joint_regressor(mesh.skin, face, assembly.parts, n_vertices)),
        "kintree_table": kintree,
        "weights": weights,
        "n_shape": N_DESIGNED_SHAPE + N_RANDOM_SHAPE,
        "n_expr": N_EXPR,
        "vt": vt,
        "ft": ft,
        "lmk_faces_idx": lmk_faces,
        "lmk_bary_coords": lmk_bary,
    }


def save_flame_pickle(model_dict: dict, path: str | Path) -> None:
    """Write a FLAME-structured dict atomically (temp file + rename)."""
    atomic_write_bytes(path, pickle.dumps(model_dict, protocol=4))


def procedural_head_cache_path(seed: int = 0) -> Path:
    """Cache file of the procedural head for ``seed``, keyed by this module's source so edits rebuild it."""
    source_hash = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    root = Path(os.environ.get("GEODIFF4D_CACHE", Path(tempfile.gettempdir()) / "geodiff4d_cache"))
    return root / f"procedural_head_{source_hash}_seed{seed}.pkl"


def procedural_head_model(seed: int = 0) -> FlameModel:
    """The procedural head as a :class:`FlameModel`, loaded through the same restricted pkl path as FLAME."""
    path = procedural_head_cache_path(seed)
    if not path.exists():
        save_flame_pickle(build_procedural_head(seed), path)
    return FlameModel.from_pkl(path)
