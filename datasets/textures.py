"""Skin textures for procedural heads, made from real face photos that ship inside installed packages.

Face detectors respond to renders of the procedural head only if its texture carries a real face: the
photo's 68 dlib landmarks are warped (piecewise affine) onto the UV positions of the model's landmark
embedding, the photo face is recoloured to a skin tone drawn from the identity seed, and the rest of the
head gets that skin tone with hair on the top and back. Texture pixels follow the FLAME/OpenGL UV
convention of :mod:`geodiff4d.datasets.flame`: u to the right, v up, so image row = (1 - v) * size.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import skimage.data
import skimage.draw
import skimage.io
from scipy.ndimage import gaussian_filter, map_coordinates
from scipy.spatial import Delaunay

from geodiff4d.datasets.flame import FlameModel
from geodiff4d.datasets.packaged import DLIB_LANDMARKS_68, package_file
from geodiff4d.datasets.procedural_head import SKIN_V_RANGE

INSIGHTFACE_IMAGES = ("t1.jpg", "Tom_Hanks_54745.png")
SKIN_TONES = np.array([[0.93, 0.78, 0.67], [0.80, 0.62, 0.50], [0.62, 0.45, 0.33], [0.45, 0.31, 0.22]])
HAIR_COLOURS = np.array([[0.08, 0.06, 0.05], [0.25, 0.16, 0.09], [0.45, 0.33, 0.20], [0.18, 0.16, 0.15]])
CAVITY_COLOUR = np.array([0.30, 0.08, 0.08])


def face_photos() -> list[np.ndarray]:
    """Real face photos (uint8 HxWx3): scikit-image's astronaut and insightface's sample images."""
    photos = [skimage.data.astronaut()]
    photos += [
        skimage.io.imread(package_file("insightface", f"data/images/{name}")) for name in INSIGHTFACE_IMAGES
    ]
    return [np.ascontiguousarray(photo[..., :3]) for photo in photos]


@lru_cache(maxsize=1)
def photo_faces() -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """(photo, landmarks [68, 2] pixel x, y) of the highest-scoring dlib face in each photo."""
    import dlib

    predictor = dlib.shape_predictor(str(package_file(*DLIB_LANDMARKS_68)))
    detector = dlib.get_frontal_face_detector()
    faces = []
    for photo in face_photos():
        upsample = (
            1 if max(photo.shape[:2]) < 600 else 0
        )  # small photos hold faces below dlib's 80 px minimum
        boxes, scores, _ = detector.run(photo, upsample, 0.0)
        if not boxes:
            raise RuntimeError("textures: dlib found no face in a packaged photo")
        shape = predictor(photo, boxes[int(np.argmax(scores))])
        landmarks = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
        lower, upper = [67, 66, 65], [61, 62, 63]  # keep a closed mouth's inner lips apart: no flat triangles
        landmarks[lower, 1] = np.maximum(landmarks[lower, 1], landmarks[upper, 1] + 1.0)
        faces.append((photo, landmarks))
    return tuple(faces)


def landmark_uv(model: FlameModel) -> np.ndarray:
    """UV coordinates [68, 2] of the model's landmark embedding."""
    corners = model.uv_coords[model.uv_faces[model.landmark_faces]]  # [68, 3, 2]
    return np.einsum("lk,lkc->lc", model.landmark_bary.numpy(), corners.numpy().astype(np.float64))


def _control_points(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks plus a forehead arc and an outer ring, built the same way in photo and UV space.

    Returns the control points [N, 2] and the face outline [M, 2] (jaw, then forehead) used as blend mask.
    """
    brows = landmarks[17:27]
    up = brows.mean(axis=0) - landmarks[30]  # nose tip -> brows: "up" in either space, with its scale
    forehead = brows[::-1] + 0.75 * up
    outline = np.concatenate([landmarks[:17], forehead])
    centre = landmarks[27:36].mean(axis=0)
    ring = centre + 1.35 * (outline - centre)
    return np.concatenate([landmarks, forehead, ring]), outline


def _piecewise_affine(points: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Map ``points`` [N, 2] by the piecewise-affine warp of the Delaunay triangulation of ``src`` onto ``dst``.

    Barycentric coordinates carry over from each src triangle to its dst triangle (a dst triangle may be
    flat, e.g. a closed mouth); points outside the src hull use the least-squares affine of all points.
    """
    triangulation = Delaunay(src)
    simplex = triangulation.find_simplex(points)
    transform = triangulation.transform[simplex]  # [N, 3, 2]
    partial = np.einsum("nij,nj->ni", transform[:, :2], points - transform[:, 2])
    bary = np.concatenate([partial, 1 - partial.sum(axis=1, keepdims=True)], axis=1)  # [N, 3]
    inside = np.einsum("nk,nkc->nc", bary, dst[triangulation.simplices[simplex]])
    affine, *_ = np.linalg.lstsq(np.c_[src, np.ones(len(src))], dst, rcond=None)
    outside = np.c_[points, np.ones(len(points))] @ affine
    return np.where((simplex >= 0)[:, None], inside, outside)


def _warp_photo(photo: np.ndarray, uv_points: np.ndarray, photo_points: np.ndarray, size: int) -> np.ndarray:
    """Photo resampled into UV [size, size, 3] float by the piecewise-affine map UV pixel -> photo pixel.

    The map is linear inside each triangle, so it is evaluated on a 4x coarser grid and interpolated.
    """
    coarse = np.linspace(-0.5, size - 0.5, size // 4 + 1)
    grid_x, grid_y = np.meshgrid(coarse, coarse)
    mapped = _piecewise_affine(np.stack([grid_x.ravel(), grid_y.ravel()], axis=1), uv_points, photo_points)
    mapped = mapped.reshape(len(coarse), len(coarse), 2)
    fine = (np.arange(size) + 0.5) / size * (len(coarse) - 1)  # fine pixel centres in coarse-grid units
    at = np.stack(np.meshgrid(fine, fine, indexing="ij"))  # [2, size, size] (row, col)
    photo_x, photo_y = (map_coordinates(mapped[..., k], at, order=1) for k in (0, 1))
    image = photo.astype(np.float64) / 255
    return np.stack(
        [map_coordinates(image[..., c], [photo_y, photo_x], order=1, mode="nearest") for c in range(3)],
        axis=-1,
    )


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    noise = gaussian_filter(rng.normal(size=(size, size)), sigma, mode="wrap")
    return noise / (noise.std() + 1e-12)


def skin_texture(model: FlameModel, identity_seed: int, size: int = 512) -> np.ndarray:
    """UV texture float32 [size, size, 3] in [0, 1]: a real photo face on the face, skin and hair elsewhere."""
    rng = np.random.default_rng(identity_seed)
    faces = photo_faces()
    photo, photo_landmarks = faces[identity_seed % len(faces)]
    uv = landmark_uv(model)
    uv_pixels = np.stack(
        [uv[:, 0] * size - 0.5, (1 - uv[:, 1]) * size - 0.5], axis=1
    )  # x, y of pixel centres

    src, outline = _control_points(uv_pixels)
    dst, _ = _control_points(photo_landmarks)
    face = _warp_photo(photo, src, dst, size)

    tone = SKIN_TONES[0] + (SKIN_TONES[-1] - SKIN_TONES[0]) * rng.uniform() + rng.normal(0, 0.02, 3)
    inner = np.zeros((size, size), dtype=bool)
    rows, cols = skimage.draw.polygon(
        uv_pixels[[2, 14, 35, 31], 1], uv_pixels[[2, 14, 35, 31], 0], (size, size)
    )
    inner[rows, cols] = True  # cheeks and nose: the photo's own skin colour
    photo_skin = np.median(face[inner], axis=0) if inner.any() else tone
    face = np.clip(face * (tone / np.maximum(photo_skin, 1e-3)), 0, 1)

    mask = np.zeros((size, size))
    rows, cols = skimage.draw.polygon(outline[:, 1], outline[:, 0], (size, size))
    mask[rows, cols] = 1.0
    mask = gaussian_filter(mask, size / 80)

    variation = 1 + 0.04 * _smooth_noise(rng, size, size / 40)
    skin = tone * variation[..., None]
    hairline = outline[17:, 1].min() - 0.15 * (outline[:17, 1].max() - outline[17:, 1].min())
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    u_from_front = np.abs(x / size - uv[:, 0].mean())  # 0 at the face centre, 0.5 at the back seam
    hair_line_y = (
        hairline + np.clip((u_from_front - 0.15) / 0.2, 0, 1) * 0.18 * size
    )  # lower over the ears/back
    hair = 1 / (1 + np.exp((y - hair_line_y) / (size / 150)))
    hair_colour = (
        HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] * (1 + 0.25 * _smooth_noise(rng, size, 1.5))[..., None]
    )
    base = skin * (1 - hair[..., None]) + hair_colour * hair[..., None]
    texture = face * mask[..., None] + base * (1 - mask[..., None])
    below_skin = int(np.ceil(size * (1 - SKIN_V_RANGE[0])))  # the procedural mouth cavity's UV band
    texture[below_skin:] = CAVITY_COLOUR
    return np.clip(texture, 0, 1).astype(np.float32)
