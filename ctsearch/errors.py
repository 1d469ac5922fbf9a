"""The one exception type for bad user input."""

from __future__ import annotations

import errno
import os

# What the place being written to can refuse: the user's to fix (free space, another folder), not a bug.
_ADVICE = {
    errno.ENOSPC: "free some space and run the same command again (finished work is kept)",
    errno.EDQUOT: "raise the quota or free space and run the same command again (finished work is kept)",
    errno.EROFS: "write to a folder on a writable file system",
    errno.EACCES: "check the permissions of this file or folder (or use one you may read and write)",
    errno.EPERM: "check the permissions of this file or folder (or use one you may read and write)",
}


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

    def __reduce__(self):
        # Raised in a Ray task or Train worker, it is pickled to the driver; the default would
        # call __init__ with the message alone.
        return (type(self), (self.path, self.problem))


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (``\\n``, ``\\x1b``): one line, no terminal codes.

    Example:
        >>> print(printable("scan\\n2.nii\\x1b[31m"))
        scan\\n2.nii\\x1b[31m
    """
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))


def environment_error(e: BaseException) -> CTSearchInputError | None:
    """A full disk, a read-only file system or a permission refusal anywhere in ``e``'s causes
    (also inside a Ray task's error), as a one-line user error naming the file; else None."""
    seen: BaseException | None = e
    for _ in range(10):  # the chain of causes; bounded, chains can loop
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno in _ADVICE:
            where = seen.filename or seen.filename2
            return CTSearchInputError(where, f"{os.strerror(seen.errno)}; {_ADVICE[seen.errno]}")
        seen = getattr(seen, "cause", None) or seen.__cause__ or seen.__context__
    return None
