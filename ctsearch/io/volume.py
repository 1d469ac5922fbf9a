"""The in-memory CT volume every reader returns and every writer takes."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

_INT16 = np.iinfo(np.int16)
_NAN_HU = -1024  # a NaN voxel (float data, a broken scale) reads as air


def to_hu_int16(raw: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """Stored values -> int16 HU: ``raw * slope + intercept``, rounded, clipped to int16.

    The one rescale of every reader (NIfTI's scl_slope/scl_inter, DICOM's RescaleSlope/
    RescaleIntercept). Integer pixels with an integer slope and intercept (CT's usual case) are
    rescaled in int32, exactly and without float temporaries; anything else in float64, where
    NaN reads as -1024 (air) and +-inf as the int16 bounds.

    Args:
        raw: stored values, any shape; integers or floats.
        slope, intercept: the rescale.

    Returns:
        int16 array of ``raw``'s shape (``raw`` itself where it is int16 and the rescale is 1, 0).

    Example:
        >>> to_hu_int16(np.array([0, 1000, 65535], np.uint16), 1, -1024)
        array([-1024,   -24, 32767], dtype=int16)
        >>> to_hu_int16(np.array([np.nan, 1.5, -np.inf]))
        array([ -1024,      2, -32768], dtype=int16)
    """
    if raw.dtype == np.int16 and slope == 1 and intercept == 0:
        return raw
    exact = (
        raw.dtype.kind in "iu"
        and raw.dtype.itemsize <= 2
        and float(slope).is_integer()
        and float(intercept).is_integer()
        and abs(slope) <= 1024
        and abs(intercept) <= 2**20  # |65535 x slope + intercept| stays far inside int32
    )
    if exact:
        hu = raw.astype(np.int32)
        if slope != 1:
            hu *= int(slope)
        if intercept:
            hu += int(intercept)
    else:
        hu = np.nan_to_num(raw.astype(np.float64) * slope + intercept, nan=_NAN_HU)
        np.rint(hu, out=hu)
    return np.clip(hu, _INT16.min, _INT16.max).astype(np.int16)


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
