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

import os
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


def walk_files(folder: str) -> list[str]:
    """Every file under ``folder`` (any depth), in a deterministic order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames))
    return out


def scan_error(path: str | os.PathLike, problem: str) -> dict:
    """A row of store.ERRORS_SCHEMA for an input the scan cannot use."""
    return {"path": os.fspath(path), "stage": "scan", "error": problem}
