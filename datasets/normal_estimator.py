"""A local ONNX surface-normal model for real captures, fed the way DAViD's published normal model expects.

DAViD (Saleh et al., ICCV 2025; model card ``surface_normal_model.md`` and ``runtime/utils.py`` of its release):
input BGR float32 in [0, 1], NCHW, a square of the model's input size (512 px for the released models): the image
is padded to a square by replicating its border, halved with ``pyrDown`` while larger than three times that size,
resized bilinearly; output ``[1, 3, S, S]`` is resized back (bicubic), un-padded and renormalised. The model was
trained on SynthHuman, so its output axes are SynthHuman's stored normal axes, converted here to ours with
``SYNTHHUMAN_NORMAL_TO_OURS``.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from geodiff4d.core.errors import UserError
from geodiff4d.datasets.normal_maps import unit
from geodiff4d.datasets.synthhuman import SYNTHHUMAN_NORMAL_TO_OURS

DEFAULT_INPUT_SIZE = 512  # DAViD's released models; used when the ONNX input has no fixed size


class NormalEstimatorError(UserError, ValueError):
    """The ONNX file is missing, unreadable or not shaped like a normal model; the message names the file."""


def _square_padding(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) replicate-padding that makes the image square, the extra pixel at the end."""
    if height < width:
        top = (width - height) // 2
        return top, width - height - top, 0, 0
    left = (height - width) // 2
    return 0, 0, left, height - width - left


class OnnxNormalEstimator:
    """rgb float32 [H, W, 3] in [0, 1] -> unit normals [H, W, 3] in our camera convention (x right, y up, z out)."""

    def __init__(self, path: str | os.PathLike):
        import onnxruntime

        self.path = Path(path)
        if not self.path.is_file():
            raise NormalEstimatorError(f"{self.path}: normal estimator ONNX file not found")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors for a bad model file
            raise NormalEstimatorError(f"{self.path}: not a loadable ONNX model: {exc}") from exc
        model_input = self.session.get_inputs()[0]
        if len(model_input.shape) != 4 or model_input.shape[1] not in (3, "3"):
            raise NormalEstimatorError(
                f"{self.path}: expected an NCHW input with 3 channels, got {model_input.shape}"
            )
        self.input = model_input.name
        size = model_input.shape[2]
        self.size = size if isinstance(size, int) and size > 0 else DEFAULT_INPUT_SIZE

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        height, width = rgb.shape[:2]
        top, bottom, left, right = _square_padding(height, width)
        bgr = np.ascontiguousarray(np.clip(rgb[..., ::-1], 0.0, 1.0), dtype=np.float32)
        square = cv2.copyMakeBorder(bgr, top, bottom, left, right, cv2.BORDER_REPLICATE)
        side = square.shape[0]
        while square.shape[0] > 3 * self.size:
            square = cv2.pyrDown(square)
        model_in = cv2.resize(square, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        batch = model_in.transpose(2, 0, 1)[None]  # [1, 3, S, S]
        output = self.session.run(None, {self.input: batch})[0]
        if output.shape != (1, 3, self.size, self.size):
            raise NormalEstimatorError(
                f"{self.path}: output shape {output.shape}, expected (1, 3, {self.size}, {self.size})"
            )
        stored = cv2.resize(output[0].transpose(1, 2, 0), (side, side), interpolation=cv2.INTER_CUBIC)
        stored = stored[top : side - bottom, left : side - right]  # [H, W, 3] SynthHuman axes
        return unit(stored.astype(np.float64) @ SYNTHHUMAN_NORMAL_TO_OURS.T).astype(np.float32)
