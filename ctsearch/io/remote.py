"""Archives on an object store (``s3://bucket/archive/``): scanning and reading through ``ctsearch.storage``.

The readers (``ctsearch.io.nifti``, ``ctsearch.io.dicom``) stay the only readers; what changes is
how their bytes arrive.

- **Scanning** lists the archive once, then builds a *header shadow* of it in a temp folder: each
  object becomes a sparse local file of its true size holding only the byte ranges a header scan
  reads -- the first :data:`HEAD_BYTES` (every NIfTI and DICOM header), a gzip's 4-byte size
  trailer, a DICOM file's elements after its pixel data. Small objects and JSON files are fetched
  whole, as is anything whose header does not say where its pixel data lies. ``scan_archive`` then
  runs unchanged on the shadow, and every path in its entries and errors is mapped back to the
  URI. Files it reports as broken are fetched whole and scanned again, so an error row says
  exactly what the same file on a local disk would give. Cost: one LIST, and one or two ranged
  GETs per object (a whole GET for objects under :data:`WHOLE_BYTES`).
- **Reading** one volume (:func:`volume_copy`) fetches its whole objects into a node-local temp
  folder -- the NIfTI file (with its sidecar and the archive's dataset.json when they exist), or
  the files of the DICOM series -- decodes them with the same readers and deletes them. Errors
  name the URIs. In ``ctsearch index`` this runs inside the Ray read tasks, which get the URI and
  the driver's filesystem object, never a local path of the driver.

Example:
    >>> from ctsearch.io import scan_archive
    >>> entries, errors = scan_archive("s3://bucket/Task03_Liver")       # doctest: +SKIP
    >>> entries[0].path                                                   # doctest: +SKIP
    's3://bucket/Task03_Liver/imagesTr/liver_0.nii.gz'
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs as pafs

from ctsearch import storage
from ctsearch.errors import CTSearchInputError
from ctsearch.io.entry import ScanEntry
from ctsearch.io.volume import Volume

HEAD_BYTES = 64 * 1024  # bytes fetched from the start of every object a scan reads
WHOLE_BYTES = 2 * HEAD_BYTES  # objects up to this size are fetched whole
FETCH_THREADS = 16

# ----------------------------------------------------------------------------- scanning


def scan_archive_uri(
    root: str, scan: Callable, read: Callable, fss=None
) -> tuple[list[ScanEntry], list[dict]]:
    """``ctsearch.io.scan_archive`` for a URI: entries and error rows naming URIs (module docstring).

    ``scan``, ``read``: ``ctsearch.io.scan_archive`` and ``read_volume``, which call this.
    """
    root = os.fspath(root).rstrip("/")
    infos = storage.file_infos(root, fss)
    if not infos:
        raise CTSearchInputError(root, "no such file or folder")
    with storage.local_copy("ctsearch-scan-", storage.scheme(root)) as copy:
        shadow = _Shadow(root, infos, copy, fss)
        shadow.build()
        local_root = copy.path(root)
        while True:
            entries, errors = scan(local_root)
            broken = shadow.partial_among([e["path"] for e in errors])
            if not broken:
                break
            shadow.fetch_whole(broken)  # exact errors: the reader sees every byte of these files
    entries = [_remote_entry(e, copy, read, fss) for e in entries]
    errors = [{**e, "path": copy.uris(e["path"]), "error": copy.uris(e["error"])} for e in errors]
    return entries, errors


def detect_layout_uri(root: str, fss=None) -> str:
    """``ctsearch.io.detect_layout`` for a URI, from one listing and the first bytes of objects
    not named .nii / .nii.gz (DICOM is recognised by content)."""
    from ctsearch.io.dicom import sniff_dicom
    from ctsearch.io.nifti import is_nifti_path

    root = os.fspath(root).rstrip("/")
    infos = storage.file_infos(root, fss)
    if "dataset.json" in infos and any(n.startswith("imagesTr/") for n in infos):
        return "decathlon"
    has_nifti = has_dicom = False
    with tempfile.TemporaryDirectory(prefix="ctsearch-sniff-") as tmp:
        for rel in sorted(infos):
            name = rel.rsplit("/", 1)[-1]
            if is_nifti_path(rel) and not (name.startswith("._") or name == ".DS_Store"):
                has_nifti = True
            elif not has_dicom:
                probe = os.path.join(tmp, "probe")
                with open(probe, "wb") as f:
                    f.write(storage.read_range(storage.join(root, rel) if rel else root, 0, 132, fss))
                has_dicom = sniff_dicom(probe)
            if has_nifti and has_dicom:
                return "mixed"
    return "nifti" if has_nifti else "dicom" if has_dicom else "empty"


class _Shadow:
    """The sparse local copy of an archive that a header scan reads (module docstring)."""

    def __init__(self, root: str, infos: dict[str, pafs.FileInfo], copy: storage.LocalCopy, fss):
        self.root, self.infos, self.copy, self.fss = root, infos, copy, fss
        self.partial: dict[str, str] = {}  # local path -> URI, for files holding only some ranges

    def uri(self, rel: str) -> str:
        return storage.join(self.root, rel) if rel else self.root

    def build(self) -> None:
        with ThreadPoolExecutor(FETCH_THREADS) as pool:
            list(pool.map(self._one, sorted(self.infos)))

    def _one(self, rel: str) -> None:
        uri, size = self.uri(rel), int(self.infos[rel].size or 0)
        local = self.copy.path(uri)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        if size <= WHOLE_BYTES or rel.lower().endswith(".json"):
            storage.fetch([uri], self.copy, self.fss, threads=1)
            return
        head = storage.read_range(uri, 0, HEAD_BYTES, self.fss)
        ranges = _ranges_beyond_head(uri, head, size, self.fss)
        if ranges is None:  # the header does not say which bytes a scan reads: all of them
            storage.fetch([uri], self.copy, self.fss, threads=1)
            return
        with open(local, "wb") as f:
            f.truncate(size)  # a sparse file of the object's size: holes read as zeros
            f.write(head)
            for offset, data in ranges:
                f.seek(offset)
                f.write(data)
        self.partial[local] = uri

    def partial_among(self, paths: list[str]) -> list[str]:
        """The partial files among ``paths`` (local paths of error rows). A series' error names
        its folder and comes from header values, which the shadow holds exactly."""
        return sorted({os.path.abspath(p) for p in paths} & set(self.partial))

    def fetch_whole(self, local_paths: list[str]) -> None:
        storage.fetch([self.partial.pop(p) for p in local_paths], self.copy, self.fss, FETCH_THREADS)


def _ranges_beyond_head(uri: str, head: bytes, size: int, fss) -> list[tuple[int, bytes]] | None:
    """Byte ranges past ``head`` that a header scan of this object reads ([]: none), or None when
    that cannot be told from the head (then the object is fetched whole)."""
    from ctsearch.io.dicom import sniff_dicom
    from ctsearch.io.nifti import is_nifti_path

    if is_nifti_path(uri):
        return _nifti_ranges(uri, head, size, fss)
    with tempfile.NamedTemporaryFile(prefix="ctsearch-sniff-") as probe:
        probe.write(head[:132])
        probe.flush()
        if not sniff_dicom(probe.name):
            return []  # neither: the scan reads its first bytes and its size only
    return _dicom_ranges(uri, head, size, fss)


def _nifti_ranges(uri: str, head: bytes, size: int, fss) -> list[tuple[int, bytes]] | None:
    """NIfTI: the header and extensions must lie in ``head``; a .nii.gz also needs its gzip size
    trailer, and only when that trailer agrees with the header (else the scan decompresses the
    whole stream to count, so the object is fetched whole)."""
    import nibabel as nib
    import numpy as np

    gz = uri.lower().endswith(".gz")
    try:
        data = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head) if gz else head
        sizeof = next(
            (v for fmt in ("<i", ">i") if (v := struct.unpack(fmt, data[:4])[0]) in (348, 540)), None
        )
        if sizeof is None:
            return None
        cls = nib.Nifti1Header if sizeof == 348 else nib.Nifti2Header
        header = cls.from_fileobj(io.BytesIO(data), check=False)
        offset = int(header.get_data_offset())
        needed = (
            offset + int(np.prod(header.get_data_shape(), dtype=np.int64)) * header.get_data_dtype().itemsize
        )
    except Exception:  # anything odd: let the reader see all of it
        return None
    if len(data) < max(offset, sizeof + 4) + (1024 if gz else 0):
        return None
    if not gz:
        return []
    trailer = storage.read_range(uri, size - 4, 4, fss)
    if len(trailer) != 4 or struct.unpack("<I", trailer)[0] != needed % 2**32:
        return None
    return [(size - 4, trailer)]


_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
_LONG_VRS = (b"OB", b"OW", b"OD", b"OF", b"OL", b"OV", b"UN")


def _dicom_ranges(uri: str, head: bytes, size: int, fss) -> list[tuple[int, bytes]] | None:
    """DICOM: a header scan reads every element but the pixel data, whose value it only seeks
    past. So the pixel data's element header must be in ``head``, its value must reach past it,
    and what follows it (trailing elements) is fetched."""
    i = head.find(_PIXEL_DATA_TAG)
    while i != -1 and i % 2:
        i = head.find(_PIXEL_DATA_TAG, i + 1)
    if i == -1 or i + 12 > len(head):
        return None
    if head[i + 4 : i + 6] in _LONG_VRS and head[i + 6 : i + 8] == b"\0\0":
        start, length = i + 12, struct.unpack("<I", head[i + 8 : i + 12])[0]
    else:
        start, length = i + 8, struct.unpack("<I", head[i + 4 : i + 8])[0]
    end = start + length
    if length == 0xFFFFFFFF or end > size or end < len(head) or size - end > HEAD_BYTES:
        return None  # encapsulated, truncated, short, or much after the pixels: fetch it whole
    return [(end, storage.read_range(uri, end, size - end, fss))] if end < size else []


def _remote_entry(e: ScanEntry, copy: storage.LocalCopy, read_volume: Callable, fss) -> ScanEntry:
    """A shadow scan's entry with URIs for paths, reading from the store."""
    path = copy.uris(e.path)
    label = copy.uris(e.label_path)
    files = tuple(copy.uris(f) for f in e.files)
    fmt, series = e.format, e.series_id

    def read() -> Volume:
        return read_volume_uri(
            path,
            read_volume,
            fmt=fmt,
            files=files or None,
            series_id=series if fmt == "dicom" else None,
            fss=fss,
        )

    return dataclasses.replace(
        e,
        path=path,
        label_path=label,
        files=files,
        _read=read,
        _read_label=lambda label_uri, like=None: read_label_uri(label_uri, like, fss),
    )


# ----------------------------------------------------------------------------- reading


def volume_objects(path: str, fmt: str | None, files=None, fss=None) -> list[str]:
    """The URIs one volume's read needs: a NIfTI file and those of its sidecar and the archive's
    dataset.json that exist; the ``files`` of a DICOM series, else every file under its folder."""
    if fmt == "dicom" or (fmt is None and not path.lower().endswith((".nii", ".nii.gz"))):
        if files:
            return [os.fspath(f) for f in files]
        infos = storage.file_infos(path, fss)
        return [storage.join(path, n) if n else path for n in sorted(infos)]
    from ctsearch.io.nifti import nifti_stem

    parent = path.rsplit("/", 1)[0]
    extra = [storage.join(parent, nifti_stem(path) + ".json")]
    if parent.count("/") >= 3:  # dataset.json two folders up, as for a local file
        extra.append(storage.join(parent.rsplit("/", 1)[0], "dataset.json"))
    fs, _ = storage.resolve_in(path, fss)
    try:
        there = fs.get_file_info([x.split("://", 1)[1] for x in extra])
    except OSError as e:
        raise storage.storage_error(path, e, "look this up") from None
    return [path] + [x for x, i in zip(extra, there) if i.type == pafs.FileType.File]


@contextlib.contextmanager
def volume_copy(path: str, fmt: str | None, files=None, fss=None) -> Iterator[tuple[str, list[str] | None]]:
    """(local path, local files or None) to read a volume from, for the block's duration.

    A local path is itself (nothing copied). A URI's objects (:func:`volume_objects`) are fetched
    into a node-local temp folder, deleted afterwards; a CTSearchInputError raised in the block
    names URIs, not the temp copies. A missing object is "no such file or folder", as locally.
    """
    if not storage.is_remote(path):
        yield path, (list(files) if files else None)
        return
    path = os.fspath(path).rstrip("/")
    with storage.local_copy(scheme_=storage.scheme(path)) as copy:
        try:
            try:
                objects = volume_objects(path, fmt, files, fss)
                if not objects:
                    raise FileNotFoundError(2, "No such file or directory", path)
                storage.fetch(objects, copy, fss, FETCH_THREADS)
            except FileNotFoundError:
                raise CTSearchInputError(path, "no such file or folder") from None
            yield copy.path(path), ([copy.path(f) for f in files] if files else None)
        except CTSearchInputError as e:
            raise CTSearchInputError(copy.uris(e.path), copy.uris(e.problem)) from None


def read_volume_uri(
    path: str,
    read: Callable,
    *,
    fmt: str | None = None,
    files=None,
    series_id: str | None = None,
    fss=None,
) -> Volume:
    """``read`` (``ctsearch.io.read_volume``, which calls this for a URI) of a URI -- a NIfTI
    object or a DICOM series' folder -- via a temp copy."""
    with volume_copy(path, fmt, files, fss) as (local, _):
        vol = read(local, series_id=series_id)
    vol.source = path
    return vol


def read_label_uri(path: str, like: Volume | None = None, fss=None):
    """``ctsearch.io.nifti.read_label`` of a label object, via a temp copy."""
    from ctsearch.io.nifti import read_label

    with volume_copy(path, "nifti", None, fss) as (local, _):
        return read_label(local, like)
