"""Self-contained HTML report: tables, settings and matplotlib plots embedded as base64 PNG."""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from geodiff4d.eval.settings import FACE_METRICS, HIGHER_IS_BETTER, VIDEO_METRICS  # noqa: E402
from geodiff4d.eval.strip import THUMB_HEIGHT, StripRow  # noqa: E402


def arrow(metric: str) -> str:
    return "↑" if HIGHER_IS_BETTER[metric] else "↓"


def metric_cell(
    table,
    i: int,
    metric: str,
    bold: tuple[str, str] = ("", ""),
    ci: bool = True,  # noqa: ANN001
    latex: bool = False,
) -> str:
    """``mean [lo, hi] #rank`` of row ``i`` (LaTeX: the rank as a superscript); the column's best value wrapped in
    ``bold``; ``n/a`` when the metric could not be measured."""
    value = table.loc[i, metric]
    if pd.isna(value):
        return "n/a"
    text = f"{value:.4f}"
    if ci:
        low, high = table.loc[i, f"{metric}_lo"], table.loc[i, f"{metric}_hi"]
        text += " [n/a]" if pd.isna(low) else f" [{low:.4f}, {high:.4f}]"
    rank = int(table.loc[i, f"{metric}_rank"])
    text += f"$^{{{rank}}}$" if latex else f" #{rank}"
    column = table[metric].dropna()
    best = column.max() if HIGHER_IS_BETTER[metric] else column.min()
    return f"{bold[0]}{text}{bold[1]}" if value == best else text


def miss_cell(table, i: int, metric: str, latex: bool = False) -> str:  # noqa: ANN001 - DataFrame
    """A face metric's miss rate in row ``i``: the share of its scored frames where the prediction had no face."""
    rate = table.loc[i, f"{metric}_miss_rate"]
    text = "n/a" if pd.isna(rate) else f"{rate:.1%}"
    return text.replace("%", r"\%") if latex else text


def header_cells(metrics: list[str]) -> list[str]:
    """Each metric's column title; a face metric's miss rate right beside it."""
    cells = []
    for m in metrics:
        cells += [f"{m.upper()} {arrow(m)}"] + ([f"{m.upper()} miss"] if m in FACE_METRICS else [])
    return cells


def metric_cells(table, i: int, metrics: list[str], bold: tuple[str, str]) -> list[str]:  # noqa: ANN001
    """Row ``i``'s cells under :func:`header_cells`."""
    cells = []
    for m in metrics:
        cells += [metric_cell(table, i, m, bold)] + ([miss_cell(table, i, m)] if m in FACE_METRICS else [])
    return cells


def figure_html(fig) -> str:  # noqa: ANN001 - matplotlib Figure
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"/>'


def bar_chart(table, metric: str) -> str:  # noqa: ANN001 - DataFrame
    fig, ax = plt.subplots(figsize=(4, 2.6))
    means = table[metric].to_numpy(float)
    err = np.abs(
        np.stack(
            [means - table[f"{metric}_lo"].to_numpy(float), table[f"{metric}_hi"].to_numpy(float) - means]
        )
    )
    ax.bar(table["method"], means, yerr=np.nan_to_num(err), capsize=4, color="#4c72b0")
    ax.set_title(f"{metric.upper()} ({'higher' if HIGHER_IS_BETTER[metric] else 'lower'} is better), 95% CI")
    ax.tick_params(axis="x", rotation=30)
    return figure_html(fig)


def heatmap(subjects, metric: str) -> str:  # noqa: ANN001 - DataFrame
    grid = subjects[subjects["metric"] == metric].pivot(index="method", columns="subject", values="mean")
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * grid.shape[1], 0.8 + 0.4 * grid.shape[0]))
    im = ax.imshow(
        grid.to_numpy(float), cmap="viridis" if HIGHER_IS_BETTER[metric] else "viridis_r", aspect="auto"
    )
    ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=45)
    ax.set_yticks(range(grid.shape[0]), grid.index)
    ax.set_title(f"{metric.upper()} per subject")
    fig.colorbar(im, ax=ax)
    return figure_html(fig)


def frame_curves(frames, metric: str) -> str:  # noqa: ANN001 - DataFrame
    fig, ax = plt.subplots(figsize=(5, 2.6))
    for method, g in frames.groupby("method"):
        curve = g.groupby("frame")[metric].mean()
        ax.plot(curve.index, curve.to_numpy(), label=method)
    ax.set_xlabel("frame")
    ax.set_title(f"{metric.upper()} per frame (mean over subjects, sequences, cameras)")
    ax.legend(fontsize=7)
    return figure_html(fig)


def strip_html(rows: list[StripRow]) -> str:
    """The side-by-side strip: a row per subject, the ground truth then every method, each thumbnail captioned
    with its method and subject; an empty cell where a method has no frame."""
    e = html.escape
    if not rows:
        return ""
    head = "".join(f"<th>{e(t.label)}</th>" for t in rows[0].thumbnails)
    body = []
    for row in rows:
        cells = []
        for t in row.thumbnails:
            picture = (
                f"<img src='data:image/jpeg;base64,{t.jpeg_base64}' alt='{e(t.label)}, subject {e(t.subject)}'/>"
                if t.jpeg_base64
                else "<div class='noframe'>no frame</div>"
            )
            cells.append(
                f"<td><figure>{picture}<figcaption>{e(t.label)} · {e(t.subject)}</figcaption></figure></td>"
            )
        where = f"{e(row.subject)}<br/><small>{e(row.sequence)}<br/>cam {e(row.camera)}, frame {row.frame}</small>"
        body.append(f"<tr><th>{where}</th>{''.join(cells)}</tr>")
    return (
        "<h3>One frame per subject, side by side</h3><p>The middle frame of each subject's first scored "
        "sequence at its first camera, as scored (composited like the metrics see it).</p>"
        f"<table class='strip'><tr><th>subject</th>{head}</tr>{''.join(body)}</table>"
    )


def render_html(sections: list[dict]) -> str:
    """One page per leaderboard build: per protocol its table, settings, LPIPS availability and plots."""
    e = html.escape
    body = [f"<h1>GeoDiff4D evaluation report</h1><p><b>{e(sections[0]['meta']['note'])}</b></p>"]
    for s in sections:
        table, metrics = s["table"], s["metrics"]
        body.append(f"<h2>{e(s['protocol'].capitalize())} protocol</h2><p>run: {e(s['run'])}</p>")
        body += [f"<p class='warning'>WARNING: {e(w)}</p>" for w in s["warnings"]]
        body.append(_table_html(table, metrics) + f"<p>{e(s['method_note'])}</p>")
        if s.get("unscored"):
            body.append(f"<p class='unscored'>{e(s['unscored'])}</p>")
        body.append(strip_html(s.get("strip", [])))
        body.append(
            "<h3>Settings</h3><ul>"
            + "".join(f"<li><b>{m.upper()}</b>: {e(s['meta']['describe'][m])}</li>" for m in metrics)
            + "</ul>"
        )
        lp = s["meta"].get("lpips")
        if lp and not lp["available"]:
            body.append(
                f"<p>LPIPS unavailable: no backbone weights; looked in {e(', '.join(lp['looked_in']))}</p>"
            )
        plotted = [m for m in metrics if table[m].notna().any()]
        body.append(
            "<h3>Means with 95% bootstrap intervals</h3>" + "".join(bar_chart(table, m) for m in plotted)
        )
        body.append("<h3>Per subject</h3>" + "".join(heatmap(s["subjects"], m) for m in plotted))
        body.append(
            "<h3>Per frame</h3>"
            + "".join(frame_curves(s["frames"], m) for m in plotted if m not in VIDEO_METRICS)
        )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto}td,th{padding:3px 8px;border:1px solid #ccc}"
        ".warning{color:#a00;font-weight:bold}"
        f".strip figure{{margin:0;text-align:center}}.strip img{{height:{THUMB_HEIGHT}px;display:block;margin:auto}}"
        ".strip figcaption{font-size:11px;white-space:nowrap}.strip td,.strip th{vertical-align:top}"
        f".noframe{{height:{THUMB_HEIGHT}px;width:{THUMB_HEIGHT}px;line-height:{THUMB_HEIGHT}px;background:#eee;"
        "color:#888;font-size:11px;margin:auto}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>"
        + "\n".join(body)
        + "</body></html>"
    )


def _table_html(table, metrics: list[str]) -> str:  # noqa: ANN001 - DataFrame
    head = "".join(
        f"<th>{html.escape(c)}</th>" for c in ["method", "coverage", "frames", *header_cells(metrics)]
    )
    rows = []
    for i in table.index:
        cells = [
            html.escape(str(table.loc[i, "method"])),
            table.loc[i, "coverage"],
            str(table.loc[i, "frames"]),
        ]
        cells += metric_cells(table, i, metrics, ("<b>", "</b>"))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table id='leaderboard'><tr>{head}</tr>{''.join(rows)}</table>"
