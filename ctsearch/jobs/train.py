"""SimSiam training on Ray Train (V2 API): one laptop by default, a GPU cluster unchanged.

The driver checks the inputs, writes ``OUT/config.json`` and starts a ``TorchTrainer``. Each
worker reads its shard of ``train.parquet`` from Ray's object store (the driver puts a small
dataset there whole; Ray Data's read tasks a large one), makes two views per slice
(``ctsearch.views.TwoViews``) and runs ``ctsearch.ssl.train_step``. Rank 0 checkpoints every
epoch into ``OUT/checkpoints`` (Ray's run folder, weights as safetensors), appends a line to
``OUT/metrics.jsonl`` and finally writes the encoder (``OUT/encoder.safetensors`` +
``OUT/model.json``) for ``ctsearch index``.

Resuming: Ray Train V2 restores a run from ``RunConfig(storage_path, name)``; a worker that fails
is restarted from the last checkpoint (``max_failures``), and running the same command again on
the same OUT continues after the last finished epoch. OUT must therefore be storage that every
node sees (a local disk on one machine, NFS or similar on a cluster), or an object-store URI
(``s3://bucket/runs/r0``): then Ray Train writes the checkpoints there through the store's
filesystem, rank 0 writes metrics.jsonl and the encoder there object by object, the dataset is read
from its URI, and a lease (``storage.writer_lock``) replaces the folder's flock.

Example:
    >>> from ctsearch.jobs.train import TrainOptions, train  # doctest: +SKIP
    >>> train("prepared/", "runs/r0", TrainOptions(backbone="tiny", image_size=64, init="random", epochs=2))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, get_args

import numpy as np
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from ctsearch import storage
from ctsearch.backbones import TRAINABLE
from ctsearch.config import RUN_CONFIG, ModelConfig, Views
from ctsearch.errors import CTSearchInputError
from ctsearch.hu import Rescale
from ctsearch.model import SimSiam, initial_encoder_state, save_encoder, set_residual_bn
from ctsearch.ssl import OptimConfig, build_optimizer, set_lr, train_step
from ctsearch.store import check_pixel_rows, decode_pixels, read_jsonl

CONFIG_FILE = RUN_CONFIG
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
CKPT_MODEL, CKPT_OPTIM, CKPT_STATE = "model.safetensors", "optimizer.pt", "state.json"
# Test hook: a worker raises once when it reaches this epoch (exercises max_failures).
FAIL_ENV = "CTSEARCH_FAIL_AT_EPOCH"
FAIL_MARKER = ".injected_failure"
# --train-slices -> the file of DATASET_DIR that SimSiam trains on (evaluation always uses
# train.parquet as the database and test.parquet as the queries, the paper's protocol).
TRAIN_FILES = {"protocol": "train.parquet", "all": "train_all.parquet"}
# --views-device: auto (the worker's device), cpu (torchvision, one image at a time: the reference),
# cuda (ctsearch.device_views on the worker's GPU), cpu-batched (ctsearch.device_views on the CPU).
VIEWS_DEVICES = ("auto", "cpu", "cuda", "cpu-batched")
SHUFFLE_BUFFER = 256  # rows held per worker for the local shuffle (~128 MiB of 512x512 slices)
# Up to this many bytes of pixels (uncompressed), the driver reads the dataset and hands it to Ray
# whole: Ray Data's read tasks take 2-5 s to start, longer than such a dataset takes per epoch.
SMALL_DATASET_BYTES = 64 * 2**20


@dataclass
class TrainOptions:
    """Every option of ``ctsearch train``; see docs/training.md for their meaning."""

    backbone: str = "resnet50"
    image_size: int = 224
    views: str = "clinical"
    rescale: str = "reference"
    jitter: str = "paper"
    crop_scale: float = 0.2
    views_device: str = "auto"
    train_slices: str = "protocol"
    init: str = "imagenet"
    zero_init_residual: bool = True
    weights: str | None = None
    epochs: int = 250
    batch_size: int = 32
    base_lr: float = 0.05
    schedule: str = "constant"
    fix_pred_lr: bool = False
    seed: int = 0
    eval_every: int = 5
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_failures: int = 3
    keep_checkpoints: int = 2
    placement: str = "pack"

    # Options that define what is trained; a rerun on the same OUT must keep them.
    IDENTITY = (
        "backbone",
        "image_size",
        "views",
        "rescale",
        "jitter",
        "crop_scale",
        "train_slices",
        "init",
        "zero_init_residual",
        "weights",
        "batch_size",
        "base_lr",
        "schedule",
        "fix_pred_lr",
        "seed",
    )

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            backbone=self.backbone, image_size=self.image_size, views=self.views, rescale=self.rescale
        )

    def optim_config(self) -> OptimConfig:
        return OptimConfig(
            base_lr=self.base_lr,
            batch_size=self.batch_size,
            schedule=self.schedule,
            fix_pred_lr=self.fix_pred_lr,
            epochs=self.epochs,
        )


def check_options(o: TrainOptions) -> None:
    """Reject impossible combinations with one-line messages before any work starts."""
    choices = {
        "backbone": sorted(TRAINABLE),
        "views": list(get_args(Views)),
        "rescale": list(get_args(Rescale)),
        "jitter": ["paper", "reference"],
        "schedule": ["constant", "cosine"],
        "train_slices": list(TRAIN_FILES),
        "placement": ["pack", "spread"],
        "views_device": list(VIEWS_DEVICES),
    }
    for name, allowed in choices.items():
        if getattr(o, name) not in allowed:
            raise CTSearchInputError(
                None, f"--{name.replace('_', '-')} must be one of {allowed}, got {getattr(o, name)!r}"
            )
    positive = ("image_size", "epochs", "batch_size", "workers")
    for name in positive:
        if getattr(o, name) < 1:
            raise CTSearchInputError(None, f"--{name.replace('_', '-')} must be at least 1")
    if not 0.0 < o.crop_scale <= 1.0:
        raise CTSearchInputError(None, f"--crop-scale must be in (0, 1], got {o.crop_scale}")
    if o.image_size < 32:
        raise CTSearchInputError(None, "--image-size must be at least 32 pixels")
    if o.batch_size % o.workers or o.batch_size // o.workers < 2:
        raise CTSearchInputError(
            None,
            f"--batch-size {o.batch_size} must split into >= 2 slices per worker over {o.workers} workers",
        )
    if o.views_device == "cuda" and not o.gpus_per_worker:
        raise CTSearchInputError(None, "--views-device cuda needs GPU workers (--gpus-per-worker > 0)")
    if o.eval_every < 0 or o.max_failures < -1 or o.cpus_per_worker <= 0 or o.gpus_per_worker < 0:
        raise CTSearchInputError(
            None, "--eval-every >= 0, --max-failures >= -1, --cpus-per-worker > 0, --gpus-per-worker >= 0"
        )


def versions() -> dict[str, str]:
    import torchvision

    import ctsearch

    return {
        "ctsearch": ctsearch.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray.__version__,
        "numpy": np.__version__,
    }


def read_metrics(out: str | os.PathLike) -> list[dict]:
    """The rows of ``OUT/metrics.jsonl`` (one per epoch; epoch 0 holds the untrained evaluation)."""
    if storage.is_remote(out):  # a fresh local copy (one listing, and a GET when it changed)
        path = storage.local_file(storage.join(out, METRICS_FILE))
        return read_jsonl(path) if path.is_file() else []
    path = Path(out) / METRICS_FILE
    return read_jsonl(path) if path.is_file() else []


def read_run_config(out: Path | str) -> dict | None:
    """OUT/config.json, or None when OUT holds no run yet."""
    cfg_path = storage.join(out, CONFIG_FILE) if storage.is_remote(out) else out / CONFIG_FILE
    if not storage.is_file(cfg_path):
        return None
    try:
        return json.loads(storage.read_bytes(cfg_path))
    except ValueError as e:
        raise CTSearchInputError(cfg_path, f"unreadable run config ({e}); use a new OUT") from None


def check_same_run(out: Path, old: dict, opts: TrainOptions) -> None:
    """Refuse to continue the run in OUT (config.json ``old``) with options that change what is trained."""
    defaults = TrainOptions()
    # Options added after a run was started are absent from its config.json: they had their default.
    previous = {k: old.get("options", {}).get(k, getattr(defaults, k)) for k in TrainOptions.IDENTITY}
    changed = [k for k in TrainOptions.IDENTITY if previous[k] != getattr(opts, k)]
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} {previous[k]!r} -> {getattr(opts, k)!r}" for k in changed)
        raise CTSearchInputError(
            out,
            f"holds a run with other options ({diffs}); resume with the same options or use a new OUT",
        )


def _prepare_run_dir(out: Path | str, opts: TrainOptions, dataset_dir: Path | str) -> dict:
    """Create OUT or check that it holds the same run; (re)write config.json."""
    if not storage.is_remote(out):
        out.mkdir(parents=True, exist_ok=True)
    cfg_path = storage.join(out, CONFIG_FILE)
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    starts = []
    old = read_run_config(out)
    if old is not None:
        check_same_run(out, old, opts)
        starts = old.get("starts", [])
    config = {
        "options": {k: v for k, v in asdict(opts).items()},
        "model": opts.model_config().to_json(),
        "lr": opts.optim_config().init_lr,
        "dataset": str(dataset_dir),
        "versions": versions(),
        "starts": starts + [now],
    }
    storage.write_json(cfg_path, config)
    return config


# ---------------------------------------------------------------------------------------------
# The worker side


def decode_hu(batch: dict) -> list[np.ndarray]:
    """A Ray Data batch of the slice schema -> int16 HU images [height, width], one per row."""
    return [decode_pixels(buf, h, w) for buf, h, w in zip(batch["hu"], batch["height"], batch["width"])]


def hu_tensor(batch: dict, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A Ray Data batch -> (int16 HU [n, Y, X], zero-padded where sizes differ; sizes [n, 2]).

    Decoded straight into one tensor (page-locked with ``pin``, so its copy to the GPU is
    asynchronous): one copy of the pixels on the CPU, for the batched views on the device.
    """
    sizes = torch.from_numpy(np.stack([batch["height"], batch["width"]], 1).astype(np.int64))
    same = bool((sizes == sizes[0]).all())
    shape = (len(sizes), *sizes.max(0).values.tolist())
    out = (torch.empty if same else torch.zeros)(shape, dtype=torch.int16, pin_memory=pin)
    pixels = out.numpy()
    for i, (buf, (h, w)) in enumerate(zip(batch["hu"], sizes.tolist())):
        if len(buf) != 2 * h * w:
            raise ValueError(f"holds {len(buf)} bytes, expected {2 * h * w} for {h}x{w} int16")
        pixels[i, :h, :w] = np.frombuffer(buf, "<i2").reshape(h, w)
    return out, sizes


def _evaluate(model: SimSiam, config: ModelConfig, eval_data, device) -> dict:
    """MAP@5 and 5-NN accuracy of the encoder (test queries, train database) and the collapse monitor."""
    from ctsearch.metrics import knn_accuracy, map_at_k
    from ctsearch.model import embed

    db, q = eval_data
    db_emb = embed(model.encoder, db.hu, config, device=device)
    q_emb = embed(model.encoder, q.hu, config, device=device)
    model.projector.eval()
    with torch.no_grad():
        z = model.projector(torch.from_numpy(q_emb).to(device)).float().cpu().numpy()
    model.projector.train()
    unit = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return {
        "map_at_5": map_at_k(q_emb, q.label, db_emb, db.label, k=5),
        "knn_accuracy": knn_accuracy(q_emb, q.label, db_emb, db.label, k=5),
        # SimSiam's collapse monitor, on the L2-normalised projector output z of the test slices:
        # ~1/sqrt(dim) when healthy, 0 when every output is the same.
        "embedding_std": float(unit.std(axis=0).mean()),
    }


def _rewrite_metrics(out: Path | str, keep_through_epoch: int) -> None:
    """Drop metric rows of epochs that are about to be trained again (their checkpoint was lost)."""
    rows = [r for r in read_metrics(out) if r["epoch"] <= keep_through_epoch]
    storage.write_bytes(storage.join(out, METRICS_FILE), "".join(json.dumps(r) + "\n" for r in rows).encode())


def _append_metrics(out: Path | str, row: dict) -> None:
    if storage.is_remote(out):  # an object has no append: the file is rewritten whole, one PUT
        rows = read_metrics(out) + [row]
        storage.write_bytes(
            storage.join(out, METRICS_FILE), "".join(json.dumps(r) + "\n" for r in rows).encode()
        )
        return
    with open(out / METRICS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _save_checkpoint(model: torch.nn.Module, optimizer, epoch: int, directory: str) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(directory, CKPT_MODEL))
    torch.save(optimizer.state_dict(), os.path.join(directory, CKPT_OPTIM))
    Path(directory, CKPT_STATE).write_text(json.dumps({"epoch": epoch}))


def _load_checkpoint(directory: str) -> tuple[dict, dict, int]:
    from safetensors.torch import load_file

    model_state = load_file(os.path.join(directory, CKPT_MODEL))
    optim_state = torch.load(os.path.join(directory, CKPT_OPTIM), map_location="cpu", weights_only=True)
    epoch = json.loads(Path(directory, CKPT_STATE).read_text())["epoch"]
    return model_state, optim_state, epoch


def train_loop_per_worker(cfg: dict) -> None:
    """Ray Train worker: resume or initialise, then one report (and checkpoint) per epoch."""
    import ray.train.torch

    from ctsearch.device_views import BatchedTwoViews, resolve_views_device
    from ctsearch.views import TwoViews

    storage.adopt(cfg["filesystems"])
    opts = TrainOptions(**cfg["options"])
    mcfg = ModelConfig.from_json(cfg["model"])
    optim_cfg = opts.optim_config()
    out = cfg["out"] if storage.is_remote(cfg["out"]) else Path(cfg["out"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(opts.cpus_per_worker)))
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"

    torch.manual_seed(opts.seed)
    model = SimSiam(mcfg)
    if not opts.zero_init_residual:
        set_residual_bn(model.encoder, 1.0)
    start_epoch, optim_state = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model_state, optim_state, start_epoch = _load_checkpoint(d)
        model.load_state_dict(model_state)
    elif cfg["init_state"] is not None:
        model.encoder.load_state_dict(ray.get(cfg["init_state"]))
    if on_gpu and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    core = getattr(model, "module", model)
    optimizer = build_optimizer(model, config=optim_cfg)
    if optim_state is not None:
        optimizer.load_state_dict(optim_state)

    eval_data = None
    if rank == 0:
        # A run that restarts from scratch also re-evaluates epoch 0, so drop that row too.
        _rewrite_metrics(out, start_epoch if start_epoch else -1)
        if opts.eval_every:
            from ctsearch.store import read_slices

            eval_data = tuple(read_slices(storage.local_file(cfg[k])) for k in ("train_path", "test_path"))
            if start_epoch == 0:
                _append_metrics(out, {"epoch": 0, **_evaluate(core, mcfg, eval_data, device)})

    # Where each rank runs (Ray node ids, by rank), logged with every epoch: a restarted group
    # may run elsewhere, and a cluster run can show that it really used several nodes.
    nodes = [ray.get_runtime_context().get_node_id()]
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, nodes[0])
        nodes = gathered
    # Where the two views are made: None = torchvision on this CPU, else the batched views on that
    # device, which then receives the int16 HU batch (a quarter of the bytes of two float views).
    views_on = resolve_views_device(opts.views_device, device)
    views = (BatchedTwoViews if views_on else TwoViews)(mcfg, opts.jitter, opts.crop_scale)
    shard = ray.train.get_dataset_shard("train")
    local_batch = opts.batch_size // world
    autocast = torch.bfloat16 if on_gpu else None
    fail_at = cfg.get("fail_at_epoch")
    for epoch in range(start_epoch, opts.epochs):
        number = epoch + 1  # epochs are counted from 1 in every output
        if fail_at == number and not storage.exists(storage.join(out, FAIL_MARKER)):
            storage.write_bytes(storage.join(out, FAIL_MARKER), b"")
            raise RuntimeError(f"injected failure at epoch {number} ({FAIL_ENV})")
        t0 = time.perf_counter()
        # Views depend on (seed, epoch, rank) only, so a resumed run sees what it would have seen.
        torch.manual_seed(opts.seed * 1_000_003 + epoch * 1009 + rank)
        lr = set_lr(optimizer, epoch, optim_cfg)
        losses = []
        batches = shard.iter_batches(
            batch_size=local_batch,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=SHUFFLE_BUFFER,
            local_shuffle_seed=opts.seed * 1009 + epoch,
        )
        mf = torch.channels_last if on_gpu else torch.contiguous_format
        for batch in batches:
            if views_on:
                hu, sizes = hu_tensor(batch, pin=views_on.startswith("cuda"))
                x1, x2 = views(hu.to(views_on, non_blocking=True), sizes)
            else:
                x1, x2 = views(decode_hu(batch))
            x1 = x1.to(device, non_blocking=True).contiguous(memory_format=mf)
            x2 = x2.to(device, non_blocking=True).contiguous(memory_format=mf)
            # No host sync per step (the loss stays on the device): the next batch's ingest and views
            # overlap this step on the GPU.
            losses.append(train_step(model, optimizer, x1, x2, autocast, sync=False))
        if not losses:
            raise RuntimeError(f"worker {rank} got no full batch of {local_batch} slices in epoch {number}")
        total = torch.stack(losses).double().sum()
        loss = torch.stack([total, torch.full_like(total, len(losses))]).to(device)
        if world > 1:
            torch.distributed.all_reduce(loss)
        row = {
            "epoch": number,
            "loss": float(loss[0] / loss[1]),
            "lr": lr,
            "steps": len(losses),
            "images": int(loss[1]) * local_batch,
            "seconds": round(time.perf_counter() - t0, 3),
            "finished_at": time.time(),
            "nodes": nodes,
        }
        if rank == 0:
            if opts.eval_every and (number % opts.eval_every == 0 or number == opts.epochs):
                row.update(_evaluate(core, mcfg, eval_data, device))
            _append_metrics(out, row)
            with tempfile.TemporaryDirectory() as d:
                _save_checkpoint(core, optimizer, number, d)
                ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(row)
    if rank == 0:
        _save_encoder(core.encoder, mcfg, out)


def _save_encoder(encoder: torch.nn.Module, mcfg: ModelConfig, out: Path | str) -> None:
    """``save_encoder`` into OUT; into a store: written here, then uploaded (the weights first)."""
    if not storage.is_remote(out):
        save_encoder(encoder, mcfg, out)
        return
    from ctsearch.config import ENCODER_FILE, MODEL_JSON

    with tempfile.TemporaryDirectory() as d:
        save_encoder(encoder, mcfg, d)
        storage.upload(d, out, [ENCODER_FILE, MODEL_JSON])


# ---------------------------------------------------------------------------------------------
# The driver side


def _follow_epochs(
    out: Path | str, done: int, total: int, stop: threading.Event, on_epoch: Callable[[dict, int], None]
) -> None:
    """Call ``on_epoch(row, total)`` for each new training row of metrics.jsonl as rank 0 appends it."""
    seen = done
    while True:
        finished = stop.is_set()
        try:
            rows = read_metrics(out)
        except CTSearchInputError:
            if not storage.is_remote(out):
                raise
            rows = []  # a store that does not answer for a moment: ask again at the next poll
        for row in rows:
            if row["epoch"] > seen and "loss" in row:
                seen = row["epoch"]
                on_epoch(row, total)
        if finished:
            return
        stop.wait(2.0 if storage.is_remote(out) else 0.5)  # a GET per poll on a store


def train(
    dataset_dir: str | os.PathLike,
    out: str | os.PathLike,
    opts: TrainOptions,
    address: str | None = None,
    on_epoch: Callable[[dict, int], None] | None = None,
) -> dict:
    """Train (or resume) a SimSiam run from ``DATASET_DIR/train.parquet`` (or ``train_all.parquet``) into ``out``.

    ``on_epoch(row, total)``, if given, is called from a thread with each epoch's metrics row as
    it arrives (the CLI draws its progress bar with it). Returns a summary dict.
    """
    from ctsearch.jobs.runtime import announce, start_ray

    check_options(opts)
    # A URI stays a URI (storage.join); a local path is resolved as before.
    dataset_dir = (
        os.fspath(dataset_dir).rstrip("/") if storage.is_remote(dataset_dir) else Path(dataset_dir).resolve()
    )
    out = os.fspath(out).rstrip("/") if storage.is_remote(out) else Path(out).resolve()
    train_path, test_path = (
        storage.join(dataset_dir, "train.parquet"),
        storage.join(dataset_dir, "test.parquet"),
    )
    ssl_path = storage.join(dataset_dir, TRAIN_FILES[opts.train_slices])
    if not storage.is_remote(dataset_dir):
        train_path, test_path, ssl_path = Path(train_path), Path(test_path), Path(ssl_path)
    import pyarrow.parquet as pq

    storage.require_bucket(dataset_dir)
    storage.require_bucket(out)
    for path in [train_path] + ([test_path] if opts.eval_every else []):
        if not storage.is_file(path):
            raise CTSearchInputError(
                path, "no such slice dataset (run `ctsearch prepare --protocol decathlon` first)"
            )
    if not storage.is_file(ssl_path):
        raise CTSearchInputError(
            ssl_path,
            "no such slice dataset (--train-slices all needs `ctsearch prepare --protocol decathlon --train-all-slices`)",
        )
    where, fs = storage.arrow_source(ssl_path)
    try:
        meta = pq.read_metadata(where, filesystem=fs) if fs else pq.ParquetFile(ssl_path).metadata
    except Exception as e:  # noqa: BLE001 - an unreadable file is the user's input problem
        raise CTSearchInputError(ssl_path, f"not a readable parquet file ({e})") from None
    n_train = meta.num_rows
    if n_train < opts.batch_size:
        raise CTSearchInputError(
            ssl_path, f"{n_train} slices, fewer than one batch (--batch-size {opts.batch_size})"
        )

    mcfg = opts.model_config()
    # One writer per run directory: two runs resuming into one OUT would interleave checkpoints.
    with storage.writer_lock(out, "`ctsearch train`"):
        init_state = None
        if not storage.exists(storage.join(out, CHECKPOINT_DIR)):
            init_state = initial_encoder_state(opts.init, mcfg, opts.weights)
        _prepare_run_dir(out, opts, dataset_dir)
        done = max((r["epoch"] for r in read_metrics(out) if "loss" in r), default=0)
        if done:
            announce(f"resuming {out} after epoch {done} of {opts.epochs}")

        need = math.ceil(opts.workers * opts.cpus_per_worker) + 2  # + headroom for Ray Data
        start_ray(address, num_cpus=max(need, os.cpu_count() or 1))
        fail_at = os.environ.get(FAIL_ENV)
        loop_config = {
            "options": asdict(opts),
            "model": mcfg.to_json(),
            "out": str(out),
            "train_path": str(train_path),
            "test_path": str(test_path),
            "init_state": ray.put(init_state) if init_state is not None else None,
            "fail_at_epoch": int(fail_at) if fail_at else None,
            # A worker's own environment may name no endpoint or keys (a node started without
            # them): it uses the driver's filesystems for the run folder and the dataset.
            "filesystems": storage.filesystems([out, dataset_dir]),
        }
        resources = {"CPU": opts.cpus_per_worker}
        if opts.gpus_per_worker:
            resources["GPU"] = opts.gpus_per_worker
        dataset = _pixels_dataset(ssl_path, where, fs, meta)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=opts.workers,
                use_gpu=opts.gpus_per_worker > 0,
                resources_per_worker=resources,
                placement_strategy=opts.placement.upper(),
            ),
            run_config=ray.train.RunConfig(
                name=CHECKPOINT_DIR,
                **_run_storage(out),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=opts.keep_checkpoints),
                failure_config=ray.train.FailureConfig(max_failures=opts.max_failures),
            ),
            datasets={"train": dataset},
        )

        stop = threading.Event()
        follower = None
        if on_epoch is not None:
            follower = threading.Thread(
                target=_follow_epochs, args=(out, done, opts.epochs, stop, on_epoch), daemon=True
            )
            follower.start()
        t0 = time.perf_counter()
        try:
            trainer.fit()
        finally:
            stop.set()
            if follower is not None:
                follower.join(timeout=5)

        rows = read_metrics(out)
        trained = [r for r in rows if "loss" in r]
        evals = [r for r in rows if "map_at_5" in r]
        return {
            "out": str(out),
            "epochs": max((r["epoch"] for r in trained), default=0),
            "resumed_after_epoch": done,
            "final_loss": trained[-1]["loss"] if trained else None,
            "last_eval": evals[-1] if evals else None,
            "encoder": str(storage.join(out, "encoder.safetensors")),
            "nodes": sorted({n for r in trained for n in r.get("nodes", [])}),
            "seconds": round(time.perf_counter() - t0, 1),
        }


def _pixels_dataset(path, where: str, fs, meta) -> ray.data.Dataset:
    """The slices SimSiam trains on (``hu``, ``height``, ``width``), held in Ray's object store.

    Read once (spilled to disk if larger than memory): re-reading the parquet file every epoch
    made the data pipeline, not the model, the bottleneck (bench/train.py). A small dataset is
    read here and put in whole; a large one by Ray Data's read tasks, spread over the cluster.
    """
    import pyarrow.parquet as pq

    columns = ["hu", "height", "width"]
    # What names a bad slice in the error, where the file has it.
    named = columns + [c for c in ("volume_id", "slice_index") if c in meta.schema.names]
    size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if size > SMALL_DATASET_BYTES:
        ds = ray.data.read_parquet(where, filesystem=fs).select_columns(named)
        # This dataset's tasks raise check_pixel_rows' error itself (the driver then prints its
        # one line), not Ray Data's UserCodeException, which drops its cause when pickled.
        ds.context.raise_original_map_exception = True
        checked = ds.map_batches(check_pixel_rows, batch_format="pyarrow", fn_kwargs={"path": str(path)})
        return checked.select_columns(columns).materialize()
    try:
        table = pq.read_table(where, columns=named, filesystem=fs)
    except Exception as e:  # noqa: BLE001 - a damaged file is the user's input problem
        raise CTSearchInputError(path, f"not a readable slice dataset ({e})") from None
    return ray.data.from_arrow(check_pixel_rows(table, path).select(columns))


def _run_storage(out: Path | str) -> dict:
    """RunConfig's storage: the run folder, or in a store its path there and the store's filesystem
    (Ray Train then writes and restores the checkpoints through it, on every node)."""
    if not storage.is_remote(out):
        return {"storage_path": str(out)}
    fs, path = storage.resolve(out)
    return {"storage_path": path, "storage_filesystem": fs}
