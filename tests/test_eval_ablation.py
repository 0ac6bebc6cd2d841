"""The ablation table: paired differences over subjects, the paper's directions, verdicts, written reports."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import permutation_test

from geodiff4d.eval.ablation import (
    ablation_table,
    paper_direction,
    row_verdict,
    sign_flip_p,
    verdict,
    write_ablation_report,
)
from geodiff4d.eval.leaderboard import bootstrap_ci


def _run(folder, offsets: dict[str, float], subjects: int = 6):
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
    assert verdict(0.03, -1.0, "worse", "psnr") == "reproduced"
    assert verdict(0.03, 1.0, "worse (claimed)", "normal_deg") == "reproduced"  # higher error is worse
    assert verdict(0.03, 1.0, "worse", "psnr") == "contradicted"
    assert verdict(0.05, -1.0, "worse", "psnr") == "not separated"  # the rule is p < 0.05, strictly
    assert verdict(float("nan"), -1.0, "worse", "psnr") == "not separated"
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
    assert table.loc[("worse", "psnr"), "n"] == 6 and table.loc[("worse", "psnr"), "p"] == pytest.approx(
        2 / 64
    )
    md = written["markdown"].read_text()
    assert "| n | p |" in md and "p < 0.05" in md
    assert "VGM w/o Cross-view Pairing" in md and "| worse | VGM w/o Cross-view Pairing | reproduced |" in md
    assert '<img src="data:image/png;base64,' in written["html"].read_text()


def _scipy_p(differences: np.ndarray, n_resamples: float = np.inf) -> float:
    """The oracle: scipy's paired permutation test of the mean difference (exact, all 2^n sign flips, unless
    ``n_resamples`` is finite)."""
    zeros = np.zeros_like(differences)
    result = permutation_test(
        (differences, zeros),
        lambda x, y, axis: np.mean(x - y, axis=axis),
        permutation_type="samples",
        alternative="two-sided",
        n_resamples=n_resamples,
        rng=np.random.default_rng(0),
        vectorized=True,
    )
    return float(result.pvalue)


@pytest.mark.parametrize(
    "differences",
    [[0.3, -0.1, 0.7, 0.2], [1.0, 2.0, 3.0], [-0.5, 0.4, 0.1, -0.2, 0.9, 0.05, 1.3], [0.0, 0.0]],
)
def test_sign_flip_p_is_scipys_exact_permutation_test(differences):
    differences = np.array(differences)
    assert sign_flip_p(differences) == pytest.approx(_scipy_p(differences))


def test_sign_flip_p_hand_enumerated_and_sampled_above_twenty():
    # [1, 2, 3]: of the 8 sign assignments only +++ and --- reach |sum| 6
    assert sign_flip_p(np.array([1.0, 2.0, 3.0])) == pytest.approx(2 / 8)
    assert sign_flip_p(np.array([1.0, np.nan, 2.0, 3.0])) == pytest.approx(2 / 8)  # NaN subjects drop out
    assert np.isnan(sign_flip_p(np.array([np.nan])))
    # 24 agreeing subjects: exact p is 2/2^24; the sampled p is its floor 1/(draws + 1), never zero
    assert 0 < sign_flip_p(np.ones(24)) < 1e-4
    mixed = np.random.default_rng(1).normal(0, 1, 24)
    assert sign_flip_p(mixed, seed=3) == pytest.approx(_scipy_p(mixed, 100_000), abs=0.01)


@pytest.mark.parametrize("subjects, expected", [(3, "not separated"), (6, "reproduced")])
def test_all_agreeing_subjects_separate_only_from_six(tmp_path, subjects, expected):
    run = _run(tmp_path / "self", {"full": 0.0, "worse": -1.0}, subjects=subjects)
    table = ablation_table({"self": run}, "full", {"worse": "cross_view_pairs"}).set_index("metric")
    assert table.loc["psnr", "n"] == subjects
    assert table.loc["psnr", "p"] == pytest.approx(2 / 2**subjects)  # every subject agrees: the extreme
    assert table.loc["psnr", "lo"] < table.loc["psnr", "hi"] < 0  # the interval excludes zero either way
    assert table.loc["psnr", "verdict"] == expected


def test_face_metrics_compare_the_frames_scored_for_both(tmp_path):
    """The variant has no score (NaN) where the full method scored worst; elsewhere the two are equal."""
    rows = []
    for s in range(6):
        for frame in range(4):
            for method in ("full", "variant"):
                missing = method == "variant" and frame >= 2
                akd = 9.0 if (method == "full" and frame >= 2) else 2.0 + s
                rows.append(
                    {
                        "method": method,
                        "subject": f"s{s}",
                        "sequence": "EXP",
                        "camera": "c",
                        "frame": frame,
                        "akd": np.nan if missing else akd,
                    }
                )
    folder = tmp_path / "self"
    (folder / "frames").mkdir(parents=True)
    (folder / "videos").mkdir()
    pd.DataFrame(rows).to_parquet(folder / "frames" / "all.parquet")
    pd.DataFrame(
        [{"method": m, "subject": "s0", "sequence": "EXP", "camera": "c"} for m in ("full", "variant")]
    ).to_parquet(folder / "videos" / "all.parquet")
    (folder / "run.json").write_text(json.dumps({"settings": {"metrics": ["akd"]}}))
    line = ablation_table({"self": folder}, "full", {"variant": "normal_loss"}).iloc[0]
    assert line["difference"] == pytest.approx(0.0)  # not -3.5: frames 2-3 are out for both
    assert line["full_mean"] == pytest.approx(line["variant_mean"])
    assert line["verdict"] == "not separated"


def test_seed_replicates_are_tested_like_rows_without_a_paper_side(tmp_path):
    """A seed replicate goes through the same paired test; with no paper side it separates or not, and the
    summary and note say it is seed variance."""
    run = _run(tmp_path / "self", {"full": 0.0, "worse": -1.0, "seed1": 0.0, "seed2": 0.5})
    written = write_ablation_report(
        {"self": run}, tmp_path / "out", "full", {"worse": "cross_view_pairs"}, 0, ("seed1", "seed2")
    )
    table = pd.read_parquet(written["parquet"]).set_index(["variant", "metric"])
    assert table.loc[("seed1", "psnr"), "verdict"] == "not separated"
    assert table.loc[("seed2", "psnr"), "verdict"] == "separated"  # 6 subjects agree: the rule is too loose
    assert table.loc[("seed2", "psnr"), "paper"] == "none"
    assert table.loc[("worse", "psnr"), "verdict"] == "reproduced"
    md = written["markdown"].read_text()
    assert "| seed2 | seed replicate of the full method | separated |" in md
    assert "seed1, seed2 repeat full with another training seed" in md
