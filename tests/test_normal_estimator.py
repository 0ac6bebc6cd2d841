"""The ONNX normal estimator is fed as DAViD's normal model expects: BGR, [0, 1], square replicate padding, input size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from geodiff4d.datasets.normal_estimator import NormalEstimatorError, OnnxNormalEstimator
from geodiff4d.datasets.normal_maps import unit
from geodiff4d.datasets.synthhuman import SYNTHHUMAN_NORMAL_TO_OURS

SIZE = 32


def _shifted_identity_onnx(path: Path, size: int | None = SIZE) -> None:
    """x [1, 3, S, S] -> x - 0.5: the 'normal' it predicts is the BGR input it was fed, shifted."""
    half = helper.make_tensor("half", TensorProto.FLOAT, [1], [0.5])
    dims = [1, 3, size, size] if size else [1, 3, None, None]
    graph = helper.make_graph(
        [helper.make_node("Sub", ["x", "half"], ["y"])],
        "shifted_identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
        initializer=[half],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_channel_order_range_padding_and_output_axes(tmp_path):
    _shifted_identity_onnx(tmp_path / "normals.onnx")
    estimator = OnnxNormalEstimator(tmp_path / "normals.onnx")
    assert estimator.size == SIZE
    left, right = np.array([0.9, 0.5, 0.1]), np.array([0.2, 0.3, 0.95])  # RGB
    rgb = np.zeros((30, 80, 3), np.float32)  # wide: padded top and bottom to 80 x 80, then resized to 32
    rgb[:, :40], rgb[:, 40:] = left, right
    normal = estimator(rgb)
    assert normal.shape == (30, 80, 3)
    for colour, columns in ((left, slice(2, 30)), (right, slice(50, 78))):
        stored = colour[::-1] - 0.5  # the model saw BGR in [0, 1]
        expected = unit(SYNTHHUMAN_NORMAL_TO_OURS @ stored)
        np.testing.assert_allclose(
            normal[:, columns], np.broadcast_to(expected, normal[:, columns].shape), atol=1e-3
        )


def test_a_model_without_fixed_size_gets_davids_512(tmp_path):
    _shifted_identity_onnx(tmp_path / "dynamic.onnx", size=None)
    assert OnnxNormalEstimator(tmp_path / "dynamic.onnx").size == 512


def test_missing_or_broken_models_name_the_file(tmp_path):
    with pytest.raises(NormalEstimatorError, match="missing.onnx: normal estimator ONNX file not found"):
        OnnxNormalEstimator(tmp_path / "missing.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"not onnx")
    with pytest.raises(NormalEstimatorError, match="broken.onnx: not a loadable ONNX model"):
        OnnxNormalEstimator(tmp_path / "broken.onnx")
