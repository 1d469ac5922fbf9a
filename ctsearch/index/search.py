"""Searching one shard, and merging per-shard top-k lists into one ranking.

Plain functions on numpy arrays (and a torch path for exact search on a GPU); the reader
(``ctsearch.index.reader``) calls them per shard.

Example:
    >>> import numpy as np
    >>> merge_topk([np.array([[0.9, 0.1]]), np.array([[0.5, -np.inf]])], [np.array([[3, 4]]), np.array([[7, -1]])], k=3)[2]
    array([[3, 7, 4]])
"""

from __future__ import annotations

import faiss
import numpy as np


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


def merge_topk(
    scores: list[np.ndarray], ids: list[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def torch_topk(
    q: np.ndarray, x, k: int, allowed=None, denied=None, rescore: int = 64
) -> tuple[np.ndarray, np.ndarray]:
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
