"""The lines a committed bench result starts and ends with: the command that printed it, the date, the machine
and its load before and after (a benchmark is only comparable when it ran alone, and with a figure from the same
kind of processor: the compiled kernels' SIMD width and the cost of a page fault differ between them)."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from llvmlite import binding as llvm


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def machine() -> str:
    """Processor model, CPUs, the widest SIMD it has and the CPU that numba compiles the kernels for."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    fields = {
        key.strip(): value.strip() for key, _, value in (line.partition(":") for line in lines) if value
    }
    flags = set((fields.get("flags") or fields.get("Features", "")).split())  # x86, Arm
    simd = next((name for name in ("avx512f", "avx2", "sse4_2", "neon", "asimd") if name in flags), "unknown")
    model = fields.get("model name", platform.processor() or platform.machine())
    return f"{model}, {os.cpu_count()} CPUs, {simd}, numba compiles for {llvm.get_host_cpu_name()}"


def print_run_header() -> None:
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print("date:", datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"), "| load before:", uptime())
    print("machine:", machine())
