"""Metrics against scikit-learn and brute-force loops on random data."""

from __future__ import annotations

import numpy as np
import pytest

from ctsearch.metrics import knn_accuracy, map_at_k, nearest_neighbours, relevance_rank_accuracy


def _brute_map(q, qy, db, dby, k, metric, variant):
    aps = []
    for i in range(len(q)):
        if metric == "l2":
            d = [float(np.sqrt(np.sum((q[i] - db[j]) ** 2))) for j in range(len(db))]
        else:
            d = [-float(q[i] @ db[j] / np.linalg.norm(q[i]) / np.linalg.norm(db[j])) for j in range(len(db))]
        ranked = sorted(range(len(db)), key=lambda j: (d[j], j))[:k]
        upto = k if variant == "paper" else k - 1
        precisions = []
        for kk in range(1, upto + 1):
            precisions.append(sum(dby[j] == qy[i] for j in ranked[:kk]) / kk)
        aps.append(sum(precisions) / upto)
    return sum(aps) / len(aps)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_map_matches_brute_force(metric, variant):
    rng = np.random.default_rng(0)
    db, q = rng.normal(size=(60, 8)), rng.normal(size=(25, 8))
    dby, qy = rng.integers(0, 2, 60), rng.integers(0, 2, 25)
    got = map_at_k(q, qy, db, dby, k=5, metric=metric, variant=variant)
    want = _brute_map(q, qy, db, dby, 5, metric, variant)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0.0 < got < 1.0


def test_map_variants_differ_and_known_value():
    # One query, label 1; retrieved labels in order 1, 0, 1 (k=3).
    db = np.array([[1.0], [2.0], [3.0], [9.0]])
    dby = np.array([1, 0, 1, 1])
    q, qy = np.array([[0.0]]), np.array([1])
    assert map_at_k(q, qy, db, dby, k=3) == pytest.approx((1 + 1 / 2 + 2 / 3) / 3)
    assert map_at_k(q, qy, db, dby, k=3, variant="reference") == pytest.approx((1 + 1 / 2) / 2)


def test_neighbour_ties_by_index():
    db = np.array([[1.0], [-1.0], [1.0], [0.0]])
    nn = nearest_neighbours(np.array([[0.0]]), db, 4)
    assert nn.tolist() == [[3, 0, 1, 2]]


def test_knn_matches_sklearn_random():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(1)
    for _ in range(5):
        db, q = rng.normal(size=(80, 6)), rng.normal(size=(40, 6))
        dby, qy = rng.integers(0, 3, 80), rng.integers(0, 3, 40)  # 3 classes: vote ties happen
        for k in (1, 4, 5):
            clf = KNeighborsClassifier(n_neighbors=k).fit(db, dby)
            assert knn_accuracy(q, qy, db, dby, k=k) == pytest.approx(clf.score(q, qy))


def test_knn_tie_break_matches_sklearn():
    from sklearn.neighbors import KNeighborsClassifier

    # k=4 with 2 votes each: sklearn picks the smaller label.
    db = np.array([[0.0], [0.1], [0.2], [0.3], [5.0]])
    dby = np.array([7, 3, 7, 3, 3])
    q = np.array([[0.0]])
    clf = KNeighborsClassifier(n_neighbors=4).fit(db, dby)
    assert clf.predict(q)[0] == 3
    assert knn_accuracy(q, np.array([3]), db, dby, k=4) == 1.0
    assert knn_accuracy(q, np.array([7]), db, dby, k=4) == 0.0
    # Equal distances: sklearn's brute search keeps database order; so do we.
    db2 = np.array([[1.0], [-1.0], [1.0], [-1.0], [1.0]])
    dby2 = np.array([0, 1, 1, 0, 1])
    for k in (1, 2, 3):
        clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute").fit(db2, dby2)
        for y in (0, 1):
            assert knn_accuracy(q, np.array([y]), db2, dby2, k=k) == clf.score(q, [y])


def _brute_rr(imp, mask):
    import torch
    import torch.nn.functional as F

    up = F.interpolate(
        torch.tensor(imp, dtype=torch.float32)[None, None],
        size=mask.shape,
        mode="bilinear",
        align_corners=False,
    )[0, 0].numpy()
    m = int(mask.sum())
    flat = np.abs(up).ravel()
    top = sorted(range(flat.size), key=lambda i: (-flat[i], i))[:m]
    return sum(int(mask.ravel()[i]) for i in top) / m


def test_rr_matches_brute_force_and_skips_empty():
    rng = np.random.default_rng(2)
    imp = rng.normal(size=(5, 6, 6)).astype(np.float32)
    masks = (rng.random((5, 12, 12)) < 0.3).astype(np.uint8)
    masks[2] = 0
    scores, mean, skipped = relevance_rank_accuracy(imp, masks, block=2)
    assert skipped == 1 and np.isnan(scores[2])
    for i in (0, 1, 3, 4):
        assert scores[i] == pytest.approx(_brute_rr(imp[i], masks[i]))
    assert mean == pytest.approx(np.mean(scores[[0, 1, 3, 4]]))


def test_rr_of_map_equal_to_mask_is_one():
    rng = np.random.default_rng(3)
    masks = np.zeros((3, 32, 32), np.uint8)
    masks[0, 5:20, 8:30] = 1
    masks[1] = rng.random((32, 32)) < 0.4
    masks[2, 0, 0] = 1
    scores, mean, skipped = relevance_rank_accuracy(masks.astype(np.float32), masks)
    assert skipped == 0 and mean == 1.0 and np.all(scores == 1.0)
    # A map that ranks mask pixels last scores 0.
    scores, mean, _ = relevance_rank_accuracy(1.0 - masks[:1].astype(np.float32), masks[:1])
    assert mean == 0.0


def test_rr_all_empty():
    scores, mean, skipped = relevance_rank_accuracy(np.ones((2, 4, 4)), np.zeros((2, 4, 4)))
    assert skipped == 2 and np.isnan(mean) and np.all(np.isnan(scores))
