"""The end-to-end bench script's interval message: disjoint intervals are never reported as overlapping."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from benchmark_end_to_end import interval_relation  # noqa: E402  (a script, not a package)

NAN = float("nan")


@pytest.mark.parametrize(
    "first, second, expected",
    [
        ((20.0, 22.0), (17.0, 19.0), "disjoint"),  # better above worse
        ((17.0, 19.0), (20.0, 22.0), "disjoint"),  # either order
        ((0.30, 0.35), (0.36, 0.40), "disjoint"),  # LPIPS: lower is better, still disjoint
        ((18.0, 21.0), (20.0, 22.0), "overlap"),
        ((18.0, 20.0), (20.0, 22.0), "overlap"),  # a shared end point
        ((18.0, 23.0), (20.0, 21.0), "overlap"),  # one inside the other
        ((NAN, NAN), (20.0, 21.0), "n/a"),  # fewer than two subjects: no interval
    ],
)
def test_interval_relation(first, second, expected):
    assert interval_relation(first, second) == expected
