"""``geodiff4d doctor``: what this installation can run, and what is missing for the rest.

Every check looks for a file or a device the way the stage itself does (the same locators), without
loading networks or starting Ray, so the answer is quick and says exactly what to install or pass.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from geodiff4d.datasets.packaged import DLIB_LANDMARKS_68, ModelFileNotFound, package_file


@dataclass(frozen=True)
class Check:
    area: str  # compute | ray | metric | data
    name: str
    ok: bool
    detail: str  # what was found, or what is missing and how to provide it


def _packaged(*files: tuple[str, str]) -> str:
    """The packaged files' paths; raises ModelFileNotFound naming the first one missing."""
    return ", ".join(str(package_file(package, relative)) for package, relative in files)


def _module(name: str, install: str) -> str:
    if importlib.util.find_spec(name) is None:
        raise ModelFileNotFound(f"Python package {name!r} (pip install {install})", [])
    return f"{name} importable"


def _check(area: str, name: str, probe: Callable[[], str]) -> Check:
    try:
        return Check(area, name, True, probe())
    except ModelFileNotFound as missing:
        looked = f"; looked in {', '.join(map(str, missing.looked_in))}" if missing.looked_in else ""
        return Check(area, name, False, f"missing: {missing.what}{looked}")


def _compute_checks() -> list[Check]:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    checks = [
        Check("compute", "torch", True, f"torch {torch.__version__}"),
        Check(
            "compute", "GPUs", bool(gpus), ", ".join(gpus) if gpus else "none: every stage runs on the CPU"
        ),
    ]
    gsplat = importlib.util.find_spec("gsplat") is not None
    detail = (
        "gsplat on CUDA"
        if gpus and gsplat
        else "our PyTorch CPU backend (gsplat needs CUDA)"
        if gsplat
        else "our PyTorch CPU backend (gsplat not installed)"
    )
    checks.append(Check("compute", "Gaussian renderer", True, detail))
    return checks


def _ray_checks(address: str | None) -> list[Check]:
    import ray

    target = address or os.environ.get("RAY_ADDRESS")
    where = f"joins the cluster at {target}" if target else f"embedded local Ray with {os.cpu_count()} CPUs"
    return [Check("ray", "Ray", True, f"ray {ray.__version__}; distributed commands {where}")]


def _metric_checks(arcface_model: Path | None, fan_weights: Path | None) -> list[Check]:
    from geodiff4d.eval.fan_landmarks import find_fan_file
    from geodiff4d.eval.lpips_metric import backbone_candidates
    from geodiff4d.eval.model_files import (
        DLIB_RECOGNITION,
        FACENET_GRAPH,
        MEDIAPIPE_FACE_LANDMARKER,
        MTCNN_NETS,
        first_existing,
    )

    mtcnn = [(MTCNN_NETS[0], name) for name in MTCNN_NETS[1]]

    def arcface() -> str:
        if arcface_model is None:
            raise ModelFileNotFound("insightface ArcFace ONNX (pass --arcface-model DIR_OR_ONNX)", [])
        return str(
            first_existing("ArcFace ONNX", [arcface_model] + sorted(Path(arcface_model).glob("*.onnx")))
        )

    return [
        Check("metric", "psnr, ssim", True, "built in"),
        _check(
            "metric",
            "lpips (alex)",
            lambda: str(first_existing("LPIPS alex backbone", backbone_candidates("alex"))),
        ),
        _check(
            "metric",
            "lpips (vgg)",
            lambda: str(first_existing("LPIPS vgg backbone", backbone_candidates("vgg"))),
        ),
        _check("metric", "csim facenet", lambda: _packaged(FACENET_GRAPH, *mtcnn)),
        _check("metric", "csim dlib", lambda: _packaged(DLIB_RECOGNITION, DLIB_LANDMARKS_68)),
        _check("metric", "csim arcface", arcface),
        _check("metric", "akd dlib", lambda: _packaged(DLIB_LANDMARKS_68) + " (whole-pixel landmarks)"),
        _check(
            "metric",
            "akd fan",
            lambda: _module("face_alignment", "face-alignment") + "; " + str(find_fan_file(fan_weights)),
        ),
        _check(
            "metric",
            "aed mediapipe",
            lambda: _module("mediapipe", "mediapipe") + "; " + _packaged(MEDIAPIPE_FACE_LANDMARKER),
        ),
        _check("metric", "jod", lambda: _module("pycvvdp", "cvvdp") + " (ships its display calibration)"),
    ]


def _data_checks() -> list[Check]:
    return [
        _check("data", "video decode", lambda: _module("av", "av")),
        Check(
            "data",
            "real FLAME",
            True,
            "pass --flame FLAME2023.pkl for real NeRSemble tracking (the procedural head is built in)",
        ),
    ]


def run_checks(
    address: str | None = None, arcface_model: Path | None = None, fan_weights: Path | None = None
) -> list[Check]:
    return (
        _compute_checks() + _ray_checks(address) + _metric_checks(arcface_model, fan_weights) + _data_checks()
    )


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    return "\n".join(f"{'ok ' if c.ok else '-- '} {c.area:<8} {c.name:<{width}}  {c.detail}" for c in checks)
