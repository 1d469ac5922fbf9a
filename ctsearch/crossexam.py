"""Retrieval across one patient's examinations, ordered along the body axis.

For a query slice, every *other* series of the same patient (a later scan, another phase) is
searched exhaustively and its best-matching slices are returned sorted by z (mm, inferior to
superior), so a reader sees where in the other exam the same anatomy lies.

Example:
    >>> import numpy as np
    >>> v = np.eye(3, dtype=np.float32)
    >>> m = best_by_volume(v[1], v, np.array(["a", "b", "b"]), np.array([0.0, 5.0, 10.0]), per_volume=1)
    >>> [(x["volume"], x["rows"].tolist()) for x in m]
    [('a', [0]), ('b', [1])]
"""

from __future__ import annotations

import numpy as np


def best_by_volume(
    query: np.ndarray, vectors: np.ndarray, volume: np.ndarray, z_mm: np.ndarray, per_volume: int = 3
) -> list[dict]:
    """The ``per_volume`` most similar rows of each volume, ordered by z within the volume.

    Args:
        query: float [d], L2-normalised.
        vectors: float [n, d], L2-normalised rows.
        volume: [n] volume key of each row. z_mm: float [n], position along the body axis.
    Returns:
        one dict per volume, in order of first appearance: ``volume``, ``rows`` (int64 indices
        into the inputs, sorted by z), ``scores`` (float32, same order), ``best`` (the row of
        the highest score).
    """
    scores = np.asarray(vectors, np.float32) @ np.asarray(query, np.float32)
    out = []
    _, first = np.unique(volume, return_index=True)
    for key in volume[np.sort(first)]:
        rows = np.flatnonzero(volume == key)
        top = rows[np.argsort(-scores[rows], kind="stable")[:per_volume]]
        by_z = top[np.argsort(z_mm[top], kind="stable")]
        out.append(
            {
                "volume": key.item() if isinstance(key, np.generic) else key,
                "rows": by_z.astype(np.int64),
                "scores": scores[by_z],
                "best": int(top[0]),
            }
        )
    return out


def cross_exam(
    index, query: np.ndarray, patient_id: str, exclude_volume: str | None = None, per_exam: int = 3
) -> list[dict]:
    """Best-matching slices of each of ``patient_id``'s series in ``index`` (ctsearch.index.Index).

    Returns one dict per series, ordered by exam date then study: volume_id, study_id,
    series_id, exam_date, best (the single best slice) and matches (``per_exam`` slices by z),
    each slice as {slice_index, z_mm, score, path}.
    """
    from ctsearch.index import l2_normalize

    q = l2_normalize(np.asarray(query, np.float32)[None])[0]
    vecs, metas = [], []
    for j, ids in enumerate(index.patient_rows(patient_id)):
        if len(ids):
            vecs.append(np.asarray(index.shard_vectors(index.shards[j])[ids], np.float32))
            metas += index.rows(j, ids)
    if not metas:
        return []
    vectors = np.concatenate(vecs)
    volume = np.array([m["volume_id"] for m in metas], dtype=object)
    keep = volume != exclude_volume if exclude_volume is not None else np.ones(len(volume), bool)
    z = np.array([m["z_mm"] for m in metas], np.float64)
    idx = np.flatnonzero(keep)
    exams = []
    for m in best_by_volume(q, vectors[idx], volume[idx], z[idx], per_exam):
        rows = idx[m["rows"]]
        first = metas[rows[0]]

        def hit(i, s):
            return {
                "slice_index": metas[i]["slice_index"],
                "z_mm": metas[i]["z_mm"],
                "score": float(s),
                "path": metas[i]["path"],
            }

        best = idx[m["best"]]
        exams.append(
            {
                "volume_id": first["volume_id"],
                "study_id": first["study_id"],
                "series_id": first["series_id"],
                "exam_date": first["exam_date"],
                "best": hit(best, vectors[best] @ q),
                "matches": [hit(i, s) for i, s in zip(rows, m["scores"])],
            }
        )
    return sorted(exams, key=lambda e: (e["exam_date"] or "", e["study_id"] or "", e["volume_id"]))
