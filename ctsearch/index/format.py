"""The files of an index directory: their names, schemas, and the commit record ``index.json``.

    INDEX_DIR/index.json                 the commit record: model, preprocessing, shard list, counts
    INDEX_DIR/model/                     a copy of the encoder (model.json + encoder.safetensors)
    INDEX_DIR/embeddings/<shard>.parquet one row per slice (store.embeddings_schema)
    INDEX_DIR/faiss/<shard>.faiss        FAISS index; FAISS id = row number in the shard's parquet
    INDEX_DIR/faiss/<shard>.vectors.npy  ANN shards only: the exact vectors, memory-mapped for re-ranking
    INDEX_DIR/volumes/<shard>.parquet    one row per input volume: content hash, status, slice count
    INDEX_DIR/errors/<shard>.parquet     what failed in that shard, and why
    INDEX_DIR/errors.parquet             all errors of all committed shards (+ archive scan errors)

On an object store (``s3://``) the same files are objects under the index's URI. Shard files are
written once, under names no other writer uses, before ``index.json`` is replaced by a conditional
write; a writer holds a lease (``.lease``) instead of a lock (ctsearch.index.writer). Readers
work on a local mirror (:func:`fetch_index`).

docs/formats.md, "Index directories", is the full description.

Example:
    >>> import numpy as np
    >>> rows = [dict(volume_id="v", patient_id="p", slice_index=i) for i in range(2)]
    >>> table_vectors(embeddings_to_table(rows, np.eye(2, 4, dtype=np.float32))).shape
    (2, 4)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from ctsearch import storage
from ctsearch.config import ENCODER_FILE, MODEL_JSON
from ctsearch.errors import CTSearchInputError
from ctsearch.store import EMBEDDING_META_SCHEMA, embeddings_schema

INDEX_JSON = "index.json"
FORMAT_VERSION = 1
META_COLUMNS = EMBEDDING_META_SCHEMA.names
# What every search hit carries, in the order the CLI and the API list it (then shard and row).
HIT_COLUMNS = ("rank", "score", *META_COLUMNS)
ROW_GROUP = 4096  # rows per parquet row group: metadata of a hit is read one row group at a time

VOLUMES_SCHEMA = pa.schema(
    [
        ("entry", pa.string()),  # path, plus "#<series id>" for a DICOM series named by the source
        ("path", pa.string()),
        ("volume_id", pa.string()),
        ("series_id", pa.string()),
        ("content_hash", pa.string()),
        ("pixel_hash", pa.string()),  # Volume.pixel_hash: equal for copies of one scan in other formats
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("n_slices", pa.int32()),
        ("status", pa.string()),  # indexed | error | duplicate
    ]
)


@dataclass(frozen=True)
class ShardRecord:
    """One committed shard, as index.json lists it.

    Example:
        >>> s = ShardRecord.from_json({"name": "shard-00000", "kind": "flat", "rows": 4, "volumes": 1, "errors": 0, "params": {}})
        >>> s.kind, s.to_json()["rows"]
        ('flat', 4)
    """

    name: str
    kind: str  # flat | ivfpq | hnsw (ctsearch.index.params.choose_kind)
    rows: int
    volumes: int
    errors: int
    params: dict = field(default_factory=dict)  # search parameters stored with the shard
    merged_from: tuple[str, ...] | None = None  # shards a compaction merged into this one

    @classmethod
    def from_json(cls, d: dict) -> ShardRecord:
        merged = d.get("merged_from")
        return cls(
            d["name"],
            d["kind"],
            int(d["rows"]),
            int(d["volumes"]),
            int(d["errors"]),
            dict(d.get("params") or {}),
            tuple(merged) if merged is not None else None,
        )

    def to_json(self) -> dict:
        d = {
            "name": self.name,
            "kind": self.kind,
            "rows": self.rows,
            "volumes": self.volumes,
            "errors": self.errors,
            "params": self.params,
        }
        if self.merged_from is not None:
            d["merged_from"] = list(self.merged_from)
        return d


def shard_files(root: Path, name: str) -> list[Path]:
    """Every file shard ``name`` may have under index directory ``root``."""
    return [
        root / "embeddings" / f"{name}.parquet",
        root / "faiss" / f"{name}.faiss",
        root / "faiss" / f"{name}.vectors.npy",
        root / "volumes" / f"{name}.parquet",
        root / "errors" / f"{name}.parquet",
    ]


def committed_files(manifest: dict) -> list[str]:
    """The files (relative paths) a reader of this index.json needs: its model and its shards'."""
    model = manifest.get("model", {}).get("dir") or "model"
    names = [f"{model}/{f}" for f in (MODEL_JSON, ENCODER_FILE)] + ["errors.parquet", "errors/scan.parquet"]
    for s in manifest.get("shards", []):
        names += [str(p) for p in shard_files(Path(), s["name"])]
    return names


def fetch_index(uri: str, attempts: int = 3) -> Path:
    """Mirror the committed state of the index at ``uri`` into the local cache and return that folder.

    index.json is read first and written into the mirror last, so the mirror always holds a
    whole commit (files of shards a compaction merged away stay in the cache, unused). A file that vanishes while being fetched (a compaction removed the shards it
    merged) means a newer commit: the fetch starts again from the new index.json.
    """
    for attempt in range(attempts):
        try:
            data = storage.read_bytes(storage.join(uri, INDEX_JSON))
        except FileNotFoundError:
            raise CTSearchInputError(
                uri, f"not an index (no {INDEX_JSON}; build one with `ctsearch index`)"
            ) from None
        try:
            manifest = json.loads(data)
            wanted = committed_files(manifest)
        except (ValueError, TypeError, KeyError, AttributeError):
            wanted = []  # read_manifest on the mirror says what is wrong with it
        try:
            local = storage.cached_copy(uri, names=wanted)
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise
            continue
        storage.write_bytes(local / INDEX_JSON, data)
        return local
    raise AssertionError("unreachable")


def embeddings_to_table(rows: list[dict] | pa.Table, vectors: np.ndarray, dtype: str = "float32") -> pa.Table:
    """Slice metadata (dicts or a table with META_COLUMNS) + [n, D] vectors -> embeddings table."""
    n, d = vectors.shape
    schema = embeddings_schema(d, dtype)
    meta = (
        rows
        if isinstance(rows, pa.Table)
        else pa.Table.from_pylist(
            [{c: r.get(c) for c in META_COLUMNS} for r in rows], schema=EMBEDDING_META_SCHEMA
        )
    )
    flat = pa.array(
        np.ascontiguousarray(vectors, dtype=np.float16 if dtype == "float16" else np.float32).reshape(-1)
    )
    emb = pa.FixedSizeListArray.from_arrays(flat, d)
    cols = [meta.column(c).cast(schema.field(c).type) for c in META_COLUMNS] + [emb]
    return pa.Table.from_arrays(cols, schema=schema)


def table_vectors(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column of an embeddings table as float32 [n, D]."""
    col = table.column("embedding").combine_chunks()
    d = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d)


def read_manifest(root: Path) -> dict:
    """index.json of index directory ``root``; a missing, unreadable or other-version file is a one-line error."""
    p = root / INDEX_JSON
    if not p.is_file():
        raise CTSearchInputError(
            root, f"not an index directory (no {INDEX_JSON}; build one with `ctsearch index`)"
        )
    try:
        m = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CTSearchInputError(p, f"unreadable index manifest ({e}); the index is damaged") from None
    if not isinstance(m, dict):
        raise CTSearchInputError(p, "is not an index manifest (expected a JSON object); the index is damaged")
    if m.get("format_version") != FORMAT_VERSION:
        raise CTSearchInputError(
            p, f"index format {m.get('format_version')} is not supported (expected {FORMAT_VERSION})"
        )
    try:  # every key a reader relies on, so a damaged manifest fails here and not mid-search
        ok = (
            isinstance(m["model"], dict)
            and isinstance(m["model"]["config"], dict)
            and int(m["embedding_dim"]) > 0
            and m["dtype"] in ("float32", "float16")
            and int(m["rows"]) >= 0
            and int(m["next_shard"]) >= 0
            and isinstance(m["shards"], list)
        )
        ok = ok and all(ShardRecord.from_json(s).rows >= 0 for s in m["shards"])
    except (KeyError, TypeError, ValueError) as e:
        what = f"no {e} entry" if isinstance(e, KeyError) else "a value of the wrong type"
        raise CTSearchInputError(p, f"index manifest has {what}; the index is damaged") from None
    if not ok:
        raise CTSearchInputError(p, "index manifest has a value of the wrong type; the index is damaged")
    return m


def damaged(path: Path, e: BaseException) -> CTSearchInputError:
    """The one-line error for an index file that exists but cannot be read as what index.json says."""
    why = " ".join(str(e).split())[:200] or type(e).__name__
    return CTSearchInputError(
        path,
        f"damaged index file ({type(e).__name__}: {why}); `ctsearch verify {path.parent.parent}` lists every damaged file",
    )
