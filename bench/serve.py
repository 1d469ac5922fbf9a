"""`ctsearch serve` against in-process `Index.search`, side by side in one run: warm latency of a
`volume_id:slice` query (p50/p99) and throughput at 1, 2 and 4 concurrent clients.

An index of N synthetic slices (unit vectors around cluster centres, in shards of 25k rows, fake
source paths) with an untrained encoder of the right width; the service runs on embedded Ray
(one front replica holding every shard, or shard groups with --shards-per-replica) on 127.0.0.1,
and clients keep their HTTP connection open. In process, a query is `Index.search` of the row's
stored vector (the search alone) and `query.embed_query(index, "vol:slice")` + `Index.search` (what
`ctsearch search` does per query once started). Target: server p50 <= 2 x search-alone p50 + 5 ms.

    .venv/bin/python bench/serve.py                       # 100k slices, D = 128 (the demo's tiny model)
    .venv/bin/python bench/serve.py --dim 2048            # D of the paper's ResNet50
"""

from __future__ import annotations

import argparse
import http.client
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

BACKBONE_OF_DIM = {128: "tiny", 512: "resnet18", 2048: "resnet50"}


def build_index(root: Path, n: int, d: int, shard_rows: int, seed: int = 0) -> list[str]:
    """An index of n rows (volumes of 100 slices, 5 volumes per patient); returns the row references."""
    import torch

    from ctsearch.index import IndexWriter, l2_normalize
    from ctsearch.model import ModelConfig, build_encoder, save_encoder

    torch.manual_seed(seed)
    cfg = ModelConfig(backbone=BACKBONE_OF_DIM[d], image_size=64, model_id=f"bench-{BACKBONE_OF_DIM[d]}")
    model = save_encoder(build_encoder(cfg).eval(), cfg, root / "model")
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.standard_normal((max(8, n // 100), d)))
    refs = []
    with IndexWriter.open(root / "idx", cfg, model) as w:
        for a in range(0, n, shard_rows):
            b = min(n, a + shard_rows)
            x = centres[np.arange(a, b) // 100] + 0.5 * rng.standard_normal(
                (b - a, d), dtype=np.float32
            ) / np.sqrt(d)
            rows = [
                dict(
                    volume_id=f"vol{i // 100:05d}",
                    patient_id=f"p{i // 500:04d}",
                    study_id=f"st{i // 100:05d}",
                    series_id=f"se{i // 100:05d}",
                    exam_date="2020-01-01",
                    slice_index=i % 100,
                    z_mm=2.5 * (i % 100),
                    path=f"/nonexistent/vol{i // 100:05d}.nii.gz",
                )
                for i in range(a, b)
            ]
            vols = sorted({r["volume_id"] for r in rows})
            w.commit_shard(
                rows,
                l2_normalize(x),
                [
                    dict(
                        entry=v,
                        path=v,
                        volume_id=v,
                        series_id=v,
                        content_hash=v,
                        size=1,
                        mtime_ns=0,
                        n_slices=100,
                        status="indexed",
                    )
                    for v in vols
                ],
                errors=[],
            )
            refs += [f"{r['volume_id']}:{r['slice_index']}" for r in rows]
    return refs


def run_clients(clients: int, queries: list[str], one_query) -> tuple[list[float], float]:
    """Latencies (ms) of all queries spread over ``clients`` threads, and queries per second."""
    per = [queries[i::clients] for i in range(clients)]
    lat: list[list[float]] = [[] for _ in range(clients)]

    def work(i: int) -> None:
        state = {}
        for q in per[i]:
            t = time.perf_counter()
            one_query(q, state)
            lat[i].append(1000 * (time.perf_counter() - t))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return [x for part in lat for x in part], len(queries) / elapsed


def pct(lat: list[float], p: float) -> float:
    return float(np.percentile(lat, p))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128, choices=sorted(BACKBONE_OF_DIM))
    ap.add_argument("--shard-rows", type=int, default=25_000)
    ap.add_argument("--queries", type=int, default=400, help="timed queries per concurrency level")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--shards-per-replica", type=int, default=0)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import faiss
    import ray

    from ctsearch.index import Index
    from ctsearch.query import embed_query
    from ctsearch.serve.deploy import ServeOptions, start, stop

    work = Path(args.workdir or tempfile.mkdtemp(prefix="ctsearch-bench-serve-"))
    t = time.time()
    refs = build_index(work, args.slices, args.dim, args.shard_rows)
    print(
        f"index: {args.slices} slices, D = {args.dim}, {-(-args.slices // args.shard_rows)} shards, built in {time.time() - t:.0f} s"
    )
    rng = np.random.default_rng(1)
    queries = [refs[i] for i in rng.choice(len(refs), args.queries, replace=False)]

    index = Index.open(work / "idx")
    vectors = {q: embed_query(index, q)[0] for q in queries}

    def search_only(q, state):
        index.search(vectors[q], k=args.k)

    def lookup_search(q, state):
        index.search(embed_query(index, q)[0], k=args.k)

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    start(
        ServeOptions(
            str(work / "idx"),
            port=args.port,
            replicas=args.replicas,
            shards_per_replica=args.shards_per_replica,
            cpus_per_replica=1,
        )
    )

    def http_query(q, state):
        c = state.get("c") or state.setdefault(
            "c", http.client.HTTPConnection("127.0.0.1", args.port, timeout=60)
        )
        c.request("GET", f"/api/search?query={q}&k={args.k}")
        r = c.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(body[:200])

    try:
        for fn in (search_only, lookup_search, http_query):  # warm-up: caches, FAISS files, connections
            run_clients(1, queries[:50], fn)
        got = json.loads(urlopen_json(args.port, f"/api/search?query={queries[0]}&k={args.k}"))["hits"]
        expect = index.search(vectors[queries[0]], k=args.k).hits[0]
        assert [(h["volume_id"], h["slice_index"]) for h in got] == [
            (h["volume_id"], h["slice_index"]) for h in expect
        ]
        print(
            f"FAISS threads: {faiss.omp_get_max_threads()}; {args.queries} warm queries per row, k = {args.k}\n"
        )
        print(
            "| clients | in-process search p50 / p99 ms | in-process lookup+search p50 / p99 ms | serve p50 / p99 ms | "
            "serve p50 / (2 x search p50 + 5 ms) | search q/s | lookup+search q/s | serve q/s | serve / search q/s |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for clients in (1, 2, 4):
            a, qa = run_clients(clients, queries, search_only)
            b, qb = run_clients(clients, queries, lookup_search)
            s, qs = run_clients(clients, queries, http_query)
            target = 2 * pct(a, 50) + 5
            print(
                f"| {clients} | {pct(a, 50):.2f} / {pct(a, 99):.2f} | {pct(b, 50):.2f} / {pct(b, 99):.2f} | "
                f"{pct(s, 50):.2f} / {pct(s, 99):.2f} | {pct(s, 50) / target:.2f} | {qa:.0f} | {qb:.0f} | {qs:.0f} | {qs / qa:.2f} |"
            )
    finally:
        stop()
        ray.shutdown()


def urlopen_json(port: int, path: str) -> bytes:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("GET", path)
    return c.getresponse().read()


if __name__ == "__main__":
    main()
