"""The one exception type for bad user input, and finding one among an exception's causes."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

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


def causes(e: BaseException, limit: int = 50) -> Iterator[BaseException]:
    """``e`` and every exception behind it, nearest first: ``__cause__``, ``__context__``, a Ray
    task error's ``cause``, and the workers' errors a Ray Train ``WorkerGroupError`` keeps (each
    wrapped with its traceback as ``_base_exc``). Each at most once, at most ``limit``: chains
    can loop.

    Example:
        >>> try:
        ...     try:
        ...         raise KeyError("k")
        ...     except KeyError as inner:
        ...         raise RuntimeError("outer") from inner
        ... except RuntimeError as e:
        ...     [type(x).__name__ for x in causes(e)]
        ['RuntimeError', 'KeyError']
    """
    todo, seen = [e], set()
    while todo and len(seen) < limit:
        x = todo.pop(0)
        if id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        nested = [getattr(x, "cause", None), x.__cause__, x.__context__, getattr(x, "_base_exc", None)]
        nested += list((getattr(x, "worker_failures", None) or {}).values())
        todo += [c for c in nested if isinstance(c, BaseException)]


def input_error(e: BaseException) -> CTSearchInputError | None:
    """The CTSearchInputError among ``e``'s causes (nearest first), as it was raised, or None.

    Ray re-raises a task's error as a subclass of the error's own class whose text is the task's
    whole traceback; the error itself is its ``cause``, found next.

    Example:
        >>> try:
        ...     raise RuntimeError("the job failed") from CTSearchInputError("a.nii", "truncated")
        ... except RuntimeError as e:
        ...     str(input_error(e))
        'a.nii: truncated'
    """
    return next((x for x in causes(e) if isinstance(x, CTSearchInputError) and "cause" not in vars(x)), None)


def environment_error(e: BaseException) -> CTSearchInputError | None:
    """A full disk, a read-only file system or a permission refusal anywhere in ``e``'s causes
    (also inside a Ray task's error), as a one-line user error naming the file; else None."""
    for x in causes(e):
        if isinstance(x, OSError) and x.errno in _ADVICE:
            where = x.filename or x.filename2
            return CTSearchInputError(where, f"{os.strerror(x.errno)}; {_ADVICE[x.errno]}")
    return None
