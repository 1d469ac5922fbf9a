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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from ctsearch.errors import CTSearchInputError
from ctsearch.io.entry import ScanEntry, case_number
from ctsearch.io.formats import error_row, walk_files
from ctsearch.io.orient import canonical_transform, spacing_of, to_canonical
from ctsearch.io.volume import Volume, to_hu_int16

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
    study_uid = (
        volume.study_id if is_uid(volume.study_id) else uid_for("study", volume.patient_id, volume.study_id)
    )
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


# ---------------------------------------------------------------------------------------------
# Reading

# Refuse series whose headers claim more voxels than any CT volume plausibly holds.
MAX_VOXELS = 2 * 1024**3
_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
# Axial: the slice normal within ~37 degrees of the body axis (gantry tilt stays well below).
_AXIAL_MIN_COS = 0.8

# Which pip packages let pydicom decode a compressed transfer syntax (pydicom 3 pixel plugins).
_PLUGIN_HINTS = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg and pylibjpeg-libjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.51": "pylibjpeg and pylibjpeg-libjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.57": "pylibjpeg and pylibjpeg-libjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.70": "pylibjpeg and pylibjpeg-libjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.80": "pyjpegls (or pylibjpeg and pylibjpeg-libjpeg, or python-gdcm)",
    "1.2.840.10008.1.2.4.81": "pyjpegls (or pylibjpeg and pylibjpeg-libjpeg, or python-gdcm)",
    "1.2.840.10008.1.2.4.90": "pylibjpeg and pylibjpeg-openjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.91": "pylibjpeg and pylibjpeg-openjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.201": "pylibjpeg and pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg and pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg and pylibjpeg-openjpeg",
}


class NotAxialCTSeries(CTSearchInputError):
    """A readable series that is not an axial CT stack (localizer, single slice, MR ...): skipped."""


def sniff_dicom(path: str | os.PathLike) -> bool:
    """True if the file content looks like DICOM: 'DICM' after the 128-byte preamble, or a
    preamble-less dataset starting with a group 0002/0008 tag. Names and extensions are ignored.
    Only regular files are opened: reading a named pipe would block forever."""
    if not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[3:4] == b"\x00"


@dataclass(frozen=True)
class SliceHeader:
    """What one DICOM file's header says, as plain values (None where a tag is absent)."""

    path: str
    series_uid: str
    study_uid: str
    patient_id: str
    exam_date: str | None
    modality: str
    image_type: tuple[str, ...]
    frames: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    rows: int | None
    cols: int | None
    pixel_problem: str | None


def read_dicom_header(path: str | os.PathLike) -> SliceHeader:
    """Parse one file's DICOM header without decoding pixels; CTSearchInputError if unusable."""
    return _read_header(os.fspath(path))[0]


def _read_header(path: str) -> tuple[SliceHeader, pydicom.Dataset]:
    """The header, and the dataset it was read from (pixels deferred: read when decoded)."""
    if not os.path.isfile(path):
        raise CTSearchInputError(path, "no such file")
    if os.path.getsize(path) == 0:
        raise CTSearchInputError(path, "empty file")
    if not sniff_dicom(path):
        raise CTSearchInputError(path, "not a DICOM file (no 'DICM' marker or DICOM header)")
    try:
        # Large values (the pixels) are deferred: parsed past, not loaded, so their presence and
        # length can still be checked against the header and the file size.
        ds = pydicom.dcmread(path, defer_size=1024, force=True)
        if str(ds.get("SOPClassUID", "")) == _MEDIA_STORAGE_DIRECTORY:
            raise NotAxialCTSeries(path, "DICOMDIR (a directory index, not an image)")
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not series_uid:
            raise CTSearchInputError(path, "DICOM file without SeriesInstanceUID")
        header = SliceHeader(
            path=path,
            series_uid=series_uid,
            study_uid=str(ds.get("StudyInstanceUID", "") or ""),
            patient_id=str(ds.get("PatientID", "") or ""),
            exam_date=_iso_date(ds),
            modality=str(ds.get("Modality", "") or ""),
            image_type=tuple(str(t).upper() for t in _as_list(ds.get("ImageType"))),
            frames=int(ds.get("NumberOfFrames", 1) or 1),
            position=_floats(ds, "ImagePositionPatient", 3),
            orientation=_floats(ds, "ImageOrientationPatient", 6),
            pixel_spacing=_floats(ds, "PixelSpacing", 2),
            rows=int(ds.Rows) if ds.get("Rows") is not None else None,
            cols=int(ds.Columns) if ds.get("Columns") is not None else None,
            pixel_problem=pixel_data_problem(path, ds),
        )
        return header, ds
    except CTSearchInputError:
        raise
    except Exception as e:  # pydicom raises many types on corrupt input, also lazily on access
        raise CTSearchInputError(path, f"unreadable DICOM header ({_describe(e)})") from None


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]


def _floats(ds: pydicom.Dataset, tag: str, n: int) -> tuple[float, ...] | None:
    value = ds.get(tag)
    if value in (None, ""):
        return None
    values = tuple(float(v) for v in _as_list(value))
    if len(values) != n or not all(np.isfinite(values)):
        raise ValueError(f"{tag} should be {n} finite numbers, got {values}")
    return values


def group_series(
    files: list[str | os.PathLike], stage: str = "read", datasets: dict | None = None
) -> tuple[dict[str, list[SliceHeader]], list[dict]]:
    """Read the headers of ``files`` and group them by SeriesInstanceUID.

    ``datasets``: a dict to keep each header's dataset in, by path, for ``DicomSeries.read`` to
    decode from without parsing the file a second time (a read, not a scan: a scan of a whole
    archive must not hold every dataset).

    Returns:
        ({series_uid: [SliceHeader, ...]}, errors) with one ``{path, stage, error}`` dict per
        file that is not a readable DICOM image.
    """
    groups: dict[str, list[SliceHeader]] = {}
    errors: list[dict] = []
    for path in files:
        try:
            h, ds = _read_header(os.fspath(path))
        except CTSearchInputError as e:
            errors.append(error_row(e, stage))
            continue
        groups.setdefault(h.series_uid, []).append(h)
        if datasets is not None:
            datasets[h.path] = ds
    return groups, errors


@dataclass(frozen=True, eq=False)
class DicomSeries:
    """A validated axial CT series, known from its headers only; :meth:`read` loads the pixels.

    Attributes:
        files: slice files ordered along the slice normal, from the stored first slice.
        shape: canonical (z, y, x) shape; spacing_mm: canonical (z, y, x) voxel size.
        affine: voxel (i, j, k) -> LPS mm of the canonical grid.
        folder: the deepest folder holding all the files (used to name the series in messages).
        stored_affine: voxel -> LPS mm of the grid as stored (column, row, file order).
    """

    series_id: str
    study_id: str
    patient_id: str
    exam_date: str | None
    files: tuple[str, ...]
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    affine: np.ndarray
    folder: str
    stored_affine: np.ndarray

    def read(self, datasets: dict | None = None) -> Volume:
        """Decode, rescale (RescaleSlope/Intercept) and reorient the slices into a Volume.

        ``datasets``: the headers ``group_series`` read, by path; each is decoded from (its
        pixels read then) and dropped, instead of parsing its file again.
        """
        datasets = {} if datasets is None else datasets
        first = _decode_slice(self.files[0], datasets.pop(self.files[0], None))
        rows, cols = first.shape
        stack = np.empty((len(self.files), rows, cols), dtype=np.int16)
        stack[0] = first
        for k, path in enumerate(self.files[1:], start=1):
            s = _decode_slice(path, datasets.pop(path, None))
            if s.shape != (rows, cols):
                raise CTSearchInputError(path, f"slice is {s.shape[0]}x{s.shape[1]}, series is {rows}x{cols}")
            stack[k] = s
        hu, affine = to_canonical(stack.transpose(2, 1, 0), self.stored_affine)
        return Volume(
            hu=hu,
            spacing_mm=self.spacing_mm,
            affine=affine,
            patient_id=self.patient_id,
            study_id=self.study_id,
            series_id=self.series_id,
            exam_date=self.exam_date,
            source=self.folder,
        )


def pixel_data_problem(path: str, ds: pydicom.Dataset) -> str | None:
    """Why the deferred pixel data of a header read with ``defer_size`` is unusable, or None.

    Catches missing pixel data, an unknown transfer syntax, and for uncompressed transfer
    syntaxes a value shorter than Rows x Columns x BitsAllocated or running past the end of the
    file (a truncated file).
    """
    if "PixelData" not in ds:
        return "missing pixel data"
    # Pixels that cannot be CT numbers: colour (RGB, palette) or 1-bit (a mask or overlay).
    samples = ds.get("SamplesPerPixel", 1)
    if samples not in (None, "") and int(samples) != 1:
        return f"not a grayscale image ({int(samples)} samples per pixel, e.g. RGB), not CT values"
    bits = ds.get("BitsAllocated")
    if bits not in (None, "") and int(bits) == 1:
        return "1-bit (binary) pixel data, not CT values"
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and not syntax.is_transfer_syntax:
        return f"unknown transfer syntax {str(syntax)!r}"
    elem = ds.get_item("PixelData", keep_deferred=True)
    length, tell = getattr(elem, "length", None), getattr(elem, "value_tell", None)
    if length is None or tell is None or length == 0xFFFFFFFF:  # loaded already, or encapsulated
        return None
    if tell + length > os.path.getsize(path):
        return f"truncated file: pixel data needs {tell + length} bytes, file has {os.path.getsize(path)}"
    if syntax is not None and syntax.is_compressed:
        return None
    try:
        needed = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
        needed = needed * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.BitsAllocated) // 8
    except (AttributeError, TypeError, ValueError):
        return "missing Rows, Columns or BitsAllocated"
    if length < needed:
        return f"pixel data holds {length} bytes, Rows x Columns x BitsAllocated need {needed}"
    return None


def plan_series(items: list[SliceHeader]) -> DicomSeries:
    """Validate one series' headers and work out its geometry.

    Raises:
        NotAxialCTSeries: a readable series that is not an axial CT stack (the reason says why).
        CTSearchInputError: a broken series (inconsistent sizes, duplicate positions ...).
    """
    folder = os.path.commonpath([os.path.dirname(os.path.abspath(h.path)) for h in items])
    h0 = items[0]
    name = f"series {h0.series_uid} ({len(items)} files)"

    def skip(reason):
        return NotAxialCTSeries(folder, f"{name}: skipped, {reason}")

    if h0.modality != "CT":
        raise skip(f"modality {h0.modality or 'missing'}, not CT")
    if "LOCALIZER" in h0.image_type:
        raise skip("localizer (scout) images")
    if any(h.frames > 1 for h in items):
        raise skip("multi-frame (enhanced) CT is not supported")
    if len(items) < 2:
        raise skip("single slice, not a volume")

    for h in items:
        for tag, value in (
            ("ImagePositionPatient", h.position),
            ("ImageOrientationPatient", h.orientation),
            ("PixelSpacing", h.pixel_spacing),
            ("Rows", h.rows),
            ("Columns", h.cols),
        ):
            if value is None:
                raise CTSearchInputError(h.path, f"{name}: slice lacks {tag}")
        if h.modality != "CT":
            raise CTSearchInputError(h.path, f"{name}: mixes modalities ({h.modality or 'missing'} and CT)")
        if h.pixel_problem:
            raise CTSearchInputError(h.path, f"{name}: {h.pixel_problem}")
        if (h.rows, h.cols) != (h0.rows, h0.cols):
            raise CTSearchInputError(
                h.path, f"{name}: slice is {h.rows}x{h.cols}, other slices are {h0.rows}x{h0.cols}"
            )
        if not np.allclose(h.orientation, h0.orientation, atol=1e-4):
            raise CTSearchInputError(h.path, f"{name}: ImageOrientationPatient differs between slices")
        if not np.allclose(h.pixel_spacing, h0.pixel_spacing, rtol=1e-4, atol=1e-5):
            raise CTSearchInputError(h.path, f"{name}: PixelSpacing differs between slices")
    ps0 = np.array(h0.pixel_spacing)
    if ps0.min() <= 0 or min(h0.rows, h0.cols) < 1:
        raise CTSearchInputError(h0.path, f"{name}: non-positive PixelSpacing or image size")
    iop = np.array(h0.orientation)
    row_dir, col_dir = iop[:3], iop[3:]
    if (
        abs(np.linalg.norm(row_dir) - 1) > 1e-3
        or abs(np.linalg.norm(col_dir) - 1) > 1e-3
        or abs(row_dir @ col_dir) > 1e-3
    ):
        raise CTSearchInputError(h0.path, f"{name}: ImageOrientationPatient is not two orthonormal vectors")
    normal = np.cross(row_dir, col_dir)
    if abs(normal[2]) < _AXIAL_MIN_COS:
        plane = "sagittal" if abs(normal[0]) >= abs(normal[1]) else "coronal"
        raise skip(f"non-axial ({plane}/oblique) slices, normal {np.round(normal, 3).tolist()}")

    # Order by position along the slice normal: file names and InstanceNumber are not trusted.
    positions = np.array([h.position for h in items])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    gaps = np.diff(along)
    dup = np.flatnonzero(gaps < 1e-3)
    if dup.size:
        a, b = items[order[dup[0]]].path, items[order[dup[0] + 1]].path
        raise CTSearchInputError(b, f"{name}: duplicate slice position {along[dup[0]]:.3f} mm, also in {a}")
    step = float(np.median(gaps))
    if np.max(np.abs(gaps - step)) > 0.05 * step + 1e-3:
        raise CTSearchInputError(
            folder,
            f"{name}: irregular slice spacing ({gaps.min():.3f} to {gaps.max():.3f} mm): missing slices?",
        )
    stored = np.eye(4)
    stored[:3, 0] = row_dir * ps0[1]  # along a row: column index i, column spacing
    stored[:3, 1] = col_dir * ps0[0]  # down a column: row index j, row spacing
    stored[:3, 2] = (positions[-1] - positions[0]) / (len(positions) - 1)
    stored[:3, 3] = positions[0]
    n_voxels = len(items) * h0.rows * h0.cols
    if n_voxels > MAX_VOXELS:
        raise CTSearchInputError(folder, f"{name}: {n_voxels} voxels, over the {MAX_VOXELS} limit")
    _, affine, shape_ijk = canonical_transform(stored, (h0.cols, h0.rows, len(items)))
    return DicomSeries(
        series_id=h0.series_uid,
        study_id=h0.study_uid,
        patient_id=h0.patient_id,
        exam_date=h0.exam_date,
        files=tuple(items[i].path for i in order),
        shape=(shape_ijk[2], shape_ijk[1], shape_ijk[0]),
        spacing_mm=spacing_of(affine),
        affine=affine,
        folder=folder,
        stored_affine=stored,
    )


def read_dicom_series(folder: str | os.PathLike) -> tuple[list[Volume], list[dict]]:
    """Read every axial CT series under ``folder`` (any depth), one Volume per SeriesInstanceUID.

    Files are recognised by content, not name. Series that are not axial CT stacks (localizer,
    single slice, other modality, sagittal/coronal) and broken series are not returned; each
    appears in the second list as ``{"path", "stage": "read", "error"}``, as does every file
    that is not readable DICOM.

    Example:
        >>> vols, skipped = read_dicom_series("exam_folder")    # doctest: +SKIP
        >>> [v.series_id for v in vols], [s["error"] for s in skipped]   # doctest: +SKIP
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CTSearchInputError(folder, "not a folder")
    datasets: dict = {}
    groups, errors = group_series(walk_files(folder), datasets=datasets)
    volumes = []
    for items in groups.values():
        try:
            volumes.append(plan_series(items).read(datasets))
        except CTSearchInputError as e:
            errors.append(error_row(e, "read"))
    return volumes, errors


def read_dicom_folder(folder: str | os.PathLike) -> Volume:
    """Read a folder (any depth) that holds exactly one axial CT series; anything else raises."""
    folder = os.fspath(folder)
    files = walk_files(folder)
    if not files:
        raise CTSearchInputError(folder, "folder holds no files")
    datasets: dict = {}
    groups, errors = group_series(files, datasets=datasets)
    if not groups and any(f.lower().endswith((".nii", ".nii.gz")) for f in files):
        raise CTSearchInputError(
            folder, "holds NIfTI files, not a DICOM series: pass one .nii/.nii.gz file, or scan the folder"
        )
    if errors:
        e = errors[0]
        more = f" (and {len(errors) - 1} more unreadable files)" if len(errors) > 1 else ""
        raise CTSearchInputError(e["path"], e["error"] + more)
    if len(groups) > 1:
        raise CTSearchInputError(
            folder,
            f"holds {len(groups)} DICOM series; pass the folder of one series "
            "(or, from Python, ctsearch.io.read_dicom_series / scan_archive)",
        )
    return plan_series(next(iter(groups.values()))).read(datasets)


def _decode_slice(path: str, ds: pydicom.Dataset | None = None) -> np.ndarray:
    """int16 [rows, cols] HU of one slice: pydicom's modality LUT, rounded and clipped.

    ``ds``: the file's header as ``group_series`` read it (pixels deferred), else it is read here.
    """
    try:
        if ds is None:
            ds = pydicom.dcmread(path, force=True)
        if "PixelData" not in ds:
            raise CTSearchInputError(path, "missing pixel data")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise CTSearchInputError(path, "not a grayscale image (SamplesPerPixel != 1)")
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    except CTSearchInputError:
        raise
    except Exception as e:
        raise CTSearchInputError(path, f"unreadable DICOM file ({_describe(e)})") from None
    try:
        pixels = ds.pixel_array
    except Exception as e:
        hint = _PLUGIN_HINTS.get(str(syntax or ""))
        detail = _describe(e)
        if hint and any(w in detail.lower() for w in ("plugin", "missing", "dependenc")):
            name = getattr(syntax, "name", str(syntax))
            raise CTSearchInputError(
                path, f"pixel data is compressed ({name}) and no installed decoder handles it: install {hint}"
            ) from None
        raise CTSearchInputError(path, f"cannot decode pixel data ({detail})") from None
    if pixels.ndim != 2:
        raise CTSearchInputError(path, f"expected one 2-D frame, pixel data has shape {pixels.shape}")
    rescale = _integer_rescale(ds, pixels)
    if rescale is not None:
        return to_hu_int16(pixels, *rescale)
    try:
        hu = apply_modality_lut(pixels, ds)
    except Exception as e:
        raise CTSearchInputError(path, f"unusable RescaleSlope/RescaleIntercept ({_describe(e)})") from None
    return to_hu_int16(hu)


def _integer_rescale(ds: pydicom.Dataset, pixels: np.ndarray) -> tuple[float, float] | None:
    """(slope, intercept) when the modality LUT is an integer rescale of integer pixels, else None.

    CT's rescale is nearly always slope 1 and an integer intercept: ``to_hu_int16`` does it
    exactly in int32, where pydicom's float64 LUT and the rounding and clipping after it cost ~4
    more passes over the slice. A LUT sequence, a fractional or unreadable rescale, or float
    pixels go through pydicom (which also words its errors).
    """
    if pixels.dtype.kind not in "iu" or "ModalityLUTSequence" in ds:
        return None
    if "RescaleSlope" not in ds or "RescaleIntercept" not in ds:
        return 1.0, 0.0  # pydicom leaves the stored values as they are
    try:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    except (TypeError, ValueError):
        return None
    return (slope, intercept) if slope.is_integer() and intercept.is_integer() else None


def _iso_date(ds: pydicom.Dataset) -> str | None:
    for tag in ("StudyDate", "SeriesDate", "AcquisitionDate"):
        d = str(ds.get(tag, "") or "").strip()
        if len(d) == 8 and d.isdigit():
            return f"{d[:4]}-{d[4:6]}-{d[6:]}"
    return None


def _describe(e: BaseException) -> str:
    text = " ".join(str(e).split()) or "no detail"
    return f"{type(e).__name__}: {text[:200]}"


# ---------------------------------------------------------------------------------------------
# The format as scan_archive and read_volume see it (ctsearch.io.formats.VolumeFormat)


class DicomFormat:
    """DICOM files, recognised by content and grouped by SeriesInstanceUID; a folder is read as its series."""

    name = "dicom"

    def claims(self, path: str) -> bool:
        return sniff_dicom(path)

    def entries(self, files: list[str], root: str, errors: list[dict]) -> list[ScanEntry]:
        entries = []
        groups, dicom_errors = group_series(files, stage="scan")
        errors.extend(dicom_errors)
        for items in groups.values():
            try:
                series = plan_series(items)
            except CTSearchInputError as e:
                errors.append(error_row(e, "scan"))
                continue
            entries.append(
                ScanEntry(
                    volume_id=series.series_id,
                    path=series.folder,
                    format="dicom",
                    patient_id=series.patient_id,
                    study_id=series.study_id,
                    series_id=series.series_id,
                    exam_date=series.exam_date,
                    label_path=None,
                    case_number=case_number(series.patient_id),
                    shape=series.shape,
                    spacing_mm=series.spacing_mm,
                    files=series.files,
                    _read=series.read,
                )
            )
        return entries

    def reads(self, path: str) -> bool:
        return os.path.isdir(path)

    def read(self, path: str, series_id: str | None = None) -> Volume:
        if series_id is None:
            return read_dicom_folder(path)
        datasets: dict = {}
        groups, _ = group_series(walk_files(path), datasets=datasets)
        if series_id not in groups:
            raise CTSearchInputError(path, f"no DICOM series {series_id} in this folder")
        return plan_series(groups[series_id]).read(datasets)
