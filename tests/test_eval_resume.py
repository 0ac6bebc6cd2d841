"""Resume that cannot go stale: fingerprints see through directory symlinks, stale units leave the board, unit ids
never collide, a method with no frames is listed as not covered."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import skimage.data

from geodiff4d.core.jobs import CommitLog
from geodiff4d.eval.inputs import FolderSource, InputError, tree_fingerprint
from geodiff4d.eval.leaderboard import build_leaderboard
from geodiff4d.eval.run import SCORING_RULES, changed_inputs, evaluate, plan_units


def _write_frames(folder: Path, frames: list[np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for t, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"{t:05d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))


def _face(shift: int = 0) -> np.ndarray:
    face = cv2.resize(skimage.data.astronaut()[:320, 80:400], (32, 32), interpolation=cv2.INTER_AREA)
    return np.roll(face, shift, axis=1)


def _gt_behind_symlink(root: Path) -> Path:
    """``gt/s01/EXP-1/cam_a`` is a symlink to ``store/cam_a``, as the benchmark links its camera folders."""
    _write_frames(root / "store" / "cam_a", [_face(0), _face(1)])
    (root / "gt" / "s01" / "EXP-1").mkdir(parents=True)
    os.symlink(root / "store" / "cam_a", root / "gt" / "s01" / "EXP-1" / "cam_a", target_is_directory=True)
    return root / "gt"


def _rewrite_behind_the_link(root: Path) -> None:
    """Other ground truth under the same names, one second newer (so the change is not lost in mtime granularity)."""
    _write_frames(root / "store" / "cam_a", [_face(5), _face(6)])
    for file in (root / "store" / "cam_a").iterdir():
        stat = file.stat()
        os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_fingerprint_sees_files_behind_directory_symlinks(tmp_path):
    gt = _gt_behind_symlink(tmp_path)
    before = tree_fingerprint(gt)
    (tmp_path / "bare" / "s01" / "EXP-1" / "cam_a").mkdir(parents=True)
    assert before != tree_fingerprint(tmp_path / "bare")  # the frames behind the link count
    _rewrite_behind_the_link(tmp_path)
    assert tree_fingerprint(gt) != before


def test_rerun_after_ground_truth_changed_behind_a_symlink_is_refused(tmp_path, local_ray):
    gt = _gt_behind_symlink(tmp_path)
    _write_frames(tmp_path / "pred" / "avatar" / "s01" / "EXP-1" / "cam_a", [_face(1), _face(2)])
    out = tmp_path / "run"
    first = evaluate(tmp_path / "pred", gt, "self", out, metrics=["psnr"], progress=False)
    assert first.completed == ["avatar--s01--EXP-1"]
    _rewrite_behind_the_link(tmp_path)
    with pytest.raises(InputError, match="written with other settings (.|\n)*ground_truth: "):
        evaluate(tmp_path / "pred", gt, "self", out, metrics=["psnr"], progress=False)


def test_stale_units_leave_the_board_and_a_method_without_frames_is_listed(tmp_path, local_ray):
    _write_frames(tmp_path / "gt" / "s01" / "EXP-1" / "cam_a", [_face(0), _face(1)])
    for method, shift in (("kept", 1), ("removed", 2)):
        _write_frames(tmp_path / method / "s01" / "EXP-1" / "cam_a", [_face(shift), _face(shift + 1)])
    out, common = tmp_path / "run", {"metrics": ["psnr"], "progress": False}
    evaluate(
        {"kept": tmp_path / "kept", "removed": tmp_path / "removed"}, tmp_path / "gt", "self", out, **common
    )
    again = evaluate(
        {"kept": tmp_path / "kept"}, tmp_path / "gt", "self", out, not_covered=("empty",), **common
    )
    assert again.skipped == ["kept--s01--EXP-1"]

    written = build_leaderboard(out)
    table = pd.read_csv(written["self_csv"]).set_index("method")
    assert sorted(table.index) == ["empty", "kept"]
    assert table.loc["empty", "coverage"] == "0/1" and np.isnan(table.loc["empty", "psnr"])
    md = written["markdown"].read_text()
    assert (
        "dropped from the board: 1 units scored earlier are no longer among the inputs (removed--s01--EXP-1)"
        in md
    )
    assert "empty produced no frames: not covered, no scores" in md and "| empty | 0/1 | 0 | n/a |" in md


def test_names_that_collide_as_unit_ids_are_refused(tmp_path):
    _write_frames(tmp_path / "gt" / "s01" / "EXP-1" / "cam_a", [_face()])
    for name in ("a b", "a_b"):
        _write_frames(tmp_path / name / "s01" / "EXP-1" / "cam_a", [_face()])
    methods = {name: tmp_path / name for name in ("a b", "a_b")}
    with pytest.raises(
        InputError, match="a b: s01/EXP-1 and a_b: s01/EXP-1 both become unit 'a_b--s01--EXP-1'"
    ):
        plan_units(methods, FolderSource("gt", tmp_path / "gt"), "self")


def test_lpips_weights_found_or_not_refuses_a_rerun(tmp_path):
    committed = CommitLog(tmp_path / "commits")
    committed.commit("m--s--q", {"frames": 1})
    inputs = {
        "ground_truth": "x",
        "gt_mask": None,
        "identity": None,
        "fps": 25.0,
        "gt_normal": None,
        "units": {},
    }
    meta = {"rules": SCORING_RULES, "settings": {}, "inputs": inputs}
    looked = {"looked_in": ["a.ckpt"]}
    without = {**meta, "lpips": {"available": False, "backbone": None, **looked}}
    found = {**meta, "lpips": {"available": True, "backbone": "a.ckpt", **looked}}
    assert changed_inputs(without, found, committed) == ["LPIPS weights: (False, None) -> (True, 'a.ckpt')"]
    assert changed_inputs(found, found, committed) == []
    older_rules = changed_inputs({**found, "rules": SCORING_RULES - 1}, found, committed)
    assert older_rules == [f"scoring rules: {SCORING_RULES - 1} -> {SCORING_RULES}"]
