"""The base every stage stands on: Ray runtime, unit jobs with atomic commits and resume, errors, config
loading, the stage graph and the I/O module. It imports no stage (``datasets``, ``gen``, ``recon``, ``eval``)
and nothing of ``cluster``."""
