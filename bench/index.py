"""Indexing throughput: the Ray Data pipeline against the bare model on the same slices.

Numbers from one run on one machine, printed as ratios:
  decode, 1 core  read + window/resize in this process on one thread (what decoding itself costs)
  decode-only   read + window/resize slices through the pipeline's CPU stages, no model
  bare model    encoder forward passes on the very same preprocessed batches, in-process
  pipeline      `index_source` end to end (decode, preprocess, embed, parquet + FAISS commits)
Target: pipeline / bare model >= 0.8 on CPU (the model never waits on decoding).

    .venv/bin/python bench/index.py                      # resnet18 @ 224 on a small synthetic archive
    .venv/bin/python bench/index.py --device cuda --backbone resnet50 --volumes 8
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from ctsearch.jobs.index import index_source, preprocess, read_volume_rows, resolve_source
from ctsearch.model import ModelConfig, build_encoder, load_encoder, save_encoder
from ctsearch.preprocess import to_rgb
from ctsearch.synth import synth_archive


def decode_only(source: Path, config: ModelConfig, batch_size: int) -> tuple[float, list[np.ndarray]]:
    """slices/s of the CPU stages alone, and the pixel batches they produced."""
    tasks, _ = resolve_source(source)
    for j, t in enumerate(tasks):
        t.update(order=j, shard=0, size=0, mtime_ns=0)
    t0 = time.perf_counter()
    ds = (
        ray.data.from_items(tasks, override_num_blocks=len(tasks))
        .map_batches(read_volume_rows, batch_size=1, fn_kwargs={"known_ref": set()})
        .map_batches(preprocess, batch_size=batch_size, fn_kwargs={"config": config.to_json()})
    )
    batches = [b["pixels"] for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy")]
    n = sum(len(b) for b in batches)
    return n / (time.perf_counter() - t0), batches


def decode_one_core(source: Path, config: ModelConfig) -> float:
    """slices/s of read_volume + eval_transform in this process on one torch thread (no Ray)."""
    from ctsearch.io import read_volume
    from ctsearch.preprocess import eval_transform

    tasks, _ = resolve_source(source)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0, n = time.perf_counter(), 0
        for t in tasks:
            hu = read_volume(t["path"]).hu
            eval_transform(hu, config, channels=1)
            n += len(hu)
        return n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def bare_model(model_dir: Path, batches: list[np.ndarray], device: str) -> float:
    """slices/s of the encoder alone on the same batches (bf16 + channels_last on a GPU)."""
    model, _ = load_encoder(model_dir, device=device)
    if device != "cpu":
        model = model.to(memory_format=torch.channels_last)

    def run(x):
        x = x.to(device)
        if device == "cpu":
            return model(x).float().cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x.contiguous(memory_format=torch.channels_last)).float().cpu()

    # The pipeline's actor stacks the grey channel into pseudo-RGB inside its timed work; the bare
    # model gets its 3-channel input ready-made, so the ratio is if anything strict.
    rgb = [to_rgb(torch.from_numpy(b)) for b in batches]
    with torch.inference_mode():
        run(rgb[0][:2])  # warm-up
        t0 = time.perf_counter()
        for x in rgb:
            run(x)
    return sum(len(x) for x in rgb) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument(
        "--volumes",
        type=int,
        default=10,
        help="synthetic volumes (~190 slices each); fewer lets start-up dominate",
    )
    ap.add_argument("--size", type=int, default=256, help="synthetic slice side, pixels")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--num-cpus", type=int, default=None, help="Ray CPUs (default: all cores)")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth_archive(tmp / "arc", volumes=args.volumes, seed=0, size=args.size, fmt="nifti")
        cfg = ModelConfig(backbone=args.backbone, image_size=args.image_size)
        save_encoder(build_encoder(cfg), cfg, tmp / "model")
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        one_core = decode_one_core(tmp / "arc" / "nifti", cfg)
        dec, batches = decode_only(tmp / "arc" / "nifti", cfg, args.batch_size)
        n = sum(len(b) for b in batches)
        bare = bare_model(tmp / "model", batches, args.device)
        t0 = time.perf_counter()
        s = index_source(
            tmp / "arc" / "nifti",
            tmp / "model",
            tmp / "idx",
            gpus=1 if args.device == "cuda" else 0,
            batch_size=args.batch_size,
        )
        pipe = s.rows_added / (time.perf_counter() - t0)
        ray.shutdown()
    print(
        f"machine: {os.cpu_count()} CPUs, device {args.device}, torch threads {torch.get_num_threads()}; "
        f"{args.backbone} @ {args.image_size}px, {args.volumes} volumes, {n} slices of {args.size}px, batch {args.batch_size}"
    )
    print(
        f"decode, 1 core{one_core:8.1f} slices/s   (read_volume + eval_transform in-process, one thread, no Ray)"
    )
    print(
        f"decode-only   {dec:8.1f} slices/s   (the pipeline's CPU stages through Ray Data, incl. worker start-up)"
    )
    print(f"bare model    {bare:8.1f} slices/s")
    print(
        f"pipeline      {pipe:8.1f} slices/s   (end to end, incl. Ray start-up of the dataset, parquet + FAISS)"
    )
    print(f"pipeline / bare model = {pipe / bare:.2f}   (target >= 0.8)")
    print(f"decode-only / bare model = {dec / bare:.2f}   (> 1: decoding keeps ahead of the model)")


if __name__ == "__main__":
    main()
