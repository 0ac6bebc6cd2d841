"""Pack NeRSemble and SynthHuman folders into WebDataset shards with Ray: plan, encode, commit, manifest.

The plan is a pure function of the input listing (sorted sample ids -> shards bounded by sample count and an
upper bound of bytes), so a rerun recomputes the same shards and skips those whose tar and stats marker
exist. A shard holds whole frames (every camera of a subject/sequence/frame) where the bounds allow, so the
loader can draw cross-view pairs and clips inside one shard. One Ray work unit per shard: its actor decodes
each camera video it needs once, from the shard's first frame (PyAV, seeking), poses FLAME once per frame for
all cameras, crops and resizes around the head, and encodes rgb, normal, mask, posemap (rendered at the packed
resolution), json. The shard stats record decoded vs packed video frames and seconds per stage.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import Any, ClassVar, Literal, NamedTuple, TypeVar

import cv2
import numpy as np
import torch
from pydantic import field_validator

from geodiff4d.core.config import StrictConfig, validate
from geodiff4d.core.errors import UserError
from geodiff4d.core.io.file_digest import files_digest, files_under
from geodiff4d.core.io.images import encode_png, from_float, read_rgb8
from geodiff4d.core.io.json_yaml import json_bytes, parse_json
from geodiff4d.core.io.video import DecodeCount, LazyAlpha, VideoError, video_frame_count
from geodiff4d.core.jobs import CommitLog, JobReport, WorkUnit, run_units
from geodiff4d.core.runtime import connect
from geodiff4d.core.settings_match import refuse_differences, settings_differences
from geodiff4d.datasets.cameras import Camera, intrinsics, look_at_camera
from geodiff4d.datasets.colour_calibration import correct_colour
from geodiff4d.datasets.destinations import Destination, DestinationCommitLog, destination
from geodiff4d.datasets.flame import FlameModel, FlameParams
from geodiff4d.datasets.flame_tracking import (
    TRACKING_V1,
    TRACKING_V2,
    FlameTracking,
    TrackingError,
    check_flame_version,
    missing_tracking_message,
    sequence_tracking,
)
from geodiff4d.datasets.locations import is_remote, join, read_bytes
from geodiff4d.datasets.manifest import build_manifest, shard_stats
from geodiff4d.datasets.nersemble import BACKGROUND_SEQUENCE, NersembleDataset, NersembleError
from geodiff4d.datasets.normal_estimator import NormalEstimatorError, OnnxNormalEstimator
from geodiff4d.datasets.normal_maps import (
    decode_normal_png,
    from_mask_weighted,
    mask_weighted,
    normal_codes,
)
from geodiff4d.datasets.procedural import gt_normal_path
from geodiff4d.datasets.procedural_head import procedural_head_model
from geodiff4d.datasets.render import render_normal_codes
from geodiff4d.datasets.resample import area_window, window_in_image
from geodiff4d.datasets.shards import PACK_SETTINGS, shard_name, write_tar
from geodiff4d.datasets.synthhuman import MEMBERS as SYNTHHUMAN_MEMBERS
from geodiff4d.datasets.synthhuman import (
    SynthHumanDataset,
    SynthHumanError,
    derive_normal_convention,
    member_path,
)
from geodiff4d.datasets.video_cursors import VideoCursors

SOURCES = ("nersemble", "synthhuman")
CROP_MARGIN = 1.3  # crop side relative to the projected head's larger extent
BACKGROUND_THRESHOLD = 0.1  # max channel difference (of [0, 1]) that still counts as background
DEFAULT_SAMPLES_PER_SHARD = 512
DEFAULT_MAX_SHARD_BYTES = 2 << 30
SYNTHHUMAN_FACE_SAMPLES = 98040  # the release's first 98,040 indices are face crops, then full and upper body
SYNTHHUMAN_SUBSETS = ("all", "face")
POSE_BATCH = 4  # tracked frames per FLAME call (PackJob._poses)
T = TypeVar("T")
URL_LIKE = re.compile(
    r"^[A-Za-z][A-Za-z0-9+.-]+:"
)  # a scheme (https:, s3:, pipe:), also after Path() ate a "/"


FLAME_IN = "flame_in"  # json field: the key of the sample whose json holds this frame's FLAME row


def resolve_flame(metas: Iterable[dict[str, Any]]) -> None:
    """Fill each sample json's ``flame`` from the sample its ``flame_in`` names, where that sample is among
    ``metas``: packing stores a frame's FLAME row once (in its first camera's json in the shard), not in every
    camera's (~8 KB each with real 300/100-coefficient tracking)."""
    metas = list(metas)
    by_key = {meta["key"]: meta for meta in metas}
    for meta in metas:
        carrier = by_key.get(meta.get(FLAME_IN, ""))
        if carrier is not None:
            meta["flame"] = carrier["flame"]


class PackError(UserError, ValueError):
    """Inputs that cannot be packed; the message names the file or source."""


# The errors a user can fix (bad inputs or options): the CLI prints them as one message, no traceback.
PACK_INPUT_ERRORS = (PackError, NersembleError, SynthHumanError, TrackingError, NormalEstimatorError)


def sample_key(source: str, subject: str, sequence: str, frame: int, camera: str) -> str:
    """A sample's id in the shards and the manifest."""
    return f"{source}_{subject}_{sequence}_{frame:05d}_{camera}"


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
        return sample_key(self.source, self.subject, self.sequence, self.frame, self.camera)

    def ids(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "subject": self.subject,
            "sequence": self.sequence,
            "frame": self.frame,
            "camera": self.camera,
        }


@dataclass(frozen=True, order=True)
class SampleBlock:
    """Every listed frame x every camera of one subject/sequence of one source folder, frame-major: a listing is
    made of blocks, not of samples, so NeRSemble's ~38M samples are ~8,000 blocks in the driver
    (bench/bench_scale.py). Frames and cameras are sorted, so blocks in order expand to sorted sample refs."""

    source: str
    subject: str
    sequence: str
    frames: tuple[int, ...]
    cameras: tuple[str, ...]
    root: str

    def __len__(self) -> int:
        return len(self.frames) * len(self.cameras)

    def refs(self, start: int = 0, stop: int | None = None) -> Iterator[SampleRef]:
        """Samples ``start:stop`` in frame-major order."""
        cameras = len(self.cameras)
        for i in range(start, len(self) if stop is None else stop):
            frame, camera = divmod(i, cameras)
            yield SampleRef(
                self.source, self.subject, self.sequence, self.frames[frame], self.cameras[camera], self.root
            )

    def keys(self) -> list[str]:
        """Every sample's key, without making its SampleRef (the listing digest hashes ~38M of them)."""
        ids = (self.source, self.subject, self.sequence)
        return [sample_key(*ids, frame, camera) for frame in self.frames for camera in self.cameras]


@dataclass(frozen=True)
class ShardPlan:
    """One shard: consecutive sample ranges ``(block, start, stop)`` of one source's blocks."""

    source: str
    index: int
    spans: tuple[tuple[SampleBlock, int, int], ...]

    @property
    def name(self) -> str:
        return shard_name(self.source, self.index)

    @property
    def samples(self) -> tuple[SampleRef, ...]:
        return tuple(ref for block, start, stop in self.spans for ref in block.refs(start, stop))

    def __len__(self) -> int:
        return sum(stop - start for _, start, stop in self.spans)


# ------------------------------------------------------------------------------------------------ listing


@dataclass(frozen=True)
class Skip:
    """An input the listing leaves out, and why: listed in ``pack_report.json`` and the printed summary, and
    refused by ``--strict``, because a silently dropped camera, sequence or frame range looks like a complete
    data set."""

    kind: Literal["participant", "sequence", "camera", "untracked_frames"]
    path: str
    reason: str

    def line(self) -> str:
        return f"{self.kind} {self.path}: {self.reason}"


def _camera_serials(dataset: NersembleDataset, subject: str) -> list[str]:
    """Cameras of a subject: any serial with a colour or alpha video in one of its sequences, so a camera whose
    colour video is missing from a sequence is listed (and its units fail naming the file), never dropped."""
    found = set()
    for sequence in dataset.sequences(subject):
        for folder in ("images", "alpha_maps"):
            path = dataset.sequence_dir(subject, sequence) / folder
            found |= {p.name[4:-4] for p in path.glob("cam_*.mp4")} if path.is_dir() else set()
    return sorted(found)


def _frame_ranges(frames: Sequence[int]) -> str:
    """Sorted frame numbers as ``a-b`` ranges: ``0-3, 7, 9-12``."""
    ranges: list[list[int]] = []
    for frame in frames:
        if ranges and frame == ranges[-1][1] + 1:
            ranges[-1][1] = frame
        else:
            ranges.append([frame, frame])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def _layout_skips(dataset: NersembleDataset, subject: str, serials: Sequence[str]) -> list[Skip]:
    """Sequence folders without images/ and calibrated cameras without a video in any sequence."""
    skips = [
        Skip("sequence", str(path), "no images/ folder: not a captured sequence")
        for path in dataset.ignored_sequence_folders(subject)
    ]
    skips += [
        Skip(
            "camera",
            f"{dataset.root / subject} camera {serial}",
            f"calibrated in {dataset.camera_params_path(subject)} but no sequence has a video of it",
        )
        for serial in sorted(set(dataset.serials(subject)) - set(serials))
    ]
    return skips


def _untracked(dataset: NersembleDataset, subject: str, sequence: str, tracking: FlameTracking) -> list[Skip]:
    """Video frames without a tracking row: they have no crop and no pose map, so they are not packed."""
    count_from = dataset.video_path(subject, sequence, dataset.sequence_serials(subject, sequence)[0])
    try:
        n_frames = video_frame_count(count_from)
    except VideoError as exc:
        raise NersembleError(str(exc)) from exc
    missing = sorted(set(range(n_frames)) - {int(f) for f in tracking.frames})
    if not missing:
        return []
    reason = f"{len(missing)} of {n_frames} video frames have no row in {tracking.path}: frames {_frame_ranges(missing)}"
    return [Skip("untracked_frames", str(dataset.sequence_dir(subject, sequence)), reason)]


def list_nersemble(
    root: Path, n_shape: int | None = None, n_expr: int | None = None, skips: list[Skip] | None = None
) -> list[SampleBlock]:
    """Tracked frames of every camera, a block per sequence. Tracking (v2, else v1) is required: it gives the
    crop and the pose map. What the listing leaves out is appended to ``skips``.

    Reading it with the head model's sizes here, before any Ray work, refuses real 300/100-coefficient tracking
    read with a smaller model.
    """
    dataset = NersembleDataset(root)
    skips = [] if skips is None else skips
    skips += [
        Skip("participant", str(path), "folder name is not a 3-digit participant id")
        for path in dataset.ignored_participant_folders()
    ]
    blocks = []
    for subject in dataset.subjects():
        serials = tuple(_camera_serials(dataset, subject))
        skips += _layout_skips(dataset, subject, serials)
        for sequence in dataset.sequences(subject):
            tracking = sequence_tracking(dataset.sequence_dir(subject, sequence), n_shape, n_expr)
            if tracking is None:
                raise PackError(missing_tracking_message(dataset.sequence_dir(subject, sequence)))
            skips += _untracked(dataset, subject, sequence, tracking)
            frames = tuple(sorted(int(f) for f in tracking.frames))
            blocks.append(SampleBlock("nersemble", subject, sequence, frames, serials, str(root)))
    return blocks


def list_synthhuman(root: Path, subset: str = "all") -> list[SampleBlock]:
    """Every sample (a block each), or with ``subset="face"`` the face-crop part of the release (indices below
    98,040)."""
    indices = SynthHumanDataset(root).indices()
    if subset == "face":
        indices = [i for i in indices if i < SYNTHHUMAN_FACE_SAMPLES]
    return [SampleBlock("synthhuman", f"{i:07d}", "synthhuman", (0,), ("0",), str(root)) for i in indices]


def list_inputs(
    sources: Sequence[tuple[str, Path]],
    settings: PackSettings | None = None,
    model_sizes: tuple[int, int] | None = None,
    skips: list[Skip] | None = None,
) -> list[SampleBlock]:
    """The sorted input listing; ``model_sizes`` (n_shape, n_expr) of the head model reading the tracking; what
    the listing leaves out is appended to ``skips``. A source that yields no sample is refused (an empty or
    mistyped folder would otherwise pack nothing and succeed)."""
    settings = settings or PackSettings()
    blocks = []
    for kind, root in sources:
        if kind == "nersemble":
            if settings.flame_model is not None:
                check_flame_version(settings.flame_model, f"{root} ({TRACKING_V2}, {TRACKING_V1})")
            found = list_nersemble(Path(root), *(model_sizes or (None, None)), skips=skips)
        elif kind == "synthhuman":
            found = list_synthhuman(Path(root), settings.synthhuman_subset)
        else:
            raise PackError(f"unknown source kind {kind!r} for {root} (known: {list(SOURCES)})")
        if not sum(len(block) for block in found):
            raise PackError(
                f"--source {kind}:{root}: no sample to pack (an empty folder, or not the root of a {kind} "
                "release: see docs/formats.md)"
            )
        blocks += found
    ids = [(b.source, b.subject, b.sequence) for b in blocks]
    if len(set(ids)) != len(ids):
        raise PackError("two inputs give the same sample keys: pack each source folder once")
    return sorted(blocks)


# --------------------------------------------------------------------------------------------------- plan


def sample_bytes_bound(resolution: int) -> int:
    """Upper bound of one sample in a tar: raw rgb8 + normal16 + mask8 + posemap16, PNG overhead, json, headers."""
    raw = resolution * resolution * (3 + 6 + 1 + 6)
    return int(raw * 1.01) + 5 * 1024 + 16 * 1024


def plan_shards(
    blocks: Sequence[SampleBlock], samples_per_shard: int, max_shard_bytes: int, sample_bytes: int
) -> list[ShardPlan]:
    """Sorted blocks -> shards per source; whole frames stay together unless one frame exceeds the bounds."""
    per_shard = min(samples_per_shard, max_shard_bytes // sample_bytes)
    if per_shard < 1:
        raise PackError(
            f"max_shard_bytes={max_shard_bytes} is below one sample's bound ({sample_bytes} bytes)"
        )
    plans = []
    for source in sorted({b.source for b in blocks}):
        shards: list[list[list]] = [[]]  # shard -> spans [block, start, stop]
        filled = 0
        for block in sorted(b for b in blocks if b.source == source):
            frame_size = len(block.cameras)
            for start in range(0, len(block), frame_size):
                if filled and filled + frame_size > per_shard:
                    shards.append([])
                    filled = 0
                position, stop = start, start + frame_size
                while position < stop:  # a frame larger than a shard is split
                    if filled == per_shard:
                        shards.append([])
                        filled = 0
                    take = min(stop - position, per_shard - filled)
                    span = shards[-1][-1] if shards[-1] else None
                    if span is not None and span[0] is block and span[2] == position:
                        span[2] += take
                    else:
                        shards[-1].append([block, position, position + take])
                    position, filled = position + take, filled + take
        plans += [ShardPlan(source, i, tuple(map(tuple, spans))) for i, spans in enumerate(shards) if spans]
    return plans


# ---------------------------------------------------------------------------------------- image encoding


def square_box(
    x0: float, y0: float, x1: float, y1: float, margin: float = CROP_MARGIN
) -> tuple[int, int, int]:
    """A square integer window (x, y, side) around a box, ``margin`` times its larger extent."""
    side = max(int(round(max(x1 - x0, y1 - y0) * margin)), 2)
    return int(round((x0 + x1 - side) / 2)), int(round((y0 + y1 - side) / 2)), side


def crop(image: np.ndarray, box: tuple[int, int, int], resolution: int) -> np.ndarray:
    """Window ``box`` of ``image`` (zero outside it), area-resized to resolution x resolution.

    Downsampling by a non-integer factor (the usual head crop) takes :func:`area_window`, which reads the
    image in place and costs a quarter of OpenCV's general INTER_AREA; OpenCV keeps its fast integer-factor
    path and upsampling.
    """
    x, y, side = box
    if side > resolution and side % resolution:
        return area_window(image, box, resolution)
    canvas = np.zeros((side, side, *image.shape[2:]), dtype=image.dtype)
    sx0, sy0, sx1, sy1 = window_in_image(box, *image.shape[:2])
    if sx1 > sx0 and sy1 > sy0:
        canvas[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = image[sy0:sy1, sx0:sx1]
    interpolation = cv2.INTER_AREA if side >= resolution else cv2.INTER_LINEAR
    return cv2.resize(canvas, (resolution, resolution), interpolation=interpolation)


def crop_normals(normal: np.ndarray, mask: np.ndarray, box: tuple[int, int, int], resolution: int):
    """Crop and resize a normal map without mixing background into the edge: -> (normal [R,R,3], mask [R,R]).

    The masked normals and the mask are resampled together as one 4-channel image (each channel is resampled
    alone, so this is the same as two calls); only the window's part of the image is weighted.
    """
    x, y, side = box
    x0, y0, x1, y1 = window_in_image(box, *mask.shape)
    weighted = mask_weighted(normal[y0:y1, x0:x1], mask[y0:y1, x0:x1])  # [h, w, 4]
    return from_mask_weighted(crop(weighted, (x - x0, y - y0, side), resolution))


def background_mask(
    rgb: np.ndarray, backdrop: np.ndarray, threshold: float = BACKGROUND_THRESHOLD
) -> np.ndarray:
    """Foreground by background subtraction: largest connected changed region, holes filled -> uint8 [H, W] (0 or
    255, like a decoded alpha map)."""
    if backdrop.shape != rgb.shape:
        backdrop = cv2.resize(backdrop, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_AREA)
    changed = (
        np.abs(rgb.astype(np.int16) - backdrop.astype(np.int16)).max(axis=-1) > threshold * 255
    ).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    changed = cv2.morphologyEx(changed, cv2.MORPH_OPEN, kernel)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(changed)
    if count < 2:
        return np.zeros(rgb.shape[:2], np.uint8)
    largest = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    contours, _ = cv2.findContours(largest, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros_like(largest)
    cv2.drawContours(filled, contours, -1, 255, thickness=cv2.FILLED)
    return filled


class _InMemory:
    """An image already in memory, read through the :class:`LazyAlpha` interface (full() and window())."""

    def __init__(self, image: np.ndarray):
        self.image = image

    def full(self) -> np.ndarray:
        return self.image

    def window(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return self.image[y0:y1, x0:x1]


def _head_box(
    pose: _FramePose | None, camera: Camera, alpha: LazyAlpha | _InMemory, frame: Any
) -> tuple[int, int, int]:
    """Square window around the projected FLAME head, else around the uint8 mask's foreground."""
    if pose is not None:
        return square_box(*camera.projected_bounds(pose.vertices.numpy()))
    box = _mask_box(alpha.full() > 127)
    if box is None:
        raise PackError(
            f"{frame.subject}/{frame.sequence}/cam_{frame.serial} frame {frame.frame}: empty mask, no tracking"
        )
    return square_box(*box)


def _mask_box(foreground: np.ndarray) -> tuple[float, float, float, float] | None:
    ys, xs = np.nonzero(foreground)
    return (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if len(xs) else None


# ------------------------------------------------------------------------------------------------ the job


# what pack_settings.json keeps besides the PackSettings: the shard limits and the digest of the input listing
PACK_RECORD = ("samples_per_shard", "max_shard_bytes", "listing_sha256")


class PackSettings(StrictConfig):
    """How samples are made; kept in ``pack_settings.json`` (with the shard limits), checked on resume."""

    resolution: int = 512
    normal_estimator: str | None = None  # local ONNX path; None: FLAME tracking rendered as a coarse fallback
    flame_model: str | None = None  # FLAME .pkl matching the tracking; None: the procedural head (demo data)
    synthhuman_subset: Literal["all", "face"] = "all"

    config_error: ClassVar[type[UserError]] = PackError

    @field_validator("resolution")
    @classmethod
    def _even(cls, resolution: int) -> int:
        if resolution < 2 or resolution % 2:
            raise PackError(f"--resolution must be a positive even number of pixels, got {resolution}")
        return resolution

    @field_validator("synthhuman_subset", mode="before")
    @classmethod
    def _subset(cls, subset: object) -> object:
        if subset not in SYNTHHUMAN_SUBSETS:
            raise PackError(f"--synthhuman-subset must be one of {SYNTHHUMAN_SUBSETS}, got {subset!r}")
        return subset

    def check_files(self) -> None:
        """The files the options name exist (checked before any input is read or Ray starts)."""
        for option, path in (("--normal-estimator", self.normal_estimator), ("--flame", self.flame_model)):
            if path is not None and not Path(path).is_file():
                raise PackError(f"{option} {path}: file not found")


def read_pack_settings(folder: str | os.PathLike) -> PackSettings:
    """The settings a shard folder (or URL, ``pipe:`` location: datasets.locations) was packed with, from its
    ``pack_settings.json`` (which also keeps the shard limits and the listing digest), validated like any
    config: a bad value is refused naming the file and the field."""
    path = join(folder, PACK_SETTINGS)
    try:
        found = parse_json(read_bytes(path), path, PackError)
    except OSError as err:
        raise PackError(
            f"{path}: cannot read the pack settings ({err}); is {folder} a geodiff4d pack output?"
        ) from err
    if not isinstance(found, dict):
        raise PackError(f"{path}: not a pack settings mapping; is {folder} a geodiff4d pack output?")
    return validate(path, {k: v for k, v in found.items() if k not in PACK_RECORD}, PackSettings)


def head_model(settings: PackSettings) -> FlameModel:
    """The FLAME model posing the tracking: the user's FLAME .pkl, else the procedural head."""
    if settings.flame_model is None:
        return procedural_head_model(seed=0)
    try:
        return FlameModel.from_pkl(settings.flame_model)
    except (OSError, KeyError, ValueError) as exc:
        raise PackError(f"--flame {settings.flame_model}: not a loadable FLAME model: {exc}") from exc


@dataclass
class _Encoded:
    rgb: np.ndarray  # uint8 [R, R, 3]
    mask: np.ndarray  # uint8 [R, R]: mask.png's pixels
    normal: np.ndarray  # uint16 [R, R, 3]: normal.png's pixels (normal_maps.normal_codes)
    # uint16 [R, R, 3] likewise; None: no FLAME fit (SynthHuman), no member written
    posemap: np.ndarray | None
    meta: dict[str, Any] = field(default_factory=dict)


class _Packed(NamedTuple):
    """A sample as written to the tar (member name -> bytes) and its json as a dict, which the shard's
    stats are made from (parsing the json back cost ~0.5 ms a sample)."""

    sample: dict[str, Any]
    meta: dict[str, Any]


@dataclass
class _FramePose:
    """One tracked frame posed once and shared by all its cameras."""

    vertices: torch.Tensor  # [V, 3] world space, as tracked
    pose_vertices: torch.Tensor  # [V, 3] world space, expression/jaw/eyes zeroed (the pose-map mesh)
    flame_json: dict[str, Any]  # the tracking row as written into every sample's json


class StageClock:
    """Seconds spent per named stage of a unit, so a benchmark can say where a sample's time goes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def timed_iter(self, stage: str, items: Iterable[T]) -> Iterator[T]:
        """``items`` with the time spent producing each one (e.g. decoding) charged to ``stage``."""
        iterator = iter(items)
        while True:
            with self(stage):
                item = next(iterator, _END)
            if item is _END:
                return
            yield item


_END: Any = object()


def _load_kernels(model: FlameModel) -> None:
    """Call the compiled kernels a sample runs once each, on tiny inputs of the types and array layouts that
    packing passes them: numba loads a kernel (from its cache, or compiles it) at its first call, ~0.5 s in all,
    which is the actor's start-up and not the first shard's work."""
    camera = look_at_camera(
        np.array([0.0, 0.0, 1.0]), np.zeros(3), np.array([0.0, 1.0, 0.0]), intrinsics(8, 8, 8), 8, 8
    )
    with torch.no_grad():
        vertices = model(FlameParams.zeros(1, model.n_shape, model.n_expr)).vertices[0]
    camera.projected_bounds(vertices.numpy())  # the head box
    render_normal_codes(vertices, model.faces, camera)  # normal and pose maps
    frame = np.zeros((9, 12, 3), np.uint8)
    # 9 px to 8 px takes the area kernels: a window's view into a frame, a whole frame, a mask, SynthHuman's alpha
    for image in (
        frame[:, :9],
        frame[:, :9].copy(),
        frame[:, :9, 0].copy(),
        frame[:, :9, 0].astype(np.float32),
    ):
        crop(image, (0, 0, 9), 8)
    normal = np.zeros((9, 9, 3), np.float32)
    normal[..., 2] = 1.0
    # ground-truth normal maps (procedural captures, SynthHuman): read, cropped, coded
    decode_normal_png(encode_png(normal_codes(*crop_normals(normal, np.ones((9, 9), bool), (0, 0, 9), 8))))


class PackJob:
    """Ray job: one unit = one shard. ``setup`` loads the FLAME model, the normal estimator and the compiled
    kernels once per actor.

    ``decode_threads`` only changes speed (decoding is bit-exact with any thread count), so it is not a setting.
    """

    def __init__(self, out: str | os.PathLike, settings: PackSettings, decode_threads: int = 1):
        self.out = str(out) if is_remote(out) else Path(out)  # a folder, an fsspec URL or a pipe: command
        self.settings, self.decode_threads = settings, decode_threads

    def setup(self) -> None:
        self.destination = destination(self.out)
        self.model = head_model(self.settings)
        self.estimator = (
            OnnxNormalEstimator(self.settings.normal_estimator) if self.settings.normal_estimator else None
        )
        # kept across units: a sequence's shards share its frame counts, tracking and video sizes, which
        # probing every video again per shard would cost (an open is ~5 ms at 1100x1604)
        self.datasets: dict[str, NersembleDataset] = {}
        self.decoded = DecodeCount()  # over the actor's life; a unit's stats take the difference
        self.cursors = VideoCursors(self.decoded, self.decode_threads)
        _load_kernels(self.model)

    def _dataset(self, root: str) -> NersembleDataset:
        if root not in self.datasets:
            self.datasets[root] = NersembleDataset(root, self.model.n_shape, self.model.n_expr)
        return self.datasets[root]

    def run(self, unit: WorkUnit) -> dict[str, Any]:
        """Write the shard; its stats also say how many video frames were decoded for how many packed."""
        plan: ShardPlan = unit.payload["plan"]
        started = time.time()
        self.clock, self.packed_video_frames = StageClock(), 0
        decoded_before = self.decoded.frames
        encode = self._nersemble_samples if plan.source == "nersemble" else self._synthhuman_samples
        packed = encode(plan.samples)
        name = f"{plan.name}.tar"
        with self.clock("write"), self.destination.open_write(name) as stream:
            records = write_tar(stream, [p.sample for p in packed], self.destination.path(name))
        ids = {p.sample["__key__"]: p.meta for p in packed}
        stats = shard_stats(name, ids, records)
        stats["decoded_video_frames"], stats["packed_video_frames"] = (
            self.decoded.frames - decoded_before,
            self.packed_video_frames,
        )
        stats["stage_seconds"] = {
            stage: round(seconds, 4) for stage, seconds in sorted(self.clock.seconds.items())
        }
        stats["inputs_sha256"] = shard_inputs_digest(
            plan
        )  # checked when a rerun resumes (check_committed_inputs)
        stats["unit_window"] = [started, time.time()]  # wall clock, so throughput can exclude actor start
        return stats

    # --- sample assembly
    def _sample(self, ref: SampleRef, enc: _Encoded) -> _Packed:
        with self.clock("encode"):
            meta = {**ref.ids(), "key": ref.key, "resolution": self.settings.resolution, **enc.meta}
            sample = {
                "__key__": ref.key,
                "rgb.png": encode_png(enc.rgb),
                "mask.png": encode_png(enc.mask),
                "normal.png": encode_png(enc.normal, name="normal map"),
                "json": json_bytes(meta, indent=None, sort_keys=True),
            }
            if enc.posemap is not None:
                sample["posemap.png"] = encode_png(enc.posemap, name="pose map")
            return _Packed(sample, meta)

    def _nersemble_samples(self, refs: Sequence[SampleRef]) -> list[_Packed]:
        """Each camera video of the shard is decoded once, from the shard's first frame (continuing the last
        shard's decoder where it stopped there); FLAME runs once per frame."""
        wanted: dict[tuple[str, str, str], dict[str, set[int]]] = {}
        for ref in refs:
            wanted.setdefault((ref.root, ref.subject, ref.sequence), {}).setdefault(ref.camera, set()).add(
                ref.frame
            )
        by_id = {(r.root, r.subject, r.sequence, r.camera, r.frame): r for r in refs}
        carriers: dict[tuple[str, str, str, int], str] = {}  # a frame -> its first camera's key in this shard
        for ref in refs:
            carriers.setdefault((ref.root, ref.subject, ref.sequence, ref.frame), ref.key)
        self.cursors.keep(
            {
                (*video, serial): min(frames)
                for video, cameras in wanted.items()
                for serial, frames in cameras.items()
            }
        )
        samples = []
        for (root, subject, sequence), cameras in sorted(wanted.items()):
            dataset = self._dataset(root)
            poses = self._poses(dataset.tracking(subject, sequence), set().union(*cameras.values()))
            for serial, frames in sorted(cameras.items()):
                # read only for a frame without alpha: a raw release's 3208x2200 JPEG takes ~60 ms per camera
                backdrop = functools.cache(functools.partial(_background, dataset, subject, serial))
                decoded = self.cursors.frames(
                    dataset, (root, subject, sequence, serial), min(frames), max(frames) + 1
                )
                for frame in self.clock.timed_iter("decode", decoded):
                    if frame.frame not in frames:
                        continue
                    self.packed_video_frames += 1 + (frame.alpha_map is not None)
                    ref = by_id[(root, subject, sequence, serial, frame.frame)]
                    pose = poses.get(frame.frame)
                    encoded = self._encode_nersemble(dataset, frame, backdrop, pose)
                    carrier = carriers[(root, subject, sequence, frame.frame)]
                    if pose is not None and carrier != ref.key:  # the frame's FLAME row is in one json
                        encoded.meta.update(flame=None, **{FLAME_IN: carrier})
                    samples.append(self._sample(ref, encoded))
        return samples

    def _poses(self, tracking: FlameTracking | None, frames: set[int]) -> dict[int, _FramePose]:
        """FLAME once per tracked frame of ``frames`` (not per camera): the tracked mesh, its expression-free
        pose-map mesh, its json.

        A few frames per model call: posing reads the blendshapes and correctives (MBs, evicted by each
        sample's decoding and encoding) once per call, and larger batches' temporaries outgrow the cache.
        """
        if tracking is None:
            return {}
        rows = [(int(frame), row) for row, frame in enumerate(tracking.frames) if int(frame) in frames]
        poses = {}
        with self.clock("flame"), torch.no_grad():
            for start in range(0, len(rows), POSE_BATCH):
                chunk = rows[start : start + POSE_BATCH]
                params = tracking.params[[row for _, row in chunk]]
                vertices = self.model(FlameParams.cat([params, params.with_zero_expression()])).vertices
                for i, (frame, row) in enumerate(chunk):
                    flame_json = {k: v.tolist() for k, v in tracking.params[row].to_numpy_dict().items()}
                    poses[frame] = _FramePose(vertices[i], vertices[len(chunk) + i], flame_json)
        return poses

    def _encode_nersemble(
        self,
        dataset: NersembleDataset,
        frame: Any,
        backdrop: Callable[[], np.ndarray | None],
        pose: _FramePose | None,
    ) -> _Encoded:
        res = self.settings.resolution
        if frame.alpha_map is not None:  # uint8 as mask.png stores it, looked up in the crop's window only
            alpha, mask_source = frame.alpha_map, "alpha"
        elif (background := backdrop()) is not None:
            with self.clock("mask"):
                alpha, mask_source = _InMemory(background_mask(frame.rgb, background)), "background"
        else:
            raise PackError(
                f"{dataset.video_path(frame.subject, frame.sequence, frame.serial)}: no alpha_maps video and no "
                f"BACKGROUND/image_{frame.serial}.jpg for background subtraction"
            )
        with self.clock("crop"):
            box = _head_box(pose, frame.camera, alpha, frame)
            camera = frame.camera.cropped(box[0], box[1], box[2], box[2]).resized(res, res)
            x0, y0, x1, y1 = window_in_image(box, *frame.image.shape[:2])
            in_window = (box[0] - x0, box[1] - y0, box[2])  # the crop's box in the window's coordinates
            mask = crop(alpha.window(x0, y0, x1, y1), in_window, res)
        with self.clock("colour"):  # YUV -> RGB of the crop's window only (the full frame when it was needed)
            window = frame.image.window(x0, y0, x1, y1)  # [y1 - y0, x1 - x0, 3]
        with self.clock("crop"):
            rgb = crop(window, in_window, res)
        gt = gt_normal_path(dataset.root, frame.subject, frame.sequence, frame.serial, frame.frame)
        if frame.color_matrix is not None:  # only the crop is corrected, not the full frame
            with self.clock("colour"):
                rgb = correct_colour(rgb, frame.color_matrix)
        with self.clock("normal"):
            if gt.is_file():
                normal = normal_codes(*crop_normals(*decode_normal_png(gt), box, res))
                normal_source = "gt"
            else:
                normal, normal_source = self._estimated_normals(rgb, mask, pose, camera)
        with self.clock("posemap"):
            posemap = self._posemap(pose, camera)
        meta = {
            "camera_params": camera.to_json(),
            "crop": list(box),
            "mask_source": mask_source,
            "normal_source": normal_source,
            "flame": None if pose is None else pose.flame_json,
            "color_calibrated": frame.color_matrix is not None,
            "tracking": frame.tracking_kind,
        }
        return _Encoded(rgb, mask, normal, posemap, meta)

    def _estimated_normals(
        self, rgb: np.ndarray, mask: np.ndarray, pose: _FramePose | None, camera: Camera
    ) -> tuple[np.ndarray, str]:
        """normal.png's pixels (uint16 [R, R, 3]) and their source: the ONNX estimator's normals inside the
        stored mask's foreground, else the tracked FLAME mesh rendered, else none (all zero)."""
        if self.estimator is not None:
            inside = mask > 127  # mask.png's foreground (also where alpha is exactly 0.5)
            return normal_codes(self.estimator(rgb.astype(np.float32) / 255.0), inside), "onnx"
        if pose is None:
            return np.zeros((*mask.shape, 3), np.uint16), "none"
        return render_normal_codes(pose.vertices, self.model.faces, camera)[0], "flame"

    def _posemap(self, pose: _FramePose | None, camera: Camera) -> np.ndarray:
        """posemap.png's pixels (uint16 [R, R, 3]), rendered at the packed resolution; all zero untracked."""
        res = self.settings.resolution
        if pose is None:
            return np.zeros((res, res, 3), np.uint16)
        return render_normal_codes(pose.pose_vertices, self.model.faces, camera)[0]

    def _synthhuman_samples(self, refs: Sequence[SampleRef]) -> list[_Packed]:
        res = self.settings.resolution
        indices: dict[str, list[int]] = {}
        for ref in refs:
            indices.setdefault(ref.root, []).append(int(ref.subject))
        # the job listed each folder when it planned; the shard reads only its own samples
        datasets = {root: SynthHumanDataset(root, indices=listed) for root, listed in indices.items()}
        samples = []
        for ref in refs:
            with self.clock("read"):
                item = datasets[ref.root][int(ref.subject)]
            with self.clock("crop"):
                box = square_box(
                    *(_mask_box(item.alpha > 0.5) or (0, 0, item.camera.width, item.camera.height))
                )
                camera = item.camera.cropped(box[0], box[1], box[2], box[2]).resized(res, res)
                rgb = crop(from_float(item.rgb), box, res)
                mask = from_float(crop(item.alpha, box, res))
            with self.clock("normal"):
                normal = normal_codes(*crop_normals(item.normal, item.mask & (item.alpha > 0.5), box, res))
            meta = {
                "camera_params": camera.to_json(),
                "crop": list(box),
                "mask_source": "alpha",
                "normal_source": "gt",
                "flame": None,
                "color_calibrated": False,
            }
            # no FLAME fit, so no pose map: the loader gives zeros where a sample has none
            samples.append(self._sample(ref, _Encoded(rgb, mask, normal, None, meta)))
        return samples


def _background(dataset: NersembleDataset, subject: str, serial: str) -> np.ndarray | None:
    path = dataset.root / subject / "sequences" / "BACKGROUND" / f"image_{serial}.jpg"
    if not path.is_file():
        return None
    return read_rgb8(path)


# ------------------------------------------------------------------------------------------------ driver


PACK_REPORT = "pack_report.json"  # what the listing left out, beside the manifest
SUMMARY_SKIPS = 20  # skips printed in the summary; pack_report.json holds all


@dataclass
class PackReport:
    job: JobReport
    shards: int
    samples: int
    out: str  # the destination as given: a folder, an fsspec URL or a pipe: command
    skips: list[Skip] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.job.ok

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def summary(self) -> str:
        lines = [
            f"packed {self.samples} samples in {self.shards} shards under {self.out}",
            self.job.summary(),
        ]
        if self.skips:
            lines.append(f"skipped {len(self.skips)} input(s) (all in {join(self.out, PACK_REPORT)}):")
            lines += [f"  {skip.line()}" for skip in self.skips[:SUMMARY_SKIPS]]
            if len(self.skips) > SUMMARY_SKIPS:
                lines.append(f"  ... {len(self.skips) - SUMMARY_SKIPS} more")
        return "\n".join(lines)


def check_strict(skips: Sequence[Skip]) -> None:
    """``--strict``: any input the listing leaves out is an error, named with the first few."""
    if skips:
        shown = "\n".join(f"  {skip.line()}" for skip in skips[:SUMMARY_SKIPS])
        more = f"\n  ... {len(skips) - SUMMARY_SKIPS} more" if len(skips) > SUMMARY_SKIPS else ""
        raise PackError(f"--strict: the listing leaves out {len(skips)} input(s):\n{shown}{more}")


def check_synthhuman_convention(root: Path) -> None:
    """SynthHuman's normal axes are undocumented: derive them from depth + K on the first samples and refuse
    to pack when they are not the convention the reader assumes."""
    dataset = SynthHumanDataset(root)
    fit = derive_normal_convention(dataset, n_samples=8)
    if not fit.matches_assumed:
        raise PackError(
            f"{root}: stored normals follow {fit.matrix.tolist()} (ours = M @ stored; median {fit.median_error_deg:.1f} "
            f"deg against normals from depth + K over {fit.n_pixels} pixels), not the convention the reader assumes "
            "(synthhuman.SYNTHHUMAN_NORMAL_TO_OURS): refusing to pack normals in the wrong axes"
        )


def listing_digest(blocks: Sequence[SampleBlock]) -> str:
    """sha256 of the sorted sample keys joined by newlines, a block at a time: the shard plan is a function of
    it, so a rerun can tell that it changed."""
    digest = hashlib.sha256()
    for i, block in enumerate(blocks):
        digest.update((("\n" if i else "") + "\n".join(block.keys())).encode())
    return digest.hexdigest()


def shard_input_files(plan: ShardPlan) -> list[Path]:
    """Every file a shard is made from, under its resolved root: for NeRSemble the subject's calibration (camera
    parameters, colour correction), the sequence folder (videos, alpha maps, both tracking files, ground truth)
    and the BACKGROUND plates; for SynthHuman the sample's member files (present or not)."""
    files: set[Path] = set()
    for block, _, _ in plan.spans:
        root = Path(block.root).resolve()
        if block.source == "nersemble":
            sequences = root / block.subject / "sequences"
            folders = (
                root / block.subject / "calibration",
                sequences / block.sequence,
                sequences / BACKGROUND_SEQUENCE,
            )
            files |= {path for folder in folders for path in files_under(folder)}
        else:
            files |= {member_path(root, int(block.subject), member) for member in SYNTHHUMAN_MEMBERS}
    return sorted(files)


def shard_inputs_digest(plan: ShardPlan) -> str:
    """sha256 over a shard's input files by absolute path, size and mtime (-1 when absent), kept in its commit
    marker: keys alone miss a re-download, a v1 -> v2 tracking switch, a new colour calibration or another root
    with the same keys, and resuming over them would mix old and new samples under one manifest."""
    return files_digest(shard_input_files(plan))


def check_committed_inputs(plans: Sequence[ShardPlan], commits: CommitLog) -> None:
    """Refuse to resume when a committed shard's input files changed since it was written (its samples would be
    stale beside the new ones); shards that failed or never ran are unaffected, so fixing a broken input resumes."""
    stale = [
        plan.name
        for plan in plans
        if commits.is_committed(plan.name)
        and commits.stats(plan.name).get("inputs_sha256", "") != shard_inputs_digest(plan)
    ]
    if stale:
        raise PackError(
            f"{commits.folder}: the input files of {len(stale)} committed shard(s) changed since they were packed "
            f"({', '.join(stale[:5])}{', ...' if len(stale) > 5 else ''}: a file re-downloaded, touched, added or "
            "removed, or another root): resuming would mix old and new samples; pack into a new output folder"
        )


def _check_counts(workers: int, samples_per_shard: int, max_shard_bytes: int, max_retries: int) -> None:
    for option, value, least in (
        ("--workers", workers, 1),
        ("--samples-per-shard", samples_per_shard, 1),
        ("--max-shard-mb", max_shard_bytes, 1),
        ("max_retries", max_retries, 0),
    ):
        if not isinstance(value, int) or value < least:
            raise PackError(f"{option} must be an integer >= {least}, got {value}")


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
    strict: bool = False,
) -> PackReport:
    """Validate options and inputs, plan, run every uncommitted shard on Ray, rebuild the manifest.

    Everything a user can get wrong (numbers, files, tracking, listing changed since the last run) raises one of
    ``PACK_INPUT_ERRORS`` before Ray starts and before ``pack_settings.json`` is written, so a corrected rerun
    is never refused by a half-written folder.
    """
    out = destination(job.out)
    job.settings.check_files()
    _check_counts(workers, samples_per_shard, max_shard_bytes, max_retries)
    if job.settings.normal_estimator is not None:
        OnnxNormalEstimator(job.settings.normal_estimator)  # loads, or names the file
    model = head_model(job.settings)
    skips: list[Skip] = []
    blocks = list_inputs(sources, job.settings, (model.n_shape, model.n_expr), skips)
    if strict:
        check_strict(skips)
    for kind, root in sources:
        if kind == "synthhuman" and any(block.source == "synthhuman" for block in blocks):
            check_synthhuman_convention(Path(root))
    plans = plan_shards(
        blocks, samples_per_shard, max_shard_bytes, sample_bytes_bound(job.settings.resolution)
    )
    out.prepare()
    _check_settings(out, job.settings, samples_per_shard, max_shard_bytes, listing_digest(blocks))
    out.write_bytes(PACK_REPORT, json_bytes({"skipped": [asdict(skip) for skip in skips]}))
    commits = DestinationCommitLog(out)
    check_committed_inputs(plans, commits)
    for plan in plans:  # a tar without its marker is a leftover of a killed run: it is rewritten
        if not commits.is_committed(plan.name):
            out.remove(f"{plan.name}.tar")
    connect(address)
    units = [WorkUnit(plan.name, {"plan": plan}) for plan in plans]
    # one CPU per actor: a sample's work is single-threaded compiled loops and small torch ops, for which intra-op
    # threads only contend; packing scales over shards (more workers), not threads per worker
    report = run_units(
        job,
        units,
        commits,
        workers=workers,
        cpus_per_worker=1,
        max_retries=max_retries,
        desc="pack",
        progress=progress,
    )
    samples = build_manifest(out)  # last: a reader never sees a manifest naming a shard not yet written
    return PackReport(
        report, shards=len(plans) - len(report.failed), samples=samples, out=out.location, skips=skips
    )


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
    synthhuman_subset: str = "all",
    decode_threads: int = 1,
    strict: bool = False,
) -> PackReport:
    """``geodiff4d pack``: shards ``{source}-{shard:06d}.tar`` + stats markers + ``manifest.parquet`` in ``out``,
    a folder, an fsspec URL (``s3://``, ``gs://``, ``file://``) or a ``pipe:`` command (datasets.destinations)."""
    if isinstance(out, PurePath) and URL_LIKE.match(str(out)):  # Path() turned s3://b/x into a folder s3:/b/x
        raise PackError(f"--out {out}: a URL given as a path; pass it as a string")
    destination(
        out
    )  # refuses a location that cannot be written (http, a missing fsspec package) before any work
    settings = PackSettings(
        resolution=resolution,
        normal_estimator=str(normal_estimator) if normal_estimator else None,
        flame_model=str(flame_model) if flame_model else None,
        synthhuman_subset=synthhuman_subset,
    )
    return pack_with(
        PackJob(out, settings, decode_threads),
        sources,
        workers=workers,
        address=address,
        samples_per_shard=samples_per_shard,
        max_shard_bytes=max_shard_bytes,
        max_retries=max_retries,
        progress=progress,
        strict=strict,
    )


def _check_settings(
    out: Destination, settings: PackSettings, samples_per_shard: int, max_shard_bytes: int, digest: str
) -> None:
    """Resuming with other settings or another input listing would mix or keep stale shards under one manifest:
    refuse it. Written only after the inputs validated."""
    path = out.path(PACK_SETTINGS)
    wanted = {
        **settings.model_dump(),
        "samples_per_shard": samples_per_shard,
        "max_shard_bytes": max_shard_bytes,
        "listing_sha256": digest,
    }
    stored = parse_json(out.read_bytes(PACK_SETTINGS), path, PackError) if out.exists(PACK_SETTINGS) else {}
    if stored.get("listing_sha256", digest) != digest:
        raise PackError(
            f"{path}: the input listing changed since this folder was packed (samples added or removed; "
            f"listing sha256 {stored['listing_sha256'][:12]}... then, {digest[:12]}... now): its shards and "
            "manifest would be stale; pack into a new output folder"
        )
    refuse_differences(path, settings_differences(stored, wanted) if stored else [], PackError)
    if not stored:
        out.write_bytes(PACK_SETTINGS, json_bytes(wanted))
