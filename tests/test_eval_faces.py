"""CSIM (FaceNet, ArcFace ONNX), best-face selection, misses, AKD and AED on real photos from installed packages."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import torch

from geodiff4d.eval.expression import aed, make_expression_regressor
from geodiff4d.eval.face_detection import Face, best_face
from geodiff4d.eval.identity import ArcfaceEmbedder, csim, embed, make_embedder
from geodiff4d.eval.landmarks import akd, make_landmarker
from geodiff4d.eval.model_files import packaged_photo


def _photo(name: str) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(packaged_photo(name))), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()[:320, 80:400].copy()  # the face and shoulders, 320x320


@pytest.fixture(scope="module")
def facenet():
    return make_embedder("facenet")


def test_facenet_csim(facenet, astronaut):
    shifted = np.clip(np.roll(astronaut, (6, -8), axis=(0, 1)).astype(int) + 25, 0, 255).astype(np.uint8)
    assert csim(facenet, astronaut, astronaut) == pytest.approx(1.0, abs=1e-6)
    assert csim(facenet, shifted, astronaut) > 0.9
    group = _photo("t1.jpg")
    faces = facenet.detector.detect(group)
    assert len(faces) == 6
    mine = embed(facenet, astronaut)
    others = [facenet.embed_face(group, f) for f in faces] + [embed(facenet, _photo("Tom_Hanks_54745.png"))]
    assert max(float(np.dot(mine, o)) for o in others) < 0.4
    # The six different people of t1.jpg among themselves: FaceNet puts 14 of the 15 pairs below 0.4 and one
    # pair of two dark-haired young men at 0.49, which TensorFlow reproduces (test_facenet_graph_matches_tensorflow).
    pairs = sorted(float(np.dot(others[i], others[j])) for i in range(6) for j in range(i + 1, 6))
    assert pairs[-2] < 0.4 and pairs[-1] < 0.5


def test_facenet_graph_matches_tensorflow(facenet):
    """Our frozen-graph runner against TensorFlow 2.21's embeddings of the same crops (tests/reference/)."""
    reference = np.load(Path(__file__).parent / "reference" / "facenet_t1_tensorflow.npz")
    group = _photo("t1.jpg")
    ours = np.stack([facenet.embed_face(group, Face(tuple(box), 1.0)) for box in reference["boxes"]])
    tensorflow = reference["embeddings"] / np.linalg.norm(reference["embeddings"], axis=1, keepdims=True)
    assert np.abs(ours - tensorflow).max() < 1e-5


def test_best_scoring_face_not_largest():
    small_sure = Face((10, 10, 30, 30), 0.99)
    large_doubtful = Face((0, 0, 200, 200), 0.71)
    assert best_face([large_doubtful, small_sure]) is small_sure
    assert best_face([]) is None


def test_best_face_drives_the_embedding(facenet):
    group = _photo("t1.jpg")
    faces = facenet.detector.detect(group)
    best = max(faces, key=lambda f: f.score)
    assert np.allclose(embed(facenet, group), facenet.embed_face(group, best))


def test_no_face_is_a_miss(facenet, astronaut):
    blank = np.full_like(astronaut, 128)
    assert embed(facenet, blank) is None
    assert csim(facenet, blank, astronaut) is None


def test_arcface_backend_loads_local_onnx(tmp_path, astronaut):
    class TinyRecognizer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 4, stride=4)
            self.fc = torch.nn.Linear(8 * 28 * 28, 512)

        def forward(self, x):  # [N, 3, 112, 112] -> [N, 512]
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    torch.manual_seed(0)
    path = tmp_path / "w600k_tiny.onnx"
    torch.onnx.export(
        TinyRecognizer(),
        torch.zeros(1, 3, 112, 112),
        str(path),
        input_names=["data"],
        output_names=["fc1"],
        dynamic_axes={"data": {0: "n"}, "fc1": {0: "n"}},
        dynamo=False,
    )
    arcface = ArcfaceEmbedder(tmp_path)  # a model folder, as buffalo_l
    e = embed(arcface, astronaut)
    assert e.shape == (512,) and np.linalg.norm(e) == pytest.approx(1.0)
    assert csim(arcface, astronaut, astronaut) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(FileNotFoundError, match="arcface"):
        ArcfaceEmbedder(tmp_path / "missing.onnx")


def test_akd_of_shift(astronaut):
    landmarker = make_landmarker("dlib")
    assert akd(landmarker, astronaut, astronaut) == 0.0
    for k in (3, 6):
        shifted = np.roll(astronaut, k, axis=1)
        assert akd(landmarker, shifted, astronaut) == pytest.approx(k, abs=0.5)


def test_aed_mediapipe(astronaut):
    regressor = make_expression_regressor("mediapipe")
    hanks = cv2.resize(_photo("Tom_Hanks_54745.png"), (320, 320))
    assert aed(regressor, astronaut, astronaut) == 0.0
    shift = aed(regressor, np.roll(astronaut, 4, axis=1), astronaut)
    assert shift < aed(regressor, hanks, astronaut)
    assert aed(regressor, np.full_like(astronaut, 128), astronaut) is None
