"""Shared pytest fixtures."""

import pytest

from geodiff4d.core.runtime import connect, shutdown
from geodiff4d.datasets.flame import FlameModel
from geodiff4d.datasets.procedural_head import procedural_head_model


@pytest.fixture(scope="session")
def head_model() -> FlameModel:
    """The procedural FLAME-structured head (seed 0), loaded through the restricted pkl loader."""
    return procedural_head_model(seed=0)


@pytest.fixture(scope="session")
def local_ray():
    """One embedded Ray for the whole test run, sized like CI (docs/architecture.md, "Ray": num_cpus=2)."""
    connect(num_cpus=2)
    yield
    shutdown()
