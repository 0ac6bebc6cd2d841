"""Ray runtime: one place that decides whether we embed a local Ray or join a cluster.

Every stage calls :func:`connect` first, so ``--address`` / ``RAY_ADDRESS`` works the same everywhere and
the default stays a laptop-friendly embedded Ray.
"""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start an embedded local Ray, or join the cluster at ``address`` (or ``RAY_ADDRESS``).

    Idempotent: a process that is already connected keeps its connection.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        log_to_driver=True,
        logging_level=logging.WARNING,
    )


def shutdown() -> None:
    """Leave Ray (stops the embedded instance if this process started it)."""
    if ray.is_initialized():
        ray.shutdown()
