"""``geodiff4d pack`` on bad and changed inputs: one message naming the input, exit 1, no traceback, and nothing
left behind that refuses the corrected rerun."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from geodiff4d.cluster.cli import app
from geodiff4d.core.errors import UserError
from geodiff4d.datasets.flame import FlameParams
from geodiff4d.datasets.flame_tracking import TRACKING_V1, TRACKING_V2, write_nersemble_tracking
from geodiff4d.datasets.packing import SYNTHHUMAN_FACE_SAMPLES, list_synthhuman
from geodiff4d.datasets.procedural import SynthJob, SynthSpec
from geodiff4d.datasets.shards import iter_shard

SPEC = SynthSpec(subjects=1, sequences=2, frames=2, cameras=2, resolution=64, synthetic=2, seed=11)
SEQUENCE = "EXP-1-head"
runner = CliRunner()


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory) -> Path:
    """One procedural subject and two SynthHuman samples written without Ray (the units synth runs)."""
    out = tmp_path_factory.mktemp("inputs")
    job = SynthJob(out, SPEC)
    job.setup()
    job.write_subject(0)
    job.write_synthetic(0, SPEC.synthetic)
    return out


@pytest.fixture()
def data(synthesized, tmp_path) -> Path:
    shutil.copytree(synthesized, tmp_path / "data")
    return tmp_path / "data"


def _pack(out: Path, *args: str):
    return runner.invoke(
        app, ["pack", "--out", str(out), *args, "--workers", "1", "--samples-per-shard", "4"]
    )


def _sequence(data: Path, name: str = SEQUENCE) -> Path:
    return data / "nersemble" / "001" / "sequences" / name


def _assert_refused(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.mark.parametrize("value", ["-64", "63", "0"])
def test_negative_zero_or_odd_resolution(data, tmp_path, value):
    out = tmp_path / "out"
    _assert_refused(
        _pack(out, "--source", f"synthhuman:{data / 'synthhuman'}", "--resolution", value),
        "--resolution must be a positive even number",
    )
    assert not (out / "pack_settings.json").exists()


@pytest.mark.parametrize(
    ("option", "value"), [("--workers", "0"), ("--samples-per-shard", "-1"), ("--max-shard-mb", "0")]
)
def test_other_numbers_are_validated(data, tmp_path, option, value):
    result = runner.invoke(
        app,
        [
            "pack",
            "--out",
            str(tmp_path / "out"),
            "--source",
            f"synthhuman:{data / 'synthhuman'}",
            option,
            value,
        ],
    )
    _assert_refused(result, option)


def test_missing_tracking_names_both_files_and_a_fixed_rerun_is_not_refused(data, tmp_path, monkeypatch):
    tracking = _sequence(data, "EMO-1-shout+laugh") / "tracking" / TRACKING_V2
    kept = tracking.read_bytes()
    tracking.unlink()
    out = tmp_path / "out"
    _assert_refused(
        _pack(out, "--source", f"nersemble:{data / 'nersemble'}", "--resolution", "32"),
        str(tracking),
        str(tracking.with_name(TRACKING_V1)),
    )
    assert not (out / "pack_settings.json").exists()
    tracking.with_name(TRACKING_V1).write_bytes(kept)  # the fallback version is enough
    monkeypatch.setattr("geodiff4d.datasets.packing.connect", _no_ray)
    _assert_refused(
        _pack(out, "--source", f"nersemble:{data / 'nersemble'}", "--resolution", "32"), "no Ray here"
    )
    assert json.loads((out / "pack_settings.json").read_text())["resolution"] == 32  # validated, then written


def _no_ray(address=None):
    raise UserError("no Ray here")


def test_real_sized_tracking_without_flame_says_what_to_pass(data, tmp_path):
    tracking = _sequence(data) / "tracking" / TRACKING_V2
    real = FlameParams.zeros(SPEC.frames, 300, 100)
    real.expression[:, 80] = 0.3  # coefficients the procedural head does not have
    write_nersemble_tracking(tracking, real)
    out = tmp_path / "out"
    _assert_refused(_pack(out, "--source", f"nersemble:{data / 'nersemble'}"), str(tracking), "--flame")
    assert not (out / "pack_settings.json").exists()


def test_missing_normal_estimator_or_flame_file(data, tmp_path):
    source = ["--source", f"synthhuman:{data / 'synthhuman'}"]
    _assert_refused(_pack(tmp_path / "a", *source, "--normal-estimator", str(tmp_path / "n.onnx")), "n.onnx")
    _assert_refused(_pack(tmp_path / "b", *source, "--flame", str(tmp_path / "flame.pkl")), "flame.pkl")


def test_synthhuman_face_subset_is_the_first_98040_indices(data):
    root = data / "synthhuman"
    for member in ("rgb", "alpha", "depth", "normal", "cam"):  # a body sample right after the face block
        suffix = {"rgb": ".png", "alpha": ".png", "depth": ".exr", "normal": ".exr", "cam": ".txt"}[member]
        shutil.copy(
            root / f"{member}_0000000{suffix}", root / f"{member}_{SYNTHHUMAN_FACE_SAMPLES:07d}{suffix}"
        )
    everything = [ref.subject for ref in list_synthhuman(root)]
    faces = [ref.subject for ref in list_synthhuman(root, "face")]
    assert everything == ["0000000", "0000001", f"{SYNTHHUMAN_FACE_SAMPLES:07d}"]
    assert faces == ["0000000", "0000001"]


def test_synthhuman_normals_in_another_convention_are_refused_at_pack_start(data, tmp_path):
    from geodiff4d.core.io.exr import read_exr, write_exr

    root = data / "synthhuman"
    for index in range(SPEC.synthetic):
        path = root / f"normal_{index:07d}.exr"
        write_exr(
            path, (read_exr(path)[..., :3] * np.array([1.0, 1.0, -1.0])).astype(np.float32)
        )  # z flipped
    out = tmp_path / "out"
    _assert_refused(_pack(out, "--source", f"synthhuman:{root}"), str(root), "normals in the wrong axes")
    assert not (out / "pack_settings.json").exists()


def _add_synthhuman_sample(root: Path, index: int) -> None:
    for path in sorted(root.glob("*_0000000.*")):
        shutil.copy(path, root / path.name.replace("0000000", f"{index:07d}"))


def test_a_changed_listing_is_refused_on_rerun(local_ray, data, tmp_path):
    root, out = data / "synthhuman", tmp_path / "out"
    first = _pack(out, "--source", f"synthhuman:{root}", "--resolution", "32")
    assert first.exit_code == 0, first.output
    _add_synthhuman_sample(root, 5)
    _assert_refused(
        _pack(out, "--source", f"synthhuman:{root}", "--resolution", "32"),
        str(out / "pack_settings.json"),
        "input listing changed",
    )
    (root / "rgb_0000005.png").unlink()  # back to the packed listing: the rerun resumes (nothing to do)
    for path in root.glob("*_0000005.*"):
        path.unlink()
    again = _pack(out, "--source", f"synthhuman:{root}", "--resolution", "32")
    assert again.exit_code == 0 and "0 done, 1 already committed" in again.output, again.output


def test_a_missing_video_fails_its_units_naming_the_file_then_a_fixed_rerun_completes(
    local_ray, data, tmp_path
):
    video = _sequence(data, "EMO-1-shout+laugh") / "images" / "cam_222200037.mp4"
    kept = video.read_bytes()
    video.unlink()
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "pack",
            "--out",
            str(out),
            "--source",
            f"nersemble:{data / 'nersemble'}",
            "--resolution",
            "32",
            "--workers",
            "1",
            "--samples-per-shard",
            "4",
        ],
    )
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"{video}: video not found" in result.output and "FAILED nersemble-000000" in result.output
    video.write_bytes(kept)
    fixed = _pack(out, "--source", f"nersemble:{data / 'nersemble'}", "--resolution", "32")
    assert fixed.exit_code == 0 and "1 done, 1 already committed, 0 failed" in fixed.output, fixed.output
    metas = [json.loads(sample["json"]) for sample in iter_shard(out / "nersemble-000000.tar")]
    assert len(metas) == 4 and {meta["tracking"] for meta in metas} == {"v2"}  # which tracking file was used


def _untracked_last_frame(data: Path) -> str:
    tracking = _sequence(data) / "tracking" / TRACKING_V2
    write_nersemble_tracking(
        tracking, FlameParams.zeros(SPEC.frames - 1, 20, 10)
    )  # no row for the last frame
    return f"1 of {SPEC.frames} video frames have no row in {tracking}"


def _uncaptured_camera(data: Path) -> str:
    path = data / "nersemble" / "001" / "calibration" / "camera_params.json"
    params = json.loads(path.read_text())
    first = next(iter(params["world_2_cam"]))
    params["world_2_cam"]["222200049"] = params["world_2_cam"][first]
    params["intrinsics"]["222200049"] = params["intrinsics"][first]
    path.write_text(json.dumps(params))
    return "camera 222200049: calibrated in"


def _sequence_without_images(data: Path) -> str:
    folder = _sequence(data, "EXP-2-eyes")
    shutil.copytree(_sequence(data) / "tracking", folder / "tracking")
    return f"{folder}: no images/ folder"


def _mistyped_participant(data: Path) -> str:
    shutil.copytree(data / "nersemble" / "001", data / "nersemble" / "17")
    return f"{data / 'nersemble' / '17'}: folder name is not a 3-digit participant id"


SKIP_CASES = {
    "untracked_frames": _untracked_last_frame,
    "camera": _uncaptured_camera,
    "sequence": _sequence_without_images,
    "participant": _mistyped_participant,
}


@pytest.mark.parametrize("kind", sorted(SKIP_CASES))
def test_every_skip_is_reported_and_strict_refuses_it(data, tmp_path, monkeypatch, kind):
    """A skipped participant folder, sequence folder, camera or untracked frame is listed in pack_report.json
    (never dropped silently), and ``--strict`` refuses it before anything is written."""
    expected = SKIP_CASES[kind](data)
    source = ["--source", f"nersemble:{data / 'nersemble'}", "--resolution", "32"]
    strict = tmp_path / "strict"
    _assert_refused(_pack(strict, *source, "--strict"), "--strict", kind, expected)
    assert not (strict / "pack_settings.json").exists()
    monkeypatch.setattr("geodiff4d.datasets.packing.connect", _no_ray)  # the report is written before Ray
    out = tmp_path / "out"
    _assert_refused(_pack(out, *source), "no Ray here")
    skipped = json.loads((out / "pack_report.json").read_text())["skipped"]
    assert [skip["kind"] for skip in skipped] == [kind], skipped
    assert expected in f"{skipped[0]['path']}: {skipped[0]['reason']}"


def test_a_clean_source_has_an_empty_report(data, tmp_path, monkeypatch):
    monkeypatch.setattr("geodiff4d.datasets.packing.connect", _no_ray)
    _assert_refused(
        _pack(tmp_path / "out", "--source", f"nersemble:{data / 'nersemble'}", "--strict"), "no Ray"
    )
    assert json.loads((tmp_path / "out" / "pack_report.json").read_text()) == {"skipped": []}


def test_the_summary_lists_the_skips(local_ray, data, tmp_path):
    expected = _untracked_last_frame(data)
    out = tmp_path / "out"
    result = _pack(out, "--source", f"nersemble:{data / 'nersemble'}", "--resolution", "32")
    assert result.exit_code == 0, result.output
    assert f"skipped 1 input(s) (all in {out / 'pack_report.json'})" in result.output
    assert expected in result.output


@pytest.mark.parametrize("folder", ["empty", "mistyped"])
def test_a_source_without_samples_is_refused_naming_it(data, tmp_path, folder):
    """An empty folder, or the folder above the release, used to pack 0 samples and exit 0."""
    root = tmp_path / "empty" if folder == "empty" else data
    root.mkdir(exist_ok=True)
    out = tmp_path / "out"
    _assert_refused(_pack(out, "--source", f"nersemble:{root}"), f"nersemble:{root}", "no sample to pack")
    assert not (out / "pack_settings.json").exists()


@pytest.mark.parametrize("name", ["generic_model.pkl", "flame2020.pkl", "flame2023.pkl"])
def test_a_flame_model_of_another_version_than_the_tracking_is_refused(data, tmp_path, monkeypatch, name):
    """NeRSemble's tracking is fitted with FLAME 2023; FLAME 2020 (generic_model.pkl) has the same topology and
    sizes, so it would load and pose every frame subtly wrong."""
    from geodiff4d.datasets.procedural_head import build_procedural_head, save_flame_pickle

    model = tmp_path / name
    save_flame_pickle(build_procedural_head(0), model)
    monkeypatch.setattr("geodiff4d.datasets.packing.connect", _no_ray)
    result = _pack(tmp_path / "out", "--source", f"nersemble:{data / 'nersemble'}", "--flame", str(model))
    if "2023" in name:
        _assert_refused(result, "no Ray here")
    else:
        _assert_refused(result, f"--flame {model}: named like FLAME 2020", "fitted with FLAME 2023")


def _retouch(data: Path) -> Path:
    tracking = _sequence(data) / "tracking" / TRACKING_V2
    stat = tracking.stat()
    os.utime(tracking, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a re-download: same bytes, new file
    return data / "nersemble"


def _other_root(data: Path) -> Path:
    shutil.copytree(data / "nersemble", data / "copy", copy_function=shutil.copy2)  # same keys, same mtimes
    return data / "copy"


def _colour_calibration(data: Path) -> Path:
    calibration = data / "nersemble" / "001" / "calibration"
    serials = json.loads((calibration / "camera_params.json").read_text())["world_2_cam"]
    (calibration / "color_calibration.json").write_text(json.dumps({s: np.eye(3).tolist() for s in serials}))
    return data / "nersemble"


def _v1_tracking(data: Path) -> Path:
    tracking = _sequence(data) / "tracking" / TRACKING_V2
    tracking.rename(tracking.with_name(TRACKING_V1))
    return data / "nersemble"


@pytest.mark.parametrize("change", [_retouch, _other_root, _colour_calibration, _v1_tracking])
def test_changed_inputs_of_committed_shards_are_refused_on_rerun(local_ray, data, tmp_path, change):
    """The rerun check saw only sample keys: a re-downloaded file, another root with the same keys, a new colour
    calibration or a switch to v1 tracking resumed into the old folder and mixed old and new samples."""
    out = tmp_path / "out"
    first = _pack(out, "--source", f"nersemble:{data / 'nersemble'}", "--resolution", "32")
    assert first.exit_code == 0, first.output
    again = _pack(out, "--source", f"nersemble:{data / 'nersemble'}", "--resolution", "32")
    assert again.exit_code == 0 and "0 done, 2 already committed" in again.output, again.output
    root = change(data)
    _assert_refused(
        _pack(out, "--source", f"nersemble:{root}", "--resolution", "32"),
        f"{out}: the input files of",
        "nersemble-000001",
        "pack into a new output folder",
    )


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("s3://bucket/shards", "s3fs"),
        ("https://host/shards", "read-only"),
        ("pipe:cat > shards.tar", "{name}"),
    ],
)
def test_a_pack_output_that_cannot_be_written_is_refused_before_any_work(
    data, tmp_path, monkeypatch, out, message
):
    """s3:// without s3fs, http(s) (no upload) and a pipe: command without {name}: one message naming the
    location, nothing written (Typer's Path used to fold s3://bucket into a local folder s3:/bucket)."""
    monkeypatch.chdir(tmp_path)
    _assert_refused(_pack(out, "--source", f"synthhuman:{data / 'synthhuman'}"), out, message)
    assert list(tmp_path.iterdir()) == [tmp_path / "data"]
