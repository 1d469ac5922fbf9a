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
        # The message is printed on a terminal and into logs: control characters in a file name
        # (a newline, an escape sequence) are shown escaped, so it stays one honest line.
        where = None if self.path is None else printable(self.path)
        super().__init__(printable(self.problem) if where is None else f"{where}: {printable(self.problem)}")


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (``\\n``, ``\\x1b``): one line, no terminal codes.

    Example:
        >>> print(printable("scan\\n2.nii\\x1b[31m"))
        scan\\n2.nii\\x1b[31m
    """
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))
