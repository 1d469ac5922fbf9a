"""One volume found by a scan: its ids, geometry and how to read it (headers only until ``read``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ctsearch.io.volume import Volume

_CASE_RE = re.compile(r"_(\d+)$")


@dataclass(frozen=True)
class ScanEntry:
    """One volume found by :func:`scan_archive` (headers only; :meth:`read` loads it).

    Attributes:
        volume_id: stable id: the file stem for NIfTI (``liver_3``; the relative path without
            suffix if two files share a stem), the SeriesInstanceUID for DICOM.
        path: the NIfTI file, or the deepest folder holding all files of the DICOM series.
        format: ``"nifti"`` or ``"dicom"``.
        label_path: the Decathlon label paired by file name, else None.
        case_number: N from a name ending in ``_N`` (``liver_3`` -> 3; for DICOM the PatientID), else None.
        shape, spacing_mm: canonical (z, y, x).
        files: DICOM slice files in slice order; empty for NIfTI.
    """

    volume_id: str
    path: str
    format: str
    patient_id: str
    study_id: str
    series_id: str
    exam_date: str | None
    label_path: str | None
    case_number: int | None
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    files: tuple[str, ...] = ()
    _read: Callable[[], Volume] | None = field(default=None, repr=False, compare=False)
    _read_label: Callable[[str, Volume | None], np.ndarray] | None = field(
        default=None, repr=False, compare=False
    )

    def row(self) -> dict:
        """This entry as a row of ``store.MANIFEST_SCHEMA``."""
        return {
            "volume_id": self.volume_id,
            "patient_id": self.patient_id,
            "study_id": self.study_id,
            "series_id": self.series_id,
            "exam_date": self.exam_date,
            "path": self.path,
            "format": self.format,
            "label_path": self.label_path,
            "case_number": self.case_number,
            "nz": self.shape[0],
            "ny": self.shape[1],
            "nx": self.shape[2],
            "spacing_z": self.spacing_mm[0],
            "spacing_y": self.spacing_mm[1],
            "spacing_x": self.spacing_mm[2],
        }

    def read(self) -> Volume:
        """Load the volume (CTSearchInputError if the file turns out broken)."""
        return self._read()

    def read_label(self, like: Volume | None = None) -> np.ndarray | None:
        """uint8 [z, y, x] label in the canonical orientation, or None if the entry has none."""
        return None if self.label_path is None else self._read_label(self.label_path, like)


def case_number(name: str) -> int | None:
    """``liver_12`` -> 12; None when the name does not end in ``_<digits>``."""
    m = _CASE_RE.search(name or "")
    return int(m.group(1)) if m else None
