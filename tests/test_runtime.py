"""The embedded Ray: token authentication on, Ray's notice about it and Ray Train's state-API polls (no dashboard)
not printed, real errors still shown."""

from __future__ import annotations

import logging
import subprocess
import sys

from geodiff4d.core.runtime import _DropNotice


def test_embedded_ray_keeps_token_auth_quietly_and_shows_real_errors(tmp_path):
    probe = (
        "import ray\n"
        "from ray._private.authentication.authentication_utils import is_token_auth_enabled\n"
        "from geodiff4d.core.runtime import connect\n"
        "connect(num_cpus=1)\n"
        "print('token auth', is_token_auth_enabled())\n"
        "@ray.remote\n"
        "def train_cleaner_logs():\n"
        "    import logging\n"
        "    log = logging.getLogger('ray.train.v2._internal.execution.controller.placement_group_cleaner')\n"
        "    log.warning('Failed to query Ray Train Controller actor state. State API may be temporarily unavailable.')\n"
        "    log.warning('Failed to clean up placement group: a real problem')\n"
        "ray.get(train_cleaner_logs.remote())\n"
        "@ray.remote\n"
        "def broken():\n"
        "    raise ValueError('a real error')\n"
        "ray.get(broken.remote())\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
    }  # a home without a token: the embedded Ray makes one
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300
    )
    assert "token auth True" in result.stdout, result.stderr[-3000:]
    assert "Token authentication is enabled" not in result.stderr + result.stdout
    assert "Failed to query Ray Train Controller" not in result.stderr + result.stdout
    assert "Failed to clean up placement group: a real problem" in result.stderr + result.stdout
    assert result.returncode != 0 and "ValueError: a real error" in result.stderr


def test_only_the_notice_is_dropped():
    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("ray", logging.WARNING, __file__, 1, message, None, None)

    notice = record(
        "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."
    )
    assert not _DropNotice().filter(notice)
    assert _DropNotice().filter(
        record("Token authentication is enabled but no authentication token was found")
    )
