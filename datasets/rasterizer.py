"""Vectorized z-buffer triangle rasterizer in plain PyTorch (inference path, no gradients).

Why this shape: the CPU has no graphics pipeline we may rely on, and Python loops over triangles are far too
slow. Every triangle's pixel bounding box is enumerated into (triangle, pixel) candidate pairs in one flat
tensor (chunked to bound memory); edge functions at pixel centres decide coverage; depth and face index are
packed into one int64 key so a single ``scatter_reduce(amin)`` is both the z-buffer and a deterministic
tie-break (nearest depth, then smallest face index). Barycentrics are recomputed only for the winning
fragments, then made perspective-correct (1/z is affine in screen space).

Pixel centres sit at integer coordinates (OpenCV convention, see cameras.py). Triangles with any vertex
closer than ``near`` are culled (no near-plane clipping); that drops everything behind the camera.

On CPU tensors the same algorithm (same float64 setup, float32 coverage and depth, same tie-break) runs as one
numba-compiled scanline loop instead: enumerating pairs as tensors costs ~0.25 s per 256 px FLAME view on
CPU, the loop ~5 ms, and packing renders two views per sample. The tensor path stays for CUDA tensors
and as the reference the compiled one is tested against (``backend="torch"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numba
import numpy as np
import torch
from torch import Tensor

from geodiff4d.datasets.normal_maps import OPENCV_TO_OURS

_EMPTY_KEY = torch.iinfo(torch.int64).max
_FACE_BITS = 32
NEAR = 1e-3  # camera-space z below which triangles are culled
TILE = 8  # pixels per side of the z-buffer blocks that hide back faces (compiled path)
# a back face counts as hidden only behind depths this much (relative) nearer than its nearest corner: its
# fragments' float32 depths may fall short of that corner's z by float rounding, never by this much
HIDDEN_MARGIN = 1e-4
_DEFAULT_MAX_PAIRS = 1 << 21  # candidate pairs per chunk: ~2M pairs, ~250 MB of temporaries


@dataclass
class Fragments:
    """Per-pixel rasterization result for one view."""

    face_index: Tensor  # [H, W] long, -1 where no triangle covers the pixel centre
    bary: Tensor  # [H, W, 3] float32 barycentrics of the visible face (perspective-correct by default), 0 bg
    depth: Tensor  # [H, W] float32 camera-space z of the visible surface, inf on background

    @property
    def mask(self) -> Tensor:
        return self.face_index >= 0  # [H, W] bool


def check_inputs(vertices_cam: Tensor, faces: Tensor, K: Tensor) -> None:
    """Shapes and face indices a rasterizer can take; a ValueError naming the bad input otherwise."""
    if vertices_cam.ndim != 2 or vertices_cam.shape[1] != 3:
        raise ValueError(f"rasterize: vertices_cam must be [V, 3], got {tuple(vertices_cam.shape)}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"rasterize: faces must be [F, 3], got {tuple(faces.shape)}")
    if K.shape != (3, 3):
        raise ValueError(f"rasterize: K must be [3, 3], got {tuple(K.shape)}")
    if faces.numel():
        lowest, highest = torch.aminmax(faces)  # one pass (packing checks a mesh twice a sample)
        if lowest < 0 or highest >= vertices_cam.shape[0]:
            raise ValueError(f"rasterize: face indices out of range [0, {vertices_cam.shape[0]})")
    if faces.shape[0] >= 1 << 31:
        raise ValueError("rasterize: more than 2^31 faces do not fit the packed z-buffer key")


def _screen_triangles(vertices_cam: Tensor, faces: Tensor, K: Tensor) -> tuple[Tensor, Tensor]:
    """Projected corners [F, 3, 2] (pixels) and camera z [F, 3], in float64 for stable setup."""
    vertices = vertices_cam.detach().to(torch.float64)
    K = K.detach().to(vertices)
    projected = vertices @ K.T  # [V, 3]
    pixels = projected[:, :2] / projected[:, 2:3].clamp_min(1e-12)
    return pixels[faces], vertices[:, 2][faces]


def _edge_coefficients(corners: Tensor, area2: Tensor, origin: Tensor) -> Tensor:
    """Affine maps (a, b, c) with bary_i = a*dx + b*dy + c, dx/dy measured from ``origin`` [F, 2].

    corners [F, 3, 2], area2 [F] (twice the signed area). Returns [F, 3 (bary index), 3 (a, b, c)].
    """
    nxt, prv = corners.roll(-1, dims=1), corners.roll(1, dims=1)  # vertex i+1 and i+2 (mod 3)
    # bary_i is the edge function of the opposite edge (i+1 -> i+2), normalised by the full area
    a = (nxt[..., 1] - prv[..., 1]) / area2[:, None]
    b = (prv[..., 0] - nxt[..., 0]) / area2[:, None]
    rel = nxt - origin[:, None, :]  # opposite edge passes through vertex i+1
    c = -(a * rel[..., 0] + b * rel[..., 1])
    return torch.stack([a, b, c], dim=-1)


def rasterize(
    vertices_cam: Tensor,
    faces: Tensor,
    K: Tensor,
    height: int,
    width: int,
    near: float = NEAR,
    cull_backfaces: bool = False,
    perspective_correct: bool = True,
    max_pairs: int = _DEFAULT_MAX_PAIRS,
    backend: Literal["auto", "torch", "numba"] = "auto",
) -> Fragments:
    """Rasterize camera-space triangles (OpenCV camera, z forward) into ``height`` x ``width`` fragments.

    ``cull_backfaces`` drops triangles whose corners appear clockwise on screen, i.e. whose
    cross(v1-v0, v2-v0) normal points away from the camera (counter-clockwise-outward meshes like FLAME).
    ``backend="auto"`` compiles CPU tensors with numba and enumerates pairs with tensors elsewhere;
    ``max_pairs`` bounds the tensor path's memory only.
    """
    K = torch.as_tensor(K)
    faces = torch.as_tensor(faces, dtype=torch.long, device=vertices_cam.device)
    check_inputs(vertices_cam, faces, K)
    if backend not in ("auto", "torch", "numba"):
        raise ValueError(f"rasterize: backend must be 'auto', 'torch' or 'numba', got {backend!r}")
    if backend == "numba" or (backend == "auto" and vertices_cam.device.type == "cpu"):
        return _rasterize_numba(
            vertices_cam, faces, K, height, width, near, cull_backfaces, perspective_correct
        )
    with torch.no_grad():
        return _rasterize_torch(
            vertices_cam, faces, K, height, width, near, cull_backfaces, perspective_correct, max_pairs
        )


def _rasterize_torch(
    vertices_cam: Tensor,
    faces: Tensor,
    K: Tensor,
    height: int,
    width: int,
    near: float,
    cull_backfaces: bool,
    perspective_correct: bool,
    max_pairs: int,
) -> Fragments:
    """The tensor path: keep the drawable faces, z-buffer their (face, pixel) pairs chunk by chunk, resolve."""
    corners, corner_z = _screen_triangles(vertices_cam, faces, K)
    face_ids, corners, corner_z, area2 = _drawable_faces(corners, corner_z, near, cull_backfaces)
    x0, y0, box_w, box_h = _pixel_boxes(corners, height, width)
    n_pairs = box_w * box_h  # [Fk]
    origin = torch.stack([x0, y0], dim=1).to(corners)
    bary_coeff = _edge_coefficients(corners, area2, origin)  # [Fk, 3, 3]
    # 1/z is affine on screen: the barycentric-weighted sum of the corners' 1/z
    inv_z_coeff = (bary_coeff * (1.0 / corner_z)[..., None]).sum(dim=1)  # [Fk, 3]
    # per-pair table: a, b, c of bary_1, bary_2 and 1/z (bary_0 = 1 - bary_1 - bary_2)
    pair_coeff = torch.cat([bary_coeff[:, 1], bary_coeff[:, 2], inv_z_coeff], dim=1).float()  # [Fk, 9]

    keys = torch.full((height * width,), _EMPTY_KEY, dtype=torch.long, device=vertices_cam.device)
    base_pixel = y0 * width + x0
    for start, stop in _chunks(n_pairs, max_pairs):
        _zbuffer_chunk(
            keys,
            n_pairs[start:stop],
            box_w[start:stop],
            base_pixel[start:stop],
            pair_coeff[start:stop],
            width,
            face_offset=start,
        )

    covered = keys != _EMPTY_KEY
    local_face = torch.where(covered, keys & ((1 << _FACE_BITS) - 1), 0)  # index into kept faces
    depth_bits = (keys >> _FACE_BITS).to(torch.int32)
    depth = torch.where(covered, depth_bits.view(torch.float32), torch.inf)
    bary = _final_barycentrics(local_face, covered, bary_coeff, origin, corner_z, width, perspective_correct)
    face_index = torch.where(covered, face_ids[local_face] if face_ids.numel() else local_face, -1)
    return Fragments(
        face_index=face_index.view(height, width),
        bary=bary.view(height, width, 3),
        depth=depth.view(height, width),
    )


def _drawable_faces(
    corners: Tensor, corner_z: Tensor, near: float, cull_backfaces: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Ids [Fk], corners, z and 2x signed area of faces to draw: past near, not degenerate, culled if asked."""
    # image y points down, so a triangle that is counter-clockwise in the world appears with negative area
    area2 = (corners[:, 1, 0] - corners[:, 0, 0]) * (corners[:, 2, 1] - corners[:, 0, 1]) - (
        corners[:, 2, 0] - corners[:, 0, 0]
    ) * (corners[:, 1, 1] - corners[:, 0, 1])
    keep = (corner_z > near).all(dim=1) & (area2.abs() > 1e-12)
    if cull_backfaces:
        keep &= area2 < 0
    face_ids = keep.nonzero().squeeze(1)  # [Fk]
    return face_ids, corners[face_ids], corner_z[face_ids], area2[face_ids]


def _pixel_boxes(corners: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per face [Fk]: x0, y0, width and height of the pixel-centre box it may cover, clamped."""
    lo = corners.amin(dim=1).ceil()
    hi = corners.amax(dim=1).floor()
    x0 = lo[:, 0].clamp(0, width - 1).long()
    y0 = lo[:, 1].clamp(0, height - 1).long()
    box_w = (hi[:, 0].clamp(max=width - 1).long() - x0 + 1).clamp_min(0)
    box_h = (hi[:, 1].clamp(max=height - 1).long() - y0 + 1).clamp_min(0)
    box_w = torch.where(lo[:, 0] > width - 1, 0, box_w)
    box_h = torch.where(lo[:, 1] > height - 1, 0, box_h)
    return x0, y0, box_w, box_h


def _chunks(n_pairs: Tensor, max_pairs: int) -> list[tuple[int, int]]:
    """Split consecutive faces into runs of at most ``max_pairs`` candidate pairs (one big face may exceed it)."""
    if n_pairs.numel() == 0:
        return []
    ends = n_pairs.cumsum(0)
    total = int(ends[-1])
    bounds, start = [], 0
    while start < n_pairs.numel():
        offset = int(ends[start - 1]) if start else 0
        if total - offset <= max_pairs:
            stop = n_pairs.numel()
        else:
            stop = max(int(torch.searchsorted(ends, offset + max_pairs, right=True)), start + 1)
        bounds.append((start, stop))
        start = stop
    return bounds


def _zbuffer_chunk(
    keys: Tensor,
    n_pairs: Tensor,
    box_w: Tensor,
    base_pixel: Tensor,
    coeff: Tensor,
    width: int,
    face_offset: int,
) -> None:
    """Enumerate the chunk's (face, pixel) pairs, test coverage and fold the packed keys into ``keys``.

    Per-face values are expanded with ``repeat_interleave`` (several times faster than gathers on CPU) and the
    box position is decoded in floating point (exact below 2^22 pairs per face, float64 beyond).
    """
    total = int(n_pairs.sum())
    if total == 0:
        return
    device = keys.device
    dtype = torch.float32 if int(n_pairs.max()) < 1 << 22 else torch.float64
    first = (n_pairs.cumsum(0) - n_pairs).to(dtype)  # [Fc] flat index of each face's first pair
    local = torch.arange(total, dtype=dtype, device=device) - torch.repeat_interleave(
        first, n_pairs, output_size=total
    )
    w = torch.repeat_interleave(box_w.to(dtype), n_pairs, output_size=total)
    dy = torch.floor((local + 0.5) / w)  # [P] row inside the box
    dx = local - dy * w  # [P] column inside the box
    c = torch.repeat_interleave(coeff, n_pairs, dim=0, output_size=total).to(dtype).T  # [9, P]
    b1 = torch.addcmul(torch.addcmul(c[2], c[0], dx), c[1], dy)
    b2 = torch.addcmul(torch.addcmul(c[5], c[3], dx), c[4], dy)
    inv_z = torch.addcmul(torch.addcmul(c[8], c[6], dx), c[7], dy)
    hit = ((b1 >= 0) & (b2 >= 0) & (b1 + b2 <= 1) & (inv_z > 0)).nonzero().squeeze(1)
    face_ids = torch.arange(n_pairs.numel(), device=device)
    face = torch.repeat_interleave(face_ids, n_pairs, output_size=total)[hit]
    pixel = base_pixel[face] + (dy[hit] * width + dx[hit]).long()
    # positive float32 values order like their bit patterns read as integers
    depth = (1.0 / inv_z[hit].float()).view(torch.int32).long()
    packed = (depth << _FACE_BITS) | (face + face_offset)
    keys.scatter_reduce_(0, pixel, packed, reduce="amin")


def _final_barycentrics(
    local_face: Tensor,
    covered: Tensor,
    bary_coeff: Tensor,
    origin: Tensor,
    corner_z: Tensor,
    width: int,
    perspective_correct: bool,
) -> Tensor:
    """Barycentrics [H*W, 3] of each pixel centre in its visible face (0 on background), in float64 setup."""
    bary = torch.zeros(covered.numel(), 3, dtype=torch.float32, device=covered.device)
    pixels = covered.nonzero().squeeze(1)
    if pixels.numel() == 0:
        return bary
    face = local_face[pixels]
    offset = torch.stack([pixels % width, pixels // width], dim=1).to(origin) - origin[face]  # [N, 2]
    coeff = bary_coeff[face]  # [N, 3, 3]
    screen = coeff[..., 0] * offset[:, None, 0] + coeff[..., 1] * offset[:, None, 1] + coeff[..., 2]
    screen = screen.clamp_min(0)
    if perspective_correct:
        screen = screen * (1.0 / corner_z)[face]
    # reciprocals times, not divisions: the compiled path's per-pixel divisions were ~10 % of a normal map
    bary[pixels] = (screen * (1.0 / screen.sum(dim=1, keepdim=True))).float()
    return bary


def _rasterize_numba(
    vertices_cam: Tensor,
    faces: Tensor,
    K: Tensor,
    height: int,
    width: int,
    near: float,
    cull_backfaces: bool,
    perspective_correct: bool,
) -> Fragments:
    vertices = vertices_cam.detach().cpu().to(torch.float64).numpy()
    face_index, bary, depth = _zbuffer_numba(
        np.ascontiguousarray(vertices),
        np.ascontiguousarray(faces.cpu().numpy()),
        np.ascontiguousarray(K.detach().cpu().to(torch.float64).numpy()),
        height,
        width,
        near,
        cull_backfaces,
        perspective_correct,
    )
    device = vertices_cam.device
    return Fragments(
        face_index=torch.from_numpy(face_index).to(device).view(height, width),
        bary=torch.from_numpy(bary).to(device).view(height, width, 3),
        depth=torch.from_numpy(depth).to(device).view(height, width),
    )


@numba.njit(cache=True, nogil=True)
def _zbuffer_numba(vertices, faces, K, height, width, near, cull_backfaces, perspective_correct):
    """The tensor path's arithmetic, one face at a time: -> face_index [H*W], bary [H*W, 3], depth [H*W]."""
    window_face, window_depth, origin, coeff, inv_depth, window = visible_faces_numba(
        vertices, faces, K, height, width, near, cull_backfaces
    )
    x0, y0, window_w, window_h = window
    face_index = np.full(height * width, -1, np.int64)
    depth = np.full(height * width, np.inf, np.float32)
    bary = np.zeros((height * width, 3), np.float32)
    for row in range(window_h):
        for col in range(window_w):
            f = window_face[row * window_w + col]
            if f >= 0:
                p = (y0 + row) * width + x0 + col
                face_index[p], depth[p] = f, window_depth[row * window_w + col]
                bary[p, 0], bary[p, 1], bary[p, 2] = pixel_barycentrics_numba(
                    x0 + col, y0 + row, f, origin, coeff, inv_depth, faces, perspective_correct
                )
    return face_index, bary, depth


@numba.njit(cache=True, nogil=True)
def visible_faces_numba(vertices, faces, K, height, width, near, cull_backfaces):
    """The z-buffer pass over the window of pixel centres a face may cover (:func:`_vertex_window_numba`):
    -> face_index [h*w] (-1 on background) and depth [h*w] of the window's pixels, row by row; per face its box
    origin [F, 2] (image pixels) and barycentric coefficients [F, 3, 3] (bary_i = a*dx + b*dy + c from the
    origin), which :func:`pixel_barycentrics_numba` reads for the winners (only winners' rows are meaningful);
    1 / z per vertex [V]; the window (x0, y0, w, h).

    The window spares the z-buffer's fill, its tile pass and the callers' pixel loops the empty part of the
    image (a head crop's mesh covers a fifth to a half of it); every drawn face's pixel box lies inside it.
    Front faces are drawn first; a back face is then skipped where the z-buffer already holds something nearer
    than all of it in every tile its box touches (behind a closed surface, about 40 % of the faces and of the
    time). The z-buffer keeps the minimum of (depth, face) whatever the order, so this is the result of
    drawing every face.
    """
    n_faces = faces.shape[0]
    pixels = _project_numba(vertices, K)
    inv_depth = 1.0 / vertices[:, 2]  # per vertex, not per face corner: a third of the divisions
    # per face: bary_i = a*dx + b*dy + c from the box origin (float64); written for every face that can win a pixel,
    # and read only for winners, so left unzeroed (~1.4 MB per 16k-face view)
    coeff = np.empty((n_faces, 3, 3))
    origin = np.empty((n_faces, 2), np.int64)
    window = _vertex_window_numba(pixels, vertices, near, height, width)
    best_depth = np.full(window[2] * window[3], np.inf, np.float32)
    best_face = np.full(window[2] * window[3], -1, np.int64)
    corners = np.empty((3, 2))
    back_faces = np.empty(n_faces, np.int64)
    n_back = 0
    for f in range(n_faces):
        area2 = _face_corners_numba(pixels, vertices, faces, f, near, corners)
        if area2 < 0:
            _draw_face_numba(
                f, corners, area2, inv_depth, faces, coeff, origin, best_depth, best_face, window
            )
        elif area2 > 0 and not cull_backfaces:
            back_faces[n_back] = f
            n_back += 1
    if n_back == 0:
        return best_face, best_depth, origin, coeff, inv_depth, window
    farthest = _tile_farthest_numba(best_depth, window[3], window[2])
    for i in range(n_back):
        f = back_faces[i]
        area2 = _face_corners_numba(pixels, vertices, faces, f, near, corners)
        nearest = min(vertices[faces[f, 0], 2], vertices[faces[f, 1], 2], vertices[faces[f, 2], 2])
        if not _hidden_numba(farthest, corners, nearest * (1.0 - HIDDEN_MARGIN), window):
            _draw_face_numba(
                f, corners, area2, inv_depth, faces, coeff, origin, best_depth, best_face, window
            )
    return best_face, best_depth, origin, coeff, inv_depth, window


@numba.njit(cache=True, nogil=True)
def _vertex_window_numba(pixels, vertices, near, height, width) -> tuple[int, int, int, int]:
    """(x0, y0, w, h): the image's pixel centres within the box of the vertices in front of ``near`` (a face
    with a corner nearer is not drawn), rounded as :func:`_face_box_numba` rounds a face's corners, so every
    drawn face's box lies inside it; w and h are 0 when no pixel centre is inside."""
    lo_x = lo_y = np.inf
    hi_x = hi_y = -np.inf
    for v in range(pixels.shape[0]):
        if vertices[v, 2] > near:
            lo_x, hi_x = min(lo_x, pixels[v, 0]), max(hi_x, pixels[v, 0])
            lo_y, hi_y = min(lo_y, pixels[v, 1]), max(hi_y, pixels[v, 1])
    if lo_x > hi_x:
        return 0, 0, 0, 0
    box = np.array(((lo_x, lo_y), (hi_x, hi_y), (hi_x, hi_y)))
    x0, y0, box_w, box_h = _face_box_numba(box, (0, 0, width, height))
    return x0, y0, max(box_w, 0), max(box_h, 0)


@numba.njit(cache=True, nogil=True, inline="always")
def _face_corners_numba(pixels, vertices, faces, f, near, corners) -> float:
    """Face ``f``'s pixel corners into ``corners`` [3, 2]; -> twice its signed screen area (negative: front
    facing), 0.0 for a face not to draw (a corner closer than ``near``, or degenerate)."""
    inside_near = True
    for i in range(3):
        corners[i, 0] = pixels[faces[f, i], 0]
        corners[i, 1] = pixels[faces[f, i], 1]
        inside_near &= vertices[faces[f, i], 2] > near
    area2 = (corners[1, 0] - corners[0, 0]) * (corners[2, 1] - corners[0, 1]) - (
        corners[2, 0] - corners[0, 0]
    ) * (corners[1, 1] - corners[0, 1])
    return area2 if inside_near and abs(area2) > 1e-12 else 0.0


@numba.njit(cache=True, nogil=True, inline="always")
def _draw_face_numba(f, corners, area2, inv_depth, faces, coeff, origin, best_depth, best_face, window):
    """Face ``f``'s coefficients into ``coeff``/``origin`` and its pixel centres into the z-buffer of
    ``window`` (x0, y0, w, h)."""
    x0, y0, box_w, box_h = _face_box_numba(corners, window)
    if box_w <= 0 or box_h <= 0:
        return
    window_x0, window_y0, window_w = window[0], window[1], window[2]
    origin[f, 0], origin[f, 1] = x0, y0
    inv_a = inv_b = inv_c = 0.0
    for i in range(3):
        nxt, prv = (i + 1) % 3, (i + 2) % 3
        a = (corners[nxt, 1] - corners[prv, 1]) / area2
        b = (corners[prv, 0] - corners[nxt, 0]) / area2
        c = -(a * (corners[nxt, 0] - x0) + b * (corners[nxt, 1] - y0))
        coeff[f, i, 0], coeff[f, i, 1], coeff[f, i, 2] = a, b, c
        inv_z = inv_depth[faces[f, i]]
        inv_a += a * inv_z
        inv_b += b * inv_z
        inv_c += c * inv_z
    # coverage and depth in float32, as the tensor path evaluates them
    a1, b1, c1 = np.float32(coeff[f, 1, 0]), np.float32(coeff[f, 1, 1]), np.float32(coeff[f, 1, 2])
    a2, b2, c2 = np.float32(coeff[f, 2, 0]), np.float32(coeff[f, 2, 1]), np.float32(coeff[f, 2, 2])
    ia, ib, ic = np.float32(inv_a), np.float32(inv_b), np.float32(inv_c)
    for row in range(box_h):
        dy = np.float32(row)
        for col in range(box_w):
            dx = np.float32(col)
            w1 = c1 + a1 * dx + b1 * dy
            w2 = c2 + a2 * dx + b2 * dy
            inv_z32 = ic + ia * dx + ib * dy
            if w1 >= 0 and w2 >= 0 and w1 + w2 <= 1 and inv_z32 > 0:
                depth = np.float32(1.0) / inv_z32
                p = (y0 - window_y0 + row) * window_w + x0 - window_x0 + col
                if depth < best_depth[p] or (depth == best_depth[p] and f < best_face[p]):
                    best_depth[p], best_face[p] = depth, f


@numba.njit(cache=True, nogil=True)
def _tile_farthest_numba(best_depth: np.ndarray, height: int, width: int) -> np.ndarray:
    """The farthest z-buffer depth of each TILE x TILE block of pixels [ceil(H/TILE), ceil(W/TILE)] (inf where
    a pixel is empty)."""
    farthest = np.zeros(((height + TILE - 1) // TILE, (width + TILE - 1) // TILE), np.float32)
    for y in range(height):
        row = farthest[y // TILE]
        for x in range(width):
            row[x // TILE] = max(row[x // TILE], best_depth[y * width + x])
    return farthest


@numba.njit(cache=True, nogil=True, inline="always")
def _hidden_numba(farthest, corners, depth, window) -> bool:
    """Whether every tile (of ``window``'s z-buffer) under the pixel box of ``corners`` holds only depths nearer
    than ``depth``."""
    x0, y0, box_w, box_h = _face_box_numba(corners, window)
    if box_w <= 0 or box_h <= 0:
        return True
    x0, y0 = x0 - window[0], y0 - window[1]
    for ty in range(y0 // TILE, (y0 + box_h - 1) // TILE + 1):
        for tx in range(x0 // TILE, (x0 + box_w - 1) // TILE + 1):
            if farthest[ty, tx] >= depth:
                return False
    return True


@numba.njit(cache=True, nogil=True)
def _face_box_numba(corners: np.ndarray, area: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, width, height) of the pixel centres corners [3, 2] may cover within ``area`` (x0, y0, w, h);
    width or height <= 0 when none.

    A face's box clipped to the z-buffer's window is its box clipped to the image: the window is the image's
    part of the vertices' box, rounded here the same way, and the face's corners lie within the vertices' box.
    """
    if area[2] <= 0 or area[3] <= 0:
        return 0, 0, 0, 0
    right, bottom = area[0] + area[2] - 1, area[1] + area[3] - 1
    lo_x = np.ceil(min(corners[0, 0], corners[1, 0], corners[2, 0]))
    lo_y = np.ceil(min(corners[0, 1], corners[1, 1], corners[2, 1]))
    hi_x = np.floor(max(corners[0, 0], corners[1, 0], corners[2, 0]))
    hi_y = np.floor(max(corners[0, 1], corners[1, 1], corners[2, 1]))
    if lo_x > right or lo_y > bottom:
        return 0, 0, 0, 0
    x0 = int(min(max(lo_x, area[0]), right))
    y0 = int(min(max(lo_y, area[1]), bottom))
    return x0, y0, int(min(hi_x, right)) - x0 + 1, int(min(hi_y, bottom)) - y0 + 1


@numba.njit(cache=True, nogil=True)
def _project_numba(vertices: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Pixel positions [V, 2] of camera-space vertices [V, 3] (depth clamped to 1e-12 as the tensor path)."""
    pixels = np.empty((vertices.shape[0], 2))
    for v in range(vertices.shape[0]):
        x, y, z = vertices[v, 0], vertices[v, 1], vertices[v, 2]
        w = max(K[2, 0] * x + K[2, 1] * y + K[2, 2] * z, 1e-12)
        pixels[v, 0] = (K[0, 0] * x + K[0, 1] * y + K[0, 2] * z) / w
        pixels[v, 1] = (K[1, 0] * x + K[1, 1] * y + K[1, 2] * z) / w
    return pixels


@numba.njit(cache=True, nogil=True, inline="always")
def pixel_barycentrics_numba(x, y, f, origin, coeff, inv_depth, faces, perspective_correct):
    """Barycentrics (3 float32) of pixel centre (x, y) in face ``f``, computed in float64 from
    :func:`visible_faces_numba`'s coefficients, clamped at 0, weighted by the corners' ``inv_depth`` [V]
    (1 / camera z) when ``perspective_correct``, and renormalised."""
    dx, dy = x - origin[f, 0], y - origin[f, 1]
    s0 = max(coeff[f, 0, 0] * dx + coeff[f, 0, 1] * dy + coeff[f, 0, 2], 0.0)
    s1 = max(coeff[f, 1, 0] * dx + coeff[f, 1, 1] * dy + coeff[f, 1, 2], 0.0)
    s2 = max(coeff[f, 2, 0] * dx + coeff[f, 2, 1] * dy + coeff[f, 2, 2], 0.0)
    if perspective_correct:
        s0, s1, s2 = s0 * inv_depth[faces[f, 0]], s1 * inv_depth[faces[f, 1]], s2 * inv_depth[faces[f, 2]]
    inv_total = 1.0 / (s0 + s1 + s2)
    return np.float32(s0 * inv_total), np.float32(s1 * inv_total), np.float32(s2 * inv_total)


def interpolate(vertex_attrs: Tensor, faces: Tensor, fragments: Fragments) -> Tensor:
    """Interpolate per-vertex attributes [V, C] over the fragments -> [H, W, C] (0 on background).

    ``faces`` indexes ``vertex_attrs``; pass UV faces with UV coordinates for per-corner attributes.
    """
    faces = torch.as_tensor(faces, dtype=torch.long, device=vertex_attrs.device)
    height, width = fragments.face_index.shape
    pixels = fragments.face_index.view(-1).ge(0).nonzero().squeeze(1)  # [N] covered pixels only
    corner_attrs = vertex_attrs[faces[fragments.face_index.view(-1)[pixels]]]  # [N, 3, C]
    bary = fragments.bary.view(-1, 3)[pixels].to(vertex_attrs.dtype)  # [N, 3]
    values = torch.einsum("nk,nkc->nc", bary, corner_attrs)  # [N, C]
    out = vertex_attrs.new_zeros(height * width, vertex_attrs.shape[1])
    return out.index_put((pixels,), values).view(height, width, -1)


def face_normals(vertices: Tensor, faces: Tensor, normalize: bool = True) -> Tensor:
    """Face normals [F, 3] = cross(v1 - v0, v2 - v0) (outward for counter-clockwise faces)."""
    faces = torch.as_tensor(faces, dtype=torch.long, device=vertices.device)
    v0, v1, v2 = vertices[faces].unbind(dim=1)
    normals = torch.linalg.cross(v1 - v0, v2 - v0)
    return torch.nn.functional.normalize(normals, dim=-1) if normalize else normals


def vertex_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """Area-weighted vertex normals [V, 3], unit length (works in any frame, e.g. camera space)."""
    faces = torch.as_tensor(faces, dtype=torch.long, device=vertices.device)
    weighted = face_normals(vertices, faces, normalize=False)  # |cross| = 2 * area
    normals = torch.zeros_like(vertices)
    for corner in range(3):
        normals.index_add_(0, faces[:, corner], weighted)
    return torch.nn.functional.normalize(normals, dim=-1)


def normals_to_convention(normals_opencv: Tensor) -> Tensor:
    """OpenCV camera-space normals (x right, y down, z forward) -> ours (x right, y up, z toward the camera)."""
    return normals_opencv * normals_opencv.new_tensor(OPENCV_TO_OURS)
