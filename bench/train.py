"""Training throughput: Ray Train against a bare torch loop, same model, batch and machine.

CPU (default): runs ``ctsearch.jobs.train.train`` (Ray Data ingest, views, SimSiam step, a
checkpoint and a report per epoch) and the same views + ``ctsearch.ssl.train_step`` in a plain
loop over numpy slices, with the same torch thread count, and prints images/s of both and their
ratio (target >= 0.9). Ray's rate is taken between the end times of consecutive epochs, so it
includes checkpointing and reporting; the first epoch is warm-up in both.

``--device cuda``: images/s of the bare SimSiam step in bf16 autocast + channels_last at batch 32
and 256 (default ResNet50, 224 px; views pre-made on the GPU, so this is the model's ceiling),
then the Ray-vs-bare ratio at batch 32 with one GPU worker.

    .venv/bin/python bench/train.py                       # CPU, about 2-3 minutes on 2 cores
    .venv/bin/python bench/train.py --device cuda         # GPU, under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch


def make_dataset(out: str, n: int, size: int, seed: int = 0) -> None:
    from ctsearch.store import SliceSet, write_slices

    rng = np.random.default_rng(seed)
    for name, count in (("train", n), ("test", 8)):
        hu = rng.integers(-300, 400, (count, size, size)).astype(np.int16)
        s = SliceSet(
            hu=hu,
            mask=np.zeros_like(hu, np.uint8),
            label=(np.arange(count) % 2).astype(np.int8),
            volume_id=np.array(["v"] * count, object),
            patient_id=np.array(["p"] * count, object),
            slice_index=np.arange(count, dtype=np.int32),
            z_mm=np.zeros(count),
        )
        write_slices(s, os.path.join(out, f"{name}.parquet"))


def bare_loop(dataset: str, args, device: str) -> float:
    """images/s of views + train_step over the slices, epochs after the first."""
    from ctsearch.model import ModelConfig, SimSiam
    from ctsearch.ssl import build_optimizer, train_step
    from ctsearch.store import read_slices
    from ctsearch.views import TwoViews

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=args.backbone, image_size=args.image_size)
    on_gpu = device == "cuda"
    # The same settings as the Ray worker: bf16 autocast and channels_last on the GPU.
    mf = torch.channels_last if on_gpu else torch.contiguous_format
    model = SimSiam(cfg).to(device, memory_format=mf)
    opt = build_optimizer(model, batch_size=args.batch_size)
    views = TwoViews(cfg)
    hu = read_slices(os.path.join(dataset, "train.parquet")).hu
    rng = np.random.default_rng(0)
    stamps = []
    for _ in range(args.epochs):
        order = rng.permutation(len(hu))
        for i in range(0, len(hu) - args.batch_size + 1, args.batch_size):
            x1, x2 = views(hu[order[i : i + args.batch_size]])
            x1, x2 = (x.to(device, memory_format=mf) for x in (x1, x2))
            train_step(model, opt, x1, x2, torch.bfloat16 if on_gpu else None)
        stamps.append(time.perf_counter())
    per_epoch = (len(hu) // args.batch_size) * args.batch_size
    return per_epoch * (args.epochs - 1) / (stamps[-1] - stamps[0])


def ray_loop(dataset: str, args, gpus: float) -> tuple[float, float]:
    """images/s of the same work through ctsearch.jobs.train (Ray Train V2), epochs after the first.

    Returns (wall rate between epoch ends, rate inside the epochs' step loops).
    """
    import ray

    from ctsearch.jobs.train import TrainOptions, read_metrics, train

    if not ray.is_initialized():
        ray.init(
            num_cpus=max(4, os.cpu_count() or 1),
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
        )
    out = tempfile.mkdtemp(prefix="bench-train-")
    opts = TrainOptions(
        backbone=args.backbone,
        image_size=args.image_size,
        init="random",
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_every=0,
        cpus_per_worker=args.threads,
        gpus_per_worker=gpus,
        max_failures=0,
    )
    train(dataset, out, opts)
    rows = read_metrics(out)
    images = sum(r["images"] for r in rows[1:])
    in_loop = images / sum(r["seconds"] for r in rows[1:])
    return images / (rows[-1]["finished_at"] - rows[0]["finished_at"]), in_loop


def gpu_step(args, batch: int) -> float:
    """images/s of the bare bf16 + channels_last SimSiam step with views already on the GPU."""
    from ctsearch.model import ModelConfig, SimSiam
    from ctsearch.ssl import build_optimizer, train_step

    cfg = ModelConfig(backbone=args.backbone, image_size=args.image_size)
    model = SimSiam(cfg).cuda().to(memory_format=torch.channels_last)
    opt = build_optimizer(model, batch_size=batch)
    x1, x2 = (
        torch.rand(batch, 3, args.image_size, args.image_size, device="cuda").contiguous(
            memory_format=torch.channels_last
        )
        for _ in range(2)
    )
    for _ in range(3):
        train_step(model, opt, x1, x2, torch.bfloat16)
    torch.cuda.synchronize()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        train_step(model, opt, x1, x2, torch.bfloat16)
        steps += 1
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backbone", default=None, help="default: resnet18 on CPU, resnet50 on CUDA")
    ap.add_argument("--image-size", type=int, default=None, help="default: 96 on CPU, 224 on CUDA")
    ap.add_argument("--slice-size", type=int, default=128, help="side of the stored synthetic slices")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--slices", type=int, default=None, help="training slices (default: 4 batches on CPU, 16 on CUDA)"
    )
    ap.add_argument("--epochs", type=int, default=3, help="epochs per loop; the first is warm-up")
    ap.add_argument("--threads", type=int, default=1, help="torch threads = CPUs of the Ray worker")
    ap.add_argument("--seconds", type=float, default=8.0, help="CUDA: seconds per step measurement")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    args.backbone = args.backbone or ("resnet50" if cuda else "resnet18")
    args.image_size = args.image_size or (224 if cuda else 96)
    args.slices = args.slices or args.batch_size * (16 if cuda else 4)
    result: dict = {
        "device": args.device,
        "backbone": args.backbone,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "threads": args.threads,
    }
    if cuda:
        result["gpu"] = torch.cuda.get_device_name()
        for batch in (32, 256):
            result[f"bare_bf16_images_per_s_batch{batch}"] = round(gpu_step(args, batch), 1)
            print(json.dumps(result), flush=True)
    with tempfile.TemporaryDirectory() as d:
        make_dataset(d, args.slices, args.slice_size)
        bare = bare_loop(d, args, "cuda" if cuda else "cpu")
        ray_rate, ray_in_loop = ray_loop(d, args, 1.0 if cuda else 0.0)
        # The bare loop again, after Ray, so that drift in a shared machine's load shows up.
        bare_after = bare_loop(d, args, "cuda" if cuda else "cpu")
    bare = (bare + bare_after) / 2
    result.update(
        bare_images_per_s=round(bare, 2),
        ray_images_per_s=round(ray_rate, 2),
        ratio=round(ray_rate / bare, 3),
        ray_step_loop_images_per_s=round(ray_in_loop, 2),
        step_loop_ratio=round(ray_in_loop / bare, 3),
        slices_per_epoch=args.slices,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
