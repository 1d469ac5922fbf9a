"""Training throughput: Ray Train with CPU views and with device views against the bare step, in one run.

For each batch size it measures, side by side on one machine:

- ``step``: the bare SimSiam step (``ctsearch.ssl.train_step``) on views already on the device:
  bf16 autocast + channels_last on CUDA, float32 on CPU. The model's ceiling.
- ``views_alone_*``: slices/s of making the two views alone, torchvision on one CPU thread and
  the batched views on the device (HU already there).
- ``ray_cpu_views``: ``ctsearch.jobs.train.train`` (Ray Data ingest, views, step, a checkpoint
  and a report per epoch) with ``--views-device cpu``: torchvision, one image at a time.
- ``ray_device_views``: the same with the batched views on the worker's device
  (``--views-device cuda``; on a CPU machine ``cpu-batched``, so the script runs anywhere).

Ray rates are images/s over the epochs after the first (warm-up): ``*_in_loop`` inside the
epochs' step loops (ingest + views + step: what keeps the device busy) and ``*_wall`` between
epoch ends (adds the per-epoch checkpoint and report, which real, longer epochs amortise). The
ratios divide by ``step`` (on CPU by the mean of ``step`` and ``step_after``, measured again
after the Ray runs because a shared machine's load drifts). Target on a GPU: ray_device_views >= 0.8 x step.
``--bare-loop`` adds the earlier comparison: views + step in a plain loop against Ray.

    .venv/bin/python bench/train.py                  # CPU: ResNet18 96 px, batch 32, ~3 min on 2 cores
    .venv/bin/python bench/train.py --backbone tiny --image-size 32 --slice-size 64 --epochs 2   # smoke
    python3 bench/train.py --device cuda             # GPU: ResNet50 224 px, batch 32 and 256, ~90 s
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


def ray_loop(dataset: str, args, batch: int, views_device: str, gpus: float) -> tuple[float, float]:
    """images/s of ctsearch.jobs.train (Ray Train V2), epochs after the first: (wall between epoch ends, in the step loops)."""
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
        batch_size=batch,
        eval_every=0,
        cpus_per_worker=args.threads,
        gpus_per_worker=gpus,
        max_failures=0,
        views_device=views_device,
    )
    train(dataset, out, opts)
    rows = read_metrics(out)
    images = sum(r["images"] for r in rows[1:])
    in_loop = images / sum(r["seconds"] for r in rows[1:])
    return images / (rows[-1]["finished_at"] - rows[0]["finished_at"]), in_loop


def step_rate(args, batch: int, device: str) -> float:
    """images/s of the bare SimSiam step with views already on the device (bf16 + channels_last on CUDA)."""
    from ctsearch.model import ModelConfig, SimSiam
    from ctsearch.ssl import build_optimizer, train_step

    cuda = device == "cuda"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mf = torch.channels_last if cuda else torch.contiguous_format
    cfg = ModelConfig(backbone=args.backbone, image_size=args.image_size)
    model = SimSiam(cfg).to(device, memory_format=mf)
    opt = build_optimizer(model, batch_size=batch)
    x1, x2 = (
        torch.rand(batch, 3, args.image_size, args.image_size, device=device).contiguous(memory_format=mf)
        for _ in range(2)
    )
    autocast = torch.bfloat16 if cuda else None
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(2):
        train_step(model, opt, x1, x2, autocast)
    sync()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds or steps < 3:
        train_step(model, opt, x1, x2, autocast, sync=False)  # no host sync per step, as the Ray worker
        steps += 1
    sync()
    return steps * batch / (time.perf_counter() - t0)


def views_rate(args, batch: int, device: str | None) -> float:
    """Slices/s of making both views alone (no model): torchvision on one CPU thread (device None,
    at most 8 slices a call) or ctsearch.device_views on ``device`` with the HU batch already there."""
    from ctsearch.device_views import BatchedTwoViews
    from ctsearch.model import ModelConfig
    from ctsearch.views import TwoViews

    torch.set_num_threads(args.threads)
    cfg = ModelConfig(backbone=args.backbone, image_size=args.image_size)
    n = batch if device else min(batch, 8)
    hu = np.random.default_rng(0).integers(-300, 400, (n, args.slice_size, args.slice_size)).astype(np.int16)
    if device:
        views, x = BatchedTwoViews(cfg), torch.from_numpy(hu).to(device)
    else:
        views, x = TwoViews(cfg), hu
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    views(x)
    sync()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0 or calls < 2:
        views(x)
        calls += 1
    sync()
    return calls * n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backbone", default=None, help="default: resnet18 on CPU, resnet50 on CUDA")
    ap.add_argument("--image-size", type=int, default=None, help="default: 96 on CPU, 224 on CUDA")
    ap.add_argument(
        "--slice-size",
        type=int,
        default=None,
        help="side of the synthetic HU slices (default: 128 CPU, 512 CUDA)",
    )
    ap.add_argument(
        "--batch-sizes", default=None, help="comma-separated (default: 32 on CPU, 32,256 on CUDA)"
    )
    ap.add_argument(
        "--slices",
        default=None,
        help="slices per Ray epoch (whole batches, at least one), device views,CPU views "
        "(default 128,128 on CPU; 1024,256 on CUDA, where the CPU views run at ~110 images/s)",
    )
    ap.add_argument(
        "--views", default="cpu,device", help="which Ray runs: cpu (torchvision views), device, or both"
    )
    ap.add_argument(
        "--epochs", type=int, default=None, help="epochs per Ray run, the first is warm-up (3 CPU, 2 CUDA)"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads = CPUs of the Ray worker")
    ap.add_argument(
        "--seconds", type=float, default=None, help="seconds per bare-step measurement (5 CPU, 3 CUDA)"
    )
    ap.add_argument(
        "--bare-loop", action="store_true", help="also views + step in a plain loop (the older comparison)"
    )
    args = ap.parse_args()
    cuda = args.device == "cuda"
    args.backbone = args.backbone or ("resnet50" if cuda else "resnet18")
    args.image_size = args.image_size or (224 if cuda else 96)
    args.slice_size = args.slice_size or (512 if cuda else 128)
    args.epochs = args.epochs or (2 if cuda else 3)
    args.seconds = args.seconds or (3.0 if cuda else 5.0)
    batches = [int(b) for b in (args.batch_sizes or ("32,256" if cuda else "32")).split(",")]
    dev_slices, cpu_slices = (int(s) for s in (args.slices or ("1024,256" if cuda else "128,128")).split(","))
    views = args.views.split(",")
    device_views = "cuda" if cuda else "cpu-batched"
    result: dict = {
        "device": args.device,
        "backbone": args.backbone,
        "image_size": args.image_size,
        "slice_size": args.slice_size,
        "threads": args.threads,
        "epochs": args.epochs,
    }
    if cuda:
        result["gpu"] = torch.cuda.get_device_name()
    for batch in batches:
        row: dict = {"batch": batch}
        row["step"] = round(step_rate(args, batch, args.device), 1)
        row["views_alone_torchvision_1_thread"] = round(views_rate(args, batch, None), 1)
        row["views_alone_device"] = round(views_rate(args, batch, args.device), 1)
        if cuda:
            torch.cuda.empty_cache()  # give the Ray worker the memory this process cached
        print(json.dumps({**result, **row}), flush=True)
        for name, choice, slices in (("cpu", "cpu", cpu_slices), ("device", device_views, dev_slices)):
            if name not in views:
                continue
            with tempfile.TemporaryDirectory() as d:
                n = batch * max(1, slices // batch)
                make_dataset(d, n, args.slice_size)
                wall, in_loop = ray_loop(d, args, batch, choice, 1.0 if cuda else 0.0)
                if args.bare_loop and name == "cpu":
                    args.batch_size = batch
                    row["bare_loop_cpu_views"] = round(bare_loop(d, args, args.device), 1)
            row[f"{name}_views_slices_per_epoch"] = n
            row[f"ray_{name}_views_in_loop"] = round(in_loop, 1)
            row[f"ray_{name}_views_wall"] = round(wall, 1)
            row[f"ratio_{name}_views"] = round(in_loop / row["step"], 3)
            row[f"ratio_{name}_views_wall"] = round(wall / row["step"], 3)
            print(json.dumps({**result, **row}), flush=True)
        if not cuda:
            # A shared CPU's load drifts over minutes: measure the step again after the Ray runs and
            # divide by the mean (a GPU machine is not shared; the one measurement stands).
            row["step_after"] = round(step_rate(args, batch, args.device), 1)
            step = (row["step"] + row["step_after"]) / 2
            for name in views:
                if f"ray_{name}_views_in_loop" in row:
                    row[f"ratio_{name}_views"] = round(row[f"ray_{name}_views_in_loop"] / step, 3)
                    row[f"ratio_{name}_views_wall"] = round(row[f"ray_{name}_views_wall"] / step, 3)
        if "ray_cpu_views_in_loop" in row and "ray_device_views_in_loop" in row:
            row["device_over_cpu_views"] = round(
                row["ray_device_views_in_loop"] / row["ray_cpu_views_in_loop"], 2
            )
        result[f"batch{batch}"] = row
    print(json.dumps(result))


if __name__ == "__main__":
    main()
