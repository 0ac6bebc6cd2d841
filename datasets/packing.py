"""Pack NeRSemble and SynthHuman folders into WebDataset shards with Ray: plan, encode, commit, manifest.

The plan is a pure function of the input listing (sorted sample ids -> shards bounded by sample count and an
upper bound of bytes), so a rerun recomputes the same shards and skips those whose tar and stats marker
exist. A shard holds whole frames (every camera of a subject/sequence/frame) where the bounds allow, so the
loader can draw cross-view pairs and clips inside one shard. One Ray work unit per shard: its actor decodes
the videos it needs (PyAV), crops and resizes around the head, and encodes rgb, normal, mask, posemap, json.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import torch

from geodiff4d.cluster.atomic import write_json_atomic
from geodiff4d.cluster.jobs import CommitLog, JobReport, WorkUnit, run_units
from geodiff4d.cluster.runtime import connect
from geodiff4d.datasets.cameras import Camera
from geodiff4d.datasets.flame import FlameModel, FlameParams
from geodiff4d.datasets.manifest import build_manifest, shard_stats
from geodiff4d.datasets.nersemble import NersembleDataset, NersembleError, read_tracking_npz
from geodiff4d.datasets.normal_maps import decode_normal_png, encode_normal_png, unit
from geodiff4d.datasets.procedural import gt_normal_path
from geodiff4d.datasets.procedural_head import procedural_head_model
from geodiff4d.datasets.render import render_head, render_pose_map
from geodiff4d.datasets.shards import shard_name, write_shard
from geodiff4d.datasets.synthhuman import SynthHumanDataset

SOURCES = ("nersemble", "synthhuman")
CROP_MARGIN = 1.3  # crop side relative to the projected head's larger extent
BACKGROUND_THRESHOLD = 0.1  # max channel difference (of [0, 1]) that still counts as background
DEFAULT_SAMPLES_PER_SHARD = 512
DEFAULT_MAX_SHARD_BYTES = 2 << 30


class PackError(ValueError):
    """Inputs that cannot be packed; the message names the file or source."""


@dataclass(frozen=True, order=True)
class SampleRef:
    """One entry of the input listing: a (subject, sequence, frame, camera) of one source folder."""

    source: str
    subject: str
    sequence: str
    frame: int
    camera: str
    root: str

    @property
    def key(self) -> str:
        return f"{self.source}_{self.subject}_{self.sequence}_{self.frame:05d}_{self.camera}"

    def ids(self) -> dict[str, Any]:
        return {"source": self.source, "subject": self.subject, "sequence": self.sequence,
                "frame": self.frame, "camera": self.camera}


@dataclass(frozen=True)
class ShardPlan:
    source: str
    index: int
    samples: tuple[SampleRef, ...]

    @property
    def name(self) -> str:
        return shard_name(self.source, self.index)


# ------------------------------------------------------------------------------------------------ listing


def list_nersemble(root: Path) -> list[SampleRef]:
    """Tracked frames of every camera (cameras: any with a video in one of the subject's sequences)."""
    dataset = NersembleDataset(root)
    refs = []
    for subject in dataset.subjects():
        sequences = dataset.sequences(subject)
        serials = sorted({s for seq in sequences for s in dataset.sequence_serials(subject, seq)})
        for sequence in sequences:
            tracking_path = dataset.tracking_path(subject, sequence)
            if tracking_path.exists():
                frames = sorted(int(f) for f in read_tracking_npz(tracking_path).frames)
            else:
                frames = list(range(dataset.frame_count(subject, sequence)))
            refs += [SampleRef("nersemble", subject, sequence, f, s, str(root)) for f in frames for s in serials]
    return refs


def list_synthhuman(root: Path) -> list[SampleRef]:
    return [SampleRef("synthhuman", f"{i:07d}", "synthhuman", 0, "0", str(root)) for i in SynthHumanDataset(root).indices()]


def list_inputs(sources: Sequence[tuple[str, Path]]) -> list[SampleRef]:
    listers = {"nersemble": list_nersemble, "synthhuman": list_synthhuman}
    refs = []
    for kind, root in sources:
        if kind not in listers:
            raise PackError(f"unknown source kind {kind!r} for {root} (known: {sorted(listers)})")
        refs += listers[kind](Path(root))
    keys = [r.key for r in refs]
    if len(set(keys)) != len(keys):
        raise PackError("two inputs give the same sample keys: pack each source folder once")
    return sorted(refs)


# --------------------------------------------------------------------------------------------------- plan


def sample_bytes_bound(resolution: int) -> int:
    """Upper bound of one sample in a tar: raw rgb8 + normal16 + mask8 + posemap16, PNG overhead, json, headers."""
    raw = resolution * resolution * (3 + 6 + 1 + 6)
    return int(raw * 1.01) + 5 * 1024 + 16 * 1024


def plan_shards(refs: Sequence[SampleRef], samples_per_shard: int, max_shard_bytes: int, sample_bytes: int) -> list[ShardPlan]:
    """Sorted refs -> shards per source; whole frames stay together unless one frame exceeds the bounds."""
    per_shard = min(samples_per_shard, max_shard_bytes // sample_bytes)
    if per_shard < 1:
        raise PackError(f"max_shard_bytes={max_shard_bytes} is below one sample's bound ({sample_bytes} bytes)")
    plans = []
    for source in sorted({r.source for r in refs}):
        groups: dict[tuple, list[SampleRef]] = {}
        for ref in sorted(r for r in refs if r.source == source):
            groups.setdefault((ref.root, ref.subject, ref.sequence, ref.frame), []).append(ref)
        shards: list[list[SampleRef]] = [[]]
        for group in groups.values():
            if shards[-1] and len(shards[-1]) + len(group) > per_shard:
                shards.append([])
            for ref in group:  # a frame larger than a shard is split
                if len(shards[-1]) == per_shard:
                    shards.append([])
                shards[-1].append(ref)
        plans += [ShardPlan(source, i, tuple(s)) for i, s in enumerate(shards) if s]
    return plans


# ---------------------------------------------------------------------------------------- image encoding


def _png(image: np.ndarray) -> bytes:
    if image.ndim == 3:
        image = image[..., ::-1]  # RGB -> BGR for OpenCV
    ok, buffer = cv2.imencode(".png", np.ascontiguousarray(image))
    if not ok:
        raise PackError("PNG encoding failed")
    return buffer.tobytes()


def square_box(x0: float, y0: float, x1: float, y1: float, margin: float = CROP_MARGIN) -> tuple[int, int, int]:
    """A square integer window (x, y, side) around a box, ``margin`` times its larger extent."""
    side = max(int(round(max(x1 - x0, y1 - y0) * margin)), 2)
    return int(round((x0 + x1 - side) / 2)), int(round((y0 + y1 - side) / 2)), side


def crop(image: np.ndarray, box: tuple[int, int, int], resolution: int) -> np.ndarray:
    """Window ``box`` of ``image`` (zero outside it), area-resized to resolution x resolution."""
    x, y, side = box
    canvas = np.zeros((side, side, *image.shape[2:]), dtype=image.dtype)
    sx0, sy0 = max(x, 0), max(y, 0)
    sx1, sy1 = min(x + side, image.shape[1]), min(y + side, image.shape[0])
    if sx1 > sx0 and sy1 > sy0:
        canvas[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = image[sy0:sy1, sx0:sx1]
    interpolation = cv2.INTER_AREA if side >= resolution else cv2.INTER_LINEAR
    return cv2.resize(canvas, (resolution, resolution), interpolation=interpolation)


def crop_normals(normal: np.ndarray, mask: np.ndarray, box: tuple[int, int, int], resolution: int):
    """Crop and resize a normal map without mixing background into the edge: -> (normal [R,R,3], mask [R,R])."""
    weight = crop(mask.astype(np.float32), box, resolution)
    summed = crop((normal * mask[..., None]).astype(np.float32), box, resolution)
    inside = weight > 0.5
    return np.where(inside[..., None], unit(summed), 0.0).astype(np.float32), inside


def background_mask(rgb: np.ndarray, backdrop: np.ndarray, threshold: float = BACKGROUND_THRESHOLD) -> np.ndarray:
    """Foreground by background subtraction: largest connected changed region, holes filled -> float [H, W]."""
    if backdrop.shape != rgb.shape:
        backdrop = cv2.resize(backdrop, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_AREA)
    changed = (np.abs(rgb.astype(np.int16) - backdrop.astype(np.int16)).max(axis=-1) > threshold * 255).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    changed = cv2.morphologyEx(changed, cv2.MORPH_OPEN, kernel)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(changed)
    if count < 2:
        return np.zeros(rgb.shape[:2], np.float32)
    largest = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    contours, _ = cv2.findContours(largest, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros_like(largest)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled.astype(np.float32)


def _mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    ys, xs = np.nonzero(mask > 0.5)
    return (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if len(xs) else None


# --------------------------------------------------------------------------------------------- estimators


class NormalEstimator(Protocol):
    """rgb float32 [H, W, 3] in [0, 1] -> unit normals [H, W, 3] in our convention."""

    def __call__(self, rgb: np.ndarray) -> np.ndarray: ...


class OnnxNormalEstimator:
    """An ONNX normal model from a local path (e.g. DAViD's). Assumed I/O: NCHW float RGB in [0, 1] ->
    NCHW normals in our camera convention (x right, y up, z toward the camera); outputs are renormalized."""

    def __init__(self, path: str | os.PathLike):
        import onnxruntime

        if not Path(path).is_file():
            raise PackError(f"{path}: normal estimator ONNX file not found")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(rgb.transpose(2, 0, 1)[None], dtype=np.float32)  # [1, 3, H, W]
        normal = self.session.run(None, {self.input: batch})[0][0]  # [3, H, W]
        return unit(normal.transpose(1, 2, 0).astype(np.float64)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ the job


@dataclass(frozen=True)
class PackSettings:
    resolution: int = 512
    normal_estimator: str | None = None  # local ONNX path; None: FLAME tracking rendered as a coarse fallback
    flame_model: str | None = None  # FLAME .pkl matching the tracking; None: the procedural head (demo data)


@dataclass
class _Encoded:
    rgb: np.ndarray  # uint8 [R, R, 3]
    mask: np.ndarray  # float32 [R, R] in [0, 1]
    normal: np.ndarray  # float32 [R, R, 3]
    normal_mask: np.ndarray  # bool [R, R]
    posemap: np.ndarray  # float32 [R, R, 3]
    meta: dict[str, Any] = field(default_factory=dict)


class PackJob:
    """Ray job: one unit = one shard. ``setup`` loads the FLAME model and the normal estimator once per actor."""

    def __init__(self, out: str | os.PathLike, settings: PackSettings):
        self.out, self.settings = Path(out), settings

    def setup(self) -> None:
        path = self.settings.flame_model
        self.model = FlameModel.from_pkl(path) if path else procedural_head_model(seed=0)
        self.estimator = OnnxNormalEstimator(self.settings.normal_estimator) if self.settings.normal_estimator else None

    def run(self, unit: WorkUnit) -> dict[str, Any]:
        plan: ShardPlan = unit.payload["plan"]
        encode = self._nersemble_samples if plan.source == "nersemble" else self._synthhuman_samples
        samples = encode(plan.samples)
        path = self.out / f"{plan.name}.tar"
        ids = {s["__key__"]: json.loads(s["json"]) for s in samples}
        return shard_stats(path, ids, write_shard(path, samples))

    # --- sample assembly
    def _sample(self, ref: SampleRef, enc: _Encoded) -> dict[str, Any]:
        meta = {**ref.ids(), "key": ref.key, "resolution": self.settings.resolution, **enc.meta}
        mask8 = np.rint(np.clip(enc.mask, 0, 1) * 255).astype(np.uint8)
        pose_mask = np.linalg.norm(enc.posemap, axis=-1) > 0.5
        return {
            "__key__": ref.key,
            "rgb.png": _png(enc.rgb),
            "mask.png": _png(mask8),
            "normal.png": encode_normal_png(enc.normal, enc.normal_mask),
            "posemap.png": encode_normal_png(enc.posemap, pose_mask),
            "json": json.dumps(meta, sort_keys=True).encode(),
        }

    def _nersemble_samples(self, refs: Sequence[SampleRef]) -> list[dict[str, Any]]:
        wanted: dict[tuple[str, str, str, str], set[int]] = {}
        for ref in refs:
            wanted.setdefault((ref.root, ref.subject, ref.sequence, ref.camera), set()).add(ref.frame)
        by_id = {(r.root, r.subject, r.sequence, r.camera, r.frame): r for r in refs}
        datasets: dict[str, NersembleDataset] = {}
        samples = []
        for (root, subject, sequence, serial), frames in sorted(wanted.items()):
            dataset = datasets.setdefault(root, NersembleDataset(root, self.model.n_shape, self.model.n_expr))
            backdrop = _background(dataset, subject, serial)
            remaining = set(frames)
            for frame in dataset.frames(subject, sequence, serial):
                if frame.frame in remaining:
                    remaining.discard(frame.frame)
                    ref = by_id[(root, subject, sequence, serial, frame.frame)]
                    samples.append(self._sample(ref, self._encode_nersemble(dataset, frame, backdrop)))
                if not remaining:
                    break
            if remaining:
                raise PackError(
                    f"{dataset.video_path(subject, sequence, serial)}: frames {sorted(remaining)[:5]} not in the video"
                )
        return samples

    def _encode_nersemble(self, dataset: NersembleDataset, frame: Any, backdrop: np.ndarray | None) -> _Encoded:
        res = self.settings.resolution
        if frame.alpha is not None:
            alpha, mask_source = frame.alpha, "alpha"
        elif backdrop is not None:
            alpha, mask_source = background_mask(frame.rgb, backdrop), "background"
        else:
            raise PackError(
                f"{dataset.video_path(frame.subject, frame.sequence, frame.serial)}: no alpha_maps video and no "
                f"BACKGROUND/image_{frame.serial}.jpg for background subtraction"
            )
        box = self._head_box(frame.flame, frame.camera, alpha, frame)
        camera = frame.camera.cropped(box[0], box[1], box[2], box[2]).resized(res, res)
        gt = gt_normal_path(dataset.root, frame.subject, frame.sequence, frame.serial, frame.frame)
        rgb = crop(frame.rgb, box, res)
        if gt.is_file():
            normal, normal_mask = crop_normals(*decode_normal_png(gt), box, res)
            normal_source = "gt"
        else:
            normal, normal_mask, normal_source = self._estimated_normals(rgb, crop(alpha, box, res), frame.flame, camera)
        posemap = self._posemap(frame.flame, camera)
        meta = {
            "camera_params": camera.to_json(),
            "crop": list(box),
            "mask_source": mask_source,
            "normal_source": normal_source,
            "flame": None if frame.flame is None else {k: v.tolist() for k, v in frame.flame.to_numpy_dict().items()},
            "color_calibrated": dataset.color_calibration(frame.subject) is not None,
        }
        return _Encoded(rgb, crop(alpha, box, res), normal, normal_mask, posemap, meta)

    def _head_box(self, flame: FlameParams | None, camera: Camera, alpha: np.ndarray, frame: Any) -> tuple[int, int, int]:
        """Square window around the projected FLAME head, else around the mask."""
        if flame is not None:
            with torch.no_grad():
                vertices = self.model(flame).vertices[0].double().numpy()  # [V, 3]
            xy = camera.project(vertices)
            return square_box(xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max())
        box = _mask_box(alpha)
        if box is None:
            raise PackError(f"{frame.subject}/{frame.sequence}/cam_{frame.serial} frame {frame.frame}: empty mask, no tracking")
        return square_box(*box)

    def _estimated_normals(self, rgb: np.ndarray, mask: np.ndarray, flame: FlameParams | None, camera: Camera):
        inside = mask > 0.5
        if self.estimator is not None:
            normal = self.estimator(rgb.astype(np.float32) / 255.0)
            return np.where(inside[..., None], normal, 0.0).astype(np.float32), inside, "onnx"
        if flame is None:
            return np.zeros((*mask.shape, 3), np.float32), np.zeros(mask.shape, bool), "none"
        render = render_head(self.model, flame, camera)
        return render.normal.permute(1, 2, 0).numpy(), render.mask.numpy() > 0.5, "flame"

    def _posemap(self, flame: FlameParams | None, camera: Camera) -> np.ndarray:
        res = self.settings.resolution
        if flame is None:
            return np.zeros((res, res, 3), np.float32)
        return render_pose_map(self.model, flame, camera).permute(1, 2, 0).numpy()

    def _synthhuman_samples(self, refs: Sequence[SampleRef]) -> list[dict[str, Any]]:
        res = self.settings.resolution
        datasets: dict[str, SynthHumanDataset] = {}
        samples = []
        for ref in refs:
            item = datasets.setdefault(ref.root, SynthHumanDataset(ref.root))[int(ref.subject)]
            box = _mask_box(item.alpha) or (0, 0, item.camera.width, item.camera.height)
            box = square_box(*box)
            camera = item.camera.cropped(box[0], box[1], box[2], box[2]).resized(res, res)
            rgb = crop(np.rint(item.rgb * 255).astype(np.uint8), box, res)
            normal, normal_mask = crop_normals(item.normal, item.mask & (item.alpha > 0.5), box, res)
            meta = {"camera_params": camera.to_json(), "crop": list(box), "mask_source": "alpha",
                    "normal_source": "gt", "flame": None, "color_calibrated": False}
            posemap = np.zeros((res, res, 3), np.float32)  # SynthHuman has no FLAME fit: no pose map
            samples.append(self._sample(ref, _Encoded(rgb, crop(item.alpha, box, res), normal, normal_mask, posemap, meta)))
        return samples


def _background(dataset: NersembleDataset, subject: str, serial: str) -> np.ndarray | None:
    path = dataset.root / subject / "sequences" / "BACKGROUND" / f"image_{serial}.jpg"
    if not path.is_file():
        return None
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise NersembleError(f"{path}: unreadable background image")
    return image[..., ::-1].copy()


# ------------------------------------------------------------------------------------------------ driver


@dataclass
class PackReport:
    job: JobReport
    shards: int
    samples: int
    out: Path

    @property
    def ok(self) -> bool:
        return self.job.ok

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def summary(self) -> str:
        return f"packed {self.samples} samples in {self.shards} shards under {self.out}\n{self.job.summary()}"


def pack_with(
    job: PackJob,
    sources: Sequence[tuple[str, Path]],
    *,
    workers: int = 2,
    address: str | None = None,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    max_retries: int = 2,
    progress: bool = True,
) -> PackReport:
    """Plan, run every uncommitted shard on Ray, rebuild the manifest from the committed shards."""
    out = job.out
    out.mkdir(parents=True, exist_ok=True)
    refs = list_inputs(sources)
    plans = plan_shards(refs, samples_per_shard, max_shard_bytes, sample_bytes_bound(job.settings.resolution))
    _check_settings(out, job.settings, samples_per_shard, max_shard_bytes)
    commits = CommitLog(out)
    for plan in plans:  # a tar without its marker is a leftover of a killed run: it is rewritten
        if not commits.is_committed(plan.name):
            (out / f"{plan.name}.tar").unlink(missing_ok=True)
    connect(address)
    units = [WorkUnit(plan.name, {"plan": plan}) for plan in plans]
    report = run_units(job, units, commits, workers=workers, max_retries=max_retries, desc="pack", progress=progress)
    table = build_manifest(out)
    return PackReport(report, shards=len(plans) - len(report.failed), samples=table.num_rows, out=out)


def pack(
    out: str | os.PathLike,
    sources: Sequence[tuple[str, Path]],
    resolution: int = 512,
    workers: int = 2,
    address: str | None = None,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    normal_estimator: str | os.PathLike | None = None,
    flame_model: str | os.PathLike | None = None,
    max_retries: int = 2,
    progress: bool = True,
) -> PackReport:
    """``geodiff4d pack``: shards ``{source}-{shard:06d}.tar`` + stats markers + ``manifest.parquet`` in ``out``."""
    settings = PackSettings(
        resolution=resolution,
        normal_estimator=str(normal_estimator) if normal_estimator else None,
        flame_model=str(flame_model) if flame_model else None,
    )
    return pack_with(
        PackJob(out, settings), sources, workers=workers, address=address, samples_per_shard=samples_per_shard,
        max_shard_bytes=max_shard_bytes, max_retries=max_retries, progress=progress,
    )


def _check_settings(out: Path, settings: PackSettings, samples_per_shard: int, max_shard_bytes: int) -> None:
    """Resuming with other settings would mix incompatible shards under one manifest: refuse it."""
    path = out / "pack_settings.json"
    wanted = {**asdict(settings), "samples_per_shard": samples_per_shard, "max_shard_bytes": max_shard_bytes}
    if path.exists():
        found = json.loads(path.read_text())
        if found != wanted:
            raise PackError(f"{path} was written with {found}, not {wanted}: use another output folder")
        return
    write_json_atomic(path, wanted)
