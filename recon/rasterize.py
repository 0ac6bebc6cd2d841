"""Rendering 3D Gaussians: one function, backends with the same semantics.

``torch``: differentiable, runs on CPU. Projection with the EWA 2D covariance (gsplat's conventions: 0.3 px
low-pass, Jacobian clamped 30 % beyond the field of view), culling, an opacity-aware bounding box (exactly the
ellipse where alpha >= 1/255, so binning never changes the image), tile binning and depth sort in PyTorch;
front-to-back alpha blending (alpha <= 0.999, skipped below 1/255, a pixel stops when its transmittance would
drop to 1e-4) per pixel in compiled loops with a hand-written backward (:mod:`geodiff4d.recon.composite`);
those loops are CPU code, so CUDA tensors blend as ``torch-dense`` does.

``torch-dense``: the same with blending vectorized over padded (tile, slot, pixel) tensors in pure PyTorch
(:mod:`geodiff4d.recon.blend`): no compiled code, several times slower; the reference the tests compare with.

``gsplat``: ``gsplat.rasterization`` on CUDA (gsplat >= 1.5), fed view-evaluated colours with the camera-space
normals as extra channels and ``render_mode="RGB+D"``.

Both return alpha-weighted sums (depth = sum w z, normal = sum w n): ``depth / alpha`` is the expected depth,
and the normal loss compares ``normal`` with ``alpha * n_gt``. Pixel centres sit at integer coordinates
(OpenCV, as in :mod:`geodiff4d.datasets.cameras`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from geodiff4d.recon.blend import ALPHA_MIN, T_MIN, BlendGathered, tile_alpha
from geodiff4d.recon.composite import composite_tiles
from geodiff4d.recon.normals import camera_normals
from geodiff4d.recon.rotations import quat_to_rotmat
from geodiff4d.recon.sh import sh_to_rgb

EPS2D = 0.3


def pixel_size(world_to_cam: Tensor, K: Tensor, point: Tensor) -> float:
    """Metres per pixel at ``point`` [3] (world) in a camera: its depth over the focal length."""
    depth = (world_to_cam[:3, :3] @ point + world_to_cam[:3, 3])[2]
    return float(depth / K[0, 0])


def resolution_dilation(trained_pixel: float, pixel: float) -> float:
    """World variance (m^2) to add to every Gaussian so that a render with pixels of ``pixel`` metres shows the
    footprints the fit saw with pixels of ``trained_pixel`` metres: the rasterizer's EPS2D px^2 low-pass was part
    of every training render, and a finer render shrinks it (a fit on 32 px views rendered at 128 px falls apart
    into sub-pixel blobs). Zero at the training resolution or coarser."""
    return EPS2D * max(0.0, trained_pixel**2 - pixel**2)


@dataclass
class GaussianRender:
    rgb: Tensor  # [3, H, W] composited over the background
    alpha: Tensor  # [H, W]
    depth: Tensor  # [H, W] alpha-weighted camera z (0 where empty)
    normal: Tensor  # [3, H, W] alpha-weighted normals, x right, y up, z toward the camera
    visible: Tensor  # [N] bool: Gaussians that touched the image (for densification statistics)
    means2d: Tensor  # [N, 2] projected centres (retain_grad() on it gives screen-space gradients)
    radii: Tensor  # [N] screen radius in pixels as 3DGS counts it (3 sigma of the major axis), 0 where not visible


def _check_shapes(
    means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, world_to_cam: Tensor, K: Tensor
) -> None:
    """Raise a ValueError naming the first input whose shape does not fit N Gaussians and one camera."""
    n = means.shape[0]
    for name, value, shape in (
        ("means", means, (n, 3)),
        ("quats", quats, (n, 4)),
        ("scales", scales, (n, 3)),
        ("opacities", opacities, (n,)),
        ("world_to_cam", world_to_cam, (4, 4)),
        ("K", K, (3, 3)),
    ):
        if tuple(value.shape) != shape:
            raise ValueError(f"render_gaussians: {name} must have shape {shape}, got {tuple(value.shape)}")


def _view_colors(colors: Tensor, sh_degree: int | None, means: Tensor, world_to_cam: Tensor) -> Tensor:
    """RGB [N, 3] seen from the camera: SH coefficients [N, K, 3] evaluated toward it, or RGB as given."""
    if sh_degree is not None:
        camera_center = -world_to_cam[:3, :3].T @ world_to_cam[:3, 3]
        return sh_to_rgb(colors, sh_degree, means, camera_center)
    if colors.shape != (means.shape[0], 3):
        raise ValueError(
            f"render_gaussians: colors must be [N, 3] without sh_degree, got {tuple(colors.shape)}"
        )
    return colors


def render_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    world_to_cam: Tensor,
    K: Tensor,
    width: int,
    height: int,
    *,
    sh_degree: int | None = None,
    background: Tensor | None = None,
    backend: str = "auto",
    near: float = 0.01,
    far: float = 1e10,
    tile_size: int = 16,
) -> GaussianRender:
    """Render N Gaussians (means [N,3], wxyz quats [N,4], scales [N,3], opacities [N]) into one camera.

    ``colors`` is RGB [N, 3], or SH coefficients [N, K, 3] when ``sh_degree`` is given. ``world_to_cam`` [4,4]
    OpenCV, ``K`` [3,3] pixels. ``backend``: "torch", "torch-dense", "gsplat" (needs CUDA tensors) or "auto" (gsplat when
    the inputs live on a CUDA device).
    """
    _check_shapes(means, quats, scales, opacities, world_to_cam, K)
    if backend == "auto":
        backend = "gsplat" if means.is_cuda else "torch"
    if backend not in ("torch", "torch-dense", "gsplat"):
        raise ValueError(f"render_gaussians: unknown backend {backend!r} (torch, torch-dense, gsplat, auto)")
    world_to_cam, K = world_to_cam.to(means), K.to(means)
    rgb = _view_colors(colors, sh_degree, means, world_to_cam)
    normals = camera_normals(means, quats, scales, world_to_cam)  # [N, 3]
    features = torch.cat([rgb, normals], dim=-1)  # [N, 6]
    if backend == "gsplat":
        feats, alpha, depth, visible, means2d, radii = _gsplat_backend(
            means, quats, scales, opacities, features, world_to_cam, K, width, height, near, far, tile_size
        )
    else:
        feats, alpha, depth, visible, means2d, radii = _torch_backend(
            means,
            quats,
            scales,
            opacities,
            features,
            world_to_cam,
            K,
            width,
            height,
            near,
            far,
            tile_size,
            dense=backend == "torch-dense",
        )
    rgb_image = feats[:3]
    if background is not None:
        rgb_image = rgb_image + (1 - alpha)[None] * background.to(rgb_image)[:, None, None]
    return GaussianRender(rgb_image, alpha, depth, feats[3:6], visible, means2d, radii)


def project_gaussians(
    means: Tensor, quats: Tensor, scales: Tensor, world_to_cam: Tensor, K: Tensor, width: int, height: int
) -> tuple[Tensor, Tensor, Tensor]:
    """EWA projection: (means2d [N, 2] pixels, cov2d [N, 2, 2] incl. the 0.3 px blur, depth [N])."""
    rotation, translation = world_to_cam[:3, :3], world_to_cam[:3, 3]
    means_cam = means @ rotation.T + translation  # [N, 3]
    factor = quat_to_rotmat(quats) * scales[:, None, :]  # R S, [N, 3, 3]
    cov_cam = rotation @ factor @ factor.transpose(1, 2) @ rotation.T  # [N, 3, 3]
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    x, y, z = torch.unbind(means_cam, dim=-1)
    # keep the Jacobian of Gaussians far outside the view bounded (gsplat's clamp)
    lim_x_pos, lim_x_neg = (width - cx) / fx + 0.15 * width / fx, cx / fx + 0.15 * width / fx
    lim_y_pos, lim_y_neg = (height - cy) / fy + 0.15 * height / fy, cy / fy + 0.15 * height / fy
    tx = z * torch.maximum(torch.minimum(x / z, lim_x_pos), -lim_x_neg)
    ty = z * torch.maximum(torch.minimum(y / z, lim_y_pos), -lim_y_neg)
    zero = torch.zeros_like(z)
    jac = torch.stack([fx / z, zero, -fx * tx / z**2, zero, fy / z, -fy * ty / z**2], dim=-1).reshape(
        -1, 2, 3
    )
    cov2d = jac @ cov_cam @ jac.transpose(1, 2) + EPS2D * torch.eye(2, dtype=means.dtype, device=means.device)
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], dim=-1)
    return means2d, cov2d, z


def _screen_extents(
    means2d: Tensor,
    cov2d: Tensor,
    depth: Tensor,
    opacities: Tensor,
    width: int,
    height: int,
    near: float,
    far: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Conics [N, 3], opacity-aware half extents rx, ry [N] and visibility [N] of projections."""
    a, b, c = cov2d[:, 0, 0], cov2d[:, 0, 1], cov2d[:, 1, 1]
    det = a * c - b * b
    conic = torch.stack([c, -b, a], dim=-1) / det.clamp_min(1e-12)[:, None]  # inverse: [xx, xy, yy]
    # opacity-aware extent: alpha >= 1/255 exactly inside the ellipse d^T conic d <= q
    q = 2 * torch.log((opacities / ALPHA_MIN).clamp_min(1.0)).detach()
    rx, ry = torch.sqrt(q * a).detach() + 0.5, torch.sqrt(q * c).detach() + 0.5
    m2 = means2d.detach()
    visible = (
        (depth > near)
        & (depth < far)
        & (det > 0)
        & (opacities >= ALPHA_MIN)
        & (m2[:, 0] + rx > -0.5)
        & (m2[:, 0] - rx < width - 0.5)
        & (m2[:, 1] + ry > -0.5)
        & (m2[:, 1] - ry < height - 0.5)
    )
    return conic, rx, ry, visible


def _tile_pairs(
    means2d: Tensor,
    rx: Tensor,
    ry: Tensor,
    depth: Tensor,
    visible: Tensor,
    width: int,
    height: int,
    tile: int,
    tiles_x: int,
) -> tuple[Tensor, Tensor]:
    """(tile [P], Gaussian [P]) of every (Gaussian, tile) overlap, grouped by tile, front to back in each."""
    m2 = means2d.detach()
    # tile rectangles of the visible Gaussians, front to back
    ids = torch.nonzero(visible).squeeze(1)
    ids = ids[torch.argsort(depth.detach()[ids], stable=True)]
    x0 = ((m2[ids, 0] - rx[ids]).ceil().clamp(0, width - 1) // tile).long()
    x1 = ((m2[ids, 0] + rx[ids]).floor().clamp(0, width - 1) // tile).long()
    y0 = ((m2[ids, 1] - ry[ids]).ceil().clamp(0, height - 1) // tile).long()
    y1 = ((m2[ids, 1] + ry[ids]).floor().clamp(0, height - 1) // tile).long()
    span_x = (x1 - x0 + 1).clamp_min(0)
    counts = span_x * (y1 - y0 + 1).clamp_min(0)
    # one entry per (Gaussian, tile) pair; a stable sort by tile keeps each tile's pairs front to back
    pair_owner = torch.repeat_interleave(torch.arange(len(ids), device=ids.device), counts)
    first = torch.cumsum(counts, 0) - counts
    offset = torch.arange(int(counts.sum()), device=ids.device) - first[pair_owner]
    pair_tile = (
        (y0[pair_owner] + offset // span_x[pair_owner]) * tiles_x
        + x0[pair_owner]
        + offset % span_x[pair_owner]
    )
    pair_tile, order = torch.sort(pair_tile, stable=True)
    return pair_tile, ids[pair_owner[order]]


def _torch_backend(
    means, quats, scales, opacities, features, world_to_cam, K, width, height, near, far, tile, dense=False
):
    """Project, cull, bin into tiles, blend -> (features [6, H, W], alpha, depth, visible, ...)."""
    means2d, cov2d, depth = project_gaussians(means, quats, scales, world_to_cam, K, width, height)
    conic, rx, ry, visible = _screen_extents(means2d, cov2d, depth, opacities, width, height, near, far)
    tiles_x, tiles_y = math.ceil(width / tile), math.ceil(height / tile)
    n_tiles = tiles_x * tiles_y
    pair_tile, gauss = _tile_pairs(means2d, rx, ry, depth, visible, width, height, tile, tiles_x)
    values = torch.cat([features, depth[:, None], torch.ones_like(depth)[:, None]], dim=-1)  # [N, 8]
    per_tile = torch.bincount(pair_tile, minlength=n_tiles)  # [n_tiles]
    tile_start = torch.cumsum(per_tile, 0) - per_tile
    if dense or means.is_cuda:  # the compiled compositor runs on the CPU; on a GPU the padded tensors do
        image = _dense_composite(
            per_tile,
            tile_start,
            gauss,
            means2d,
            conic,
            opacities,
            values,
            tiles_x,
            tiles_y,
            tile,
            width,
            height,
        )
    else:
        image = composite_tiles(
            means2d, conic, opacities, values, tile_start, per_tile, gauss, tiles_x, tile, width, height
        ).permute(2, 0, 1)  # [8, H, W]
    a, b, c = cov2d[:, 0, 0], cov2d[:, 0, 1], cov2d[:, 1, 1]
    major = (a + c) / 2 + torch.sqrt(((a - c) / 2) ** 2 + b * b)  # largest eigenvalue of cov2d
    radii = torch.where(visible, torch.ceil(3 * torch.sqrt(major.detach())), 0.0)
    return image[:6], image[7], image[6], visible, means2d, radii


def _dense_composite(
    per_tile, tile_start, gauss, means2d, conic, opacities, values, tiles_x, tiles_y, tile, width, height
) -> Tensor:
    """The padded-tensor compositor (pure PyTorch, the reference for :mod:`geodiff4d.recon.composite`) -> [8, H, W]."""
    tile_pixels = tile * tile
    with torch.no_grad():  # early termination: drop each tile's Gaussians behind its saturation depth
        per_tile = per_tile.clone()
        for tiles in _tile_chunks(per_tile, tile_pixels):
            per_tile[tiles] = _saturation_counts(
                tiles, per_tile, tile_start, gauss, means2d.detach(), conic, opacities, tiles_x, tile
            )
    out = values.new_zeros(tiles_x * tiles_y, tile_pixels, 8)
    for tiles in _tile_chunks(per_tile, tile_pixels):
        out = out.index_copy(
            0,
            tiles,
            _blend_tiles(
                tiles, per_tile, tile_start, gauss, means2d, conic, opacities, values, tiles_x, tile
            ),
        )
    image = out.permute(2, 0, 1).reshape(8, tiles_y, tiles_x, tile, tile).permute(0, 1, 3, 2, 4)
    return image.reshape(8, tiles_y * tile, tiles_x * tile)[:, :height, :width]


def _tile_chunks(per_tile: Tensor, tile_pixels: int, budget: int = 1 << 22) -> list[Tensor]:
    """Groups of non-empty tiles with similar pair counts, each padded group at most ``budget`` elements.

    Sorting tiles by count keeps padding waste small; the budget bounds memory for large scenes.
    """
    counts, order = torch.sort(per_tile, descending=True)
    order, counts = order[counts > 0], counts[counts > 0].tolist()
    chunks, begin = [], 0
    while begin < len(counts):
        width = max(1, budget // (counts[begin] * tile_pixels))
        chunks.append(order[begin : begin + width])
        begin += width
    return chunks


def _tile_slots(tiles, per_tile, tile_start, gauss, tiles_x, tile, dtype):
    """A group of tiles' depth-sorted lists padded to the longest: Gaussian per slot g [T, K], valid [T, K],
    pixel columns px and rows py [T, 1, tile]."""
    depth_slots = int(per_tile[tiles].max())
    slot = torch.arange(depth_slots, device=per_tile.device)
    valid = slot[None] < per_tile[tiles][:, None]  # [T, K]
    pair = torch.where(valid, tile_start[tiles][:, None] + slot[None], torch.zeros_like(slot)[None])
    local = torch.arange(tile, dtype=dtype, device=per_tile.device)
    px = ((tiles % tiles_x) * tile)[:, None, None] + local  # [T, 1, tile] pixel columns
    py = ((tiles // tiles_x) * tile)[:, None, None] + local  # [T, 1, tile] pixel rows
    return gauss[pair], valid, px, py


def _saturation_counts(
    tiles, per_tile, tile_start, gauss, means2d, conic, opacities, tiles_x, tile, block: int = 32
) -> Tensor:
    """Per tile, the number of leading Gaussians that still reach some pixel: every later one meets only
    pixels whose transmittance is already spent, so it has weight 0 and gradient 0 and can be dropped.

    Walks the lists in blocks of ``block`` slots carrying the log-transmittance, and stops once every pixel
    of the group is saturated, so its cost follows the saturation depth, not the list length. The test keeps
    a small margin below the blending threshold: block-wise sums may round differently from one cumsum,
    and keeping a spare slot is harmless where dropping a live one would not be.
    """
    g, valid, px, py = _tile_slots(tiles, per_tile, tile_start, gauss, tiles_x, tile, means2d.dtype)
    threshold = math.log(T_MIN) - 1e-3
    carry = means2d.new_zeros(len(tiles), 1, tile * tile)  # log transmittance before the block
    counts = torch.zeros(len(tiles), dtype=torch.long, device=g.device)
    for start in range(0, g.shape[1], block):
        gb, vb = g[:, start : start + block], valid[:, start : start + block]
        opacity = torch.where(vb, opacities[gb], 1.0)
        alpha, _ = tile_alpha(means2d[gb, 0], means2d[gb, 1], conic[gb], opacity, vb, px, py)
        inclusive = carry + torch.cumsum(torch.log1p(-alpha), 1)  # [T, B, S*S]
        # slot k blends into a pixel while the transmittance before it is above the threshold
        before = torch.cat([carry, inclusive[:, :-1]], 1)
        alive = (before > threshold).any(-1) & vb  # [T, B]
        slots = torch.arange(start + 1, start + gb.shape[1] + 1, device=g.device)
        counts = torch.maximum(counts, torch.where(alive, slots, 0).amax(1))
        carry = inclusive[:, -1:]
        if not bool((carry > threshold).any()):
            break
    return counts


def _blend_tiles(tiles, per_tile, tile_start, gauss, means2d, conic, opacities, values, tiles_x, tile):
    """Blend a group of tiles' depth-sorted lists -> [T, pixels, 8]."""
    g, valid, px, py = _tile_slots(tiles, per_tile, tile_start, gauss, tiles_x, tile, means2d.dtype)
    return BlendGathered.apply(means2d, conic, opacities, values, g, valid, px, py)


def _gsplat_backend(
    means, quats, scales, opacities, features, world_to_cam, K, width, height, near, far, tile
):
    import gsplat  # CUDA extension: imported only on the GPU path

    # gsplat samples pixel (i, j) at (j + 0.5, i + 0.5); shift the principal point to keep integer centres
    K_gsplat = K.clone()
    K_gsplat[0, 2] += 0.5
    K_gsplat[1, 2] += 0.5
    colors, alphas, meta = gsplat.rasterization(
        means,
        quats,
        scales,
        opacities,
        features,
        world_to_cam[None],
        K_gsplat[None],
        width,
        height,
        near_plane=near,
        far_plane=far,
        eps2d=EPS2D,
        tile_size=tile,
        render_mode="RGB+D",
        packed=False,
        rasterize_mode="classic",
    )
    image = colors[0].permute(2, 0, 1)  # [7, H, W]: rgb, normal, accumulated depth
    radii = meta["radii"][0]
    visible = (radii > 0).all(-1) if radii.dim() == 2 else radii > 0
    radii = (radii.amax(-1) if radii.dim() == 2 else radii).float() * visible
    return image[:6], alphas[0, :, :, 0], image[6], visible, meta["means2d"][0], radii
