"""A committed index directory opened for search: shards load lazily, hits come with their metadata.

Example:
    >>> idx = Index.open("idx/")                                          # doctest: +SKIP
    >>> idx.search(vectors, k=5, exclude_patient="p7").hits[0][0]["score"]  # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctsearch import storage
from ctsearch.config import ModelConfig
from ctsearch.errors import CTSearchInputError
from ctsearch.ids import NOT_PSEUDONYMISED, stored_id
from ctsearch.index.format import META_COLUMNS, ShardRecord, damaged, fetch_index, read_manifest
from ctsearch.index.search import l2_normalize, merge_topk, search_shard, torch_topk


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

    def __init__(self, root: Path, manifest: dict, device: str = "cpu", source: str | None = None):
        self.root, self.manifest, self.device = root, manifest, device
        self.source = source  # the index's URI when ``root`` is a local mirror of an object store
        self.shards = [ShardRecord.from_json(s) for s in manifest["shards"]]
        self._faiss: dict[str, faiss.Index] = {}
        self._torch: dict[str, object] = {}

    @classmethod
    def open(cls, root: str | os.PathLike, device: str = "cpu") -> Index:
        """Open ``root``, a folder or an object-store URI (FAISS files load lazily, on first search).

        A URI is mirrored into the local cache first (:func:`ctsearch.index.format.fetch_index`):
        FAISS and the re-ranking memory maps need local files.
        """
        if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
            raise CTSearchInputError(None, f"device must be cpu or cuda, got {device!r}")
        if storage.is_remote(root):
            local = fetch_index(root)
            return cls(local, read_manifest(local), device, source=os.fspath(root))
        root = Path(root)
        return cls(root, read_manifest(root), device)

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    @property
    def dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    @property
    def model_dir(self) -> Path:
        return self.root / self.manifest["model"]["dir"]

    @property
    def encoder_sha256(self) -> str | None:
        """The sha256 index.json records for INDEX/model/encoder.safetensors (None in an index without a model)."""
        return self.manifest["model"].get("encoder_sha256") or None

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
    def _index(self, s: ShardRecord) -> faiss.Index:
        if s.name not in self._faiss:
            path = self.root / "faiss" / f"{s.name}.faiss"
            if not path.is_file():  # FAISS would raise a bare RuntimeError
                raise FileNotFoundError(path)
            try:
                index = faiss.read_index(str(path))
            except RuntimeError as e:  # truncated or overwritten
                raise damaged(path, e) from None
            if index.ntotal != s.rows or index.d != self.dim:
                raise damaged(
                    path,
                    ValueError(f"holds {index.ntotal} x {index.d}, index.json says {s.rows} x {self.dim}"),
                )
            self._faiss[s.name] = index
        return self._faiss[s.name]

    def shard_vectors(self, s: ShardRecord) -> np.ndarray:
        """[n, d] stored vectors of a shard, without copying (FAISS flat storage or a memmap)."""
        if s.kind == "ivfpq":
            path = self.root / "faiss" / f"{s.name}.vectors.npy"
            try:
                v = np.load(path, mmap_mode="r")
            except (ValueError, EOFError, OSError) as e:
                if isinstance(e, FileNotFoundError):
                    raise
                raise damaged(path, e) from None
            if v.shape != (s.rows, self.dim):
                raise damaged(path, ValueError(f"shape {v.shape}, index.json says ({s.rows}, {self.dim})"))
            return v
        idx = self._index(s)
        if s.kind == "hnsw":
            idx = faiss.downcast_index(idx.storage)
        return faiss.rev_swig_ptr(idx.get_xb(), idx.ntotal * self.dim).reshape(idx.ntotal, self.dim)

    def _column(self, s: ShardRecord, name: str) -> np.ndarray:
        path = self.root / "embeddings" / f"{s.name}.parquet"
        mtime = path.stat().st_mtime_ns
        try:
            return _read_column(str(path), mtime, name)
        except (pa.ArrowException, OSError) as e:
            raise damaged(path, e) from None

    def source_stores(self) -> set[str]:
        """The stores (``s3://bucket``) the indexed volumes were read from; empty when all are local."""
        paths = {p for s in self.shards if s.rows for p in set(self._column(s, "path").tolist())}
        return {storage.store_root(p) for p in paths if p} - {""}

    def rows(self, shard: int, ids: np.ndarray) -> list[dict]:
        """Metadata of rows ``ids`` of shard number ``shard``, reading only the row groups they are in."""
        p = self.root / "embeddings" / f"{self.shards[shard].name}.parquet"
        path, mtime = str(p), p.stat().st_mtime_ns
        out = []
        try:
            starts = _row_group_starts(path, mtime)
            for i in np.asarray(ids, dtype=np.int64):
                g = int(np.searchsorted(starts, i, side="right") - 1)
                out.append(_row_group(path, mtime, g)[int(i - starts[g])])
        except (pa.ArrowException, OSError, IndexError) as e:  # IndexError: fewer rows than FAISS ids
            raise damaged(p, e) from None
        return out

    def patient_rows(self, patient_id: str) -> list[np.ndarray]:
        """Per shard, the int64 row ids of ``patient_id``'s slices."""
        return [
            np.flatnonzero(self._column(s, "patient_id") == patient_id).astype(np.int64) for s in self.shards
        ]

    def pixel_hashes(self, volume_ids) -> dict[str, str]:
        """volume_id -> ``Volume.pixel_hash`` of the indexed volumes among ``volume_ids``; volumes
        indexed before ctsearch recorded it are left out (their copies cannot be recognised)."""
        want, out = set(volume_ids), {}
        for s in self.shards:
            path = self.root / "volumes" / f"{s.name}.parquet"
            if not s.volumes or not path.is_file():
                continue
            t = _read_volumes(str(path), path.stat().st_mtime_ns)
            for vid, h, status in zip(t["volume_id"], t["pixel_hash"], t["status"]):
                if vid in want and h and status == "indexed":
                    out[vid] = h
        return out

    def lookup(self, volume_id: str, slice_index: int) -> tuple[np.ndarray, dict]:
        """The stored vector [d] and metadata of row ``volume_id:slice_index``."""
        found = []
        for j, s in enumerate(self.shards):
            if not s.rows:
                continue
            hit = np.flatnonzero(
                (self._column(s, "volume_id") == volume_id) & (self._column(s, "slice_index") == slice_index)
            )
            found += [(j, int(i)) for i in hit]
        if not found:
            raise CTSearchInputError(None, f"no row {volume_id}:{slice_index} in the index at {self.root}")
        if len(found) > 1:
            raise CTSearchInputError(
                None, f"row {volume_id}:{slice_index} is ambiguous ({len(found)} volumes share that id)"
            )
        j, i = found[0]
        return np.asarray(self.shard_vectors(self.shards[j])[i], np.float32), self.rows(j, [i])[0]

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
        if len(self) == 0:
            raise CTSearchInputError(self.root, "the index holds no slices yet (nothing was indexed)")
        k = min(k, len(self))  # more hits than rows cannot exist; an absurd k must not allocate
        q = l2_normalize(np.atleast_2d(np.asarray(vectors, np.float32)))
        if q.shape[1] != self.dim:
            raise CTSearchInputError(
                None, f"query vectors have dimension {q.shape[1]}, the index has {self.dim}"
            )
        try:
            return self._search(q, k, patient, exclude_patient, nprobe, refine)
        except FileNotFoundError as e:
            # A writer merged shards since this Index read index.json (shards load lazily, so a
            # long-lived reader can meet a removed file): go on with the new commit.
            if not self.refresh():
                raise missing(e) from None
            try:
                return self._search(q, k, patient, exclude_patient, nprobe, refine)
            except FileNotFoundError as e2:
                raise missing(e2) from None

    def refresh(self) -> bool:
        """Re-read index.json; True (and caches dropped) when a writer committed since it was read."""
        if self.source is not None:
            fetch_index(self.source)
        manifest = read_manifest(self.root)
        if manifest == self.manifest:
            return False
        self.manifest, self.shards = manifest, [ShardRecord.from_json(s) for s in manifest["shards"]]
        self._faiss.clear()
        self._torch.clear()
        return True

    def _search(self, q: np.ndarray, k: int, patient, exclude_patient, nprobe, refine) -> SearchResult:
        all_s, all_i = [], []
        for s in self.shards:
            allowed = denied = None
            if s.rows == 0:
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
                    exact = self.shard_vectors(s) if s.kind == "ivfpq" else None
                    sc, ii = search_shard(
                        self._index(s), s.kind, s.params, exact, q, k, allowed, denied, nprobe, refine
                    )
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
                hq.append(
                    {
                        "rank": rank + 1,
                        "score": float(scores[qi, rank]),
                        "shard": self.shards[shard[qi, rank]].name,
                        "row": int(row[qi, rank]),
                        **meta,
                    }
                )
            hits.append(hq)
        return SearchResult(scores, shard, row, hits)

    def _search_torch(
        self, s: ShardRecord, q: np.ndarray, k: int, allowed, denied
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact search on the GPU with a torch matmul (we ship faiss-cpu only: docs/scaling.md)."""
        import torch

        if s.name not in self._torch:
            half = self.manifest["dtype"] == "float16"
            x = torch.from_numpy(
                np.ascontiguousarray(self.shard_vectors(s), dtype=np.float16 if half else np.float32)
            )
            self._torch[s.name] = x.to(self.device)
        return torch_topk(q, self._torch[s.name], k, allowed, denied)


@lru_cache(maxsize=64)
def _read_column(path: str, mtime_ns: int, name: str) -> np.ndarray:
    col = pq.read_table(path, columns=[name]).column(name)
    return np.asarray(col.to_pylist(), dtype=object) if pa.types.is_string(col.type) else col.to_numpy()


@lru_cache(maxsize=64)
def _read_volumes(path: str, mtime_ns: int) -> dict[str, list]:
    t = pq.read_table(path)
    n = t.num_rows
    return {
        c: t.column(c).to_pylist() if c in t.column_names else [None] * n
        for c in ("volume_id", "pixel_hash", "status")
    }


@lru_cache(maxsize=64)
def _row_group_starts(path: str, mtime_ns: int) -> np.ndarray:
    md = pq.read_metadata(path)
    return np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])[:-1]


@lru_cache(maxsize=256)
def _row_group(path: str, mtime_ns: int, g: int) -> list[dict]:
    return pq.ParquetFile(path).read_row_group(g, columns=META_COLUMNS).to_pylist()


def missing(e: FileNotFoundError) -> CTSearchInputError:
    """A file index.json lists that is not there (deleted, or never copied along with index.json)."""
    path = Path(e.filename or str(e))
    return CTSearchInputError(
        path, f"missing: index.json lists it; the index is damaged (`ctsearch verify {path.parent.parent}`)"
    )
