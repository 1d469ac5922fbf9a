"""Shard groups: some of an index's shards searched as one unit, and the exact merge of groups.

``ctsearch serve`` spreads an index over replicas by giving each *group* of consecutive shards to
its own Ray Serve deployment; the front asks every group and merges their top-k. A group is a
plain object (no Ray): the single-process server holds one group with all shards.

The merge is exact: :meth:`ctsearch.index.Index.search` orders hits by score, ties by shard
order then by FAISS order (``merge_topk`` is a stable sort over the shards' lists). Groups hold
consecutive shards and are merged in shard order with a stable sort, so the merged list is the
same list, hit for hit (tests/test_serve.py checks it against ``Index.search``).

Example:
    >>> group_shards(["s0", "s1", "s2", "s3", "s4"], 2)
    [['s0', 's1'], ['s2', 's3'], ['s4']]
    >>> a = [[{"score": 0.9, "volume_id": "a"}, {"score": 0.5, "volume_id": "b"}]]
    >>> b = [[{"score": 0.9, "volume_id": "c"}, {"score": 0.7, "volume_id": "d"}]]
    >>> [(h["rank"], h["volume_id"]) for h in merge_hits([a, b], k=3)[0]]
    [(1, 'a'), (2, 'c'), (3, 'd')]
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ctsearch.index import Index
from ctsearch.index.format import ShardRecord

# What the page and the API list per volume; the rows' other columns are per slice.
CATALOGUE_KEYS = ("volume_id", "patient_id", "study_id", "series_id", "exam_date", "path")


class _SnapshotIndex(Index):
    """An ``Index`` over some of a directory's shards that never re-reads index.json.

    ``Index.refresh`` would replace the subset by all shards of a newer commit (and every group
    would then return every shard's hits); a server serves the commit it started with.
    """

    def refresh(self) -> bool:
        return False


def group_shards(names: list[str], per_group: int) -> list[list[str]]:
    """Consecutive groups of ``per_group`` shard names (``per_group`` < 1: one group of all)."""
    if per_group < 1 or per_group >= len(names):
        return [list(names)]
    return [list(names[i : i + per_group]) for i in range(0, len(names), per_group)]


def merge_hits(groups: list[list[list[dict]]], k: int) -> list[list[dict]]:
    """Per group, per query, hits sorted by score -> per query the best ``k`` of all, re-ranked.

    Groups must be given in shard order; ties keep that order (a stable sort), as in ``Index.search``.
    """
    if not groups:
        return []
    out = []
    for q in range(len(groups[0])):
        pool = [h for g in groups for h in g[q]]
        order = sorted(range(len(pool)), key=lambda i: -pool[i]["score"])[:k]
        out.append([{**pool[i], "rank": r} for r, i in enumerate(order, 1)])
    return out


def distinct_hits(hits: list[dict], per: str | None, k: int) -> list[dict]:
    """The best hit of each series (``per="series"``) or study (``"study"``), at most ``k``, re-ranked.

    >>> hs = [{"score": s, "series_id": x} for s, x in ((0.9, "a"), (0.8, "a"), (0.7, "b"))]
    >>> [(h["rank"], h["series_id"]) for h in distinct_hits(hs, "series", 5)]
    [(1, 'a'), (2, 'b')]
    """
    if per is None:
        return hits[:k]
    key = {"series": "series_id", "study": "study_id"}[per]
    seen, out = set(), []
    for h in hits:
        # Rows without the id (unknown) are each their own series/study: nothing to merge them with.
        ident = h.get(key) or ("row", h.get("shard"), h.get("row"))
        if ident in seen:
            continue
        seen.add(ident)
        out.append({**h, "rank": len(out) + 1})
        if len(out) == k:
            break
    return out


class ShardGroup:
    """Some shards of one index directory, loaded once and searched together.

    Args:
        root: the index directory.
        names: shard names to hold (None: all committed shards).
        warm: load the FAISS files and the slice table now rather than on the first query.
    """

    def __init__(self, root: str | os.PathLike, names: list[str] | None = None, warm: bool = True):
        full = Index.open(root)
        keep = None if names is None else set(names)
        shards = [s.to_json() for s in full.shards if keep is None or s.name in keep]
        self.index = _SnapshotIndex(full.root, {**full.manifest, "shards": shards})
        self._where: dict[tuple[str, int], list[tuple[int, int]]] | None = None
        if warm:
            for s in self.index.shards:
                if s.rows:
                    self.index.shard_vectors(s)
            self._positions()

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.index.shards]

    def _table(self, shard: ShardRecord, columns: list[str]) -> pa.Table:
        return pq.read_table(Path(self.index.root) / "embeddings" / f"{shard.name}.parquet", columns=columns)

    def _positions(self) -> dict[tuple[str, int], list[tuple[int, int]]]:
        """(volume_id, slice_index) -> [(shard position, row)]: O(1) row references."""
        if self._where is None:
            where: dict[tuple[str, int], list[tuple[int, int]]] = {}
            for j, s in enumerate(self.index.shards):
                if not s.rows:
                    continue
                t = self._table(s, ["volume_id", "slice_index"])
                for i, key in enumerate(zip(t.column(0).to_pylist(), t.column(1).to_pylist())):
                    where.setdefault(key, []).append((j, i))
            self._where = where
        return self._where

    def lookup(self, volume_id: str, slice_index: int) -> list[tuple[np.ndarray, dict]]:
        """Every row ``volume_id:slice_index`` in this group: (stored vector [d] float32, metadata)."""
        out = []
        for j, i in self._positions().get((volume_id, int(slice_index)), []):
            vector = np.asarray(self.index.shard_vectors(self.index.shards[j])[i], np.float32)
            out.append((vector, self.index.rows(j, [i])[0]))
        return out

    def search(
        self, vectors: np.ndarray, k: int, patient: str | None = None, exclude_patient: str | None = None
    ) -> list[list[dict]]:
        """``Index.search`` over this group's shards: per query, up to ``k`` hit dicts."""
        if not self.index.shards:
            return [[] for _ in range(len(np.atleast_2d(vectors)))]
        return self.index.search(vectors, k=k, patient=patient, exclude_patient=exclude_patient).hits

    def patient_volumes(self, patient_id: str) -> list[dict]:
        """``ctsearch.crossexam.patient_volumes`` over this group's shards (a volume lies in one shard)."""
        from ctsearch.crossexam import patient_volumes

        return patient_volumes(self.index, patient_id)

    def catalogue(self) -> list[dict]:
        """One dict per volume in this group: CATALOGUE_KEYS, n_slices, slice_min/max, z_min/max."""
        parts = [
            self._table(s, [*CATALOGUE_KEYS, "slice_index", "z_mm"]) for s in self.index.shards if s.rows
        ]
        if not parts:
            return []
        t = pa.concat_tables(parts)
        # group_by drops null keys' meaning (exam_date may be null): group on the volume id only
        # and take the first value of the other columns.
        agg = t.group_by("volume_id", use_threads=False).aggregate(
            [(c, "first") for c in CATALOGUE_KEYS[1:]]
            + [
                ("slice_index", "count"),
                ("slice_index", "min"),
                ("slice_index", "max"),
                ("z_mm", "min"),
                ("z_mm", "max"),
            ]
        )
        rows = []
        for r in agg.to_pylist():
            rows.append(
                {
                    "volume_id": r["volume_id"],
                    **{c: r[f"{c}_first"] for c in CATALOGUE_KEYS[1:]},
                    "n_slices": int(r["slice_index_count"]),
                    "slice_min": int(r["slice_index_min"]),
                    "slice_max": int(r["slice_index_max"]),
                    "z_min": float(r["z_mm_min"]),
                    "z_max": float(r["z_mm_max"]),
                }
            )
        return rows

    def slice_z(self, volume_id: str) -> list[tuple[int, float]]:
        """(slice_index, z_mm) of every indexed slice of ``volume_id``, by slice index."""
        out = []
        for s in self.index.shards:
            if not s.rows:
                continue
            t = self._table(s, ["volume_id", "slice_index", "z_mm"])
            t = t.filter(pc.equal(t.column("volume_id"), volume_id))
            out += list(zip(t.column("slice_index").to_pylist(), t.column("z_mm").to_pylist()))
        return sorted(out)
