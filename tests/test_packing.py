"""Packing procedural NeRSemble + SynthHuman data with Ray: counts, determinism, resume, faults, mask/normal paths."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import ray
from onnx import TensorProto, helper

from geodiff4d.core.io.video import write_video
from geodiff4d.core.jobs import WorkUnit
from geodiff4d.datasets import packing
from geodiff4d.datasets.cameras import Camera
from geodiff4d.datasets.flame import FlameParams
from geodiff4d.datasets.flame_tracking import write_nersemble_tracking
from geodiff4d.datasets.manifest import read_manifest
from geodiff4d.datasets.nersemble import write_camera_params
from geodiff4d.datasets.normal_maps import angular_error_deg, decode_normal_png
from geodiff4d.datasets.packing import (
    PackJob,
    PackSettings,
    SampleBlock,
    ShardPlan,
    background_mask,
    list_inputs,
    listing_digest,
    pack,
    pack_with,
    plan_shards,
    sample_bytes_bound,
)
from geodiff4d.datasets.procedural import SEQUENCE_NAMES, SynthSpec, subject_id, synth_cameras, synthesize
from geodiff4d.datasets.shards import iter_shard
from geodiff4d.datasets.synthhuman import write_synthhuman_sample
from geodiff4d.datasets.verify import verify

SPEC = SynthSpec(subjects=2, sequences=1, frames=4, cameras=3, resolution=64, synthetic=3, seed=0)
EXPECTED = SPEC.subjects * SPEC.frames * SPEC.cameras + SPEC.synthetic
RES = 48


# Test-local job classes travel by value: Ray workers cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def data(local_ray, tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    assert synthesize(root, SPEC, workers=2, progress=False).ok
    return root


def _sources(root: Path) -> list[tuple[str, Path]]:
    return [("nersemble", root / "nersemble"), ("synthhuman", root / "synthhuman")]


def _pack(out: Path, root: Path, **kw):
    kw = {"resolution": RES, "workers": 2, "samples_per_shard": 6, "progress": False} | kw
    return pack(out, _sources(root), **kw)


def _expected_keys() -> set[str]:
    keys = {f"synthhuman_{i:07d}_synthhuman_00000_0" for i in range(SPEC.synthetic)}
    for s in range(SPEC.subjects):
        for f in range(SPEC.frames):
            keys |= {
                f"nersemble_{subject_id(s)}_{SEQUENCE_NAMES[0]}_{f:05d}_{c}" for c in synth_cameras(SPEC)
            }
    return keys


def _manifest_keys(out: Path) -> list[str]:
    return read_manifest(out).column("key").to_pylist()


def test_plan_is_pure_bounded_and_keeps_frames_whole():
    cameras = tuple(f"cam{c}" for c in range(4))
    blocks = [
        SampleBlock("nersemble", "001", "EXP", tuple(range(6)), cameras, "/r"),
        SampleBlock("nersemble", "002", "EXP", tuple(range(4)), cameras, "/r"),
    ]
    blocks += [SampleBlock("synthhuman", f"{i:07d}", "synthhuman", (0,), ("0",), "/s") for i in range(5)]
    refs = [ref for block in sorted(blocks) for ref in block.refs()]
    assert refs == sorted(refs)  # blocks in order expand to sorted refs
    plans = plan_shards(blocks, samples_per_shard=10, max_shard_bytes=10**9, sample_bytes=1000)
    assert plans == plan_shards(list(reversed(blocks)), 10, 10**9, 1000)
    nersemble = [p for p in plans if p.source == "nersemble"]
    assert [len(p.samples) for p in nersemble] == [8, 8, 8, 8, 8]  # 2 whole frames (8) fit in 10
    assert [len(p) for p in nersemble] == [8, 8, 8, 8, 8]
    assert all(len({(r.subject, r.frame) for r in p.samples}) * 4 == len(p.samples) for p in nersemble)
    assert [r for p in plans for r in p.samples] == refs  # every sample once, in order
    assert [p.name for p in plans][-1] == "synthhuman-000000"
    by_bytes = plan_shards(blocks, samples_per_shard=100, max_shard_bytes=5500, sample_bytes=1000)
    assert {len(p.samples) for p in by_bytes if p.source == "nersemble"} == {4}  # 5 by bytes; frames of 4
    assert max(len(p.samples) for p in by_bytes) == 5
    split = plan_shards(blocks, samples_per_shard=3, max_shard_bytes=10**9, sample_bytes=1000)
    assert max(len(p.samples) for p in split) == 3 and [r for p in split for r in p.samples] == refs


def test_listing_digest_is_the_sha256_of_the_sorted_keys():
    """The digest kept in pack_settings.json: computed a block at a time, it must equal the sha256 of every sample
    key of the listing joined by newlines (what folders packed before blocks recorded)."""
    blocks = [
        SampleBlock("nersemble", "001", "EXP-1", (0, 7, 12), ("220700191", "222200037"), "/r"),
        SampleBlock("synthhuman", "0000003", "synthhuman", (0,), ("0",), "/s"),
    ]
    keys = [ref.key for block in blocks for ref in block.refs()]
    assert keys == [k for block in blocks for k in block.keys()]
    assert listing_digest(blocks) == hashlib.sha256("\n".join(keys).encode()).hexdigest()
    assert listing_digest(blocks[:1]) != listing_digest(blocks)


def test_pack_counts_verify_determinism_and_idle_rerun(data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    report = _pack(a, data)
    assert report.ok and report.samples == EXPECTED
    assert sorted(_manifest_keys(a)) == sorted(_expected_keys())
    check = verify(a)
    assert check.ok and check.verified == EXPECTED, check.summary()
    assert _pack(b, data, workers=1).ok
    tars = sorted(p.name for p in a.glob("*.tar"))
    assert tars == sorted(p.name for p in b.glob("*.tar")) and len(tars) == 5
    assert all((a / t).read_bytes() == (b / t).read_bytes() for t in tars)
    stamps = {t: (a / t).stat().st_mtime_ns for t in tars}
    again = _pack(a, data)
    assert again.job.completed == [] and len(again.job.skipped) == len(tars)
    assert stamps == {t: (a / t).stat().st_mtime_ns for t in tars}
    rows = {r["key"]: r for r in read_manifest(a).to_pylist()}
    assert {r["normal_source"] for r in rows.values()} == {"gt"}
    sample = next(iter_shard(a / "nersemble-000000.tar"))
    meta = json.loads(sample["json"])
    assert (
        meta["mask_source"] == "alpha" and meta["flame"] is not None and meta["camera_params"]["width"] == RES
    )


_KERNELS_LOADED_BY_A_SHARD = """
import sys
from pathlib import Path

import numba

from geodiff4d.core.jobs import WorkUnit
from geodiff4d.datasets.packing import PackJob, PackSettings, list_inputs, plan_shards, sample_bytes_bound


def loaded():
    return {
        (module.__name__, name, signature)
        for module in list(sys.modules.values())
        if getattr(module, "__name__", "").startswith("geodiff4d")
        for name, kernel in vars(module).items()
        if isinstance(kernel, numba.core.registry.CPUDispatcher)
        for signature in kernel.signatures
    }


out, root, resolution = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
job = PackJob(out, PackSettings(resolution=resolution))
job.setup()
before = loaded()
plan = plan_shards(list_inputs([("nersemble", root)]), 6, 10**9, sample_bytes_bound(resolution))[0]
job.run(WorkUnit(plan.name, {"plan": plan}))
print(len(before), sorted(str(kernel[:2]) for kernel in loaded() - before))
"""


def test_an_actors_first_shard_loads_no_compiled_kernel(data, tmp_path):
    """setup loads every numba kernel a shard runs (numba loads one at its first call, ~0.5 s in all), so an
    actor's first shard, where the benchmark's window starts, holds no kernel loading. A fresh process: this
    one's kernels may be loaded by other tests."""
    (tmp_path / "out").mkdir()
    args = [tmp_path / "out", data / "nersemble", RES]
    result = subprocess.run(
        [sys.executable, "-c", _KERNELS_LOADED_BY_A_SHARD, *map(str, args)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    loaded_by_setup, loaded_by_the_shard = result.stdout.split(" ", 1)
    assert int(loaded_by_setup) >= 3 and loaded_by_the_shard.strip() == "[]", result.stdout


class _KillOnce(PackJob):
    """Kills its own Ray worker process the first time it runs ``victim``."""

    def __init__(self, out, settings, victim: str):
        super().__init__(out, settings)
        self.victim = victim

    def run(self, unit):
        flag = self.out / f".killed-{unit.id}"
        if unit.id == self.victim and not flag.exists():
            flag.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().run(unit)


def test_killed_worker_then_rerun_gives_exactly_the_expected_keys(data, tmp_path):
    out = tmp_path / "out"
    job = _KillOnce(out, PackSettings(resolution=RES), victim="nersemble-000001")
    first = pack_with(job, _sources(data), workers=2, samples_per_shard=6, max_retries=0, progress=False)
    assert (
        list(first.job.failed) == ["nersemble-000001"]
        and "worker died" in first.job.failed["nersemble-000001"]
    )
    assert not (out / "nersemble-000001.stats.json").exists()
    rerun = _pack(out, data)
    assert rerun.ok and rerun.job.completed == ["nersemble-000001"]
    keys = _manifest_keys(out)
    assert len(keys) == len(set(keys)) == EXPECTED and set(keys) == _expected_keys()
    assert verify(out).ok


def test_unreadable_video_fails_its_units_and_others_complete(data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    video = root / "nersemble" / "001" / "sequences" / "EXP-1-head" / "images" / "cam_222200046.mp4"
    video.write_bytes(b"not a video" * 100)
    out = tmp_path / "out"
    report = _pack(out, root, max_retries=0)
    assert not report.ok and report.exit_code == 1
    assert sorted(report.job.failed) == ["nersemble-000000", "nersemble-000001"]  # subject 001's frames
    assert all(str(video) in why for why in report.job.failed.values())
    assert sorted(report.job.completed) == ["nersemble-000002", "nersemble-000003", "synthhuman-000000"]
    assert "FAILED nersemble-000000" in report.summary()
    assert verify(out).ok and len(_manifest_keys(out)) == EXPECTED - SPEC.frames * SPEC.cameras


def _constant_normal_onnx(path: Path, value: tuple[float, float, float]) -> None:
    """x [1,3,32,32] -> x * 0 + value: a stand-in normal estimator with a known answer (in SynthHuman's axes)."""
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    const = helper.make_tensor("const", TensorProto.FLOAT, [1, 3, 1, 1], list(value))
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "zero"], ["z"]), helper.make_node("Add", ["z", "const"], ["y"])],
        "constant_normal",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 32, 32])],
        initializer=[zero, const],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _subject_only(data: Path, root: Path) -> Path:
    shutil.copytree(data / "nersemble" / "001", root / "nersemble" / "001")
    shutil.rmtree(root / "nersemble" / "001" / "sequences" / "EXP-1-head" / "gt" / "normal")
    return root


def test_background_masks_and_flame_fallback_normals(data, tmp_path):
    root = _subject_only(data, tmp_path / "data")
    shutil.rmtree(root / "nersemble" / "001" / "sequences" / "EXP-1-head" / "alpha_maps")
    out, reference = tmp_path / "out", tmp_path / "reference"
    assert pack(
        out, [("nersemble", root / "nersemble")], resolution=RES, samples_per_shard=100, progress=False
    ).ok
    assert pack(
        reference, [("nersemble", data / "nersemble")], resolution=RES, samples_per_shard=100, progress=False
    ).ok
    truth = {s["__key__"]: s for s in iter_shard(reference / "nersemble-000000.tar")}
    for sample in iter_shard(out / "nersemble-000000.tar"):
        meta, gt = json.loads(sample["json"]), truth[sample["__key__"]]
        assert (meta["mask_source"], meta["normal_source"]) == ("background", "flame")
        mask, gt_mask = (_gray(s["mask.png"]) > 127 for s in (sample, gt))
        assert (mask & gt_mask).sum() / (mask | gt_mask).sum() > 0.9
        normal, normal_mask = decode_normal_png(sample["normal.png"])
        gt_normal, gt_normal_mask = decode_normal_png(gt["normal.png"])
        both = normal_mask & gt_normal_mask
        assert both.sum() > 0.9 * gt_normal_mask.sum()
        # the fallback renders the very FLAME fit that rendered the procedural frames: near-exact normals
        assert np.median(angular_error_deg(normal, gt_normal, both)) < 2.0


def test_onnx_normal_estimator(data, tmp_path):
    root = _subject_only(data, tmp_path / "data")
    model = tmp_path / "normals.onnx"
    _constant_normal_onnx(model, (0.0, 0.6, 0.8))
    out = tmp_path / "out"
    report = pack(
        out,
        [("nersemble", root / "nersemble")],
        resolution=RES,
        samples_per_shard=100,
        normal_estimator=model,
        progress=False,
    )
    assert report.ok
    for sample in iter_shard(out / "nersemble-000000.tar"):
        assert json.loads(sample["json"])["normal_source"] == "onnx"
        normal, mask = decode_normal_png(sample["normal.png"])
        assert np.array_equal(mask, _gray(sample["mask.png"]) > 127)
        assert np.allclose(normal[mask], [0.0, -0.6, -0.8], atol=1e-3)  # SynthHuman's (OpenCV) axes -> ours


def test_background_mask_recovers_a_disk():
    rng = np.random.default_rng(0)
    backdrop = np.broadcast_to(np.linspace(60, 200, 64)[:, None, None], (64, 64, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:64, :64]
    disk = (yy - 30) ** 2 + (xx - 34) ** 2 < 15**2
    image = backdrop.copy()
    image[disk] = rng.integers(0, 50, (disk.sum(), 3))
    image[2, 2] = 255  # isolated sensor noise is not foreground
    assert np.array_equal(background_mask(image, backdrop) > 0.5, disk)


def _gray(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)


def _long_sequence(root: Path, frames: int, keyframe_interval: int) -> Path:
    """One camera, ``frames`` flat frames whose grey level is 2 x the frame index, a fixed square alpha."""
    sequence = root / "001" / "sequences" / "EXP-1-head"
    camera = Camera(np.eye(4), np.array([[40.0, 0, 16], [0, 40.0, 16], [0, 0, 1]]), 32, 32)
    write_camera_params(root / "001" / "calibration" / "camera_params.json", {"222200037": camera})
    grey = np.broadcast_to((2 * np.arange(frames, dtype=np.uint8))[:, None, None, None], (frames, 32, 32, 3))
    alpha = np.zeros((frames, 32, 32), np.uint8)
    alpha[:, 8:24, 8:24] = 255
    write_video(
        sequence / "images" / "cam_222200037.mp4",
        np.ascontiguousarray(grey),
        keyframe_interval=keyframe_interval,
    )
    write_video(sequence / "alpha_maps" / "cam_222200037.mp4", alpha, keyframe_interval=keyframe_interval)
    still = FlameParams.zeros(frames, 20, 10)  # the procedural head 1 m in front of the camera
    still.translation[:, 2] = 1.0
    write_nersemble_tracking(sequence / "tracking" / "flame2023_tracking_v2.npz", still)
    return root


def test_a_sequence_over_many_shards_decodes_each_frame_about_once(tmp_path):
    """120 frames in 5 shards. An actor that packed the shard before continues its decoders, so each frame is
    decoded once; one that did not seeks to the shard's first frame (from the keyframe before it), never from
    frame 0. Both write the same bytes."""
    root = _long_sequence(tmp_path / "nersemble", frames=120, keyframe_interval=10)
    plans = plan_shards(list_inputs([("nersemble", root)]), 25, 10**9, sample_bytes_bound(16))
    assert [len(p.samples) for p in plans] == [25, 25, 25, 25, 20]
    out = tmp_path / "out"
    out.mkdir()
    job = PackJob(out, PackSettings(resolution=16))
    job.setup()

    def pack(plan: ShardPlan) -> dict:
        stats = job.run(WorkUnit(plan.name, {"plan": plan}))
        assert stats["packed_video_frames"] == 2 * len(plan.samples)  # colour + alpha
        for sample in iter_shard(out / f"{plan.name}.tar"):  # the right frames were packed
            frame = json.loads(sample["json"])["frame"]
            rgb = cv2.imdecode(np.frombuffer(sample["rgb.png"], np.uint8), cv2.IMREAD_COLOR)
            assert abs(float(np.median(rgb)) - 2 * frame) <= 2
        return stats

    in_order = [pack(plan)["decoded_video_frames"] for plan in plans]
    assert in_order == [2 * len(plan.samples) for plan in plans]  # 240 decoded for 240 packed
    written = {plan.name: (out / f"{plan.name}.tar").read_bytes() for plan in plans}
    for plan in reversed(plans):  # nothing to continue: each shard seeks
        first = plan.samples[0].frame
        assert pack(plan)["decoded_video_frames"] == 2 * (len(plan.samples) + first % 10)
        assert (out / f"{plan.name}.tar").read_bytes() == written[plan.name]


def test_background_images_are_read_only_for_frames_without_alpha(tmp_path, monkeypatch):
    """A capture's BACKGROUND image (a ~60 ms JPEG decode at 3208x2200) is read only where a frame has no alpha
    map, and then once per camera per shard, not per frame."""
    root = _long_sequence(tmp_path / "nersemble", frames=12, keyframe_interval=4)
    background = root / "001" / "sequences" / "BACKGROUND" / "image_222200037.jpg"
    background.parent.mkdir(parents=True)
    cv2.imwrite(str(background), np.zeros((32, 32, 3), np.uint8))
    reads = []
    monkeypatch.setattr(
        packing, "read_rgb8", lambda path: reads.append(path) or np.zeros((32, 32, 3), np.uint8)
    )

    def pack_all(out: Path) -> None:
        out.mkdir()
        job = PackJob(out, PackSettings(resolution=16))
        job.setup()
        for plan in plan_shards(list_inputs([("nersemble", root)]), 6, 10**9, sample_bytes_bound(16)):
            job.run(WorkUnit(plan.name, {"plan": plan}))

    pack_all(tmp_path / "with_alpha")
    assert reads == []
    shutil.rmtree(root / "001" / "sequences" / "EXP-1-head" / "alpha_maps")
    pack_all(tmp_path / "without_alpha")
    assert reads == [background, background]  # 2 shards of 6 frames


def test_a_synthhuman_folder_is_listed_once_per_job(tmp_path, monkeypatch):
    """Listing is O(folder); once per sample (or per shard) would make packing a large folder quadratic."""
    root = tmp_path / "synthhuman"
    alpha = np.zeros((16, 16), np.uint8)
    alpha[4:12, 4:12] = 255
    normal = np.broadcast_to(np.array([0.0, 0.0, 1.0]), (16, 16, 3))
    K = np.array([[20.0, 0, 8], [0, 20.0, 8], [0, 0, 1]])
    for index in range(6):
        write_synthhuman_sample(
            root, index, np.full((16, 16, 3), 40 * index, np.uint8), alpha, np.full((16, 16), 0.5), normal, K
        )
    listed = []
    iterdir = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: listed.append(self) or iterdir(self))
    plans = plan_shards(list_inputs([("synthhuman", root)]), 2, 10**9, sample_bytes_bound(8))
    job = PackJob(tmp_path / "out", PackSettings(resolution=8))
    job.setup()
    (tmp_path / "out").mkdir()
    for plan in plans:
        job.run(WorkUnit(plan.name, {"plan": plan}))
    assert len(plans) == 3 and listed.count(root) == 1
    grey = [
        cv2.imdecode(np.frombuffer(s["rgb.png"], np.uint8), cv2.IMREAD_COLOR)[4, 4, 0]
        for p in plans
        for s in iter_shard(tmp_path / "out" / f"{p.name}.tar")
    ]
    assert grey == [40 * i for i in range(6)]  # each shard read its own samples
