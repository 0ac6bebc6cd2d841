"""geodiff4d: GeoDiff4D (geometry-aware diffusion for 4D head avatars) as a distributed toolkit.

The repository's top-level folders are installed as ``geodiff4d.<name>`` (see pyproject.toml).
"""

__version__ = "0.1.0"
