"""Multi-view FLAME tracking: per-frame pose (global rotation, neck, jaw), expression and translation plus one
shared shape, fitted by optimization (the initialization the paper takes from Pixel3DMM).

Terms: 68 detected landmarks (reprojection, Charbonnier-robust, contour points down-weighted because dlib
follows the silhouette while the mesh landmarks are fixed), silhouettes and normal maps (differentiable: the
mesh is rendered as one flat opaque Gaussian disc per triangle with the CPU Gaussian renderer, so alpha and
the disc normals carry gradients to the vertices), temporal smoothness and weak priors (the neck stays near
zero so that global rotation is not split arbitrarily between root and neck). Landmarks alone run first
(rigid, then everything) to land in the basin; then all terms, rendering a random camera of every frame per step.
An external tracker's npz (NeRSemble names) can replace this module, or initialize it.

Long sequences are tracked in chunks of frames (:func:`track_sequence`), so memory is bounded by the chunk:
the shared shape is fitted first on frames spread over the sequence, then each chunk fits its per-frame
parameters with the shape held, smoothed against the previous chunk's last frame, and is checkpointed
(atomically) so that a killed run resumes after its last finished chunk.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import Tensor, nn

from geodiff4d.core.config import StrictConfig
from geodiff4d.core.io.images import from_float
from geodiff4d.core.io.json_yaml import read_json, write_json
from geodiff4d.core.progress import progress_bar
from geodiff4d.core.settings_match import settings_differences
from geodiff4d.datasets import frame_folder
from geodiff4d.datasets.cameras import Camera
from geodiff4d.datasets.flame import FlameModel, FlameParams, euler_xyz_matrix, rodrigues
from geodiff4d.recon.binding import render_bound
from geodiff4d.recon.gaussians import BoundGaussians
from geodiff4d.recon.landmarks import CONTOUR, LandmarkDetector
from geodiff4d.recon.losses import normal_loss
from geodiff4d.recon.sh import rgb_to_dc

PER_FRAME = ("expression", "rotation", "neck", "jaw", "translation")  # fitted per frame (eyes are not)


class TrackingConfig(StrictConfig):
    rigid_steps: int = 100  # landmarks only, rotation + translation
    landmark_steps: int = 150  # landmarks only, every parameter
    steps: int = 150  # every term
    render_size: int = 96  # silhouettes and normals are compared at this size (longest side)
    views_per_step: int = (
        1  # random cameras rendered per frame and step (every frame gets a gradient each step)
    )
    lr: float = 0.01
    render_lr: float = 0.003  # smaller steps once the noisy per-view render terms join
    landmark_weight: float = 1.0
    silhouette_weight: float = 1.0
    normal_weight: float = 0.2
    smooth_weight: float = 0.01  # per-frame squared change; more flattens real 25 fps expression motion
    prior_weight: float = 1e-4  # shape and expression
    neck_weight: float = 10.0
    seed: int = 0
    chunk_frames: int = 16  # frames optimised together: memory grows with this, not with the sequence
    identity_frames: int = 8  # frames spread over a multi-chunk sequence that fit the shared shape first

    @model_validator(mode="after")
    def _positive_sizes(self) -> TrackingConfig:
        for name in ("chunk_frames", "identity_frames", "render_size", "views_per_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrackingConfig.{name} must be at least 1, got {getattr(self, name)}")
        return self


@dataclass
class TrackingTargets:
    """What one sequence is tracked against: C cameras x T frames."""

    cameras: list[Camera]  # full-resolution cameras (landmarks are in their pixels)
    masks: Tensor  # [T, C, h, w] at render size
    normals: Tensor  # [T, C, 3, h, w] unit normals at render size (0 where unknown)
    has_normal: Tensor  # [T, C] bool
    landmarks: Tensor  # [T, C, 68, 2] pixels
    has_landmarks: Tensor  # [T, C] bool

    def select(self, frames: Sequence[int]) -> TrackingTargets:
        """The targets of some frames (e.g. one chunk), in the given order."""
        index = list(frames)
        return TrackingTargets(
            self.cameras,
            self.masks[index],
            self.normals[index],
            self.has_normal[index],
            self.landmarks[index],
            self.has_landmarks[index],
        )


class TrackedSequence(nn.Module):
    """Learnable FLAME parameters of T frames: per-frame pose, expression, translation; shared shape."""

    def __init__(self, frames: int, model: FlameModel, init: FlameParams | None = None):
        super().__init__()
        init = init or FlameParams.zeros(frames, model.n_shape, model.n_expr)
        if init.batch_size != frames:
            raise ValueError(f"tracking init has {init.batch_size} frames, the sequence {frames}")
        self.shape = nn.Parameter(init.shape[:1].clone())
        for name in PER_FRAME:
            setattr(self, name, nn.Parameter(getattr(init, name).clone()))
        self.register_buffer("eyes", init.eyes.clone())
        self.register_buffer("scale", init.scale.clone())

    def params(self) -> FlameParams:
        frames = self.rotation.shape[0]
        return FlameParams(
            self.shape.expand(frames, -1),
            self.expression,
            self.rotation,
            self.neck,
            self.jaw,
            self.eyes,
            self.translation,
            self.scale,
        )

    def per_frame(self) -> list[Tensor]:
        return [getattr(self, name) for name in PER_FRAME]


def mesh_gaussians(n_faces: int) -> BoundGaussians:
    """One opaque flat disc per triangle, at its centroid, spanning it: a soft, differentiable mesh render."""
    tensors = {
        "local_xyz": torch.zeros(n_faces, 3),
        "local_quat": torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(n_faces, 4),
        "log_scale": torch.log(torch.tensor([0.4, 0.05, 0.4])).expand(n_faces, 3),
        "opacity_logit": torch.full((n_faces,), 4.0),
        "sh_dc": rgb_to_dc(torch.full((n_faces, 3), 0.5)),
        "sh_rest": torch.zeros(n_faces, 0, 3),
    }
    return BoundGaussians(torch.arange(n_faces), tensors, 0).requires_grad_(False)


def _render_size(camera: Camera, size: int) -> tuple[int, int]:
    scale = size / max(camera.width, camera.height)
    return max(1, round(camera.width * scale)), max(1, round(camera.height * scale))


def build_targets(
    cameras: list[Camera],
    rgb: np.ndarray,
    masks: np.ndarray,
    normals: np.ndarray | None,
    detector: LandmarkDetector | None,
    render_size: int,
) -> TrackingTargets:
    """rgb uint8 [T, C, H, W, 3], masks float [T, C, H, W], normals [T, C, H, W, 3] or None (NaN = unknown)."""
    frames, n_cams = masks.shape[:2]
    width, height = _render_size(cameras[0], render_size)
    mask_t = torch.from_numpy(np.ascontiguousarray(masks, np.float32)).flatten(0, 1)[
        :, None
    ]  # [T*C, 1, H, W]
    small_mask = F.interpolate(mask_t, size=(height, width), mode="area")
    if normals is None:
        small_normal = torch.zeros(frames * n_cams, 3, height, width)
        has_normal = torch.zeros(frames, n_cams, dtype=torch.bool)
    else:
        known = ~np.isnan(normals).any(axis=(2, 3, 4))  # [T, C]
        normal_t = (
            torch.from_numpy(np.nan_to_num(normals).astype(np.float32)).flatten(0, 1).permute(0, 3, 1, 2)
        )
        small_normal = F.normalize(F.interpolate(normal_t * mask_t, size=(height, width), mode="area"), dim=1)
        has_normal = torch.from_numpy(known)
    landmarks = torch.zeros(frames, n_cams, 68, 2)
    found = torch.zeros(frames, n_cams, dtype=torch.bool)
    if detector is not None:
        for t in range(frames):
            for c in range(n_cams):
                points = detector(rgb[t, c])
                if points is not None:
                    landmarks[t, c], found[t, c] = torch.from_numpy(points), True
    return TrackingTargets(
        cameras,
        small_mask.reshape(frames, n_cams, height, width),
        small_normal.reshape(frames, n_cams, 3, height, width),
        has_normal,
        landmarks,
        found,
    )


def _camera_tensors(cameras: list[Camera]) -> tuple[Tensor, Tensor]:
    w2c = torch.tensor(np.stack([c.world_to_cam for c in cameras]), dtype=torch.float32)  # [C, 4, 4]
    K = torch.tensor(np.stack([c.K for c in cameras]), dtype=torch.float32)  # [C, 3, 3]
    return w2c, K


def project(points: Tensor, w2c: Tensor, K: Tensor) -> Tensor:
    """World points [T, P, 3] into C cameras -> pixels [T, C, P, 2]."""
    cam = torch.einsum("cij,tpj->tcpi", w2c[:, :3, :3], points) + w2c[None, :, None, :3, 3]
    pix = torch.einsum("cij,tcpj->tcpi", K, cam)
    return pix[..., :2] / pix[..., 2:].clamp_min(1e-6)


def landmark_loss(landmarks3d: Tensor, targets: TrackingTargets, w2c: Tensor, K: Tensor) -> Tensor:
    """Robust mean reprojection error in units of the image width, over the detected faces."""
    if not bool(targets.has_landmarks.any()):
        return landmarks3d.new_zeros(())
    width = torch.tensor([c.width for c in targets.cameras], dtype=torch.float32)[None, :, None]  # [1, C, 1]
    error = (project(landmarks3d, w2c, K) - targets.landmarks).norm(dim=-1) / width  # [T, C, 68]
    robust = torch.sqrt(error**2 + 1e-6)
    weight = torch.ones(68)
    weight[CONTOUR] = 0.3
    per_view = (robust * weight).sum(-1) / weight.sum()  # [T, C]
    valid = targets.has_landmarks.float()
    return (per_view * valid).sum() / valid.sum()


def smoothness(sequence: TrackedSequence, previous: FlameParams | None = None) -> Tensor:
    """Mean squared change between consecutive frames, from ``previous`` (the frame before, held) on."""
    per_frame = sequence.per_frame()
    if previous is not None:
        per_frame = [
            torch.cat([getattr(previous, n)[-1:].detach(), p])
            for n, p in zip(PER_FRAME, per_frame, strict=True)
        ]
    terms = [((p[1:] - p[:-1]) ** 2).sum(-1).mean() for p in per_frame if p.shape[0] > 1]
    return torch.stack(terms).sum() if terms else sequence.rotation.new_zeros(())


def track(
    model: FlameModel,
    targets: TrackingTargets,
    config: TrackingConfig,
    init: FlameParams | None = None,
    previous: FlameParams | None = None,
    fit_shape: bool = True,
) -> FlameParams:
    """Fit FLAME parameters to the targets of T frames; returns T frames (shape and scale shared).

    ``previous``: the tracked frame just before these (held; smoothness reaches across the border).
    ``fit_shape=False`` holds the shape at ``init``'s (fitted once per sequence, shared by its chunks).
    """
    frames, n_cams = targets.masks.shape[:2]
    sequence = TrackedSequence(frames, model, init)
    sequence.shape.requires_grad_(fit_shape)
    w2c, K = _camera_tensors(targets.cameras)
    height, width = targets.masks.shape[-2:]
    small = [c.resized(width, height) for c in targets.cameras]
    w2c_small, K_small = _camera_tensors(small)
    discs = mesh_gaussians(len(model.faces))
    generator = torch.Generator().manual_seed(config.seed)

    def regularizers() -> Tensor:
        return (
            config.smooth_weight * smoothness(sequence, previous)
            + config.prior_weight * (sequence.shape.pow(2).sum() + sequence.expression.pow(2).sum(-1).mean())
            + config.neck_weight * sequence.neck.pow(2).sum(-1).mean()
        )

    def run(steps: int, parameters: list[Tensor], with_renders: bool) -> None:
        optimizer = torch.optim.Adam(parameters, lr=config.render_lr if with_renders else config.lr)
        for _ in range(steps):
            output = model(sequence.params())
            loss = config.landmark_weight * landmark_loss(output.landmarks, targets, w2c, K) + regularizers()
            if with_renders:
                picks = torch.randint(n_cams, (frames, config.views_per_step), generator=generator)
                for t, c in ((frame, int(cam)) for frame in range(frames) for cam in picks[frame]):
                    image = render_bound(
                        discs, output.vertices[t], model.faces, w2c_small[c], K_small[c], width, height
                    )
                    mask = targets.masks[t, c]
                    view_loss = config.silhouette_weight * (image.alpha - mask).abs().mean()
                    if targets.has_normal[t, c]:
                        view_loss = view_loss + config.normal_weight * normal_loss(
                            image.normal, image.alpha, targets.normals[t, c], (mask > 0.5).float()
                        )
                    loss = loss + view_loss / config.views_per_step
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    free = [p for p in sequence.parameters() if p.requires_grad]
    run(config.rigid_steps, [sequence.rotation, sequence.translation], with_renders=False)
    run(config.landmark_steps, free, with_renders=False)
    run(config.steps, free, with_renders=True)
    with torch.no_grad():
        result = sequence.params()
        return FlameParams(**{k: v.detach().clone() for k, v in vars(result).items()})


TargetLoader = Callable[[Sequence[int]], TrackingTargets]  # frame indices -> their targets (loaded on demand)


class ChunkCheckpoints:
    """A folder of finished pieces of one sequence's tracking: ``identity.npz`` and ``chunk-{start:05d}.npz``
    (NeRSemble names, written atomically), under a ``meta.json`` fingerprint of the run. A folder written by a
    different config, sequence length or initial value is stale and cleared, never reused."""

    def __init__(self, folder: Path, fingerprint: dict):
        self.folder = Path(folder)
        meta = self.folder / "meta.json"
        if meta.is_file() and settings_differences(read_json(meta), fingerprint):
            shutil.rmtree(self.folder)
        if not meta.is_file():
            write_json(meta, fingerprint)

    def load(self, name: str, model: FlameModel) -> FlameParams | None:
        path = self.folder / f"{name}.npz"
        if not path.is_file():
            return None
        with np.load(path) as data:
            return FlameParams.from_numpy_dict(dict(data), model.n_shape, model.n_expr)

    def save(self, name: str, params: FlameParams) -> None:
        frame_folder.write_tracking(self.folder / f"{name}.npz", params)


def _fingerprint(config: TrackingConfig, frames: int, init: FlameParams | None) -> dict:
    digest = None
    if init is not None:
        digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in vars(init).values())).hexdigest()
    return {"config": config.model_dump(), "frames": frames, "init_sha256": digest}


def _start(
    frames: Sequence[int],
    shape: Tensor,
    scale: Tensor,
    init: FlameParams | None,
    previous: FlameParams | None,
    model: FlameModel,
) -> FlameParams:
    """Initial value of a chunk: the given tracking, else the previous chunk's last frame, else neutral."""
    n = len(frames)
    if init is not None:
        start = init[list(frames)]  # type: ignore[index] - tensors take a list of frames
    elif previous is not None:
        start = FlameParams(**{k: v[-1:].expand(n, -1).clone() for k, v in vars(previous).items()})
    else:
        start = FlameParams.zeros(n, model.n_shape, model.n_expr)
    start.shape, start.scale = shape.expand(n, -1).clone(), scale.expand(n, -1).clone()
    return start


def track_sequence(
    model: FlameModel,
    frames: int,
    load_targets: TargetLoader,
    config: TrackingConfig,
    init: FlameParams | None = None,
    checkpoints: Path | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
    progress: bool = False,
) -> FlameParams:
    """Track ``frames`` frames in chunks of ``config.chunk_frames``, loading each chunk's targets on demand.

    ``init`` (e.g. an external tracker's result) is the initial value; ``checkpoints`` a folder for finished
    chunks, so a rerun resumes after the last one; ``on_chunk(done, total)`` is called after each chunk.
    """
    if init is not None and init.batch_size != frames:
        raise ValueError(f"tracking init has {init.batch_size} frames, the sequence {frames}")
    chunks = [range(s, min(s + config.chunk_frames, frames)) for s in range(0, frames, config.chunk_frames)]
    store = ChunkCheckpoints(checkpoints, _fingerprint(config, frames, init)) if checkpoints else None
    load = (lambda name: store.load(name, model)) if store else (lambda name: None)  # noqa: E731
    save = store.save if store else (lambda name, params: None)  # noqa: E731
    shape = init.shape[:1] if init is not None else torch.zeros(1, model.n_shape)
    scale = init.scale[:1] if init is not None else torch.ones(1, 1)
    if len(chunks) > 1:  # one shape for every chunk, fitted on frames spread over the sequence
        identity = load("identity")
        if identity is None:
            picks = np.unique(
                np.linspace(0, frames - 1, min(config.identity_frames, frames)).round().astype(int)
            )
            start = _start(picks.tolist(), shape, scale, init, None, model)
            identity = track(
                model, load_targets(picks.tolist()), config.model_copy(update={"smooth_weight": 0.0}), start
            )[:1]
            save("identity", identity)
        shape = identity.shape[:1]
    bar = progress_bar(len(chunks), "tracking chunks", enabled=progress)
    results: list[FlameParams] = []
    for index, chunk in enumerate(chunks):
        done = load(f"chunk-{chunk.start:05d}")
        if done is None:
            previous = results[-1] if results else None
            start = _start(chunk, shape, scale, init, previous, model)
            chunk_config = config.model_copy(
                update={"seed": config.seed + chunk.start}
            )  # the same draws whether resumed or not
            done = track(
                model, load_targets(chunk), chunk_config, start, previous, fit_shape=len(chunks) == 1
            )
            save(f"chunk-{chunk.start:05d}", done)
        results.append(done)
        bar.update(1)
        if on_chunk is not None:
            on_chunk(index + 1, len(chunks))
    bar.close()
    return FlameParams(**{k: torch.cat([getattr(r, k) for r in results]) for k in vars(results[0])})


def track_frame_folder(
    root: str | Path,
    subject: str,
    sequence: str,
    model: FlameModel,
    config: TrackingConfig,
    cameras: list[str] | None = None,
    detector: LandmarkDetector | None = None,
    init: FlameParams | None = None,
    checkpoints: Path | None = None,
    progress: bool = False,
) -> FlameParams:
    """Track one sequence of a frame folder (every camera, or ``cameras``) from its rgb, mask and normal maps,
    reading one chunk of frames at a time; ``checkpoints``: a folder that makes a rerun resume (see
    :func:`track_sequence`)."""
    root = Path(root)
    rig = frame_folder.read_cameras(root / "cameras" / subject / f"{sequence}.json")
    serials, frame_ids = frame_folder.sequence_index(root, subject, sequence, cameras)
    if frame_ids != list(range(len(frame_ids))):
        raise frame_folder.FrameFolderError(
            f"{root}/rgb/{subject}/{sequence}: frames must be 0..T-1, got {frame_ids}"
        )
    missing = [s for s in serials if s not in rig]
    if missing:
        raise frame_folder.FrameFolderError(f"{root}/cameras/{subject}/{sequence}.json: no camera {missing}")
    detector = detector or LandmarkDetector()

    def load_targets(frames: Sequence[int]) -> TrackingTargets:
        images = frame_folder.read_frames(root, subject, sequence, serials, frames=set(frames))
        height, width = images[0].rgb.shape[:2]
        shape = (len(frames), len(serials))
        rgb = np.zeros(shape + (height, width, 3), np.uint8)
        masks = np.zeros(shape + (height, width), np.float32)
        normals = np.full(shape + (height, width, 3), np.nan, np.float32)
        row = {frame: t for t, frame in enumerate(frames)}
        for im in images:
            t, c = row[im.frame], serials.index(im.camera)
            rgb[t, c] = from_float(im.rgb)
            masks[t, c] = im.mask
            if im.normal is not None:
                normals[t, c] = im.normal
        return build_targets([rig[s] for s in serials], rgb, masks, normals, detector, config.render_size)

    return track_sequence(model, len(frame_ids), load_targets, config, init, checkpoints, progress=progress)


def rotation_error_deg(a: Tensor, b: Tensor, to_matrix: Callable[[Tensor], Tensor] = rodrigues) -> Tensor:
    """Geodesic angle [T] in degrees between rotations a and b [T, 3] (axis-angle unless ``to_matrix`` says)."""
    relative = to_matrix(a).transpose(1, 2) @ to_matrix(b)
    cos = ((relative.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cos))


def tracking_errors(estimated: FlameParams, truth: FlameParams) -> dict[str, float]:
    """Max angle errors of global rotation and jaw, and the Pearson correlation of all expression coefficients."""
    expr_est, expr_gt = estimated.expression.flatten(), truth.expression.flatten()
    corr = torch.corrcoef(torch.stack([expr_est, expr_gt]))[0, 1]
    return {
        "rotation_deg_max": float(
            rotation_error_deg(estimated.rotation, truth.rotation, euler_xyz_matrix).max()
        ),
        "jaw_deg_max": float(rotation_error_deg(estimated.jaw, truth.jaw).max()),
        "expression_corr": float(corr),
    }
