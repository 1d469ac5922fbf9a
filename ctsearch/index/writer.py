"""Adding shards to an index directory: the commit protocol.

A shard exists once ``index.json`` lists it; ``index.json`` is replaced atomically after the
shard's files are written, so a crash leaves either the old or the new index, never half a
shard. Files of uncommitted shards are deleted by the next writer. Small flat shards are merged
into one ANN shard once together they reach the threshold (:meth:`IndexWriter.compact`).

Example:
    >>> import numpy as np, tempfile
    >>> from ctsearch.config import ModelConfig
    >>> from ctsearch.index import Index
    >>> d = tempfile.mkdtemp()
    >>> w = IndexWriter.create(d, model_config=ModelConfig(backbone="tiny", image_size=64))
    >>> v = np.eye(4, 128, dtype=np.float32)
    >>> rows = [dict(volume_id="v", patient_id="p", study_id="s", series_id="s1", exam_date=None,
    ...              slice_index=i, z_mm=float(i), path="v.nii.gz") for i in range(4)]
    >>> w.commit_shard(rows, v, volumes=[dict(path="v.nii.gz", volume_id="v", series_id="s1",
    ...     entry="v.nii.gz", content_hash="h", size=1, mtime_ns=0, n_slices=4, status="indexed")], errors=[])
    'shard-00000'
    >>> res = Index.open(d).search(v[2:3], k=2)
    >>> res.hits[0][0]["slice_index"], round(res.hits[0][0]["score"], 3)
    (2, 1.0)
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctsearch.config import ENCODER_FILE, MODEL_JSON, ModelConfig
from ctsearch.errors import CTSearchInputError
from ctsearch.ids import check_same_salt, ids_block
from ctsearch.index.format import (
    FORMAT_VERSION,
    INDEX_JSON,
    META_COLUMNS,
    ROW_GROUP,
    VOLUMES_SCHEMA,
    ShardRecord,
    embeddings_to_table,
    read_manifest,
    shard_files,
    table_vectors,
)
from ctsearch.index.params import DEFAULT_ANN_THRESHOLD, build_faiss, check_ann, choose_kind
from ctsearch.store import (
    ERRORS_SCHEMA,
    LOCK_FILE,
    atomic_write,
    atomic_write_json,
    atomic_write_table,
    content_hash,
    errors_table,
    lock_dir,
    read_parquet,
    verify_encoder,
)


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object, so numpy does not append ".npy" to the temp name
        np.save(f, array)


@dataclass
class IndexWriter:
    """Adds shards to an index directory; one writer at a time per directory.

    Use :meth:`open` (create or continue) and :meth:`commit_shard` per unit of work, then
    :meth:`close` (or ``with IndexWriter.open(...) as w:``). The writer holds an exclusive lock
    on ``ROOT/.lock`` until then: a second writer would delete the first one's uncommitted shard
    files as crash leftovers. The OS drops the lock when the process dies, so a killed job never
    leaves a stale lock behind (on a network filesystem flock may not be enforced).
    """

    root: Path
    manifest: dict
    _known: dict = field(default_factory=dict)  # (series_id, content_hash) -> volume_id
    _entries: dict = field(default_factory=dict)  # entry -> (size, mtime_ns)
    _lock: object = None  # open file holding the flock

    @classmethod
    def create(
        cls,
        root,
        model_config: ModelConfig,
        model_dir=None,
        dtype: str = "float32",
        ann_threshold: int = DEFAULT_ANN_THRESHOLD,
        ann: str = "ivfpq",
        id_salt: bytes | None = None,
    ) -> IndexWriter:
        return cls.open(root, model_config, model_dir, dtype, ann_threshold, ann, id_salt)

    @classmethod
    def open(
        cls,
        root,
        model_config: ModelConfig,
        model_dir=None,
        dtype: str = "float32",
        ann_threshold: int = DEFAULT_ANN_THRESHOLD,
        ann: str = "ivfpq",
        id_salt: bytes | None = None,
    ) -> IndexWriter:
        """Start a new index at ``root`` or continue the one there (same model, dtype and id salt required).

        ``id_salt``: the rows' ids are hashed with it (ctsearch.ids); index.json records its
        fingerprint, and an index is only extended with the salt it was made with (or none).
        """
        root = Path(root)
        check_ann(ann_threshold, ann)  # before anything is written
        if root.exists() and not root.is_dir():
            raise CTSearchInputError(root, "is a file, not an index directory")
        fresh = not root.exists() or all(f.name == LOCK_FILE for f in root.iterdir())
        lock = lock_dir(root, "`ctsearch index`")
        try:
            w = cls._open_locked(root, model_config, model_dir, dtype, ann_threshold, ann, fresh, id_salt)
        except BaseException:
            lock.close()
            raise
        w._lock = lock
        return w

    @classmethod
    def _open_locked(
        cls, root, model_config, model_dir, dtype, ann_threshold, ann, fresh, id_salt
    ) -> IndexWriter:
        enc_sha = content_hash(Path(model_dir) / ENCODER_FILE) if model_dir is not None else ""
        mpath = root / INDEX_JSON
        if mpath.is_file():
            manifest = read_manifest(root)
            old = manifest["model"]
            if old.get("encoder_sha256"):
                # Extending with a replaced copy would mix two models' vectors in one index.
                verify_encoder(root / old.get("dir", "model"), old["encoder_sha256"], INDEX_JSON)
            if old.get("encoder_sha256") and enc_sha and old["encoder_sha256"] != enc_sha:
                raise CTSearchInputError(
                    model_dir,
                    f"the index at {root} was built with another model ({old.get('model_id') or old['encoder_sha256'][:12]}); "
                    "use that model or a new --out directory",
                )
            if manifest["dtype"] != dtype:
                raise CTSearchInputError(
                    root, f"the index stores {manifest['dtype']} embeddings; pass --dtype {manifest['dtype']}"
                )
            check_same_salt(manifest.get("ids"), id_salt, root, "or choose a new --out directory")
            manifest["ann_threshold"], manifest["ann"] = int(ann_threshold), ann
        else:
            if not fresh:
                raise CTSearchInputError(
                    root, f"exists, is not empty and has no {INDEX_JSON}; choose a new --out directory"
                )
            cfg = model_config.to_json()
            manifest = {
                "format_version": FORMAT_VERSION,
                "model": {
                    "model_id": model_config.model_id,
                    "config": cfg,
                    "encoder_sha256": enc_sha,
                    "dir": "model",
                },
                "preprocessing": {
                    "transform": "ctsearch.views.eval_transform",
                    "window_hu": list(model_config.wide),
                    "rescale": model_config.rescale,
                    "image_size": model_config.image_size,
                    "pseudo_rgb": True,
                },
                "embedding_dim": model_config.embedding_dim,
                "dtype": dtype,
                "metric": "inner_product_on_l2_normalised",
                "ids": ids_block(id_salt),
                "ann_threshold": int(ann_threshold),
                "ann": ann,
                "shards": [],
                "next_shard": 0,
                "rows": 0,
                "volumes": 0,
                "errors": 0,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            if model_dir is not None:
                for f in (MODEL_JSON, ENCODER_FILE):
                    atomic_write(root / "model" / f, lambda p, f=f: shutil.copyfile(Path(model_dir) / f, p))
            atomic_write_json(manifest, mpath)
        w = cls(root, manifest)
        w._remove_uncommitted()
        w._load_volumes()
        return w

    def close(self) -> None:
        """Release the directory lock (the writer cannot commit after this)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- bookkeeping
    def _remove_uncommitted(self) -> None:
        """Delete leftovers of a crashed run: temp files and files of shards not in index.json."""
        keep = {p for s in self.shards for p in shard_files(self.root, s.name)}
        for sub in ("embeddings", "faiss", "volumes", "errors"):
            for f in (self.root / sub).glob("*") if (self.root / sub).is_dir() else []:
                if f.name.startswith("scan") and sub == "errors":
                    continue
                if f not in keep:
                    f.unlink()

    def _load_volumes(self) -> None:
        for s in self.shards:
            t = read_parquet(self.root / "volumes" / f"{s.name}.parquet")
            for r in t.to_pylist():
                self._entries[r["entry"]] = (r["size"], r["mtime_ns"])
                if r["status"] == "indexed":
                    self._known[(r["series_id"], r["content_hash"])] = r["volume_id"]

    def unchanged(self, entry: str, fingerprint: tuple[int, int]) -> bool:
        """True if ``entry`` was already handled (indexed, failed or duplicate) with this size and mtime."""
        return self._entries.get(str(entry)) == tuple(fingerprint)

    def known_keys(self) -> set[str]:
        """``series_id|content_hash`` of every indexed volume."""
        return {f"{s}|{h}" for s, h in self._known}

    def is_indexed(self, series_id: str, chash: str) -> str | None:
        return self._known.get((series_id, chash))

    # --- commits
    def commit_shard(
        self, rows: list[dict] | pa.Table, vectors: np.ndarray, volumes: list[dict], errors: list[dict]
    ) -> str:
        """Write one shard's files, then commit it to index.json (atomic). Returns the shard name."""
        name = f"shard-{self.manifest['next_shard']:05d}"
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.manifest["embedding_dim"])
        kind, params = self._write_shard_files(name, rows, vectors, volumes, errors)
        self._commit(
            add=[ShardRecord(name, kind, int(len(vectors)), len(volumes), len(errors), params)], remove=[]
        )
        for v in volumes:
            self._entries[v["entry"]] = (v["size"], v["mtime_ns"])
            if v["status"] == "indexed":
                self._known[(v["series_id"], v["content_hash"])] = v["volume_id"]
        return name

    def _write_shard_files(self, name, rows, vectors, volumes, errors) -> tuple[str, dict]:
        r, dtype = self.root, self.manifest["dtype"]
        table = embeddings_to_table(rows, vectors, dtype)
        # The index is built from the stored (possibly float16) values so search scores equal
        # inner products of what the parquet holds.
        stored = table_vectors(table)
        kind = choose_kind(len(stored), self.manifest["ann_threshold"], self.manifest["ann"])
        index, params = build_faiss(stored, kind)
        atomic_write_table(table, r / "embeddings" / f"{name}.parquet", row_group_size=ROW_GROUP)
        if kind == "ivfpq":
            exact = stored.astype(np.float16 if dtype == "float16" else np.float32)
            atomic_write(r / "faiss" / f"{name}.vectors.npy", lambda p: _save_npy(p, exact))
        atomic_write(r / "faiss" / f"{name}.faiss", lambda p: faiss.write_index(index, p))
        vt = pa.Table.from_pylist(
            [{c: v.get(c) for c in VOLUMES_SCHEMA.names} for v in volumes], schema=VOLUMES_SCHEMA
        )
        atomic_write_table(vt, r / "volumes" / f"{name}.parquet")
        atomic_write_table(errors_table(errors), r / "errors" / f"{name}.parquet")
        return kind, params

    @property
    def shards(self) -> list[ShardRecord]:
        """The committed shards, in index.json's order."""
        return [ShardRecord.from_json(s) for s in self.manifest["shards"]]

    def _commit(self, add: list[ShardRecord], remove: list[str]) -> None:
        if self._lock is None:
            raise RuntimeError(f"IndexWriter for {self.root} is closed")
        m = self.manifest
        shards = [s for s in self.shards if s.name not in remove] + add
        m["shards"] = [s.to_json() for s in shards]
        m["next_shard"] += len(add)
        m["rows"] = sum(s.rows for s in shards)
        m["volumes"] = sum(s.volumes for s in shards)
        m["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self._write_errors()
        m["errors"] = pq.read_metadata(self.root / "errors.parquet").num_rows
        atomic_write_json(m, self.root / INDEX_JSON)
        for name in remove:
            for f in shard_files(self.root, name):
                f.unlink(missing_ok=True)

    def add_scan_errors(self, errors: list[dict]) -> None:
        """Record archive-scan failures (files that are not readable volumes) in errors.parquet."""
        path = self.root / "errors" / "scan.parquet"
        old = read_parquet(path).to_pylist() if path.is_file() else []
        rows = _dedupe(old + list(errors))
        atomic_write_table(errors_table(rows), path)
        self._write_errors()
        self.manifest["errors"] = pq.read_metadata(self.root / "errors.parquet").num_rows
        atomic_write_json(self.manifest, self.root / INDEX_JSON)

    def _write_errors(self) -> None:
        names = [s.name for s in self.shards]
        parts = [self.root / "errors" / f"{n}.parquet" for n in names] + [
            self.root / "errors" / "scan.parquet"
        ]
        rows = []
        for p in parts:
            if p.is_file():
                rows += read_parquet(p).to_pylist()
        atomic_write_table(errors_table(_dedupe(rows)), self.root / "errors.parquet")

    def compact(self) -> str | None:
        """Merge all flat shards into one ANN shard once they hold ``ann_threshold`` vectors together.

        Memory: all their vectors at once (float32), e.g. 8 GB for 1M x 2048. Returns the new
        shard's name, or None when there was nothing to merge.
        """
        m = self.manifest
        flats = [s for s in self.shards if s.kind == "flat" and s.rows > 0]
        if len(flats) < 2 or sum(s.rows for s in flats) < m["ann_threshold"]:
            return None
        read = lambda sub: pa.concat_tables(
            [pq.read_table(self.root / sub / f"{s.name}.parquet") for s in flats],
            promote_options="default",  # shards written before a column was added (pixel_hash) lack it
        )  # noqa: E731
        table, vols, errs = read("embeddings"), read("volumes").to_pylist(), read("errors").to_pylist()
        name = f"shard-{m['next_shard']:05d}"
        kind, params = self._write_shard_files(
            name, table.select(META_COLUMNS), table_vectors(table), vols, errs
        )
        merged = tuple(s.name for s in flats)
        self._commit(
            add=[ShardRecord(name, kind, table.num_rows, len(vols), len(errs), params, merged)],
            remove=list(merged),
        )
        return name


def _dedupe(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in rows:
        key = tuple(r.get(c) for c in ERRORS_SCHEMA.names)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out
