"""The ablation table: each variant against the full method, as paired differences over subjects.

For every row (a variant) and every metric of every protocol: the full method's and the variant's
subject-balanced means (leaderboard.balanced_means, on the units both covered; face metrics on the frames
scored for both), the mean paired difference variant - full with a 95% bootstrap interval over subjects
(leaderboard.bootstrap_ci, the benchmark's seed), the number of subjects n and the two-sided p of an exact
sign-flip permutation test of the per-subject differences, the paper's direction for the row, ours, and a
verdict: *reproduced* when p < ALPHA and the difference goes the paper's way, *contradicted* when p < ALPHA
and it goes the other way, *not separated* otherwise. The smallest exact p is 2 / 2^n, so fewer than six
subjects can never separate. A row's verdict sums its metrics: reproduced (some metric reproduced, none
contradicted), contradicted (the reverse), mixed (both), not separated.

Seed replicates are the full method trained again with another seed: their rows go through the same test
against the full method, so the table shows how far training noise alone moves each metric (a replicate that
*separates* says the rule is too loose at this n for that metric).
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from geodiff4d.core.io.atomic import atomic_write_bytes
from geodiff4d.eval.leaderboard import N_BOOTSTRAP, balanced_means, bootstrap_ci, coverage, on_units
from geodiff4d.eval.report import arrow, figure_html
from geodiff4d.eval.run import load_run, write_parquet_atomic
from geodiff4d.eval.settings import ALL_METRICS, FACE_METRICS, HIGHER_IS_BETTER

# The paper's ablation table (NeRSemble v2 self-reenactment; upper: the video model, lower: reconstruction).
# A row's direction per metric is the sign of (row - its full model); metrics the paper did not report (SSIM,
# LPIPS, normal accuracy) carry its claim that the component helps ("worse without it", marked claimed).
PAPER_TABLE: dict[str, tuple[str, dict[str, float]]] = {
    "joint_normals": (
        "VGM w/o Joint Repr.",
        {"psnr": 20.809, "csim": 0.757, "jod": 6.960, "akd": 4.216, "aed": 2.489},
    ),
    "domain_attention": (
        "VGM w/o Domain Attn.",
        {"psnr": 20.984, "csim": 0.743, "jod": 7.029, "akd": 4.195, "aed": 2.556},
    ),
    "cross_view_pairs": (
        "VGM w/o Cross-view Pairing",
        {"psnr": 19.895, "csim": 0.734, "jod": 6.859, "akd": 5.367, "aed": 3.113},
    ),
    "synthetic_data": (
        "VGM w/o Synth Data",
        {"psnr": 20.892, "csim": 0.743, "jod": 6.978, "akd": 4.339, "aed": 2.527},
    ),
    "normal_loss": (
        "Recon w/o Normal Reg.",
        {"psnr": 19.950, "csim": 0.734, "jod": 6.774, "akd": 4.291, "aed": 2.713},
    ),
}
PAPER_FULL = {
    "vgm": {"psnr": 21.586, "csim": 0.754, "jod": 7.127, "akd": 4.016, "aed": 2.340},
    "recon": {"psnr": 19.953, "csim": 0.737, "jod": 6.780, "akd": 4.248, "aed": 2.563},
}
VERDICTS = ("reproduced", "not separated", "contradicted")
SEED_ROW = "seed replicate of the full method"  # a replicate's 'paper row': the paper has none
ALPHA = 0.05  # a metric separates only when the sign-flip test's two-sided p is below this
EXACT_UP_TO = 20  # subjects; above this the sign assignments are sampled (MONTE_CARLO draws, seeded)
MONTE_CARLO = 100_000
FRAME = ["subject", "sequence", "camera", "frame"]  # one scored frame of one method


def paper_direction(row: str, metric: str) -> str:
    """'worse' / 'better' (the variant against the full model, in the paper), 'worse (claimed)' where unreported."""
    if row not in PAPER_TABLE:
        raise ValueError(f"no paper row {row!r}; the paper's rows are {sorted(PAPER_TABLE)}")
    values = PAPER_TABLE[row][1]
    if metric not in values:
        return "worse (claimed)"
    full = PAPER_FULL["recon" if row == "normal_loss" else "vgm"][metric]
    return _direction(values[metric] - full, metric)


def _direction(difference: float, metric: str) -> str:
    if difference == 0 or math.isnan(difference):
        return "same"
    return "better" if (difference > 0) == HIGHER_IS_BETTER[metric] else "worse"


def sign_flip_p(differences: np.ndarray, seed: int = 0) -> float:
    """Two-sided p of the paired sign-flip permutation test: under the null that variant and full are
    exchangeable within each subject, every sign of every per-subject difference is equally likely. Exact (all
    2^n assignments) for n <= EXACT_UP_TO, else MONTE_CARLO seeded draws; NaN without differences."""
    differences = differences[~np.isnan(differences)]
    if differences.size == 0:
        return math.nan
    observed = abs(differences.sum())
    tolerance = 1e-9 * max(observed, float(np.abs(differences).sum()), 1e-300)  # sums of floats, reordered
    if differences.size <= EXACT_UP_TO:
        sums = np.zeros(1)
        for d in differences:  # every sign assignment's sum: [2^k] after k differences
            sums = np.concatenate([sums + d, sums - d])
        return float(np.mean(np.abs(sums) >= observed - tolerance))
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(MONTE_CARLO, differences.size))
    extreme = int(np.sum(np.abs(signs @ differences) >= observed - tolerance))
    return (extreme + 1) / (MONTE_CARLO + 1)  # the observed assignment counts: p is never zero


def verdict(p: float, difference: float, expected: str, metric: str) -> str:
    """Separated only by the stated rule: p < ALPHA; the side is the mean difference's. A seed replicate has no
    expected side (``expected`` 'none'): it either separates or not."""
    if math.isnan(p) or p >= ALPHA:
        return "not separated"
    if expected == "none":
        return "separated"
    return "reproduced" if _direction(difference, metric) == expected.split(" ")[0] else "contradicted"


def row_verdict(verdicts: list[str]) -> str:
    reproduced, contradicted = "reproduced" in verdicts, "contradicted" in verdicts
    if "separated" in verdicts:
        return "separated"
    if reproduced and contradicted:
        return "mixed"
    return "reproduced" if reproduced else "contradicted" if contradicted else "not separated"


def on_frames_scored_for_both(shared: pd.DataFrame, full: str, variant: str, metric: str) -> pd.DataFrame:
    """Only the frames where both methods have a score of ``metric``: a face metric's scored frames differ by
    method, and means over different frame subsets are no paired comparison."""
    scored = shared[shared[metric].notna()]
    keys = {m: pd.MultiIndex.from_frame(scored.loc[scored["method"] == m, FRAME]) for m in (full, variant)}
    both = keys[full].intersection(keys[variant])
    return scored[pd.MultiIndex.from_frame(scored[FRAME]).isin(both)]


def paired(frames: pd.DataFrame, full: str, variant: str, metric: str, seed: int) -> dict:
    """Means of both methods and the paired difference variant - full with its interval, its sign-flip p and
    the number of subjects n, on shared units (and, for face metrics, shared frames)."""
    both = frames[frames["method"].isin([full, variant])]
    common, _ = coverage(both)
    shared = on_units(both, common)
    if metric in FACE_METRICS:
        shared = on_frames_scored_for_both(shared, full, variant, metric)
    means = {m: balanced_means(shared[shared["method"] == m], metric)[0] for m in (full, variant)}
    difference = (means[variant] - means[full]).dropna().to_numpy(np.float64)  # per subject (or sequence)
    low, high = bootstrap_ci(difference, seed=seed)
    return {
        "full_mean": float(means[full].mean()),
        "variant_mean": float(means[variant].mean()),
        "difference": float(difference.mean()) if difference.size else math.nan,
        "lo": low,
        "hi": high,
        "n": int(difference.size),
        "p": sign_flip_p(difference, seed),
    }


def ablation_table(
    runs: dict[str, Path], full: str, rows: dict[str, str], seed: int = 0, replicates: tuple[str, ...] = ()
) -> pd.DataFrame:
    """Long table: one line per (variant or seed replicate, protocol, metric) measured for both methods."""
    lines = []
    compared = {**rows, **{r: "" for r in replicates}}  # variant -> paper row ('' for a seed replicate)
    for protocol, run in runs.items():
        frames, videos, meta = load_run(run)
        metrics = [m for m in ALL_METRICS if m in meta["settings"]["metrics"]]
        for variant, paper_row in compared.items():
            for metric in metrics:
                source = videos if metric == "jod" else frames
                if (
                    not {full, variant} <= set(source["method"])
                    or source.loc[source["method"] == variant, metric].isna().all()
                ):
                    continue
                stats = paired(source, full, variant, metric, seed)
                expected = paper_direction(paper_row, metric) if paper_row else "none"
                lines.append(
                    {
                        "variant": variant,
                        "paper_row": PAPER_TABLE[paper_row][0] if paper_row else SEED_ROW,
                        "protocol": protocol,
                        "metric": metric,
                        **stats,
                        "paper": expected,
                        "ours": _direction(stats["difference"], metric),
                        "verdict": verdict(stats["p"], stats["difference"], expected, metric),
                    }
                )
    return pd.DataFrame(lines)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """One line per row (variants, then seed replicates): its verdict and how many metrics fell in each."""
    out = []
    for (variant, paper_row), part in table.groupby(["variant", "paper_row"], sort=False):
        verdicts = part["verdict"].tolist()
        out.append(
            {
                "variant": variant,
                "paper_row": paper_row,
                "verdict": row_verdict(verdicts),
                **{v: verdicts.count(v) for v in (*VERDICTS, "separated")},
            }
        )
    return pd.DataFrame(out)


def _number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def _cells(line: pd.Series) -> list[str]:
    interval = "n/a" if math.isnan(line["lo"]) else f"[{line['lo']:.4f}, {line['hi']:.4f}]"
    return [
        line["variant"],
        line["protocol"],
        f"{line['metric'].upper()} {arrow(line['metric'])}",
        _number(line["full_mean"]),
        _number(line["variant_mean"]),
        f"{_number(line['difference'])} {interval}",
        str(line["n"]),
        "n/a" if math.isnan(line["p"]) else f"{line['p']:.3g}",
        line["paper"],
        line["ours"],
        line["verdict"],
    ]


HEAD = [
    "variant",
    "protocol",
    "metric",
    "full",
    "variant value",
    "variant - full [95% CI]",
    "n",
    "p",
    "paper",
    "ours",
    "verdict",
]
SUMMARY_HEAD = ["variant", "paper's row", "verdict", *VERDICTS, "separated (replicates)"]


def note(full: str, seed: int, replicates: tuple[str, ...]) -> str:
    return (
        f"Each variant against {full} on the (subject, sequence) units both covered: subject-balanced means, "
        "the mean paired difference per subject with a 95% percentile bootstrap over subjects "
        f"({N_BOOTSTRAP} resamples, seed {seed}); face metrics on the frames scored for both. n: subjects "
        "paired; p: two-sided exact sign-flip permutation test of the n per-subject differences (all 2^n "
        f"sign assignments; sampled above {EXACT_UP_TO} subjects). Verdict: reproduced when p < {ALPHA} "
        f"and the difference goes the paper's way, contradicted when p < {ALPHA} and it goes the other "
        "way, otherwise not separated; the smallest exact p is 2/2^n, so with fewer than 6 subjects no "
        "metric separates (3 subjects agreeing in sign give p = 0.25). Each variant is one training run; "
        + (
            f"{', '.join(replicates)} repeat {full} with another training seed (rows '{SEED_ROW}'): their "
            "differences are seed variance alone, and a replicate that separates (p < "
            f"{ALPHA}) marks a metric whose verdicts the rule cannot be trusted with at this n. "
            if replicates
            else "seed variance is not in these numbers. "
        )
        + "'paper': the variant against the full model in the "
        "paper's ablation table; '(claimed)' where the paper reports no number for the metric."
    )


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(
        ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        + ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    )


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    return (
        "<table><tr>"
        + "".join(f"<th>{e(h)}</th>" for h in head)
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        + "</table>"
    )


def difference_plot(table: pd.DataFrame, protocol: str, metric: str) -> str:
    """Each variant's paired difference with its interval; left of zero is the variant scoring lower."""
    part = table[(table["protocol"] == protocol) & (table["metric"] == metric)]
    fig = Figure(figsize=(4.5, 0.6 + 0.4 * len(part)))
    ax = fig.subplots()
    d = part["difference"].to_numpy(float)
    err = np.abs(np.stack([d - part["lo"].to_numpy(float), part["hi"].to_numpy(float) - d]))
    ax.errorbar(d, range(len(part)), xerr=np.nan_to_num(err), fmt="o", capsize=4, color="#4c72b0")
    ax.axvline(0, color="#888", lw=1)
    ax.set_yticks(range(len(part)), part["variant"])
    ax.set_title(f"{protocol} {metric.upper()}: variant - full, 95% CI ({arrow(metric)} better)")
    return figure_html(fig)


def write_ablation_report(
    runs: dict[str, Path],
    out: Path,
    full: str,
    rows: dict[str, str],
    seed: int = 0,
    replicates: tuple[str, ...] = (),
) -> dict:
    """``ablations.md``, ``ablations.html`` (tables and plots), ``ablations.parquet`` and ``ablations.csv`` in ``out``."""
    table = ablation_table(runs, full, rows, seed, replicates)
    if table.empty:
        raise ValueError(
            f"no metric was measured for both {full} and any of {sorted(rows)} in {sorted(runs)}"
        )
    rows_summary = summary(table)
    lines = [_cells(line) for _, line in table.iterrows()]
    short = [
        [r["variant"], r["paper_row"], r["verdict"], *(r[v] for v in (*VERDICTS, "separated"))]
        for _, r in rows_summary.iterrows()
    ]
    text = note(full, seed, replicates)
    md = "\n".join(
        [
            "# Ablations",
            "",
            text,
            "",
            "## Rows",
            "",
            _markdown(SUMMARY_HEAD, short),
            "",
            "## Every metric",
            "",
            _markdown(HEAD, lines),
            "",
        ]
    )
    plots = [
        difference_plot(table, p, m)
        for p, m in table[["protocol", "metric"]].drop_duplicates().itertuples(index=False)
    ]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><style>body{font-family:sans-serif;max-width:1100px;"
        "margin:auto}td,th{padding:3px 8px;border:1px solid #ccc}</style></head><body><h1>Ablations</h1>"
        f"<p>{html.escape(text)}</p><h2>Rows</h2>{_html_table(SUMMARY_HEAD, short)}<h2>Every metric</h2>"
        f"{_html_table(HEAD, lines)}<h2>Paired differences</h2>{''.join(plots)}</body></html>"
    )
    written = {
        "markdown": out / "ablations.md",
        "html": out / "ablations.html",
        "parquet": out / "ablations.parquet",
        "csv": out / "ablations.csv",
    }
    atomic_write_bytes(written["markdown"], md.encode())
    atomic_write_bytes(written["html"], page.encode())
    write_parquet_atomic(table, written["parquet"])
    atomic_write_bytes(written["csv"], table.to_csv(index=False).encode())
    return written
