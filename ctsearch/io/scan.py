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
Both loop over :data:`FORMATS` (``ctsearch.io.formats.VolumeFormat``).

Example:
    >>> entries, errors = scan_archive("Task03_Liver")                 # doctest: +SKIP
    >>> vol = entries[0].read(); label = entries[0].read_label(vol)    # doctest: +SKIP
    >>> rows = [e.row() for e in entries]   # store.MANIFEST_SCHEMA     # doctest: +SKIP
"""

from __future__ import annotations

import os

from ctsearch.errors import CTSearchInputError
from ctsearch.io.dicom import DicomFormat, sniff_dicom
from ctsearch.io.entry import ScanEntry, case_number
from ctsearch.io.formats import VolumeFormat, not_regular, scan_error, walk_files
from ctsearch.io.nifti import NiftiFormat, is_nifti_path
from ctsearch.io.volume import Volume
from ctsearch.storage import is_remote

# Every input format, in the order a file is offered to them (the first that claims it wins).
FORMATS: tuple[VolumeFormat, ...] = (NiftiFormat(), DicomFormat())

_LAYOUT_FILES = {"dataset.json"}

__all__ = ["FORMATS", "ScanEntry", "case_number", "detect_layout", "read_volume", "scan_archive"]


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
    if is_remote(path):
        from ctsearch.io.remote import read_volume_uri

        return read_volume_uri(path, read_volume, series_id=series_id)
    if not os.path.lexists(path):
        raise CTSearchInputError(path, "no such file or folder")
    if not os.path.isdir(path) and (problem := not_regular(path)):
        raise CTSearchInputError(path, problem)
    for fmt in FORMATS:
        if fmt.reads(path):
            return fmt.read(path, series_id)
    if sniff_dicom(path):
        raise CTSearchInputError(path, "a single DICOM file: pass the folder holding its series")
    raise CTSearchInputError(path, "not a NIfTI file (.nii, .nii.gz) or a folder of DICOM files")


def detect_layout(root: str | os.PathLike) -> str:
    """``"decathlon"``, ``"nifti"``, ``"dicom"``, ``"mixed"`` (NIfTI and DICOM) or ``"empty"``.

    Informative only: :func:`scan_archive` handles every layout, also mixed, in one pass.
    """
    root = os.fspath(root)
    if is_remote(root):
        from ctsearch.io.remote import detect_layout_uri

        return detect_layout_uri(root)
    if os.path.isfile(os.path.join(root, "dataset.json")) and os.path.isdir(os.path.join(root, "imagesTr")):
        return "decathlon"
    has_nifti = has_dicom = False
    for path in walk_files(root):
        if is_nifti_path(path) and not _is_apple_double(path):
            has_nifti = True
        elif sniff_dicom(path):
            has_dicom = True
        if has_nifti and has_dicom:
            return "mixed"
    return "nifti" if has_nifti else "dicom" if has_dicom else "empty"


def scan_archive(root: str | os.PathLike) -> tuple[list[ScanEntry], list[dict]]:
    """Find every volume under ``root`` (a folder of any depth, or one NIfTI file; or their URI,
    ``s3://bucket/archive``: ctsearch.io.remote).

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
    if is_remote(root):  # s3://bucket/archive: the same scan on a header shadow (ctsearch.io.remote)
        from ctsearch.io.remote import scan_archive_uri

        return scan_archive_uri(root, scan_archive, read_volume)
    if not os.path.lexists(root):
        raise CTSearchInputError(root, "no such file or folder")
    errors: list[dict] = []
    if os.path.isdir(root):
        files = walk_files(root, errors)
    else:
        problem = not_regular(root)
        files = [] if problem else [root]
        errors += [scan_error(root, problem)] if problem else []
    claimed: dict[str, list[str]] = {fmt.name: [] for fmt in FORMATS}
    for path in files:
        name = os.path.basename(path)
        if _is_apple_double(path):
            errors.append(scan_error(path, "macOS metadata file ('._' or .DS_Store), not an image"))
            continue
        if name in _LAYOUT_FILES or _is_nifti_sidecar(path):
            continue
        fmt = next((f for f in FORMATS if f.claims(path)), None)
        if fmt is not None:
            claimed[fmt.name].append(path)
        elif os.path.getsize(path) == 0:
            errors.append(scan_error(path, "empty file"))
        else:
            errors.append(scan_error(path, "not a NIfTI (.nii, .nii.gz) or DICOM file"))
    entries = [e for fmt in FORMATS for e in fmt.entries(claimed[fmt.name], root, errors)]
    entries.sort(key=lambda e: (e.case_number is None, e.case_number or 0, e.volume_id))
    return entries, errors


def _is_apple_double(path: str) -> bool:
    name = os.path.basename(path)
    return name.startswith("._") or name == ".DS_Store"


def _is_nifti_sidecar(path: str) -> bool:
    if not path.lower().endswith(".json"):
        return False
    base = path[: -len(".json")]
    return os.path.isfile(base + ".nii.gz") or os.path.isfile(base + ".nii")
