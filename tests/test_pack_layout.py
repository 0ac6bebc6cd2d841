"""What packing writes and decodes at capture sizes: RGB converted only inside the crop, alpha maps decoded as
one channel, a frame's FLAME row stored once, and no all-zero pose maps for SynthHuman (the loader fills them)."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from geodiff4d.core.io import video
from geodiff4d.core.io.video import iter_video_range, write_video
from geodiff4d.core.jobs import CommitLog, WorkUnit
from geodiff4d.datasets.loader import LoaderConfig, TrainingStream
from geodiff4d.datasets.manifest import build_manifest
from geodiff4d.datasets.packing import (
    PackJob,
    PackSettings,
    list_inputs,
    plan_shards,
    sample_bytes_bound,
)
from geodiff4d.datasets.procedural import SynthJob, SynthSpec
from geodiff4d.datasets.shards import iter_shard

SPEC = SynthSpec(subjects=1, sequences=1, frames=3, cameras=4, resolution=96, synthetic=3, seed=5)


def _pyav_rgb(path: Path) -> list[np.ndarray]:
    """PyAV's own conversion of every frame (a fresh swscale context each): the independent reference."""
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(3)
    colour = rng.integers(0, 256, (4, 70, 98, 3), dtype=np.uint8)
    ramp = np.broadcast_to(np.linspace(0, 255, 98).astype(np.uint8), (4, 70, 98)).copy()
    ramp[:, 20:50, 30:60] = 255
    write_video(folder / "colour.mp4", colour, keyframe_interval=2)
    write_video(folder / "alpha.mp4", ramp, keyframe_interval=2)
    return {"colour": folder / "colour.mp4", "alpha": folder / "alpha.mp4"}


@pytest.mark.parametrize(
    # 98x70 frames: the last three stay within the right-hand 64 px grid column, so convert their own planes
    "window",
    [(0, 0, 98, 70), (1, 1, 2, 2), (71, 21, 95, 53), (65, 3, 97, 69), (96, 0, 98, 9)],
)
def test_a_window_converts_to_the_same_pixels_as_the_whole_frame(videos, window):
    x0, y0, x1, y1 = window
    reference = _pyav_rgb(videos["colour"])
    for (index, lazy), full in zip(
        iter_video_range(videos["colour"], 1, 4, pixels="lazy"), reference[1:], strict=True
    ):
        assert index >= 1 and np.array_equal(lazy.window(x0, y0, x1, y1), full[y0:y1, x0:x1])


@pytest.mark.parametrize("kind", ["alpha", "colour"])
@pytest.mark.parametrize(
    "window", [(0, 0, 98, 70), (1, 1, 2, 2), (71, 21, 95, 53), (96, 0, 98, 9), (5, 5, 5, 9)]
)
def test_alpha_is_the_red_channel_of_the_rgb_decode(videos, kind, window):
    """As the official data manager reads alpha maps (the first channel of the RGB decode), from luma alone for a
    gray video, and through the full decode for any other (non-neutral chroma); a window reads the same pixels
    as the whole frame, before and after the whole frame was read."""
    x0, y0, x1, y1 = window
    decoded = [alpha for _, alpha in iter_video_range(videos[kind], 0, 4, pixels="alpha")]
    reference = [rgb[..., 0] for rgb in _pyav_rgb(videos[kind])]
    for lazy, full in zip(decoded, reference, strict=True):
        assert lazy.shape == full.shape and np.array_equal(lazy.window(x0, y0, x1, y1), full[y0:y1, x0:x1])
        assert np.array_equal(lazy.full(), full) and np.array_equal(
            lazy.window(x0, y0, x1, y1), full[y0:y1, x0:x1]
        )


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """One procedural subject (4 cameras, 3 frames, alpha maps and tracking) and 3 SynthHuman samples, packed
    in this process at 16 px with full frames converted counted (they should be none)."""
    tmp = tmp_path_factory.mktemp("packed")
    job = SynthJob(tmp, SPEC)
    job.setup()
    job.write_subject(0)
    job.write_synthetic(0, SPEC.synthetic)
    blocks = list_inputs([("nersemble", tmp / "nersemble"), ("synthhuman", tmp / "synthhuman")])
    plans = plan_shards(blocks, 12, 10**9, sample_bytes_bound(16))
    out = tmp / "out"
    out.mkdir()
    pack_job = PackJob(out, PackSettings(resolution=16))
    pack_job.setup()
    full_frames = []
    convert = video._frame_array
    video._frame_array = lambda frame, *a, **k: full_frames.append(frame.width) or convert(frame, *a, **k)
    try:
        for plan in plans:
            CommitLog(out).commit(plan.name, pack_job.run(WorkUnit(plan.name, {"plan": plan})))
    finally:
        video._frame_array = convert
    build_manifest(out)
    (out / "full_frames.json").write_text(json.dumps(full_frames))
    return out


def test_tracked_frames_with_alpha_convert_only_their_crops(packed):
    """Before, every colour and alpha frame was converted to RGB whole (3208x2200 per camera on the raw release)
    before the crop kept a few percent of it. A frame is converted whole only when its crop's window (rounded out
    to the 64 px grid) covers at least half of it (here the head's window is larger than the 96 px frames), and
    alpha frames never are."""
    size = SPEC.resolution
    whole = 0
    for sample in iter_shard(packed / "nersemble-000000.tar"):
        x, y, side = json.loads(sample["json"])["crop"]
        x0, y0, x1, y1 = (min(max(v, 0), size) for v in (x, y, x + side, y + side))
        grid = video.WINDOW_GRID
        w, h = (min(-(-hi // grid) * grid, size) - lo // grid * grid for lo, hi in ((x0, x1), (y0, y1)))
        whole += w * h >= video.WHOLE_FRAME_SHARE * size * size
    assert whole and json.loads((packed / "full_frames.json").read_text()) == [size] * whole


def test_a_small_window_converts_no_whole_frame_and_a_large_one_converts_it(videos, monkeypatch):
    """98x70 frames: a window within one 64 px grid cell (34x64 of them rounded out, a third of the frame)
    converts its own planes; one whose rounded window is 64x64 (60 %) or the whole frame converts the frame."""
    converted = []
    convert = video._frame_array
    monkeypatch.setattr(
        video, "_frame_array", lambda frame, *a, **k: converted.append(1) or convert(frame, *a, **k)
    )
    for _, lazy in iter_video_range(videos["colour"], 0, 2, pixels="lazy"):
        lazy.window(70, 40, 90, 60)
    assert not converted
    for _, lazy in iter_video_range(videos["colour"], 0, 2, pixels="lazy"):
        lazy.window(10, 10, 60, 50)
        lazy.window(0, 0, 98, 70)  # converted once: the frame keeps its conversion
    assert len(converted) == 2


def test_a_frames_flame_row_is_stored_once_and_resolved_for_every_camera(packed):
    from geodiff4d.datasets.packing import resolve_flame  # new with the layout; imported here so the other
    from geodiff4d.gen.sample_frames import read_sequence  # tests of this file run on code without it

    samples = [json.loads(s["json"]) for s in iter_shard(packed / "nersemble-000000.tar")]
    by_frame: dict[int, list[dict]] = {}
    for meta in samples:
        by_frame.setdefault(meta["frame"], []).append(meta)
    assert sorted(by_frame) == [0, 1, 2] and all(len(metas) == SPEC.cameras for metas in by_frame.values())
    for metas in by_frame.values():
        carriers = [m for m in metas if m["flame"] is not None]
        assert len(carriers) == 1, "one json per frame holds its FLAME row"
        assert all(m["flame_in"] == carriers[0]["key"] for m in metas if m is not carriers[0])
    resolve_flame(samples)
    assert all(m["flame"] == by_frame[m["frame"]][0]["flame"] for m in samples)
    sequence = read_sequence(packed, samples[0]["subject"], samples[0]["sequence"])
    assert all(item["meta"]["flame"] == by_frame[frame][0]["flame"] for (_, frame), item in sequence.items())


def test_synthhuman_samples_have_no_pose_map_and_the_loader_gives_zeros(packed):
    synthetic = list(iter_shard(packed / "synthhuman-000000.tar"))
    assert len(synthetic) == SPEC.synthetic and all("posemap.png" not in s for s in synthetic)
    assert all("posemap.png" in s for s in iter_shard(packed / "nersemble-000000.tar"))
    for source, has in (("synthhuman", False), ("nersemble", True)):
        config = LoaderConfig(kind="frame", batch_size=4, driving_size=8, weights={source: 1.0})
        batch = next(iter(TrainingStream(packed, config)))
        assert batch["posemap"].shape == (4, 3, 16, 16) and batch["ref_posemap"].shape == (4, 3, 16, 16)
        assert batch["has_posemap"].tolist() == [has] * 4
        assert bool(batch["posemap"].any()) == has and bool(batch["ref_posemap"].any()) == has
