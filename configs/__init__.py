"""Packaged YAML configs, addressed by name (``--config demo``) or by path; see core.config."""
