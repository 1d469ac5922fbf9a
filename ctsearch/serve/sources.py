"""Pixels for the service: display windows, slice thumbnails, source volumes, DICOM SOP UIDs, uploads.

Everything here reads volumes with :func:`ctsearch.io.read_volume` (the one reader) and draws
with :mod:`ctsearch.report`'s window and PNG helpers. No identifying DICOM field (names, birth
dates) is read: the readers never ask pydicom for them, and an uploaded file lives only in a
private temporary folder in memory (``/dev/shm`` where there is one) while it is read.

Example:
    >>> parse_window("liver"), parse_window("40,400")
    (Window(low=50.0, high=150.0), Window(low=-160.0, high=240.0))
    >>> upload_kind(b"\\x1f\\x8b" + bytes(400)), upload_kind(b"PK\\x03\\x04" + bytes(400))
    ('nifti.gz', 'zip')
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from ctsearch.errors import CTSearchInputError
from ctsearch.hu import NARROW, WIDE, Window
from ctsearch.io.volume import Volume

# The presets the page offers; "liver" is the narrow window of the paper's clinical views.
WINDOWS: dict[str, Window] = {"wide": WIDE, "narrow": NARROW, "liver": NARROW}
UPLOAD_NAME = "upload"  # what an uploaded file is called in error messages (never a temp path)
MAX_ZIP_FILES = 4096
DICOM_SERIES_CACHED = 4096  # series whose slice order is kept (~30 kB each for 300 slices)


def parse_window(text: str | None) -> Window:
    """``wide``, ``narrow`` / ``liver``, or ``LEVEL,WIDTH`` in HU (e.g. ``40,400``) -> Window."""
    text = (text or "wide").strip().lower()
    if text in WINDOWS:
        return WINDOWS[text]
    level, sep, width = text.partition(",")
    try:
        lv, wd = float(level), float(width)
    except ValueError:
        lv = wd = float("nan")
    if not sep or not np.isfinite(lv) or not np.isfinite(wd) or wd <= 0 or wd > 10000 or abs(lv) > 10000:
        raise CTSearchInputError(
            None, f"window must be wide, narrow, liver or LEVEL,WIDTH in HU (e.g. 40,400), got {text!r}"
        )
    return Window(lv - wd / 2, lv + wd / 2)


def thumbnail_png(hu: np.ndarray, window: Window, size: int = 256) -> bytes:
    """One HU slice [h, w] in ``window`` as a grey PNG whose long side is ``size`` pixels."""
    from ctsearch.report.figures import window_grey

    img = Image.fromarray(window_grey(hu, window))
    h, w = hu.shape
    scale = size / max(h, w)
    img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class LRU:
    """A small thread-safe least-recently-used cache (``get_or_make(key, make)``)."""

    def __init__(self, size: int):
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()

    def get_or_make(self, key, make):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()  # outside the lock: reading a volume takes a while
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


class Sources:
    """The index rows' source volumes, read on demand and kept in an LRU cache.

    Args:
        cached_volumes: volumes kept decoded in memory (a 512 x 512 x 300 volume is 150 MB).
    """

    series_cached = DICOM_SERIES_CACHED

    def __init__(self, cached_volumes: int = 8):
        self._volumes = LRU(cached_volumes)
        self._dicom_files = LRU(DICOM_SERIES_CACHED)
        self._uids = LRU(65536)

    def volume(self, path: str, series_id: str | None = None) -> Volume:
        """The volume at ``path`` (a NIfTI file or a DICOM series folder)."""
        from ctsearch.io import read_volume

        return self._volumes.get_or_make((path, series_id), lambda: read_volume(path, series_id=series_id))

    def slice_hu(self, path: str, slice_index: int, series_id: str | None = None) -> np.ndarray:
        """int16 [y, x] HU of one slice of a source volume."""
        hu = self.volume(path, series_id).hu
        if not 0 <= slice_index < hu.shape[0]:
            raise CTSearchInputError(
                None,
                f"slice {slice_index} is out of range: the volume has {hu.shape[0]} slices (0..{hu.shape[0] - 1})",
            )
        return np.asarray(hu[slice_index])

    def sop_instance_uid(self, path: str, slice_index: int) -> str | None:
        """The SOPInstanceUID of canonical slice ``slice_index`` of the DICOM series in folder ``path``.

        None when ``path`` is not a folder of exactly one series. Only the series' headers are
        read (once per folder), then the one tag of the one file.
        """
        return self._uids.get_or_make((path, slice_index), lambda: self._read_uid(path, slice_index))

    def dicom_files(self, path: str) -> tuple[str, ...] | None:
        """The files of the DICOM series in folder ``path`` in canonical slice order (cached), or None."""
        return self._dicom_files.get_or_make(path, lambda: _canonical_files(path))

    def _read_uid(self, path: str, slice_index: int) -> str | None:
        files = self.dicom_files(path)
        if files is None or not 0 <= slice_index < len(files):
            return None
        import pydicom

        try:
            ds = pydicom.dcmread(
                files[slice_index], stop_before_pixels=True, specific_tags=["SOPInstanceUID"]
            )
            return str(ds.get("SOPInstanceUID", "") or "") or None
        except Exception:  # a file changed since: no UID rather than a failed search
            return None


def _canonical_files(folder: str) -> tuple[str, ...] | None:
    """The series' files in canonical slice order (slice 0 = most inferior), or None."""
    from ctsearch.io import dicom
    from ctsearch.io.orient import canonical_transform

    if not os.path.isdir(folder):
        return None
    try:
        groups, _ = dicom.group_series(dicom.walk_files(folder))
        if len(groups) != 1:
            return None
        series = dicom.plan_series(next(iter(groups.values())))
    except CTSearchInputError:
        return None
    n = len(series.files)
    # The same reorientation read_volume applies to the pixels: where the stored slice axis
    # lands and whether it is flipped.
    transform, _, _ = canonical_transform(series.stored_affine, (series.shape[2], series.shape[1], n))
    if int(transform[2, 0]) != 2:
        return None  # the stored slice axis is not the canonical z axis (not an axial stack)
    return series.files if transform[2, 1] > 0 else series.files[::-1]


# ----------------------------------------------------------------------------- uploads


def upload_kind(data: bytes) -> str:
    """What an uploaded file is, from its bytes: ``nifti.gz``, ``nifti``, ``zip`` or ``dicom``."""
    from ctsearch.io.dicom import sniff_dicom

    if data[:2] == b"\x1f\x8b":
        return "nifti.gz"
    if len(data) >= 348 and data[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    if data[:4] == b"PK\x03\x04":
        return "zip"
    with tempfile.NamedTemporaryFile(dir=_private_tmp()) as f:  # sniff_dicom reads a path
        f.write(data[:132])
        f.flush()
        if sniff_dicom(f.name):
            return "dicom"
    raise CTSearchInputError(
        UPLOAD_NAME, "is not a NIfTI file (.nii, .nii.gz), a DICOM file or a .zip of one DICOM series"
    )


def _private_tmp() -> str | None:
    # Memory-backed where the machine has it, so an uploaded scan never reaches a disk.
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def upload_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_upload(data: bytes, max_bytes: int) -> Volume:
    """An uploaded NIfTI file, DICOM file (one slice) or zip of one DICOM series -> Volume.

    Ids of a NIfTI upload are unknown (its file name is no patient id); a DICOM upload keeps
    PatientID, StudyInstanceUID and SeriesInstanceUID. Errors name the file ``upload``.
    """
    if len(data) > max_bytes:
        raise CTSearchInputError(UPLOAD_NAME, f"is {len(data)} bytes, over the server's limit of {max_bytes}")
    kind = upload_kind(data)
    tmp = tempfile.mkdtemp(prefix="ctsearch-upload-", dir=_private_tmp())  # mode 0700
    try:
        return _read_upload_in(tmp, kind, data, max_bytes)
    except CTSearchInputError as e:
        raise CTSearchInputError(
            UPLOAD_NAME, str(e).replace(tmp + os.sep, "").replace(tmp, UPLOAD_NAME)
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_upload_in(tmp: str, kind: str, data: bytes, max_bytes: int) -> Volume:
    from ctsearch.io import dicom, read_volume

    if kind.startswith("nifti"):
        path = Path(tmp) / ("upload.nii.gz" if kind == "nifti.gz" else "upload.nii")
        path.write_bytes(data)
        vol = read_volume(path)
        vol.patient_id = vol.study_id = vol.series_id = ""
        vol.source = UPLOAD_NAME
        return vol
    if kind == "dicom":
        path = Path(tmp) / "slice.dcm"
        path.write_bytes(data)
        h = dicom.read_dicom_header(path)
        if h.pixel_problem:
            raise CTSearchInputError(path, h.pixel_problem)
        hu = dicom._decode_slice(str(path))[None]
        z = h.position[2] if h.position else 0.0
        ps = h.pixel_spacing or (1.0, 1.0)
        return Volume(
            hu=hu,
            spacing_mm=(1.0, ps[0], ps[1]),
            affine=Volume.affine_from((1.0, ps[0], ps[1]), (0.0, 0.0, z)),
            patient_id=h.patient_id,
            study_id=h.study_uid,
            series_id=h.series_uid,
            exam_date=h.exam_date,
            source=UPLOAD_NAME,
        )
    folder = Path(tmp) / "series"
    folder.mkdir()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            members = [m for m in z.infolist() if not m.is_dir()]
            if len(members) > MAX_ZIP_FILES:
                raise CTSearchInputError(None, f"zip holds {len(members)} files, more than {MAX_ZIP_FILES}")
            if sum(m.file_size for m in members) > max_bytes:
                raise CTSearchInputError(
                    None, f"zip unpacks to more than the server's limit of {max_bytes} bytes"
                )
            for i, m in enumerate(members):
                # Flat, numbered names: member names are never trusted as paths.
                with z.open(m) as src, open(folder / f"{i:05d}", "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as e:
        raise CTSearchInputError(None, f"unreadable zip file ({type(e).__name__})") from None
    vol = read_volume(folder)
    vol.source = UPLOAD_NAME
    return vol
