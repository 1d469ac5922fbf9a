"""The in-memory CT volume every reader returns and every writer takes."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Volume:
    """One CT series in the canonical orientation (docs/formats.md).

    ``hu[k, j, i]``: i increases toward the patient's Left, j toward Posterior, k toward Superior
    (DICOM's LPS axes, indexed z, y, x). Slice 0 is the most inferior slice.

    Attributes:
        hu: int16 [z, y, x] Hounsfield units.
        spacing_mm: (z, y, x) voxel size in mm.
        affine: float64 [4, 4] mapping (i, j, k, 1) voxel indices to LPS millimetres.
        patient_id, study_id, series_id: identifiers as given by the source (pseudonyms in
            research archives); never names or birth dates.
        exam_date: ``YYYY-MM-DD`` where known.
        source: the file or folder it was read from.
    """

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    affine: np.ndarray
    patient_id: str = ""
    study_id: str = ""
    series_id: str = ""
    exam_date: str | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)

    def pixel_hash(self) -> str:
        """sha256 of the shape and the int16 HU in canonical order: equal for copies of one scan
        (a NIfTI and a DICOM export), whatever their file bytes, names or ids.

        Example:
            >>> v = Volume(np.zeros((2, 3, 3), np.int16), (1.0, 1.0, 1.0), np.eye(4))
            >>> v.pixel_hash() == Volume(v.hu.copy(), (5.0, 1.0, 1.0), np.eye(4), patient_id="x").pixel_hash()
            True
        """
        h = hashlib.sha256(repr(self.shape).encode())
        h.update(np.ascontiguousarray(self.hu, dtype="<i2"))  # the buffer itself: no copy
        return h.hexdigest()

    def z_mm(self) -> np.ndarray:
        """float64 [z]: each slice's position along the body axis (LPS z, mm)."""
        k = np.arange(self.hu.shape[0], dtype=np.float64)
        return self.affine[2, 2] * k + self.affine[2, 3]

    @staticmethod
    def affine_from(spacing_mm, origin_lps) -> np.ndarray:
        """Axis-aligned affine for ``spacing_mm`` (z, y, x) and the LPS origin (x, y, z) of voxel 0."""
        sz, sy, sx = (float(s) for s in spacing_mm)
        a = np.diag([sx, sy, sz, 1.0])
        a[:3, 3] = np.asarray(origin_lps, dtype=np.float64)
        return a

    def __repr__(self) -> str:
        return (
            f"Volume(shape={self.shape}, spacing_mm={tuple(round(s, 3) for s in self.spacing_mm)}, "
            f"patient_id={self.patient_id!r}, series_id={self.series_id!r}, source={os.path.basename(self.source)!r})"
        )
