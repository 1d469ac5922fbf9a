"""Find the volumes in an archive, and read any one of them.

:func:`scan_archive` walks a folder of any depth and returns one :class:`ScanEntry` per volume,
reading headers only (nibabel header; pydicom with the pixel data deferred, never decoded), plus one error row per
input it cannot use. It understands, also mixed in one tree:

- the Medical Segmentation Decathlon layout (``dataset.json``, ``imagesTr/``, ``labelsTr/``,
  ``imagesTs/``): each image is paired with the label of the same file name;
- loose NIfTI files (``.nii`` / ``.nii.gz``, recognised by name);
- DICOM files (recognised by content, whatever their names), grouped by SeriesInstanceUID
  across folders; only axial CT stacks become entries.

:func:`read_volume` reads one NIfTI file or one DICOM series folder into a canonical ``Volume``.

Example:
    >>> entries, errors = scan_archive("Task03_Liver")                 # doctest: +SKIP
    >>> vol = entries[0].read(); label = entries[0].read_label(vol)    # doctest: +SKIP
    >>> rows = [e.row() for e in entries]   # store.MANIFEST_SCHEMA     # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np

from ctsearch.errors import CTSearchInputError
from ctsearch.io import dicom, nifti
from ctsearch.io.volume import Volume

# Files that belong to a layout and are not volumes: never reported.
_LAYOUT_FILES = {"dataset.json"}
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
    _series: dicom.DicomSeries | None = field(default=None, repr=False, compare=False)

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
        if self._series is not None:
            return self._series.read()
        return read_volume(self.path, series_id=self.series_id if self.format == "dicom" else None)

    def read_label(self, like: Volume | None = None) -> np.ndarray | None:
        """uint8 [z, y, x] label in the canonical orientation, or None if the entry has none."""
        return None if self.label_path is None else nifti.read_label(self.label_path, like)


def read_volume(path: str | os.PathLike, *, series_id: str | None = None) -> Volume:
    """Read a NIfTI file (.nii, .nii.gz) or a folder holding one DICOM series.

    Args:
        path: the file or folder.
        series_id: for a folder holding several series, the SeriesInstanceUID to read (as in a
            manifest row); without it such a folder is an error.

    Raises:
        CTSearchInputError: for anything unreadable, naming the file and the problem.

    Example:
        >>> vol = read_volume("imagesTr/liver_3.nii.gz")   # doctest: +SKIP
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if series_id is None:
            return dicom.read_dicom_folder(path)
        groups, _ = dicom.group_series(dicom.walk_files(path))
        if series_id not in groups:
            raise CTSearchInputError(path, f"no DICOM series {series_id} in this folder")
        return dicom.plan_series(groups[series_id]).read()
    if not os.path.exists(path):
        raise CTSearchInputError(path, "no such file or folder")
    if nifti.is_nifti_path(path):
        return nifti.read_nifti(path)
    if dicom.sniff_dicom(path):
        raise CTSearchInputError(path, "a single DICOM file: pass the folder holding its series")
    raise CTSearchInputError(path, "not a NIfTI file (.nii, .nii.gz) or a folder of DICOM files")


def detect_layout(root: str | os.PathLike) -> str:
    """``"decathlon"``, ``"nifti"``, ``"dicom"``, ``"mixed"`` (NIfTI and DICOM) or ``"empty"``.

    Informative only: :func:`scan_archive` handles every layout, also mixed, in one pass.
    """
    root = os.fspath(root)
    if os.path.isfile(os.path.join(root, "dataset.json")) and os.path.isdir(os.path.join(root, "imagesTr")):
        return "decathlon"
    has_nifti = has_dicom = False
    for path in dicom.walk_files(root):
        if nifti.is_nifti_path(path) and not _is_apple_double(path):
            has_nifti = True
        elif dicom.sniff_dicom(path):
            has_dicom = True
        if has_nifti and has_dicom:
            return "mixed"
    return "nifti" if has_nifti else "dicom" if has_dicom else "empty"


def scan_archive(root: str | os.PathLike) -> tuple[list[ScanEntry], list[dict]]:
    """Find every volume under ``root`` (a folder of any depth, or one NIfTI file).

    Returns:
        (entries, errors): entries sorted by (case_number, volume_id); errors as rows of
        ``store.ERRORS_SCHEMA``: ``{"path", "stage": "scan", "error"}``, one per input that is
        not used -- unreadable or truncated files, non-image files, macOS ``._`` files, DICOM
        series that are not axial CT stacks (with the reason), Decathlon images without a label
        and labels without an image. Nothing is dropped silently.

    Raises:
        CTSearchInputError: ``root`` does not exist.
    """
    root = os.fspath(root)
    if not os.path.exists(root):
        raise CTSearchInputError(root, "no such file or folder")
    files = [root] if os.path.isfile(root) else dicom.walk_files(root)
    errors: list[dict] = []
    images: list[str] = []
    labels: list[str] = []
    dicom_files: list[str] = []
    for path in files:
        name = os.path.basename(path)
        if _is_apple_double(path):
            errors.append(_err(path, "macOS metadata file ('._' or .DS_Store), not an image"))
        elif name in _LAYOUT_FILES or _is_nifti_sidecar(path):
            continue
        elif nifti.is_nifti_path(path):
            (labels if _is_decathlon_label(path) else images).append(path)
        elif dicom.sniff_dicom(path):
            dicom_files.append(path)
        elif os.path.getsize(path) == 0:
            errors.append(_err(path, "empty file"))
        else:
            errors.append(_err(path, "not a NIfTI (.nii, .nii.gz) or DICOM file"))

    entries = _nifti_entries(images, labels, root, errors)
    groups, dicom_errors = dicom.group_series(dicom_files, stage="scan")
    errors.extend(dicom_errors)
    for items in groups.values():
        try:
            series = dicom.plan_series(items)
        except CTSearchInputError as e:
            errors.append(dicom.error_row(e, "scan"))
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
                _series=series,
            )
        )
    entries.sort(key=lambda e: (e.case_number is None, e.case_number or 0, e.volume_id))
    return entries, errors


def case_number(name: str) -> int | None:
    """``liver_12`` -> 12; None when the name does not end in ``_<digits>``."""
    m = _CASE_RE.search(name or "")
    return int(m.group(1)) if m else None


def _nifti_entries(images: list[str], labels: list[str], root: str, errors: list[dict]) -> list[ScanEntry]:
    headers: dict[str, nifti.NiftiHeader] = {}
    for path in images:
        try:
            headers[path] = nifti.read_nifti_header(path)
        except CTSearchInputError as e:
            errors.append(dicom.error_row(e, "scan"))
    label_of: dict[str, str] = {}
    for lab in labels:
        image = _decathlon_image_for(lab)
        if image not in headers:
            if not os.path.exists(image):
                errors.append(_err(lab, f"label without an image (expected {image})"))
            continue  # an unreadable image is already reported
        try:
            lh = nifti.read_nifti_header(lab)
        except CTSearchInputError as e:
            errors.append(dicom.error_row(e, "scan"))
            continue
        if lh.shape != headers[image].shape:
            errors.append(_err(lab, f"label shape {lh.shape} differs from image shape {headers[image].shape}"))
            continue
        label_of[image] = lab

    stems: dict[str, int] = {}
    for path in headers:
        stems[nifti.nifti_stem(path)] = stems.get(nifti.nifti_stem(path), 0) + 1
    entries = []
    for path, h in headers.items():
        if _in_decathlon_folder(path, "imagesTr") and path not in label_of:
            errors.append(_err(path, "Decathlon training image without a usable label in labelsTr"))
        try:
            ids = nifti.nifti_ids(path)
        except CTSearchInputError as e:
            errors.append(dicom.error_row(e, "scan"))
            continue
        stem = nifti.nifti_stem(path)
        volume_id = stem
        if stems[stem] > 1 and os.path.isdir(root):
            rel = os.path.relpath(os.path.join(os.path.dirname(path), stem), root)
            volume_id = rel.replace(os.sep, "/")
        entries.append(
            ScanEntry(
                volume_id=volume_id,
                path=path,
                format="nifti",
                patient_id=ids["patient_id"],
                study_id=ids["study_id"],
                series_id=ids["series_id"],
                exam_date=ids["exam_date"],
                label_path=label_of.get(path),
                case_number=case_number(stem),
                shape=h.shape,
                spacing_mm=h.spacing_mm,
            )
        )
    return entries


def _is_apple_double(path: str) -> bool:
    name = os.path.basename(path)
    return name.startswith("._") or name == ".DS_Store"


def _is_nifti_sidecar(path: str) -> bool:
    if not path.lower().endswith(".json"):
        return False
    base = path[: -len(".json")]
    return os.path.isfile(base + ".nii.gz") or os.path.isfile(base + ".nii")


def _in_decathlon_folder(path: str, folder: str) -> bool:
    """True for ``.../imagesTr/x`` or ``.../labelsTr/x`` whose partner folder exists beside it."""
    parent = os.path.dirname(os.path.abspath(path))
    partner = {"imagesTr": "labelsTr", "labelsTr": "imagesTr"}[folder]
    return os.path.basename(parent) == folder and os.path.isdir(os.path.join(os.path.dirname(parent), partner))


def _is_decathlon_label(path: str) -> bool:
    return _in_decathlon_folder(path, "labelsTr")


def _decathlon_image_for(label_path: str) -> str:
    parent = os.path.dirname(os.path.dirname(label_path))
    return os.path.join(parent, "imagesTr", os.path.basename(label_path))


def _err(path: str, problem: str) -> dict:
    return {"path": os.fspath(path), "stage": "scan", "error": problem}
