"""Parquet schemas for the artefacts ctsearch writes, and their readers.

Slice datasets (``train.parquet`` / ``test.parquet`` from ``ctsearch prepare --protocol decathlon``)
hold one row per slice; pixels are stored as raw little-endian bytes with their height and width
so files stay plain and readable from any language (docs/formats.md).

Example:
    >>> import numpy as np, tempfile, os
    >>> s = SliceSet(hu=np.zeros((2, 4, 4), np.int16), mask=np.zeros((2, 4, 4), np.uint8),
    ...              label=np.array([0, 1], np.int8), volume_id=np.array(["a", "a"]),
    ...              patient_id=np.array(["p", "p"]), slice_index=np.array([3, 7], np.int32),
    ...              z_mm=np.array([0.0, 10.0]))
    >>> path = os.path.join(tempfile.mkdtemp(), "train.parquet")
    >>> write_slices(s, path)
    >>> read_slices(path).hu.shape
    (2, 4, 4)
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctsearch.config import ENCODER_FILE, MODEL_JSON, RUN_CONFIG, ModelConfig
from ctsearch.errors import CTSearchInputError

MANIFEST_SCHEMA = pa.schema(
    [
        ("volume_id", pa.string()),
        ("patient_id", pa.string()),
        ("study_id", pa.string()),
        ("series_id", pa.string()),
        ("exam_date", pa.string()),
        ("path", pa.string()),
        ("format", pa.string()),  # nifti | dicom
        ("label_path", pa.string()),
        ("case_number", pa.int64()),
        ("nz", pa.int32()),
        ("ny", pa.int32()),
        ("nx", pa.int32()),
        ("spacing_z", pa.float64()),
        ("spacing_y", pa.float64()),
        ("spacing_x", pa.float64()),
    ]
)

ERRORS_SCHEMA = pa.schema([("path", pa.string()), ("stage", pa.string()), ("error", pa.string())])

SLICES_SCHEMA = pa.schema(
    [
        ("volume_id", pa.string()),
        ("patient_id", pa.string()),
        ("slice_index", pa.int32()),
        ("z_mm", pa.float64()),
        ("label", pa.int8()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("hu", pa.binary()),  # int16 little-endian, row-major [height, width]
        ("mask", pa.binary()),  # uint8 (1 = liver or tumour), row-major [height, width]
    ]
)


@dataclass
class SliceSet:
    """A stack of labelled slices.

    Attributes:
        hu: int16 [n, y, x] Hounsfield units.
        mask: uint8 [n, y, x], 1 where the slice shows liver (Decathlon label > 0).
        label: int8 [n], 1 if the slice contains liver.
        volume_id, patient_id: str [n].
        slice_index: int32 [n], index in the canonical orientation (0 = most inferior).
        z_mm: float64 [n], slice position along the body axis.
    """

    hu: np.ndarray
    mask: np.ndarray
    label: np.ndarray
    volume_id: np.ndarray
    patient_id: np.ndarray
    slice_index: np.ndarray
    z_mm: np.ndarray

    def __len__(self) -> int:
        return int(self.hu.shape[0])


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)``, then rename the temp file onto ``path``: readers never see half a file.

    The one temp + rename of ctsearch; the temp file sits beside ``path`` (same filesystem) and
    is named for this process, so concurrent writers of different files never collide.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "sub" / "a.txt"
        >>> atomic_write(p, lambda tmp: Path(tmp).write_text("done"))
        >>> p.read_text(), [f.name for f in p.parent.iterdir()]
        ('done', ['a.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except Exception as e:
        raise _with_path(e, path) from e
    finally:
        tmp.unlink(missing_ok=True)


_REFUSALS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _with_path(e: Exception, path: Path) -> Exception:
    """A full disk or refused write as an OSError naming ``path``: pyarrow's carry no file name,
    and FAISS reports them as a RuntimeError whose text holds the system's message."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None:
        code = next((c for c in _REFUSALS if os.strerror(c) in str(e)), None)
    if code not in _REFUSALS or (isinstance(e, OSError) and e.filename):
        return e
    return OSError(code, os.strerror(code), str(path))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` via temp + rename."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_table(table: pa.Table, path: str | os.PathLike, **parquet_options) -> None:
    """Write a parquet file via temp + rename (``parquet_options`` go to ``pq.write_table``)."""
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, **parquet_options))


def atomic_write_json(obj, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON via temp + rename (values JSON cannot hold are written as str)."""
    text = json.dumps(obj, indent=2, default=str)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _files_of(path: Path, files=None) -> list[Path]:
    if files is not None and len(files):
        return sorted(Path(f) for f in files)
    return [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())


def file_fingerprint(path: str | os.PathLike, files=None) -> tuple[int, int]:
    """(total bytes, newest mtime_ns) of a file, of ``files``, or of every file under a folder."""
    size, mtime = 0, 0
    for f in _files_of(Path(path), files):
        st = f.stat()
        size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
    return size, mtime


def content_hash(path: str | os.PathLike, files=None) -> str:
    """sha256 of a file's bytes, or of (name relative to ``path``, bytes) of ``files`` / every file under a folder.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "a.bin"
        >>> _ = p.write_bytes(b"abc")
        >>> content_hash(p)[:16]
        'ba7816bf8f01cfea'
    """
    p = Path(path)
    h = hashlib.sha256()
    for f in _files_of(p, files):
        if f != p:
            h.update(os.path.relpath(f, p).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- model directories


def require_model_dir(path: str | os.PathLike) -> Path:
    """The model directory ``path`` (or the folder of a model.json), checked to hold both model files."""
    p = Path(path)
    if p.is_file() and p.name == MODEL_JSON:
        p = p.parent
    if not (p / MODEL_JSON).is_file() or not (p / ENCODER_FILE).is_file():
        raise CTSearchInputError(
            p,
            f"not a model directory: expected {MODEL_JSON} and {ENCODER_FILE} (written by `ctsearch train`)",
        )
    return p


def read_json(path: str | os.PathLike, what: str) -> dict:
    """A JSON object from ``path``; an unreadable file or another JSON value is a one-line error naming ``what``."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CTSearchInputError(path, f"is not a readable {what} ({e})") from None
    if not isinstance(obj, dict):
        raise CTSearchInputError(path, f"is not a {what} (expected a JSON object)")
    return obj


def read_run_settings(run_dir: str | os.PathLike) -> tuple[dict, dict, dict]:
    """(config.json, its ``options``, the model config) of a training run directory; {} where absent.

    The model config is config.json's ``model`` block, else the run's model.json.
    """
    run = Path(run_dir)
    cfg = read_json(run / RUN_CONFIG, "run config") if (run / RUN_CONFIG).is_file() else {}
    opts, model = cfg.get("options", {}), cfg.get("model", {})
    if not model and (run / MODEL_JSON).is_file():
        model = read_json(run / MODEL_JSON, "model config")
    return cfg, opts, model


def read_model_config(model_dir: str | os.PathLike) -> ModelConfig:
    """The ModelConfig in MODEL_DIR/model.json; an unreadable or impossible config is a one-line error."""
    path = Path(model_dir) / MODEL_JSON
    d = read_json(path, "model config")
    try:
        config = ModelConfig.from_json(d)
        config.check()
    except CTSearchInputError as e:  # an unknown backbone
        raise CTSearchInputError(path, e.problem) from None
    except (ValueError, TypeError, KeyError) as e:
        raise CTSearchInputError(path, f"unusable model config ({' '.join(str(e).split())})") from None
    return config


ENCODER_SHA_KEY = "encoder_sha256"  # model.json's (and index.json's "model" block's) record of the weights


def verify_encoder(model_dir: str | os.PathLike, expected: str | None = None, recorded_in: str = "") -> str:
    """Check MODEL_DIR/encoder.safetensors against the sha256 recorded for it; returns the file's sha256.

    ``expected`` (from index.json) wins; else model.json's ``encoder_sha256`` (written by
    ``save_encoder``; older folders have none and are not checked). Replaced or damaged weights
    would otherwise give confident, wrong embeddings, so a mismatch is an error, never a warning.
    """
    d = Path(model_dir)
    enc = d / ENCODER_FILE
    if expected is None and (d / MODEL_JSON).is_file():
        expected, recorded_in = read_json(d / MODEL_JSON, "model config").get(ENCODER_SHA_KEY), MODEL_JSON
    try:
        actual = content_hash(enc)
    except OSError as e:
        raise CTSearchInputError(enc, f"cannot read the encoder weights ({e.strerror or e})") from None
    if expected and actual != expected:
        raise CTSearchInputError(
            enc,
            f"does not match the sha256 recorded in {recorded_in or MODEL_JSON} (recorded {expected[:12]}, "
            f"file {actual[:12]}): the weights were replaced or damaged; restore them or rebuild",
        )
    return actual


LOCK_FILE = ".lock"


def lock_dir(root: str | os.PathLike, job: str) -> IO[str]:
    """Create folder ``root`` if needed and take its exclusive writer lock (flock on ROOT/.lock).

    Returns the open lock file: closing it, or the process ending in any way, releases the lock,
    so a killed job never leaves a stale one. A second writer gets a one-line error naming the
    holder. ``job`` names the command that writes there, for that message. flock is not
    enforced on every network filesystem.

    Example:
        >>> import tempfile
        >>> with lock_dir(tempfile.mkdtemp(), "`ctsearch index`") as lock:
        ...     lock.closed
        False
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    f = open(root / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise CTSearchInputError(
            root,
            f"another {job} is writing to this folder ({holder}); "
            "wait for it to finish or choose another output folder",
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename}")
    f.flush()
    return f


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The objects of a JSON-lines file (e.g. a run's metrics.jsonl); a bad line is a one-line error."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise CTSearchInputError(path, f"line {n} is not JSON") from None
    return rows


def errors_table(rows: list[dict]) -> pa.Table:
    """rows of {path, stage, error} -> a table with ERRORS_SCHEMA."""
    return pa.Table.from_pylist(
        [{k: r.get(k) for k in ERRORS_SCHEMA.names} for r in rows], schema=ERRORS_SCHEMA
    )


def slices_table(s: SliceSet) -> pa.Table:
    n, h, w = s.hu.shape
    hu = np.ascontiguousarray(s.hu, dtype="<i2")
    mask = np.ascontiguousarray(s.mask, dtype=np.uint8)
    return pa.table(
        {
            "volume_id": pa.array([str(v) for v in s.volume_id], pa.string()),
            "patient_id": pa.array([str(v) for v in s.patient_id], pa.string()),
            "slice_index": pa.array(np.asarray(s.slice_index, np.int32)),
            "z_mm": pa.array(np.asarray(s.z_mm, np.float64)),
            "label": pa.array(np.asarray(s.label, np.int8)),
            "height": pa.array(np.full(n, h, np.int32)),
            "width": pa.array(np.full(n, w, np.int32)),
            "hu": pa.array([hu[i].tobytes() for i in range(n)], pa.binary()),
            "mask": pa.array([mask[i].tobytes() for i in range(n)], pa.binary()),
        },
        schema=SLICES_SCHEMA,
    )


def write_slices(s: SliceSet, path: str | os.PathLike) -> None:
    """Write a SliceSet as a slice-dataset parquet file (atomic)."""
    atomic_write_table(slices_table(s), path)


def decode_pixels(buf: bytes, height: int, width: int, dtype: str = "<i2") -> np.ndarray:
    """Raw row-major bytes of a slice dataset's ``hu`` (``<i2``) or ``mask`` (``u1``) -> [height, width].

    Returns a writable copy in native byte order; a byte count that does not match is a ValueError.

    Example:
        >>> decode_pixels(np.arange(6, dtype="<i2").tobytes(), 2, 3)
        array([[0, 1, 2],
               [3, 4, 5]], dtype=int16)
    """
    h, w, dt = int(height), int(width), np.dtype(dtype)
    if h < 1 or w < 1 or len(buf) != dt.itemsize * h * w:
        raise ValueError(f"holds {len(buf)} bytes, expected {dt.itemsize * h * w} for {h}x{w} {dt}")
    return np.frombuffer(buf, dt).reshape(h, w).astype(dt.newbyteorder("="))


def check_pixel_rows(t: pa.Table, path: str | os.PathLike) -> pa.Table:
    """``t`` itself if every row's ``hu`` (and ``mask``, where present) holds height x width
    pixels; else a one-line error naming ``path`` and the first bad slice.

    A slice dataset written by another tool, or damaged in a way its parquet checksums do not
    catch, must fail here with the file's name, not as a worker's traceback mid-training.

    Example:
        >>> t = pa.table({"height": [2], "width": [2], "hu": [b"\\0" * 6], "volume_id": ["v"], "slice_index": [3]})
        >>> check_pixel_rows(t, "train.parquet")
        Traceback (most recent call last):
        ctsearch.errors.CTSearchInputError: train.parquet: volume v slice 3: hu holds 6 bytes, not 2x2 int16 (8)
    """
    import pyarrow.compute as pc

    h = pc.fill_null(t.column("height"), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    w = pc.fill_null(t.column("width"), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    for col, dtype in (("hu", np.dtype("<i2")), ("mask", np.dtype("u1"))):
        if col not in t.column_names:
            continue
        got = pc.fill_null(pc.binary_length(t.column(col)), -1).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero((h < 1) | (w < 1) | (got != h * w * dtype.itemsize))
        if len(bad):
            i = int(bad[0])
            where = f"row {i}"
            if {"volume_id", "slice_index"} <= set(t.column_names):
                where = f"volume {t.column('volume_id')[i]} slice {t.column('slice_index')[i]}"
            held = "no bytes (null)" if got[i] < 0 else f"{got[i]} bytes"
            raise CTSearchInputError(
                path,
                f"{where}: {col} holds {held}, not {h[i]}x{w[i]} {dtype.name} ({h[i] * w[i] * dtype.itemsize})",
            )
    return t


def _require_slice_columns(path: Path, names) -> None:
    missing = set(SLICES_SCHEMA.names) - set(names)
    if missing:
        raise CTSearchInputError(path, f"not a slice dataset: missing columns {sorted(missing)}")


def read_parquet(path: str | os.PathLike, read: Callable = pq.read_table):
    """``read(path)`` (``pq.read_table`` by default); a missing, truncated or corrupt file is a
    one-line error naming it instead of an Arrow traceback."""
    try:
        return read(path)
    except (pa.ArrowException, OSError) as e:
        why = " ".join(str(e).split())[:200]
        raise CTSearchInputError(path, f"not a readable parquet file ({why})") from None


def split_path(dataset_dir: str | os.PathLike, split: str) -> Path:
    """DATASET_DIR/<split>.parquet, checked to be a slice dataset (schema only, no pixels read).

    Example:
        >>> split_path("/nonexistent", "test")
        Traceback (most recent call last):
        ...
        ctsearch.errors.CTSearchInputError: /nonexistent: no such dataset folder (run `ctsearch prepare --protocol decathlon` first)
    """
    path = Path(dataset_dir) / f"{split}.parquet"
    if not Path(dataset_dir).is_dir():
        raise CTSearchInputError(
            dataset_dir, "no such dataset folder (run `ctsearch prepare --protocol decathlon` first)"
        )
    if not path.is_file():
        raise CTSearchInputError(path, f"no {split} split in this dataset")
    _require_slice_columns(path, read_parquet(path, pq.read_schema).names)
    return path


def read_slices(path: str | os.PathLike) -> SliceSet:
    """Read a slice-dataset parquet file into numpy arrays (all slices must share one size)."""
    path = Path(path)
    if not path.is_file():
        raise CTSearchInputError(
            path, "no such slice dataset (run `ctsearch prepare --protocol decathlon` first)"
        )
    t = read_parquet(path)
    _require_slice_columns(path, t.column_names)
    check_pixel_rows(t, path)
    n = t.num_rows
    hs, ws = t.column("height").to_numpy(), t.column("width").to_numpy()
    if n and (np.any(hs != hs[0]) or np.any(ws != ws[0])):
        raise CTSearchInputError(path, "slices differ in size; resample them to one size first")
    h, w = (int(hs[0]), int(ws[0])) if n else (0, 0)

    def stack(col: str, dtype) -> np.ndarray:
        if not n:
            return np.zeros((0, 0, 0), dtype)
        return np.stack([decode_pixels(b, h, w, dtype) for b in t.column(col).to_pylist()])

    return SliceSet(
        hu=stack("hu", "<i2").astype(np.int16),
        mask=stack("mask", "u1"),
        label=t.column("label").to_numpy().astype(np.int8),
        volume_id=np.asarray(t.column("volume_id").to_pylist(), dtype=object),
        patient_id=np.asarray(t.column("patient_id").to_pylist(), dtype=object),
        slice_index=t.column("slice_index").to_numpy().astype(np.int32),
        z_mm=t.column("z_mm").to_numpy().astype(np.float64),
    )


# Index embeddings (``ctsearch index``): one row per slice, the metadata below plus
# ``embedding: fixed_size_list<float32 | float16>[D]`` (L2-normalised). docs/formats.md.
EMBEDDING_META_SCHEMA = pa.schema(
    [
        ("volume_id", pa.string()),
        ("patient_id", pa.string()),
        ("study_id", pa.string()),
        ("series_id", pa.string()),
        ("exam_date", pa.string()),
        ("slice_index", pa.int32()),
        ("z_mm", pa.float64()),
        ("path", pa.string()),
    ]
)

EmbeddingDtype = Literal["float32", "float16"]
EMBEDDING_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


def embeddings_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    """EMBEDDING_META_SCHEMA + ``embedding: fixed_size_list<dtype>[dim]``."""
    if dtype not in EMBEDDING_DTYPES:
        raise CTSearchInputError(
            None, f"embedding dtype must be one of {sorted(EMBEDDING_DTYPES)}, got {dtype!r}"
        )
    return EMBEDDING_META_SCHEMA.append(pa.field("embedding", pa.list_(EMBEDDING_DTYPES[dtype], int(dim))))
