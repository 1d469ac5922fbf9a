"""DICOM CT series: write a canonical ``Volume`` as one file per slice, read series back.

Geometry follows DICOM's patient LPS system directly: ``Volume.affine`` column 0 is the row
direction (ImageOrientationPatient[:3]) times the column spacing, column 1 the column direction
(ImageOrientationPatient[3:]) times the row spacing, and slice ``k`` sits at ``affine @ (0, 0, k, 1)``.

Example:
    >>> import numpy as np, tempfile
    >>> from ctsearch.io.volume import Volume
    >>> vol = Volume(hu=np.full((3, 4, 5), -1000, np.int16), spacing_mm=(2.0, 0.7, 0.7),
    ...              affine=Volume.affine_from((2.0, 0.7, 0.7), (0.0, 0.0, 0.0)),
    ...              patient_id="p0", study_id="s0", series_id="ser0", exam_date="2020-01-02")
    >>> files = write_dicom_series(vol, tempfile.mkdtemp())
    >>> len(files)
    3
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.valuerep import format_number_as_ds
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ctsearch.errors import CTSearchInputError
from ctsearch.io.volume import Volume

# RescaleIntercept used for the unsigned pixels we write (the common scanner convention).
WRITE_INTERCEPT = -1024


_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def is_uid(text: str) -> bool:
    """True if ``text`` is a syntactically valid DICOM UID (digits and dots, <= 64 characters)."""
    return len(text) <= 64 and bool(_UID_RE.match(text))


def uid_for(kind: str, *parts: object) -> str:
    """A valid, deterministic DICOM UID for ``kind`` ("study", "series" ...) derived from ``parts``."""
    return generate_uid(entropy_srcs=[kind, *(str(p) for p in parts)])


def write_dicom_series(
    volume: Volume,
    folder: str | os.PathLike,
    *,
    rng_seed: int = 0,
    file_names: str = "random",
) -> list[Path]:
    """Write ``volume`` as a CT Image Storage series, one explicit-VR-little-endian file per slice.

    Pixels are stored unsigned (PixelRepresentation 0) with RescaleSlope 1 and RescaleIntercept
    -1024 (lower if the volume holds HU below -1024), so a reader must apply the rescale.
    Only PatientID, the study/series UIDs and StudyDate identify the scan: no names, birth dates
    or other identifying tags are written. UIDs are derived deterministically from the Volume ids.

    Args:
        volume: canonical volume (hu int16 [z, y, x]).
        folder: output folder (created).
        rng_seed: seeds the random file names.
        file_names: ``"random"`` (16 hex characters, no extension, order unrelated to position)
            or ``"ordered"`` (``slice_0000.dcm`` ...).

    Returns:
        The written paths, in slice order (index 0 = most inferior).
    """
    if file_names not in ("random", "ordered"):
        raise ValueError(f"file_names must be 'random' or 'ordered', not {file_names!r}")
    hu = np.asarray(volume.hu)
    if hu.ndim != 3:
        raise ValueError(f"volume.hu must be 3-D [z, y, x], got shape {hu.shape}")
    nz, ny, nx = hu.shape
    affine = np.asarray(volume.affine, dtype=np.float64)
    col_step, row_step, slice_step = affine[:3, 0], affine[:3, 1], affine[:3, 2]
    sx, sy = float(np.linalg.norm(col_step)), float(np.linalg.norm(row_step))
    sz = float(np.linalg.norm(slice_step))
    orientation = np.concatenate([col_step / sx, row_step / sy])

    intercept = int(min(WRITE_INTERCEPT, int(hu.min()) if hu.size else 0))
    stored = (hu.astype(np.int32) - intercept).astype(np.uint16)

    # Ids that already are UIDs (a volume read from DICOM) are kept, so DICOM -> DICOM round-trips.
    study_uid = volume.study_id if is_uid(volume.study_id) else uid_for("study", volume.patient_id, volume.study_id)
    series_uid = (
        volume.series_id if is_uid(volume.series_id) else uid_for("series", study_uid, volume.series_id)
    )
    frame_uid = uid_for("frame", series_uid)
    study_date = (volume.exam_date or "").replace("-", "")

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(rng_seed)
    paths: list[Path] = []
    for k in range(nz):
        if file_names == "random":
            name = "".join(rng.choice(list("0123456789abcdef"), 16))
        else:
            name = f"slice_{k:04d}.dcm"
        path = folder / name
        sop_uid = uid_for("sop", series_uid, k)
        position = (affine @ np.array([0.0, 0.0, k, 1.0]))[:3]

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        ds = FileDataset(os.fspath(path), {}, file_meta=meta, preamble=b"\0" * 128)

        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Modality = "CT"
        ds.PatientID = volume.patient_id
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.StudyDate = study_date
        ds.SeriesDate = study_date
        ds.StudyID = ""
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in orientation]
        ds.SliceLocation = _ds(position[2])
        ds.PixelSpacing = [_ds(sy), _ds(sx)]  # row spacing (between rows), column spacing
        ds.SliceThickness = _ds(sz)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.KVP = 120
        ds.PixelData = np.ascontiguousarray(stored[k]).astype("<u2").tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _ds(v: float) -> str:
    """A DICOM Decimal String (<= 16 characters) for ``v``."""
    v = float(v) + 0.0  # folds -0.0 into 0.0
    return format_number_as_ds(v)
