"""What a volume format is to ctsearch, and the helpers every format's scanner shares.

A format (``ctsearch.io.nifti.NiftiFormat``, ``ctsearch.io.dicom.DicomFormat``) says which files
it claims while an archive is scanned, turns the files it claimed into ``ScanEntry``s (headers
only), and reads a path it recognises into a canonical ``Volume``. ``scan_archive`` and
``read_volume`` loop over ``ctsearch.io.scan.FORMATS``; adding a format is one class in one
module and its name in that tuple (docs/architecture.md, "Adding an input format").

Example:
    >>> scan_error("a.txt", "not an image")
    {'path': 'a.txt', 'stage': 'scan', 'error': 'not an image'}
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Protocol

from ctsearch.errors import CTSearchInputError
from ctsearch.io.entry import ScanEntry
from ctsearch.io.volume import Volume


class VolumeFormat(Protocol):
    """One input format: scanning (headers only) and reading."""

    name: str  # the manifest's ``format`` value

    def claims(self, path: str) -> bool:
        """True for a file of this format met while scanning (by name or by content)."""

    def entries(self, files: list[str], root: str, errors: list[dict]) -> list[ScanEntry]:
        """The volumes among the ``files`` it claimed under ``root``; what it cannot use goes to ``errors``."""

    def reads(self, path: str) -> bool:
        """True when ``read`` is the reader of ``path`` (a file or a folder that exists)."""

    def read(self, path: str, series_id: str | None = None) -> Volume:
        """``path`` as a canonical Volume; ``series_id`` picks one series where a path holds several."""


def error_row(e: CTSearchInputError, stage: str) -> dict:
    """A CTSearchInputError as a row of store.ERRORS_SCHEMA."""
    return {"path": e.path or "", "stage": stage, "error": e.problem}


def walk_files(folder: str, errors: list[dict] | None = None) -> list[str]:
    """Every regular file under ``folder`` (any depth), in a deterministic order.

    Anything else met on the way (named pipes, sockets, device files, dangling or looping
    symbolic links, links to folders, which are not followed) is never returned, so no reader
    opens it (a pipe would block a read forever); with ``errors`` each becomes a scan error row.
    """
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for d in dirnames:  # os.walk lists links to folders here and does not enter them
            if os.path.islink(os.path.join(dirpath, d)) and errors is not None:
                problem = not_regular(os.path.join(dirpath, d))
                errors.append(scan_error(os.path.join(dirpath, d), problem or "symbolic link"))
        for f in sorted(filenames):
            path = os.path.join(dirpath, f)
            problem = not_regular(path)
            if problem is None:
                out.append(path)
            elif errors is not None:
                errors.append(scan_error(path, problem))
    return out


def not_regular(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a regular file that a reader may open (after symbolic links), or None."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if os.path.islink(path):
            if e.errno == errno.ELOOP:
                return "symbolic link loop, skipped"
            return f"dangling symbolic link (target {os.readlink(path)!r} does not exist), skipped"
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "symbolic link to a folder, not followed (link the files or scan the target folder)"
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO), not a file: not opened"
    if stat.S_ISSOCK(mode):
        return "socket, not a file: not opened"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file, not a file: not opened"
    return "not a regular file: not opened"


def scan_error(path: str | os.PathLike, problem: str) -> dict:
    """A row of store.ERRORS_SCHEMA for an input the scan cannot use."""
    return {"path": os.fspath(path), "stage": "scan", "error": problem}
