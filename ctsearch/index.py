"""FAISS shards over slice embeddings: build, commit, load, search, merge top-k across shards.

An index directory (docs/formats.md, "Index directories") holds one *shard* per unit of work:

    INDEX_DIR/index.json                 the commit record: model, preprocessing, shard list, counts
    INDEX_DIR/model/                     a copy of the encoder (model.json + encoder.safetensors)
    INDEX_DIR/embeddings/<shard>.parquet one row per slice (store.embeddings_schema)
    INDEX_DIR/faiss/<shard>.faiss        FAISS index; FAISS id = row number in the shard's parquet
    INDEX_DIR/faiss/<shard>.vectors.npy  ANN shards only: the exact vectors, memory-mapped for re-ranking
    INDEX_DIR/volumes/<shard>.parquet    one row per input volume: content hash, status, slice count
    INDEX_DIR/errors/<shard>.parquet     what failed in that shard, and why
    INDEX_DIR/errors.parquet             all errors of all committed shards (+ archive scan errors)

A shard exists once ``index.json`` lists it; ``index.json`` is replaced atomically after the
shard's files are written, so a crash leaves either the old or the new index, never half a
shard. Files of uncommitted shards are deleted by the next writer.

Index kind per shard (the documented rule, docs/scaling.md): ``flat`` (exact inner product)
below ``ann_threshold`` vectors; at or above it ``ivfpq`` (IVF coarse quantiser + product
quantisation, then exact re-ranking of the best ``refine * k`` candidates from the stored
vectors) or, when asked for, ``hnsw`` (graph over the full vectors). Small flat shards are
merged into one ANN shard once together they reach the threshold (:meth:`IndexWriter.compact`).

Example:
    >>> import numpy as np, tempfile
    >>> from ctsearch.model import ModelConfig
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

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctsearch.errors import CTSearchInputError
from ctsearch.ids import NOT_PSEUDONYMISED, check_same_salt, ids_block, pseudonymise_ids, stored_id, withhold_ids


def check_faiss_wheels(distribution_names: list[str] | None = None) -> None:
    """Refuse to run with faiss-cpu and a faiss-gpu wheel installed together.

    Both ship the same ``faiss`` module, so the second install silently overwrites files of the
    first and the result breaks in odd places. ctsearch depends on faiss-cpu only (docs/scaling.md).
    """
    if distribution_names is None:
        from importlib import metadata

        distribution_names = [d.metadata["Name"] or "" for d in metadata.distributions()]
    names = {n.lower().replace("_", "-") for n in distribution_names}
    gpu = sorted(n for n in names if n.startswith("faiss-gpu"))
    if gpu and "faiss-cpu" in names:
        raise ImportError(
            f"faiss-cpu and {', '.join(gpu)} are both installed; they ship the same `faiss` module and break "
            f"each other. ctsearch needs faiss-cpu only: pip uninstall -y {' '.join(gpu)} faiss-cpu && pip install faiss-cpu"
        )


check_faiss_wheels()
import faiss  # noqa: E402  (after the check: a broken double install can crash on import)

from ctsearch.model import ENCODER_FILE, MODEL_JSON, ModelConfig
from ctsearch.store import (
    EMBEDDING_META_SCHEMA,
    ERRORS_SCHEMA,
    LOCK_FILE,
    atomic_write_json,
    atomic_write_table,
    embeddings_schema,
    errors_table,
    lock_dir,
)

INDEX_JSON = "index.json"
FORMAT_VERSION = 1
META_COLUMNS = EMBEDDING_META_SCHEMA.names
ROW_GROUP = 4096  # rows per parquet row group: metadata of a hit is read one row group at a time
DEFAULT_ANN_THRESHOLD = 200_000
ANN_KINDS = ("ivfpq", "hnsw")

VOLUMES_SCHEMA = pa.schema(
    [
        ("entry", pa.string()),  # path, plus "#<series id>" for a DICOM series named by the source
        ("path", pa.string()),
        ("volume_id", pa.string()),
        ("series_id", pa.string()),
        ("content_hash", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("n_slices", pa.int32()),
        ("status", pa.string()),  # indexed | error | duplicate
    ]
)


# ----------------------------------------------------------------------------- shard kinds


def choose_kind(n_vectors: int, ann_threshold: int, ann: str = "ivfpq") -> str:
    """The documented rule: exact ``flat`` below ``ann_threshold`` vectors, ``ann`` at or above."""
    if ann not in ANN_KINDS:
        raise CTSearchInputError(None, f"ANN kind must be one of {ANN_KINDS}, got {ann!r}")
    return "flat" if n_vectors < ann_threshold else ann


def ivfpq_params(n: int, d: int) -> dict:
    """IVF lists ~ sqrt(n) (>= 39 points each), PQ codes of ~32 dims per byte, probes and re-ranking.

    >>> ivfpq_params(1_000_000, 2048)
    {'nlist': 1000, 'm': 64, 'nbits': 8, 'nprobe': 31, 'refine': 200}
    """
    nlist = int(max(1, min(round(np.sqrt(n)), n // 39)))
    m = max(1, d // 32) if d >= 256 else max(1, d // 8)
    while d % m:
        m -= 1
    # Re-rank about one average list's worth of candidates for k = 5: PQ codes of near-duplicate
    # slices (one cluster) are too coarse to order them, exact vectors are not.
    refine = max(20, -(-n // nlist) // 5)
    return {"nlist": nlist, "m": m, "nbits": 8, "nprobe": min(nlist, max(16, nlist // 32)), "refine": refine}


def build_faiss(vectors: np.ndarray, kind: str, seed: int = 0, train_size: int = 200_000) -> tuple[faiss.Index, dict]:
    """[n, d] L2-normalised vectors (float32/float16, may be a memmap) -> (FAISS index, ids 0..n-1; search params).

    IVF-PQ reads ``vectors`` in chunks, so a memory-mapped float16 file of any size will do.
    """
    n, d = vectors.shape
    chunks = ((a, np.ascontiguousarray(vectors[a : a + 65536], dtype=np.float32)) for a in range(0, n, 65536))
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        for _, x in chunks:
            index.add(x)
        return index, {}
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        for _, x in chunks:
            index.add(x)
        return index, {"ef_search": 128}
    if kind == "ivfpq":
        p = ivfpq_params(n, d)
        if n < 256 * 4:
            raise CTSearchInputError(None, f"an IVF-PQ shard needs at least 1024 vectors, got {n}; raise --ann-threshold")
        # L2 on unit vectors ranks like inner product, and IVF/PQ train better with it;
        # final scores are exact inner products from the re-ranking step.
        index = faiss.index_factory(d, f"IVF{p['nlist']},PQ{p['m']}x{p['nbits']}", faiss.METRIC_L2)
        # Training cost, not recall, is what a big sample buys: 64 points per IVF list and per PQ
        # centroid are plenty for the coarse structure (re-ranking restores exact scores).
        rng = np.random.default_rng(seed)
        size = min(n, train_size, max(64 * p["nlist"], 64 * 256))
        pick = np.arange(n) if n <= size else np.sort(rng.choice(n, size, replace=False))
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.cp.seed, ivf.cp.max_points_per_centroid = seed, 64
        ivf.pq.cp.seed, ivf.pq.cp.max_points_per_centroid, ivf.pq.cp.niter = seed, 64, 15
        ivf.do_polysemous_training = False  # the factory's default; minutes of annealing we never use
        index.train(np.ascontiguousarray(vectors[pick], dtype=np.float32))
        for _, x in chunks:
            index.add(x)
        return index, {"nprobe": p["nprobe"], "refine": p["refine"]}
    raise CTSearchInputError(None, f"unknown index kind {kind!r}")


def search_shard(
    index: faiss.Index,
    kind: str,
    params: dict,
    exact: np.ndarray | None,
    queries: np.ndarray,
    k: int,
    allowed: np.ndarray | None = None,
    denied: np.ndarray | None = None,
    nprobe: int | None = None,
    refine: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Search one shard: float32 [q, d] -> (scores [q, k], ids [q, k]; id -1 = no hit).

    ``allowed`` / ``denied``: int64 row ids the search is restricted to / must skip (a FAISS
    IDSelector, so filtered rows can never come back). ``exact``: [n, d] stored vectors used to
    re-rank IVF-PQ candidates.
    """
    sel = None
    if allowed is not None:
        sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
    elif denied is not None and len(denied):
        sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.ascontiguousarray(denied, dtype=np.int64)))
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if kind == "flat":
        sp = faiss.SearchParameters(sel=sel) if sel is not None else None
        return index.search(q, k, params=sp)
    if kind == "hnsw":
        sp = faiss.SearchParametersHNSW(sel=sel, efSearch=max(int(params.get("ef_search", 128)), k))
        return index.search(q, k, params=sp)
    # ivfpq: approximate candidates, then exact inner products from the stored vectors
    r = max(1, int(refine or params.get("refine", 20)))
    sp = faiss.SearchParametersIVF(sel=sel, nprobe=int(nprobe or params.get("nprobe", 32)))
    _, cand = index.search(q, k * r, params=sp)
    scores = np.full((len(q), k), -np.inf, np.float32)
    ids = np.full((len(q), k), -1, np.int64)
    for i in range(len(q)):
        c = cand[i][cand[i] >= 0]
        if not len(c):
            continue
        c = np.sort(c)  # sorted reads from the memory-mapped vectors
        s = np.asarray(exact[c], dtype=np.float32) @ q[i]
        top = np.argsort(-s, kind="stable")[:k]
        scores[i, : len(top)], ids[i, : len(top)] = s[top], c[top]
    return scores, ids


def merge_topk(scores: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-shard (scores [q, k_s], ids [q, k_s]) -> merged (scores [q, k], shard [q, k], ids [q, k]).

    Missing hits (id -1) sort last; ties keep shard order. Padding: score -inf, shard -1, id -1.
    """
    if not scores:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32), np.zeros((0, k), np.int64)
    s = np.concatenate([np.where(i >= 0, sc, -np.inf) for sc, i in zip(scores, ids)], axis=1)
    sh = np.concatenate([np.full(i.shape, j, np.int32) for j, i in enumerate(ids)], axis=1)
    ii = np.concatenate(ids, axis=1)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    s, sh, ii = (np.take_along_axis(a, order, axis=1) for a in (s, sh, ii))
    missing = ii < 0
    sh[missing], s[missing] = -1, -np.inf
    if s.shape[1] < k:  # fewer candidates than k in total
        pad = k - s.shape[1]
        s = np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf)
        sh = np.pad(sh, ((0, 0), (0, pad)), constant_values=-1)
        ii = np.pad(ii, ((0, 0), (0, pad)), constant_values=-1)
    return s.astype(np.float32), sh, ii


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """float [n, d] -> float32 [n, d] with unit rows (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


# ----------------------------------------------------------------------------- files


def _atomic_write_bytes(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(str(tmp))
    os.replace(tmp, path)


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object, so numpy does not append ".npy" to the temp name
        np.save(f, array)


def embeddings_to_table(rows: list[dict] | pa.Table, vectors: np.ndarray, dtype: str = "float32") -> pa.Table:
    """Slice metadata (dicts or a table with META_COLUMNS) + [n, D] vectors -> embeddings table."""
    n, d = vectors.shape
    schema = embeddings_schema(d, dtype)
    meta = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(
        [{c: r.get(c) for c in META_COLUMNS} for r in rows], schema=EMBEDDING_META_SCHEMA
    )
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float16 if dtype == "float16" else np.float32).reshape(-1))
    emb = pa.FixedSizeListArray.from_arrays(flat, d)
    cols = [meta.column(c).cast(schema.field(c).type) for c in META_COLUMNS] + [emb]
    return pa.Table.from_arrays(cols, schema=schema)


def table_vectors(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column of an embeddings table as float32 [n, D]."""
    col = table.column("embedding").combine_chunks()
    d = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d)


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
    """sha256 of a file's bytes, or of (name relative to ``path``, bytes) of ``files`` / every file under a folder."""
    p = Path(path)
    h = hashlib.sha256()
    for f in _files_of(p, files):
        if f != p:
            h.update(os.path.relpath(f, p).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    return content_hash(path)


# ----------------------------------------------------------------------------- writer


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
    def create(cls, root, model_config: ModelConfig, model_dir=None, dtype: str = "float32",
               ann_threshold: int = DEFAULT_ANN_THRESHOLD, ann: str = "ivfpq", id_salt: bytes | None = None) -> "IndexWriter":
        return cls.open(root, model_config, model_dir, dtype, ann_threshold, ann, id_salt)

    @classmethod
    def open(cls, root, model_config: ModelConfig, model_dir=None, dtype: str = "float32",
             ann_threshold: int = DEFAULT_ANN_THRESHOLD, ann: str = "ivfpq", id_salt: bytes | None = None) -> "IndexWriter":
        """Start a new index at ``root`` or continue the one there (same model, dtype and id salt required).

        ``id_salt``: the rows' ids are hashed with it (ctsearch.ids); index.json records its
        fingerprint, and an index is only extended with the salt it was made with (or none).
        """
        root = Path(root)
        choose_kind(0, ann_threshold, ann)  # validates ``ann``
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
    def _open_locked(cls, root, model_config, model_dir, dtype, ann_threshold, ann, fresh, id_salt) -> "IndexWriter":
        enc_sha = _sha256_file(Path(model_dir) / ENCODER_FILE) if model_dir is not None else ""
        mpath = root / INDEX_JSON
        if mpath.is_file():
            manifest = _read_manifest(root)
            old = manifest["model"]
            if old.get("encoder_sha256") and enc_sha and old["encoder_sha256"] != enc_sha:
                raise CTSearchInputError(
                    model_dir, f"the index at {root} was built with another model ({old.get('model_id') or old['encoder_sha256'][:12]}); "
                    "use that model or a new --out directory"
                )
            if manifest["dtype"] != dtype:
                raise CTSearchInputError(root, f"the index stores {manifest['dtype']} embeddings; pass --dtype {manifest['dtype']}")
            check_same_salt(manifest.get("ids"), id_salt, root, "or choose a new --out directory")
            manifest["ann_threshold"], manifest["ann"] = int(ann_threshold), ann
        else:
            if not fresh:
                raise CTSearchInputError(root, f"exists, is not empty and has no {INDEX_JSON}; choose a new --out directory")
            cfg = model_config.to_json()
            manifest = {
                "format_version": FORMAT_VERSION,
                "model": {"model_id": model_config.model_id, "config": cfg, "encoder_sha256": enc_sha, "dir": "model"},
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
                    _atomic_write_bytes(root / "model" / f, lambda p, f=f: shutil.copyfile(Path(model_dir) / f, p))
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

    def __enter__(self) -> "IndexWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- bookkeeping
    def _shard_files(self, name: str) -> list[Path]:
        r = self.root
        return [r / "embeddings" / f"{name}.parquet", r / "faiss" / f"{name}.faiss", r / "faiss" / f"{name}.vectors.npy",
                r / "volumes" / f"{name}.parquet", r / "errors" / f"{name}.parquet"]

    def _remove_uncommitted(self) -> None:
        """Delete leftovers of a crashed run: temp files and files of shards not in index.json."""
        keep = {p for s in self.manifest["shards"] for p in self._shard_files(s["name"])}
        for sub in ("embeddings", "faiss", "volumes", "errors"):
            for f in (self.root / sub).glob("*") if (self.root / sub).is_dir() else []:
                if f.name.startswith("scan") and sub == "errors":
                    continue
                if f not in keep:
                    f.unlink()

    def _load_volumes(self) -> None:
        for s in self.manifest["shards"]:
            t = pq.read_table(self.root / "volumes" / f"{s['name']}.parquet")
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
    def commit_shard(self, rows: list[dict] | pa.Table, vectors: np.ndarray, volumes: list[dict], errors: list[dict]) -> str:
        """Write one shard's files, then commit it to index.json (atomic). Returns the shard name."""
        name = f"shard-{self.manifest['next_shard']:05d}"
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.manifest["embedding_dim"])
        kind, params = self._write_shard_files(name, rows, vectors, volumes, errors)
        self._commit(add=[{"name": name, "kind": kind, "rows": int(len(vectors)), "volumes": len(volumes),
                           "errors": len(errors), "params": params}], remove=[])
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
        _atomic_write_bytes(r / "embeddings" / f"{name}.parquet",
                            lambda p: pq.write_table(table, p, row_group_size=ROW_GROUP))
        if kind == "ivfpq":
            _atomic_write_bytes(r / "faiss" / f"{name}.vectors.npy",
                                lambda p: _save_npy(p, stored.astype(np.float16 if dtype == "float16" else np.float32)))
        _atomic_write_bytes(r / "faiss" / f"{name}.faiss", lambda p: faiss.write_index(index, p))
        vt = pa.Table.from_pylist([{c: v.get(c) for c in VOLUMES_SCHEMA.names} for v in volumes], schema=VOLUMES_SCHEMA)
        atomic_write_table(vt, r / "volumes" / f"{name}.parquet")
        atomic_write_table(errors_table(errors), r / "errors" / f"{name}.parquet")
        _crash_hook("files")
        return kind, params

    def _commit(self, add: list[dict], remove: list[str]) -> None:
        if self._lock is None:
            raise RuntimeError(f"IndexWriter for {self.root} is closed")
        m = self.manifest
        m["shards"] = [s for s in m["shards"] if s["name"] not in remove] + add
        m["next_shard"] += len(add)
        m["rows"] = sum(s["rows"] for s in m["shards"])
        m["volumes"] = sum(s["volumes"] for s in m["shards"])
        m["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self._write_errors()
        m["errors"] = pq.read_metadata(self.root / "errors.parquet").num_rows
        atomic_write_json(m, self.root / INDEX_JSON)
        for name in remove:
            for f in self._shard_files(name):
                f.unlink(missing_ok=True)
        _crash_hook("commit")

    def add_scan_errors(self, errors: list[dict]) -> None:
        """Record archive-scan failures (files that are not readable volumes) in errors.parquet."""
        path = self.root / "errors" / "scan.parquet"
        old = pq.read_table(path).to_pylist() if path.is_file() else []
        rows = _dedupe(old + list(errors))
        atomic_write_table(errors_table(rows), path)
        self._write_errors()
        self.manifest["errors"] = pq.read_metadata(self.root / "errors.parquet").num_rows
        atomic_write_json(self.manifest, self.root / INDEX_JSON)

    def _write_errors(self) -> None:
        names = [s["name"] for s in self.manifest["shards"]]
        parts = [self.root / "errors" / f"{n}.parquet" for n in names] + [self.root / "errors" / "scan.parquet"]
        rows = []
        for p in parts:
            if p.is_file():
                rows += pq.read_table(p).to_pylist()
        atomic_write_table(errors_table(_dedupe(rows)), self.root / "errors.parquet")

    def compact(self) -> str | None:
        """Merge all flat shards into one ANN shard once they hold ``ann_threshold`` vectors together.

        Memory: all their vectors at once (float32), e.g. 8 GB for 1M x 2048. Returns the new
        shard's name, or None when there was nothing to merge.
        """
        m = self.manifest
        flats = [s for s in m["shards"] if s["kind"] == "flat" and s["rows"] > 0]
        if len(flats) < 2 or sum(s["rows"] for s in flats) < m["ann_threshold"]:
            return None
        tables = [pq.read_table(self.root / "embeddings" / f"{s['name']}.parquet") for s in flats]
        table = pa.concat_tables(tables)
        vols = pa.concat_tables([pq.read_table(self.root / "volumes" / f"{s['name']}.parquet") for s in flats]).to_pylist()
        errs = pa.concat_tables([pq.read_table(self.root / "errors" / f"{s['name']}.parquet") for s in flats]).to_pylist()
        name = f"shard-{m['next_shard']:05d}"
        kind, params = self._write_shard_files(name, table.select(META_COLUMNS), table_vectors(table), vols, errs)
        self._commit(add=[{"name": name, "kind": kind, "rows": table.num_rows, "volumes": len(vols), "errors": len(errs),
                           "params": params, "merged_from": [s["name"] for s in flats]}],
                     remove=[s["name"] for s in flats])
        return name


def _dedupe(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in rows:
        key = tuple(r.get(c) for c in ERRORS_SCHEMA.names)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


CRASH_ENV = "CTSEARCH_INDEX_CRASH"  # test hook: "files:N" or "commit:N" -> crash at the N-th such point
_crash_counts: dict[str, int] = {}


class SimulatedCrash(RuntimeError):
    """Raised by the test hook CTSEARCH_INDEX_CRASH to stop a job at a chosen point."""


def _crash_hook(point: str) -> None:
    spec = os.environ.get(CRASH_ENV, "")
    if not spec.startswith(point + ":"):
        return
    _crash_counts[point] = _crash_counts.get(point, 0) + 1
    if _crash_counts[point] == int(spec.split(":")[1]):
        _crash_counts.clear()
        raise SimulatedCrash(f"simulated crash at {point} #{spec.split(':')[1]}")


def _read_manifest(root: Path) -> dict:
    p = root / INDEX_JSON
    if not p.is_file():
        raise CTSearchInputError(root, f"not an index directory (no {INDEX_JSON}; build one with `ctsearch index`)")
    try:
        m = json.loads(p.read_text())
    except ValueError as e:
        raise CTSearchInputError(p, f"unreadable index manifest ({e})") from None
    if m.get("format_version") != FORMAT_VERSION:
        raise CTSearchInputError(p, f"index format {m.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    return m


# ----------------------------------------------------------------------------- reader


@dataclass
class SearchResult:
    """Top-k hits for q queries.

    Attributes:
        scores: float32 [q, k], cosine similarity; -inf where fewer than k hits exist.
        shard: int32 [q, k], position of the hit's shard in ``Index.shards``; -1 for no hit.
        row: int64 [q, k], row number inside the shard's parquet (= FAISS id); -1 for no hit.
        hits: per query, a list of dicts: rank (1-based), score, shard, row and META_COLUMNS.
    """

    scores: np.ndarray
    shard: np.ndarray
    row: np.ndarray
    hits: list[list[dict]]


class Index:
    """A committed index directory opened for search.

    Example: ``Index.open("idx").search(vectors, k=5, exclude_patient="p7").hits[0]``.
    """

    def __init__(self, root: Path, manifest: dict, device: str = "cpu"):
        self.root, self.manifest, self.device = root, manifest, device
        self.shards = [s for s in manifest["shards"]]
        self._faiss: dict[str, faiss.Index] = {}
        self._torch: dict[str, object] = {}

    @classmethod
    def open(cls, root: str | os.PathLike, device: str = "cpu") -> "Index":
        """Open ``root`` (FAISS files load lazily, on first search)."""
        root = Path(root)
        if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
            raise CTSearchInputError(None, f"device must be cpu or cuda, got {device!r}")
        return cls(root, _read_manifest(root), device)

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    @property
    def dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    @property
    def model_dir(self) -> Path:
        return self.root / self.manifest["model"]["dir"]

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_json(self.manifest["model"]["config"])

    @property
    def ids(self) -> dict:
        """The ``ids`` block of index.json: whether ids are pseudonymised, and the salt fingerprint."""
        return self.manifest.get("ids") or dict(NOT_PSEUDONYMISED)

    def patient_key(self, patient: str | None, id_salt: bytes | None = None) -> str | None:
        """A ``--patient`` value as the rows store it: on a pseudonymised index a pseudonym as it is,
        an original id hashed with ``id_salt`` (which it then needs); elsewhere unchanged."""
        return stored_id(patient, self.ids, id_salt, self.root)

    # --- per-shard data
    def _index(self, s: dict) -> faiss.Index:
        if s["name"] not in self._faiss:
            path = self.root / "faiss" / f"{s['name']}.faiss"
            if not path.is_file():  # FAISS would raise a bare RuntimeError
                raise FileNotFoundError(path)
            self._faiss[s["name"]] = faiss.read_index(str(path))
        return self._faiss[s["name"]]

    def shard_vectors(self, s: dict) -> np.ndarray:
        """[n, d] stored vectors of a shard, without copying (FAISS flat storage or a memmap)."""
        if s["kind"] == "ivfpq":
            return np.load(self.root / "faiss" / f"{s['name']}.vectors.npy", mmap_mode="r")
        idx = self._index(s)
        if s["kind"] == "hnsw":
            idx = faiss.downcast_index(idx.storage)
        return faiss.rev_swig_ptr(idx.get_xb(), idx.ntotal * self.dim).reshape(idx.ntotal, self.dim)

    def _column(self, s: dict, name: str) -> np.ndarray:
        path = self.root / "embeddings" / f"{s['name']}.parquet"
        return _read_column(str(path), path.stat().st_mtime_ns, name)

    def rows(self, shard: int, ids: np.ndarray) -> list[dict]:
        """Metadata of rows ``ids`` of shard number ``shard``, reading only the row groups they are in."""
        p = self.root / "embeddings" / f"{self.shards[shard]['name']}.parquet"
        path, mtime = str(p), p.stat().st_mtime_ns
        starts = _row_group_starts(path, mtime)
        out = []
        for i in np.asarray(ids, dtype=np.int64):
            g = int(np.searchsorted(starts, i, side="right") - 1)
            out.append(_row_group(path, mtime, g)[int(i - starts[g])])
        return out

    def patient_rows(self, patient_id: str) -> list[np.ndarray]:
        """Per shard, the int64 row ids of ``patient_id``'s slices."""
        return [np.flatnonzero(self._column(s, "patient_id") == patient_id).astype(np.int64) for s in self.shards]

    def lookup(self, volume_id: str, slice_index: int) -> tuple[np.ndarray, dict]:
        """The stored vector [d] and metadata of row ``volume_id:slice_index``."""
        found = []
        for j, s in enumerate(self.shards):
            if not s["rows"]:
                continue
            hit = np.flatnonzero((self._column(s, "volume_id") == volume_id) & (self._column(s, "slice_index") == slice_index))
            found += [(j, int(i)) for i in hit]
        if not found:
            raise CTSearchInputError(None, f"no row {volume_id}:{slice_index} in the index at {self.root}")
        if len(found) > 1:
            raise CTSearchInputError(None, f"row {volume_id}:{slice_index} is ambiguous ({len(found)} volumes share that id)")
        j, i = found[0]
        return np.asarray(self.shard_vectors(self.shards[j])[i], np.float32), self.rows(j, [i])[0]

    def embed_query(self, query: str | os.PathLike, slice_index: int | None = None,
                    id_salt: bytes | None = None) -> tuple[np.ndarray, dict]:
        """A query -> (unit vector [d], its metadata), embedded with the index's own model.

        ``query``: a NIfTI file or DICOM series folder (``slice_index``, default the middle
        slice), or a row reference ``volume_id:slice_index`` to a slice already in the index.
        On a pseudonymised index a file's ids are hashed like the rows' (with ``id_salt``, which
        must be the index's), so its patient can be recognised; without a salt they are left
        empty rather than shown beside pseudonyms.
        """
        p = Path(query)
        if p.exists():
            from ctsearch.io import read_volume
            from ctsearch.model import embed, load_encoder

            vol = read_volume(p)
            n = vol.hu.shape[0]
            s = n // 2 if slice_index is None else int(slice_index)
            if not 0 <= s < n:
                raise CTSearchInputError(p, f"--slice {s} is out of range: the volume has {n} slices (0..{n - 1})")
            encoder, config = load_encoder(self.model_dir)
            v = l2_normalize(embed(encoder, vol.hu[s : s + 1], config))[0]
            meta = {"volume_id": vol.series_id or p.name, "patient_id": vol.patient_id, "study_id": vol.study_id,
                    "series_id": vol.series_id, "exam_date": vol.exam_date, "slice_index": s,
                    "z_mm": float(vol.z_mm()[s]), "path": str(p)}
            return v, self._query_ids(meta, id_salt)
        vid, sep, si = str(query).rpartition(":")
        if sep and vid and si.lstrip("-").isdigit():
            if slice_index is not None:
                raise CTSearchInputError(query, "a row reference names its slice; drop --slice")
            v, meta = self.lookup(vid, int(si))
            return l2_normalize(v[None])[0], meta
        raise CTSearchInputError(query, "no such file or folder, and not a row reference volume_id:slice_index")

    def _query_ids(self, meta: dict, id_salt: bytes | None) -> dict:
        if not self.ids.get("pseudonymised"):
            return meta
        if id_salt is None:
            return withhold_ids(meta)
        check_same_salt(self.ids, id_salt, self.root, "to hash the query's ids")
        return pseudonymise_ids(meta, id_salt)

    # --- search
    def search(
        self,
        vectors: np.ndarray,
        k: int = 5,
        patient: str | None = None,
        exclude_patient: str | None = None,
        nprobe: int | None = None,
        refine: int | None = None,
    ) -> SearchResult:
        """Top-k rows by cosine similarity over all shards.

        Args:
            vectors: float [q, d] or [d]; normalised here.
            k: hits per query.
            patient: only rows of this patient. exclude_patient: never rows of this patient.
            nprobe, refine: IVF-PQ overrides (lists probed; candidates re-ranked per hit).
        """
        if patient is not None and exclude_patient is not None:
            raise CTSearchInputError(None, "--patient and --exclude-patient exclude each other")
        if k < 1:
            raise CTSearchInputError(None, f"k must be >= 1, got {k}")
        q = l2_normalize(np.atleast_2d(np.asarray(vectors, np.float32)))
        if q.shape[1] != self.dim:
            raise CTSearchInputError(None, f"query vectors have dimension {q.shape[1]}, the index has {self.dim}")
        try:
            return self._search(q, k, patient, exclude_patient, nprobe, refine)
        except FileNotFoundError:
            # A writer merged shards since this Index read index.json (shards load lazily, so a
            # long-lived reader can meet a removed file): go on with the new commit.
            if not self.refresh():
                raise
            return self._search(q, k, patient, exclude_patient, nprobe, refine)

    def refresh(self) -> bool:
        """Re-read index.json; True (and caches dropped) when a writer committed since it was read."""
        manifest = _read_manifest(self.root)
        if manifest == self.manifest:
            return False
        self.manifest, self.shards = manifest, list(manifest["shards"])
        self._faiss.clear()
        self._torch.clear()
        return True

    def _search(self, q: np.ndarray, k: int, patient, exclude_patient, nprobe, refine) -> SearchResult:
        all_s, all_i = [], []
        for s in self.shards:
            allowed = denied = None
            if s["rows"] == 0:
                sc, ii = np.full((len(q), 1), -np.inf, np.float32), np.full((len(q), 1), -1, np.int64)
            else:
                if patient is not None:
                    allowed = np.flatnonzero(self._column(s, "patient_id") == patient).astype(np.int64)
                elif exclude_patient is not None:
                    denied = np.flatnonzero(self._column(s, "patient_id") == exclude_patient).astype(np.int64)
                if allowed is not None and not len(allowed):
                    sc, ii = np.full((len(q), 1), -np.inf, np.float32), np.full((len(q), 1), -1, np.int64)
                elif self.device != "cpu":
                    sc, ii = self._search_torch(s, q, k, allowed, denied)
                else:
                    exact = self.shard_vectors(s) if s["kind"] == "ivfpq" else None
                    sc, ii = search_shard(self._index(s), s["kind"], s.get("params", {}), exact, q, k, allowed, denied, nprobe, refine)
            all_s.append(sc)
            all_i.append(ii)
        scores, shard, row = merge_topk(all_s, all_i, k)
        hits = []
        for qi in range(len(q)):
            hq = []
            for rank in range(k):
                if shard[qi, rank] < 0:
                    break
                meta = self.rows(int(shard[qi, rank]), [row[qi, rank]])[0]
                hq.append({"rank": rank + 1, "score": float(scores[qi, rank]), "shard": self.shards[shard[qi, rank]]["name"],
                           "row": int(row[qi, rank]), **meta})
            hits.append(hq)
        return SearchResult(scores, shard, row, hits)

    def _search_torch(self, s: dict, q: np.ndarray, k: int, allowed, denied) -> tuple[np.ndarray, np.ndarray]:
        """Exact search on the GPU with a torch matmul (we ship faiss-cpu only: docs/scaling.md)."""
        import torch

        if s["name"] not in self._torch:
            half = self.manifest["dtype"] == "float16"
            x = torch.from_numpy(np.ascontiguousarray(self.shard_vectors(s), dtype=np.float16 if half else np.float32))
            self._torch[s["name"]] = x.to(self.device)
        return torch_topk(q, self._torch[s["name"]], k, allowed, denied)


def torch_topk(q: np.ndarray, x, k: int, allowed=None, denied=None, rescore: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products of queries ``q`` [nq, D] against ``x`` [n, D] (a torch tensor on any device).

    Candidates come from one matmul in ``x``'s dtype; the best ``k + rescore`` are then re-scored in
    float32, because a float16 matmul alone reorders near-ties (measured: recall@5 0.96 at 1M).
    ``allowed`` / ``denied``: row ids to keep / drop. Returns (scores [nq, k], ids [nq, k]; -1 = none).
    """
    import torch

    qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)).to(x.device)
    scores = (qt.to(x.dtype) @ x.T).float()
    if allowed is not None:
        mask = torch.full((x.shape[0],), float("-inf"), device=x.device)
        mask[torch.from_numpy(np.asarray(allowed)).to(x.device)] = 0.0
        scores = scores + mask
    elif denied is not None and len(denied):
        scores[:, torch.from_numpy(np.asarray(denied)).to(x.device)] = float("-inf")
    cand = torch.topk(scores, min(k + rescore, x.shape[0]), dim=1)
    exact = torch.einsum("qd,qcd->qc", qt, x[cand.indices].float())
    exact = torch.where(torch.isfinite(cand.values), exact, torch.full_like(exact, float("-inf")))
    top = torch.topk(exact, min(k, x.shape[0]), dim=1)
    sc = top.values.cpu().numpy()
    ii = torch.gather(cand.indices, 1, top.indices).cpu().numpy().astype(np.int64)
    ii[~np.isfinite(sc)] = -1
    return sc, ii


@lru_cache(maxsize=64)
def _read_column(path: str, mtime_ns: int, name: str) -> np.ndarray:
    col = pq.read_table(path, columns=[name]).column(name)
    return np.asarray(col.to_pylist(), dtype=object) if pa.types.is_string(col.type) else col.to_numpy()


@lru_cache(maxsize=64)
def _row_group_starts(path: str, mtime_ns: int) -> np.ndarray:
    md = pq.read_metadata(path)
    return np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])[:-1]


@lru_cache(maxsize=256)
def _row_group(path: str, mtime_ns: int, g: int) -> list[dict]:
    return pq.ParquetFile(path).read_row_group(g, columns=META_COLUMNS).to_pylist()
