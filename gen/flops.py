"""FLOP and parameter counts per module with fvcore, including the attention fvcore does not count.

fvcore has no handler for aten::scaled_dot_product_attention, which every diffusers attention layer
calls, so without one the attention cost would silently be missing from the counts.
"""

from __future__ import annotations

from collections import Counter
from math import prod

import torch
from fvcore.nn import FlopCountAnalysis, parameter_count
from fvcore.nn.jit_handles import get_shape


def sdpa_flop_handle(inputs, outputs) -> Counter:
    """q [..., Lq, E], k [..., Lk, E], v [..., Lk, Ev]: QK^T and AV, counted as multiply-adds like fvcore."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = prod(q[:-2])
    return Counter({"scaled_dot_product_attention": batch * q[-2] * k[-2] * (q[-1] + v[-1])})


def module_counts(model: torch.nn.Module, inputs: tuple, depth: int = 1) -> dict[str, tuple[int, int]]:
    """{module name: (multiply-adds of one forward with `inputs`, parameters)} for modules up to `depth`."""
    analysis = FlopCountAnalysis(model, inputs).set_op_handle(
        "aten::scaled_dot_product_attention", sdpa_flop_handle
    )
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    flops = analysis.by_module()
    params = parameter_count(model)
    names = [n for n in params if n.count(".") < depth]
    return {n or "total": (int(flops.get(n, 0)), int(params[n])) for n in names}


def format_counts(counts: dict[str, tuple[int, int]]) -> str:
    lines = [f"{'module':<24}{'GMACs':>12}{'params':>14}"]
    lines += [f"{name:<24}{f / 1e9:>12.3f}{p:>14,}" for name, (f, p) in counts.items()]
    return "\n".join(lines)
