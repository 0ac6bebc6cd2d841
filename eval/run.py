"""Distributed evaluation run: (method, subject, sequence) units on Ray actors, per-frame rows in Parquet.

``RUN/frames/{unit}.parquet`` holds one row per (camera, frame), ``RUN/videos/{unit}.parquet`` one row per
camera (JOD); ``RUN/commits`` marks finished units so a rerun skips them; ``RUN/run.json`` records the settings and
fingerprints of every input (a rerun with other settings or changed inputs is refused rather than mixing numbers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from geodiff4d.core.errors import WorkFailed
from geodiff4d.core.io.atomic import atomic_output
from geodiff4d.core.io.images import read_image, read_rgb8, to_float
from geodiff4d.core.io.json_yaml import read_json, write_json
from geodiff4d.core.jobs import CommitLog, JobReport, WorkUnit, run_units
from geodiff4d.core.runtime import connect
from geodiff4d.core.settings_match import refuse_differences, settings_differences
from geodiff4d.eval.fan_landmarks import find_fan_file
from geodiff4d.eval.inputs import (
    Clip,
    FolderSource,
    InputError,
    check_clips,
    discover_methods,
    match_cameras,
    open_ground_truth,
    sibling_tree,
    tree_fingerprint,
)
from geodiff4d.eval.lpips_metric import backbone_candidates
from geodiff4d.eval.normals import normal_error_deg, normal_root, read_normal_clip, resize_normals
from geodiff4d.eval.scoring import (
    ALPHA_METRICS,
    MetricModels,
    composite_on_background,
    composite_pair,
    resize_clip,
    score_clip,
)
from geodiff4d.eval.settings import (
    ALL_METRICS,
    COMPARABILITY_NOTE,
    FRAME_METRICS,
    MISS_COLUMNS,
    NORMAL_METRICS,
    PROTOCOL_METRICS,
    EvalSettings,
)

# Version of how frames are scored, recorded in run.json: rows scored under other rules are never mixed in.
# 2: face metrics scored on the frames whose reference has a face, a prediction without one scores the worst value.
# 3: --masked composites prediction and GT on one grey; frames with an empty GT foreground are not scored.
# 4: the cross protocol composites each head with its own alpha; identity images composited like the frames.
SCORING_RULES = 4


NO_FRAMES = "produced no frames"  # why a method is not covered, unless the caller says otherwise


class EvalError(WorkFailed, RuntimeError):
    """Some units failed; the message lists each with its error."""


def write_parquet_atomic(frame: pd.DataFrame, path: Path) -> None:
    with atomic_output(path) as tmp:
        frame.to_parquet(tmp, index=False)


def unit_id(method: str, subject: str, sequence: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{method}--{subject}--{sequence}")


def uses_alpha(settings: EvalSettings) -> bool:
    """Whether scores see alphas: compositing on a background, or masked metrics among those requested."""
    return settings.background is not None or bool(settings.masked and set(settings.metrics) & ALPHA_METRICS)


def read_identity(path: Path, background: float | None) -> np.ndarray:
    """The cross protocol's source identity image, uint8 RGB [H, W, 3], composited like the frames: with a
    background, on that grey with the image's own alpha (an RGBA PNG's fourth channel)."""
    if not path.is_file():
        raise InputError(f"identity image {path} does not exist (--identity DIR holds <subject>.png)")
    if background is None:
        return read_rgb8(path)
    image = read_image(path)
    if image.ndim != 3 or image.shape[2] != 4:
        raise InputError(
            f"{path}: compositing on a background needs the identity image's alpha (an RGBA PNG)"
        )
    rgb = image[..., :3] if image.dtype == np.uint8 else (image[..., :3] // 257).astype(np.uint8)
    alpha = to_float(image[..., 3])[None]  # [1, H, W]
    return composite_on_background(Clip(rgb[None], None, 0.0, str(path)), alpha, background).frames[0]


def check_cross_inputs(
    methods: dict[str, Path], units: list[WorkUnit], identity: Path | None, config: EvalSettings
) -> None:
    """Before Ray starts: each subject's identity image (with its alpha when compositing), and with alphas in use
    each method's own ``mask/`` tree beside its ``rgb/``, since the cross protocol never cuts a render with the
    driver's silhouette."""
    if config.protocol != "cross":
        return
    if "csim" in config.metrics:
        for subject in sorted({u.payload["subject"] for u in units}):
            read_identity(Path(identity) / f"{subject}.png", config.background)
    if uses_alpha(config):
        for name, root in methods.items():
            if sibling_tree(root, "mask") is None:
                raise InputError(
                    f"{name}: the cross protocol composites each head with its own alpha; no mask/ tree beside {root}"
                )


def _frame_rows(keys: dict, frames: np.ndarray, columns: dict[str, list[float]]) -> list[dict]:
    """One row per frame of a clip [T, H, W, 3]: keys, frame, size, each frame metric (NaN if none) and each
    face metric's miss flag."""
    height, width = frames.shape[1:3]
    return [
        {
            **keys,
            "frame": t,
            "width": width,
            "height": height,
            **{m: columns[m][t] if m in columns else np.nan for m in FRAME_METRICS},
            **{c: bool(columns[c][t]) if c in columns else False for c in MISS_COLUMNS},
        }
        for t in range(len(frames))
    ]


@dataclass
class EvalJob:
    """Scores one (method, subject, sequence) per unit; picklable, models load in ``setup`` on the actor."""

    methods: dict[str, str]
    gt: str
    out: str
    settings: EvalSettings
    gt_mask: str | None = None
    identity: str | None = None  # cross protocol: folder of <subject>.png source identity images
    fps: float = 25.0
    gt_normal: str | None = None  # ground-truth normal tree mirroring gt (normal_deg)

    def setup(self) -> None:
        self.models = MetricModels(self.settings)
        self.reference = open_ground_truth(self.gt, self.gt_mask, self.fps)

    def run(self, unit: WorkUnit) -> dict:
        """Score one (method, subject, sequence): per-frame and per-video rows written as Parquet."""
        method, subject, sequence = (unit.payload[k] for k in ("method", "subject", "sequence"))
        root = Path(self.methods[method])
        own_alpha = self.settings.protocol == "cross" and uses_alpha(self.settings)  # cross: the render's own
        pred_source = FolderSource(method, root, sibling_tree(root, "mask") if own_alpha else None, self.fps)
        where = f"{subject}/{sequence}"
        cams = match_cameras(
            method, pred_source.cameras(subject, sequence), self.reference.cameras(subject, sequence), where
        )
        identity = None
        if self.settings.protocol == "cross" and "csim" in self.settings.metrics:
            identity = read_identity(Path(self.identity) / f"{subject}.png", self.settings.background)
        frame_rows, video_rows = [], []
        for pred_cam, ref_cam in sorted(cams.items()):
            pred, ref = self.clips(pred_source, subject, sequence, pred_cam, ref_cam)
            columns, video_jod = score_clip(self.models, pred, ref, identity)
            if "normal_deg" in self.settings.metrics:
                columns["normal_deg"] = self.normal_errors(
                    method, subject, sequence, pred_cam, ref_cam, ref.masks
                )
            keys = {"method": method, "subject": subject, "sequence": sequence, "camera": pred_cam}
            frame_rows += _frame_rows(keys, pred.frames, columns)
            video_rows.append({**keys, "frames": len(pred.frames), "fps": ref.fps, "jod": video_jod})
        out = Path(self.out)
        write_parquet_atomic(pd.DataFrame(frame_rows), out / "frames" / f"{unit.id}.parquet")
        write_parquet_atomic(pd.DataFrame(video_rows), out / "videos" / f"{unit.id}.parquet")
        frames = pd.DataFrame(frame_rows)
        return {
            "frames": len(frames),
            "cameras": len(video_rows),
            **{
                f"{m}_misses": int(frames[f"{m}_miss"].sum())
                for m in ("csim", "akd", "aed")
                if m in self.settings.metrics
            },
        }

    def clips(
        self, pred_source: FolderSource, subject: str, sequence: str, pred_cam: str, ref_cam: str
    ) -> tuple[Clip, Clip]:
        """Predicted and reference clip of one camera at the scoring resolution, composited when asked."""
        where = f"{subject}/{sequence}"
        pred = resize_clip(pred_source.clip(subject, sequence, pred_cam), self.settings.resolution)
        ref = resize_clip(self.reference.clip(subject, sequence, ref_cam), self.settings.resolution)
        check_clips(pred_source.name, f"{where}/{pred_cam}", pred, ref)
        if self.settings.background is not None:  # every metric sees the same pixels: no backdrop advantage
            pred, ref = composite_pair(pred, ref, self.settings, self.settings.background)
        return pred, ref

    def normal_errors(
        self, method: str, subject: str, sequence: str, pred_cam: str, ref_cam: str, masks: np.ndarray | None
    ) -> list[float]:
        """Per-frame normal angular error; NaN for a method that wrote no normals (baselines, RGB-only peers)."""
        root = normal_root(self.methods[method])
        pred = None if root is None else read_normal_clip(root, subject, sequence, pred_cam)
        gt = read_normal_clip(Path(self.gt_normal), subject, sequence, ref_cam)
        if gt is None:
            raise InputError(
                f"no ground-truth normals in {Path(self.gt_normal) / subject / sequence / ref_cam}"
            )
        gt = resize_normals(gt, self.settings.resolution)
        if pred is None:
            return [np.nan] * len(gt)
        return normal_error_deg(resize_normals(pred, self.settings.resolution), gt, masks)


def plan_units(methods: dict[str, Path], reference, protocol: str) -> list[WorkUnit]:  # noqa: ANN001
    """One unit per (method, subject, sequence) the method predicted; each must exist in the reference."""
    available = set(reference.units())
    units = []
    for method, root in methods.items():
        pred_units = FolderSource(method, root).units()
        if not pred_units:
            raise InputError(f"{method}: no <subject>/<sequence> folders under {root}")
        for subject, sequence in pred_units:
            if (subject, sequence) not in available:
                what = "ground truth" if protocol == "self" else "driving frames"
                raise InputError(
                    f"{method}: {subject}/{sequence} has no {what} in {getattr(reference, 'root', '')}"
                )
            units.append(
                WorkUnit(
                    unit_id(method, subject, sequence),
                    {"method": method, "subject": subject, "sequence": sequence},
                )
            )
    check_unit_ids(units)
    return units


def check_unit_ids(units: list[WorkUnit]) -> None:
    """Refuse names that give two units one id (``unit_id`` maps "a b" and "a_b" alike): the second would
    silently reuse the first one's rows."""
    first: dict[str, dict] = {}
    for unit in units:
        other = first.setdefault(unit.id, unit.payload)
        if other is not unit.payload:
            names = [f"{p['method']}: {p['subject']}/{p['sequence']}" for p in (other, unit.payload)]
            raise InputError(
                f"{names[0]} and {names[1]} both become unit {unit.id!r}; rename one (unit ids keep letters, "
                "digits, '.', '_', '-' and separate the parts with '--')"
            )


def run_metadata(settings: EvalSettings) -> dict:
    """What every report needs to state: backends, resolution, masking, display, LPIPS availability."""
    meta = {
        "rules": SCORING_RULES,
        "settings": settings.to_dict(),
        "describe": settings.describe(),
        "note": COMPARABILITY_NOTE,
    }
    if "lpips" in settings.metrics:
        looked = backbone_candidates(settings.lpips_net, settings.lpips_checkpoint)
        found = [str(p) for p in looked if p.is_file()]
        meta["lpips"] = {
            "available": bool(found),
            "backbone": found[0] if found else None,
            "looked_in": [str(p) for p in looked],
        }
    return meta


def unit_fingerprint(root: Path, unit: WorkUnit) -> str:
    """A unit's predicted frames, and its alphas in the ``mask/`` tree beside them (the cross protocol's own)."""
    part = Path(unit.payload["subject"]) / unit.payload["sequence"]
    masks = sibling_tree(root, "mask")
    rgb = tree_fingerprint(root / part)
    return rgb if masks is None or not (masks / part).exists() else f"{rgb}+{tree_fingerprint(masks / part)}"


def input_fingerprints(
    methods: dict[str, Path],
    units: list[WorkUnit],
    gt: str | Path,
    gt_mask: str | Path | None,
    identity: str | Path | None,
    fps: float,
    gt_normal: str | Path | None = None,
) -> dict:
    """Digests of everything a score depends on besides the settings: ground truth, masks, identity images,
    fps, and each unit's predicted frames (per unit, so a method folder may grow while a benchmark runs)."""
    return {
        "ground_truth": tree_fingerprint(gt),
        "gt_mask": tree_fingerprint(gt_mask),
        "identity": tree_fingerprint(identity),
        "fps": fps,
        "gt_normal": tree_fingerprint(gt_normal),
        "units": {u.id: unit_fingerprint(methods[u.payload["method"]], u) for u in units},
    }


def not_covered_reasons(not_covered: tuple[str, ...] | dict[str, str]) -> dict[str, str]:
    """Method -> why it covers nothing: the caller's reasons, else "produced no frames"."""
    why = not_covered if isinstance(not_covered, dict) else dict.fromkeys(not_covered, NO_FRAMES)
    return dict(sorted(why.items()))


def frame_sources(methods: dict[str, Path], gt: str | Path, gt_mask: str | Path | None, fps: float) -> dict:
    """Where the scored frames are, recorded in run.json for the report's side-by-side strip (eval.strip)."""
    return {
        "gt": str(Path(gt).resolve()),
        "gt_mask": str(Path(gt_mask).resolve()) if gt_mask else None,
        "fps": fps,
        "methods": {name: str(Path(root).resolve()) for name, root in methods.items()},
    }


def _lpips_weights(meta: dict) -> tuple | None:
    """Whether LPIPS weights were found and which file: scores with and without them never mix."""
    found = meta.get("lpips")
    return None if found is None else (found["available"], found["backbone"])


def changed_inputs(previous: dict, current: dict, committed: CommitLog) -> list[str]:
    """What differs from the run's recorded inputs in a way that would mix stale scores with new ones, as
    ``field: stored -> now`` (nothing while no unit is committed: then there is nothing stale to mix). The
    settings, the shared inputs and the predictions of committed units count; a new unit does not."""
    if not any(committed.folder.glob(committed.marker("*").name)):
        return []
    scored = [unit for unit in current["inputs"]["units"] if committed.is_committed(unit)]

    def counted(meta: dict) -> dict:
        inputs = meta.get("inputs", {})
        shared = {k: inputs.get(k) for k in ("ground_truth", "gt_mask", "identity", "fps", "gt_normal")}
        units = {f"predictions of {unit}": inputs.get("units", {}).get(unit) for unit in scored}
        rules = {"scoring rules": meta.get("rules"), "LPIPS weights": _lpips_weights(meta)}
        return {"settings": meta.get("settings"), **rules, **shared, **units}

    return settings_differences(counted(previous), counted(current))


def _checked_settings(
    protocol: str,
    metrics: list[str] | None,
    gt_normal: str | Path | None,
    identity: str | Path | None,
    settings: dict[str, object],
) -> EvalSettings:
    """Settings with the protocol's default metrics, checked against the inputs they need."""
    default = [
        m
        for m in PROTOCOL_METRICS.get(protocol, ALL_METRICS)
        if gt_normal is not None or m not in NORMAL_METRICS
    ]
    config = EvalSettings(protocol=protocol, metrics=tuple(metrics or default), **settings)
    if set(config.metrics) & set(NORMAL_METRICS) and gt_normal is None:
        raise InputError("normal_deg needs the ground-truth normals: give --gt-normal, a tree mirroring --gt")
    if (
        "akd" in config.metrics and config.akd_backend == "fan"
    ):  # the file every actor loads, named in the report
        config = config.model_copy(update={"fan_weights": str(find_fan_file(config.fan_weights).resolve())})
    if protocol == "cross" and "csim" in config.metrics and identity is None:
        raise InputError(
            "the cross protocol's CSIM needs --identity, a folder of <subject>.png source images"
        )
    return config


def _check_masks(config: EvalSettings, reference: object, gt: str | Path) -> None:
    """Compositing and masked pixel metrics need ground-truth masks: refuse a frame tree given none."""
    needs_masks = uses_alpha(config)
    if needs_masks and isinstance(reference, FolderSource) and reference.mask_root is None:
        raise InputError(
            f"{'compositing on a background' if config.background is not None else 'masked metrics'} "
            f"needs ground-truth masks: give --gt-mask for {gt}"
        )


def _record_run(out: Path, meta: dict, committed: CommitLog) -> None:
    """Write run.json, refusing a rerun whose settings or inputs changed since units were scored."""
    meta_path = out / "run.json"
    if meta_path.is_file():
        previous = read_json(meta_path, InputError)
        refuse_differences(
            meta_path, changed_inputs(previous, meta, committed), InputError, "use a new --out folder"
        )
        meta["inputs"]["units"] = {**previous.get("inputs", {}).get("units", {}), **meta["inputs"]["units"]}
    write_json(meta_path, meta)


def evaluate(
    pred: str | Path | dict[str, str | Path],
    gt: str | Path,
    protocol: str = "self",
    out: str | Path = "eval_run",
    address: str | None = None,
    metrics: list[str] | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0,
    gt_mask: str | Path | None = None,
    identity: str | Path | None = None,
    fps: float = 25.0,
    progress: bool = True,
    gt_normal: str | Path | None = None,
    not_covered: tuple[str, ...] | dict[str, str] = (),
    **settings: object,
) -> JobReport:
    """Score every method under ``pred`` against ``gt``; resumes a run in ``out``; raises EvalError on failures.

    ``gt_normal`` is the ground-truth normal tree mirroring ``gt``: with it the default metrics include normal
    accuracy (``normal_deg``; a method's normals are the ``normal/`` tree beside its ``rgb/``). ``not_covered``
    names methods that produced no frames at all (or maps each to why): the board lists them as not covered.
    ``settings`` are :class:`EvalSettings` fields (csim_backend, akd_backend, lpips_net, masked, background,
    device, ...). All is checked before Ray starts; a rerun whose settings or inputs changed is refused."""
    config = _checked_settings(protocol, metrics, gt_normal, identity, settings)
    methods = discover_methods(pred)
    reference = open_ground_truth(gt, gt_mask, fps)
    _check_masks(config, reference, gt)
    units = plan_units(methods, reference, protocol)
    check_cross_inputs(methods, units, identity, config)
    out = Path(out)
    meta = run_metadata(config)
    meta["inputs"] = input_fingerprints(methods, units, gt, gt_mask, identity, fps, gt_normal)
    meta["sources"] = frame_sources(methods, gt, gt_mask, fps)
    meta["units"], meta["not_covered"] = sorted(u.id for u in units), not_covered_reasons(not_covered)
    committed = CommitLog(out / "commits")
    _record_run(out, meta, committed)
    job = EvalJob(
        {k: str(v) for k, v in methods.items()},
        str(gt),
        str(out),
        config,
        str(gt_mask) if gt_mask else None,
        str(identity) if identity else None,
        fps,
        str(gt_normal) if gt_normal else None,
    )
    connect(address)
    report = run_units(
        job,
        units,
        committed,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        desc="eval",
        progress=progress,
    )
    if not report.ok:
        raise EvalError(report.summary())
    return report


def load_run(run: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Per-frame rows, per-video rows and the run's metadata, for the units of the run's latest inputs only:
    units scored before but no longer among them go to ``meta["dropped_units"]``."""
    run = Path(run)
    meta_path = run / "run.json"
    if not meta_path.is_file():
        raise InputError(f"{run} is not an evaluation run (no run.json)")
    meta = read_json(meta_path, InputError)
    current = set(meta.get("units", []))
    frames = sorted((run / "frames").glob("*.parquet"))
    meta["dropped_units"] = sorted(p.stem for p in frames if p.stem not in current) if "units" in meta else []
    frames = [p for p in frames if p.stem not in meta["dropped_units"]]
    if not frames:
        raise InputError(
            f"{run}/frames has no Parquet files of its current units: the run has not finished any"
        )
    videos = [p for p in sorted((run / "videos").glob("*.parquet")) if p.stem not in meta["dropped_units"]]
    return (
        pd.concat([pd.read_parquet(p) for p in frames], ignore_index=True),
        pd.concat([pd.read_parquet(p) for p in videos], ignore_index=True),
        meta,
    )
