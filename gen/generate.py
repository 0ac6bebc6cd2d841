"""`geodiff4d generate`: mass sampling from a spec on Ray actors that hold the pipeline, into a frame folder.

Work units are (subject, temporal window, camera group). A unit denoises its window plus `sample.context`
context frames on each side (default: `overlap`), all of its views as one batch, with the sampler's
overlapping windows blended as always, and writes only the frames it owns; neighbouring units share the
context frames' noise, so they agree across the seam. Noise is drawn per (seed, subject, camera, frame) and
the scheduler's generator per (seed, subject, window, camera group), never from a worker, and CPU kernels are
chosen so the thread count (cores / workers) does not change the last bits: any number of workers gives the
same bytes.
Units commit through core.jobs, so a killed actor or a rerun redoes only uncommitted units.

The driver holds the plan only (per subject its camera names, frame count and input key; no frame decoded), so
it stays small at NeRSemble scale (bench/bench_scale.py). Each actor loads the pipeline once for every subject of
the run and prepares a subject when it first needs it: the first actor resolves it (decoding only the reference
sample and the driving camera's frames) into the cache under OUT/_generate/inputs, the others read that cache, and
each keeps the subjects it uses in an LRU bounded in bytes.

The frame folder is what `geodiff4d recon` reads: rgb/normal/mask PNGs (or, with format tar, one WebDataset tar
per unit: datasets.frame_tars), cameras/ JSON, tracking/ npz (the identity's shape with the driving's motion,
NeRSemble names) and latents/ npz (expression latents).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from geodiff4d.core.config import ConfigError
from geodiff4d.core.jobs import CommitLog, JobReport, WorkUnit, default_gpus_per_worker, run_units
from geodiff4d.core.runtime import connect
from geodiff4d.datasets.frame_folder import tracking_path, write_cameras, write_tracking
from geodiff4d.datasets.frame_tars import TARS, member_name, write_unit_tar
from geodiff4d.datasets.render import render_pose_map
from geodiff4d.gen.checkpoint import WEIGHTS
from geodiff4d.gen.generate_inputs import InputError, Resolver, SubjectInputs, camera_serials
from geodiff4d.gen.generate_spec import GenerateSpec, input_files, load_spec
from geodiff4d.gen.input_cache import DEFAULT_ACTOR_CACHE_MB, InputsLRU, cached_key, prepare_once

if TYPE_CHECKING:
    from geodiff4d.gen.pipeline import SampleOutput

STATE = "_generate"  # OUT/_generate/{inputs,commits}: resolved inputs and commit markers
INPUT_FAILURE = f"{InputError.__name__}: "  # how core.jobs reports a unit whose subject's inputs are unusable


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


@dataclass(frozen=True)
class SubjectPlan:
    """What the driver holds of one subject: names, counts and the key of its inputs; no frame is decoded."""

    index: int  # in the spec's subjects
    name: str
    sequence: str
    cameras: tuple[str, ...]
    frames: int
    key: str  # of its inputs and outputs (_input_keys)


def plan_units(subject: SubjectPlan, frames_per_unit: int, cameras_per_unit: int) -> list[WorkUnit]:
    """Units of one subject; ids are `{subject}.f{start}-{stop}.c{group}` (subject names hold no dots)."""
    units = []
    for start in range(0, subject.frames, frames_per_unit):
        stop = min(start + frames_per_unit, subject.frames)
        for group, first in enumerate(range(0, len(subject.cameras), cameras_per_unit)):
            units.append(
                WorkUnit(
                    f"{subject.name}.f{start:05d}-{stop:05d}.c{group:03d}",
                    {
                        "subject": subject.name,
                        "start": start,
                        "stop": stop,
                        "group": group,
                        "cameras": list(subject.cameras[first : first + cameras_per_unit]),
                    },
                )
            )
    return units


class GenerateJob:
    """Ray work-unit job: the pipeline is loaded once per actor for every subject of the run; each unit samples
    one window x camera group. A subject's inputs are prepared by the first actor that needs them (shared through
    the cache under OUT/_generate/inputs) and kept in an LRU bounded by ``cache_mb``."""

    def __init__(
        self,
        spec_path: Path,
        spec: GenerateSpec,
        subjects: dict[str, SubjectPlan],
        out: Path,
        use_gpu: bool,
        cache_mb: float = DEFAULT_ACTOR_CACHE_MB,
    ):
        self.spec_path, self.spec, self.plans, self.out = Path(spec_path), spec, subjects, Path(out)
        self.seed, self.use_gpu, self.cache_mb = spec.seed, use_gpu, cache_mb

    def setup(self) -> None:
        from geodiff4d.gen.model_run import load_run
        from geodiff4d.recon.run import load_head_model

        self.device = torch.device("cuda" if self.use_gpu else "cpu")  # core.jobs checked that torch sees it
        self.loaded = load_run(self.spec.run).to(self.device)  # with the sample config's speed options
        self.head = load_head_model(self.spec.head_model)
        self.subjects = InputsLRU(int(self.cache_mb * 2**20))
        self.failed: dict[str, InputError] = {}  # subjects whose inputs cannot be resolved: not tried again

    def subject(self, name: str) -> SubjectInputs:
        return self.subjects.get(name, lambda: self.prepared(name))

    def prepared(self, name: str) -> SubjectInputs:
        if name in self.failed:
            raise self.failed[name]
        cfg, plan = self.loaded.cfg, self.plans[name]
        resolver = Resolver(self.spec_path, self.head, cfg.data.resolution, cfg.model.driving_size)
        try:
            return prepare_subject(self.out, self.spec, plan, resolver)
        except InputError as error:
            self.failed[name] = error
            raise

    def after_write(self, unit: WorkUnit) -> None:
        """Hook called once a unit's frames are written, before it returns (fault injection in tests)."""

    def write_frames(
        self, unit: WorkUnit, inputs: SubjectInputs, frames: list[int], views: dict[str, SampleOutput]
    ) -> None:
        """A unit's frames (camera -> its view of ``frames``) as PNG files, or as one tar (the spec's format)."""
        from geodiff4d.gen.sample_frames import camera_frame_images, write_camera_frames

        if self.spec.format == "png":
            for camera, view in views.items():
                write_camera_frames(self.out, inputs.name, inputs.sequence, camera, frames, view)
            return
        members = {
            member_name(camera, frame, part): data
            for camera, view in views.items()
            for frame, part, data in camera_frame_images(camera, frames, view)
        }
        write_unit_tar(self.out, inputs.name, inputs.sequence, unit.id, members)

    def run(self, unit: WorkUnit) -> dict[str, Any]:
        from geodiff4d.gen.pipeline import SampleOutput, denoise_views, latent_shape
        from geodiff4d.gen.sample_frames import write_latents

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
        views = {
            camera: SampleOutput(
                result.rgb[i, own].cpu(),
                None if result.normal is None else result.normal[i, own].cpu(),
                result.expression,
            )
            for i, camera in enumerate(cameras)
        }
        self.write_frames(unit, inputs, frames, views)
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


def prepare_subject(out: Path, spec: GenerateSpec, plan: SubjectPlan, resolver: Resolver) -> SubjectInputs:
    """A subject's inputs from the cache under ``out`` (gen.input_cache: no pickle, shapes checked), else resolved
    by this process alone, with the subject's cameras and tracking written beside its frames."""

    def resolve() -> SubjectInputs:
        threads = torch.get_num_threads()
        torch.set_num_threads(
            1
        )  # fitting's sums in one order, whatever an actor's share of CPUs: the same inputs
        try:  # (and so the same frames) for any number of workers
            inputs = resolver.resolve(plan.index, spec.subjects[plan.index])
        finally:
            torch.set_num_threads(threads)
        write_cameras(Path(out) / "cameras" / inputs.name / f"{inputs.sequence}.json", inputs.cameras)
        write_tracking(tracking_path(out, inputs.name, inputs.sequence), inputs.tracking)
        return inputs

    return prepare_once(inputs_path(out, plan.name), plan.key, resolve)


def _fingerprint(path: Path) -> list[int]:
    """Size and modification time of an input file (a folder: of its manifest.parquet, else of the folder), so a
    file rewritten in place changes the key."""
    manifest = path / "manifest.parquet"
    found = (manifest if manifest.is_file() else path).stat()
    return [found.st_size, found.st_mtime_ns]


def sampling_identity(run: Path) -> dict[str, Any]:
    """What a trained run's samples depend on besides their inputs: the checkpoint sampled (its path, and its
    weights' size and modification time, so weights rewritten in place count) and the run's sample settings
    (scheduler, steps, guidance, context, bf16 weights, ...; not compile and channels_last, which give the same
    frames). Raises FileNotFoundError or ValueError for a folder that is no trained run."""
    from geodiff4d.gen.checkpoint import resolve_init
    from geodiff4d.gen.model_run import run_config

    sample = run_config(run).sample.model_dump(mode="json", exclude={"compile", "channels_last"})
    checkpoint = resolve_init(run)
    return {
        "weights": _fingerprint(checkpoint / WEIGHTS),
        "sample": sample,
        "checkpoint": str(checkpoint.resolve()),
    }


def _input_keys(spec: GenerateSpec, sampling: dict[str, Any]) -> list[str]:
    """Per subject, what its outputs depend on: its spec entry and the files it names, the run's ``sampling``
    identity (:func:`sampling_identity`), the head model, seed, unit plan and output format."""
    files: dict[str, dict[str, list[int]]] = {}
    for field, path in input_files(spec):
        if field.startswith("subjects["):
            files.setdefault(field.split(".", 1)[0], {})[field] = _fingerprint(path)
    shared = {
        **sampling,
        **spec.model_dump(mode="json", include={"head_model", "seed", "frames_per_unit", "cameras_per_unit"}),
        "format": spec.format,
    }
    return [
        hashlib.sha256(
            json.dumps(
                {
                    "subject": subject.model_dump(mode="json"),
                    "files": files.get(f"subjects[{i}]", {}),
                    **shared,
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()
        for i, subject in enumerate(spec.subjects)
    ]


def _discard_stale(out: Path, subjects: list[SubjectPlan]) -> None:
    """Subjects whose spec, weights, plan or format changed since their inputs were cached (or whose cache is
    gone): their frames, tars, commit markers and cache go, so their units run again."""
    commits = Path(out) / STATE / "commits"
    markers: dict[str, list[Path]] = {}
    for marker in commits.iterdir() if commits.is_dir() else ():  # one listing, not one glob per subject
        markers.setdefault(marker.name.split(".", 1)[0], []).append(marker)
    for subject in subjects:
        if cached_key(inputs_path(out, subject.name)) == subject.key:
            continue
        for marker in markers.get(subject.name, []):
            marker.unlink()
        for kind in ("rgb", "normal", "mask", TARS):
            shutil.rmtree(Path(out) / kind / subject.name / subject.sequence, ignore_errors=True)
        inputs_path(out, subject.name).unlink(missing_ok=True)


def _check_head_model(spec_path: Path, head_model: str) -> None:
    """The spec's head model names a procedural head or an existing FLAME file (loaded by the actors)."""
    kind, _, seed = head_model.partition(":")
    if (kind == "procedural" and not seed.isdigit()) or (
        kind != "procedural" and not Path(head_model).is_file()
    ):
        raise ConfigError(
            f"{spec_path}: head_model: {head_model!r} is neither procedural:SEED nor a FLAME file"
        )


def plan(
    spec_path: str | Path, out: str | Path, output_format: str | None = None
) -> tuple[GenerateSpec, list[SubjectPlan]]:
    """The driver's part: validate the spec, list each subject's cameras and frames (nothing decoded), and drop
    the outputs of subjects whose inputs changed. Raises ConfigError naming the spec, field and file."""
    spec_path, spec = Path(spec_path), load_spec(spec_path)
    if output_format is not None:
        spec = spec.model_copy(update={"format": output_format})
    try:
        sampling = sampling_identity(spec.run)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"{spec_path}: {exc}") from exc
    _check_head_model(spec_path, spec.head_model)
    subjects = [
        SubjectPlan(i, s.name, s.sequence, tuple(camera_serials(spec_path, i, s)), s.frames, key)
        for i, (s, key) in enumerate(zip(spec.subjects, _input_keys(spec, sampling), strict=True))
    ]
    _discard_stale(Path(out), subjects)
    return spec, subjects


def prepare(
    spec_path: str | Path, out: str | Path, output_format: str | None = None
) -> tuple[GenerateSpec, list[SubjectInputs]]:
    """:func:`plan`, then every subject's inputs resolved now (cached as the actors would), e.g. to time sampling
    without the resolution."""
    from geodiff4d.gen.model_run import run_config
    from geodiff4d.recon.run import load_head_model

    spec, subjects = plan(spec_path, out, output_format)
    cfg = run_config(spec.run)
    resolver = Resolver(
        Path(spec_path), load_head_model(spec.head_model), cfg.data.resolution, cfg.model.driving_size
    )
    return spec, [prepare_subject(Path(out), spec, s, resolver) for s in subjects]


def generate(
    spec_path: str | Path,
    out: str | Path,
    workers: int = 1,
    gpus_per_worker: float | None = None,
    address: str | None = None,
    progress: bool = True,
    job: type[GenerateJob] = GenerateJob,
    max_retries: int = 2,
    output_format: str | None = None,
    cache_mb: float | None = None,
    cpus_per_worker: float | None = None,
) -> JobReport:
    """Sample every subject of the spec into the frame folder `out` on `workers` Ray actors; resumable. The
    driver holds the plan only; actors prepare subjects as they reach them. `gpus_per_worker` None: one GPU per
    actor when the cluster has GPUs, else the CPU. `output_format` (png or tar) overrides the spec's `format`;
    `cache_mb` bounds each actor's prepared subjects (default DEFAULT_ACTOR_CACHE_MB). Units of inputs that turn
    out unusable in an actor fail like others (`input_failures` makes them one message). `cpus_per_worker`
    None: the cluster's CPUs divided by the workers (:func:`geodiff4d.core.jobs.worker_cpus`)."""
    spec, subjects = plan(spec_path, out, output_format)
    units = [u for s in subjects for u in plan_units(s, spec.frames_per_unit, spec.cameras_per_unit)]
    connect(address)
    gpus_per_worker = default_gpus_per_worker(gpus_per_worker)
    report = run_units(
        job(
            Path(spec_path),
            spec,
            {s.name: s for s in subjects},
            Path(out).resolve(),
            gpus_per_worker > 0,
            cache_mb or DEFAULT_ACTOR_CACHE_MB,
        ),
        units,
        CommitLog(Path(out) / STATE / "commits"),
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
        max_retries=max_retries,
        desc="generate",
        progress=progress,
        sizes={u.id: (u.payload["stop"] - u.payload["start"]) * len(u.payload["cameras"]) for u in units},
        size_name="frame",
    )
    return report


def input_failures(report: JobReport) -> InputError | None:
    """The unusable inputs a run's actors found (e.g. no face in a reference), each message once, as one error to
    end the command with; None when there were none."""
    found = sorted(
        {e.removeprefix(INPUT_FAILURE) for e in report.failed.values() if e.startswith(INPUT_FAILURE)}
    )
    return InputError("\n".join(found)) if found else None
