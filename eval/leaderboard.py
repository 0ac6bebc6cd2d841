"""Leaderboards: per-method means with 95% bootstrap intervals, miss rates, ranks, per-subject breakdown.

Writes Parquet + CSV (machine-readable), Markdown (best value per column in bold), LaTeX in the paper's
layout (Self PSNR/SSIM/LPIPS/CSIM/JOD, Cross CSIM/JOD) and the self-contained HTML report.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from geodiff4d.eval.report import render_html
from geodiff4d.eval.run import load_run, write_parquet_atomic
from geodiff4d.eval.settings import ALL_METRICS, FACE_METRICS, HIGHER_IS_BETTER, VIDEO_METRICS

N_BOOTSTRAP = 1000
PAPER_COLUMNS = {"self": ("psnr", "ssim", "lpips", "csim", "jod"), "cross": ("csim", "jod")}


def bootstrap_ci(values: np.ndarray, n: int = N_BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean (NaNs dropped); NaN when nothing is left."""
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)  # [n]
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def aggregate(frames: pd.DataFrame, videos: pd.DataFrame, metrics: list[str], seed: int = 0) -> pd.DataFrame:
    """One row per method: ``{m}``, ``{m}_lo``, ``{m}_hi``, ``{m}_rank`` and ``{m}_miss_rate`` for face metrics."""
    rows = []
    for method in sorted(frames["method"].unique()):
        f, v = frames[frames["method"] == method], videos[videos["method"] == method]
        row: dict[str, object] = {"method": method, "frames": len(f), "videos": len(v)}
        for m in metrics:
            values = (v if m in VIDEO_METRICS else f)[m].to_numpy(np.float64)
            row[m] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
            row[f"{m}_lo"], row[f"{m}_hi"] = bootstrap_ci(values, seed=seed)
            if m in FACE_METRICS:
                row[f"{m}_miss_rate"] = float(np.isnan(values).mean())
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


def _best(table: pd.DataFrame, m: str) -> float:
    col = table[m].dropna()
    if col.empty:
        return math.nan
    return col.max() if HIGHER_IS_BETTER[m] else col.min()


def _cell(table: pd.DataFrame, i: int, m: str, bold: tuple[str, str], ci: bool = True) -> str:
    value = table.loc[i, m]
    if pd.isna(value):
        return "n/a"
    text = f"{value:.4f}"
    if ci and not pd.isna(table.loc[i, f"{m}_lo"]):
        text += f" [{table.loc[i, f'{m}_lo']:.4f}, {table.loc[i, f'{m}_hi']:.4f}]"
    return f"{bold[0]}{text}{bold[1]}" if value == _best(table, m) else text


def markdown_table(table: pd.DataFrame, metrics: list[str]) -> str:
    arrows = {m: "↑" if HIGHER_IS_BETTER[m] else "↓" for m in metrics}
    head = ["method"] + [f"{m.upper()} {arrows[m]}" for m in metrics] + \
           [f"{m.upper()} miss" for m in metrics if m in FACE_METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i in table.index:
        cells = [table.loc[i, "method"]] + [_cell(table, i, m, ("**", "**")) for m in metrics]
        cells += [f"{table.loc[i, f'{m}_miss_rate']:.1%}" for m in metrics if m in FACE_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def latex_table(tables: dict[str, pd.DataFrame]) -> str:
    """The paper's layout: methods as rows, Self PSNR/SSIM/LPIPS/CSIM/JOD then Cross CSIM/JOD."""
    groups = [(p, [m for m in PAPER_COLUMNS[p] if m in tables[p].columns]) for p in ("self", "cross") if p in tables]
    methods = sorted(set().union(*(set(t["method"]) for t in tables.values())))
    ncols = sum(len(ms) for _, ms in groups)
    out = [r"\begin{tabular}{l" + "c" * ncols + "}", r"\toprule",
           " & " + " & ".join(rf"\multicolumn{{{len(ms)}}}{{c}}{{{p.capitalize()}}}" for p, ms in groups) + r" \\",
           "Method & " + " & ".join(m.upper() + (r"$\uparrow$" if HIGHER_IS_BETTER[m] else r"$\downarrow$")
                                    for _, ms in groups for m in ms) + r" \\", r"\midrule"]
    for method in methods:
        cells = []
        for p, ms in groups:
            t = tables[p].reset_index(drop=True)
            hit = t.index[t["method"] == method]
            for m in ms:
                cells.append("--" if hit.empty else _cell(t, hit[0], m, (r"\textbf{", "}"), ci=False))
        out.append(method.replace("_", r"\_") + " & " + " & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def build_leaderboard(runs: str | Path | list[str | Path] | dict[str, str | Path], out: str | Path | None = None,
                      seed: int = 0) -> dict:  # fmt: skip
    """Aggregate one or more runs (e.g. a self and a cross run) into ``out`` (default: the first run's
    ``leaderboard/``); returns ``{kind: path}`` of every file written. Runs are named by their protocol, or
    by the keys of a ``{name: run}`` mapping (two runs of one protocol, e.g. self-reenactment and novel views)."""
    if isinstance(runs, dict):
        runs = [(name, Path(run)) for name, run in runs.items()]
    else:
        runs = [(None, Path(run)) for run in ([runs] if isinstance(runs, (str, Path)) else runs)]
    out = Path(out) if out else runs[0][1] / "leaderboard"
    out.mkdir(parents=True, exist_ok=True)
    tables, sections, written = {}, [], {}
    for name, run in runs:
        frames, videos, meta = load_run(run)
        protocol = name or meta["settings"]["protocol"]
        if protocol in tables:
            raise ValueError(f"two {protocol!r} runs given ({run}); pass one run per protocol")
        metrics = [m for m in ALL_METRICS if m in meta["settings"]["metrics"]]
        table = aggregate(frames, videos, metrics, seed)
        subjects = per_subject(frames, videos, metrics)
        tables[protocol] = table
        write_parquet_atomic(table, out / f"{protocol}_leaderboard.parquet")
        write_parquet_atomic(subjects, out / f"{protocol}_per_subject.parquet")
        table.to_csv(out / f"{protocol}_leaderboard.csv", index=False)
        written.update({f"{protocol}_parquet": out / f"{protocol}_leaderboard.parquet",
                        f"{protocol}_csv": out / f"{protocol}_leaderboard.csv"})
        sections.append({"protocol": protocol, "run": str(run), "meta": meta, "metrics": metrics, "table": table,
                         "markdown": markdown_table(table, metrics), "subjects": subjects, "frames": frames})
    md = [f"# Leaderboard\n\n{sections[0]['meta']['note']}\n"]
    for s in sections:
        md += [f"## {s['protocol'].capitalize()} ({s['run']})\n", s["markdown"], ""]
        md += [f"- {m.upper()}: {s['meta']['describe'][m]}" for m in s["metrics"]]
        lp = s["meta"].get("lpips")
        if lp and not lp["available"]:
            md.append(f"- LPIPS unavailable: no backbone weights found; looked in {', '.join(lp['looked_in'])}")
        md.append("")
    written["markdown"], written["latex"], written["html"] = out / "leaderboard.md", out / "leaderboard.tex", \
        out / "report.html"
    _write_text(written["markdown"], "\n".join(md))
    _write_text(written["latex"], latex_table(tables))
    _write_text(written["html"], render_html(sections))
    return written
