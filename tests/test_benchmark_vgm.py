"""The ``vgm`` method kind: the diffusion model's own frames, placed back into the hold-out cameras' images and
scored beside the avatar built from them; it shares the geodiff4d method's model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from geodiff4d.cluster.benchmark import Benchmark
from geodiff4d.cluster.benchmark_config import DEFAULT_METRICS, load_benchmark_config
from geodiff4d.cluster.vgm import crop_window, uncrop
from geodiff4d.datasets.cameras import Camera, intrinsics
from geodiff4d.datasets.packing import crop

CHECKPOINT = Path(__file__).resolve().parents[1] / "configs" / "checkpoints" / "demo-32px"


def _full_camera(width: int = 128, height: int = 96) -> Camera:
    return Camera(np.eye(4), intrinsics(150.0, width, height), width, height)


@pytest.mark.parametrize("box", [(20, 10, 64), (-8, 40, 96), (50, 5, 32)])
def test_the_crop_window_is_recovered_from_generation_s_cameras(box):
    """Generation's cameras are the full camera cropped to the head box and resized to the model's size."""
    full = _full_camera()
    x, y, side = box
    cropped = full.cropped(x, y, side, side).resized(32, 32)
    assert crop_window(full, cropped) == pytest.approx(box)


def test_uncrop_inverts_packing_s_crop_and_fills_outside():
    """packing.crop (the crop generation's samples look like) undone: the pixels inside the window come back,
    everything outside is the fill grey."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    box = (20, 10, 64)
    same_size = uncrop(crop(image, box, 64), box, 128, 96, fill=128)  # no resampling: exact
    np.testing.assert_array_equal(same_size[10:74, 20:84], image[10:74, 20:84])
    outside = np.ones((96, 128), bool)
    outside[10:74, 20:84] = False
    assert (same_size[outside] == 128).all()
    yy, xx = np.mgrid[0:96, 0:128]
    ramp = np.dstack([xx, yy, xx + yy]).astype(np.uint8)  # linear: bilinear resampling keeps it
    back = uncrop(crop(ramp, box, 32), box, 128, 96, fill=128).astype(int)
    assert np.abs(back[14:70, 24:80] - ramp[14:70, 24:80].astype(int)).max() <= 1


def _config(tmp_path: Path, methods: list[dict], protocols: list[str]) -> Path:
    path = tmp_path / "bench.yaml"
    config = {
        "data": {
            "procedural": {"subjects": 2, "sequences": 2, "frames": 4, "resolution": 64, "synthetic": 0}
        },
        "protocols": protocols,
        "generation": {"run": str(CHECKPOINT)},
        "methods": methods,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_vgm_shares_the_geodiff4d_model_and_is_not_covered_where_the_paper_has_no_vgm(tmp_path):
    config = load_benchmark_config(
        _config(
            tmp_path,
            [
                {"name": "avatar", "kind": "geodiff4d"},
                {"name": "vgm", "kind": "vgm"},
                {"name": "vgm-other", "kind": "vgm", "overrides": {"generation.model_overrides": {"x": 1}}},
            ],
            ["self", "cross", "novel_views"],
        )
    )
    bench = Benchmark(config, tmp_path / "run")
    avatar, vgm, other = config.methods
    assert bench.model_key(vgm) == bench.model_key(avatar) != bench.model_key(other)
    assert bench.model_run(vgm) == bench.model_run(avatar)
    assert bench.vgm_protocols() == ["self", "cross"]
    assert (
        config.eval.metrics_of("self")
        == ["psnr", "ssim", "lpips", "csim", "jod"]
        == list(DEFAULT_METRICS["self"])
    )
    assert config.eval.metrics_of("cross") == ["csim", "jod"]


@pytest.mark.slow  # synthesis, packing and 48 sampled view-frames: about 2 min on 2 idle cores
@pytest.mark.timeout(1800)  # on a loaded machine sampling alone took 11 min
def test_a_toy_benchmark_scores_the_vgm_row_beside_the_avatar_s_peers(tmp_path, monkeypatch):
    """End to end at toy size: the vgm method's frames are generated for self and cross at the hold-out
    cameras' full size, by one generate per avatar (not per unit: each loads the model), scored on the board,
    and listed as not covered (with the reason) in novel_views."""
    import geodiff4d.gen.generate as generate_module

    specs, generate = [], generate_module.generate

    def counted(spec, *args, **kwargs):
        specs.append(yaml.safe_load(Path(spec).read_text()))
        return generate(spec, *args, **kwargs)

    monkeypatch.setattr(generate_module, "generate", counted)
    config = load_benchmark_config(
        _config(
            tmp_path,
            [{"name": "vgm", "kind": "vgm"}, {"name": "reference_copy", "kind": "reference_copy"}],
            ["self", "cross", "novel_views"],
        )
    )
    config = config.model_copy(
        update={
            "eval": config.eval.model_copy(
                update={"metrics": {"self": ["psnr"], "cross": ["csim"], "novel_views": ["psnr"]}}
            )
        }
    )
    bench = Benchmark(config, tmp_path / "run", echo=lambda line: None)
    report = bench.run()
    assert report.ok, report
    for protocol in ("self", "cross"):
        # subject/sequence/camera folders (the ground truth's are links, which rglob does not follow)
        frames = list((tmp_path / "run" / "pred" / protocol / "vgm" / "rgb").glob("*/*/*/*.png"))
        truth = list((tmp_path / "run" / "gt" / protocol / "rgb").glob("*/*/*/*.png"))
        assert len(frames) == len(truth) == 2 * 3 * 4  # 2 subjects x 3 hold-out cameras x 4 frames
    board = (tmp_path / "run" / "leaderboard" / "leaderboard.md").read_text()
    assert "| vgm | 2/2 |" in board
    assert (
        "vgm has no frames here by design (the paper reports the video model's own frames, VGM, for self- and"
        in board
    )
    assert "| vgm | 0/2 | 0 |" in board  # novel_views: listed, not silently absent
    vgm_specs = [spec for spec in specs if any("_self_" in entry["name"] for entry in spec["subjects"])]
    assert len(vgm_specs) == 2  # one per avatar subject, each with its self and cross units
    assert all(len(spec["subjects"]) == 2 for spec in vgm_specs)
