"""Fair leaderboards: common units only, coverage and warnings, subject-balanced means, bootstrap over subjects."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skimage.data
import skimage.transform

from geodiff4d.core.io.images import write_png
from geodiff4d.eval.leaderboard import aggregate, bootstrap_ci, build_leaderboard
from geodiff4d.eval.settings import EvalSettings

# method -> subject -> (cameras, PSNR of every frame); "partial" skipped s3, where "full" did badly
SCORES = {
    "full": {"s1": (3, 30.0), "s2": (1, 20.0), "s3": (1, 5.0)},
    "partial": {"s1": (3, 28.0), "s2": (1, 19.0)},
}
N_FRAMES = 4


def _rows() -> tuple[pd.DataFrame, pd.DataFrame]:
    frames, videos = [], []
    for method, subjects in SCORES.items():
        for subject, (cameras, value) in subjects.items():
            for c in range(cameras):
                frames += [
                    {
                        "method": method,
                        "subject": subject,
                        "sequence": "EXP-1",
                        "camera": f"cam{c}",
                        "frame": t,
                        "width": 64,
                        "height": 64,
                        "psnr": value,
                        "akd": 90.0 if t == 0 else value / 10,  # frame 0: a miss, the worst value
                        "akd_miss": t == 0,
                    }
                    for t in range(N_FRAMES)
                ]
                videos.append(
                    {
                        "method": method,
                        "subject": subject,
                        "sequence": "EXP-1",
                        "camera": f"cam{c}",
                        "frames": N_FRAMES,
                        "fps": 25.0,
                        "jod": value / 5,
                    }
                )
    return pd.DataFrame(frames), pd.DataFrame(videos)


def _write_run(folder: Path, frames: pd.DataFrame, videos: pd.DataFrame) -> Path:
    """An evaluation run folder as evaluate() leaves it, without scoring anything."""
    run = folder / "run"
    (run / "frames").mkdir(parents=True)
    (run / "videos").mkdir()
    frames.to_parquet(run / "frames" / "all.parquet")
    videos.to_parquet(run / "videos" / "all.parquet")
    settings = EvalSettings(metrics=("psnr", "akd", "jod"))
    (run / "run.json").write_text(
        json.dumps({"settings": settings.to_dict(), "describe": settings.describe(), "note": "note"})
    )
    return run


def test_a_method_that_skipped_a_subject_is_ranked_on_common_units(tmp_path):
    frames, videos = _rows()
    table = aggregate(frames, videos, ["psnr", "akd", "jod"]).set_index("method")
    # on every unit "partial" (mean 23.5 of its two subjects) would beat "full" (18.3, dragged down by s3)
    assert table.loc["full", "coverage"] == "3/3" and table.loc["partial", "coverage"] == "2/3"
    assert table.loc["full", "psnr"] == pytest.approx((30 + 20) / 2)  # per subject, not per frame (27.5)
    assert table.loc["partial", "psnr"] == pytest.approx((28 + 19) / 2)
    assert table.loc["full", "psnr_rank"] == 1 and table.loc["partial", "psnr_rank"] == 2
    assert (
        table.loc["full", "frames"] == table.loc["partial", "frames"] == 4 * N_FRAMES
    )  # s1: 3 cameras, s2: 1
    assert table.loc["full", "jod"] == pytest.approx((6 + 4) / 2) and table.loc["full", "jod_rank"] == 1
    assert table.loc["full", "akd_rank"] == 2 and table.loc["full", "akd_miss_rate"] == pytest.approx(0.25)
    assert table.loc["full", "ci_over"] == "subjects"
    assert table.loc["full", "psnr_lo"] == pytest.approx(20) and table.loc[
        "full", "psnr_hi"
    ] == pytest.approx(30)

    written = build_leaderboard(_write_run(tmp_path, frames, videos))
    md = written["markdown"].read_text()
    assert "WARNING: partial covers 2 of 3 units; missing s3/EXP-1" in md
    assert "| method | coverage | frames | PSNR ↑ | AKD ↓ | AKD miss | JOD ↑ |" in md
    assert "| full | 3/3 | 16 | **25.0000 [20.0000, 30.0000] #1** |" in md
    assert "| partial | 2/3 | 16 | 23.5000 [19.0000, 28.0000] #2 |" in md
    assert "bootstrap over subjects" in md and "per subject" in md
    html = written["html"].read_text()
    assert "WARNING: partial covers 2 of 3 units" in html and "<th>PSNR ↑</th>" in html and "#1" in html
    assert "<td>2/3</td>" in html
    tex = written["latex"].read_text()
    assert r"\textbf{25.0000 [20.0000, 30.0000]$^{1}$}" in tex and r"PSNR$\uparrow$" in tex


def _latex_rows(tex: str) -> dict[str, list[str]]:
    """The body rows of a LaTeX table: method -> its cells."""
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0]
    rows = [line.removesuffix(r" \\").split(" & ") for line in body.strip().splitlines()]
    return {row[0]: row[1:] for row in rows}


def test_latex_rows_carry_coverage_intervals_and_miss_rates(tmp_path):
    """Before, the LaTeX table dropped coverage and intervals: a method covering 2 of 3 units read like one
    covering all of them."""
    frames, videos = _rows()
    frames["csim"] = np.where(frames["akd_miss"], -1.0, frames["psnr"] / 40)
    frames["csim_miss"] = frames["akd_miss"]
    run = _write_run(tmp_path, frames, videos)
    settings = EvalSettings(metrics=("psnr", "csim", "jod"))
    meta = json.loads((run / "run.json").read_text())
    meta.update(
        settings=settings.to_dict(), describe=settings.describe(), not_covered={"blank": "produced no frames"}
    )
    (run / "run.json").write_text(json.dumps(meta))
    tex = build_leaderboard(run)["latex"].read_text()
    assert "Method & Cov. & PSNR$\\uparrow$ & CSIM$\\uparrow$ & JOD$\\uparrow$ \\\\" in tex
    rows = _latex_rows(tex)
    assert [cells[0] for cells in rows.values()] == ["0/3", "3/3", "2/3"]  # blank, full, partial
    full, partial = rows["full"], rows["partial"]
    assert full[1] == r"\textbf{25.0000 [20.0000, 30.0000]$^{1}$}"
    assert partial[1] == "23.5000 [19.0000, 28.0000]$^{2}$"
    assert re.fullmatch(
        r".*\[-?[0-9.]+, -?[0-9.]+\]\$\^\{\d\}\$\}?\\,\{\\scriptsize \(25\.0\\% miss\)\}", full[2]
    )
    assert rows["blank"] == ["0/3", "n/a", "n/a\\,{\\scriptsize (n/a miss)}", "n/a"]
    assert "Cov.: units covered of all units scored" in tex


def test_no_common_unit_is_refused():
    frames, videos = _rows()
    full = frames[frames["method"] == "full"]
    frames = pd.concat([full, full[full["subject"] == "s1"].assign(method="other", subject="s4")])
    with pytest.raises(ValueError, match="no \\(subject, sequence\\) unit was scored for every method"):
        aggregate(frames, videos, ["psnr"])


def test_bootstrap_is_over_clusters_and_seeded():
    clusters = np.array([1.0, 2.0, 3.0, 10.0])
    assert bootstrap_ci(clusters, seed=3) == bootstrap_ci(clusters, seed=3)
    low, high = bootstrap_ci(clusters)
    assert 1.0 <= low < clusters.mean() < high <= 10.0
    assert np.isnan(bootstrap_ci(np.array([5.0]))).all()  # one subject: nothing to resample


# Instrumentation appended to a copy of the report: records script errors and what the browser actually rendered,
# and where each thumbnail of the side-by-side strip landed on the page.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message)));
window.addEventListener('load', () => {
  const decoded = [...document.images].filter(i => i.complete && i.naturalWidth > 0).length;
  const strip = [...document.querySelectorAll('.strip figure')].map(f => {
    const box = f.querySelector('img, .noframe').getBoundingClientRect();
    return {caption: f.querySelector('figcaption').textContent, top: box.top, left: box.left, height: box.height,
      decoded: f.querySelector('img') ? f.querySelector('img').naturalWidth > 0 : null};
  });
  document.body.setAttribute('data-probe', JSON.stringify({errors: window.__errors, images: document.images.length,
    decoded: decoded, rows: document.querySelectorAll('#leaderboard tr').length, strip: strip}));
});
</script>"""


def _frame_trees(tmp_path: Path, run: Path) -> None:
    """Ground truth and both methods' frames (camera cam0) for the units they cover, recorded in run.json as
    evaluate() records its sources: a real face, shifted or darkened per method so thumbnails differ."""
    face = skimage.transform.resize(skimage.data.astronaut()[:256, 96:352], (64, 64), anti_aliasing=True)
    face = (face * 255).astype(np.uint8)
    looks = {"gt": face, "full": np.roll(face, 4, axis=1), "partial": (face * 0.6).astype(np.uint8)}
    covers = {"gt": SCORES["full"], "full": SCORES["full"], "partial": SCORES["partial"]}
    for name, image in looks.items():
        for subject in covers[name]:
            for t in range(N_FRAMES):
                write_png(tmp_path / name / subject / "EXP-1" / "cam0" / f"{t:05d}.png", image)
    meta = json.loads((run / "run.json").read_text())
    meta["sources"] = {
        "gt": str(tmp_path / "gt"),
        "gt_mask": None,
        "fps": 25.0,
        "methods": {m: str(tmp_path / m) for m in ("full", "partial")},
    }
    (run / "run.json").write_text(json.dumps(meta))


def test_html_report_in_headless_chromium(tmp_path):
    """The report opened by a real browser: no script errors, the leaderboard table and every plot rendered."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    frames, videos = _rows()
    run = _write_run(tmp_path, frames, videos)
    _frame_trees(tmp_path, run)
    html = build_leaderboard(run)["html"]
    probed = tmp_path / "probed.html"
    probed.write_text(html.read_text().replace("</body>", PROBE + "</body>"))
    result = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--enable-logging=stderr",
            "--virtual-time-budget=10000",
            "--dump-dom",
            probed.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    probe = json.loads(re.search(r'data-probe="([^"]*)"', dom).group(1).replace("&quot;", '"'))
    assert probe["errors"] == [] and "Uncaught" not in result.stderr
    assert probe["rows"] == 3  # header + two methods
    # 3 bars, 3 heatmaps, 2 frame curves, and the strip: subjects s1, s2 (the units both methods covered) x
    # (ground truth, full, partial)
    assert probe["images"] >= 7 + 6 and probe["decoded"] == probe["images"]
    strip = probe["strip"]
    assert [f["caption"] for f in strip] == [
        f"{m} · {s}" for s in ("s1", "s2") for m in ("ground truth", "full", "partial")
    ]
    assert all(f["decoded"] and f["height"] == 96 for f in strip)
    rows = [strip[:3], strip[3:]]
    assert all(len({f["top"] for f in row}) == 1 for row in rows)  # a row's thumbnails side by side
    assert [f["left"] for f in rows[0]] == [f["left"] for f in rows[1]]  # columns aligned
    assert rows[0][0]["left"] < rows[0][1]["left"] < rows[0][2]["left"]
    thumbs = re.findall(r"data:image/jpeg;base64,([A-Za-z0-9+/=]+)", html.read_text())
    assert len(thumbs) == 6 and max(len(t) * 3 // 4 for t in thumbs) < 8000  # a few KB each
    assert "WARNING: partial covers 2 of 3 units" in dom and "PSNR ↑" in dom
