"""The one exception type for bad user input."""

from __future__ import annotations

import os


class CTSearchInputError(Exception):
    """A user-supplied file or option is unusable.

    The message is one line, ``"<path>: <problem>"``, fit to print without a traceback.

    Example:
        >>> str(CTSearchInputError("scan.nii.gz", "truncated gzip stream"))
        'scan.nii.gz: truncated gzip stream'
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = " ".join(str(problem).split())
        super().__init__(self.problem if self.path is None else f"{self.path}: {self.problem}")
