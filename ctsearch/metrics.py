"""Retrieval and explanation metrics of the paper: MAP@K, kNN accuracy, relevance-rank accuracy.

Plain numpy on embeddings and labels; definitions and the paper-vs-reference differences are
in docs/evaluation.md.

Example:
    >>> import numpy as np
    >>> db = np.array([[0.0], [1.0], [10.0], [11.0]]); db_y = np.array([0, 0, 1, 1])
    >>> q = np.array([[0.4], [10.6]]); q_y = np.array([0, 1])
    >>> map_at_k(q, q_y, db, db_y, k=2)
    1.0
    >>> knn_accuracy(q, q_y, db, db_y, k=3)
    1.0
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Queries per distance block: keeps the [block, nd] distance matrix small for large databases.
_QUERY_BLOCK = 1024


def nearest_neighbours(q_emb: np.ndarray, db_emb: np.ndarray, k: int, metric: str = "l2") -> np.ndarray:
    """Indices [nq, k] of the k nearest database rows per query, nearest first.

    q_emb [nq, D], db_emb [nd, D]. metric "l2" (Euclidean) or "cosine" (largest cosine similarity).
    Equal distances are ordered by database index, as scikit-learn's brute-force search does.
    """
    q = np.asarray(q_emb, np.float64)
    db = np.asarray(db_emb, np.float64)
    if q.ndim != 2 or db.ndim != 2 or q.shape[1] != db.shape[1]:
        raise ValueError(f"embeddings must be [nq, D] and [nd, D] with one D, got {q.shape} and {db.shape}")
    if not 1 <= k <= db.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the database size {db.shape[0]}")
    if metric == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        db = db / np.maximum(np.linalg.norm(db, axis=1, keepdims=True), 1e-12)
    elif metric != "l2":
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    db_sq = np.einsum("ij,ij->i", db, db)
    out = np.empty((q.shape[0], k), np.int64)
    for start in range(0, q.shape[0], _QUERY_BLOCK):
        qb = q[start : start + _QUERY_BLOCK]
        if metric == "cosine":
            dist = -(qb @ db.T)
        else:
            # Same expansion as sklearn.metrics.euclidean_distances, so near-ties resolve alike.
            dist = np.einsum("ij,ij->i", qb, qb)[:, None] - 2.0 * (qb @ db.T) + db_sq[None, :]
            np.maximum(dist, 0.0, out=dist)
        out[start : start + len(qb)] = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return out


@dataclass(frozen=True)
class Ranking:
    """The k nearest database rows of each query, computed once and shared by every retrieval metric.

    Attributes:
        q_labels: [nq] the queries' labels.
        neighbour_labels: [nq, k] the labels of each query's k nearest database rows, nearest first.
        db_labels: [nd] every database label (the classes a k-NN vote can choose from).
    """

    q_labels: np.ndarray
    neighbour_labels: np.ndarray
    db_labels: np.ndarray

    @classmethod
    def compute(cls, q_emb, q_labels, db_emb, db_labels, k: int, metric: str = "l2") -> Ranking:
        """Rank ``db`` for each query (``nearest_neighbours``): q_emb [nq, D], db_emb [nd, D]."""
        nn = nearest_neighbours(q_emb, db_emb, k, metric)
        db_labels = np.asarray(db_labels)
        return cls(np.asarray(q_labels), db_labels[nn], db_labels)

    @property
    def k(self) -> int:
        return int(self.neighbour_labels.shape[1])

    @property
    def relevant(self) -> np.ndarray:
        """bool [nq, k]: the retrieved row's label equals the query's."""
        return self.neighbour_labels == self.q_labels[:, None]


def average_precision_per_query(ranking: Ranking, variant: str = "paper") -> np.ndarray:
    """Average precision at K of each query, float64 [nq]; MAP@K is their mean.

    variant "paper" (eq. 5): (1/K) sum_{k=1..K} precision@k; variant "reference", the official
    code's (1/(K-1)) sum_{k=1..K-1} precision@k (needs K >= 2).

    Example:
        >>> r = Ranking(np.array([0, 1]), np.array([[0, 1], [0, 0]]), np.array([0, 1]))
        >>> average_precision_per_query(r).tolist()  # (1 + 1/2) / 2, (0 + 0) / 2
        [0.75, 0.0]
    """
    k = ranking.k
    if variant not in ("paper", "reference"):
        raise ValueError(f"variant must be 'paper' or 'reference', got {variant!r}")
    if variant == "reference" and k < 2:
        raise ValueError("the reference variant averages precision@1..K-1 and needs k >= 2")
    precision = np.cumsum(ranking.relevant, axis=1) / np.arange(1, k + 1)  # precision@1..K
    if variant == "reference":
        precision = precision[:, : k - 1]
    return precision.mean(axis=1)


def average_precision_at_k(ranking: Ranking, variant: str = "paper") -> float:
    """MAP@K of a ranking: the mean of ``average_precision_per_query``."""
    return float(average_precision_per_query(ranking, variant).mean())


def knn_vote_correct(ranking: Ranking) -> np.ndarray:
    """Whether each query's k-NN majority vote (uniform weights) is right, float64 [nq] of 0/1;
    a tied vote goes to the smallest class label."""
    classes = np.unique(ranking.db_labels)
    idx = np.searchsorted(classes, ranking.neighbour_labels)
    votes = np.zeros((idx.shape[0], len(classes)), np.int64)
    np.add.at(votes, (np.arange(idx.shape[0])[:, None], idx), 1)
    pred = classes[np.argmax(votes, axis=1)]  # argmax takes the first (smallest) tied class
    return (pred == ranking.q_labels).astype(np.float64)


def knn_vote_accuracy(ranking: Ranking) -> float:
    """Accuracy of the k-NN majority vote: the mean of ``knn_vote_correct``."""
    return float(knn_vote_correct(ranking).mean())


def map_at_k(
    q_emb: np.ndarray,
    q_labels: np.ndarray,
    db_emb: np.ndarray,
    db_labels: np.ndarray,
    k: int = 5,
    metric: str = "l2",
    variant: str = "paper",
) -> float:
    """Mean average precision at K of retrieving ``db`` rows for each query.

    q_emb [nq, D], q_labels [nq], db_emb [nd, D], db_labels [nd]; a retrieval is relevant when its
    label equals the query's. ``variant``: see ``average_precision_at_k``.
    """
    if variant == "reference" and k < 2:
        raise ValueError("the reference variant averages precision@1..K-1 and needs k >= 2")
    return average_precision_at_k(Ranking.compute(q_emb, q_labels, db_emb, db_labels, k, metric), variant)


def knn_accuracy(
    q_emb: np.ndarray, q_labels: np.ndarray, db_emb: np.ndarray, db_labels: np.ndarray, k: int = 5
) -> float:
    """Accuracy of a k-NN majority vote (Euclidean, uniform weights) fit on ``db`` and scored on ``q``.

    Matches scikit-learn's ``KNeighborsClassifier(n_neighbors=k)``: a tied vote goes to the
    smallest class label. q_emb [nq, D], q_labels [nq], db_emb [nd, D], db_labels [nd].
    """
    return knn_vote_accuracy(Ranking.compute(q_emb, q_labels, db_emb, db_labels, k, "l2"))


@dataclass(frozen=True)
class Metric:
    """One column of the evaluation: how it is computed, named and shown.

    ``per_query`` turns a Ranking into one score per query in [0, 1] (the metric is their mean;
    ``ctsearch.stats`` bootstraps over them); None for a metric measured elsewhere (RR comes
    from the RELAX job). ``header`` / ``report_header``: the markdown table's and the HTML
    report's column titles, with ``{k}``; ``decimals``: of the percentages shown.
    """

    key: str
    header: str
    report_header: str
    decimals: int
    per_query: Callable[[Ranking], np.ndarray] | None = None
    needs_k: int = 1  # the smallest K it is defined for (None is recorded below it)


# The one table that drives ``ctsearch evaluate``'s rows, its markdown table and the HTML report.
# A metric with an empty header is computed and stored but not shown in the tables.
METRICS: tuple[Metric, ...] = (
    Metric("map", "MAP@{k}", "MAP@{k} (%)", 1, average_precision_per_query),
    Metric("map_reference", "", "", 1, lambda r: average_precision_per_query(r, "reference"), needs_k=2),
    Metric("acc", "ACC ({k}-NN)", "ACC {k}-NN (%)", 1, knn_vote_correct),
    Metric("rr", "RR", "RR (%)", 2),
)


def shown_metrics() -> list[Metric]:
    """The metrics with a column in the tables, in order."""
    return [m for m in METRICS if m.header]


def percent_cell(stat: dict | None, decimals: int) -> str:
    """{"mean", "std"} as fractions -> "89.1 ± 1.3" in percent ("n/a" when not measured).

    Example:
        >>> percent_cell({"mean": 0.8912, "std": 0.013}, 1), percent_cell(None, 2)
        ('89.1 ± 1.3', 'n/a')
    """
    mean = (stat or {}).get("mean")
    if mean is None or not math.isfinite(mean):
        return "n/a"
    std = stat.get("std")
    return f"{100 * mean:.{decimals}f}" + (
        f" ± {100 * std:.{decimals}f}" if std is not None and math.isfinite(std) else ""
    )


def upsample_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize [n, h, w] -> [n, H, W] (torch ``interpolate``, align_corners=False)."""
    import torch
    import torch.nn.functional as F

    maps = np.asarray(maps, np.float32)
    if maps.shape[-2:] == tuple(size):
        return maps
    t = torch.from_numpy(np.ascontiguousarray(maps))[:, None]
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)[:, 0].numpy()


def relevance_rank_accuracy(
    importance: np.ndarray, masks: np.ndarray, block: int = 16
) -> tuple[np.ndarray, float, int]:
    """Relevance-rank accuracy (Arras et al. 2022) of importance maps against binary masks.

    importance [n, h, w] (upsampled bilinearly to the mask size first), masks [n, H, W] (nonzero =
    relevant). Per slice, with M mask pixels: |top-M pixels of |R| ∩ mask| / M. Equal |R| values
    are ranked by raster order. Slices with an empty mask are undefined: their score is NaN, they
    are left out of the mean and counted.

    Returns (scores [n] float64 with NaN for skipped slices, mean over scored slices (NaN if none),
    number of skipped slices).
    """
    importance = np.asarray(importance)
    masks = np.asarray(masks)
    if importance.ndim != 3 or masks.ndim != 3 or importance.shape[0] != masks.shape[0]:
        raise ValueError(
            f"need importance [n, h, w] and masks [n, H, W], got {importance.shape} and {masks.shape}"
        )
    n, H, W = masks.shape
    flat_masks = masks.reshape(n, -1) != 0
    m = flat_masks.sum(axis=1)
    scores = np.full(n, np.nan)
    for start in range(0, n, block):
        sl = slice(start, start + block)
        rel = np.abs(upsample_maps(importance[sl], (H, W)).reshape(-1, H * W))
        order = np.argsort(-rel, axis=1, kind="stable")
        hits = np.cumsum(np.take_along_axis(flat_masks[sl], order, axis=1), axis=1)  # hits in top-1..top-HW
        mb = m[sl]
        ok = mb > 0
        scores[sl][ok] = hits[np.nonzero(ok)[0], mb[ok] - 1] / mb[ok]
    skipped = int(np.sum(m == 0))
    mean = float(np.nanmean(scores)) if skipped < n else float("nan")
    return scores, mean, skipped


def shared_patients_phrase(shared: int | None) -> str:
    """What an evaluation says about patients in both the database and the queries, from its count.

    Example:
        >>> shared_patients_phrase(0), shared_patients_phrase(2)
        ('no patient is in both train and test', '2 patients are in both train and test: their queries can find their own slices, so the scores are optimistic')
    """
    if shared is None:
        return "whether train and test share patients was not recorded"
    if shared == 0:
        return "no patient is in both train and test"
    return (
        f"{shared} patient{'s are' if shared != 1 else ' is'} in both train and test: "
        "their queries can find their own slices, so the scores are optimistic"
    )
