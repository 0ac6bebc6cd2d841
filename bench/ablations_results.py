"""Publish a finished `make ablations` run under bench/results/ablations/: the tables and reports it wrote, a picture
of what each variant's model generated, and where the run's time went.

Copies RUN/ablations/ablations.{md,html,csv} and RUN/leaderboard/{leaderboard.md,report.html}; writes
`generated.png` (per trained model, for one evaluated subject: a row of generated RGB and a row of generated normals,
grey where the variant's model generates none) and `time.txt` (the seconds each kind of stage took, from the
run's commit markers; stages ran two at a time, so their sum exceeds the wall time).
Usage: python bench/ablations_results.py runs/ablations [--out bench/results/ablations] [--subject 005]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_end_to_end import generated_rows  # noqa: E402  (a sibling script)

from geodiff4d.core.io.images import write_png
from geodiff4d.core.io.json_yaml import read_json

ROOT = Path(__file__).resolve().parents[1]
COPIED = [
    "ablations/ablations.md",
    "ablations/ablations.html",
    "ablations/ablations.csv",
    "leaderboard/leaderboard.md",
    "leaderboard/report.html",
]
LABEL_WIDTH = 150


def variant_grid(run: Path, subject: str, out: Path, zoom: int = 3) -> Path:
    """Per generated folder (variants.json; variants that change only reconstruction share one), the generated RGB
    row and normal row of ``subject``, labelled with the variants that sample it."""
    names: dict[str, list[str]] = defaultdict(list)  # generated folder -> the variants sampling it
    for name, outputs in read_json(run / "variants.json").items():
        if "generated" in outputs:  # the oracle and baselines generate nothing
            names[outputs["generated"]].append(name)
    rows = []
    for folder, variants in names.items():
        made = generated_rows(Path(folder), subject)
        for domain in ("rgb", "normal"):
            row = made.get(domain, np.full_like(made["rgb"], 128))
            row = row.repeat(zoom, axis=0).repeat(zoom, axis=1)
            label = Image.new("RGB", (LABEL_WIDTH, row.shape[0]), "white")
            ImageDraw.Draw(label).multiline_text((4, 4), "\n".join([*variants, domain]), fill="black")
            rows.append(np.concatenate([np.asarray(label), row], axis=1))
    write_png(out, np.concatenate(rows, axis=0), encoder="pillow")
    return out


def stage_seconds(run: Path) -> dict[str, float]:
    """Seconds per kind of stage (the name before its first colon) from the stages' commit markers."""
    seconds: dict[str, float] = defaultdict(float)
    for marker in (run / "state").glob("*.stats.json"):
        value = read_json(marker).get("seconds")
        if value is not None:
            seconds[marker.name.removesuffix(".stats.json").split(":")[0]] += value
    return dict(sorted(seconds.items(), key=lambda item: -item[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "run", type=Path, help="a finished `geodiff4d benchmark configs/ablations.yaml` run folder"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ablations")
    parser.add_argument(
        "--subject", default=None, help="the subject shown in generated.png (default: the first evaluated)"
    )
    args = parser.parse_args()
    run = args.run.resolve()
    missing = [name for name in COPIED if not (run / name).is_file()]
    if missing:
        sys.exit(f"{run} is not a finished ablation run: no {', '.join(missing)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        shutil.copyfile(run / name, args.out / Path(name).name)
    subject = args.subject or sorted(p.name for p in (run / "frames" / "rgb").iterdir())[0]
    grid = variant_grid(run, subject, args.out / "generated.png")
    seconds = stage_seconds(run)
    lines = [f"{kind:12s} {value / 60:7.1f} min" for kind, value in seconds.items()]
    lines.append(f"{'sum':12s} {sum(seconds.values()) / 60:7.1f} min (stages ran two at a time)")
    (args.out / "time.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {', '.join(Path(n).name for n in COPIED)}, {grid.name} and time.txt to {args.out}")


if __name__ == "__main__":
    main()
