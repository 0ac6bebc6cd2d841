"""Procedural capture sessions: the NeRSemble v2 and SynthHuman layouts rendered from the procedural head.

This is the demo and test data of the toolkit. Every file is written in the real layouts so the same
readers and packers run on it, and exact ground truth (FLAME parameters, camera-space normals) sits
beside it. One Ray work unit per subject and per chunk of synthetic samples; each unit commits
atomically, so an interrupted ``synth`` resumes and a finished one does no work.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from pydantic import model_validator

from geodiff4d.core.config import StrictConfig
from geodiff4d.core.errors import UserError
from geodiff4d.core.io.images import from_float, write_jpeg
from geodiff4d.core.io.video import write_video
from geodiff4d.core.jobs import CommitLog, JobReport, WorkUnit, run_units
from geodiff4d.core.runtime import connect
from geodiff4d.core.settings_match import require_same_settings
from geodiff4d.datasets.cameras import NERSEMBLE_LAYOUT, Camera, look_at_camera, nersemble_rig
from geodiff4d.datasets.flame import FlameModel, FlameParams
from geodiff4d.datasets.flame_tracking import TRACKING_V2, write_nersemble_tracking, write_npz
from geodiff4d.datasets.nersemble import write_camera_params
from geodiff4d.datasets.normal_maps import encode_normal_png
from geodiff4d.datasets.procedural_head import procedural_head_model
from geodiff4d.datasets.render import render_head
from geodiff4d.datasets.synthhuman import write_synthhuman_sample
from geodiff4d.datasets.textures import skin_texture

FPS = 25
SEQUENCE_NAMES = ("EXP-1-head", "EMO-1-shout+laugh", "SEN-01-cramp_small_danger", "FREE")
SYNTHETIC_CHUNK = 8


class SynthSpecError(UserError, ValueError):
    """A procedural data set spec out of range, or an output folder written with another spec."""


class SynthSpec(StrictConfig):
    subjects: int = 2
    sequences: int = 1
    frames: int = 8
    cameras: int = 16
    resolution: int = 256
    synthetic: int = 16
    seed: int = 0

    config_error: ClassVar[type[UserError]] = SynthSpecError

    @model_validator(mode="after")
    def _in_range(self) -> SynthSpec:
        if self.resolution % 2:
            raise SynthSpecError(f"resolution must be even for H.264 video, got {self.resolution}")
        if not 1 <= self.cameras <= 16:
            raise SynthSpecError(f"cameras must be between 1 and 16 (the NeRSemble rig), got {self.cameras}")
        if not 1 <= self.sequences <= len(SEQUENCE_NAMES):
            raise SynthSpecError(
                f"sequences must be between 1 and {len(SEQUENCE_NAMES)}, got {self.sequences}"
            )
        if min(self.subjects, self.frames) < 1 or self.synthetic < 0:
            raise SynthSpecError("subjects and frames must be positive and synthetic non-negative")
        return self


def synth_cameras(spec: SynthSpec) -> dict[str, Camera]:
    """The ``spec.cameras`` rig cameras closest to frontal (a small rig still sees the face), in rig order.

    Each camera gets its own intrinsics (focal lengths and principal point differ slightly per serial, as
    calibrated real cameras do), so reading one camera's K for another's fails a test instead of passing.
    """
    rig = nersemble_rig(width=spec.resolution, height=spec.resolution)
    by_angle = sorted(NERSEMBLE_LAYOUT, key=lambda row: row[1] ** 2 + row[2] ** 2)
    chosen = {serial for serial, _, _ in by_angle[: spec.cameras]}
    cameras = {}
    for index, (serial, camera) in enumerate(rig.items()):
        if serial in chosen:
            K = camera.K.copy()
            K[0, 0] *= 1 + 0.004 * index
            K[1, 1] *= 1 + 0.003 * index
            K[0, 2] += 0.01 * (index % 3 - 1) * camera.width
            K[1, 2] += 0.01 * (index % 5 - 2) * camera.height
            cameras[serial] = Camera(camera.world_to_cam, K, camera.width, camera.height)
    return cameras


def subject_id(index: int) -> str:
    return f"{index + 1:03d}"


def gt_normal_path(nersemble_root: Path, subject: str, sequence: str, serial: str, frame: int) -> Path:
    """Exact camera-space normals (our convention, 16-bit PNG) of one procedural frame."""
    return (
        nersemble_root
        / subject
        / "sequences"
        / sequence
        / "gt"
        / "normal"
        / f"cam_{serial}"
        / f"{frame:05d}.png"
    )


def gt_flame_path(nersemble_root: Path, subject: str, sequence: str) -> Path:
    """Exact FLAME parameters (model-sized, unpadded) used to render one procedural sequence."""
    return nersemble_root / subject / "sequences" / sequence / "gt" / "flame_params.npz"


def identity_shape(model: FlameModel, rng: np.random.Generator) -> torch.Tensor:
    return torch.as_tensor(rng.normal(0.0, 0.8, size=(1, model.n_shape)), dtype=torch.float32)


def sequence_params(
    model: FlameModel, shape: torch.Tensor, frames: int, rng: np.random.Generator
) -> FlameParams:
    """Smooth talking / smiling / jaw curves and a gentle head sway for one sequence."""
    t = np.arange(frames, dtype=np.float64) / FPS
    params = FlameParams.zeros(frames, model.n_shape, model.n_expr)
    params.shape = shape.expand(frames, -1).clone()
    phases = rng.uniform(0, 2 * np.pi, size=(model.n_expr, 2))
    rates = rng.uniform(0.3, 1.2, size=model.n_expr)
    amplitude = 1.2 / (1.0 + np.arange(model.n_expr))
    expression = amplitude * np.sin(2 * np.pi * rates * t[:, None] + phases[:, 0])
    expression += 0.5 * amplitude * np.sin(2 * np.pi * 2 * rates * t[:, None] + phases[:, 1])
    params.expression = torch.as_tensor(expression, dtype=torch.float32)
    talking = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2.5, 4.0) * t + rng.uniform(0, 2 * np.pi))
    params.jaw[:, 0] = torch.as_tensor(0.25 * talking**2, dtype=torch.float32)
    sway = rng.uniform(0, 2 * np.pi, size=3)
    params.rotation[:, 0] = torch.as_tensor(0.12 * np.sin(2 * np.pi * 0.4 * t + sway[0]), dtype=torch.float32)
    params.rotation[:, 1] = torch.as_tensor(
        0.30 * np.sin(2 * np.pi * 0.25 * t + sway[1]), dtype=torch.float32
    )
    params.rotation[:, 2] = torch.as_tensor(0.05 * np.sin(2 * np.pi * 0.3 * t + sway[2]), dtype=torch.float32)
    return params


def background(camera: Camera, serial: str) -> np.ndarray:
    """A static studio-like backdrop per camera (vertical gradient, tinted by serial), float [H,W,3]."""
    tint = (int(serial) % 97) / 97.0
    ramp = np.linspace(0.75, 0.45, camera.height, dtype=np.float32)[:, None, None]
    colour = np.array([0.85, 0.85 + 0.1 * tint, 0.9], dtype=np.float32)
    return np.broadcast_to(ramp * colour, (camera.height, camera.width, 3)).copy()


def composite(render_rgb: torch.Tensor, mask: torch.Tensor, backdrop: np.ndarray) -> np.ndarray:
    rgb = render_rgb.permute(1, 2, 0).numpy()
    alpha = mask.numpy()[..., None]
    return rgb * alpha + backdrop * (1.0 - alpha)


class SynthJob:
    """Ray job: a unit is one subject (all sequences and cameras) or one chunk of SynthHuman samples."""

    def __init__(self, out: Path, spec: SynthSpec):
        self.out, self.spec = Path(out), spec

    def setup(self) -> None:
        self.model = procedural_head_model(seed=0)
        self.cameras = synth_cameras(self.spec)

    def run(self, unit: WorkUnit) -> dict:
        if unit.payload["kind"] == "subject":
            return self.write_subject(unit.payload["index"])
        return self.write_synthetic(unit.payload["start"], unit.payload["stop"])

    def write_subject(self, index: int) -> dict:
        spec, pid = self.spec, subject_id(index)
        final = self.out / "nersemble" / pid
        partial = final.with_name(f".{pid}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        rng = np.random.default_rng([spec.seed, index])
        shape = identity_shape(self.model, rng)
        texture = skin_texture(self.model, identity_seed=spec.seed * 100_003 + index)
        write_camera_params(partial / "calibration" / "camera_params.json", self.cameras, variant="benchmark")
        for serial, camera in self.cameras.items():
            write_jpeg(
                partial / "sequences" / "BACKGROUND" / f"image_{serial}.jpg",
                from_float(background(camera, serial)),
                quality=95,
            )
        for sequence in SEQUENCE_NAMES[: spec.sequences]:
            params = sequence_params(self.model, shape, spec.frames, rng)
            self.write_sequence(partial, sequence, params, texture)
        if final.exists():  # left by a run killed between rename and commit
            shutil.rmtree(final)
        partial.rename(final)
        return {"subject": pid, "frames": spec.sequences * spec.frames * len(self.cameras)}

    def write_sequence(self, root: Path, sequence: str, params: FlameParams, texture: np.ndarray) -> None:
        seq_dir = root / "sequences" / sequence
        frames = np.arange(self.spec.frames)
        write_nersemble_tracking(
            seq_dir / "tracking" / TRACKING_V2, params, frames
        )  # what the benchmark ships
        write_npz(gt_flame_path(root.parent, root.name, sequence), params.to_numpy_dict())
        for serial, camera in self.cameras.items():
            backdrop = background(camera, serial)
            rgb, alpha = [], []
            for frame in frames:
                render = render_head(self.model, params[int(frame)], camera, texture)
                rgb.append(from_float(composite(render.rgb, render.mask, backdrop)))
                alpha.append(from_float(render.mask.numpy()))
                normal_png = encode_normal_png(render.normal, render.mask)
                path = gt_normal_path(root.parent, root.name, sequence, serial, int(frame))
                _mkparent(path).write_bytes(normal_png)
            write_video(seq_dir / "images" / f"cam_{serial}.mp4", np.stack(rgb), fps=FPS)
            write_video(seq_dir / "alpha_maps" / f"cam_{serial}.mp4", np.stack(alpha), fps=FPS)

    def write_synthetic(self, start: int, stop: int) -> dict:
        root = self.out / "synthhuman"
        for index in range(start, stop):
            rng = np.random.default_rng([self.spec.seed, 1_000_000 + index])
            params = FlameParams.zeros(1, self.model.n_shape, self.model.n_expr)
            params.shape = identity_shape(self.model, rng)
            params.expression = torch.as_tensor(
                rng.normal(0, 1.0, (1, self.model.n_expr)), dtype=torch.float32
            )
            params.jaw[:, 0] = float(rng.uniform(0.0, 0.3))
            params.rotation = torch.as_tensor(
                rng.uniform([-0.3, -0.7, -0.1], [0.3, 0.7, 0.1])[None], dtype=torch.float32
            )
            camera = synthetic_camera(rng, self.spec.resolution)
            texture = skin_texture(self.model, identity_seed=int(rng.integers(1 << 30)))
            render = render_head(self.model, params, camera, texture)
            backdrop = np.broadcast_to(
                rng.uniform(0.1, 0.9, 3).astype(np.float32), (camera.height, camera.width, 3)
            )
            write_synthhuman_sample(
                root,
                index,
                rgb=from_float(composite(render.rgb, render.mask, backdrop)),
                alpha=from_float(render.mask.numpy()),
                depth_m=render.depth.numpy(),
                normal_ours=render.normal.permute(1, 2, 0).numpy(),
                K=camera.K,
            )
        return {"synthetic": stop - start}


def synthetic_camera(rng: np.random.Generator, resolution: int) -> Camera:
    """A SynthHuman-like face crop camera: frontal hemisphere, 0.5-0.8 m, head filling the frame."""
    yaw, pitch = rng.uniform(-0.6, 0.6), rng.uniform(-0.3, 0.3)
    distance = rng.uniform(0.5, 0.8)
    eye = distance * np.array([np.sin(yaw) * np.cos(pitch), np.sin(pitch), np.cos(yaw) * np.cos(pitch)])
    focal = resolution * distance / 0.3
    K = np.array([[focal, 0, resolution / 2], [0, focal, resolution / 2], [0, 0, 1]])
    return look_at_camera(
        eye, target=np.zeros(3), up=np.array([0.0, 1.0, 0.0]), K=K, width=resolution, height=resolution
    )


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def synth_units(spec: SynthSpec) -> list[WorkUnit]:
    units = [
        WorkUnit(f"subject-{subject_id(i)}", {"kind": "subject", "index": i}) for i in range(spec.subjects)
    ]
    for start in range(0, spec.synthetic, SYNTHETIC_CHUNK):
        stop = min(start + SYNTHETIC_CHUNK, spec.synthetic)
        units.append(WorkUnit(f"synthhuman-{start:07d}", {"kind": "synthetic", "start": start, "stop": stop}))
    return units


def synthesize(
    out: str | Path, spec: SynthSpec, *, workers: int = 2, address: str | None = None, progress: bool = True
) -> JobReport:
    """Write ``out/nersemble`` and ``out/synthhuman``; committed units are skipped on rerun."""
    out = Path(out)
    _check_spec(out, spec)
    connect(address)
    commits = CommitLog(out / ".commits")
    return run_units(
        SynthJob(out, spec), synth_units(spec), commits, workers=workers, desc="synth", progress=progress
    )


def _check_spec(out: Path, spec: SynthSpec) -> None:
    """Resuming into a folder written with another spec would mix data sets: refuse it."""
    require_same_settings(out / "synth_spec.json", spec.model_dump(), error=SynthSpecError)
