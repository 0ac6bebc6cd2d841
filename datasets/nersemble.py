"""NeRSemble v2 layout: writer (for the procedural generator) and reader (for real and procedural data).

``{pid:03d}/calibration/camera_params.json`` (``world_2_cam`` per serial, ``intrinsics`` shared in the raw
release or per serial in the benchmark release), ``{pid}/sequences/{SEQ}/images/cam_{serial}.mp4``,
``.../alpha_maps/cam_{serial}.mp4`` and ``.../tracking/flame2023_tracking_v2.npz`` (v1 ``flame2023_tracking.npz``
as the fallback; formats and meaning in ``flame_tracking``). The raw release's
``calibration/color_calibration.json`` maps serial -> a colour correction matrix (``colour_calibration``).
Every inconsistency raises ``NersembleError`` naming the file, because silent misalignment of cameras,
frames or parameters would poison training data without any visible symptom.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from geodiff4d.core.errors import UserError
from geodiff4d.core.io.json_yaml import read_json, write_json
from geodiff4d.core.io.video import (
    DecodeCount,
    LazyAlpha,
    LazyRgb,
    VideoError,
    iter_video_range,
    video_frame_count,
    video_size,
)
from geodiff4d.datasets.cameras import Camera, CameraError, intrinsics_problem
from geodiff4d.datasets.colour_calibration import ccm_shape_error
from geodiff4d.datasets.flame import FlameParams
from geodiff4d.datasets.flame_tracking import FlameTracking, sequence_tracking

_SUBJECT_RE = re.compile(r"^\d{3}$")
_VIDEO_RE = re.compile(r"^cam_(.+)\.mp4$")
# The raw release's one shared K is for its full-size images (nersemble-data's README: "3208x2200 images"),
# portrait as (width, height); videos downscaled from them round each side to an even number of pixels.
RAW_INTRINSICS_SIZE = (2200, 3208)
SIZE_ROUNDING_PX = 2
BACKGROUND_SEQUENCE = "BACKGROUND"  # {pid}/sequences/BACKGROUND/image_{serial}.jpg: empty-studio plates


class NersembleError(UserError, ValueError):
    """Missing, malformed or inconsistent NeRSemble files; the message names the file."""


@dataclass
class NersembleFrame:
    subject: str
    sequence: str
    frame: int
    serial: str
    image: LazyRgb  # the decoded frame, converted to RGB where asked (a crop converts only its window)
    alpha_map: LazyAlpha | None  # the decoded alpha map, read where asked (a crop reads only its window)
    camera: Camera
    flame: FlameParams | None  # B = 1 tracking row of this frame, None when the frame is not tracked
    tracking_kind: str | None  # "v2" or "v1": the tracking file the row came from
    color_matrix: np.ndarray | None  # (3, terms) CCM of the camera from color_calibration.json, if any

    @property
    def alpha8(self) -> np.ndarray | None:
        """uint8 [H, W] as decoded, None without an alpha_maps video."""
        return None if self.alpha_map is None else self.alpha_map.full()

    @property
    def alpha(self) -> np.ndarray | None:
        """float32 [H, W] in [0, 1] (a crop takes ``alpha_map``'s window: a full-frame float copy is 4x the
        bytes)."""
        return None if self.alpha8 is None else self.alpha8.astype(np.float32) / 255.0

    @property
    def rgb(self) -> np.ndarray:
        """uint8 [H, W, 3] as decoded (colour correction is the consumer's step: see color_matrix)."""
        return self.image.full()


# ----------------------------------------------------------------------------------------------- writing


def write_camera_params(
    path: str | os.PathLike, cameras: Mapping[str, Camera], variant: Literal["benchmark", "raw"] = "benchmark"
) -> None:
    """camera_params.json: ``world_2_cam`` per serial; ``intrinsics`` per serial (benchmark) or shared (raw)."""
    if variant not in ("benchmark", "raw"):
        raise ValueError(f"variant must be 'benchmark' or 'raw', got {variant!r}")
    data: dict[str, Any] = {
        "world_2_cam": {serial: cam.world_to_cam.tolist() for serial, cam in cameras.items()}
    }
    if variant == "benchmark":
        data["intrinsics"] = {serial: cam.K.tolist() for serial, cam in cameras.items()}
    else:
        first = next(iter(cameras.values()))
        if any(
            not np.array_equal(cam.K, first.K) or (cam.width, cam.height) != (first.width, first.height)
            for cam in cameras.values()
        ):
            raise ValueError(f"{path}: the raw variant stores one shared intrinsics matrix; cameras differ")
        reference = raw_reference_size(first.K, first.width, first.height)
        if reference is None:
            raise ValueError(
                f"{path}: {first.width}x{first.height} cameras are not a downscale of the raw release's "
                f"{RAW_INTRINSICS_SIZE[0]}x{RAW_INTRINSICS_SIZE[1]} images, for which its shared K is given"
            )
        data["intrinsics"] = first.resized(*reference).K.tolist()
    write_json(path, data, indent=2, sort_keys=False, newline=True)


def raw_reference_size(K: np.ndarray, width: int, height: int) -> tuple[int, int] | None:
    """The raw release's full image size (portrait or landscape: the one whose centre is nearer K's principal
    point) when ``width`` x ``height`` is a uniform downscale of it, else None."""
    portrait = K[1, 2] >= K[0, 2]
    ref_width, ref_height = RAW_INTRINSICS_SIZE if portrait else RAW_INTRINSICS_SIZE[::-1]
    if abs(height - ref_height * width / ref_width) > SIZE_ROUNDING_PX:
        return None
    return ref_width, ref_height


def write_color_calibration(path: str | os.PathLike, matrices: Mapping[str, np.ndarray]) -> None:
    """color_calibration.json: serial -> (3, terms) colour correction matrix (see ``colour_calibration``)."""
    matrices = {s: np.asarray(m, np.float64).tolist() for s, m in matrices.items()}
    write_json(path, matrices, indent=2, sort_keys=False, newline=True)


# ----------------------------------------------------------------------------------------------- reading


def _matrix(value: Any, shape: tuple[int, int], path: Path, field: str) -> np.ndarray:
    try:
        matrix = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise NersembleError(f"{path}: field {field} is not a numeric matrix: {exc}") from exc
    if matrix.shape != shape:
        raise NersembleError(f"{path}: field {field} must have shape {shape}, got {matrix.shape}")
    return matrix


def _video_rate(path: Path) -> float:
    """A video's frame rate in frames per second, from its stream (average, else guessed)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise NersembleError(f"{path}: the video records no frame rate")
    return float(rate)


class NersembleDataset:
    """Subjects, sequences, cameras, tracking and frames of a NeRSemble v2 folder (raw or benchmark)."""

    def __init__(self, root: str | os.PathLike, n_shape: int | None = None, n_expr: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise NersembleError(f"{self.root}: NeRSemble folder not found")
        self.n_shape, self.n_expr = n_shape, n_expr
        self._calibration: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray], bool]] = {}
        self._frame_counts: dict[tuple[str, str], int] = {}
        self._tracking: dict[tuple[str, str], FlameTracking | None] = {}
        self._video_sizes: dict[Path, tuple[int, int]] = {}  # probing a video opens it (~5 ms at 1100x1604)

    # --- layout
    def subjects(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _SUBJECT_RE.match(p.name))

    def ignored_participant_folders(self) -> list[Path]:
        """Folders of the root that ``subjects`` leaves out (names other than exactly 3 digits)."""
        return sorted(p for p in self.root.iterdir() if p.is_dir() and not _SUBJECT_RE.match(p.name))

    def _sequence_folders(self, subject: str) -> list[Path]:
        folder = self.root / subject / "sequences"
        if not folder.is_dir():
            raise NersembleError(f"{folder}: sequences folder not found")
        return sorted(p for p in folder.iterdir() if p.is_dir())

    def sequences(self, subject: str) -> list[str]:
        """Sequences with an images/ folder (BACKGROUND and other extras are skipped)."""
        return [p.name for p in self._sequence_folders(subject) if (p / "images").is_dir()]

    def ignored_sequence_folders(self, subject: str) -> list[Path]:
        """Folders under sequences/ without images/ that ``sequences`` leaves out; the BACKGROUND plates (a
        documented part of the raw release, read for background subtraction) are not counted."""
        return [
            p
            for p in self._sequence_folders(subject)
            if p.name != BACKGROUND_SEQUENCE and not (p / "images").is_dir()
        ]

    def camera_params_path(self, subject: str) -> Path:
        return self.root / subject / "calibration" / "camera_params.json"

    def video_path(self, subject: str, sequence: str, serial: str) -> Path:
        return self.root / subject / "sequences" / sequence / "images" / f"cam_{serial}.mp4"

    def alpha_path(self, subject: str, sequence: str, serial: str) -> Path:
        return self.root / subject / "sequences" / sequence / "alpha_maps" / f"cam_{serial}.mp4"

    def sequence_dir(self, subject: str, sequence: str) -> Path:
        return self.root / subject / "sequences" / sequence

    # --- calibration
    def _calibration_of(self, subject: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], bool]:
        """(world_2_cam per serial, K per serial, whether K is the raw release's shared one)."""
        if subject not in self._calibration:
            path = self.camera_params_path(subject)
            data = read_json(path, NersembleError)
            if not isinstance(data, dict) or not isinstance(data.get("world_2_cam"), dict):
                raise NersembleError(f"{path}: missing 'world_2_cam' (serial -> 4x4)")
            if "intrinsics" not in data:
                raise NersembleError(f"{path}: missing 'intrinsics'")
            extrinsics = {
                str(s): _matrix(m, (4, 4), path, f"world_2_cam[{s}]") for s, m in data["world_2_cam"].items()
            }
            if isinstance(data["intrinsics"], dict):  # benchmark release: one K per serial
                missing = sorted(set(extrinsics) - set(map(str, data["intrinsics"])))
                if missing:
                    raise NersembleError(f"{path}: no intrinsics for serial(s) {missing}")
                intrinsics = {
                    s: _matrix(data["intrinsics"][s], (3, 3), path, f"intrinsics[{s}]") for s in extrinsics
                }
            else:  # raw release: one shared K
                shared = _matrix(data["intrinsics"], (3, 3), path, "intrinsics")
                intrinsics = {s: shared for s in extrinsics}
            self._calibration[subject] = (extrinsics, intrinsics, not isinstance(data["intrinsics"], dict))
        return self._calibration[subject]

    def serials(self, subject: str) -> list[str]:
        """Calibrated serials (camera_params.json)."""
        return sorted(self._calibration_of(subject)[0])

    def _camera(self, subject: str, serial: str, size: tuple[int, int]) -> Camera:
        """The camera of ``serial`` for its video's ``size``: the raw release's shared K (given for full-size
        images) is scaled to it; any K is checked against it (principal point inside, plausible focal)."""
        extrinsics, intrinsics, shared = self._calibration_of(subject)
        path, (width, height) = self.camera_params_path(subject), size
        try:
            camera = Camera(extrinsics[serial], intrinsics[serial], width, height)
            if shared:
                reference = raw_reference_size(camera.K, width, height)
                if reference is None:
                    raise NersembleError(
                        f"{path}: camera {serial}: its {width}x{height} video is not a downscale of the raw "
                        f"release's {RAW_INTRINSICS_SIZE[0]}x{RAW_INTRINSICS_SIZE[1]} images, for which the "
                        "shared intrinsics are given: cannot scale them"
                    )
                camera = Camera(extrinsics[serial], intrinsics[serial], *reference).resized(width, height)
        except CameraError as exc:
            raise NersembleError(f"{path}: serial {serial}: {exc}") from exc
        if (problem := intrinsics_problem(camera.K, width, height)) is not None:
            raise NersembleError(
                f"{path}: camera {serial}: intrinsics do not fit its {width}x{height} video: {problem}"
            )
        return camera

    def sequence_serials(self, subject: str, sequence: str) -> list[str]:
        """Serials with a video in this sequence; every one must be calibrated."""
        folder = self.video_path(subject, sequence, "x").parent
        serials = sorted(m.group(1) for p in folder.iterdir() if (m := _VIDEO_RE.match(p.name)))
        calibrated = set(self.serials(subject))
        for serial in serials:
            if serial not in calibrated:
                raise NersembleError(
                    f"{self.video_path(subject, sequence, serial)}: camera serial {serial} is missing from "
                    f"{self.camera_params_path(subject)}"
                )
        return serials

    def _video_size(self, path: Path) -> tuple[int, int]:
        if path not in self._video_sizes:
            try:
                self._video_sizes[path] = video_size(path)
            except VideoError as exc:
                raise NersembleError(str(exc)) from exc
        return self._video_sizes[path]

    def cameras(self, subject: str, sequence: str | None = None) -> dict[str, Camera]:
        """Calibrated cameras sized by their videos (in ``sequence``, else the first sequence that has one).

        A calibrated camera without any video (e.g. a withheld benchmark view) takes the rig's common size.
        """
        sizes: dict[str, tuple[int, int]] = {}
        for seq in [sequence] if sequence is not None else self.sequences(subject):
            for serial in self.sequence_serials(subject, seq):
                sizes.setdefault(serial, self._video_size(self.video_path(subject, seq, serial)))
        common = set(sizes.values())
        cameras = {}
        for serial in self.serials(subject):
            if serial not in sizes and len(common) != 1:
                raise NersembleError(
                    f"{self.camera_params_path(subject)}: no video gives the image size of camera {serial}"
                )
            cameras[serial] = self._camera(subject, serial, sizes.get(serial) or next(iter(common)))
        return cameras

    def color_calibration(self, subject: str) -> dict[str, np.ndarray] | None:
        """serial -> (3, terms) CCM from calibration/color_calibration.json, None when the file is absent."""
        path = self.root / subject / "calibration" / "color_calibration.json"
        if not path.exists():
            return None
        data = read_json(path, NersembleError)
        if not isinstance(data, dict):
            raise NersembleError(f"{path}: expected an object serial -> colour correction matrix")
        matrices = {}
        for serial, value in data.items():
            try:
                matrix = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise NersembleError(f"{path}: field [{serial}] is not a numeric matrix: {exc}") from exc
            if (problem := ccm_shape_error(matrix)) is not None:
                raise NersembleError(f"{path}: field [{serial}]: {problem}")
            matrices[str(serial)] = matrix
        return matrices

    # --- frames and tracking
    def fps(self, subject: str, sequence: str) -> float:
        """Frame rate of the sequence's colour videos (the mono FLAME-avatar benchmark's: 24.3), as recorded in
        them; every camera must agree, since JOD weighs flicker by it."""
        rates = {
            serial: _video_rate(self.video_path(subject, sequence, serial))
            for serial in self.sequence_serials(subject, sequence)
        }
        if not rates:
            raise NersembleError(f"{self.video_path(subject, sequence, 'x').parent}: no cam_*.mp4 videos")
        if max(rates.values()) - min(rates.values()) > 1e-3:
            raise NersembleError(
                f"{self.sequence_dir(subject, sequence)}: cameras at different frame rates {rates}"
            )
        return next(iter(rates.values()))

    def frame_count(self, subject: str, sequence: str) -> int:
        """Frames per camera; all colour and alpha videos of the sequence must agree."""
        key = (subject, sequence)
        if key not in self._frame_counts:
            counts: dict[Path, int] = {}
            for serial in self.sequence_serials(subject, sequence):
                alpha = self.alpha_path(subject, sequence, serial)
                for path in (
                    self.video_path(subject, sequence, serial),
                    *([alpha] if alpha.exists() else []),
                ):
                    try:
                        counts[path] = video_frame_count(path)
                    except VideoError as exc:
                        raise NersembleError(str(exc)) from exc
            if not counts:
                raise NersembleError(f"{self.video_path(subject, sequence, 'x').parent}: no cam_*.mp4 videos")
            majority = Counter(counts.values()).most_common(1)[0][0]
            agreeing = next(path for path, count in counts.items() if count == majority)
            for path, count in counts.items():
                if count != majority:
                    raise NersembleError(
                        f"{path}: frame-count mismatch: {count} frames, but {agreeing} (and the majority of "
                        f"the sequence's videos) has {majority}"
                    )
            self._frame_counts[key] = majority
        return self._frame_counts[key]

    def tracking(self, subject: str, sequence: str) -> FlameTracking | None:
        """FLAME tracking of the sequence (v2, else v1; None when neither exists), sized to the dataset's model.

        Read and checked once per sequence and kept: every camera's ``frames`` and packing's posing ask for it.
        """
        key = (subject, sequence)
        if key not in self._tracking:
            tracking = sequence_tracking(self.sequence_dir(subject, sequence), self.n_shape, self.n_expr)
            if tracking is not None:  # rows are video frames 0..T-1 (read_nersemble_tracking checks frames)
                n_frames = self.frame_count(subject, sequence)
                if len(tracking.frames) > n_frames:
                    raise NersembleError(
                        f"{tracking.path}: {len(tracking.frames)} tracked frames, more than the videos' {n_frames}"
                    )
            self._tracking[key] = tracking
        return self._tracking[key]

    def _checked_stop(
        self, subject: str, sequence: str, serial: str, start: int, stop: int | None, n_frames: int
    ) -> int:
        """``stop`` (default: the video's end) once [start, stop) lies within the video and the camera exists."""
        stop = n_frames if stop is None else stop
        if not 0 <= start < stop <= n_frames:
            raise NersembleError(
                f"{self.video_path(subject, sequence, serial)}: frames [{start}, {stop}) are not "
                f"within its {n_frames} frames"
            )
        if serial not in self.sequence_serials(subject, sequence):
            raise NersembleError(f"{self.video_path(subject, sequence, serial)}: video not found")
        return stop

    def frames(
        self,
        subject: str,
        sequence: str,
        serial: str,
        start: int = 0,
        stop: int | None = None,
        threads: int = 1,
        count: DecodeCount | None = None,
    ) -> Iterator[NersembleFrame]:
        """Decoded frames ``start <= frame < stop`` of one camera with alpha, camera and the frame's tracking row.

        The videos are sought to ``start`` (see ``iter_video_range``); ``count`` accumulates decoded frames.
        """
        n_frames = self.frame_count(subject, sequence)
        stop = self._checked_stop(subject, sequence, serial, start, stop, n_frames)
        video = self.video_path(subject, sequence, serial)
        camera = self._camera(subject, serial, self._video_size(video))
        tracking = self.tracking(subject, sequence)
        tracked = 0 if tracking is None else len(tracking.frames)
        matrices = self.color_calibration(subject) or {}
        alpha_path = self.alpha_path(subject, sequence, serial)
        # as the official data manager reads alpha maps: the first channel of the RGB decode (not the luma plane,
        # which differs by one level in places), computed from luma alone (one channel, no RGB conversion)
        alphas = (
            iter_video_range(alpha_path, start, stop, threads=threads, count=count, pixels="alpha")
            if alpha_path.exists()
            else None
        )
        try:
            for index, image in iter_video_range(
                video, start, stop, threads=threads, count=count, pixels="lazy"
            ):
                alpha = next(alphas)[1] if alphas is not None else None
                if alpha is not None and alpha.shape != image.shape[:2]:
                    raise NersembleError(f"{alpha_path}: alpha size {alpha.shape} differs from {video}")
                yield NersembleFrame(
                    subject=subject,
                    sequence=sequence,
                    frame=index,
                    serial=serial,
                    image=image,
                    alpha_map=alpha,
                    camera=camera,
                    flame=tracking.params[index] if index < tracked else None,  # row t: frame t
                    tracking_kind=None if tracking is None else tracking.kind,
                    color_matrix=matrices.get(serial),
                )
        except VideoError as exc:
            raise NersembleError(str(exc)) from exc
        except StopIteration as exc:
            raise NersembleError(f"{alpha_path}: fewer frames than {video} ({n_frames})") from exc

    def iter_frames(
        self,
        subjects: list[str] | None = None,
        sequences: list[str] | None = None,
        serials: list[str] | None = None,
    ) -> Iterator[NersembleFrame]:
        """Every frame of every camera, sequence and subject (optionally filtered), in sorted order."""
        for subject in subjects or self.subjects():
            for sequence in self.sequences(subject):
                if sequences is not None and sequence not in sequences:
                    continue
                for serial in self.sequence_serials(subject, sequence):
                    if serials is None or serial in serials:
                        yield from self.frames(subject, sequence, serial)
