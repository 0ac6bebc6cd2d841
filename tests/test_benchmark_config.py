"""`geodiff4d benchmark`: a bad config or data ends with one message naming the field, before any work."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import yaml
from typer.testing import CliRunner

from geodiff4d.cluster.benchmark_config import dotted_to_nested, load_benchmark_config, merge
from geodiff4d.cluster.cli import app
from geodiff4d.core.io.video import write_video
from geodiff4d.datasets.cameras import nersemble_rig
from geodiff4d.datasets.flame import FlameParams
from geodiff4d.datasets.flame_tracking import write_nersemble_tracking
from geodiff4d.datasets.nersemble import write_camera_params

runner = CliRunner()
CAMERAS = ("222200037", "222200046", "220700191", "222200039")
PROCEDURAL = {"procedural": {"subjects": 2, "sequences": 2, "frames": 16, "resolution": 64, "synthetic": 0}}
METHODS = [{"name": "geodiff4d", "kind": "geodiff4d"}, {"name": "copy", "kind": "reference_copy"}]


def _run(tmp_path, config: dict):
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["benchmark", str(path), "--out", str(tmp_path / "run")])
    assert not ray.is_initialized(), "the config must be rejected before Ray starts"
    assert "Traceback" not in result.output
    return result


def _nersemble(root, tracked_sequences):
    """Two subjects, two sequences each, the mono benchmark's four cameras; tracking only where asked."""
    rig = nersemble_rig(width=32, height=32, focal=40.0)
    frames = np.zeros((2, 32, 32, 3), np.uint8)
    for subject in ("001", "002"):
        write_camera_params(
            root / subject / "calibration" / "camera_params.json", {s: rig[s] for s in CAMERAS}
        )
        for sequence in ("EXP-1-head", "FREE"):
            folder = root / subject / "sequences" / sequence
            for serial in CAMERAS:
                write_video(folder / "images" / f"cam_{serial}.mp4", frames)
            if sequence in tracked_sequences:
                zeros = {
                    n: torch.zeros(2, k)
                    for n, k in (
                        ("expression", 10),
                        ("rotation", 3),
                        ("neck", 3),
                        ("jaw", 3),
                        ("eyes", 6),
                        ("translation", 3),
                    )
                }
                params = FlameParams(shape=torch.zeros(2, 20), scale=torch.ones(2, 1), **zeros)
                write_nersemble_tracking(
                    folder / "tracking" / "flame2023_tracking_v2.npz", params, np.arange(2)
                )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"methods": [{"name": "x", "kind": "magic"}]}, "methods.0.kind: Input should be 'geodiff4d'"),
        ({"methods": [{"name": "x", "kind": "external"}]}, "path is required for kind 'external'"),
        ({"subjects": ["009"]}, "subjects: ['009'] are not among the 2 procedural subjects"),
        ({"protocols": ["sideways"]}, "protocols.0: Input should be 'self', 'cross' or 'novel_views'"),
        (
            {"methods": [{"name": "v", "kind": "oracle", "overrides": {"recon.fit.lambda_nrml": 0}}]},
            "unknown field methods[v]: recon.fit.lambda_nrml",
        ),
        (
            {
                "methods": [
                    {
                        "name": "v",
                        "kind": "geodiff4d",
                        "overrides": {"generation.model_overrides.model.joint_normal": 1},
                    }
                ]
            },
            "unknown field methods[v]: generation.model.model.joint_normal",
        ),
        (
            {"subjects": ["001"], "generation": {"train_subjects": ["001"]}},
            "subjects ['001'] are also generation.train_subjects: evaluated subjects must be held out",
        ),
        (
            {"generation": {"train_subjects": ["007"]}},
            "generation.train_subjects: ['007'] are not among the 2 procedural",
        ),
        (
            {"ablation": {"full": "geodiff4d", "rows": {"nope": "joint_normals"}}},
            "ablation names methods that are not in methods: ['nope']",
        ),
        (
            {"ablation": {"full": "geodiff4d", "rows": {"copy": "no_such_row"}}},
            "ablation.rows.copy: Input should be",
        ),
    ],
)
def test_bad_config_names_the_field(tmp_path, change, message):
    result = _run(tmp_path, {"data": PROCEDURAL, "methods": METHODS, **change})
    assert result.exit_code == 2 and message in result.output, result.output


def test_missing_tracking_names_the_file_before_ray(tmp_path):
    _nersemble(tmp_path / "data", tracked_sequences={"EXP-1-head"})
    result = _run(tmp_path, {"data": {"nersemble": str(tmp_path / "data")}, "methods": METHODS})
    assert result.exit_code == 2
    assert (
        "001/sequences/FREE/tracking/flame2023_tracking.npz exists; the geodiff4d/vgm/oracle methods"
        in result.output
    )


def test_missing_hold_out_camera_and_subject_are_named(tmp_path):
    _nersemble(tmp_path / "data", tracked_sequences={"EXP-1-head", "FREE"})
    base = {"data": {"nersemble": str(tmp_path / "data")}, "methods": METHODS}
    result = _run(tmp_path, {**base, "holdout_cameras": ["222200046", "220700191", "999999999"]})
    assert (
        result.exit_code == 2
        and "cameras ['999999999'] (train_camera/holdout_cameras, nvs_train_camera/nvs_holdout_cameras) not recorded"
        in result.output
    )
    result = _run(tmp_path, {**base, "subjects": ["001", "042"]})
    assert result.exit_code == 2 and "subjects: ['042'] not in" in result.output


def test_variants_override_dotted_fields():
    assert dotted_to_nested({"recon.fit.steps": 5, "recon.seed": 1}) == {
        "recon": {"fit": {"steps": 5}, "seed": 1}
    }
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


def test_demo_config_is_valid():
    config = load_benchmark_config("benchmark-demo")
    assert {m.kind for m in config.methods} == {"geodiff4d", "vgm", "oracle", "reference_copy", "gt_noise"}


def test_the_demo_shows_the_paper_s_columns_and_all_seven_metrics():
    """Before, the demo's boards had no JOD, no AED and no VGM row."""
    from geodiff4d.eval.settings import PAPER_METRICS

    config = load_benchmark_config("benchmark-demo")
    shown = {p: config.eval.metrics_of(p) for p in config.protocols}
    for protocol, columns in PAPER_METRICS.items():
        assert set(columns) <= set(shown[protocol])
    assert set().union(*shown.values()) == {"psnr", "ssim", "lpips", "csim", "jod", "akd", "aed"}
    assert [m.name for m in config.methods if m.kind == "vgm"] == ["vgm"]


def test_demo_samples_from_the_shipped_checkpoint(tmp_path, monkeypatch):
    """benchmark-demo's generation.run is relative to the config file: found from any working directory, and
    its files are the ones MADE.json recorded (a damaged or partial checkout fails here, not mid-demo)."""
    import hashlib
    import json

    from geodiff4d.gen.checkpoint import resolve_init
    from geodiff4d.gen.config import load_config
    from geodiff4d.gen.model_run import run_config

    monkeypatch.chdir(tmp_path)
    run = load_benchmark_config("benchmark-demo").generation.run
    assert run.is_absolute() and run.name == "demo-32px"
    made = json.loads((run / "MADE.json").read_text())
    weights = resolve_init(run) / "diffusion_pytorch_model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == made["sha256"]
    assert run_config(run).model == load_config("demo").model, "the checkpoint is configs/demo.yaml's model"


def test_a_given_run_changed_in_place_is_sampled_again(tmp_path):
    """generation.run names a folder whose weights or sample settings can change under the same path: the
    generated frames' folders (and so the stage names and avatars) are keyed by them too, so a rerun samples
    again instead of keeping the frames of the old weights or settings."""
    import os

    from geodiff4d.cluster.benchmark import Benchmark
    from geodiff4d.core.io.json_yaml import read_yaml, write_yaml
    from geodiff4d.gen.checkpoint import WEIGHTS, resolve_init

    demo = load_benchmark_config("benchmark-demo")
    run = tmp_path / "demo-32px"
    shutil.copytree(demo.generation.run, run)
    config = demo.model_copy(update={"generation": demo.generation.model_copy(update={"run": run})})
    methods = {m.kind: m for m in config.methods}

    def keys() -> tuple[str, str]:
        bench = Benchmark(config, tmp_path / "out")
        return bench.generation_key(methods["geodiff4d"]), bench.vgm_folder(methods["vgm"]).name

    first = keys()
    assert keys() == first
    settings = read_yaml(run / "config.yaml")
    settings["sample"]["steps"] += 1
    write_yaml(run / "config.yaml", settings)
    resampled = keys()
    assert resampled[0] != first[0] and resampled[1] != first[1]
    weights = resolve_init(run) / WEIGHTS
    os.utime(
        weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9)
    )  # rewritten in place
    retrained = keys()
    assert retrained[0] != resampled[0] and retrained[1] != resampled[1]
    settings["sample"]["compile"] = True  # the same frames, faster: the same folders
    write_yaml(run / "config.yaml", settings)
    assert keys() == retrained


def test_frame_export_and_packs_rerun_when_a_subject_s_capture_files_change(tmp_path):
    """A real capture root can change under the same path (a re-download, v2 tracking, a new colour
    calibration): the frame export and the packs that read a subject's files record their digest, so a rerun
    redoes them and everything downstream instead of scoring the old frames."""
    import os

    from geodiff4d.cluster.benchmark import Benchmark, Subject

    root = tmp_path / "nersemble"
    for subject in ("017", "018"):
        (root / subject / "sequences" / "EMO-1").mkdir(parents=True)
        (root / subject / "sequences" / "EMO-1" / "cam_222200037.mp4").write_bytes(b"video")
    demo = load_benchmark_config("benchmark-demo")
    config = demo.model_copy(
        update={"data": demo.data.model_copy(update={"nersemble": root, "procedural": None})}
    )
    graph = Benchmark(config, tmp_path / "run").graph([Subject("017", "EMO-1", ("EMO-2",))])
    packs = [name for name in graph.stages if name.startswith("pack:")]
    watched = ["frames:017", *packs]
    assert packs and all(graph.stages[name].inputs is not None for name in watched)
    before = {name: graph.stages[name].inputs() for name in watched}
    video = root / "017" / "sequences" / "EMO-1" / "cam_222200037.mp4"
    os.utime(video, ns=(video.stat().st_atime_ns, video.stat().st_mtime_ns + 10**9))
    assert all(graph.stages[name].inputs() != before[name] for name in watched)
    (root / "017" / "calibration").mkdir()
    again = {name: graph.stages[name].inputs() for name in watched}
    (root / "017" / "calibration" / "color_calibration.json").write_text("{}")  # added beside the old files
    assert all(graph.stages[name].inputs() != again[name] for name in watched)


def test_a_generation_run_that_is_no_run_is_named(tmp_path):
    (tmp_path / "not-a-run").mkdir()
    result = _run(tmp_path, {"data": PROCEDURAL, "methods": METHODS, "generation": {"run": "not-a-run"}})
    assert result.exit_code == 2, result.output
    assert "methods[geodiff4d]: generation.run: not a trained run folder" in result.output, result.output
    assert (
        str(tmp_path / "not-a-run") in result.output
    )  # relative to the config file, not the working directory


def test_sequences_shorter_than_training_clips_are_refused(tmp_path):
    data = {"procedural": {**PROCEDURAL["procedural"], "frames": 8}}
    result = _run(tmp_path, {"data": data, "methods": METHODS})
    assert result.exit_code == 2
    assert "data.procedural.frames (8) is shorter than the 16-frame clips" in result.output, result.output


def test_ablation_variants_share_only_what_they_do_not_change(tmp_path):
    """Each training switch (and the seed replicate) its own model; the recon-only variant the full model and
    its generated frames."""
    from geodiff4d.cluster.benchmark import Benchmark

    config = load_benchmark_config(Path(__file__).resolve().parents[1] / "configs" / "ablations.yaml")
    bench = Benchmark(config, tmp_path)
    methods = {m.name: m for m in config.methods if m.kind == "geodiff4d"}
    keys = {
        n: (bench.model_key(m), bench.generation_key(m), bench.avatar_folder(m).name)
        for n, m in methods.items()
    }
    assert keys["no-normal-loss"][:2] == keys["full"][:2] and keys["no-normal-loss"][2] != keys["full"][2]
    assert keys["full-seed1"][0] != keys["full"][0]  # another training seed: another model
    assert len({k[0] for k in keys.values()}) == 6 and len({k[2] for k in keys.values()}) == 7
    full = methods["full"]
    assert bench.shards(full, "train") != bench.shards(
        full, "inputs"
    )  # evaluated subjects never packed for training


def test_jod_runs_at_the_frame_rate_of_the_data(tmp_path):
    """Before, the benchmark never passed fps, so JOD ran at 25 whatever the recording's rate."""
    from geodiff4d.cluster.benchmark import Benchmark, BenchmarkError

    _nersemble(tmp_path / "data", tracked_sequences={"EXP-1-head", "FREE"})
    for video in (tmp_path / "data").glob("*/sequences/*/images/*.mp4"):
        write_video(video, np.zeros((2, 32, 32, 3), np.uint8), fps=30)
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump({"data": {"nersemble": str(tmp_path / "data")}, "methods": METHODS}))
    bench = Benchmark(load_benchmark_config(path), tmp_path / "run")
    subjects = bench.subjects()
    assert bench.data_fps("self", subjects) == bench.data_fps("cross", subjects) == 30.0
    driver = subjects[1]
    for video in (tmp_path / "data" / driver.id / "sequences" / driver.test_sequences[0] / "images").glob(
        "*.mp4"
    ):
        write_video(video, np.zeros((2, 32, 32, 3), np.uint8), fps=24)
    with pytest.raises(BenchmarkError, match=r"\[eval:self\] scored sequences at different frame rates"):
        bench.data_fps("self", subjects)


def test_novel_views_uses_the_nvs_benchmarks_split(tmp_path):
    """novel_views is scored on the official NVS hold-outs (nersemble-benchmark's constants) by avatars of their
    own, built from its train cameras: before, it reused the mono avatars (which saw 222200037, an NVS hold-out)
    and scored the mono hold-outs."""
    from nersemble_benchmark.constants import BENCHMARK_NVS_HOLD_OUT_SERIALS, BENCHMARK_NVS_TRAIN_SERIALS

    from geodiff4d.cluster.benchmark import Benchmark
    from geodiff4d.datasets.frame_folder import write_cameras

    _nersemble(tmp_path / "data", tracked_sequences={"EXP-1-head", "FREE"})
    path = tmp_path / "bench.yaml"
    oracle = {"name": "oracle", "kind": "oracle"}
    path.write_text(
        yaml.safe_dump({"data": {"nersemble": str(tmp_path / "data")}, "methods": [*METHODS, oracle]})
    )
    bench = Benchmark(load_benchmark_config(path), tmp_path / "run")
    subjects = bench.subjects()
    bench.ground_truth("novel_views", subjects)
    scored = bench.layout.gt("novel_views") / "rgb" / subjects[0].id / subjects[0].train_sequence
    assert sorted(p.name for p in scored.iterdir()) == sorted(BENCHMARK_NVS_HOLD_OUT_SERIALS)
    rig = nersemble_rig(width=32, height=32, focal=40.0)  # all 16 serials
    write_cameras(
        bench.layout.frames / "cameras" / subjects[0].id / f"{subjects[0].train_sequence}.json", rig
    )
    assert bench.training_views(subjects[0], "nvs") == sorted(BENCHMARK_NVS_TRAIN_SERIALS)
    graph = bench.graph(subjects)
    for method in bench.config.methods:
        if method.kind not in ("oracle", "geodiff4d"):
            continue
        nvs_avatar = f"avatar:{bench.avatar_folder(method, 'nvs').name}:{subjects[0].id}"
        assert bench.avatar_folder(method, "nvs") != bench.avatar_folder(method)
        render = graph.stages[f"render:{method.name}:{subjects[0].id}:nvs"]
        assert nvs_avatar in render.needs
        assert [p.parts[-4] for p in render.outputs] == ["novel_views"]


def test_reference_copy_of_novel_views_copies_the_nvs_input_camera(tmp_path):
    """The NVS hold-outs include the mono train camera, whose first frame is the mono reference image: copied
    into novel_views it would be a scored frame (refused: the demo failed so). The NVS split's reference is
    its input camera's first frame, the image GeoDiff4D gets there."""
    from geodiff4d.cluster.benchmark import Benchmark
    from geodiff4d.core.io.images import read_rgb8, write_png

    _nersemble(tmp_path / "data", tracked_sequences={"EXP-1-head", "FREE"})
    path = tmp_path / "bench.yaml"
    methods = [{"name": "copy", "kind": "reference_copy"}]
    data = {"nersemble": str(tmp_path / "data")}
    path.write_text(yaml.safe_dump({"data": data, "methods": methods, "protocols": ["self", "novel_views"]}))
    bench = Benchmark(load_benchmark_config(path), tmp_path / "run")
    subjects = bench.subjects()
    rng = np.random.default_rng(0)
    for subject in subjects:
        bench.export_subject(subject)
        for frame in (bench.layout.frames / "rgb" / subject.id).rglob(
            "*.png"
        ):  # the fixture's frames are alike
            write_png(frame, rng.integers(0, 256, read_rgb8(frame).shape, dtype=np.uint8))
        first = bench.layout.frames / "rgb" / subject.id / subject.train_sequence / bench.config.train_camera
        shutil.copyfile(sorted(first.glob("*.png"))[0], bench.layout.identity / f"{subject.id}.png")
    for protocol in bench.config.protocols:
        bench.ground_truth(protocol, subjects)
    bench.baseline(bench.config.methods[0], subjects)
    subject = subjects[0]
    source = bench.layout.frames / "rgb" / subject.id / subject.train_sequence / bench.config.nvs_train_camera
    copied = sorted((bench.layout.pred("novel_views", "copy") / "rgb" / subject.id).rglob("*.png"))
    assert copied and np.array_equal(read_rgb8(copied[0]), read_rgb8(sorted(source.glob("*.png"))[0]))
    mono = sorted((bench.layout.pred("self", "copy") / "rgb" / subject.id).rglob("*.png"))[0]
    assert np.array_equal(read_rgb8(mono), read_rgb8(bench.layout.identity / f"{subject.id}.png"))


def test_per_subject_stages_share_the_cluster_with_the_stages_beside_them(tmp_path, local_ray):
    """An avatar fit or VGM sampling asked for a whole node (2 CPUs here), so the graph's second stage waited for
    the first instead of running beside it."""
    from geodiff4d.cluster.benchmark import Benchmark

    bench = Benchmark(load_benchmark_config("benchmark-demo"), tmp_path)
    assert bench.stage_cpus(1) == 2  # alone (parallel 1): the whole node
    bench.parallel = 2
    assert bench.stage_cpus(1) == 1 and bench.stage_cpus(2) == 1 and bench.stage_cpus(1, None) == 1
