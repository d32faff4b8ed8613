"""Errors a user can act on.

Library code raises these with a message that names the file and the problem; the CLI turns
them into one line on stderr and a documented exit code instead of a traceback.
"""

from __future__ import annotations


class DermaclassError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""

    exit_code = 3


class DataError(DermaclassError):
    """The dataset cannot be read: no images, an unreadable manifest, missing columns."""

    exit_code = 3


class ConfigError(DermaclassError):
    """A configuration file or flag is invalid."""

    exit_code = 2
