"""Leaderboards: per-method means with 95% bootstrap intervals, miss rates, ranks, per-subject breakdown.

Writes Parquet + CSV (machine-readable), Markdown (best value per column in bold), LaTeX in the paper's
layout (Self PSNR/SSIM/LPIPS/CSIM/JOD, Cross CSIM/JOD) and the self-contained HTML report.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from geodiff4d.core.io.atomic import atomic_write_bytes
from geodiff4d.eval.report import header_cells, metric_cell, metric_cells, miss_cell, render_html
from geodiff4d.eval.run import NO_FRAMES, load_run, write_parquet_atomic
from geodiff4d.eval.settings import ALL_METRICS, FACE_METRICS, HIGHER_IS_BETTER, PAPER_METRICS, VIDEO_METRICS
from geodiff4d.eval.strip import strip_rows

N_BOOTSTRAP = 1000
UNIT = [
    "subject",
    "sequence",
]  # what an evaluation run commits; methods are compared on the units all covered


def coverage(frames: pd.DataFrame) -> tuple[set[tuple[str, str]], dict[str, set[tuple[str, str]]]]:
    """The (subject, sequence) units every method covered, and each method's own units."""
    covered = {m: set(map(tuple, g[UNIT].drop_duplicates().to_numpy())) for m, g in frames.groupby("method")}
    common = set.intersection(*covered.values()) if covered else set()
    return common, covered


def coverage_warnings(covered: dict[str, set[tuple[str, str]]]) -> list[str]:
    """One sentence per method that misses units some other method covered."""
    every = set().union(*covered.values())
    out = []
    for method, units in sorted(covered.items()):
        missing = sorted(every - units)
        if missing:
            out.append(
                f"{method} covers {len(units)} of {len(every)} units; missing "
                + ", ".join(f"{s}/{q}" for s, q in missing)
                + ": every method is ranked on the units all methods covered only"
            )
    return out


def with_not_covered(
    table: pd.DataFrame, methods: list[str], covered: dict[str, set[tuple[str, str]]]
) -> pd.DataFrame:
    """``table`` plus a row for each method that produced no frames: coverage 0 of all units, no scores."""
    every = set().union(*covered.values())
    extra = [
        {"method": m, "coverage": f"0/{len(every)}", "frames": 0, "subjects": 0, "videos": 0}
        for m in methods
        if m not in covered
    ]
    if not extra:
        return table
    rows = pd.DataFrame(extra).assign(units=table["units"].iloc[0])
    rows = rows.assign(**{c: 0 for c in table.columns if c.endswith("_unscored")})
    return pd.concat([table, rows], ignore_index=True)


def not_covered(meta: dict) -> dict[str, str]:
    """Method -> why it covers nothing (runs written before reasons were recorded list names only)."""
    named = meta.get("not_covered", {})
    return named if isinstance(named, dict) else dict.fromkeys(named, NO_FRAMES)


def input_warnings(meta: dict) -> list[str]:
    """Methods not covered (and why), and units scored earlier that are no longer among the run's inputs."""
    out = [f"{m} {why}: not covered, no scores" for m, why in not_covered(meta).items()]
    if meta.get("dropped_units"):
        out.append(
            f"dropped from the board: {len(meta['dropped_units'])} units scored earlier are no longer among the "
            "inputs (" + ", ".join(meta["dropped_units"]) + ")"
        )
    return out


def on_units(table: pd.DataFrame, units: set[tuple[str, str]]) -> pd.DataFrame:
    keys = pd.MultiIndex.from_frame(table[UNIT])
    return table[keys.isin(list(units))]


def balanced_means(values: pd.DataFrame, metric: str) -> tuple[pd.Series, str]:
    """Mean of ``metric`` per bootstrap cluster: per unit first, then per subject (so every subject weighs the
    same, whatever its frames, cameras or sequences); the clusters are the units when there is one subject."""
    units = values.groupby(UNIT)[metric].mean()  # NaN (a miss everywhere) stays NaN
    subjects = units.groupby(level="subject").mean()
    return (subjects, "subjects") if len(subjects) > 1 else (units, "sequences")


def bootstrap_ci(clusters: np.ndarray, n: int = N_BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of cluster means (subjects or sequences, never frames);
    NaN with fewer than two clusters, where resampling says nothing. The same seed gives every method the
    same resamples, so the intervals are paired."""
    clusters = clusters[~np.isnan(clusters)]
    if len(clusters) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = clusters[rng.integers(0, len(clusters), size=(n, len(clusters)))].mean(axis=1)  # [n]
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def miss_rate(frames: pd.DataFrame, metric: str) -> float:
    """Share of a face metric's scored frames (reference has a face) where the prediction had none."""
    if f"{metric}_miss" not in frames:
        raise ValueError(
            f"the frames have no {metric}_miss column: they were scored before a miss scored the worst value "
            "(docs/metrics.md); evaluate again into a new folder"
        )
    scored = int(frames[metric].notna().sum())
    return float(frames[f"{metric}_miss"].sum() / scored) if scored else math.nan


def aggregate(frames: pd.DataFrame, videos: pd.DataFrame, metrics: list[str], seed: int = 0) -> pd.DataFrame:
    """One row per method, on the units every method covered: ``coverage`` (units covered / all units),
    ``frames``, ``subjects``, ``{m}`` (subject-balanced mean), ``{m}_lo``/``{m}_hi`` (bootstrap over subjects or
    sequences), ``{m}_rank``, ``{m}_miss_rate`` for face metrics, and ``ci_over`` (what was resampled)."""
    common, covered = coverage(frames)
    if not common:
        raise ValueError(
            "no (subject, sequence) unit was scored for every method: "
            + "; ".join(f"{m}: {len(u)} units" for m, u in sorted(covered.items()))
            + ". Evaluate the methods on shared units, or leave one out"
        )
    every = set().union(*covered.values())
    f_all, v_all = on_units(frames, common), on_units(videos, common)
    rows = []
    for method in sorted(covered):
        f, v = f_all[f_all["method"] == method], v_all[v_all["method"] == method]
        row: dict[str, object] = {
            "method": method,
            "coverage": f"{len(covered[method])}/{len(every)}",
            "units": len(common),
            "frames": len(f),
            "subjects": f["subject"].nunique(),
            "videos": len(v),
        }
        for m in metrics:
            source = v if m in VIDEO_METRICS else f
            clusters, row["ci_over"] = balanced_means(source, m)
            values = clusters.to_numpy(np.float64)
            row[m] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
            row[f"{m}_lo"], row[f"{m}_hi"] = bootstrap_ci(values, seed=seed)
            row[f"{m}_unscored"] = int(source[m].isna().sum())
            if m in FACE_METRICS:
                row[f"{m}_miss_rate"] = miss_rate(source, m)
        rows.append(row)
    table = pd.DataFrame(rows)
    for m in metrics:
        table[f"{m}_rank"] = table[m].rank(ascending=not HIGHER_IS_BETTER[m], method="min")
    return table


def per_subject(frames: pd.DataFrame, videos: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Long table: method, subject, metric, mean."""
    parts = []
    for m in metrics:
        source = videos if m in VIDEO_METRICS else frames
        g = source.groupby(["method", "subject"])[m].mean().reset_index().rename(columns={m: "mean"})
        g["metric"] = m
        parts.append(g)
    return pd.concat(parts, ignore_index=True)[["method", "subject", "metric", "mean"]]


def markdown_table(table: pd.DataFrame, metrics: list[str]) -> str:
    head = ["method", "coverage", "frames", *header_cells(metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i in table.index:
        cells = [table.loc[i, "method"], table.loc[i, "coverage"], str(table.loc[i, "frames"])]
        cells += metric_cells(table, i, metrics, ("**", "**"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LATEX_NOTE = (
    r"Cov.: units covered of all units scored; [95\% percentile-bootstrap interval over subjects (sequences "
    r"with one subject)]; superscript: rank; miss: share of a face metric's scored frames without a face in "
    r"the prediction (scored worst)."
)


def _latex_cells(table: pd.DataFrame, method: str, metrics: list[str]) -> list[str]:
    """One protocol's cells of a method's row: coverage, then each metric's mean [interval] with its rank as a
    superscript (the best in bold) and, for face metrics, the miss rate; "--" where the method was not run."""
    t = table.reset_index(drop=True)
    hit = t.index[t["method"] == method]
    if hit.empty:
        return ["--"] * (1 + len(metrics))
    cells = [str(t.loc[hit[0], "coverage"])]
    for m in metrics:
        cell = metric_cell(t, hit[0], m, (r"\textbf{", "}"), latex=True)
        if m in FACE_METRICS:
            cell += rf"\,{{\scriptsize ({miss_cell(t, hit[0], m, latex=True)} miss)}}"
        cells.append(cell)
    return cells


def latex_table(tables: dict[str, pd.DataFrame]) -> str:
    """The paper's layout: methods as rows, Self PSNR/SSIM/LPIPS/CSIM/JOD then Cross CSIM/JOD, each protocol
    with its coverage column; each value with its interval and rank, the best in bold, face metrics' miss rates."""
    groups = [
        (p, [m for m in PAPER_METRICS[p] if m in tables[p].columns]) for p in ("self", "cross") if p in tables
    ]
    methods = sorted(set().union(*(set(t["method"]) for t in tables.values())))
    ncols = sum(1 + len(ms) for _, ms in groups)
    out = [
        r"\begin{tabular}{l" + "c" * ncols + "}",
        r"\toprule",
        " & "
        + " & ".join(rf"\multicolumn{{{1 + len(ms)}}}{{c}}{{{p.capitalize()}}}" for p, ms in groups)
        + r" \\",
        "Method & "
        + " & ".join(
            " & ".join(
                ["Cov."]
                + [m.upper() + (r"$\uparrow$" if HIGHER_IS_BETTER[m] else r"$\downarrow$") for m in ms]
            )
            for _, ms in groups
        )
        + r" \\",
        r"\midrule",
    ]
    for method in methods:
        cells = [c for p, ms in groups for c in _latex_cells(tables[p], method, ms)]
        out.append(method.replace("_", r"\_") + " & " + " & ".join(cells) + r" \\")
    out += [
        r"\bottomrule",
        rf"\multicolumn{{{ncols + 1}}}{{l}}{{\scriptsize {LATEX_NOTE}}} \\",
        r"\end{tabular}",
    ]
    return "\n".join(out)


UNSCORED_WHY = (
    "pixel metrics and JOD: empty ground-truth foreground (with --masked or --background) or LPIPS weights "
    "missing; face metrics: no face in the reference; NORMAL_DEG: the method wrote no normals"
)


def unscored_note(table: pd.DataFrame, metrics: list[str]) -> str | None:
    """Per method, the frames (videos for JOD) each metric could not score and left out of its mean; None if none."""
    parts = []
    for i in table.index:
        counts = [
            f"{m.upper()} {table.loc[i, f'{m}_unscored']} of "
            + (
                f"{table.loc[i, 'videos']} videos"
                if m in VIDEO_METRICS
                else f"{table.loc[i, 'frames']} frames"
            )
            for m in metrics
            if table.loc[i, f"{m}_unscored"]
        ]
        if counts:
            parts.append(f"{table.loc[i, 'method']}: " + ", ".join(counts))
    return f"Not scored (NaN, left out of the means): {'; '.join(parts)} ({UNSCORED_WHY})." if parts else None


def method_note(table: pd.DataFrame, seed: int) -> str:
    """How the table was computed, for the reader of the report."""
    over = table["ci_over"].iloc[0] if "ci_over" in table and len(table) else "subjects"
    return (
        f"Ranked on the {table['units'].iloc[0]} (subject, sequence) units every method covered "
        f"(coverage: units a method covered of all units scored). Means per unit, then per subject, then over "
        f"subjects, so each subject weighs the same; [95% interval] from a percentile bootstrap over {over} "
        f"({N_BOOTSTRAP} resamples, seed {seed}; n/a with fewer than two), not frames; #k = rank; "
        "best in bold; ↑ higher is better, ↓ lower is better. Face metrics score the frames whose reference "
        "has a face; a prediction without a face there is a miss and scores the worst value (CSIM -1, AKD the "
        "image diagonal, AED the regressor's ceiling)."
    )


def _named_runs(
    runs: str | Path | list[str | Path] | dict[str, str | Path],
) -> list[tuple[str | None, Path]]:
    """(name, run folder) pairs: the mapping's keys as names, else None (named by their protocol later)."""
    if isinstance(runs, dict):
        return [(name, Path(run)) for name, run in runs.items()]
    return [(None, Path(run)) for run in ([runs] if isinstance(runs, (str, Path)) else runs)]


def _run_section(
    protocol: str,
    run: Path,
    frames: pd.DataFrame,
    videos: pd.DataFrame,
    meta: dict,
    out: Path,
    seed: int,
    written: dict,
) -> dict:
    """Aggregate one run, write its tables into ``out`` (recorded in ``written``); returns its report section."""
    metrics = [m for m in ALL_METRICS if m in meta["settings"]["metrics"]]
    common, covered = coverage(frames)
    table = with_not_covered(aggregate(frames, videos, metrics, seed), list(not_covered(meta)), covered)
    subjects = per_subject(frames, videos, metrics)  # every unit scored: the heatmap shows the gaps
    write_parquet_atomic(table, out / f"{protocol}_leaderboard.parquet")
    write_parquet_atomic(subjects, out / f"{protocol}_per_subject.parquet")
    table.to_csv(out / f"{protocol}_leaderboard.csv", index=False)
    written.update(
        {
            f"{protocol}_parquet": out / f"{protocol}_leaderboard.parquet",
            f"{protocol}_csv": out / f"{protocol}_leaderboard.csv",
        }
    )
    return {
        "protocol": protocol,
        "run": str(run),
        "meta": meta,
        "metrics": metrics,
        "table": table,
        "markdown": markdown_table(table, metrics),
        "subjects": subjects,
        "frames": on_units(frames, common),
        "strip": strip_rows(meta, common, list(not_covered(meta))),
        "warnings": coverage_warnings(covered) + input_warnings(meta),
        "unscored": unscored_note(table, metrics),
        "method_note": method_note(table, seed),
    }


def _markdown_report(sections: list[dict]) -> str:
    """The Markdown leaderboard: per protocol its warnings, table, method note and metric descriptions."""
    md = [f"# Leaderboard\n\n{sections[0]['meta']['note']}\n"]
    for s in sections:
        md += [f"## {s['protocol'].capitalize()} ({s['run']})\n"] + [
            f"> WARNING: {w}\n" for w in s["warnings"]
        ]
        md += [s["markdown"], "", s["method_note"], ""] + ([s["unscored"], ""] if s["unscored"] else [])
        md += [f"- {m.upper()}: {s['meta']['describe'][m]}" for m in s["metrics"]]
        lp = s["meta"].get("lpips")
        if lp and not lp["available"]:
            md.append(
                f"- LPIPS unavailable: no backbone weights found; looked in {', '.join(lp['looked_in'])}"
            )
        md.append("")
    return "\n".join(md)


def build_leaderboard(
    runs: str | Path | list[str | Path] | dict[str, str | Path], out: str | Path | None = None, seed: int = 0
) -> dict:
    """Aggregate one or more runs (e.g. a self and a cross run) into ``out`` (default: the first run's
    ``leaderboard/``); returns ``{kind: path}`` of every file written. Runs are named by their protocol, or
    by the keys of a ``{name: run}`` mapping (two runs of one protocol, e.g. self-reenactment and novel views)."""
    runs = _named_runs(runs)
    out = Path(out) if out else runs[0][1] / "leaderboard"
    out.mkdir(parents=True, exist_ok=True)
    tables, sections, written = {}, [], {}
    for name, run in runs:
        frames, videos, meta = load_run(run)
        protocol = name or meta["settings"]["protocol"]
        if protocol in tables:
            raise ValueError(f"two {protocol!r} runs given ({run}); pass one run per protocol")
        sections.append(_run_section(protocol, run, frames, videos, meta, out, seed, written))
        tables[protocol] = sections[-1]["table"]
    written["markdown"], written["latex"], written["html"] = (
        out / "leaderboard.md",
        out / "leaderboard.tex",
        out / "report.html",
    )
    for kind, text in (
        ("markdown", _markdown_report(sections)),
        ("latex", latex_table(tables)),
        ("html", render_html(sections)),
    ):
        atomic_write_bytes(written[kind], text.encode())
    return written
