"""geodiff4d: GeoDiff4D (geometry-aware diffusion for 4D head avatars) as a distributed toolkit.

The repository's top-level folders are installed as ``geodiff4d.<name>`` (see pyproject.toml).
"""

__version__ = "0.1.0"

from geodiff4d.core.kernel_cache import use_source_keyed_cache  # noqa: E402

use_source_keyed_cache()  # before any module that compiles kernels is imported
