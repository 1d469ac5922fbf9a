"""FAISS parameter choice: which index kind a shard gets, its IVF-PQ sizes, and building it.

The documented rule (docs/scaling.md): exact ``flat`` below ``ann_threshold`` vectors; at or
above it ``ivfpq`` (IVF coarse quantiser + product quantisation, exact re-ranking of the best
``refine * k`` candidates from the stored vectors) or, when asked for, ``hnsw``.

Example:
    >>> choose_kind(10, ann_threshold=200_000), choose_kind(300_000, ann_threshold=200_000)
    ('flat', 'ivfpq')
"""

from __future__ import annotations

from typing import Literal, get_args

import faiss
import numpy as np

from ctsearch.errors import CTSearchInputError

DEFAULT_ANN_THRESHOLD = 200_000
AnnKind = Literal["ivfpq", "hnsw"]
ANN_KINDS: tuple[str, ...] = get_args(AnnKind)


def choose_kind(n_vectors: int, ann_threshold: int, ann: str = "ivfpq") -> str:
    """The documented rule: exact ``flat`` below ``ann_threshold`` vectors, ``ann`` at or above."""
    if ann not in ANN_KINDS:
        raise CTSearchInputError(None, f"ANN kind must be one of {ANN_KINDS}, got {ann!r}")
    return "flat" if n_vectors < ann_threshold else ann


IVFPQ_MIN_VECTORS = 256 * 4  # PQ codebooks of 256 centroids need this many training points


def check_ann(ann_threshold: int, ann: str = "ivfpq") -> None:
    """Refuse ANN settings that could only fail once the first big shard is built (after writing)."""
    choose_kind(0, ann_threshold, ann)
    if ann_threshold < 1:
        raise CTSearchInputError(None, f"--ann-threshold must be >= 1, got {ann_threshold}")
    if ann == "ivfpq" and ann_threshold < IVFPQ_MIN_VECTORS:
        raise CTSearchInputError(
            None,
            f"--ann-threshold {ann_threshold} is below {IVFPQ_MIN_VECTORS}, the fewest vectors an IVF-PQ "
            "shard can be trained on; raise it or use --ann hnsw",
        )


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


def build_faiss(
    vectors: np.ndarray, kind: str, seed: int = 0, train_size: int = 200_000
) -> tuple[faiss.Index, dict]:
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
        if n < IVFPQ_MIN_VECTORS:
            raise CTSearchInputError(
                None, f"an IVF-PQ shard needs at least 1024 vectors, got {n}; raise --ann-threshold"
            )
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
