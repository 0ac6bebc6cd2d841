"""The YAML spec of `geodiff4d generate`: per subject a reference, an identity, target cameras, driving, frames.

Every input has a few kinds, told apart by their fields (pydantic picks the one whose fields match and
refuses unknown ones). Relative paths are relative to the spec file. Schema errors name the file and field
(through the shared config loader); whether the files exist is checked right after, still before Ray starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from geodiff4d.core.config import ConfigError, StrictConfig, load_yaml_config


class ImageReference(StrictConfig):
    """Any photo with one face in it; cropped around the detected face like packing crops the head."""

    image: Path


class ShardReference(StrictConfig):
    """One packed sample (already cropped, with its pose map)."""

    shards: Path
    subject: str
    sequence: str
    camera: str
    frame: int = Field(0, ge=0)


class TrackingIdentity(StrictConfig):
    """FLAME shape and scale from a tracking npz in NeRSemble's names (row `frame`)."""

    tracking: Path
    frame: int = Field(0, ge=0)


class FittedIdentity(StrictConfig):
    """FLAME shape fitted to the reference image's landmarks by our tracker (recon.tracking)."""

    fit: bool = True


class JsonCameras(StrictConfig):
    """A cameras JSON (serial -> world_to_cam, K, width, height), e.g. a frame folder's cameras/ file."""

    cameras_json: Path
    serials: list[str] | None = None


class NersembleCameras(StrictConfig):
    """The calibration of a NeRSemble v2 subject (its camera_params.json and video sizes)."""

    nersemble: Path
    subject: str
    sequence: str
    serials: list[str] | None = None


class OrbitCameras(StrictConfig):
    """`orbit` views on a circle around the head at eye level +`pitch`, yaw spread over [-yaw, +yaw] degrees."""

    orbit: int = Field(ge=1)
    yaw: float = Field(60.0, ge=0, le=180)
    pitch: float = 0.0
    radius: float = Field(1.0, gt=0)


class TrackingDriving(StrictConfig):
    """Expressions and head motion from a tracking npz (driving crops are renders of the identity's head)."""

    tracking: Path


class ShardDriving(StrictConfig):
    """A packed sequence seen by one camera: its frames drive, its packed FLAME parameters move the head."""

    shards: Path
    subject: str
    sequence: str
    camera: str


class VideoDriving(StrictConfig):
    """A video of a face: its frames drive; FLAME is tracked from its landmarks by our tracker."""

    video: Path


class SubjectSpec(StrictConfig):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    sequence: str = Field("GEN", pattern=r"^[A-Za-z0-9_+-]+$")
    reference: ImageReference | ShardReference
    identity: TrackingIdentity | FittedIdentity = FittedIdentity()
    cameras: JsonCameras | NersembleCameras | OrbitCameras
    driving: TrackingDriving | ShardDriving | VideoDriving
    frames: int = Field(ge=1)


class GenerateSpec(StrictConfig):
    run: Path  # training run folder (config.yaml + checkpoints)
    seed: int = 0
    head_model: str = "procedural:0"  # "procedural:SEED" or a FLAME .pkl path (recon reads the same)
    frames_per_unit: int = Field(32, ge=1)  # temporal window of one work unit
    cameras_per_unit: int = Field(4, ge=1)  # views denoised together as one batch
    format: Literal["png", "tar"] = (
        "png"  # frames as PNG files, or one WebDataset tar per unit (datasets.frame_tars)
    )
    subjects: list[SubjectSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> GenerateSpec:
        names = [s.name for s in self.subjects]
        if len(set(names)) != len(names):
            raise ValueError(f"subjects: names must be unique, got {names}")
        return self


def input_files(spec: GenerateSpec) -> list[tuple[str, Path]]:
    """(field, path) of every file or folder the spec names."""
    found = [("run", spec.run)]
    for i, subject in enumerate(spec.subjects):
        for part in ("reference", "identity", "cameras", "driving"):
            value = getattr(subject, part)
            for name in ("image", "shards", "tracking", "cameras_json", "nersemble", "video"):
                if isinstance(getattr(value, name, None), Path):
                    found.append((f"subjects[{i}].{part}.{name}", getattr(value, name)))
    return found


def _absolute(spec: GenerateSpec, base: Path) -> GenerateSpec:
    def fix(value):
        if isinstance(value, StrictConfig):
            return value.model_copy(update={k: fix(v) for k, v in value})
        if isinstance(value, list):
            return [fix(v) for v in value]
        return base / value if isinstance(value, Path) else value

    return fix(spec)


def load_spec(path: str | Path) -> GenerateSpec:
    """Validated spec with absolute paths; a missing file fails here, naming the spec file and the field."""
    path = Path(path)
    spec = _absolute(load_yaml_config(path, GenerateSpec), path.resolve().parent)
    for field, target in input_files(spec):
        if not target.exists():
            raise ConfigError(f"{path}: {field}: {target} does not exist")
    return spec
