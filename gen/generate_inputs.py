"""Resolve one subject of a generate spec into tensors the sampler takes, before any Ray work starts.

Reference: a shard sample as packed, or a photo cropped around its face as packing crops heads (FLAME fitted
to the face's landmarks gives the head box and the reference pose map). Identity: FLAME shape and scale from
a tracking file or that fit. Driving: face crops per frame (a driving video's frames, a packed sequence's
frames, or renders of the identity's head making a tracking file's expressions) and per-frame FLAME motion.
The output tracking is the identity's shape with the driving motion; target cameras are cropped square
around the head (or generated on an orbit) at the model's resolution. Every failure names its input.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from geodiff4d.core.config import ConfigError
from geodiff4d.core.io.images import ImageError, read_rgb8
from geodiff4d.core.io.tensors import image_to_tensor, tensor_to_image
from geodiff4d.datasets.cameras import HEAD_FIELD_OF_VIEW_M, Camera, CameraError, intrinsics, look_at_camera
from geodiff4d.datasets.flame import FlameModel, FlameParams
from geodiff4d.datasets.frame_folder import FrameFolderError, read_cameras
from geodiff4d.datasets.loader import augment_driving
from geodiff4d.datasets.packing import crop, square_box
from geodiff4d.datasets.render import render_head, render_pose_map
from geodiff4d.gen.generate_spec import (
    FittedIdentity,
    JsonCameras,
    NersembleCameras,
    OrbitCameras,
    ShardDriving,
    ShardReference,
    SubjectSpec,
    TrackingDriving,
    VideoDriving,
)


class InputError(ConfigError):
    """An input the spec names cannot be used; the message names the spec, the field and the file."""


ORBIT_SERIAL = "orbit{:03d}"  # the serial of an orbit's i-th view


def input_error(spec_path: Path, index: int, field: str, message: str) -> InputError:
    return InputError(f"{spec_path}: subjects[{index}].{field}: {message}")


def chosen_serials(
    spec_path: Path, index: int, cameras: JsonCameras | NersembleCameras, available: Collection[str]
) -> list[str]:
    """The spec's ``serials`` (each checked to be in the rig), else every serial of the rig, sorted."""
    missing = sorted(set(cameras.serials or []) - set(available))
    if missing:
        source = cameras.cameras_json if isinstance(cameras, JsonCameras) else cameras.nersemble
        raise input_error(spec_path, index, "cameras.serials", f"{source} has no camera {missing}")
    return list(cameras.serials or sorted(available))


def camera_serials(spec_path: Path, index: int, spec: SubjectSpec) -> list[str]:
    """The serials a subject's units cover, from the rig's listing alone (no camera cropped, no frame decoded):
    what the driver plans with."""
    cams = spec.cameras
    if isinstance(cams, OrbitCameras):
        return [ORBIT_SERIAL.format(i) for i in range(cams.orbit)]
    if isinstance(cams, JsonCameras):
        try:
            return chosen_serials(spec_path, index, cams, read_cameras(cams.cameras_json))
        except (FrameFolderError, CameraError) as exc:
            raise input_error(spec_path, index, "cameras.cameras_json", str(exc)) from exc
    from geodiff4d.datasets.nersemble import NersembleDataset, NersembleError

    try:
        return chosen_serials(spec_path, index, cams, NersembleDataset(cams.nersemble).serials(cams.subject))
    except (NersembleError, OSError) as exc:
        raise input_error(spec_path, index, "cameras.nersemble", str(exc)) from exc


@dataclass
class SubjectInputs:
    name: str
    sequence: str
    ref_rgb: torch.Tensor  # [3, R, R] in [0, 1]
    ref_posemap: torch.Tensor  # [3, R, R] unit normals, expression zeroed
    driving: torch.Tensor  # [T, 3, r, r] face crops
    tracking: FlameParams  # T frames: identity shape/scale + driving motion
    cameras: dict[str, Camera]  # serial -> camera at R x R


@dataclass
class Resolver:
    """Resolves subjects for one model: `resolution` (R) and driving crop size `driving_size` (r)."""

    spec_path: Path
    head: FlameModel
    resolution: int
    driving_size: int

    def fail(self, index: int, field: str, message: str) -> InputError:
        return input_error(self.spec_path, index, field, message)

    # --- helpers
    def frontal_camera(self, width: int, height: int) -> Camera:
        """A camera 1 m in front of the FLAME origin that frames a head in an image of this size."""
        K = intrinsics(min(width, height) / HEAD_FIELD_OF_VIEW_M, width, height)
        return look_at_camera(
            np.array([0.0, 0.0, 1.0]), np.zeros(3), np.array([0.0, 1.0, 0.0]), K, width, height
        )

    def vertices(self, params: FlameParams) -> np.ndarray:
        """World vertices [T, V, 3] of tracking parameters: the one place that poses FLAME here (the NeRSemble
        tracking meaning, datasets.flame_tracking when it lands, is to be swapped in here and in datasets.render)."""
        with torch.no_grad():
            return self.head(params).vertices.double().numpy()

    def head_box(self, params: FlameParams, camera: Camera) -> tuple[int, int, int]:
        """Packing's square crop around the projected head, over every frame of `params`."""
        xy = camera.project(self.vertices(params).reshape(-1, 3))
        return square_box(xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max())

    def square_camera(self, camera: Camera, box: tuple[int, int, int]) -> Camera:
        return camera.cropped(box[0], box[1], box[2], box[2]).resized(self.resolution, self.resolution)

    def crops(self, rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """rgb [T, 3, H, W], mask [T, 1, H, W] -> unaugmented face crops [T, 3, r, r], as sampling always took."""
        from geodiff4d.gen.sample_frames import plain_driving_config

        config, rng = (
            plain_driving_config(self.driving_size),
            np.random.default_rng(0),
        )  # rng unused when plain
        return torch.stack([augment_driving(rgb[t], mask[t], config, rng) for t in range(rgb.shape[0])])

    def track_landmarks(
        self, images: np.ndarray, camera: Camera, init: FlameParams | None
    ) -> FlameParams | None:
        """FLAME per frame from 68 landmarks of images uint8 [T, H, W, 3] (None when a frame has no face)."""
        from geodiff4d.recon.landmarks import LandmarkDetector
        from geodiff4d.recon.tracking import TrackingConfig, build_targets, track

        masks = np.ones(images.shape[:3], np.float32)[:, None]
        targets = build_targets([camera], images[:, None], masks, None, LandmarkDetector(), 32)
        if not bool(targets.has_landmarks.all()):
            return None
        return track(self.head, targets, TrackingConfig(steps=0), init)

    # --- the four inputs
    def identity(self, index: int, spec: SubjectSpec) -> FlameParams | None:
        """Shape/scale [1] from a tracking file; None when it is to be fitted to the reference."""
        if isinstance(spec.identity, FittedIdentity):
            return None
        params = self.load_tracking(index, "identity.tracking", spec.identity.tracking)
        if spec.identity.frame >= params.batch_size:
            raise self.fail(
                index, "identity.frame", f"{spec.identity.tracking} has {params.batch_size} frames"
            )
        return params[spec.identity.frame]

    def load_tracking(self, index: int, field: str, path: Path) -> FlameParams:
        from geodiff4d.recon.run import load_tracking

        try:
            return load_tracking(path, self.head)
        except (OSError, KeyError, ValueError) as exc:
            raise self.fail(index, field, f"{path}: {exc}") from exc

    def reference(self, index: int, spec: SubjectSpec, identity: FlameParams | None):
        """-> (rgb [3, R, R], posemap [3, R, R], identity shape/scale [1])."""
        ref = spec.reference
        if isinstance(ref, ShardReference):
            sample = self.shard_frames(
                index, "reference", ref, cameras=[ref.camera], frames=[ref.frame], parts=("rgb", "posemap")
            ).get((ref.camera, ref.frame))
            if sample is None:
                raise self.fail(
                    index, "reference", f"{ref.shards}: no sample of camera {ref.camera!r}, frame {ref.frame}"
                )
            if identity is None:
                camera = Camera.from_json(sample["meta"]["camera_params"])
                identity = self.fit(
                    index,
                    "reference",
                    tensor_to_image(sample["rgb"], rounding="truncate"),
                    camera,
                    None,
                    ref.shards,
                )
            return sample["rgb"], sample["posemap"], identity
        try:
            photo = read_rgb8(ref.image)
        except ImageError as exc:
            raise self.fail(index, "reference.image", str(exc)) from exc
        camera = self.frontal_camera(photo.shape[1], photo.shape[0])
        params = self.fit(index, "reference.image", photo, camera, identity, ref.image)
        box = self.head_box(params, camera)
        rgb = image_to_tensor(crop(photo, box, self.resolution))
        posemap = render_pose_map(self.head, params, self.square_camera(camera, box))
        return rgb.contiguous(), posemap, identity if identity is not None else params

    def fit(
        self,
        index: int,
        field: str,
        photo: np.ndarray,
        camera: Camera,
        init: FlameParams | None,
        source: Path,
    ) -> FlameParams:
        params = self.track_landmarks(photo[None], camera, init)
        if params is None:
            raise self.fail(index, field, f"{source}: no detectable face in the reference image")
        return params

    def shard_frames(
        self, index: int, field: str, packed: ShardReference | ShardDriving, **only: Collection
    ) -> dict:
        """The packed samples of ``packed``'s subject/sequence that ``only`` (cameras, frames, parts) selects."""
        from geodiff4d.gen.sample_frames import SampleFramesError, read_sequence

        shards = packed.shards
        try:
            data = read_sequence(shards, packed.subject, packed.sequence, **only)
        except (SampleFramesError, OSError) as exc:
            raise self.fail(index, field, str(exc)) from exc
        size = next(iter(data.values()))["rgb"].shape[-1] if data else self.resolution
        if size != self.resolution:
            raise self.fail(
                index, field, f"{shards}: samples are {size} px, the model samples {self.resolution} px"
            )
        return data

    def driving(
        self, index: int, spec: SubjectSpec, identity: FlameParams
    ) -> tuple[torch.Tensor, FlameParams]:
        """-> (crops [T, 3, r, r], motion [T]) for the first `frames` frames of the driving source."""
        drv, frames = spec.driving, spec.frames
        if isinstance(drv, TrackingDriving):
            motion = self.load_tracking(index, "driving.tracking", drv.tracking)
            self.require(index, "driving.tracking", drv.tracking, motion.batch_size, frames)
            motion = motion[:frames]
            size = 4 * self.driving_size
            camera = self.frontal_camera(size, size)
            renders = [
                render_head(self.head, self.posed(identity, motion[t], still=True), camera)
                for t in range(frames)
            ]
            return self.crops(
                torch.stack([r.rgb for r in renders]), torch.stack([r.mask[None] for r in renders])
            ), motion
        if isinstance(drv, ShardDriving):
            data = self.shard_frames(index, "driving", drv, cameras=[drv.camera], parts=("rgb", "mask"))
            ids = sorted(f for c, f in data if c == drv.camera)
            self.require(
                index,
                "driving",
                f"{drv.shards} ({drv.subject}/{drv.sequence}/{drv.camera})",
                len(ids),
                frames,
            )
            samples = [data[(drv.camera, f)] for f in ids[:frames]]
            if any(s["meta"].get("flame") is None for s in samples):
                raise self.fail(
                    index, "driving", f"{drv.shards}: the driving samples carry no FLAME parameters"
                )
            motion = FlameParams(
                **{
                    k: torch.cat(
                        [
                            getattr(
                                FlameParams.from_numpy_dict(
                                    s["meta"]["flame"], self.head.n_shape, self.head.n_expr
                                ),
                                k,
                            )
                            for s in samples
                        ]
                    )
                    for k in vars(identity)
                }
            )
            return self.crops(
                torch.stack([s["rgb"] for s in samples]), torch.stack([s["mask"] for s in samples])
            ), motion
        return self.video_driving(index, drv, identity, frames)

    def video_driving(self, index: int, drv: VideoDriving, identity: FlameParams, frames: int):
        from geodiff4d.core.io.video import VideoError, read_video

        try:
            video = read_video(drv.video)
        except VideoError as exc:
            raise self.fail(index, "driving.video", str(exc)) from exc
        self.require(index, "driving.video", drv.video, len(video), frames)
        video = video[:frames]
        camera = self.frontal_camera(video.shape[2], video.shape[1])
        init = FlameParams(**{k: v.expand(frames, -1).clone() for k, v in vars(identity).items()})
        motion = self.track_landmarks(video, camera, init)
        if motion is None:
            raise self.fail(index, "driving.video", f"{drv.video}: a frame has no detectable face")
        masks = torch.zeros(frames, 1, *video.shape[1:3])
        for t in range(frames):
            x, y, side = self.head_box(motion[t], camera)
            masks[t, :, max(y, 0) : y + side, max(x, 0) : x + side] = 1
        rgb = image_to_tensor(video)
        return self.crops(rgb, masks), motion

    def require(self, index: int, field: str, source, available: int, frames: int) -> None:
        if available < frames:
            raise self.fail(
                index,
                field,
                f"{source}: the driving sequence has {available} frames, "
                f"{frames} were asked (subjects[{index}].frames)",
            )

    @staticmethod
    def posed(identity: FlameParams, motion: FlameParams, still: bool = False) -> FlameParams:
        """Identity shape and scale with the driving's motion (`still`: no global rotation, translation or neck)."""
        frames = motion.batch_size
        shape, scale = identity.shape[:1].expand(frames, -1), identity.scale[:1].expand(frames, -1)
        if still:
            zero = torch.zeros(frames, 3)
            return FlameParams(shape, motion.expression, zero, zero, motion.jaw, motion.eyes, zero, scale)
        return FlameParams(
            shape,
            motion.expression,
            motion.rotation,
            motion.neck,
            motion.jaw,
            motion.eyes,
            motion.translation,
            scale,
        )

    def cameras(self, index: int, spec: SubjectSpec, tracking: FlameParams) -> dict[str, Camera]:
        cams = spec.cameras
        if isinstance(cams, OrbitCameras):
            center = self.vertices(tracking[0])[0].mean(0)
            res = self.resolution
            K = intrinsics(cams.radius * res / HEAD_FIELD_OF_VIEW_M, res, res)
            yaws = np.linspace(-cams.yaw, cams.yaw, cams.orbit) if cams.orbit > 1 else np.zeros(1)
            pitch = np.radians(cams.pitch)
            rig = {}
            for i, yaw in enumerate(np.radians(yaws)):
                direction = np.array(
                    [np.sin(yaw) * np.cos(pitch), np.sin(pitch), np.cos(yaw) * np.cos(pitch)]
                )
                rig[ORBIT_SERIAL.format(i)] = look_at_camera(
                    center + cams.radius * direction, center, np.array([0.0, 1.0, 0.0]), K, res, res
                )
            return rig
        if isinstance(cams, JsonCameras):
            field, source = "cameras.cameras_json", cams.cameras_json
            try:
                rig = read_cameras(source)
            except (FrameFolderError, CameraError) as exc:
                raise self.fail(index, field, str(exc)) from exc
        else:
            field, source = "cameras.nersemble", cams.nersemble
            from geodiff4d.datasets.nersemble import NersembleDataset, NersembleError

            try:
                rig = NersembleDataset(source).cameras(cams.subject, cams.sequence)
            except (NersembleError, OSError) as exc:
                raise self.fail(index, field, str(exc)) from exc
        return {
            s: self.square_camera(rig[s], self.head_box(tracking, rig[s]))
            for s in chosen_serials(self.spec_path, index, cams, rig)
        }

    def resolve(self, index: int, spec: SubjectSpec) -> SubjectInputs:
        identity = self.identity(index, spec)
        ref_rgb, ref_posemap, identity = self.reference(index, spec, identity)
        driving, motion = self.driving(index, spec, identity)
        tracking = self.posed(identity, motion)
        return SubjectInputs(
            spec.name,
            spec.sequence,
            ref_rgb,
            ref_posemap,
            driving,
            tracking,
            self.cameras(index, spec, tracking),
        )
