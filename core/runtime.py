"""Ray runtime: one place that decides whether we embed a local Ray or join a cluster.

Every stage calls :func:`connect` first, so ``--address`` / ``RAY_ADDRESS`` works the same everywhere and
the default stays a laptop-friendly embedded Ray.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray

import geodiff4d

log = logging.getLogger(__name__)

# Top-level entries of a checkout that are not part of the installed package (pyproject's package-dir map).
_NOT_PACKAGED = {
    ".git",
    ".venv",
    ".ci",
    "tests",
    "bench",
    "docs",
    "runs",
    "demo_out",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
}


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start an embedded local Ray, or join the cluster at ``address`` (or ``RAY_ADDRESS``).

    Idempotent: a process that is already connected keeps its connection. Token authentication stays on
    (Ray's default): the embedded Ray makes its own token, a cluster's comes from ``RAY_AUTH_TOKEN`` /
    ``RAY_AUTH_TOKEN_PATH`` / ``~/.ray/auth_token``; only Ray's notice that it is on is not printed.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("joining Ray cluster at %s", address)
        with tempfile.TemporaryDirectory(prefix="geodiff4d-code-") as staging:  # uploaded by ray.init
            ray.init(address=address, log_to_driver=True, runtime_env=code_runtime_env(Path(staging)))
        return
    _quiet_auth_notice()
    # Ray Train's state actor polls the state API every 30 s to reconcile runs, and the state API needs the
    # dashboard, which the embedded Ray leaves out: each poll would log "State API unavailable" with a traceback
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")
    ray.init(
        # "local", not None: None would attach to whatever `ray start` last wrote to /tmp/ray on this machine
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        log_to_driver=True,
        logging_level=logging.WARNING,
        runtime_env={"worker_process_setup_hook": "geodiff4d.core.runtime.quiet_state_api_polls"},
    )


class _DropNotice(logging.Filter):
    """Drops the one informational record ``Token authentication is enabled ... to opt out``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


class _DropStateApiPoll(logging.Filter):
    """Drops Ray Train's "Failed to query Ray Train Controller actor state" warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to query Ray Train Controller actor state")


def quiet_state_api_polls() -> None:
    """Worker setup hook of the embedded Ray: Ray Train's placement-group cleaner asks the state API every few
    seconds whether the training controller lives, and the state API needs the dashboard, which the embedded Ray
    leaves out, so every poll of every training run would print a warning. Its purpose (removing a dead
    controller's placement group) ends with the embedded Ray itself; on a cluster (with a dashboard) nothing is
    filtered."""
    cleaner_log = logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner")
    if not any(isinstance(f, _DropStateApiPoll) for f in cleaner_log.filters):
        cleaner_log.addFilter(_DropStateApiPoll())


def _quiet_auth_notice() -> None:
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropNotice) for f in auth_log.filters):
        auth_log.addFilter(_DropNotice())


def checkout_root() -> Path | None:
    """The source checkout this process imports geodiff4d from (an editable install), or None if installed."""
    root = Path(geodiff4d.__file__).resolve().parent
    return root if (root / "pyproject.toml").is_file() else None


def code_runtime_env(staging: Path) -> dict[str, Any] | None:
    """A runtime_env shipping this checkout's code (copied under ``staging``) to a cluster's workers, so they
    run the driver's version. An installed package (the image) ships nothing: the nodes run the same image.
    """
    root = checkout_root()
    if root is None:
        return None
    package = staging / "geodiff4d"  # py_modules imports a folder by its name
    shutil.copytree(
        root,
        package,
        ignore=lambda folder, names: [
            n
            for n in names
            if n.endswith((".pyc", ".tar", ".parquet")) or (Path(folder) == root and n in _NOT_PACKAGED)
        ],
    )
    log.info("shipping the checkout %s to the cluster's workers (runtime_env py_modules)", root)
    return {"py_modules": [str(package)]}


def shutdown() -> None:
    """Leave Ray (stops the embedded instance if this process started it)."""
    if ray.is_initialized():
        ray.shutdown()
