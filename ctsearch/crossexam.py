"""Retrieval across one patient's examinations: the other exam's slices at the query's anatomy, in order.

A physician picks a slice of a new examination and wants the same anatomy in the patient's
earlier ones (paper, section 7.3). Slices picked one by one (plain top-k) can come from anywhere
along the body, because look-alike levels exist (the liver spans 15-20 cm). Here the query exam is
laid onto the other exam as one rigid piece: both exams are the same patient in millimetres, so
only the offset along z is unknown (table position, scan range; slice thickness changes nothing
in mm). For every slice of the other exam as the candidate position of the query slice, every
slice of the query exam (or those within ``window_mm`` of the query slice) is compared with the
other exam's slice at the same offset; the offset where they agree best wins. The answer is the
slice at the query slice's position under that offset and the contiguous run around it, inferior
to superior, with a confidence: how clearly that position beats every position more than
``RIVAL_MM`` away. Organs that move with breathing (the liver: up to about a centimetre between
exams) are only as well placed as the body around them.

Copies of one scan (identical pixels, e.g. a NIfTI and a DICOM export) are recognised by
``Volume.pixel_hash``, recorded at index time: a copy of the query's own scan is never offered
as another examination, and copies of another examination are shown once.

Example:
    >>> z = np.arange(6) * 5.0
    >>> sim = np.eye(6)[:, [2, 3, 4, 5, 0, 1]]  # query slice i looks like other slice (i + 4) % 6
    >>> m = coherent_match(sim, z, z, at=10.0, k=3, window_mm=0)
    >>> m.best, m.run.tolist()
    (0, [0, 1, 2])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# How much of the query exam is aligned, in mm either side of the query slice: all of it. On
# synthetic exams (docs/evaluation.md) a whole-exam offset beat every shorter stretch tried (40-200 mm).
WINDOW_MM = float("inf")
RIVAL_MM = 20.0  # positions farther than this from the best one compete for the confidence


@dataclass(frozen=True)
class ExamMatch:
    """Where the query slice lies in another exam (indices into that exam's slices, ascending z).

    Attributes:
        best: the matched slice.
        run: int64 [<= k], contiguous slices around ``best``, ascending z.
        offset_mm: z in the other exam minus z in the query exam, at the match.
        confidence: 0..1, (best score - best rival's) / (best score - median score); 1 without rivals.
        scores: float64 [n], the alignment score with the query slice placed on each slice.
    """

    best: int
    run: np.ndarray
    offset_mm: float
    confidence: float
    scores: np.ndarray


def plain_topk(profile: np.ndarray, k: int) -> np.ndarray:
    """int64 [<= k]: the ``k`` slices of highest similarity (``profile`` float [n]), best first.

    The baseline the coherent method is measured against (``ctsearch evaluate --crossexam``).
    """
    return np.argsort(-np.asarray(profile), kind="stable")[:k].astype(np.int64)


def _nearest(z_sorted: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Index of the element of ascending ``z_sorted`` nearest to each ``x``."""
    if len(z_sorted) == 1:
        return np.zeros(np.shape(x), np.int64)
    i = np.clip(np.searchsorted(z_sorted, x), 1, len(z_sorted) - 1)
    return np.where(x - z_sorted[i - 1] <= z_sorted[i] - x, i - 1, i)


def coherent_match(
    sim: np.ndarray,
    z_query: np.ndarray,
    z_other: np.ndarray,
    at: float,
    k: int = 5,
    window_mm: float = WINDOW_MM,
) -> ExamMatch:
    """Where the query slice at ``at`` lies in the other exam, by one z offset for the query exam.

    Args:
        sim: float [m, n], cosine similarity of the query exam's slices (rows) with the other
            exam's (columns). With only the query slice known, m = 1 (then this is the argmax).
        z_query: float [m], the rows' z in mm (the query exam's frame); must include ``at``.
        z_other: float [n], the columns' z in mm, ascending.
        at: z of the query slice in ``z_query``'s frame.
        k: length of the returned run.
        window_mm: rows farther than this from ``at`` are ignored, nearer ones weighted by a
            Gaussian of sigma ``window_mm / 2``; infinite (the default): every row, equally.
    """
    sim, z_query, z_other = (np.asarray(a, np.float64) for a in (sim, z_query, z_other))
    n = len(z_other)
    rel = z_query - at
    near = np.flatnonzero(np.abs(rel) <= window_mm + 1e-6)
    w = np.exp(-0.5 * (rel[near] / (window_mm / 2)) ** 2) if window_mm > 0 else np.ones(len(near))
    pos = z_other[:, None] + rel[None, near]  # [n, m']: where each row lands if the query sits on slice j
    half = 0.5 * float(np.median(np.diff(z_other))) if n > 1 else np.inf
    inside = (pos >= z_other[0] - half) & (pos <= z_other[-1] + half)
    vals = sim[near][np.arange(len(near))[None, :], _nearest(z_other, pos)]  # [n, m']
    weights = w[None, :] * inside
    # Centred on the pair's mean similarity, so a pair of slices that agree no better than
    # unrelated ones counts 0, and a pair outside the other scan (no evidence) counts 0 too:
    # offsets that overlap little cannot win on a few lucky slices.
    centred = vals - sim[near].mean()
    scores = (centred * weights).sum(1) / max(float(w.sum()), 1e-12)
    best = int(np.argmax(scores))
    rivals = np.abs(z_other - z_other[best]) > RIVAL_MM
    confidence = 1.0
    if rivals.any():
        spread = max(scores[best] - float(np.median(scores)), 1e-9)
        confidence = float(np.clip((scores[best] - scores[rivals].max()) / spread, 0.0, 1.0))
    start = int(np.clip(best - k // 2, 0, max(n - k, 0)))
    return ExamMatch(
        best,
        np.arange(start, min(start + k, n), dtype=np.int64),
        float(z_other[best] - at),
        confidence,
        scores,
    )


# ----------------------------------------------------------------------------- over an index


def patient_volumes(index, patient_id: str) -> list[dict]:
    """Every indexed series of ``patient_id`` in ``index`` (ctsearch.index.Index), slices by z.

    Returns one dict per volume: volume_id, study_id, series_id, exam_date, pixel_hash ("" where
    not recorded), vectors (float32 [n, d], L2-normalised) and slices ([n] dicts: slice_index,
    z_mm, path), both in ascending z. What ``ctsearch serve``'s shard groups send to the front.
    """
    by_volume: dict[str, tuple[list, list]] = {}
    for j, ids in enumerate(index.patient_rows(patient_id)):
        if len(ids):
            vectors = np.asarray(index.shard_vectors(index.shards[j])[ids], np.float32)
            for v, meta in zip(vectors, index.rows(j, ids)):
                vs, ms = by_volume.setdefault(meta["volume_id"], ([], []))
                vs.append(v)
                ms.append(meta)
    hashes = index.pixel_hashes(by_volume) if by_volume else {}
    out = []
    for vid, (vs, ms) in by_volume.items():
        order = np.argsort([m["z_mm"] for m in ms], kind="stable")
        first = ms[0]
        out.append(
            {
                **{k: first[k] for k in ("volume_id", "study_id", "series_id", "exam_date")},
                "pixel_hash": hashes.get(vid, ""),
                "vectors": np.stack(vs)[order],
                "slices": [{k: ms[i][k] for k in ("slice_index", "z_mm", "path")} for i in order],
            }
        )
    return out


def match_exams(
    query: np.ndarray,
    volumes: list[dict],
    *,
    query_volume: str | None = None,
    query_slice: int | None = None,
    query_hash: str | None = None,
    series: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
    per_exam: int = 5,
    window_mm: float = WINDOW_MM,
) -> dict:
    """The query's match in each other examination among ``volumes`` (from ``patient_volumes``).

    Args:
        query: float [d], L2-normalised.
        query_volume: the query's own volume id (never offered; its slices are
            aligned, the query found by ``query_slice``).
        query_hash: the query volume's pixel hash; volumes with it are copies of the query's scan
            (not offered; one of them is aligned when the query volume itself is not indexed).
        series: for a query from a file: returns its whole series embedded (float [m, d] in slice
            order, z float [m]), to align when the index holds neither it nor a copy; called
            only then (embedding a series costs seconds).
    Returns:
        ``{"exams": [...], "copies_of_query": [volume ids], "context_slices": m, "message": str | None}``;
        per exam (by date, study, volume): volume_id, study_id, series_id, exam_date, best and
        matches (the run by z), each slice as {slice_index, z_mm, score, path}, confidence,
        offset_mm and copies (volume ids of the same pixels, not shown separately).
    """
    query = np.asarray(query, np.float32)
    own = [v for v in volumes if v["volume_id"] == query_volume]
    query_hash = query_hash or (own[0]["pixel_hash"] if own else "")
    copies_of_query = [
        v for v in volumes if v["volume_id"] != query_volume and query_hash and v["pixel_hash"] == query_hash
    ]
    # What is aligned: the query's volume in the index, else a copy of it, else the series the
    # caller can embed (a file or an upload), else the query slice alone.
    indexed = [
        (v["vectors"], np.array([s["z_mm"] for s in v["slices"]]), i)
        for v in own + copies_of_query
        for i, s in enumerate(v["slices"])
        if s["slice_index"] == query_slice
    ]
    if indexed:
        ctx_vectors, z_ctx, row = indexed[0]
    elif series is not None and query_slice is not None:
        ctx_vectors, z_ctx = series()
        row = int(query_slice)
    else:
        ctx_vectors, z_ctx, row = query[None], np.zeros(1), 0
    at = float(z_ctx[row])
    skip = {c["volume_id"] for c in copies_of_query}
    groups: dict[str, list[dict]] = {}  # one exam per distinct pixel content
    for v in volumes:
        if v["volume_id"] == query_volume or v["volume_id"] in skip:
            continue
        groups.setdefault(v["pixel_hash"] or f"volume:{v['volume_id']}", []).append(v)
    exams = []
    for same in groups.values():
        same.sort(key=lambda v: v["volume_id"])
        v = same[0]
        z = np.array([s["z_mm"] for s in v["slices"]])
        m = coherent_match(ctx_vectors @ v["vectors"].T, z_ctx, z, at, per_exam, window_mm)
        profile = v["vectors"] @ query
        hit = lambda i, v=v, profile=profile: {**v["slices"][int(i)], "score": float(profile[i])}  # noqa: E731
        exams.append(
            {
                **{k: v[k] for k in ("volume_id", "study_id", "series_id", "exam_date")},
                "best": hit(m.best),
                "matches": [hit(int(i)) for i in m.run],
                "confidence": round(m.confidence, 4),
                "offset_mm": round(m.offset_mm, 2),
                "copies": [c["volume_id"] for c in same[1:]],
            }
        )
    exams.sort(key=lambda e: (e["exam_date"] or "", e["study_id"] or "", e["volume_id"]))
    message = None
    if not exams:
        message = "the index holds no other examination of this patient"
        if copies_of_query:
            ids = ", ".join(c["volume_id"] for c in copies_of_query)
            message += f" ({ids}: a copy of the query's own scan, same pixels)"
    return {
        "exams": exams,
        "copies_of_query": [c["volume_id"] for c in copies_of_query],
        "context_slices": int(len(z_ctx)),
        "message": message,
    }


def cross_exam(
    index,
    query: np.ndarray,
    patient_id: str,
    exclude_volume: str | None = None,
    per_exam: int = 5,
    *,
    query_slice: int | None = None,
    query_hash: str | None = None,
    series: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
    window_mm: float = WINDOW_MM,
) -> dict:
    """``match_exams`` over ``patient_id``'s series in ``index`` (ctsearch.index.Index).

    ``exclude_volume`` is the query's own volume; ``query_slice`` its slice index there (or in a
    copy); ``query_hash`` the pixel hash of a query read from a file, ``series`` its series (see
    ``match_exams``).
    """
    from ctsearch.index import l2_normalize

    q = l2_normalize(np.asarray(query, np.float32)[None])[0]
    return match_exams(
        q,
        patient_volumes(index, patient_id),
        query_volume=exclude_volume,
        query_slice=query_slice,
        query_hash=query_hash,
        series=series,
        per_exam=per_exam,
        window_mm=window_mm,
    )


# ----------------------------------------------------------------------------- measured against ground truth


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two float [k] sequences without ties; NaN for k < 2."""
    if len(a) < 2:
        return float("nan")
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def score_pair(
    emb_query: np.ndarray,
    z_query: np.ndarray,
    anat_query: np.ndarray,
    emb_other: np.ndarray,
    z_other: np.ndarray,
    anat_other: np.ndarray,
    k: int = 5,
    window_mm: float = WINDOW_MM,
) -> dict[str, np.ndarray]:
    """Every slice of one exam as a query against another exam of the patient, plain top-k and coherent.

    Args:
        emb_*: float [m, d] / [n, d], L2-normalised slice embeddings, in slice order.
        z_*: float [m] / [n], the slices' z in each exam's own frame (mm, ascending).
        anat_*: float [m] / [n], ground truth: the slices' position in the patient's anatomical
            frame (ctsearch.synth: mm above the liver dome); equal values are the same anatomy.
    Returns:
        per query with a true counterpart in the other exam (its anatomy lies within the other
        scan's range): ``query`` (int, slice index), ``thickness`` (the other exam's slice spacing),
        and per method (``plain``, ``coherent``) ``{method}_dz`` (|anatomical z of the top-1 -
        the query's|, mm), ``{method}_rho`` (rank correlation of the returned run, in the order
        returned, with anatomical order) and ``{method}_overlap`` (share of the run among the k
        slices nearest the true position), plus ``confidence`` of the coherent match.
    """
    sim = np.asarray(emb_query, np.float32) @ np.asarray(emb_other, np.float32).T
    thickness = float(np.median(np.diff(z_other))) if len(z_other) > 1 else 0.0
    lo, hi = anat_other.min() - thickness / 2, anat_other.max() + thickness / 2
    out: dict[str, list] = {}
    for i in np.flatnonzero((anat_query >= lo) & (anat_query <= hi)):
        ideal = set(np.argsort(np.abs(anat_other - anat_query[i]), kind="stable")[:k].tolist())
        m = coherent_match(sim, z_query, z_other, float(z_query[i]), k, window_mm)
        rows = {"query": i, "thickness": thickness, "confidence": m.confidence}
        for method, best, run in (("plain", None, plain_topk(sim[i], k)), ("coherent", m.best, m.run)):
            best = run[0] if best is None else best
            rows[f"{method}_dz"] = abs(anat_other[best] - anat_query[i])
            rows[f"{method}_rho"] = rank_correlation(np.arange(len(run)), anat_other[run])
            rows[f"{method}_overlap"] = len(ideal & set(run.tolist())) / len(ideal)
        for key, v in rows.items():
            out.setdefault(key, []).append(v)
    return {key: np.asarray(v) for key, v in out.items()}


def summarise(scores: list[dict[str, np.ndarray]]) -> dict:
    """Pooled ``score_pair`` results -> per method: queries, mean and median |dz| (mm), share
    within one slice thickness of the other exam, mean rank correlation and run overlap."""
    scores = [s for s in scores if s]  # a pair whose scans do not overlap has no queries
    cat = {key: np.concatenate([s[key] for s in scores]) for key in scores[0]} if scores else {}
    out: dict = {"queries": int(len(cat.get("query", [])))}
    for method in ("plain", "coherent"):
        dz = cat.get(f"{method}_dz", np.zeros(0))
        stat = lambda f, x: float(f(x)) if len(x) else None  # noqa: E731
        out[method] = {
            "mean_dz_mm": stat(np.mean, dz),
            "median_dz_mm": stat(np.median, dz),
            "within_thickness": stat(np.mean, dz <= cat["thickness"]) if len(dz) else None,
            "rank_corr": stat(np.nanmean, cat.get(f"{method}_rho", np.zeros(0))),
            "run_overlap": stat(np.mean, cat.get(f"{method}_overlap", np.zeros(0))),
        }
    return out
