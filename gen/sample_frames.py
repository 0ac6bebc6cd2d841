"""Sample one subject's sequence from packed shards into a frame folder (docs/formats.md, "Frame folders").

Self-reenactment as the paper runs it: the reference image is one frame of the subject, the driving frames
are the sequence seen by one camera (face crops, no augmentation), and every target camera gets its own
pose maps (FLAME normals with expression zeroed, as packed). The expression latents depend only on the
driving frames, so one set per sequence is written, beside RGB, normals, masks, cameras and a grid image.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from geodiff4d.core.errors import UserError
from geodiff4d.core.io.atomic import atomic_write_bytes
from geodiff4d.core.io.images import decode_image, encode_png
from geodiff4d.core.io.json_yaml import parse_json, write_json
from geodiff4d.core.io.tensors import image_to_tensor, tensor_to_image
from geodiff4d.datasets.frame_folder import frame_relpath
from geodiff4d.datasets.loader import LoaderConfig, augment_driving
from geodiff4d.datasets.locations import join
from geodiff4d.datasets.manifest import read_manifest
from geodiff4d.datasets.normal_maps import encode_normal_png
from geodiff4d.datasets.packing import resolve_flame
from geodiff4d.datasets.shards import iter_shard
from geodiff4d.gen.model_run import load_run
from geodiff4d.gen.pipeline import SampleOutput, sample_sequence, write_grid

FOREGROUND_Z = 0.25  # encoded z = (n_z+1)/2: visible surfaces have n_z >= 0 (>= 0.5), background is 0


class SampleFramesError(UserError, ValueError):
    """The shards lack what the request names; the message names the shard folder and the missing ids."""


def _decode(data: bytes, channels: int) -> torch.Tensor:
    """PNG bytes -> float32 [channels, H, W] in [0, 1] (RGB order)."""
    image = decode_image(data)
    image = image[..., None] if image.ndim == 2 else image  # [H, W] -> [H, W, 1]
    return image_to_tensor(image[..., :channels]).contiguous()


PARTS = {"rgb": 3, "mask": 1, "posemap": 3, "normal": 3}  # packed image -> channels


def read_sequence(
    shards: str | Path,
    subject: str,
    sequence: str,
    source: str = "nersemble",
    *,
    cameras: Collection[str] | None = None,
    frames: Collection[int] | None = None,
    parts: Collection[str] = tuple(PARTS),
) -> dict[tuple[str, int], dict]:
    """(camera, frame) -> {part: image, meta} of one subject/sequence, read via the manifest: every sample, or those
    of ``cameras`` and ``frames``; only ``parts`` (of rgb, mask, posemap, normal) are decoded, so a caller that
    needs one camera's RGB does not decode every camera's four PNGs."""
    table = read_manifest(shards).to_pandas()
    rows = table[(table.source == source) & (table.subject == subject) & (table.sequence == sequence)]
    if rows.empty:
        raise SampleFramesError(
            f"{shards}: no {source} samples of subject {subject!r}, sequence {sequence!r}"
        )
    if frames is not None:
        rows = rows[rows.frame.isin(list(frames))]
    # a frame's FLAME row is in one camera's json of the same shard (datasets.packing.resolve_flame): in the
    # shards holding wanted samples every json of the wanted frames is read, only the wanted images decoded
    listed, metas, found = set(rows.key), {}, {}
    wanted = listed if cameras is None else set(rows.key[rows.camera.isin(list(cameras))])
    for shard in sorted(set(rows.shard[rows.key.isin(wanted)])):
        for sample in iter_shard(join(shards, shard)):
            if sample["__key__"] not in listed:
                continue
            meta = metas[sample["__key__"]] = parse_json(
                sample["json"], f"{shard}: sample {sample['__key__']}"
            )
            if sample["__key__"] in wanted:
                decoded = {part: _decode(sample[f"{part}.png"], PARTS[part]) for part in parts}
                found[(meta["camera"], int(meta["frame"]))] = {**decoded, "meta": meta}
    resolve_flame(metas.values())
    return found


def plain_driving_config(driving_size: int) -> LoaderConfig:
    """Driving crops as sampling takes them: the loader's face crop without augmentation."""
    return dataclasses.replace(
        LoaderConfig(),
        driving_size=driving_size,
        crop_scale=(1.0, 1.0),
        crop_shift=0.0,
        brightness=0.0,
        contrast=0.0,
        saturation=0.0,
        noise_std=0.0,
    )


def _require(data: dict, cameras: Sequence[str], frames: Sequence[int], shards: str | Path) -> None:
    missing = [(c, f) for c in cameras for f in frames if (c, f) not in data]
    if missing:
        raise SampleFramesError(f"{shards}: missing (camera, frame) samples {missing[:5]}")


def camera_frame_images(
    camera: str, frames: Sequence[int], result: SampleOutput
) -> Iterator[tuple[int, str, bytes]]:
    """(frame, part, PNG bytes) of one camera: RGB, normal (16-bit, our convention) and mask = foreground of the
    normals; what the frame folder's files and a tar unit's members hold alike."""
    for i, frame in enumerate(frames):
        yield frame, "rgb", encode_png(tensor_to_image(result.rgb[i]), name=f"{camera}/{frame}")
        if result.normal is not None:
            encoded = result.normal[i]  # [3, H, W], (n+1)/2
            mask = encoded[2] > FOREGROUND_Z
            yield frame, "normal", encode_normal_png((encoded * 2 - 1).numpy(), mask.numpy())
            yield frame, "mask", encode_png(tensor_to_image(mask[None].float())[..., 0])


def write_camera_frames(
    root: Path, subject: str, sequence: str, camera: str, frames: Sequence[int], result: SampleOutput
) -> None:
    """One camera's :func:`camera_frame_images` as PNG files of the frame folder ``root``, atomically."""
    folders = {"rgb": root / "rgb", "normal": root / "normal", "mask": root / "mask"}
    for frame, part, data in camera_frame_images(camera, frames, result):
        atomic_write_bytes(folders[part] / frame_relpath(subject, sequence, camera, frame), data)


def write_latents(
    root: Path, subject: str, sequence: str, frames: Sequence[int], expression: torch.Tensor
) -> None:
    buffer = io.BytesIO()
    np.savez(
        buffer, frames=np.asarray(frames, np.int64), expression=expression.cpu().numpy().astype(np.float32)
    )
    atomic_write_bytes(root / "latents" / subject / f"{sequence}.npz", buffer.getvalue())


def _camera_entry(data: dict, camera: str, frames: Sequence[int]) -> dict:
    """The contract's fields (first frame) plus `per_frame`: packed crops follow the head, so K moves per frame."""
    per_frame = {str(f): data[(camera, f)]["meta"]["camera_params"] for f in frames}
    return {**per_frame[str(frames[0])], "per_frame": per_frame}


def _driving_clip(
    data: dict, camera: str, frames: Sequence[int], driving_size: int, seed: int
) -> torch.Tensor:
    """The driving camera's face crops [T, 3, r, r], unaugmented as at sampling time."""
    plain = plain_driving_config(driving_size)
    rng = np.random.default_rng(seed)  # unused by an unaugmented crop, required by the signature
    return torch.stack(
        [augment_driving(data[(camera, f)]["rgb"], data[(camera, f)]["mask"], plain, rng) for f in frames]
    )  # [T, 3, r, r]


def _chosen_views(
    data: dict,
    shards: Path,
    cameras: Sequence[str] | None,
    frames: Sequence[int] | None,
    driving_camera: str | None,
    reference: tuple[str, int] | None,
) -> tuple[list[str], list[int], str, tuple[str, int]]:
    """Cameras, frames, driving camera and reference with their defaults filled in, each checked to be packed."""
    cameras = list(cameras or sorted({c for c, _ in data}))
    frames = list(frames or sorted({f for c, f in data if c == cameras[0]}))
    driving_camera = driving_camera or cameras[0]
    reference = reference or (driving_camera, frames[0])
    _require(data, [*cameras, driving_camera], frames, shards)
    _require(data, [reference[0]], [reference[1]], shards)
    return cameras, frames, driving_camera, reference


def sample_to_frame_folder(
    config: str | Path | None,
    run: str | Path,
    shards: str | Path,
    subject: str,
    sequence: str,
    cameras: Sequence[str] | None,
    frames: Sequence[int] | None,
    out: str | Path,
    seed: int = 0,
    *,
    driving_camera: str | None = None,
    reference: tuple[str, int] | None = None,
) -> Path:
    """Sample `frames` of `subject`/`sequence` for every camera in `cameras` into the frame folder `out`.

    cameras / frames default to all of the sequence's; the driving camera defaults to the first camera and
    the reference to the driving camera's first frame; `config` defaults to the run's own config.yaml.
    Returns the grid image (rows: RGB and normals per camera).
    """
    loaded, root = load_run(run, config), Path(out)
    cfg = loaded.cfg
    data = read_sequence(shards, subject, sequence)
    cameras, frames, driving_camera, reference = _chosen_views(
        data, shards, cameras, frames, driving_camera, reference
    )
    driving = _driving_clip(data, driving_camera, frames, cfg.model.driving_size, seed)
    ref = data[reference]
    model, codec, s = loaded.model, loaded.codec, cfg.sample
    rows, expression = [], None
    for i, camera in enumerate(cameras):
        posemaps = torch.stack([data[(camera, f)]["posemap"] for f in frames])  # [T, 3, H, W]
        result = sample_sequence(
            model,
            codec,
            ref["rgb"],
            ref["posemap"],
            driving,
            posemaps,
            torch.Generator().manual_seed(seed * 1_000 + i),
            s.scheduler,
            s.steps,
            s.guidance_reference,
            s.guidance_expression,
            s.window,
            s.overlap,
            cfg.train.num_train_timesteps,
        )
        write_camera_frames(root, subject, sequence, camera, frames, result)
        rows += [result.rgb] + ([result.normal] if result.normal is not None else [])
        expression = result.expression
    write_latents(root, subject, sequence, frames, expression)
    write_json(
        root / "cameras" / subject / f"{sequence}.json", {c: _camera_entry(data, c, frames) for c in cameras}
    )
    grid = root / "grids" / subject / f"{sequence}.png"
    write_grid(grid, rows)
    return grid
