"""NIfTI volumes: write a canonical ``Volume``, read any orientation back into it.

NIfTI world coordinates are RAS+ while ``Volume.affine`` maps voxels to LPS; the two differ by
``diag(-1, -1, 1)``. nibabel's data array is indexed ``[i, j, k]`` (x, y, z), ``Volume.hu`` is
``[k, j, i]``, so writing transposes and reading reorients with orientation codes.

Example:
    >>> import numpy as np, tempfile, os
    >>> from ctsearch.io.volume import Volume
    >>> vol = Volume(hu=np.zeros((3, 4, 5), np.int16), spacing_mm=(2.0, 0.7, 0.7),
    ...              affine=Volume.affine_from((2.0, 0.7, 0.7), (0.0, 0.0, 0.0)))
    >>> path = os.path.join(tempfile.mkdtemp(), "liver_0.nii.gz")
    >>> write_nifti(vol, path)
    >>> read_nifti(path).hu.shape
    (3, 4, 5)
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener

from ctsearch.errors import CTSearchInputError
from ctsearch.io.entry import ScanEntry, case_number
from ctsearch.io.formats import error_row, scan_error
from ctsearch.io.orient import canonical_transform, spacing_of, to_canonical
from ctsearch.io.volume import Volume, to_hu_int16
from ctsearch.store import atomic_write_bytes

# NIfTI RAS+ <-> DICOM LPS+: negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Refuse headers claiming more voxels than any CT volume plausibly holds (~4 GiB of int16),
# so a corrupt or hostile header can never make us allocate from its dims.
MAX_VOXELS = 2 * 1024**3

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_path(path: str | os.PathLike) -> bool:
    """True when the file name ends in .nii or .nii.gz (case-insensitive), ignoring macOS '._' files."""
    name = os.path.basename(os.fspath(path)).lower()
    return name.endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | os.PathLike) -> str:
    """``imagesTr/liver_3.nii.gz`` -> ``liver_3``."""
    name = os.path.basename(os.fspath(path))
    return re.sub(r"\.nii(\.gz)?$", "", name, flags=re.IGNORECASE)


def write_nifti(
    volume: Volume,
    path: str | os.PathLike,
    *,
    label: np.ndarray | None = None,
    label_path: str | os.PathLike | None = None,
) -> None:
    """Write ``volume`` as int16 NIfTI with a RAS affine; optionally its uint8 label alongside.

    Args:
        volume: canonical volume (hu int16 [z, y, x], affine voxel -> LPS mm).
        path: output file, ``.nii`` or ``.nii.gz``.
        label: uint8 [z, y, x] segmentation, same shape as ``volume.hu`` (Decathlon: 1 liver, 2 tumour).
        label_path: where to write ``label``; required when ``label`` is given.
    """
    if (label is None) != (label_path is None):
        raise ValueError("give both label and label_path, or neither")
    affine_ras = LPS_TO_RAS @ np.asarray(volume.affine, dtype=np.float64)
    _save(np.asarray(volume.hu, dtype=np.int16), affine_ras, path)
    if label is not None:
        label = np.asarray(label)
        if label.shape != volume.hu.shape:
            raise ValueError(f"label shape {label.shape} != volume shape {volume.hu.shape}")
        _save(label.astype(np.uint8), affine_ras, label_path)


def _save(zyx: np.ndarray, affine_ras: np.ndarray, path) -> None:
    img = nib.Nifti1Image(np.ascontiguousarray(zyx.transpose(2, 1, 0)), affine_ras)
    img.set_qform(affine_ras, code=1)
    img.set_sform(affine_ras, code=1)
    img.header.set_xyzt_units("mm", "sec")
    # Stored exactly: no scaling, so the reader's rounding is the identity.
    img.header.set_slope_inter(1.0, 0.0)
    data = img.to_bytes()
    if os.fspath(path).lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=1, mtime=0)  # mtime 0: the same volume, the same bytes
    # Atomic: a full disk or a killed writer never leaves half a volume behind that a scan would read.
    atomic_write_bytes(data, path)


# Deflate cannot expand data by more than ~1032:1, so a .nii.gz whose header needs more bytes than
# that is lying about its size.
_MAX_DEFLATE_RATIO = 1032


@dataclass(frozen=True)
class NiftiHeader:
    """What :func:`read_nifti_header` learns without touching voxel data.

    Attributes:
        shape: canonical (z, y, x) shape.
        spacing_mm: canonical (z, y, x) voxel size.
        affine: voxel (i, j, k) -> LPS mm of the canonical grid.
    """

    path: str
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    affine: np.ndarray


def read_nifti_header(path: str | os.PathLike) -> NiftiHeader:
    """Read and validate a NIfTI header (no voxel data); raise CTSearchInputError if unusable."""
    img, shape_ijk, affine_lps = _open_checked(path)
    _, new_affine, new_shape = canonical_transform(affine_lps, shape_ijk)
    zyx = (new_shape[2], new_shape[1], new_shape[0])
    return NiftiHeader(os.fspath(path), zyx, spacing_of(new_affine), new_affine)


def read_nifti(path: str | os.PathLike) -> Volume:
    """Read a .nii / .nii.gz CT volume into the canonical orientation, in int16 HU.

    scl_slope / scl_inter are applied, values rounded to the nearest integer and clipped to the
    int16 range; NaN becomes -1024 (air). Ids come from the file name (``liver_3.nii.gz`` ->
    ``liver_3``) unless a sidecar ``liver_3.json`` next to it gives ``patient_id``, ``study_id``,
    ``series_id`` or ``exam_date``.
    """
    img, _, affine_lps = _open_checked(path)
    data = _load_scaled(img, path, _to_int16)
    hu, affine = to_canonical(data, affine_lps)
    ids = nifti_ids(path)
    return Volume(
        hu=hu,
        spacing_mm=spacing_of(affine),
        affine=affine,
        patient_id=ids["patient_id"],
        study_id=ids["study_id"],
        series_id=ids["series_id"],
        exam_date=ids["exam_date"],
        source=os.fspath(path),
    )


def read_label(path: str | os.PathLike, like: Volume | None = None) -> np.ndarray:
    """Read a NIfTI segmentation as uint8 [z, y, x] in the canonical orientation.

    With ``like``, the label must match that volume's canonical shape (a Decathlon image and its
    label share one grid), else CTSearchInputError.
    """
    img, _, affine_lps = _open_checked(path)
    data = _load_scaled(img, path, _to_uint8)
    label, _ = to_canonical(data, affine_lps)
    if like is not None and label.shape != like.hu.shape:
        raise CTSearchInputError(path, f"label shape {label.shape} differs from image shape {like.hu.shape}")
    return label


def _open_checked(path) -> tuple[nib.Nifti1Image, tuple[int, int, int], np.ndarray]:
    """Open lazily (header only) and refuse anything whose data we should not try to read."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CTSearchInputError(path, "no such file")
    size = os.path.getsize(path)
    if size == 0:
        raise CTSearchInputError(path, "empty file")
    gz = path.lower().endswith(".gz")
    try:
        img = nib.load(path, mmap=False)
        header = img.header
        shape = tuple(int(d) for d in header.get_data_shape())
        itemsize = header.get_data_dtype().itemsize
        offset = int(img.dataobj.offset)  # img.header is a copy whose vox_offset is reset to 0
    except CTSearchInputError:
        raise
    except Exception as e:  # nibabel, gzip, zlib and EOF errors alike
        # nibabel's message for a cut .gz is vague ("cannot work out file type"): say what broke.
        problem = _gzip_problem(path)[1] if gz else None
        raise CTSearchInputError(path, problem or f"not a readable NIfTI file ({_describe(e)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise CTSearchInputError(path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
    _check_ct_header(path, img)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise CTSearchInputError(path, f"expected a 3-D volume, header says shape {shape}")
    if min(shape) < 1:
        raise CTSearchInputError(path, f"header says shape {shape}: no voxels")
    n_voxels = int(np.prod(shape, dtype=np.int64))
    if n_voxels > MAX_VOXELS:
        raise CTSearchInputError(
            path, f"header claims {n_voxels} voxels (shape {shape}), over the {MAX_VOXELS} limit"
        )
    needed = offset + n_voxels * itemsize
    if not gz and needed > size:
        raise CTSearchInputError(
            path, f"header claims {needed} bytes of image but the file holds {size} (truncated?)"
        )
    if gz:
        _check_gzip_size(path, size, needed)
    affine_ras = img.affine
    if affine_ras is None or not np.all(np.isfinite(affine_ras)):
        raise CTSearchInputError(path, "header has no usable affine")
    affine_lps = LPS_TO_RAS @ np.asarray(affine_ras, dtype=np.float64)
    try:
        canonical_transform(affine_lps, shape)
    except ValueError as e:
        raise CTSearchInputError(path, str(e)) from None
    return img, shape, affine_lps


def _check_ct_header(path: str, img) -> None:
    """Refuse voxel types that cannot hold CT numbers and geometry the reader would make up.

    Both would otherwise be read "successfully" into a volume that is wrong: complex or RGB
    values flattened to numbers, and a zero pixdim silently replaced by nibabel with 1 mm.
    """
    # The header as stored: nibabel's loaded header has its zero pixdims already "fixed" to 1.
    with ImageOpener(path) as f:
        header = type(img.header).from_fileobj(f, check=False)
    dtype = header.get_data_dtype()
    if dtype.fields is not None or dtype.kind in "cbV":
        kind = {"c": "complex", "b": "boolean"}.get(dtype.kind, "RGB/structured")
        raise CTSearchInputError(path, f"{kind} voxels ({dtype}) cannot be CT values")
    # With an sform the affine (and so the spacing) comes from it; otherwise nibabel builds it
    # from pixdim and turns a 0 there into 1 mm without saying so.
    pixdim = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    if int(header.get("sform_code", 0)) == 0 and not np.all(np.isfinite(pixdim) & (pixdim != 0)):
        raise CTSearchInputError(
            path, f"voxel size (pixdim) is {pixdim.tolist()} mm: no usable geometry (zero or not a number)"
        )


def _check_gzip_size(path: str, size: int, needed: int) -> None:
    """Make sure the gzip stream really holds ``needed`` bytes before anything allocates them."""
    if needed > _MAX_DEFLATE_RATIO * size + 1024:
        raise CTSearchInputError(
            path, f"header claims {needed} bytes of image, impossible for a {size}-byte gzip file"
        )
    with open(path, "rb") as f:
        f.seek(max(size - 4, 0))
        (isize,) = struct.unpack("<I", f.read(4).rjust(4, b"\0"))
    if isize == needed % 2**32:
        return
    # The trailer disagrees (truncated file, or several gzip members): count the real bytes.
    total, problem = _gzip_problem(path, stop_after=needed)
    if problem:
        raise CTSearchInputError(path, problem)
    if total < needed:
        raise CTSearchInputError(
            path, f"header claims {needed} bytes of image but the gzip stream holds {total} (truncated?)"
        )


def _gzip_problem(path: str, stop_after: int | None = None) -> tuple[int, str | None]:
    """Stream-decompress in bounded memory: (bytes seen, why the stream is broken or None)."""
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(chunk)
                if stop_after is not None and total >= stop_after:
                    break
    except (OSError, EOFError, zlib.error) as e:
        return total, f"truncated or corrupt gzip stream ({_describe(e)})"
    return total, None


def _load_scaled(img, path, convert) -> np.ndarray:
    """Read the voxels one k-slab at a time, scaling with scl_slope/scl_inter, then ``convert``."""
    proxy = img.dataobj
    shape = tuple(int(d) for d in img.shape[:3])
    try:
        if os.fspath(path).lower().endswith(".gz"):
            n_bytes = int(np.prod(shape, dtype=np.int64)) * proxy.dtype.itemsize
            raw = (
                _gunzip_range(path, int(proxy.offset), n_bytes)
                .view(proxy.dtype)
                .reshape(shape, order=proxy.order)
            )
        else:
            raw = np.asanyarray(proxy.get_unscaled()).reshape(shape)
        slope, inter = float(proxy.slope), float(proxy.inter)
        return convert(raw, slope, inter)
    except CTSearchInputError as e:
        raise CTSearchInputError(path, e.problem) if e.path is None else e from None
    except Exception as e:  # nibabel, gzip, zlib and EOF errors alike
        raise CTSearchInputError(path, f"cannot read voxel data ({_describe(e)})") from None


_GZ_IN = 1 << 20  # compressed bytes per zlib call
_GZ_OUT = 1 << 24  # at most this many decompressed bytes per call: bounded temporaries


def _gunzip_range(path, start: int, length: int) -> np.ndarray:
    """Bytes ``start .. start + length`` of a .gz file's decompressed stream, as a writable uint8 array.

    zlib is fed a MiB at a time and writes into the array, where gzip.GzipFile (nibabel's path)
    makes thousands of 8 kB calls per volume: 1.5-1.7x nibabel's read (bench/read.py). Several
    gzip members are read in turn; a stream that ends early is an error; what follows the member
    holding the last bytes (zero padding, say) is not read, as gzip.GzipFile ignores it.
    """
    out = np.empty(length, np.uint8)
    done, skip, data = 0, start, b""
    d = zlib.decompressobj(wbits=31)  # gzip header and trailer; the CRC is checked at each member's end
    with open(path, "rb") as f:
        while done < length:
            if d.eof:  # the member ended before the bytes asked for: the next one follows
                d = zlib.decompressobj(wbits=31)
            if not data:
                data = f.read(_GZ_IN)
                if not data:
                    raise CTSearchInputError(
                        path, f"gzip stream ends after {start + done} of {start + length} bytes (truncated?)"
                    )
            block = d.decompress(data, min(_GZ_OUT, skip + length - done))
            data = d.unused_data if d.eof else d.unconsumed_tail
            cut = min(skip, len(block))
            skip -= cut
            n = len(block) - cut
            out[done : done + n] = np.frombuffer(block, np.uint8, n, cut)
            done += n
        if not d.eof:  # the trailer usually follows the voxels: have zlib check its CRC
            d.decompress(data or f.read(_GZ_IN), 1 << 16)
    return out


def _to_int16(raw: np.ndarray, slope: float, inter: float) -> np.ndarray:
    if raw.dtype == np.int16 and slope == 1.0 and inter == 0.0:
        return raw
    out = np.empty(raw.shape, dtype=np.int16)
    for k in range(raw.shape[2]):  # per slab: bounded temporaries
        out[:, :, k] = to_hu_int16(raw[:, :, k], slope, inter)
    return out


def _to_uint8(raw: np.ndarray, slope: float, inter: float) -> np.ndarray:
    if raw.dtype == np.uint8 and slope == 1.0 and inter == 0.0:
        return raw
    out = np.empty(raw.shape, dtype=np.uint8)
    for k in range(raw.shape[2]):
        v = np.rint(np.nan_to_num(raw[:, :, k].astype(np.float64) * slope + inter, nan=0.0))
        if v.size and (v.min() < 0 or v.max() > 255):
            raise CTSearchInputError(None, f"label values outside 0..255 ({v.min():g}..{v.max():g})")
        out[:, :, k] = v
    return out


def sidecar_path(path: str | os.PathLike) -> str:
    """``dir/liver_3.nii.gz`` -> ``dir/liver_3.json``, the optional id sidecar."""
    return os.path.join(os.path.dirname(os.fspath(path)), nifti_stem(path) + ".json")


_ID_KEYS = ("patient_id", "study_id", "series_id", "exam_date")


def nifti_ids(path: str | os.PathLike) -> dict:
    """patient_id, study_id, series_id (default: the file stem) and exam_date (default None).

    The image's entry in a Decathlon ``dataset.json`` (two folders up, as ``ctsearch synth`` writes
    it) may carry any of these keys beside ``image``; a sidecar ``<stem>.json`` next to the file
    overrides both, e.g. ``{"patient_id": "P17", "study_id": "S2", "exam_date": "2019-05-02"}``.
    """
    stem = nifti_stem(path)
    ids = {"patient_id": stem, "study_id": stem, "series_id": stem, "exam_date": None}
    ids.update(_dataset_json_entry(path))
    ids.update(_sidecar(path))
    return ids


def _dataset_json_entry(path) -> dict:
    top = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    meta_path = os.path.join(top, "dataset.json")
    try:
        mtime = os.stat(meta_path).st_mtime_ns
    except OSError:
        return {}
    return _dataset_json_ids(meta_path, mtime).get(os.path.normpath(os.path.abspath(path)), {})


@functools.lru_cache(maxsize=16)
def _dataset_json_ids(meta_path: str, mtime_ns: int) -> dict[str, dict]:
    """image path -> ids, from a dataset.json; a malformed file only loses these optional ids."""
    top = os.path.dirname(meta_path)
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        items = list(meta.get("training", [])) + list(meta.get("test", []))
    except (OSError, ValueError, AttributeError, TypeError):
        return {}
    out = {}
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("image"), str):
            image = os.path.normpath(os.path.join(top, item["image"]))
            out[image] = {k: str(item[k]) for k in _ID_KEYS if item.get(k) not in (None, "")}
    return out


def _sidecar(path) -> dict:
    side = sidecar_path(path)
    if not os.path.isfile(side):
        return {}
    try:
        with open(side, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CTSearchInputError(side, f"unreadable sidecar JSON ({_describe(e)})") from None
    if not isinstance(meta, dict):
        raise CTSearchInputError(side, "sidecar JSON must be an object")
    return {k: str(meta[k]) for k in _ID_KEYS if meta.get(k) not in (None, "")}


def _describe(e: BaseException) -> str:
    text = " ".join(str(e).split()) or "no detail"
    return f"{type(e).__name__}: {text[:200]}"


# ---------------------------------------------------------------------------------------------
# The format as scan_archive and read_volume see it (ctsearch.io.formats.VolumeFormat)


class NiftiFormat:
    """NIfTI files, recognised by name; Decathlon images are paired with their labels by file name."""

    name = "nifti"

    def claims(self, path: str) -> bool:
        return is_nifti_path(path)

    def entries(self, files: list[str], root: str, errors: list[dict]) -> list[ScanEntry]:
        images = [p for p in files if not _is_decathlon_label(p)]
        labels = [p for p in files if _is_decathlon_label(p)]
        return _nifti_entries(images, labels, root, errors)

    def reads(self, path: str) -> bool:
        return os.path.isfile(path) and is_nifti_path(path)

    def read(self, path: str, series_id: str | None = None) -> Volume:
        return read_nifti(path)


def _nifti_entries(images: list[str], labels: list[str], root: str, errors: list[dict]) -> list[ScanEntry]:
    headers: dict[str, NiftiHeader] = {}
    for path in images:
        try:
            headers[path] = read_nifti_header(path)
        except CTSearchInputError as e:
            errors.append(error_row(e, "scan"))
    label_of: dict[str, str] = {}
    for lab in labels:
        image = _decathlon_image_for(lab)
        if image not in headers:
            if not os.path.exists(image):
                errors.append(scan_error(lab, f"label without an image (expected {image})"))
            continue  # an unreadable image is already reported
        try:
            lh = read_nifti_header(lab)
        except CTSearchInputError as e:
            errors.append(error_row(e, "scan"))
            continue
        if lh.shape != headers[image].shape:
            errors.append(
                scan_error(lab, f"label shape {lh.shape} differs from image shape {headers[image].shape}")
            )
            continue
        label_of[image] = lab

    stems: dict[str, int] = {}
    for path in headers:
        stems[nifti_stem(path)] = stems.get(nifti_stem(path), 0) + 1
    entries = []
    for path, h in headers.items():
        if _in_decathlon_folder(path, "imagesTr") and path not in label_of:
            errors.append(scan_error(path, "Decathlon training image without a usable label in labelsTr"))
        try:
            ids = nifti_ids(path)
        except CTSearchInputError as e:
            errors.append(error_row(e, "scan"))
            continue
        stem = nifti_stem(path)
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
                _read=lambda path=path: read_nifti(path),
                _read_label=read_label,
            )
        )
    return entries


def _in_decathlon_folder(path: str, folder: str) -> bool:
    """True for ``.../imagesTr/x`` or ``.../labelsTr/x`` whose partner folder exists beside it."""
    parent = os.path.dirname(os.path.abspath(path))
    partner = {"imagesTr": "labelsTr", "labelsTr": "imagesTr"}[folder]
    return os.path.basename(parent) == folder and os.path.isdir(
        os.path.join(os.path.dirname(parent), partner)
    )


def _is_decathlon_label(path: str) -> bool:
    return _in_decathlon_folder(path, "labelsTr")


def _decathlon_image_for(label_path: str) -> str:
    parent = os.path.dirname(os.path.dirname(label_path))
    return os.path.join(parent, "imagesTr", os.path.basename(label_path))
