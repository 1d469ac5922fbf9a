"""Adding shards to an index directory: the commit protocol.

A shard exists once ``index.json`` lists it; ``index.json`` is replaced atomically after the
shard's files are written, so a crash leaves either the old or the new index, never half a
shard. Files of uncommitted shards are deleted by the next writer.

On an object store (``s3://``), where there is no rename and no ``flock``, the writer works in a
local copy and publishes each commit: the shard's files are uploaded first, as write-once objects
under a name no other writer uses (``shard-00007-<random>``), then ``index.json`` is replaced by a
conditional write against the version this writer last wrote or read (``If-Match``; a new index:
``If-None-Match``). Of two writers, at most one commit per version succeeds; the other stops with
a one-line error and commits nothing more. A writer holds a :class:`ctsearch.storage.Lease` (stated
expiry, renewed while it runs) instead of the lock, and on taking over it rewrites ``index.json``
with its own token, so a stalled former holder can no longer commit. Small flat shards are merged
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

import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctsearch import storage
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
    committed_files,
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
    remote: str | None = None  # the index's URI when ``root`` is this writer's local copy of it
    _tag: str | None = None  # version of the remote index.json this writer last read or wrote
    _lease: storage.Lease | None = None

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
        check_ann(ann_threshold, ann)  # before anything is written
        if storage.is_remote(root):
            return cls._open_remote(
                os.fspath(root), model_config, model_dir, dtype, ann_threshold, ann, id_salt
            )
        root = Path(root)
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
    def _open_remote(cls, uri, model_config, model_dir, dtype, ann_threshold, ann, id_salt) -> IndexWriter:
        """Take the lease, reset this host's working copy to the committed state, fence or create."""
        storage.require_conditional_writes(uri)
        lease = storage.Lease(uri, "`ctsearch index`").acquire()
        lock = None
        try:
            # This writer's own copy: the lease, not a local lock, says who writes.
            (storage.cache_root() / "writers").mkdir(parents=True, exist_ok=True)
            work = Path(
                tempfile.mkdtemp(
                    prefix=storage.cache_dir(uri).name + "-", dir=storage.cache_root() / "writers"
                )
            )
            lock = lock_dir(work, "`ctsearch index`")
            data, tag = storage.get_versioned(storage.join(uri, INDEX_JSON))
            if data is None:
                if set(storage.list_files(uri)) - {storage.Lease.FILE}:
                    raise CTSearchInputError(
                        uri, f"exists, is not empty and has no {INDEX_JSON}; choose a new --out location"
                    )
            else:
                (work / INDEX_JSON).write_bytes(data)
                # What a writer reads: model, volume and error records (embeddings only to compact).
                names = [
                    n
                    for n in committed_files(read_manifest(work))
                    if not n.startswith(("embeddings/", "faiss/"))
                ]
                have = storage.list_files(uri)
                storage.download(uri, work, [n for n in names if n in have])
            w = cls._open_locked(
                work, model_config, model_dir, dtype, ann_threshold, ann, data is None, id_salt
            )
            w.remote, w._tag, w._lease, w._lock = uri, tag, lease, lock
            w.manifest["writer"] = {"holder": lease.holder, "token": lease.token, "since": time.time()}
            atomic_write_json(w.manifest, work / INDEX_JSON)
            # A new index: the model first. An existing one: the rewrite alone fences out a former
            # holder (its token is gone from index.json, so its next conditional write fails).
            w._publish([f"model/{f}" for f in (MODEL_JSON, ENCODER_FILE)] if data is None else [])
            w._remove_remote_leftovers()
            return w
        except BaseException:
            lease.release()
            if lock is not None:
                lock.close()
                shutil.rmtree(work, ignore_errors=True)
            raise

    def _publish(self, new_files: list[str], removed: list[str] = ()) -> None:
        """Upload ``new_files`` (write-once), then replace the remote index.json conditionally."""
        if self._lease.lost:
            raise CTSearchInputError(
                self.remote,
                "this writer's lease expired and another writer took the index over; nothing more was committed",
            )
        storage.upload(self.root, self.remote, [n for n in new_files if (self.root / n).is_file()])
        tag = storage.put_if(
            storage.join(self.remote, INDEX_JSON), (self.root / INDEX_JSON).read_bytes(), self._tag
        )
        if tag is None:
            self.close()
            raise CTSearchInputError(
                self.remote,
                "another writer committed to this index since this one read it; this commit was not made "
                "(run the command again to continue from what is committed)",
            )
        self._tag = tag
        if (self.root / "errors.parquet").is_file():  # derived from the shards' error files; read by `verify`
            storage.upload(self.root, self.remote, ["errors.parquet"])
        for name in removed:
            for f in shard_files(Path(), name):
                storage.delete(storage.join(self.remote, str(f)))

    def _remove_remote_leftovers(self) -> None:
        """Delete objects of shards no commit lists: uploads of a writer that died or lost its commit."""
        keep = set(committed_files(self.manifest))
        for n in storage.list_files(self.remote):
            if n.split("/", 1)[0] in ("embeddings", "faiss", "volumes", "errors") and n not in keep:
                storage.delete(storage.join(self.remote, n))

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
        """Release the directory lock, or the lease (the writer cannot commit after this)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self._lease is not None:
            self._lease.release()
            self._lease = None
            shutil.rmtree(self.root, ignore_errors=True)  # the writer's working copy

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
        name = self._shard_name()
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

    def _shard_name(self) -> str:
        n = f"shard-{self.manifest['next_shard']:05d}"
        # On a store, files are never overwritten: a name no other (or former) writer can pick.
        return f"{n}-{uuid.uuid4().hex[:8]}" if self.remote else n

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
        if self.remote:
            self._publish([str(f) for s in add for f in shard_files(Path(), s.name)], remove)
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
        if self.remote:
            self._publish(["errors/scan.parquet"])

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
        if self.remote:  # this writer's copy holds records only; the vectors are in the store
            storage.download(self.remote, self.root, [f"embeddings/{s.name}.parquet" for s in flats])
        read = lambda sub: pa.concat_tables(
            [pq.read_table(self.root / sub / f"{s.name}.parquet") for s in flats],
            promote_options="default",  # shards written before a column was added (pixel_hash) lack it
        )  # noqa: E731
        table, vols, errs = read("embeddings"), read("volumes").to_pylist(), read("errors").to_pylist()
        name = self._shard_name()
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
