"""Progress bars that work in the driver and inside Ray actors (where tqdm's terminal bars would interleave):
one helper so every stage reports progress within a unit the same way."""

from __future__ import annotations

from typing import Any

import ray


def progress_bar(total: int, desc: str, initial: int = 0, enabled: bool = True) -> Any:
    """A bar with ``update(n)``, ``set_description(text)`` and ``close()``: Ray's actor-safe bar inside a Ray
    worker, tqdm in the driver, a silent one when not ``enabled``."""
    if enabled and ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        bar = ray_tqdm(total=total, desc=desc)
        bar.update(initial)
        return bar
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled)
