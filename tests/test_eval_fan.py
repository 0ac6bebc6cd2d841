"""AKD backend ``fan``: the face-alignment package's own FAN network, loaded offline from its checkpoint form."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import torch
from typer.testing import CliRunner

from geodiff4d.cluster.cli import app
from geodiff4d.datasets.packaged import ModelFileNotFound
from geodiff4d.eval.face_detection import best_face
from geodiff4d.eval.fan_landmarks import (
    FAN_CHECKPOINT,
    FAN_WEIGHTS_ENV,
    S3FD_CHECKPOINT,
    FanLandmarks,
    find_fan_file,
)
from geodiff4d.eval.landmarks import keypoint_distance, make_landmarker

face_alignment = pytest.importorskip("face_alignment")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()[:320, 80:400].copy()  # the face and shoulders, 320x320


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """A torch hub folder as the package leaves it after a download: checkpoints/2DFAN4-11f355bf06.pth.tar holding
    the state dict of the package's own FAN (random weights: the real ones cannot be downloaded here)."""
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    net = face_alignment.models.FAN(4)
    (root / "checkpoints").mkdir()
    torch.save(net.state_dict(), root / "checkpoints" / FAN_CHECKPOINT)
    return root


def test_fan_weights_load_through_the_package(hub, monkeypatch):
    """Our backend loads the checkpoint through face_alignment's own loading code, from a file, a hub folder
    or the environment variable, and ends with exactly the saved weights in the package's network."""
    saved = torch.load(hub / "checkpoints" / FAN_CHECKPOINT, weights_only=True)
    ours = make_landmarker("fan", fan_weights=hub / "checkpoints" / FAN_CHECKPOINT)
    loaded = ours._fan.face_alignment_net.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    monkeypatch.setenv(FAN_WEIGHTS_ENV, str(hub))
    assert find_fan_file() == hub / "checkpoints" / FAN_CHECKPOINT
    assert torch.hub.get_dir() != str(hub) and not any(Path(torch.hub.get_dir()).glob("fan-hub-*"))


@pytest.mark.slow  # 4 CPU forward passes of the 24M-parameter FAN: 9.5 min measured on 2 cores at load average ~30
def test_fan_backend_matches_the_package(hub, astronaut, monkeypatch):
    ours = make_landmarker("fan", fan_weights=hub)
    points = ours(astronaut)
    assert points.shape == (68, 2) and points.dtype == np.float64 and np.isfinite(points).all()
    assert not np.allclose(points, np.rint(points))  # sub-pixel, not whole pixels
    face = best_face(ours.detector.detect(astronaut))
    x0, y0, x1, y1 = face.box
    side = 200 * (x1 - x0 + y1 - y0) / 195  # the package's crop around the box, in image pixels
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 - 0.12 * (y1 - y0)
    assert (np.abs(points - [cx, cy]) <= side / 2).all()  # image coordinates, inside the face's crop

    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))  # the package's own cache, as after its download
    package = face_alignment.FaceAlignment(
        face_alignment.LandmarksType.TWO_D, device="cpu", face_detector="folder", compile=False
    )
    direct = package.get_landmarks_from_image(astronaut, detected_faces=[np.array(face.box)])[0]
    # the package truncates image coordinates to int32 at its very end; we keep the float it truncates
    assert direct.shape == (68, 2)
    assert ((points - direct) > -1e-4).all() and ((points - direct) < 1 + 1e-4).all()
    assert keypoint_distance(points, direct) > 0.1  # ... which is the quantisation this backend avoids


def test_missing_fan_weights_say_where_they_were_looked_for(tmp_path, hub):
    with pytest.raises(ModelFileNotFound, match=f"{FAN_CHECKPOINT}.*looked in: {tmp_path / 'none'}"):
        FanLandmarks(tmp_path / "none")
    with pytest.raises(ModelFileNotFound, match=f"{S3FD_CHECKPOINT}.*looked in: {hub / 'checkpoints'}"):
        FanLandmarks(hub, detector="sfd")  # the package's own detector: its weights beside FAN's
    frame = np.zeros((32, 32, 3), np.uint8)
    for tree in ("gt", "pred/m"):
        (tmp_path / tree / "s1" / "SEQ" / "cam").mkdir(parents=True)
        cv2.imwrite(str(tmp_path / tree / "s1" / "SEQ" / "cam" / "00000.png"), frame)
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--out",
            str(tmp_path / "run"),
            "--gt",
            str(tmp_path / "gt"),
            "--pred",
            str(tmp_path / "pred"),
            "--metrics",
            "akd",
            "--akd-backend",
            "fan",
            "--fan-weights",
            str(tmp_path / "none"),
        ],
    )
    assert result.exit_code == 2, result.output
    assert FAN_CHECKPOINT in result.output and str(tmp_path / "none") in result.output
    assert (
        "Traceback" not in result.output
        and result.exception is None
        or isinstance(result.exception, SystemExit)
    )
    assert not (tmp_path / "run").exists()  # refused before any work
