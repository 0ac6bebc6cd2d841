"""configs/ablations.yaml's machinery proven at toy size: five rows, a rerun does no work, deleting one variant's
outputs recomputes only that variant (and the evaluation and tables that read it).

The config's structure as it is (methods, held-out split, ablation rows, metrics) with the sizes shrunk: 4
procedural subjects (2 train, 2 evaluated) of 4 frames at 64 px, 2 + 2 training steps, 5 reconstruction steps.
The numbers mean nothing at this size; the stages run, the keys and the table are what is checked.
Usage: python bench/ablations_proof.py --out /tmp/ablations-proof  (about 15-25 min on 2 busy cores)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from geodiff4d.core.io.json_yaml import read_json

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(out: Path) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "ablations.yaml").read_text())
    config["data"]["procedural"].update(subjects=4, frames=4, resolution=64, synthetic=2)
    gen = config["generation"]
    gen.update(
        train_subjects=["001", "002"],
        train_steps={1: 2, 2: 2},
        views=["222200037", "222200044"],
        frames=4,
        model_overrides={
            "train": {"stage2": {"batch_size": 1, "steps": 2, "frames": 2}},
            "sample": {"steps": 2, "window": 4, "overlap": 1},
        },
    )
    config["recon"]["steps"] = 5
    config["eval"]["metrics"] = {
        "self": ["psnr", "ssim", "normal_deg"],
        "novel_views": ["psnr", "normal_deg"],
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(config: Path, out: Path) -> set[str]:
    """One benchmark run; the stages it ran (its "[stage] running" lines)."""
    result = subprocess.run(
        [sys.executable, "-m", "geodiff4d.cluster.cli", "benchmark", str(config), "--out", str(out)],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", **os.environ},
    )
    log = result.stdout + result.stderr
    (out.parent / f"{out.name}.log").open("a").write(log)
    if result.returncode:
        sys.exit(f"benchmark failed ({result.returncode}):\n{log[-4000:]}")
    return set(re.findall(r"^\[(.+?)\] running", log, flags=re.M))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ablations-proof"))
    out = parser.parse_args().out.resolve()
    config = tiny_config(out)
    first = run(config, out)
    models = sorted(s for s in first if s.startswith("model:"))
    print(f"first run: {len(first)} stages, {len(models)} models trained: {models}")
    summary = pd.read_csv(out / "ablations" / "ablations.csv")
    rows = sorted(summary["variant"].unique())
    print(f"ablation table rows: {rows}")
    print((out / "ablations" / "ablations.md").read_text())
    assert len(rows) == 5, rows
    assert len(models) == 5, "full + four training variants; the recon-only variant shares the full model"
    assert {"normal_deg"} <= set(summary["metric"]), "normal accuracy measured"
    again = run(config, out)
    print(f"rerun: stages run {sorted(again)}")
    assert not again, again
    variants = read_json(out / "variants.json")
    target = variants["no-joint-normals"]
    for key in ("model", "generated", "avatars"):
        shutil.rmtree(target[key])
    for folder in out.glob("pred/*/no-joint-normals"):
        shutil.rmtree(folder)
    redo = run(config, out)
    print(f"after deleting no-joint-normals' outputs: stages run {sorted(redo)}")
    keys = {Path(target[k]).name for k in ("model", "generated", "avatars")}
    own = {s for s in redo if any(k in s for k in keys) or s.startswith("render:no-joint-normals:")}
    shared = redo - own
    assert shared <= {"eval:self", "eval:novel_views", "leaderboard", "ablations"}, shared
    assert any(s.startswith("model:") for s in own) and any(s.startswith("render:") for s in own), own
    print(
        "OK: five rows, a rerun does no work, deleting one variant recomputes only it "
        f"({len(own)} of its stages) and the evaluation/tables that read it"
    )


if __name__ == "__main__":
    main()
