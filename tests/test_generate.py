"""`geodiff4d generate`: resume after a real actor kill, no work on a finished rerun, bytes independent of the
worker count, recon reading its output directly, and bad inputs ending in one clear message.

Durations measured on the shared 2-core machine at load average ~30 (idle runs are several times faster):
the actor kill/rerun test 268 s, recon on a generate output 190 s, the packed-shards fixture 182 s (both shard
tests share it), the two input-resolution tests 65-92 s (dlib + landmark tracking of a real photo)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from geodiff4d.cluster.cli import app
from geodiff4d.core.jobs import WorkUnit
from geodiff4d.gen.generate import GenerateJob, generate, inputs_path, plan, plan_units, prepare
from geodiff4d.gen.generate_inputs import SubjectInputs
from geodiff4d.gen.input_cache import InputsLRU, inputs_nbytes, prepare_once, read_cached, write_cached
from geodiff4d.gen.model_run import run_config as config_of
from geodiff4d.gen.sample_frames import read_sequence
from geodiff4d.recon.run import ReconConfig, reconstruct

sys.path.insert(0, str(Path(__file__).parent))
from gen_synthetic import one_torch_thread  # noqa: E402, F401
from test_gen_data import SEQUENCE, config  # noqa: E402

FRAMES, VIEWS = 4, 3
KILLED = "s0.f00002-00004.c000"


class _KillOnceJob(GenerateJob):
    """Kills its own actor process after writing the frames of KILLED, before the unit can commit (once)."""

    def after_write(self, unit: WorkUnit) -> None:
        flag = self.out / ".killed"
        if unit.id == KILLED and not flag.exists():
            flag.touch()
            os.kill(os.getpid(), signal.SIGKILL)


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder with run/ (a tiny model trained one step), a face photo (scikit-image's astronaut), a video of
    it moving right, and a tracking file of FRAMES frames of random expressions for the procedural head."""
    from gen_synthetic import make_batches_factory, one_thread
    from skimage import data as images

    from geodiff4d.core.io.video import write_video
    from geodiff4d.datasets.flame import FlameParams
    from geodiff4d.datasets.frame_folder import write_tracking
    from geodiff4d.datasets.procedural_head import procedural_head_model
    from geodiff4d.gen.train import train_loop

    root = tmp_path_factory.mktemp("generate")
    with one_thread():
        train_loop(config(), 1, make_batches_factory(2, 16, crop=16), root / "run", max_steps=1, quiet=True)
    photo = images.astronaut()[:384, 64:448]
    Image.fromarray(photo).save(root / "astronaut.png")
    write_video(root / "drive.mp4", np.stack([np.roll(photo, 4 * t, axis=1) for t in range(FRAMES)]))
    head = procedural_head_model(0)
    motion = FlameParams.zeros(FRAMES, head.n_shape, head.n_expr)
    motion.expression[:] = torch.from_numpy(np.random.default_rng(0).normal(0, 0.5, (FRAMES, head.n_expr)))
    write_tracking(root / "driving.npz", motion)
    return root


def _spec(tmp: Path, root: Path, **subject) -> Path:
    entry = {
        "name": "s0",
        "reference": {"image": str(root / "astronaut.png")},
        "identity": {"fit": True},
        "cameras": {"orbit": VIEWS, "yaw": 40},
        "driving": {"tracking": str(root / "driving.npz")},
        "frames": FRAMES,
        **subject,
    }
    path = tmp / "spec.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "run": str(root / "run"),
                "seed": 5,
                "frames_per_unit": 2,
                "cameras_per_unit": 2,
                "subjects": [entry],
            }
        )
    )
    return path


def _outputs(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and p.relative_to(root).parts[0] in ("rgb", "normal", "mask", "cameras", "tracking", "latents")
    }


@pytest.mark.slow  # Ray actors / procedural data + packing; see the module docstring
def test_killed_actor_rerun_and_worker_count(inputs, local_ray, tmp_path):
    spec = _spec(tmp_path, inputs)
    one = tmp_path / "one"
    assert generate(spec, one, workers=1, progress=False).ok
    expected = _outputs(one)
    names = sorted(expected)
    assert sum(n.startswith("rgb/") for n in names) == FRAMES * VIEWS
    assert {n.split("/")[0] for n in names} == {"rgb", "normal", "mask", "cameras", "tracking", "latents"}

    two = tmp_path / "two"
    first = generate(spec, two, workers=2, progress=False, job=_KillOnceJob, max_retries=0)
    assert (two / ".killed").exists() and list(first.failed) == [KILLED]  # the actor really died
    assert "worker died" in first.failed[KILLED]
    committed = sorted(first.completed)
    written = {
        n: (two / n).stat().st_mtime_ns for n in _outputs(two) if n.startswith("rgb/") and "/orbit002/" in n
    }
    rerun = generate(spec, two, workers=2, progress=False)
    assert rerun.completed == [KILLED] and sorted(rerun.skipped) == committed  # only the uncommitted unit ran
    assert all((two / n).stat().st_mtime_ns == t for n, t in written.items())  # committed frames untouched
    assert _outputs(two) == expected  # exactly the frames expected, byte-identical to the 1-worker run
    again = generate(spec, two, workers=2, progress=False)
    assert again.completed == [] and len(again.skipped) == len(committed) + 1


@pytest.mark.slow  # Ray actors / procedural data + packing; see the module docstring
def test_recon_reads_a_generate_output_as_png_files_or_tars_alike(inputs, local_ray, tmp_path):
    """The tar output holds the PNG folder's bytes (WebDataset reads it as samples), and recon reads it directly:
    the avatar equals, tensor for tensor, the one reconstructed from the PNG folder."""
    import webdataset as wds
    from safetensors.torch import load_file

    from geodiff4d.datasets.frame_tars import TarFrames

    spec = _spec(tmp_path, inputs, cameras={"cameras_json": str(tmp_path / "rig.json")})
    rig = {
        f"cam{i}": {
            "world_to_cam": np.eye(4).tolist(),
            "K": [[100, 0, 50], [0, 100, 50], [0, 0, 1]],
            "width": 100,
            "height": 100,
        }
        for i in range(2)
    }
    for i, x in enumerate((-0.1, 0.1)):
        rig[f"cam{i}"]["world_to_cam"][0][3] = x
        rig[f"cam{i}"]["world_to_cam"][2][3] = 0.6
    (tmp_path / "rig.json").write_text(json.dumps(rig))
    out, tars = tmp_path / "frames", tmp_path / "tars"
    assert generate(spec, out, workers=1, progress=False).ok
    _, [planned] = plan(spec, tars, "tar")  # the same inputs for the tar run, not resolved again (dlib)
    write_cached(inputs_path(tars, "s0"), planned.key, read_cached(inputs_path(out, "s0")))
    for part in ("cameras", "tracking"):
        shutil.copytree(out / part, tars / part)
    assert generate(spec, tars, workers=2, progress=False, output_format="tar").ok
    assert not (tars / "rgb").exists() and len(list((tars / "tars/s0/GEN").glob("*.tar"))) == 2  # 2 units
    members = TarFrames(tars, "s0", "GEN")
    pngs = {(p.parts[-2], int(p.stem), p.parts[-5]): p.read_bytes() for p in out.glob("*/s0/GEN/*/*.png")}
    assert len(pngs) == FRAMES * 2 * 3 and {k: members.read(*k) for k in members.members} == pngs
    shards = [str(p) for p in sorted((tars / "tars/s0/GEN").glob("*.tar"))]
    samples = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))
    assert sorted(s["__key__"] for s in samples) == sorted(f"{c}/{f:05d}" for c, f, _ in pngs if _ == "rgb")
    assert all(set(s) >= {"rgb.png", "normal.png", "mask.png"} for s in samples)
    avatars = []
    for name, root in (("png", out), ("tar", tars)):
        report = reconstruct(root, tmp_path / name, workers=1, config=ReconConfig(steps=2), progress=False)
        assert report.ok and report.completed == ["s0"]
        avatars.append(load_file(tmp_path / name / "s0/avatar.safetensors"))
    assert avatars[0].keys() == avatars[1].keys() and all(
        torch.equal(avatars[0][k], avatars[1][k]) for k in avatars[0]
    )
    latents = np.load(out / "latents/s0/GEN.npz")
    assert latents["frames"].tolist() == list(range(FRAMES))


def _cli(args: list[str]):
    """Run the CLI; it must end with exit code 2 (a usage error) and a message, not an exception."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.mark.slow  # dlib + landmark tracking of a real photo; see the module docstring
def test_bad_inputs_end_with_one_message(inputs, local_ray, tmp_path):
    """Inputs the driver cannot see wrong without decoding them (no face, a short driving sequence) are found by
    the actor that prepares the subject, and still end the command with one message."""
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(blank)
    spec = _spec(tmp_path, inputs, reference={"image": str(blank)})
    out = _cli(["generate", str(spec), "--out", str(tmp_path / "o")])
    assert "subjects[0].reference.image" in out and str(blank) in out and "no detectable face" in out

    bad_rig = tmp_path / "rig.json"
    bad_rig.write_text(json.dumps({"cam0": {"K": np.eye(3).tolist(), "width": 16, "height": 16}}))
    spec = _spec(tmp_path, inputs, cameras={"cameras_json": str(bad_rig)})
    out = _cli(["generate", str(spec), "--out", str(tmp_path / "o")])
    assert "subjects[0].cameras.cameras_json" in out and str(bad_rig) in out and "world_to_cam" in out

    spec = _spec(tmp_path, inputs, frames=99)
    out = _cli(["generate", str(spec), "--out", str(tmp_path / "o")])
    assert "subjects[0].driving.tracking" in out and f"has {FRAMES} frames, 99 were asked" in out

    spec.write_text(spec.read_text().replace("frames: 99", "framez: 99"))
    out = _cli(["generate", str(spec), "--out", str(tmp_path / "o")])
    assert str(spec) in out and "subjects.0.framez" in out


@pytest.mark.slow  # dlib + landmark tracking of a real photo; see the module docstring
def test_inputs_resolve_and_units_cover_every_frame_and_camera_once(inputs, tmp_path):
    """A real photo (scikit-image's astronaut) as reference with a fitted identity; a video of it as driving."""
    spec = _spec(tmp_path, inputs, driving={"video": str(inputs / "drive.mp4")})
    _, [subject] = prepare(spec, tmp_path / "out")
    assert subject.ref_rgb.shape == (3, 16, 16) and subject.driving.shape == (FRAMES, 3, 16, 16)
    assert (subject.ref_posemap.norm(dim=0) > 0.5).float().mean() > 0.2  # the fitted head fills the crop
    assert subject.tracking.batch_size == FRAMES and torch.isfinite(subject.tracking.expression).all()
    assert subject.tracking.translation[-1, 0] > subject.tracking.translation[0, 0]  # the face moves right
    assert len(subject.cameras) == VIEWS
    _, [planned] = plan(spec, tmp_path / "out")  # the driver's view: the cached subject is kept
    assert planned.cameras == tuple(subject.cameras) and planned.frames == FRAMES
    assert read_cached(inputs_path(tmp_path / "out", "s0"), planned.key) is not None
    units = plan_units(planned, 3, 2)
    pairs = [
        (f, c)
        for u in units
        for f in range(u.payload["start"], u.payload["stop"])
        for c in u.payload["cameras"]
    ]
    assert sorted(pairs) == sorted((f, c) for f in range(FRAMES) for c in subject.cameras)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, local_ray) -> Path:
    """One procedural subject packed at 16 px."""
    from geodiff4d.datasets.packing import pack
    from geodiff4d.datasets.procedural import SynthSpec, synthesize

    root = tmp_path_factory.mktemp("generate_shards")
    spec = SynthSpec(subjects=1, sequences=1, frames=FRAMES, cameras=2, resolution=64, synthetic=1, seed=0)
    assert synthesize(root / "raw", spec, workers=2, progress=False).ok
    sources = [("nersemble", root / "raw/nersemble"), ("synthhuman", root / "raw/synthhuman")]
    assert pack(root / "shards", sources, resolution=16, workers=2, progress=False).ok
    return root / "shards"


@pytest.mark.slow  # Ray actors / procedural data + packing; see the module docstring
def test_exported_pipeline_samples_what_geodiff4d_sample_writes(inputs, shards, tmp_path):
    """The run's RUN/pipeline folder, loaded by diffusers alone, gives `geodiff4d sample --run RUN`'s images."""
    from diffusers import DiffusionPipeline

    from geodiff4d.datasets.loader import augment_driving
    from geodiff4d.gen.diffusion_pipeline import GeoDiff4DPipeline
    from geodiff4d.gen.sample_frames import plain_driving_config

    run = inputs / "run"
    out, frames, seed = tmp_path / "sampled", (1, 2), 3
    result = CliRunner().invoke(
        app,
        [
            "sample",
            "--run",
            str(run),
            "--shards",
            str(shards),
            "--subject",
            "001",
            "--sequence",
            SEQUENCE,
            "--out",
            str(out),
            "--frames",
            "1",
            "--frames",
            "2",
            "--seed",
            str(seed),
        ],
    )
    assert result.exit_code == 0, result.output
    pipe = DiffusionPipeline.from_pretrained(str(run / "pipeline"), trust_remote_code=True)
    assert type(pipe).__name__ == GeoDiff4DPipeline.__name__
    packed = read_sequence(shards, "001", SEQUENCE)
    cameras = sorted({c for c, _ in packed})
    config, rng = plain_driving_config(config_of(run).model.driving_size), np.random.default_rng(0)
    driving = torch.stack(
        [
            augment_driving(packed[(cameras[0], f)]["rgb"], packed[(cameras[0], f)]["mask"], config, rng)
            for f in frames
        ]
    )
    reference = packed[(cameras[0], frames[0])]
    for i, camera in enumerate(cameras):
        posemaps = torch.stack([packed[(camera, f)]["posemap"] for f in frames])
        images = pipe(
            reference["rgb"],
            reference["posemap"],
            driving,
            posemaps,
            torch.Generator().manual_seed(seed * 1_000 + i),
        ).rgb
        for k, frame in enumerate(frames):
            written = np.asarray(Image.open(out / "rgb/001" / SEQUENCE / camera / f"{frame:05d}.png"))
            expected = (images[k].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            np.testing.assert_array_equal(written, expected)


@pytest.mark.slow  # Ray actors / procedural data + packing; see the module docstring
def test_shard_reference_and_driving_with_nersemble_cameras_resolve(inputs, shards, tmp_path):
    packed = {"shards": str(shards), "subject": "001", "sequence": SEQUENCE}
    tracking = shards.parent / "raw/nersemble/001/sequences" / SEQUENCE / "tracking/flame2023_tracking_v2.npz"
    spec = _spec(
        tmp_path,
        inputs,
        reference={**packed, "camera": "222200037", "frame": 1},
        identity={"tracking": str(tracking)},
        driving={**packed, "camera": "222200037"},
        cameras={"nersemble": str(shards.parent / "raw/nersemble"), "subject": "001", "sequence": SEQUENCE},
    )
    _, [subject] = prepare(spec, tmp_path / "out")
    assert sorted(subject.cameras) == sorted({c for c, _ in read_sequence(shards, "001", SEQUENCE)})
    assert all((c.width, c.height) == (16, 16) for c in subject.cameras.values())
    assert subject.driving.shape == (FRAMES, 3, 16, 16) and subject.tracking.batch_size == FRAMES


def _subject_inputs(frames: int = 3) -> SubjectInputs:
    from geodiff4d.datasets.cameras import intrinsics, look_at_camera
    from geodiff4d.datasets.flame import FlameParams

    g = torch.Generator().manual_seed(0)
    tracking = FlameParams.zeros(frames, 10, 10)
    tracking.expression[:] = torch.randn(frames, 10, generator=g)
    camera = look_at_camera(
        np.array([0.0, 0, 1]), np.zeros(3), np.array([0.0, 1, 0]), intrinsics(20, 16, 16), 16, 16
    )
    return SubjectInputs(
        "s0",
        "GEN",
        torch.rand(3, 16, 16, generator=g),
        torch.rand(3, 16, 16, generator=g),
        torch.rand(frames, 3, 8, 8, generator=g),
        tracking,
        {"cam0": camera},
    )


def _never() -> SubjectInputs:
    raise AssertionError("prepared although a valid cache exists")


class _Planted:
    """A pickle that, when loaded, touches a file: code run by whoever unpickles it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_cached_inputs_are_no_pickle_and_a_planted_one_is_never_run(tmp_path):
    import pickle

    out, marker = tmp_path / "out", tmp_path / "ran"
    inputs_path(out, "s0").parent.mkdir(parents=True)
    inputs_path(out, "s0").write_bytes(pickle.dumps({"key": "k", "inputs": _Planted(marker)}))
    inputs = _subject_inputs()
    made = []
    again = prepare_once(inputs_path(out, "s0"), "k", lambda: made.append(1) or inputs)
    assert made == [1] and torch.equal(
        again.driving, inputs.driving
    )  # prepared again (and read back), not loaded
    assert not marker.exists()  # torch.load(weights_only=False) ran it

    inputs_path(out, "s0").write_bytes(pickle.dumps({"key": "k", "inputs": _Planted(marker)}))
    assert read_cached(inputs_path(out, "s0"), "k") is None and not marker.exists()
    write_cached(inputs_path(out, "s0"), "k", inputs)
    for again in (
        read_cached(inputs_path(out, "s0"), "k"),
        prepare_once(inputs_path(out, "s0"), "k", _never),
    ):
        assert (again.name, again.sequence, list(again.cameras)) == ("s0", "GEN", ["cam0"])
        assert again.cameras["cam0"].to_json() == inputs.cameras["cam0"].to_json()
        for name in ("ref_rgb", "ref_posemap", "driving"):
            assert torch.equal(getattr(again, name), getattr(inputs, name))
        assert all(torch.equal(getattr(again.tracking, k), v) for k, v in vars(inputs.tracking).items())
    assert read_cached(inputs_path(out, "s0"), "another key") is None  # made for other inputs: not reused

    broken = _subject_inputs()
    broken.driving = broken.driving[:2]  # 2 driving frames for 3 tracked ones
    write_cached(inputs_path(out, "s0"), "k", broken)
    assert read_cached(inputs_path(out, "s0"), "k") is None


def test_an_input_file_rewritten_in_place_is_a_changed_input(tmp_path):
    from geodiff4d.core.io.json_yaml import write_yaml
    from geodiff4d.gen.checkpoint import WEIGHTS
    from geodiff4d.gen.config import load_config
    from geodiff4d.gen.generate import _input_keys, sampling_identity
    from geodiff4d.gen.generate_spec import GenerateSpec

    config = load_config("demo").model_dump(mode="json")
    write_yaml(tmp_path / "config.yaml", config)
    (tmp_path / WEIGHTS).write_bytes(b"w")  # a save_pretrained folder: the run is its own checkpoint
    for name in ("face.png", "driving.npz"):
        (tmp_path / name).write_bytes(b"one")
    entry = {
        "name": "s0",
        "reference": {"image": str(tmp_path / "face.png")},
        "cameras": {"orbit": 2},
        "driving": {"tracking": str(tmp_path / "driving.npz")},
        "frames": 2,
    }
    spec = GenerateSpec.model_validate({"run": str(tmp_path), "subjects": [entry]})

    def keys(spec: GenerateSpec) -> list[str]:
        return _input_keys(spec, sampling_identity(tmp_path))

    [key] = keys(spec)
    assert keys(spec) == [key]
    (tmp_path / "driving.npz").write_bytes(b"other motion")  # same path, another file
    assert keys(spec) != [key]
    [key] = keys(spec)
    (tmp_path / WEIGHTS).write_bytes(b"retrained")
    assert keys(spec) != [key]
    [key] = keys(spec)
    tar = GenerateSpec.model_validate({"run": str(tmp_path), "format": "tar", "subjects": [entry]})
    assert keys(tar) != [key]  # another output format: its outputs are redone
    config["sample"]["compile"] = True  # the same frames, faster: nothing to redo
    write_yaml(tmp_path / "config.yaml", config)
    assert keys(spec) == [key]
    config["sample"]["steps"] += 1  # the run's sample settings changed: its frames are redone
    write_yaml(tmp_path / "config.yaml", config)
    assert keys(spec) != [key]


def test_an_actor_s_prepared_subjects_are_evicted_by_size():
    size, loads = inputs_nbytes(_subject_inputs()), []
    assert inputs_nbytes(_subject_inputs(frames=6)) > size  # more frames, more bytes

    def load(name: str):
        return lambda: loads.append(name) or _subject_inputs()

    cache = InputsLRU(2 * size + size // 2)  # room for two subjects
    for name in ("a", "b", "a", "c", "a", "b"):
        cache.get(name, load(name))
    assert loads == ["a", "b", "c", "b"]  # c pushed out b (a was used after b), then b pushed out c
    assert list(cache.items) == ["a", "b"] and cache.nbytes == 2 * size
    small = InputsLRU(1)  # a subject above the bound is still kept while it is the one in use
    small.get("a", load("a"))
    small.get("b", load("b"))
    assert list(small.items) == ["b"]


def test_concurrent_actors_prepare_a_subject_once_and_a_dead_holder_s_lock_is_broken(tmp_path):
    import subprocess
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    path, made, guard = tmp_path / "inputs" / "s0.safetensors", [], threading.Lock()

    def make() -> SubjectInputs:
        with guard:
            made.append(1)
        time.sleep(0.5)  # the others find the lock taken and wait for the cache
        return _subject_inputs()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: prepare_once(path, "k", make, poll_s=0.05), range(4)))
    assert len(made) == 1 and all(torch.equal(r.driving, results[0].driving) for r in results)

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    other = tmp_path / "inputs" / "s1.safetensors"
    other.with_name("s1.safetensors.lock").write_text(
        json.dumps({"host": __import__("socket").gethostname(), "pid": int(dead.stdout)})
    )
    with ThreadPoolExecutor(1) as pool:  # a lock left by a killed actor on this host: taken over, no hang
        assert pool.submit(prepare_once, other, "k", _subject_inputs, 0.05).result(timeout=30) is not None
    assert not other.with_name("s1.safetensors.lock").exists()


def _rig(path: Path, cameras: int) -> Path:
    """A cameras JSON of `cameras` views around the origin, 1 m away."""
    from geodiff4d.datasets.cameras import intrinsics, look_at_camera
    from geodiff4d.datasets.frame_folder import write_cameras

    rig = {}
    for i, yaw in enumerate(np.linspace(-0.6, 0.6, cameras)):
        eye = np.array([np.sin(yaw), 0.0, np.cos(yaw)])
        rig[f"cam{i:02d}"] = look_at_camera(
            eye, np.zeros(3), np.array([0.0, 1, 0]), intrinsics(20, 16, 16), 16, 16
        )
    write_cameras(path, rig)
    return path


def _many_subjects_spec(tmp: Path, run: Path, subjects: int, frames: int, cameras: int, **spec) -> Path:
    """Subjects whose reference and driving files are not even images or tracking: planning must not read them."""
    (tmp / "not-decoded.png").write_bytes(b"not an image")
    (tmp / "not-decoded.npz").write_bytes(b"not a tracking file")
    entry = {
        "reference": {"image": str(tmp / "not-decoded.png")},
        "identity": {"tracking": str(tmp / "not-decoded.npz")},
        "cameras": {"cameras_json": str(_rig(tmp / "rig.json", cameras))},
        "driving": {"tracking": str(tmp / "not-decoded.npz")},
        "frames": frames,
    }
    path = tmp / "many.yaml"
    subjects_list = [{"name": f"s{i}", **entry} for i in range(subjects)]
    path.write_text(yaml.safe_dump({"run": str(run), "subjects": subjects_list, **spec}))
    return path


def test_the_driver_plans_without_decoding_and_drops_only_changed_subjects(inputs, tmp_path):
    out = tmp_path / "out"
    spec = _many_subjects_spec(tmp_path, inputs / "run", 3, 300, 16)
    _, subjects = plan(spec, out)
    assert [s.name for s in subjects] == ["s0", "s1", "s2"]
    assert all(s.cameras == tuple(f"cam{i:02d}" for i in range(16)) and s.frames == 300 for s in subjects)
    units = [u for s in subjects for u in plan_units(s, 32, 4)]
    assert len(units) == 3 * 10 * 4 and not out.exists()  # nothing resolved, decoded or written
    commits = out / "_generate" / "commits"
    commits.mkdir(parents=True)
    for s in subjects:
        (commits / f"{s.name}.f00000-00032.c000.stats.json").write_text("{}")
        (out / "rgb" / s.name / s.sequence).mkdir(parents=True)
    write_cached(inputs_path(out, "s0"), subjects[0].key, _subject_inputs())  # s0 prepared for this plan
    write_cached(inputs_path(out, "s1"), "an older spec", _subject_inputs())  # s1 for another one
    plan(spec, out)
    assert sorted(p.name.split(".")[0] for p in commits.iterdir()) == ["s0"]  # s1 changed, s2 never prepared
    assert (out / "rgb/s0/GEN").is_dir() and not (out / "rgb/s1/GEN").exists()
    assert inputs_path(out, "s0").is_file() and not inputs_path(out, "s1").exists()


class _CountingJob(GenerateJob):
    """Appends its process id to OUT/.loads each time an actor loads the model."""

    def setup(self) -> None:
        with open(self.out / ".loads", "a") as file:
            file.write(f"{os.getpid()}\n")
        super().setup()


def _cache_fitting_inputs(spec: Path, out: Path, frames: int) -> list:
    """Each planned subject's inputs cached under `out` for its key (shapes of the tiny model, a procedural head in
    front of the rig), so actors read them instead of resolving the undecodable files the spec names."""
    from geodiff4d.datasets.flame import FlameParams
    from geodiff4d.datasets.frame_folder import read_cameras
    from geodiff4d.datasets.procedural_head import procedural_head_model

    _, subjects = plan(spec, out)
    head, g = procedural_head_model(0), torch.Generator().manual_seed(1)
    for s in subjects:
        tracking = FlameParams.zeros(frames, head.n_shape, head.n_expr)
        tracking.expression[:] = 0.3 * torch.randn(frames, head.n_expr, generator=g)
        rig = read_cameras(spec.parent / "rig.json")
        inputs = SubjectInputs(
            s.name,
            s.sequence,
            torch.rand(3, 16, 16, generator=g),
            torch.rand(3, 16, 16, generator=g),
            torch.rand(frames, 3, 16, 16, generator=g),
            tracking,
            rig,
        )
        write_cached(inputs_path(out, s.name), s.key, inputs)
    return subjects


@pytest.mark.slow  # Ray actors; see the module docstring
def test_the_model_loads_once_per_actor_for_all_subjects(inputs, local_ray, tmp_path):
    spec = _many_subjects_spec(tmp_path, inputs / "run", 3, 2, 2, frames_per_unit=1, cameras_per_unit=2)
    out = tmp_path / "out"
    subjects = _cache_fitting_inputs(spec, out, 2)
    report = generate(spec, out, workers=2, progress=False, job=_CountingJob)
    assert report.ok and len(report.completed) == 3 * 2  # 3 subjects x 2 one-frame units
    loads = (out / ".loads").read_text().split()
    assert len(loads) == len(set(loads)) <= 2  # each actor loaded the model once, for all three subjects
    assert {p.parts[-4] for p in (out / "rgb").rglob("*.png")} == {s.name for s in subjects}
