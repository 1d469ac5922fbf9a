"""Indexing from ``s3://`` against indexing from local disk, on the same archive, side by side.

The S3 server is moto's standalone server started here on 127.0.0.1 -- NOT AWS: no network
latency, no bandwidth limit, no request pricing, and a Python server whose own CPU time competes
with Ray's workers on this machine. The ratio says what ctsearch's own object-store path costs
(listing, ranged header reads on the driver, whole-object fetches into temp folders in the read
tasks); on AWS the store's latency and bandwidth come on top (docs/benchmarks.md).

What is timed, in one run, on one archive (``bench/index.py``'s: copies of a few synthetic
volumes, ``--volumes`` .nii.gz files), both written to a fresh local index:
  scan      ``scan_archive``: local walk + headers, against LIST + ranged GETs of the headers
  index     ``index_source`` end to end, ABBA order (local, s3, s3, local) after one warm-up run,
            so that Ray's warm workers and a noisy machine favour neither side

    .venv/bin/python bench/index_s3.py --backbone null --volumes 16 --size 256 --num-cpus 3
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free localhost port, and the AWS_* variables pointing at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": url,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    return proc, url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--backbone", default="null", help="null (costs nothing: I/O and decoding show) | tiny | resnet18"
    )
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--volumes", type=int, default=16)
    ap.add_argument("--distinct", type=int, default=4)
    ap.add_argument("--size", type=int, default=256, help="synthetic slice side, pixels")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs given to Ray (default: all cores)")
    ap.add_argument("--repeats", type=int, default=1, help="ABBA blocks of index runs (4 runs each)")
    args = ap.parse_args()

    import boto3
    import ray
    import torch

    from ctsearch import storage
    from ctsearch.io import scan_archive
    from ctsearch.jobs.index import index_source
    from ctsearch.model import ModelConfig, build_encoder, save_encoder

    spec = importlib.util.spec_from_file_location("bench_index", Path(__file__).with_name("index.py"))
    bench_index = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_index)

    torch.manual_seed(0)
    proc, url = start_moto()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            paths = bench_index.make_archive(
                tmp / "archive", args.volumes, min(args.distinct, args.volumes), args.size
            )
            local = tmp / "archive" / "flat"
            bucket = "ctsearch-bench-" + uuid.uuid4().hex[:8]
            boto3.client("s3").create_bucket(Bucket=bucket)
            remote = f"s3://{bucket}/flat"
            t0 = time.perf_counter()
            storage.upload(local, remote)
            mb = sum(p.stat().st_size for p in paths) / 1e6
            print(
                f"archive: {len(paths)} volumes, {mb:.1f} MB, uploaded to moto in {time.perf_counter() - t0:.1f} s"
            )

            scan = {}
            for where, src in (("local", local), ("s3", remote), ("local", local), ("s3", remote)):
                t0 = time.perf_counter()
                scan_archive(src)
                scan.setdefault(where, []).append(time.perf_counter() - t0)

            cfg = ModelConfig(backbone=args.backbone, image_size=args.image_size)
            save_encoder(build_encoder(cfg), cfg, tmp / "model")
            ray_cpus = args.num_cpus or os.cpu_count() or 1
            ray.init(num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            ray.data.DataContext.get_current().enable_progress_bars = False
            walls: dict[str, list[float]] = {"local": [], "s3": []}
            rows = {}
            abba = [("local", local), ("s3", remote), ("s3", remote), ("local", local)]
            order = [("warm-up", local)] + abba * args.repeats
            for i, (where, src) in enumerate(order):
                t0 = time.perf_counter()
                s = index_source(src, tmp / "model", tmp / f"idx{i}", batch_size=args.batch_size)
                wall = time.perf_counter() - t0
                if where != "warm-up":
                    walls[where].append(wall)
                    rows[where] = s.rows_added
                print(f"  {where:8s} {wall:6.1f} s  {s.rows_added} slices, {s.volumes_failed} failed")
            ray.shutdown()
    finally:
        proc.terminate()
        proc.wait(10)
    assert rows["local"] == rows["s3"], rows
    print(
        f"machine: {os.cpu_count()} cores, Ray CPUs {ray_cpus}; {args.backbone} @ {args.image_size} px, "
        f"{args.volumes} volumes ({rows['local']} slices of {args.size} px); S3 = moto on 127.0.0.1, not AWS"
    )
    sl, ss = statistics.median(scan["local"]), statistics.median(scan["s3"])
    print(f"scan        local {sl:6.2f} s   s3 {ss:6.2f} s   s3/local {ss / sl:5.2f}")
    il, is_ = statistics.median(walls["local"]), statistics.median(walls["s3"])
    # Adjacent runs (local, s3) and (s3, local) of each ABBA block: the noise they share cancels.
    pairs = [b / a for a, b in zip(walls["local"], walls["s3"])]
    print(
        f"index       local {il:6.1f} s   s3 {is_:6.1f} s   s3/local {is_ / il:5.2f}   "
        f"({rows['local'] / il:.0f} vs {rows['s3'] / is_:.0f} slices/s)"
    )
    print(
        f"            s3/local of adjacent pairs: {', '.join(f'{r:.2f}' for r in pairs)} "
        f"(median {statistics.median(pairs):.2f})"
    )
    print(f"ratio > 1: slower from s3://; medians of {len(walls['local'])} runs a side (ABBA order)")


if __name__ == "__main__":
    main()
