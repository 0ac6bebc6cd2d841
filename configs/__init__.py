"""Packaged YAML configs, addressed by name (``--config demo``) or by path; see cluster.config_files."""
