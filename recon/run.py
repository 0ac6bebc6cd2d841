"""Reconstruction and rendering runs: one Ray work unit per subject, resumable from per-subject checkpoints.

``reconstruct`` fits one avatar per subject of a frame folder; each unit checkpoints while it trains, so a
killed worker's retry resumes from its last checkpoint instead of starting over, and a committed subject
is never redone. ``render_avatar`` renders a fitted avatar into a frame folder that ``geodiff4d eval`` scores.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator

from geodiff4d.core.config import StrictConfig, read_mapping, validate
from geodiff4d.core.errors import UserError
from geodiff4d.core.io.atomic import atomic_output
from geodiff4d.core.io.json_yaml import read_json, write_json
from geodiff4d.core.jobs import CommitLog, JobReport, WorkUnit, run_units
from geodiff4d.core.runtime import connect
from geodiff4d.datasets import frame_folder as frame_io
from geodiff4d.datasets.flame import FlameModel, FlameParams
from geodiff4d.datasets.flame_tracking import load_tracking as load_tracking_file
from geodiff4d.recon.binding import render_bound, to_world, triangle_frames
from geodiff4d.recon.color_init import init_colors
from geodiff4d.recon.fit import FitConfig, Fitter, FixedVertices, View, load_checkpoint, load_gaussians
from geodiff4d.recon.frame_store import FrameStore
from geodiff4d.recon.gaussians import BoundGaussians
from geodiff4d.recon.losses import psnr
from geodiff4d.recon.normals import shortest_axis
from geodiff4d.recon.ply import write_point_cloud_ply
from geodiff4d.recon.progress import FitProgress
from geodiff4d.recon.rasterize import pixel_size, resolution_dilation
from geodiff4d.recon.reenact import HEAD_POSES, reenact
from geodiff4d.recon.refine import HierarchicalDeformer, RefineConfig
from geodiff4d.recon.sh import n_coefficients
from geodiff4d.recon.tracking import TrackingConfig, track_frame_folder


class ReconConfig(StrictConfig):
    head_model: str = "procedural:0"  # "procedural:SEED" or a FLAME .pkl path
    steps: int = 3000
    per_face: int = 1
    sh_degree: int = 3  # the most the fit activates (one degree per FitConfig.sh_increase_every steps)
    seed: int = 0
    train_cameras: list[str] | None = None  # None: every camera of the frame folder
    holdout_camera: str | None = None  # left out of training (and tracking); its PSNR is the fit's progress
    progress_every: int = 100  # steps between progress PSNRs, TensorBoard scalars and preview images
    tracker: str = "file"  # "file": read `tracking`; "ours": fit FLAME to the frames (recon.tracking)
    tracking: str = "{root}/tracking/{subject}/{sequence}.npz"  # NeRSemble-format npz per sequence
    tracking_init: str | None = None  # tracker "ours": start from this npz (e.g. the `tracking` template)
    tracking_options: dict[str, Any] = Field(default_factory=dict)  # TrackingConfig overrides
    refine: dict[str, Any] | None = None  # RefineConfig overrides; None: the tracked meshes as they are
    init_colors: bool = True  # start each Gaussian at the colour the training views show it
    fit: dict[str, Any] = Field(default_factory=dict)  # FitConfig overrides

    @model_validator(mode="after")
    def _consistent(self) -> ReconConfig:
        if self.tracker not in ("file", "ours"):
            raise ValueError(f"ReconConfig.tracker must be 'file' or 'ours', got {self.tracker!r}")
        if self.progress_every < 1:
            raise ValueError(f"ReconConfig.progress_every must be at least 1, got {self.progress_every}")
        if self.tracking_init is not None and self.tracker != "ours":
            raise ValueError(
                "ReconConfig.tracking_init is the initial value of our tracker: set tracker: ours"
            )
        return self

    def cameras(self, root: Path, subject: str, sequence: str) -> list[str] | None:
        """The cameras one sequence trains (and tracks) on: ``train_cameras`` (None: all) less the held-out one."""
        if self.holdout_camera is None:
            return self.train_cameras
        serials = self.train_cameras or frame_io.sequence_index(root, subject, sequence)[0]
        return [s for s in serials if s != self.holdout_camera]

    def fit_config(self) -> FitConfig:
        return FitConfig(**{"steps": self.steps, "seed": self.seed, **self.fit})


def recon_config_from_mapping(raw: dict[str, Any], where: str | Path, prefix: str = "") -> ReconConfig:
    """A ReconConfig from a mapping; unknown or mistyped fields, in ``fit``, ``tracking_options`` and ``refine``
    too, fail here with the file (``where``) and field named rather than inside a worker an hour later."""
    config = validate(where, raw, ReconConfig, prefix=prefix)
    for section, schema in (
        ("fit", FitConfig),
        ("tracking_options", TrackingConfig),
        ("refine", RefineConfig),
    ):
        overrides = getattr(config, section)
        if overrides is not None:
            validate(where, overrides, schema, prefix=f"{prefix}.{section}" if prefix else section)
    return config


def load_recon_config(path: str | Path) -> ReconConfig:
    return recon_config_from_mapping(read_mapping(path), path)


def load_head_model(spec: str) -> FlameModel:
    if spec.startswith("procedural:"):
        from geodiff4d.datasets.procedural_head import procedural_head_model

        return procedural_head_model(int(spec.split(":", 1)[1]))
    return FlameModel.from_pkl(spec)


def load_tracking(path: Path, model: FlameModel) -> FlameParams:
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{path}: no FLAME tracking for this sequence (run tracking or pass an external npz)"
        )
    return load_tracking_file(path, model).params


def sequence_tracking(
    root: Path,
    subject: str,
    sequence: str,
    model: FlameModel,
    config: ReconConfig,
    cache: Path | None = None,
    progress: bool = False,
) -> FlameParams:
    """FLAME parameters of one sequence: an external tracker's npz, or our tracker (cached in ``cache``, its
    finished chunks in ``cache/{sequence}.chunks`` until the whole sequence is done)."""
    if config.tracker == "file":
        return load_tracking(
            Path(config.tracking.format(root=root, subject=subject, sequence=sequence)), model
        )
    path = cache / f"{sequence}.npz" if cache is not None else None
    if path is not None and path.is_file():
        return load_tracking(path, model)
    init = None
    if config.tracking_init is not None:
        init = load_tracking(
            Path(config.tracking_init.format(root=root, subject=subject, sequence=sequence)), model
        )
    chunks = cache / f"{sequence}.chunks" if cache is not None else None
    params = track_frame_folder(
        root,
        subject,
        sequence,
        model,
        TrackingConfig(**config.tracking_options),
        cameras=config.cameras(root, subject, sequence),
        init=init,
        checkpoints=chunks,
        progress=progress,
    )
    if path is not None:
        frame_io.write_tracking(path, params)
        shutil.rmtree(chunks)
    return params


def concat_params(params: list[FlameParams]) -> FlameParams:
    return FlameParams(**{name: torch.cat([getattr(p, name) for p in params]) for name in vars(params[0])})


@dataclass
class SubjectData:
    frame_vertices: torch.Tensor  # [T, V, 3] over all sequences
    views: FrameStore  # compact; decoded one view at a time
    sequences: dict[str, int]  # sequence -> number of frames
    params: dict[str, FlameParams]
    pixel_m: float  # metres per pixel at the head in the training views (median): rendering at other sizes needs it

    @property
    def all_params(self) -> FlameParams:
        return concat_params(list(self.params.values()))


def load_subject(
    root: Path,
    subject: str,
    model: FlameModel,
    config: ReconConfig,
    tracking_cache: Path | None = None,
    progress: bool = False,
) -> SubjectData:
    """Every training view of the subject (compact: images are read and stored one at a time) and the FLAME
    meshes of its frames, tracking each sequence first when our tracker is configured."""
    vertices, views, counts, all_params, pixels = [], FrameStore(), {}, {}, []
    for sequence in frame_io.sequences(root, subject):
        cameras = frame_io.read_cameras(root / "cameras" / subject / f"{sequence}.json")
        params = sequence_tracking(root, subject, sequence, model, config, tracking_cache, progress)
        with torch.no_grad():
            seq_vertices = model(params).vertices  # [T, V, 3]
        offset = sum(counts.values())
        counts[sequence], all_params[sequence] = seq_vertices.shape[0], params
        vertices.append(seq_vertices)
        for image in frame_io.iter_frames(root, subject, sequence, config.cameras(root, subject, sequence)):
            if image.frame >= seq_vertices.shape[0]:
                raise frame_io.FrameFolderError(
                    f"{root}/rgb/{subject}/{sequence}: frame {image.frame} has no tracking"
                )
            views.add_image(offset + image.frame, cameras[image.camera], image)
            pixels.append(_pixel_m(cameras[image.camera], seq_vertices[image.frame].mean(0)))
    if not len(views):
        raise frame_io.FrameFolderError(f"{root}/rgb/{subject}: no frames of the training cameras")
    return SubjectData(torch.cat(vertices), views, counts, all_params, float(np.median(pixels)))


def _pixel_m(camera, point: torch.Tensor) -> float:
    # torch.tensor copies: the camera's arrays are read-only, which torch.as_tensor warns about
    return pixel_size(
        torch.tensor(camera.world_to_cam, dtype=torch.float32),
        torch.tensor(camera.K, dtype=torch.float32),
        point.float(),
    )


def make_deformer(model: FlameModel, params: FlameParams, config: ReconConfig) -> torch.nn.Module:
    """The tracked meshes as they are, or the hierarchical refinement on top of them."""
    if config.refine is None:
        with torch.no_grad():
            return FixedVertices(model(params).vertices)
    return HierarchicalDeformer(model, params, RefineConfig(**config.refine))


def new_fitter(
    data: SubjectData, model: FlameModel, config: ReconConfig, checkpoint: Path | None = None
) -> Fitter:
    """A fitter for the subject, resumed from ``checkpoint`` when that file exists."""
    fit_config = config.fit_config()
    deformer = make_deformer(model, data.all_params, config)
    faces = deformer.faces if isinstance(deformer, HierarchicalDeformer) else model.faces
    if checkpoint is not None and checkpoint.is_file():
        return Fitter.resume(checkpoint, deformer, faces, data.views, fit_config)
    generator = torch.Generator().manual_seed(config.seed)
    gaussians = BoundGaussians.on_faces(len(faces), config.per_face, generator, config.sh_degree)
    if config.init_colors:
        with torch.no_grad():
            init_colors(gaussians, deformer, faces, data.views)
    return Fitter(gaussians, deformer, faces, data.views, fit_config)


def probe_views(
    root: Path, subject: str, data: SubjectData, config: ReconConfig
) -> tuple[Sequence[View], str]:
    """Views whose PSNR reports the fit's progress, and their name: up to 4 frames of the first sequence seen
    by the held-out camera, else 4 training views spread over the subject."""
    if config.holdout_camera is None:
        return data.views[:: max(1, len(data.views) // 4)][:4], "train_views"
    sequence = next(iter(data.sequences))
    frames = set(np.linspace(0, data.sequences[sequence] - 1, 4).round().astype(int).tolist())
    cameras = frame_io.read_cameras(root / "cameras" / subject / f"{sequence}.json")
    probe = FrameStore()
    for image in frame_io.iter_frames(root, subject, sequence, [config.holdout_camera], frames=frames):
        probe.add_image(image.frame, cameras[image.camera], image)
    if not len(probe):
        raise frame_io.FrameFolderError(
            f"{root}/rgb/{subject}/{sequence}: no frames of holdout_camera {config.holdout_camera}"
        )
    return probe, "holdout"


class ReconJob:
    """Ray work-unit job: fit one subject's avatar (resuming from its checkpoint) and export it."""

    def __init__(self, input_root: str | Path, out: str | Path, config: ReconConfig, progress: bool = True):
        self.input_root, self.out, self.config, self.progress = Path(input_root), Path(out), config, progress

    def setup(self) -> None:
        self.model = load_head_model(self.config.head_model)

    def after_step(self, subject: str, step: int) -> None:
        """Hook called after every optimization step (progress reporting, fault injection in tests)."""

    def run(self, unit: WorkUnit) -> dict[str, Any]:
        subject, config, started = unit.id, self.config, time.perf_counter()
        folder = self.out / subject
        data = load_subject(self.input_root, subject, self.model, config, folder / "tracking", self.progress)
        checkpoint = folder / "checkpoint.safetensors"
        fitter = new_fitter(data, self.model, config, checkpoint)
        resumed_from = fitter.step_index
        progress = FitProgress(
            folder,
            subject,
            config.steps,
            resumed_from,
            *probe_views(self.input_root, subject, data, config),
            config.progress_every,
            enabled=self.progress,
        )

        def on_step(step: int, loss: float) -> None:
            progress.on_step(fitter, step, loss)
            self.after_step(subject, step)

        fitter.run(config.steps, checkpoint=checkpoint, on_step=on_step)
        progress.close()
        export_avatar(folder, fitter, self.model, data, config)
        with torch.no_grad():
            scores = [
                psnr(fitter.render(v.frame, v.world_to_cam, v.K, v.rgb.shape[-1], v.rgb.shape[-2]).rgb, v.rgb)
                for v in data.views[:8]
            ]
        return {
            "subject": subject,
            "steps": fitter.step_index,
            "resumed_from_step": resumed_from,
            "gaussians": len(fitter.gaussians),
            "train_psnr": float(np.mean(scores)),
            f"{progress.probe_name}_psnr": progress.last_psnr,
            "final_loss": fitter.losses[-1] if fitter.losses else None,
            "seconds": round(time.perf_counter() - started, 2),
        }


def export_avatar(
    folder: Path, fitter: Fitter, model: FlameModel, data: SubjectData, config: ReconConfig
) -> None:
    """avatar.safetensors (the fit), point_cloud.ply (canonical pose), binding.npz, flame/{sequence}.npz (the
    tracking the fit started from) and, with FLAME residuals, flame_refined/{sequence}.npz."""
    fitter.save(folder / "avatar.safetensors")
    gaussians, deformer = fitter.gaussians, fitter.deformer
    first = next(iter(data.params.values()))
    canonical = FlameParams.zeros(1, model.n_shape, model.n_expr)
    canonical.shape, canonical.scale = first.shape[:1].clone(), first.scale[:1].clone()
    with torch.no_grad():
        vertices = model(canonical).vertices[0]
        if isinstance(deformer, HierarchicalDeformer):
            vertices = deformer.subdivided(vertices)
        means, quats, scales = to_world(gaussians, triangle_frames(vertices, fitter.faces))
        active_rest = gaussians.sh_rest.clone()
        active_rest[:, n_coefficients(gaussians.active_sh_degree) - 1 :] = 0  # viewers render every degree
        write_point_cloud_ply(
            folder / "point_cloud.ply",
            means.numpy(),
            shortest_axis(quats, scales).numpy(),
            gaussians.sh_dc.numpy(),
            active_rest.numpy(),
            gaussians.opacity_logit.numpy(),
            torch.log(scales).numpy(),
            quats.numpy(),
        )
    with atomic_output(folder / "binding.npz") as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            face_index=gaussians.face_index.numpy(),
            **{k: v.numpy() for k, v in gaussians.tensors().items()},
        )
    offset = 0
    for sequence, params in data.params.items():
        frame_io.write_tracking(folder / "flame" / f"{sequence}.npz", params)
        if isinstance(deformer, HierarchicalDeformer) and deformer.config.flame_residuals:
            with torch.no_grad():
                refined = concat_params([deformer.params(offset + t) for t in range(params.batch_size)])
            frame_io.write_tracking(folder / "flame_refined" / f"{sequence}.npz", refined)
        offset += params.batch_size
    avatar = {"config": config.model_dump(), "sequences": data.sequences, "pixel_m": data.pixel_m}
    write_json(folder / "avatar.json", avatar, indent=1, sort_keys=False)


def reconstruct(
    input: str | Path,
    out: str | Path,
    subjects: list[str] | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0,
    address: str | None = None,
    config: ReconConfig | None = None,
    progress: bool = True,
    cpus_per_worker: float | None = None,
) -> JobReport:
    """Fit an avatar per subject of the frame folder ``input`` into ``out/{subject}``; resumable.
    Each actor runs ``cpus_per_worker`` torch threads (default: Ray's CPUs divided by the workers)."""
    config = config or ReconConfig()
    subjects = subjects or frame_io.subjects(Path(input))
    connect(address)
    job = ReconJob(input, out, config, progress)
    units = [WorkUnit(s) for s in subjects]
    return run_units(
        job,
        units,
        CommitLog(Path(out) / "_commits"),
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
        desc="recon subjects",
        progress=progress,
    )


def _driving_params(
    avatar: Path,
    sequences: dict[str, int],
    sequence: str,
    expressions_npz: str | Path | None,
    model: FlameModel,
    head_pose: str,
    deformer_state: dict[str, torch.Tensor],
) -> tuple[FlameParams, range]:
    """FLAME params and frames to render: the avatar's own, or driven by expressions_npz."""
    if expressions_npz is None:
        if sequence not in sequences:
            raise KeyError(f"{avatar}/avatar.json: no sequence {sequence!r} (has {list(sequences)})")
        params = concat_params([load_tracking(avatar / "flame" / f"{s}.npz", model) for s in sequences])
        names = list(sequences)
        first = sum(sequences[s] for s in names[: names.index(sequence)])
        return params, range(first, first + sequences[sequence])
    own = load_tracking(avatar / "flame" / f"{next(iter(sequences))}.npz", model)
    params = reenact(own, load_tracking(Path(expressions_npz), model), head_pose)
    per_frame = [
        k for k in deformer_state if k.startswith(("residual_", "tracked_", "codes", "frame_vertices"))
    ]
    for key in per_frame:  # belongs to the training frames
        deformer_state.pop(key)
    return params, range(params.batch_size)


def _render_cameras(
    gaussians: BoundGaussians,
    deformer: torch.nn.Module,
    faces: torch.Tensor,
    frames: range,
    cameras: dict,
    pixel_m: float,
    backend: str,
    device: str,
    out: Path,
    subject: str,
    sequence: str,
) -> tuple[int, float]:
    """Render and write every frame from every camera; returns the frame count and the seconds spent rendering."""
    rendered, seconds = 0, 0.0
    with torch.no_grad():
        meshes = [(deformer(f), deformer.attribute_residuals(f, gaussians)) for f in frames]
        for serial, cam in cameras.items():
            w2c, K = (torch.tensor(m, dtype=torch.float32, device=device) for m in (cam.world_to_cam, cam.K))
            # avatars from before pixel_m was recorded render as they always did
            dilation = resolution_dilation(pixel_m, pixel_size(w2c, K, meshes[0][0].mean(0)))
            for index, (vertices, residuals) in enumerate(meshes):
                start = time.perf_counter()
                image = render_bound(
                    gaussians,
                    vertices,
                    faces,
                    w2c,
                    K,
                    cam.width,
                    cam.height,
                    backend=backend,
                    residuals=residuals,
                    dilation=dilation,
                )
                seconds += time.perf_counter() - start
                normal = image.normal / image.alpha.clamp_min(1e-6)[None]
                frame_io.write_frame(
                    out, subject, sequence, serial, index, image.rgb.cpu(), image.alpha.cpu(), normal.cpu()
                )
                rendered += 1
    return rendered, seconds


def _avatar_meta(avatar: Path) -> dict:
    """The avatar folder's ``avatar.json`` (config, sequences, pixel size); a clear error when it is none."""
    if not (avatar / "avatar.json").is_file():
        raise UserError(
            f"{avatar}: not an avatar folder (no avatar.json; geodiff4d recon writes one per subject)"
        )
    return read_json(avatar / "avatar.json")


def render_avatar(
    avatar: str | Path,
    cameras_json: str | Path,
    expressions_npz: str | Path | None,
    out: str | Path,
    sequence: str | None = None,
    backend: str = "auto",
    head_pose: str = "driver",
) -> float:
    """Render ``avatar`` (a recon output folder) from every camera of ``cameras_json`` for every frame of
    ``expressions_npz`` (NeRSemble tracking names; default: the avatar's first tracked sequence, refinement
    included) into the frame folder ``out``, which ``geodiff4d eval`` scores; the parameters it was driven
    with go to ``out/tracking``. Returns rendered frames/s.

    Driven by another tracking, the avatar keeps its shape and scale and takes the driver's per-frame motion,
    its head pose as ``head_pose`` says (:data:`geodiff4d.recon.reenact.HEAD_POSES`). A refined avatar keeps
    its networks (U-Net offsets, attribute MLP, fed the new FLAME expression) but has no per-frame FLAME
    residuals for the new frames.
    """
    if head_pose not in HEAD_POSES:
        raise UserError(f"head pose must be one of {HEAD_POSES}, got {head_pose!r}")
    avatar = Path(avatar)
    meta = _avatar_meta(avatar)
    config = recon_config_from_mapping(meta["config"], avatar / "avatar.json", prefix="config")
    model = load_head_model(config.head_model)
    tensors, metadata = load_checkpoint(avatar / "avatar.safetensors")
    gaussians = load_gaussians(tensors, metadata)
    sequences = meta["sequences"]  # sequence -> frames, in training order
    sequence = sequence or (Path(expressions_npz).stem if expressions_npz else next(iter(sequences)))
    deformer_state = {k[len("deformer/") :]: v for k, v in tensors.items() if k.startswith("deformer/")}
    params, frames = _driving_params(
        avatar, sequences, sequence, expressions_npz, model, head_pose, deformer_state
    )
    deformer = make_deformer(model, params, config)
    deformer.load_state_dict(deformer_state, strict=False)
    faces = deformer.faces if isinstance(deformer, HierarchicalDeformer) else model.faces
    cameras = frame_io.read_cameras(Path(cameras_json))
    subject, out = avatar.name, Path(out)
    frame_io.write_cameras(out / "cameras" / subject / f"{sequence}.json", cameras)
    frame_io.write_tracking(
        frame_io.tracking_path(out, subject, sequence), params[frames.start : frames.stop]
    )
    device = "cuda" if backend != "torch" and torch.cuda.is_available() else "cpu"
    gaussians, faces, deformer = gaussians.to(device), faces.to(device), deformer.to(device)
    rendered, seconds = _render_cameras(
        gaussians,
        deformer,
        faces,
        frames,
        cameras,
        meta.get("pixel_m", 0.0),
        backend,
        device,
        out,
        subject,
        sequence,
    )
    return rendered / max(seconds, 1e-9)
