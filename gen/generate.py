"""`geodiff4d generate`: mass sampling from a spec on Ray actors that hold the pipeline, into a frame folder.

Work units are (subject, temporal window, camera group). A unit denoises its window plus `sample.context`
context frames on each side (default: `overlap`), all of its views as one batch, with the sampler's
overlapping windows blended as always, and writes only the frames it owns; neighbouring units share the
context frames' noise, so they agree across the seam. Noise is drawn per (seed, subject, camera, frame) and
the scheduler's generator per (seed, subject, window, camera group), never from a worker, and CPU kernels are
chosen so the thread count (cores / workers) does not change the last bits: any number of workers gives the
same bytes.
Units commit through core.jobs, so a killed actor or a rerun redoes only uncommitted units.

The frame folder is what `geodiff4d recon` reads: rgb/normal/mask PNGs, cameras/ JSON, tracking/ npz (the
identity's shape with the driving's motion, NeRSemble names) and latents/ npz (expression latents).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geodiff4d.core.config import ConfigError
from geodiff4d.core.jobs import CommitLog, JobReport, WorkUnit, default_gpus_per_worker, run_units
from geodiff4d.core.runtime import connect
from geodiff4d.datasets.frame_folder import tracking_path, write_cameras, write_tracking
from geodiff4d.datasets.render import render_pose_map
from geodiff4d.gen.checkpoint import WEIGHTS
from geodiff4d.gen.generate_inputs import InputError, Resolver, SubjectInputs
from geodiff4d.gen.generate_spec import GenerateSpec, input_files, load_spec
from geodiff4d.gen.input_cache import read_cached, write_cached

STATE = "_generate"  # OUT/_generate/{inputs,commits}: resolved inputs and commit markers


def frame_noise(seed: int, subject: str, camera: str, frame: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The initial noise [C, h, w] of one (camera, frame): the same whichever unit or worker draws it."""
    state = np.random.SeedSequence([seed, zlib.crc32(subject.encode()), zlib.crc32(camera.encode()), frame])
    return torch.randn(
        shape, generator=torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0] >> 1))
    )


def unit_generator(seed: int, subject: str, start: int, group: int) -> torch.Generator:
    """The scheduler's generator of one unit (used by stochastic schedulers only)."""
    state = np.random.SeedSequence([seed, zlib.crc32(subject.encode()), start, group, 1])
    return torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0] >> 1))


def plan_units(inputs: SubjectInputs, frames_per_unit: int, cameras_per_unit: int) -> list[WorkUnit]:
    """Units of one subject; ids are `{subject}.f{start}-{stop}.c{group}` (subject names hold no dots)."""
    frames, serials = inputs.tracking.batch_size, list(inputs.cameras)
    units = []
    for start in range(0, frames, frames_per_unit):
        stop = min(start + frames_per_unit, frames)
        for group, first in enumerate(range(0, len(serials), cameras_per_unit)):
            units.append(
                WorkUnit(
                    f"{inputs.name}.f{start:05d}-{stop:05d}.c{group:03d}",
                    {
                        "subject": inputs.name,
                        "start": start,
                        "stop": stop,
                        "group": group,
                        "cameras": serials[first : first + cameras_per_unit],
                    },
                )
            )
    return units


class GenerateJob:
    """Ray work-unit job: the pipeline is loaded once per actor; each unit samples one window x camera group."""

    def __init__(self, run: Path, out: Path, seed: int, head_model: str, use_gpu: bool):
        self.run_folder, self.out, self.seed, self.head_model, self.use_gpu = (
            Path(run),
            Path(out),
            seed,
            head_model,
            use_gpu,
        )

    def setup(self) -> None:
        from geodiff4d.gen.model_run import load_run
        from geodiff4d.recon.run import load_head_model

        self.device = torch.device("cuda" if self.use_gpu else "cpu")  # core.jobs checked that torch sees it
        self.loaded = load_run(self.run_folder).to(self.device)
        self.head = load_head_model(self.head_model)
        self.subjects: dict[str, SubjectInputs] = {}

    def subject(self, name: str) -> SubjectInputs:
        if name not in self.subjects:
            self.subjects[name] = load_inputs(self.out, name)
        return self.subjects[name]

    def after_write(self, unit: WorkUnit) -> None:
        """Hook called once a unit's frames are written, before it returns (fault injection in tests)."""

    def run(self, unit: WorkUnit) -> dict[str, Any]:
        from geodiff4d.gen.pipeline import SampleOutput, denoise_views, latent_shape
        from geodiff4d.gen.sample_frames import write_camera_frames, write_latents

        started, p = time.time(), unit.payload
        inputs, loaded = self.subject(p["subject"]), self.loaded
        total, context = inputs.tracking.batch_size, loaded.cfg.sample.context_frames
        span = range(max(0, p["start"] - context), min(total, p["stop"] + context))  # owned frames + context
        cameras = p["cameras"]
        posemaps = torch.stack(
            [
                torch.stack([render_pose_map(self.head, inputs.tracking[t], inputs.cameras[c]) for t in span])
                for c in cameras
            ]
        )  # [N, T, 3, R, R]
        _, channels, _, height, width = latent_shape(loaded.codec, 1, 1, posemaps.shape[-2:])
        shape = (channels, height, width)
        noise = torch.stack(
            [
                torch.stack([frame_noise(self.seed, inputs.name, c, t, shape) for t in span], 1)
                for c in cameras
            ]
        )  # [N, C, T, h, w]
        result = denoise_views(
            loaded.model,
            loaded.codec,
            loaded.scheduler(),
            inputs.ref_rgb,
            inputs.ref_posemap,
            inputs.driving[span.start : span.stop],
            posemaps,
            noise,
            unit_generator(self.seed, inputs.name, p["start"], p["group"]),
            loaded.guidance,
        )
        own = slice(p["start"] - span.start, p["stop"] - span.start)
        frames = list(range(p["start"], p["stop"]))
        for i, camera in enumerate(cameras):
            view = SampleOutput(
                result.rgb[i, own].cpu(),
                None if result.normal is None else result.normal[i, own].cpu(),
                result.expression,
            )
            write_camera_frames(self.out, inputs.name, inputs.sequence, camera, frames, view)
        if p["start"] == 0 and p["group"] == 0:  # the latents depend on the driving frames only: one writer
            # in the weights' dtype (sample.bf16_weights): this runs outside the sampler's autocast
            with torch.no_grad():
                driving = inputs.driving.to(self.device, loaded.model.dtype)
                latents = loaded.model.expression_encoder.encode(driving).float()  # [T, K, d]
            write_latents(self.out, inputs.name, inputs.sequence, list(range(total)), latents)
        self.after_write(unit)
        finished = time.time()  # wall clock: windows of units on different actors compare (bench_generate)
        return {
            "frames": len(frames) * len(cameras),
            "seconds": round(finished - started, 3),
            "unit_window": [started, finished],
            "peak_memory_bytes": peak_memory_bytes(self.device),  # bench/bench_gpu.py reports it
        }


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this actor so far: CUDA memory allocated on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def inputs_path(out: Path, name: str) -> Path:
    return Path(out) / STATE / "inputs" / f"{name}.safetensors"


def load_inputs(out: Path, name: str) -> SubjectInputs:
    """A subject's inputs as `prepare` cached them (gen.input_cache: no pickle, shapes checked)."""
    inputs = read_cached(inputs_path(out, name))
    if inputs is None:
        raise InputError(f"{inputs_path(out, name)}: no valid cached inputs of {name}; run generate again")
    return inputs


def _fingerprint(path: Path) -> list[int]:
    """Size and modification time of an input file (a folder: of its manifest.parquet, else of the folder), so a
    file rewritten in place changes the key."""
    manifest = path / "manifest.parquet"
    found = (manifest if manifest.is_file() else path).stat()
    return [found.st_size, found.st_mtime_ns]


def _input_key(spec: GenerateSpec, index: int, checkpoint: Path) -> str:
    """What a subject's outputs depend on: its spec entry and the files it names, the weights, the head model,
    seed and unit plan."""
    mine = f"subjects[{index}]."
    fields = {
        "subject": spec.subjects[index].model_dump(mode="json"),
        "files": {field: _fingerprint(path) for field, path in input_files(spec) if field.startswith(mine)},
        "weights": _fingerprint(checkpoint / WEIGHTS),
        "checkpoint": str(checkpoint.resolve()),
        "head_model": spec.head_model,
        "seed": spec.seed,
        "frames_per_unit": spec.frames_per_unit,
        "cameras_per_unit": spec.cameras_per_unit,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _discard_stale(out: Path, inputs: SubjectInputs, commits: CommitLog) -> None:
    """A subject whose spec, weights or plan changed: its old frames and commit markers go."""
    for marker in commits.folder.glob(f"{inputs.name}.f*.stats.json"):
        marker.unlink()
    for kind in ("rgb", "normal", "mask"):
        shutil.rmtree(Path(out) / kind / inputs.name / inputs.sequence, ignore_errors=True)


def prepare(spec_path: str | Path, out: str | Path) -> tuple[GenerateSpec, list[SubjectInputs]]:
    """Validate the spec and resolve every subject (cached under OUT/_generate/inputs while it and the files it
    names are unchanged); write each subject's cameras and tracking. Raises ConfigError naming the spec, field
    and file."""
    from geodiff4d.gen.checkpoint import resolve_init
    from geodiff4d.gen.model_run import run_config
    from geodiff4d.recon.run import load_head_model

    spec, out = load_spec(spec_path), Path(out)
    try:
        cfg, checkpoint = run_config(spec.run), resolve_init(spec.run)
        head = load_head_model(spec.head_model)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"{spec_path}: {exc}") from exc
    resolver = Resolver(Path(spec_path), head, cfg.data.resolution, cfg.model.driving_size)
    commits = CommitLog(out / STATE / "commits")
    subjects = []
    for index, subject in enumerate(spec.subjects):
        key, path = _input_key(spec, index, checkpoint), inputs_path(out, subject.name)
        cached = read_cached(path, key)
        if cached is not None:
            subjects.append(cached)
            continue
        inputs = resolver.resolve(index, subject)
        _discard_stale(out, inputs, commits)
        write_cameras(out / "cameras" / inputs.name / f"{inputs.sequence}.json", inputs.cameras)
        write_tracking(tracking_path(out, inputs.name, inputs.sequence), inputs.tracking)
        write_cached(path, key, inputs)
        subjects.append(inputs)
    return spec, subjects


def generate(
    spec_path: str | Path,
    out: str | Path,
    workers: int = 1,
    gpus_per_worker: float | None = None,
    address: str | None = None,
    progress: bool = True,
    job: type[GenerateJob] = GenerateJob,
    max_retries: int = 2,
) -> JobReport:
    """Sample every subject of the spec into the frame folder `out` on `workers` Ray actors; resumable.
    `gpus_per_worker` None: one GPU per actor when the cluster has GPUs, else the CPU."""
    spec, subjects = prepare(spec_path, out)
    units = [u for s in subjects for u in plan_units(s, spec.frames_per_unit, spec.cameras_per_unit)]
    connect(address)
    gpus_per_worker = default_gpus_per_worker(gpus_per_worker)
    return run_units(
        job(spec.run, Path(out).resolve(), spec.seed, spec.head_model, gpus_per_worker > 0),
        units,
        CommitLog(Path(out) / STATE / "commits"),
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        max_retries=max_retries,
        desc="generate",
        progress=progress,
        sizes={u.id: (u.payload["stop"] - u.payload["start"]) * len(u.payload["cameras"]) for u in units},
        size_name="frame",
    )
