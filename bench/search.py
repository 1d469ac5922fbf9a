"""Search latency and recall: IVF-PQ (+ exact re-ranking) and exact FAISS vs numpy brute force.

Synthetic unit vectors around cluster centres (isotropic Gaussians have no neighbours worth
finding), D = 2048 like ResNet50 embeddings, stored as a float16 memory-mapped file (the
re-ranking store of an IVF-PQ shard) so 1M vectors need 4 GB of disk, not 8 GB of RAM.
Single-query latency p50/p99 and recall@5 against exact search, measured side by side.

    .venv/bin/python bench/search.py --sizes 100000            # quick
    .venv/bin/python bench/search.py --sizes 100000 1000000    # the targets: recall@5 >= 0.95, p50 <= 10 ms at 1M
    .venv/bin/python bench/search.py --device cuda             # + exact search with torch on the GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if "--threads" in sys.argv:  # BLAS reads its thread count at import: set it before numpy loads
    _t = sys.argv[sys.argv.index("--threads") + 1]
    os.environ.update(OMP_NUM_THREADS=_t, OPENBLAS_NUM_THREADS=_t, MKL_NUM_THREADS=_t)

import faiss
import numpy as np

from ctsearch.index import build_faiss, ivfpq_params, search_shard, torch_topk

CHUNK = 65536


def clustered_memmap(path: Path, n: int, d: int, clusters: int, seed: int, spread: float = 0.5) -> np.ndarray:
    """[n, d] float16 unit vectors, centre + Gaussian noise of norm ~spread, written chunk by chunk."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, d))
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        x = centres[rng.integers(0, clusters, b - a)] + spread * rng.standard_normal(
            (b - a, d), dtype=np.float32
        ) / np.sqrt(d)
        out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    return np.load(path, mmap_mode="r")


def queries_like(db: np.ndarray, q: int, seed: int) -> np.ndarray:
    """New points near random database points (a query resembles something in the archive)."""
    rng = np.random.default_rng(seed + 1)
    base = np.asarray(db[np.sort(rng.choice(len(db), q, replace=False))], np.float32)
    x = base + 0.3 * rng.standard_normal(base.shape, dtype=np.float32) / np.sqrt(base.shape[1])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def numpy_topk(db: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact brute force in numpy over float16 storage, chunk by chunk: the baseline."""
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.zeros((len(q), k), np.int64)
    for a in range(0, len(db), CHUNK):
        s = q @ np.asarray(db[a : a + CHUNK], np.float32).T
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        cs = np.concatenate([best_s, np.take_along_axis(s, part, 1)], 1)
        ci = np.concatenate([best_i, part + a], 1)
        o = np.argsort(-cs, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cs, o, 1), np.take_along_axis(ci, o, 1)
    return best_s, best_i


def latencies(fn, queries: np.ndarray) -> np.ndarray:
    fn(queries[:1])  # warm-up (page cache, lazy init)
    out = []
    for i in range(len(queries)):
        t = time.perf_counter()
        fn(queries[i : i + 1])
        out.append((time.perf_counter() - t) * 1e3)
    return np.array(out)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def row(name: str, n: int, ms: np.ndarray, rec: float, base_p50: float) -> str:
    return (
        f"{name:<22} n={n:>9,d}  p50 {np.percentile(ms, 50):8.2f} ms  p99 {np.percentile(ms, 99):8.2f} ms  "
        f"recall@5 {rec:.3f}  speed-up vs numpy {base_p50 / np.percentile(ms, 50):7.1f}x"
    )


def bench(n: int, args, work: Path) -> None:
    d, k = args.dim, 5
    t = time.perf_counter()
    db = clustered_memmap(work / f"db{n}.npy", n, d, args.clusters, args.seed)
    q = queries_like(db, args.queries, args.seed)
    t_gen = time.perf_counter() - t
    t = time.perf_counter()
    _, truth = numpy_topk(db, q, k)
    print(
        f"\n## n = {n:,}, D = {d}, {args.clusters} clusters, {args.queries} queries "
        f"(data {t_gen:.0f} s, exact ground truth {time.perf_counter() - t:.0f} s)"
    )
    if n <= args.numpy_f32_max:  # the plain numpy way: float32 matrix in RAM, one matmul
        db32 = np.asarray(db, np.float32)
        name, fn = "numpy brute force f32", lambda x: np.argsort(-(x @ db32.T), axis=1)[:, :k]
    else:  # 8 GB of float32 at 1M: stream the float16 store instead
        name, fn = "numpy brute force f16", lambda x: numpy_topk(db, x, k)
    base = latencies(fn, q[: args.baseline_queries])
    print(row(name, n, base, 1.0, np.percentile(base, 50)))
    db32 = None
    b50 = float(np.percentile(base, 50))
    if n <= args.flat_max:
        flat, _ = build_faiss(db, "flat")
        ms = latencies(lambda x: flat.search(x, k), q)
        print(row("faiss flat (exact)", n, ms, recall(flat.search(q, k)[1], truth), b50))
        del flat
    t = time.perf_counter()
    ivf, params = build_faiss(db, "ivfpq", seed=args.seed)
    print(f"ivfpq build {time.perf_counter() - t:.0f} s, {ivfpq_params(n, d)}")
    for nprobe in args.nprobe or [params["nprobe"]]:
        for refine in args.refine or [params["refine"]]:
            fn = lambda x, nprobe=nprobe, refine=refine: search_shard(
                ivf, "ivfpq", params, db, x, k, nprobe=nprobe, refine=refine
            )  # noqa: E731
            ms = latencies(fn, q)
            print(row(f"ivfpq np={nprobe} rf={refine}", n, ms, recall(fn(q)[1], truth), b50))
            fn0 = lambda x, nprobe=nprobe: ivf.search(x, k, params=faiss.SearchParametersIVF(nprobe=nprobe))  # noqa: E731
    print(row(f"ivfpq np={nprobe} PQ only", n, latencies(fn0, q), recall(fn0(q)[1], truth), b50))
    if args.device == "cuda":
        import torch

        x = torch.from_numpy(np.asarray(db)).to("cuda")

        def gpu(v):
            return torch_topk(v, x, k)[1]

        ms = latencies(gpu, q)
        print(row("torch cuda fp16 + fp32 re-score", n, ms, recall(gpu(q), truth), b50))
        del x
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument(
        "--baseline-queries", type=int, default=10, help="single queries timed for numpy brute force"
    )
    ap.add_argument(
        "--numpy-f32-max",
        type=int,
        default=200_000,
        help="numpy baseline on a float32 copy in RAM up to this size",
    )
    ap.add_argument(
        "--flat-max", type=int, default=200_000, help="also time an exact FAISS flat index up to this size"
    )
    ap.add_argument("--nprobe", type=int, nargs="*", help="IVF lists to probe (default: the index's rule)")
    ap.add_argument(
        "--refine", type=int, nargs="*", help="re-ranked candidates per hit (default: the index's rule)"
    )
    ap.add_argument("--threads", type=int, default=None, help="FAISS/BLAS threads (default: all cores)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where the float16 vector files go (default: a temp dir)")
    args = ap.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    print(
        f"machine: {os.cpu_count()} CPUs, faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), device {args.device}"
    )
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in args.sizes:
            bench(n, args, Path(tmp))
            (Path(tmp) / f"db{n}.npy").unlink()


if __name__ == "__main__":
    main()
