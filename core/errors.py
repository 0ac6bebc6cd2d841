"""The one exception type for mistakes a user can fix (inputs, settings, missing files or weights).

Every error the toolkit raises on purpose derives from :class:`UserError`; the CLI prints its message as one
line (or a short list) naming the input and exits with its ``exit_code``, so tracebacks are left for bugs.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or settings, found before the work starts: the CLI exits 2, as for a usage error."""

    exit_code = 2


class WorkFailed(UserError):
    """Work that ran and failed on some units (their messages are in the text): the CLI exits 1."""

    exit_code = 1
