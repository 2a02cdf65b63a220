"""Errors that the command line prints as one line (no traceback).

Raise :class:`VlsiError` for anything a user can fix (a missing path, a bad config value, data
that does not parse). Programming errors keep their traceback.
"""


class VlsiError(Exception):
    """A user-facing error; ``vlsi`` prints ``error: <message>`` and exits with status 2."""


class DataError(VlsiError):
    """A dataset problem: in strict mode the first bad sample, otherwise an empty dataset."""
