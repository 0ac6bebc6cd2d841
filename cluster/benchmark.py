"""``geodiff4d benchmark``: the paper's method end to end across subjects, beside baselines and peers.

One declarative config (cluster.benchmark_config) becomes a graph of committed stages (cluster.stage_graph):
data -> real frame folders -> (packed shards -> diffusion model) -> per method and subject: generated frames
-> avatar -> renders for every protocol -> one evaluation per protocol -> leaderboard. Every stage resumes
inside (Ray unit jobs) and is committed as a whole, so a killed run reruns only what was not committed.

Protocols (the avatar always sees only the training sequence):
- ``self``: NeRSemble's mono FLAME-avatar benchmark: the avatar is built from the train camera's view of the
  training sequence (the oracle: from every camera but the hold-outs); it is scored on the hold-out cameras
  for the held-out sequences, driven by their tracking.
- ``cross``: subject A's avatar driven by the next subject B's held-out sequence; CSIM against A's reference
  image, AKD/AED against B's frames at the same cameras.
- ``novel_views``: NeRSemble's NVS benchmark: the training sequence seen from its three hold-out cameras, by
  avatars of their own built from the NVS train cameras (the oracle: all 13; GeoDiff4D: ``nvs_train_camera``),
  since the NVS hold-outs include the mono train camera. A camera split (``SPLIT_OF``) names which cameras an
  avatar sees and which score it.
The run folder layout is documented in docs/formats.md (benchmark runs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray

from geodiff4d.cluster.benchmark_config import (
    MODEL_KINDS,
    VGM_NOT_COVERED,
    VGM_PROTOCOLS,
    BenchmarkConfig,
    MethodConfig,
    gen_config_mapping,
    method_config,
)
from geodiff4d.core.config import validate
from geodiff4d.core.errors import UserError
from geodiff4d.core.io.atomic import atomic_write_bytes
from geodiff4d.core.io.file_digest import files_digest, files_under
from geodiff4d.core.io.images import read_rgb8
from geodiff4d.core.io.json_yaml import read_yaml, write_json, write_yaml
from geodiff4d.core.jobs import CommitLog, JobReport, default_gpus_per_worker, worker_cpus
from geodiff4d.core.runtime import connect
from geodiff4d.core.settings_match import refuse_differences, settings_differences
from geodiff4d.core.stage_graph import GraphReport, StageGraph

PROTOCOL_EVAL = {"self": "self", "novel_views": "self", "cross": "cross"}  # benchmark -> eval protocol
SPLIT_OF = {"self": "mono", "cross": "mono", "novel_views": "nvs"}  # protocol -> the camera split it scores
SPLITS = ("mono", "nvs")
# generation's fields that say where its work runs, not what it makes: left out of the generated frames' key
RESOURCE_FIELDS = ("gpus_per_worker", "train_workers", "train_gpus_per_worker")


class BenchmarkError(UserError, ValueError):
    """A config or data problem found before the work starts; the message names the field or file."""


def digest(value: Any) -> str:
    """A short stable key for a config mapping: outputs of different settings never share a folder."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Layout:
    """Where each stage writes inside the run folder (docs/formats.md, benchmark runs)."""

    root: Path

    def __getattr__(self, name: str) -> Path:  # data, frames, identity, oracle_input, shards, state, ...
        if name.startswith("_"):
            raise AttributeError(name)
        return self.root / name

    def pred(self, protocol: str, method: str) -> Path:
        """A method's frames for one protocol, as a frame folder; its rgb/ is the tree evaluation scores."""
        return self.root / "pred" / protocol / method

    def gt(self, protocol: str) -> Path:
        return self.root / "gt" / protocol


@dataclass(frozen=True)
class Subject:
    id: str
    train_sequence: str
    test_sequences: tuple[str, ...]


class Benchmark:
    def __init__(
        self,
        config: BenchmarkConfig,
        out: str | Path,
        address: str | None = None,
        echo: Callable[[str], None] = print,
    ):
        self.config, self.layout, self.address, self.echo = config, Layout(Path(out).resolve()), address, echo
        self.commits = CommitLog(self.layout.state)
        self._locks_lock, self._generation_locks = threading.Lock(), dict[str, threading.Lock]()
        # a given run's sampling identity, read once: every key of one run names the same model state
        self._sampling_identities: dict[Path, dict[str, Any]] = {}
        self.parallel = 1  # stages run side by side (set by run)

    def stage_cpus(self, workers: int, gpus_per_worker: float | None = 0) -> float:
        """CPUs per worker of a per-subject stage's job: its share of the nodes beside the other stages the graph
        runs at once. Asking for a whole node made such stages wait for each other instead of running side by
        side (an avatar fit composites on one thread, so it gains little from a second CPU)."""
        return worker_cpus(self.parallel * workers, None, default_gpus_per_worker(gpus_per_worker))

    # -- inputs -----------------------------------------------------------------------------------------
    @property
    def data_root(self) -> Path:
        """The NeRSemble v2 folder everything reads: the user's, or the procedural one synthesized here."""
        nersemble = self.config.data.nersemble
        return Path(nersemble) if nersemble is not None else self.layout.data / "nersemble"

    def synthesize(self) -> dict:
        from geodiff4d.datasets.procedural import SynthSpec, synthesize

        p = self.config.data.procedural
        spec = SynthSpec(**p.model_dump(), cameras=16)
        report = synthesize(self.layout.data, spec, workers=2, address=self.address, progress=False)
        if not report.ok:
            raise RuntimeError(f"synth failed:\n{report.summary()}")
        return {"subjects": p.subjects}

    def check_procedural(self) -> None:
        """The config's subjects and sequence against what the procedural spec will write (before any work)."""
        from geodiff4d.datasets.procedural import SEQUENCE_NAMES, subject_id

        spec, c = self.config.data.procedural, self.config
        names, sequences = [subject_id(i) for i in range(spec.subjects)], SEQUENCE_NAMES[: spec.sequences]
        for field, chosen in (
            ("subjects", c.subjects),
            ("generation.train_subjects", c.generation.train_subjects),
        ):
            unknown = sorted(set(chosen or []) - set(names))
            if unknown:
                raise BenchmarkError(
                    f"{field}: {unknown} are not among the {spec.subjects} procedural subjects {names}"
                )
        if c.train_sequence is not None and c.train_sequence not in sequences:
            raise BenchmarkError(
                f"train_sequence: {c.train_sequence!r} is not a procedural sequence {list(sequences)}"
            )

    def subjects(self) -> list[Subject]:
        """The subjects to benchmark, checked against the data: every named subject, sequence and camera."""
        from geodiff4d.datasets.flame_tracking import find_tracking, missing_tracking_message
        from geodiff4d.datasets.nersemble import NersembleDataset, NersembleError

        try:
            dataset, c = NersembleDataset(self.data_root), self.config
        except NersembleError as error:
            raise BenchmarkError(f"data.nersemble: {error}") from error
        available, training = dataset.subjects(), c.generation.train_subjects or []
        chosen = c.subjects or [
            s for s in available if s not in training
        ]  # the training subjects are held out
        for field, names in (("subjects", chosen), ("generation.train_subjects", training)):
            missing = sorted(set(names) - set(available))
            if missing:
                raise BenchmarkError(f"{field}: {missing} not in {self.data_root} (has {available})")
        if "cross" in c.protocols and len(chosen) < 2:
            raise BenchmarkError("protocols: cross needs at least two subjects")
        subjects = []
        for subject in chosen:
            sequences = dataset.sequences(subject)
            train = c.train_sequence or sequences[0]
            if train not in sequences:
                raise BenchmarkError(f"train_sequence: {subject} has no sequence {train!r} (has {sequences})")
            tests = tuple(s for s in sequences if s != train)
            if ("self" in c.protocols or "cross" in c.protocols) and not tests:
                raise BenchmarkError(
                    f"protocols self/cross need a held-out sequence; {subject} has only {train!r}"
                )
            for sequence in (train, *tests):
                serials = set(dataset.sequence_serials(subject, sequence))
                wanted = {
                    c.train_camera,
                    *c.holdout_cameras,
                }  # the mono camera also gives the reference image
                wanted |= (
                    {self.split_cameras("nvs")[0], *self.split_cameras("nvs")[1]}
                    if "nvs" in self.splits()
                    else set()
                )
                absent = sorted(wanted - serials)
                if absent:
                    raise BenchmarkError(
                        f"{subject}/{sequence}: cameras {absent} (train_camera/holdout_cameras, "
                        "nvs_train_camera/nvs_holdout_cameras) not recorded"
                    )
            needs_tracking = any(m.kind in (*MODEL_KINDS, "oracle") for m in c.methods)
            for sequence in (train, *tests):
                folder = dataset.sequence_dir(subject, sequence)
                if needs_tracking and find_tracking(folder) is None:
                    raise BenchmarkError(
                        f"{missing_tracking_message(folder)}; the geodiff4d/vgm/oracle methods drive "
                        f"avatars and generation with it"
                    )
            subjects.append(Subject(subject, train, tests))
        return subjects

    # -- camera splits ------------------------------------------------------------------------------------
    def splits(self) -> list[str]:
        """The camera splits the config's protocols score, in ``SPLITS`` order."""
        return [split for split in SPLITS if any(SPLIT_OF[p] == split for p in self.config.protocols)]

    def split_cameras(self, split: str) -> tuple[str, list[str]]:
        """(GeoDiff4D's input camera, the hold-out cameras) of a split."""
        c = self.config
        return (
            (c.train_camera, c.holdout_cameras)
            if split == "mono"
            else (c.nvs_train_camera, c.nvs_holdout_cameras)
        )

    def split_protocols(self, split: str) -> list[str]:
        return [p for p in self.config.protocols if SPLIT_OF[p] == split]

    # -- stages: real frames and ground truth -------------------------------------------------------------
    def export_subject(self, subject: Subject) -> dict:
        """The subject's captures as a frame folder, its reference image, and the oracle's training input."""
        from geodiff4d.datasets.frame_folder import export_frame_folder

        frames = self.layout.frames
        export_frame_folder(self.data_root, frames, [subject.id])
        first = sorted(
            (frames / "rgb" / subject.id / subject.train_sequence / self.config.train_camera).glob("*.png")
        )[0]
        mask = frames / "mask" / subject.id / subject.train_sequence / self.config.train_camera / first.name
        _write_identity(self.layout.identity / f"{subject.id}.png", first, mask)
        for part in ("rgb", "mask", "normal"):  # the oracle sees the training sequence only
            _link(
                frames / part / subject.id / subject.train_sequence,
                self.layout.oracle_input / part / subject.id / subject.train_sequence,
            )
        for part, suffix in (("cameras", ".json"), ("tracking", ".npz")):
            name = f"{subject.train_sequence}{suffix}"
            _link(frames / part / subject.id / name, self.layout.oracle_input / part / subject.id / name)
        return {"reference": str(first)}

    def scored_units(self, protocol: str, subjects: list[Subject]) -> list[tuple[str, str, str, str]]:
        """(avatar subject, scored sequence name, data subject, data sequence) of one protocol."""
        units = []
        for i, subject in enumerate(subjects):
            if protocol == "self":
                units += [(subject.id, s, subject.id, s) for s in subject.test_sequences]
            elif protocol == "novel_views":
                units.append((subject.id, subject.train_sequence, subject.id, subject.train_sequence))
            else:  # cross: driven by the next subject's first held-out sequence
                driver = subjects[(i + 1) % len(subjects)]
                sequence = driver.test_sequences[0]
                units.append((subject.id, f"{driver.id}-{sequence}", driver.id, sequence))
        return units

    def ground_truth(self, protocol: str, subjects: list[Subject]) -> dict:
        """The protocol's scored frames (hold-out cameras) as links into the real frame folder."""
        root = self.layout.gt(protocol)
        parts = (
            ("rgb", "mask") if protocol == "cross" else ("rgb", "mask", "normal")
        )  # cross: another head's shape
        for subject, name, data_subject, sequence in self.scored_units(protocol, subjects):
            for part in parts:
                for camera in self.split_cameras(SPLIT_OF[protocol])[1]:
                    _link(
                        self.layout.frames / part / data_subject / sequence / camera,
                        root / part / subject / name / camera,
                    )
        return {"units": len(self.scored_units(protocol, subjects))}

    # -- stages: the diffusion model -------------------------------------------------------------------------
    def gen_mapping(self, method: MethodConfig) -> dict:
        return gen_config_mapping(method_config(self.config, method))

    def model_key(self, method: MethodConfig) -> str:
        variant = method_config(self.config, method)
        key = {"model": self.gen_mapping(method), "steps": variant.generation.train_steps}
        if variant.generation.train_subjects is not None:
            key["train_subjects"] = sorted(variant.generation.train_subjects)
        if variant.generation.train_workers != 1:  # each worker draws its own noise and batches
            key["train_workers"] = variant.generation.train_workers
        return digest(key)

    def model_resolution(self, method: MethodConfig) -> int:
        """The resolution ``method``'s model works at: its given run's, else its diffusion config's."""
        from geodiff4d.gen.model_run import run_config

        run = method_config(self.config, method).generation.run
        return (
            run_config(run).data.resolution
            if run is not None
            else self.gen_mapping(method)["data"]["resolution"]
        )

    def shards(self, method: MethodConfig, role: str) -> Path:
        """Packed data of ``method``'s resolution: what its model trains on (``role`` "train") or what generation
        reads the evaluated subjects' reference and driving frames from ("inputs"). With
        ``generation.train_subjects`` these are two packs, the training subjects (and SynthHuman) and every other
        subject, so no evaluated subject is ever seen in training; without it one pack of everything."""
        resolution = self.model_resolution(method)
        training = method_config(self.config, method).generation.train_subjects
        if training is None:
            return self.layout.shards / str(resolution)
        kind = "train" if role == "train" else "heldout"
        return self.layout.shards / f"{resolution}-{kind}-{digest(sorted(training))}"

    def pack(self, method: MethodConfig, role: str) -> dict:
        """Pack ``self.shards(method, role)``: everything (no ``generation.train_subjects``), else the training
        subjects with SynthHuman (role "train") or every subject but them ("inputs"), through a folder of links to
        those subjects."""
        from geodiff4d.datasets.packing import pack

        out, resolution = self.shards(method, role), self.model_resolution(method)
        subjects, synthhuman = self.packed_inputs(method, role)
        root = self.data_root
        if method_config(self.config, method).generation.train_subjects is not None:
            root = self.layout.subsets / out.name / "nersemble"
            for subject in subjects:
                _link(self.data_root / subject, root / subject)
        sources = [("nersemble", root)] + ([("synthhuman", synthhuman)] if synthhuman is not None else [])
        report = pack(out, sources, resolution=resolution, workers=2, address=self.address)
        if not report.ok:
            raise RuntimeError(f"pack failed:\n{report.summary()}")
        return {"resolution": resolution}

    def packed_inputs(self, method: MethodConfig, role: str) -> tuple[list[str], Path | None]:
        """What ``pack(method, role)`` reads: the NeRSemble subjects (all without ``generation.train_subjects``,
        else the training ones for role "train" and the others for "inputs") and the SynthHuman folder, if any."""
        from geodiff4d.datasets.nersemble import NersembleDataset

        training = method_config(self.config, method).generation.train_subjects
        subjects = NersembleDataset(self.data_root).subjects()
        if training is not None:
            subjects = [s for s in subjects if (s in training) == (role == "train")]
        synthhuman = self.layout.data / "synthhuman"
        use_synthhuman = (training is None or role == "train") and synthhuman.is_dir()
        return subjects, synthhuman if use_synthhuman else None

    def packed_files_digest(self, method: MethodConfig, role: str) -> str:
        """Digest of the files a pack reads (core.io.file_digest): a re-download, a new tracking or calibration
        file under the same root makes the pack stage run again into a fresh folder."""
        subjects, synthhuman = self.packed_inputs(method, role)
        folders = [self.data_root / s for s in subjects] + ([synthhuman] if synthhuman is not None else [])
        return files_digest(path for folder in folders for path in files_under(folder))

    def subject_files_digest(self, subject: Subject) -> str:
        """Digest of the subject's capture files (calibration, every sequence) that its frame export reads."""
        return files_digest(files_under(self.data_root / subject.id))

    def train_model(self, method: MethodConfig) -> dict:
        from geodiff4d.gen.checkpoint import latest_checkpoint
        from geodiff4d.gen.train import train

        variant = method_config(self.config, method)
        folder = self.layout.models / self.model_key(method)
        config_path = folder / "config.yaml"
        write_yaml(config_path, self.gen_mapping(method))
        shards = self.shards(method, "train")
        steps = variant.generation.train_steps
        for stage in (1, 2):
            run = folder / f"stage{stage}"
            train(
                config_path,
                stage,
                shards,
                run,
                max_steps=steps[stage],
                init=folder / "stage1" if stage == 2 else None,
                resume=latest_checkpoint(run) is not None,
                workers=variant.generation.train_workers,
                gpus_per_worker=variant.generation.train_gpus_per_worker,
                address=self.address,
                quiet=True,
            )
        return {"run": str(folder / "stage2")}

    def model_run(self, method: MethodConfig) -> Path:
        """The trained run folder (stage 2; self-contained) that ``method`` samples from."""
        variant = method_config(self.config, method)
        if variant.generation.run is not None:
            return Path(variant.generation.run)
        return self.layout.models / self.model_key(method) / "stage2"

    def sampled_model(self, method: MethodConfig) -> dict[str, Any]:
        """The model ``method`` samples, as the folders of its samples are keyed: its run folder, whose path holds
        the training config of a run trained here; a run made elsewhere (``generation.run``) can change in place
        under the same path, so its weights and sample settings count too (a rerun after they changed samples
        again instead of keeping the old frames)."""
        from geodiff4d.gen.generate import sampling_identity

        run = self.model_run(method)
        if method_config(self.config, method).generation.run is None:
            return {"model": str(run)}
        if run not in self._sampling_identities:
            self._sampling_identities[run] = sampling_identity(run)
        return {"model": str(run), "sampling": self._sampling_identities[run]}

    def generation_key(self, method: MethodConfig, split: str = "mono") -> str:
        variant = method_config(self.config, method)
        generation = variant.generation.model_dump(
            mode="json", exclude={"train_subjects", *RESOURCE_FIELDS}
        )  # in the model's key, or resources
        return digest({**self.sampled_model(method), "generation": generation, **_split_key(split)})

    def generate(
        self, method: MethodConfig, subjects: list[Subject], split: str = "mono"
    ) -> tuple[dict, JobReport]:
        """Multi-view image+normal frames of each subject's training sequence from its reference image, by one
        ``geodiff4d generate`` over all ``subjects`` (its spec written into the run), so each actor loads the model
        once for all of them: the reference is the split's input camera's first frame and the driving its video,
        as packed; the identity and head motion come from the sequence's tracking; the views are the split's
        training views."""
        from geodiff4d.gen.generate import generate

        c, out = (
            method_config(self.config, method).generation,
            self.layout.generated / self.generation_key(method, split),
        )
        entries = [self.generate_entry(method, subject, split) for subject in subjects]
        spec = out / "specs" / f"{digest([s.id for s in subjects])}.yaml"
        write_yaml(spec, {"run": str(self.model_run(method)), "seed": c.seed, "subjects": entries})
        report = generate(
            spec,
            out,
            workers=c.workers,
            gpus_per_worker=c.gpus_per_worker,
            address=self.address,
            progress=False,
        )
        stats = {e["name"]: {"frames": e["frames"], "views": len(e["cameras"]["serials"])} for e in entries}
        return stats, report

    def generate_entry(self, method: MethodConfig, subject: Subject, split: str = "mono") -> dict:
        """The subject's entry of a generate spec."""
        c, frames = method_config(self.config, method).generation, self.layout.frames
        camera = self.split_cameras(split)[0]
        tracking = frames / "tracking" / subject.id / f"{subject.train_sequence}.npz"
        packed = {
            "shards": str(self.shards(method, "inputs")),
            "subject": subject.id,
            "sequence": subject.train_sequence,
            "camera": camera,
        }
        input_view = frames / "rgb" / subject.id / subject.train_sequence / camera
        return {
            "name": subject.id,
            "sequence": subject.train_sequence,
            "reference": {**packed, "frame": 0},
            "identity": {"tracking": str(tracking)},
            "cameras": {
                "cameras_json": str(frames / "cameras" / subject.id / f"{subject.train_sequence}.json"),
                "serials": c.views or self.training_views(subject, split),
            },
            "driving": packed,
            "frames": c.frames or len(list(input_view.glob("*.png"))),
        }

    def generate_stage(
        self, method: MethodConfig, subject: Subject, subjects: list[Subject], split: str = "mono"
    ) -> dict:
        """One subject's generation stage: the first such stage of a model to run generates every subject whose
        frames are exported, in one run (one model load per actor); the others wait for it (a lock per generation
        key) and then find their units committed. It fails only when units of its own subject failed."""
        key = self.generation_key(method, split)
        with self._locks_lock:
            lock = self._generation_locks.setdefault(key, threading.Lock())
        ready = [s for s in subjects if s.id == subject.id or self.commits.is_committed(f"frames:{s.id}")]
        with lock:
            stats, report = self.generate(method, ready, split)
        failed = sorted(
            f"{unit}: {error}" for unit, error in report.failed.items() if unit.split(".")[0] == subject.id
        )
        if failed:  # another subject's failures fail that subject's stage only
            raise RuntimeError("generate failed:\n" + "\n".join(failed))
        return stats[subject.id]

    def vgm_folder(self, method: MethodConfig) -> Path:
        """Where a vgm method's samples go: keyed by the model it samples and its seed (shared by vgm methods
        that only differ elsewhere)."""
        variant = method_config(self.config, method)
        return (
            self.layout.generated
            / f"vgm-{digest({**self.sampled_model(method), 'seed': variant.generation.seed})}"
        )

    def vgm_protocols(self) -> list[str]:
        return [p for p in self.config.protocols if p in VGM_PROTOCOLS]

    def vgm_entry(
        self,
        method: MethodConfig,
        subject: Subject,
        unit: tuple[str, str, str, str],
        protocol: str,
        name: str,
    ) -> dict:
        """The generate spec entry ``name`` of one scored unit of ``protocol`` (avatar subject, scored name, data
        subject, data sequence): the reference and identity as :meth:`generate` takes them, the data sequence's
        hold-out cameras and tracking, as many frames as the unit's ground truth."""
        avatar, scored, data_subject, sequence = unit
        frames, train = self.layout.frames, subject.train_sequence
        truth = self.layout.gt(protocol) / "rgb" / avatar / scored
        return {
            "name": name,
            "sequence": scored,
            "reference": {
                "shards": str(self.shards(method, "inputs")),
                "subject": avatar,
                "sequence": train,
                "camera": self.config.train_camera,
                "frame": 0,
            },
            "identity": {"tracking": str(frames / "tracking" / avatar / f"{train}.npz")},
            "cameras": {
                "cameras_json": str(frames / "cameras" / data_subject / f"{sequence}.json"),
                "serials": list(self.config.holdout_cameras),
            },
            "driving": {"tracking": str(frames / "tracking" / data_subject / f"{sequence}.npz")},
            "frames": len(list((truth / self.config.holdout_cameras[0]).glob("*.png"))),
        }

    def generate_vgm(self, method: MethodConfig, subject: Subject, subjects: list[Subject]) -> dict:
        """The diffusion model's own frames of every self/cross unit of ``subject``, at the hold-out cameras:
        one ``geodiff4d generate`` over all of them (each actor loads the model once per avatar, not once per
        unit) from the subject's reference (as :meth:`generate`), each driven by its unit's tracking, then warped
        into the full hold-out images (grey 0.5 outside the crop) as the method's predictions.

        Entries are named ``{subject}_{protocol}_{k}`` (its k-th unit of the protocol): generate's names must be
        unique and seed the noise, and a unit's own name (a sequence such as ``EMO-1-shout+laugh``) is its entry's
        sequence."""
        from geodiff4d.cluster.vgm import place_frames
        from geodiff4d.eval.settings import MASKED_BACKGROUND
        from geodiff4d.gen.generate import generate

        c, out = method_config(self.config, method).generation, self.vgm_folder(method) / subject.id
        units, entries = [], []
        for protocol in self.vgm_protocols():
            own = [unit for unit in self.scored_units(protocol, subjects) if unit[0] == subject.id]
            for k, unit in enumerate(own):
                entries.append(
                    self.vgm_entry(method, subject, unit, protocol, f"{subject.id}_{protocol}_{k}")
                )
                units.append((protocol, unit))
        if not entries:
            return {"frames": 0}
        write_yaml(
            out / "spec.yaml", {"run": str(self.model_run(method)), "seed": c.seed, "subjects": entries}
        )
        report = generate(
            out / "spec.yaml",
            out,
            workers=c.workers,
            gpus_per_worker=c.gpus_per_worker,
            cpus_per_worker=self.stage_cpus(c.workers, c.gpus_per_worker),
            address=self.address,
            progress=False,
        )
        if not report.ok:
            raise RuntimeError(f"generate (vgm) failed:\n{report.summary()}")
        written = 0
        for entry, (protocol, (avatar, name, data_subject, sequence)) in zip(entries, units, strict=True):
            written += place_frames(
                out,
                entry["name"],
                name,
                self.layout.frames / "cameras" / data_subject / f"{sequence}.json",
                self.layout.gt(protocol) / "rgb" / avatar / name,
                self.layout.pred(protocol, method.name) / "rgb" / avatar / name,
                round(255 * MASKED_BACKGROUND),
            )
        return {"frames": written}

    def clean_vgm(self, method: MethodConfig, subject: Subject) -> None:
        """A vgm method's samples and predictions of one avatar subject, and their scores."""
        shutil.rmtree(self.vgm_folder(method) / subject.id, ignore_errors=True)
        self.clean_predictions(method, subject)

    def training_views(self, subject: Subject, split: str = "mono") -> list[str]:
        """Every camera of the training sequence but the split's hold-outs (the NVS split: its 13 train cameras)."""
        from geodiff4d.datasets.frame_folder import read_cameras

        cameras = read_cameras(self.layout.frames / "cameras" / subject.id / f"{subject.train_sequence}.json")
        return sorted(set(cameras) - set(self.split_cameras(split)[1]))

    # -- stages: avatars and their renders -------------------------------------------------------------------
    def recon_input(self, method: MethodConfig, split: str = "mono") -> Path:
        return (
            self.layout.generated / self.generation_key(method, split)
            if method.kind == "geodiff4d"
            else self.layout.oracle_input
        )

    def avatar_folder(self, method: MethodConfig, split: str = "mono") -> Path:
        variant = method_config(self.config, method)
        return self.layout.avatars / digest(
            {
                "input": str(self.recon_input(method, split)),
                "recon": variant.recon,
                "kind": method.kind,
                **_split_key(split),
            }
        )

    def reconstruct(self, method: MethodConfig, subject: Subject, split: str = "mono") -> dict:
        from geodiff4d.recon.run import recon_config_from_mapping, reconstruct

        settings = recon_config_from_mapping(
            method_config(self.config, method).recon, f"methods[{method.name}].recon"
        )
        if method.kind == "oracle" and settings.train_cameras is None:  # the real views, hold-outs excepted
            settings = settings.model_copy(update={"train_cameras": self.training_views(subject, split)})
        report = reconstruct(
            self.recon_input(method, split),
            self.avatar_folder(method, split),
            [subject.id],
            workers=1,
            cpus_per_worker=self.stage_cpus(1),
            address=self.address,
            config=settings,
            progress=False,
        )
        if not report.ok:
            raise RuntimeError(f"recon failed:\n{report.summary()}")
        return {"avatar": str(self.avatar_folder(method, split) / subject.id)}

    def render(
        self, method: MethodConfig, subject: Subject, subjects: list[Subject], split: str = "mono"
    ) -> dict:
        """The split's avatar driven by every scored unit's tracking, seen from the split's hold-out cameras."""
        from geodiff4d.datasets.frame_folder import read_cameras, write_cameras
        from geodiff4d.recon.run import render_avatar

        avatar, frames, renders = self.avatar_folder(method, split) / subject.id, self.layout.frames, []
        holdouts = self.split_cameras(split)[1]
        render_task = ray.remote(num_cpus=1)(render_avatar)  # on the cluster, not in the driver
        for protocol in self.split_protocols(split):
            for avatar_subject, name, data_subject, sequence in self.scored_units(protocol, subjects):
                if avatar_subject != subject.id:
                    continue
                cameras = read_cameras(frames / "cameras" / data_subject / f"{sequence}.json")
                held_out = self.layout.root / "holdout_cameras" / split / data_subject / f"{sequence}.json"
                write_cameras(held_out, {s: cameras[s] for s in holdouts})
                renders.append(
                    render_task.remote(
                        avatar,
                        held_out,
                        frames / "tracking" / data_subject / f"{sequence}.npz",
                        self.layout.pred(protocol, method.name),
                        sequence=name,
                    )
                )
        fps = ray.get(renders)
        return {"sequences": len(renders), "frames_per_second": round(float(np.mean(fps)), 2)}

    def baseline(self, method: MethodConfig, subjects: list[Subject]) -> dict:
        """reference_copy (every frame = the subject's reference image) or gt_noise, for every protocol."""
        from geodiff4d.eval.baselines import gt_noise, reference_copy
        from geodiff4d.eval.inputs import open_ground_truth

        for protocol in self.config.protocols:
            gt = open_ground_truth(self.layout.gt(protocol) / "rgb")
            out = self.layout.pred(protocol, method.name) / "rgb"
            if method.kind == "gt_noise":
                gt_noise(gt, out, seed=self.config.seed)
            else:
                reference_copy(gt, out, self.split_references(SPLIT_OF[protocol], subjects))
        return {}

    def split_references(self, split: str, subjects: list[Subject]) -> dict[str, np.ndarray]:
        """Each subject's reference image as GeoDiff4D gets it in ``split``: its input camera's first frame of the
        training sequence (the mono split's is the identity image; the NVS split's input camera differs, since
        the NVS hold-outs include the mono train camera)."""
        if split == "mono":
            return {path.stem: read_rgb8(path) for path in self.layout.identity.glob("*.png")}
        camera, frames = self.split_cameras(split)[0], self.layout.frames
        return {
            s.id: read_rgb8(sorted((frames / "rgb" / s.id / s.train_sequence / camera).glob("*.png"))[0])
            for s in subjects
        }

    # -- stages: evaluation -------------------------------------------------------------------------------
    def method_tree(self, protocol: str, method: MethodConfig) -> Path:
        if method.kind == "external":
            return Path(method.path) / protocol
        return self.layout.pred(protocol, method.name) / "rgb"

    def data_fps(self, protocol: str, subjects: list[Subject]) -> float:
        """The frame rate of the data sequences ``protocol`` scores (JOD runs at it); they must agree."""
        from geodiff4d.datasets.nersemble import NersembleDataset

        dataset = NersembleDataset(self.data_root)
        rates = {f"{s}/{q}": dataset.fps(s, q) for _, _, s, q in self.scored_units(protocol, subjects)}
        if max(rates.values()) - min(rates.values()) > 1e-3:
            raise BenchmarkError(f"[eval:{protocol}] scored sequences at different frame rates: {rates}")
        return next(iter(rates.values()))

    def evaluate(self, protocol: str, subjects: list[Subject]) -> dict:
        from geodiff4d.eval.run import NO_FRAMES, evaluate

        methods = {m.name: self.method_tree(protocol, m) for m in self.config.methods}
        present = {name: path for name, path in methods.items() if path.is_dir() and any(path.iterdir())}
        absent = {
            m.name: VGM_NOT_COVERED if m.kind == "vgm" and protocol not in VGM_PROTOCOLS else NO_FRAMES
            for m in self.config.methods
            if m.name not in present
        }
        if absent:
            self.echo(
                f"[eval:{protocol}] no frames at all from {sorted(absent)}; the leaderboard lists them as not "
                f"covered"
            )
        metrics = self.config.eval.metrics_of(protocol)
        # cross: each head as rendered; the GT alpha is the driver's, another head's silhouette
        own_alpha = PROTOCOL_EVAL[protocol] != "cross"
        gt_normal = self.layout.gt(protocol) / "normal"
        report = evaluate(
            present,
            self.layout.gt(protocol) / "rgb",
            PROTOCOL_EVAL[protocol],
            self.layout.eval / protocol,
            self.address,
            metrics=metrics,
            workers=self.config.eval.workers,
            gpus_per_worker=self.config.eval.gpus_per_worker,
            device="cuda" if self.config.eval.gpus_per_worker else "cpu",
            gt_mask=self.layout.gt(protocol) / "mask",
            identity=self.layout.identity,
            masked=self.config.eval.masked and own_alpha,
            resolution=self.config.eval.resolution,
            background=self.config.eval.background if own_alpha else None,
            gt_normal=gt_normal if gt_normal.is_dir() else None,
            not_covered=absent,
            fps=self.data_fps(protocol, subjects),
            progress=False,
        )
        return {"units": len(report.completed) + len(report.skipped)}

    def leaderboard(self) -> dict:
        from geodiff4d.eval.leaderboard import build_leaderboard

        runs = {
            p: self.layout.eval / p
            for p in self.config.protocols
            if (self.layout.eval / p / "run.json").is_file()
        }
        files = build_leaderboard(runs, self.layout.leaderboard, seed=self.config.seed)
        return {kind: str(path) for kind, path in files.items()}

    def ablations(self) -> dict:
        from geodiff4d.eval.ablation import write_ablation_report

        a = self.config.ablation
        runs = {
            p: self.layout.eval / p
            for p in self.config.protocols
            if (self.layout.eval / p / "run.json").is_file()
        }
        files = write_ablation_report(
            runs, self.layout.ablations, a.full, a.rows, self.config.seed, tuple(a.seed_replicates)
        )
        return {kind: str(path) for kind, path in files.items()}

    # -- recomputing one variant -------------------------------------------------------------------------
    def forget_scores(self, method: MethodConfig, subject: str | None = None) -> None:
        """Drop the evaluation units of ``method`` (one avatar subject, or all) before its frames are redone, so
        that evaluation scores them again instead of refusing changed predictions."""
        from geodiff4d.eval.run import unit_id

        prefix = (
            unit_id(method.name, subject, "") if subject else unit_id(method.name, "", "")[:-2]
        )  # "m--s--", "m--"
        for protocol in self.config.protocols:
            root = self.layout.eval / protocol
            for unit in (root / "commits").glob(f"{prefix}*.stats.json"):
                name = unit.name.removesuffix(".stats.json")
                for path in (unit, root / "frames" / f"{name}.parquet", root / "videos" / f"{name}.parquet"):
                    path.unlink(missing_ok=True)

    def clean_subject_frames(self, subject: Subject) -> None:
        """A subject's exported frames and reference image, before a re-export from changed captures (a camera or
        frame gone from them must not stay behind)."""
        for part in ("rgb", "mask", "normal", "cameras", "tracking"):
            shutil.rmtree(self.layout.frames / part / subject.id, ignore_errors=True)
        (self.layout.identity / f"{subject.id}.png").unlink(missing_ok=True)

    def clean_generated(self, method: MethodConfig, subject: Subject, split: str = "mono") -> None:
        from geodiff4d.datasets.frame_tars import TARS
        from geodiff4d.gen.generate import STATE

        out = self.layout.generated / self.generation_key(method, split)
        for kind in ("rgb", "normal", "mask", TARS):
            shutil.rmtree(out / kind / subject.id, ignore_errors=True)
        for marker in (out / STATE / "commits").glob(f"{subject.id}.*"):
            marker.unlink()

    def clean_avatar(self, method: MethodConfig, subject: Subject, split: str = "mono") -> None:
        folder = self.avatar_folder(method, split)
        shutil.rmtree(folder / subject.id, ignore_errors=True)
        for marker in (folder / "_commits").glob(f"{subject.id}.*"):
            marker.unlink()

    def clean_predictions(
        self, method: MethodConfig, subject: Subject | None = None, split: str | None = None
    ) -> None:
        """A method's rendered frames (one avatar subject's, or all; one split's protocols, or all) and their
        scores."""
        for protocol in self.split_protocols(split) if split else self.config.protocols:
            root = self.layout.pred(protocol, method.name)
            for part in ("rgb", "mask", "normal") if subject else ("",):
                shutil.rmtree(root / part / subject.id if subject else root, ignore_errors=True)
        self.forget_scores(method, subject.id if subject else None)

    def variant_outputs(self, method: MethodConfig) -> dict[str, str]:
        """The folders a method's results live in (``variants.json``): delete them to recompute that method."""
        out: dict[str, str] = {"predictions": str(self.layout.root / "pred" / "*" / method.name)}
        for split in self.splits():
            suffix = "" if split == "mono" else f"_{split}"
            if method.kind in ("geodiff4d", "oracle"):
                out[f"avatars{suffix}"] = str(self.avatar_folder(method, split))
            if method.kind == "geodiff4d":
                out[f"generated{suffix}"] = str(self.layout.generated / self.generation_key(method, split))
        if method.kind == "vgm":
            out["generated"] = str(self.vgm_folder(method))
        if method.kind in MODEL_KINDS:
            given = method_config(
                self.config, method
            ).generation.run  # else the folder of both training stages
            out["model"] = str(given if given is not None else self.model_run(method).parent)
        return out

    # -- the graph ----------------------------------------------------------------------------------------
    def graph(self, subjects: list[Subject]) -> StageGraph:
        """Every stage with the outputs whose absence reruns it (and what then goes stale: see StageGraph)."""
        graph = StageGraph(self.commits, self.echo)
        frames, truth = self._add_data_stages(graph, subjects)
        trained, models = self._add_training_stages(graph)
        produced: list[str] = []
        for method in self.config.methods:
            produced += self._add_method_stages(graph, method, subjects, frames, truth, trained, models)
        self._add_scoring_stages(graph, subjects, truth, produced)
        return graph

    def _add_data_stages(
        self, graph: StageGraph, subjects: list[Subject]
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Frame export per subject and ground truth per protocol: their stage names by subject / protocol."""
        layout = self.layout
        frames = {
            s.id: graph.add(
                f"frames:{s.id}",
                lambda s=s: self.export_subject(s),
                outputs=[layout.frames / "rgb" / s.id],
                clean=lambda s=s: self.clean_subject_frames(s),
                inputs=lambda s=s: self.subject_files_digest(s),
            )
            for s in subjects
        }
        truth = {
            p: graph.add(
                f"gt:{p}",
                lambda p=p: self.ground_truth(p, subjects),
                needs=list(frames.values()),
                outputs=[layout.gt(p) / "rgb"],
            )
            for p in self.config.protocols
        }
        return frames, truth

    def _add_training_stages(self, graph: StageGraph) -> tuple[dict[str, list[str]], list[str]]:
        """Packs and training of the GeoDiff4D methods: per method [model stage, pack], and the model stages."""
        trained: dict[str, list[str]] = {}
        models: list[str] = []
        for method in self.config.methods:
            if method.kind not in MODEL_KINDS:
                continue
            # generation reads its reference and driving frames from the "inputs" pack, also with a given run
            given = method_config(self.config, method).generation.run is not None
            packs = []
            for role in (
                ("inputs",) if given else ("train", "inputs")
            ):  # one pack for both without train_subjects
                folder = self.shards(method, role)
                packs.append(f"pack:{folder.name}")
                if packs[-1] not in graph.stages:
                    # changed inputs: packed again into a fresh folder (a pack refuses to resume over them)
                    graph.add(
                        packs[-1],
                        lambda m=method, r=role: self.pack(m, r),
                        outputs=[folder],
                        clean=lambda f=folder: shutil.rmtree(f, ignore_errors=True),
                        inputs=lambda m=method, r=role: self.packed_files_digest(m, r),
                    )
            if given:
                trained[method.name] = packs
                continue
            model = f"model:{self.model_key(method)}"
            if model not in graph.stages:
                run = self.model_run(method)
                graph.add(
                    model,
                    lambda m=method: self.train_model(m),
                    needs=packs[:1],
                    outputs=[run],
                    clean=lambda f=run.parent: shutil.rmtree(f, ignore_errors=True),
                )
                models.append(model)
            trained[method.name] = [model, packs[-1]]
        return trained, models

    def _add_method_stages(
        self,
        graph: StageGraph,
        method: MethodConfig,
        subjects: list[Subject],
        frames: dict[str, str],
        truth: dict[str, str],
        trained: dict[str, list[str]],
        models: list[str],
    ) -> list[str]:
        """The stages that produce a method's predictions (none for external ones); returns the final ones."""
        layout, protocols = self.layout, self.config.protocols
        if method.kind in ("reference_copy", "gt_noise"):
            baseline = graph.add(
                f"baseline:{method.name}",
                lambda m=method: self.baseline(m, subjects),
                needs=list(truth.values()),
                outputs=[layout.pred(p, method.name) / "rgb" for p in protocols],
                clean=lambda m=method: self.clean_predictions(m),
            )
            return [baseline]
        if method.kind == "external":
            return []
        if method.kind == "vgm":
            return self._add_vgm_stages(graph, method, subjects, frames, truth, trained)
        produced = []
        for subject in subjects:
            for split in self.splits():
                avatar = self._add_avatar_stage(
                    graph, method, subject, subjects, split, frames, trained, models
                )
                drivers = [frames[s.id] for s in subjects]
                name = f"render:{method.name}:{subject.id}" + ("" if split == "mono" else f":{split}")
                produced.append(
                    graph.add(
                        name,
                        lambda m=method, s=subject, v=split: self.render(m, s, subjects, v),
                        needs=[avatar, *drivers],
                        outputs=[
                            layout.pred(p, method.name) / "rgb" / subject.id
                            for p in self.split_protocols(split)
                        ],
                        clean=lambda m=method, s=subject, v=split: self.clean_predictions(m, s, v),
                    )
                )
        return produced

    def _add_vgm_stages(
        self,
        graph: StageGraph,
        method: MethodConfig,
        subjects: list[Subject],
        frames: dict[str, str],
        truth: dict[str, str],
        trained: dict[str, list[str]],
    ) -> list[str]:
        """Per subject one stage sampling its self/cross units (after its own and every driver's frames)."""
        protocols = self.vgm_protocols()
        needs = [*frames.values(), *trained[method.name], *(truth[p] for p in protocols)]
        return [
            graph.add(
                f"vgm:{method.name}:{subject.id}",
                lambda m=method, s=subject: self.generate_vgm(m, s, subjects),
                needs=needs,
                outputs=[self.layout.pred(p, method.name) / "rgb" / subject.id for p in protocols],
                clean=lambda m=method, s=subject: self.clean_vgm(m, s),
            )
            for subject in subjects
        ]

    def _add_avatar_stage(
        self,
        graph: StageGraph,
        method: MethodConfig,
        subject: Subject,
        subjects: list[Subject],
        split: str,
        frames: dict[str, str],
        trained: dict[str, list[str]],
        models: list[str],
    ) -> str:
        """The avatar stage of one subject and camera split (after its generation for GeoDiff4D): its name."""
        chain = [frames[subject.id], *trained.get(method.name, [])]
        if method.kind == "geodiff4d":
            chain = [self._add_generate_stage(graph, method, subject, subjects, chain, frames, split)]
        folder = self.avatar_folder(method, split)
        avatar = f"avatar:{folder.name}:{subject.id}"
        if avatar not in graph.stages:
            # reconstructions from real frames wait for training: training asks Ray for whole workers'
            # CPUs and would otherwise wait behind them; afterwards they run beside generation
            graph.add(
                avatar,
                lambda m=method, s=subject, v=split: self.reconstruct(m, s, v),
                needs=chain,
                outputs=[folder / subject.id],
                clean=lambda m=method, s=subject, v=split: self.clean_avatar(m, s, v),
                waits_for=models if method.kind != "geodiff4d" else [],
            )
        return avatar

    def _add_generate_stage(
        self,
        graph: StageGraph,
        method: MethodConfig,
        subject: Subject,
        subjects: list[Subject],
        needs: list[str],
        frames: dict[str, str],
        split: str = "mono",
    ) -> str:
        """The generation stage of one subject and split (shared by methods with the same generation key): its
        name. It starts once every subject's frames are exported, so that one generate run covers them all; it
        reruns only with its own subject's inputs."""
        key = self.generation_key(method, split)
        generated = f"generate:{key}:{subject.id}"
        out = self.layout.generated / key / "rgb" / subject.id
        if generated not in graph.stages:
            graph.add(
                generated,
                lambda m=method, s=subject, v=split: self.generate_stage(m, s, subjects, v),
                needs=needs,
                waits_for=[stage for name, stage in frames.items() if name != subject.id],
                outputs=[out],
                clean=lambda m=method, s=subject, v=split: self.clean_generated(m, s, v),
            )
        return generated

    def _add_scoring_stages(
        self, graph: StageGraph, subjects: list[Subject], truth: dict[str, str], produced: list[str]
    ) -> None:
        """Evaluation per protocol after every prediction, then the leaderboard and the ablation tables."""
        layout, c = self.layout, self.config
        evals = [
            graph.add(
                f"eval:{p}",
                lambda p=p: self.evaluate(p, subjects),
                needs=[truth[p]],
                after=produced,
                outputs=[layout.eval / p / "run.json"],
            )
            for p in c.protocols
        ]
        board = graph.add(
            "leaderboard", self.leaderboard, after=evals, outputs=[layout.leaderboard / "leaderboard.md"]
        )
        if c.ablation is not None:
            graph.add("ablations", self.ablations, after=[board], outputs=[layout.ablations / "ablations.md"])

    def run(self, parallel: int = 2) -> GraphReport:
        """Synthesize (procedural data), check the subjects, then run the graph; the config is kept in the run."""
        self.layout.root.mkdir(parents=True, exist_ok=True)
        if self.config.data.procedural is None:
            subjects = self.subjects()  # the user's data checked before Ray starts
        else:
            self.check_procedural()
        _remember_config(self.layout.root / "benchmark.yaml", self.config)
        # Stages run side by side, so a model's training often waits for CPUs/GPUs that another training or a
        # generation holds. Ray Train gives up waiting after 60 s and retries, logging a traceback every minute;
        # wait quietly instead, as a Ray task would (Ray Train passes the variable on to its controller)
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(6 * 3600))
        connect(self.address)
        if self.config.data.procedural is not None:
            if not self.commits.is_committed("data"):
                self.commits.commit("data", self.synthesize())
            subjects = self.subjects()
        variants = {m.name: self.variant_outputs(m) for m in self.config.methods if m.kind != "external"}
        write_json(self.layout.root / "variants.json", variants)
        self.parallel = parallel
        return self.graph(subjects).run(parallel)


def _split_key(split: str) -> dict[str, str]:
    """What a split adds to an output's key: nothing for the mono split (the keys runs had before splits)."""
    return {} if split == "mono" else {"split": split}


def _remember_config(path: Path, config: BenchmarkConfig) -> None:
    """The run folder keeps its config; a rerun with another config is refused rather than mixed in (compared as
    validated configs, so a field added to the schema later, at its default, is the same config)."""
    now = config.model_dump(mode="json")
    if path.is_file():
        stored = validate(path, read_yaml(path, BenchmarkError), BenchmarkConfig).model_dump(mode="json")
        refuse_differences(path, settings_differences(stored, now), BenchmarkError, "use a new --out folder")
    write_yaml(path, now)


def _link(target: Path, link: Path) -> None:
    """``link`` -> ``target`` (a file or folder of the run); an existing correct link is kept."""
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        shutil.rmtree(link) if link.is_dir() and not link.is_symlink() else link.unlink()
    link.symlink_to(target)


def _write_identity(path: Path, rgb: Path, mask: Path) -> None:
    """The subject's reference image as RGBA (its frame's alpha as the fourth channel), so the cross protocol's
    CSIM can composite it like the frames; a plain copy when the frame has no mask."""
    from geodiff4d.core.io.images import read_image, read_rgb8, write_png

    if not mask.is_file():
        atomic_write_bytes(path, rgb.read_bytes())
        return
    alpha = read_image(mask)
    alpha = alpha[..., 0] if alpha.ndim == 3 else alpha
    alpha = alpha if alpha.dtype == np.uint8 else (alpha // 257).astype(np.uint8)
    write_png(path, np.dstack([read_rgb8(rgb), alpha]))  # [H, W, 4]
