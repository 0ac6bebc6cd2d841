"""End to end: a Ray run over two degraded methods, per-frame Parquet, resume, leaderboard, input errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import skimage.data

from geodiff4d.eval.inputs import Clip, FolderSource, InputError, check_clips, match_cameras
from geodiff4d.eval.leaderboard import build_leaderboard
from geodiff4d.eval.run import evaluate, plan_units

N_FRAMES = 3


def _write_tree(root: Path, frames: list[np.ndarray], cameras=("cam_a",)) -> None:
    for cam in cameras:
        folder = root / "s01" / "EXP-1" / cam
        folder.mkdir(parents=True, exist_ok=True)
        for t, f in enumerate(frames):
            cv2.imwrite(str(folder / f"{t:05d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))


def _degrade(frame: np.ndarray, sigma_blur: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    out = cv2.GaussianBlur(frame, (0, 0), sigma_blur) if sigma_blur else frame
    return np.clip(out + rng.normal(0, noise * 255, out.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    face = cv2.resize(skimage.data.astronaut()[:320, 80:400], (160, 160), interpolation=cv2.INTER_AREA)
    gt = [np.roll(face, 2 * t, axis=1) for t in range(N_FRAMES)]  # a panning clip
    rng = np.random.default_rng(0)
    _write_tree(root / "gt", gt)
    _write_tree(root / "pred" / "mild", [_degrade(f, 0, 0.02, rng) for f in gt])
    _write_tree(root / "pred" / "strong", [_degrade(f, 2.5, 0.08, rng) for f in gt])
    return root


def test_run_resume_and_leaderboard(trees, local_ray):
    out = trees / "run"
    report = evaluate(trees / "pred", trees / "gt", "self", out, workers=1, progress=False)
    assert sorted(report.completed) == ["mild--s01--EXP-1", "strong--s01--EXP-1"]
    frames = pd.read_parquet(out / "frames" / "mild--s01--EXP-1.parquet")
    assert len(frames) == N_FRAMES and set(frames["camera"]) == {"cam_a"}
    assert frames[["psnr", "ssim", "lpips", "csim", "akd", "aed"]].notna().all().all()
    again = evaluate(trees / "pred", trees / "gt", "self", out, workers=1, progress=False)
    assert again.completed == [] and len(again.skipped) == 2

    written = build_leaderboard(out)
    table = pd.read_parquet(written["self_parquet"]).set_index("method")
    for metric in ("psnr", "ssim", "lpips", "csim", "akd", "aed", "jod"):
        assert table.loc["mild", f"{metric}_rank"] == 1, metric
    assert table.loc["mild", "csim_miss_rate"] == 0
    md = written["markdown"].read_text()
    assert "not comparable with papers' ArcFace/FAN/3DMM" in md and "standard_4k" in md
    assert "backend facenet" in md and "no mask" in md and "native resolution" in md
    html = written["html"].read_text()
    assert html.count("data:image/png;base64,") >= 7 and "not comparable" in html
    assert r"\textbf{" in written["latex"].read_text()
    assert written["self_csv"].is_file()


def test_input_errors_name_the_problem(trees):
    clip = Clip(np.zeros((3, 16, 16, 3), np.uint8), None, 25, "pred/x")
    with pytest.raises(InputError, match="frame count 2 in pred/x != 3 in gt/x"):
        check_clips(
            "m", "s/q/c", Clip(clip.frames[:2], None, 25, "pred/x"), Clip(clip.frames, None, 25, "gt/x")
        )
    with pytest.raises(InputError, match=r"frame size \(8, 8\)"):
        check_clips("m", "s/q/c", Clip(clip.frames[:, :8, :8], None, 25, "p"), clip)
    with pytest.raises(InputError, match=r"m: s01/EXP-1: missing cameras \['cam_b'\]"):
        match_cameras("m", ["cam_a"], ["cam_a", "cam_b"], "s01/EXP-1")
    other = trees / "other_pred" / "ghost" / "s99" / "EXP-1" / "cam_a"
    other.mkdir(parents=True)
    with pytest.raises(InputError, match="ghost: s99/EXP-1 has no ground truth"):
        plan_units({"ghost": trees / "other_pred" / "ghost"}, FolderSource("gt", trees / "gt"), "self")


def test_resume_refuses_changed_inputs_and_composites(tmp_path, local_ray):
    """Any changed input of a committed unit (ground truth, masks, fps, its predictions) refuses the rerun; a new
    method joins the run; with a background, a method rendering no backdrop is judged on the head alone."""
    face = cv2.resize(skimage.data.astronaut()[:320, 80:400], (64, 64), interpolation=cv2.INTER_AREA)
    alpha = np.zeros((64, 64), np.uint8)
    alpha[8:56, 12:52] = 255
    studio = np.where(alpha[..., None] > 0, face, np.uint8(90))  # the head in front of a grey studio wall
    black = np.where(alpha[..., None] > 0, face, np.uint8(0))  # the same head rendered without a backdrop
    _write_tree(tmp_path / "gt", [studio] * 2)
    _write_tree(tmp_path / "mask", [np.repeat(alpha[..., None], 3, axis=-1)] * 2)
    _write_tree(tmp_path / "pred" / "avatar", [black] * 2)
    common = {"metrics": ["psnr"], "gt_mask": tmp_path / "mask", "progress": False}
    out = tmp_path / "run"
    evaluate(tmp_path / "pred", tmp_path / "gt", "self", out, background=0.5, **common)
    assert (
        pd.read_parquet(out / "frames" / "avatar--s01--EXP-1.parquet")["psnr"] == 100.0
    ).all()  # identical
    plain = evaluate(tmp_path / "pred", tmp_path / "gt", "self", tmp_path / "plain", **common)
    assert (
        plain.completed
        and (pd.read_parquet(tmp_path / "plain" / "frames" / "avatar--s01--EXP-1.parquet")["psnr"] < 20).all()
    )  # the black backdrop against the studio's

    with pytest.raises(InputError, match="fps: 25.0 -> 30.0"):
        evaluate(tmp_path / "pred", tmp_path / "gt", "self", out, background=0.5, fps=30.0, **common)
    with pytest.raises(InputError, match=r"settings\.background: 0\.5 -> 0\.25"):
        evaluate(tmp_path / "pred", tmp_path / "gt", "self", out, background=0.25, **common)
    _write_tree(tmp_path / "pred" / "other", [studio] * 2)  # a new method: scored, nothing else redone
    again = evaluate(tmp_path / "pred", tmp_path / "gt", "self", out, background=0.5, **common)
    assert again.completed == ["other--s01--EXP-1"] and again.skipped == ["avatar--s01--EXP-1"]
    _write_tree(tmp_path / "pred" / "avatar", [studio] * 2)  # a committed unit's frames rewritten
    with pytest.raises(
        InputError,
        match=r"run\.json was written with other settings.*\n  predictions of avatar--s01--EXP-1: \w+ -> \w+$",
    ):
        evaluate(tmp_path / "pred", tmp_path / "gt", "self", out, background=0.5, **common)
    _write_tree(tmp_path / "mask", [np.repeat(alpha[..., None], 3, axis=-1)] * 2)  # same masks, rewritten
    with pytest.raises(InputError, match=r"\n  gt_mask: \w+ -> \w+\n  predictions of avatar--s01--EXP-1: "):
        evaluate(tmp_path / "pred", tmp_path / "gt", "self", out, background=0.5, **common)
    with pytest.raises(InputError, match="needs ground-truth masks: give --gt-mask"):
        evaluate(
            tmp_path / "pred", tmp_path / "gt", "self", tmp_path / "nomask", metrics=["psnr"], background=0.5
        )
