"""The ablation table: paired differences over subjects, the paper's directions, verdicts, written reports."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from geodiff4d.eval.ablation import paper_direction, row_verdict, verdict, write_ablation_report
from geodiff4d.eval.leaderboard import bootstrap_ci


def _run(folder, offsets: dict[str, float], subjects: int = 5):
    """A self run of PSNR and normal_deg: each method = a per-subject base plus its offset (plus frame noise)."""
    rng = np.random.default_rng(0)
    rows = []
    for s in range(subjects):
        base = rng.normal(20, 2)  # subjects differ much more than the methods: only pairing separates them
        for method, offset in offsets.items():
            for frame in range(3):
                rows.append(
                    {
                        "method": method,
                        "subject": f"s{s}",
                        "sequence": "EXP",
                        "camera": "c",
                        "frame": frame,
                        "psnr": base + offset + rng.normal(0, 0.01),
                        "normal_deg": 30 - base - offset,
                    }
                )
    (folder / "frames").mkdir(parents=True)
    (folder / "videos").mkdir()
    pd.DataFrame(rows).to_parquet(folder / "frames" / "all.parquet")
    pd.DataFrame(
        [{"method": m, "subject": "s0", "sequence": "EXP", "camera": "c", "jod": np.nan} for m in offsets]
    ).to_parquet(folder / "videos" / "all.parquet")
    (folder / "run.json").write_text(json.dumps({"settings": {"metrics": ["psnr", "normal_deg"]}}))
    return folder


def test_paper_directions_and_verdicts():
    assert paper_direction("cross_view_pairs", "psnr") == "worse"  # 19.895 against 21.586
    assert (
        paper_direction("joint_normals", "csim") == "better"
    )  # 0.757 against 0.754: the paper's one exception
    assert paper_direction("normal_loss", "aed") == "worse"  # 2.713 against 2.563, lower is better
    assert paper_direction("normal_loss", "normal_deg") == "worse (claimed)"
    assert verdict(-2.0, -0.5, "worse", "psnr") == "reproduced"
    assert verdict(0.5, 2.0, "worse (claimed)", "normal_deg") == "reproduced"  # higher error is worse
    assert verdict(0.5, 2.0, "worse", "psnr") == "contradicted"
    assert verdict(-0.5, 2.0, "worse", "psnr") == "not separated"
    assert row_verdict(["reproduced", "not separated"]) == "reproduced"
    assert row_verdict(["reproduced", "contradicted"]) == "mixed"
    with pytest.raises(ValueError, match="paper's rows"):
        paper_direction("no_such_row", "psnr")


def test_table_pairs_subjects_and_writes_reports(tmp_path):
    run = _run(tmp_path / "self", {"full": 0.0, "worse": -1.0, "same": 0.0})
    written = write_ablation_report(
        {"self": run},
        tmp_path / "out",
        "full",
        {"worse": "cross_view_pairs", "same": "domain_attention"},
        seed=0,
    )
    table = pd.read_parquet(written["parquet"]).set_index(["variant", "metric"])
    assert table.loc[("worse", "psnr"), "difference"] == pytest.approx(-1.0, abs=0.02)
    assert (
        table.loc[("worse", "psnr"), "verdict"] == "reproduced"
    )  # the subjects' spread of 2 dB is paired away
    assert table.loc[("worse", "normal_deg"), "verdict"] == "reproduced"
    assert table.loc[("same", "psnr"), "verdict"] == "not separated"
    # the interval is the leaderboard's bootstrap of the per-subject differences, not a second implementation
    frames = pd.read_parquet(run / "frames" / "all.parquet")
    means = frames.groupby(["method", "subject"])["psnr"].mean()
    low, high = bootstrap_ci((means["worse"] - means["full"]).to_numpy(), seed=0)
    assert (table.loc[("worse", "psnr"), "lo"], table.loc[("worse", "psnr"), "hi"]) == pytest.approx(
        (low, high)
    )
    md = written["markdown"].read_text()
    assert "VGM w/o Cross-view Pairing" in md and "| worse | VGM w/o Cross-view Pairing | reproduced |" in md
    assert '<img src="data:image/png;base64,' in written["html"].read_text()
