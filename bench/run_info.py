"""The lines a committed bench result starts and ends with: the command that printed it, the date, and the
machine's load before and after (a benchmark is only comparable when it ran alone)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from datetime import UTC, datetime


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def print_run_header() -> None:
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print("date:", datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"), "| load before:", uptime())
