"""``ctsearch train DATASET_DIR OUT``: SimSiam with HU-clipping views, on Ray Train."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ctsearch.backbones import BACKBONES, backbone_help
from ctsearch.cli.common import (
    ADDRESS_OPT,
    JSON_OPT,
    QUIET_OPT,
    CallbackBar,
    choice,
    emit_json,
    handle_errors,
    location,
    say,
)
from ctsearch.config import MAX_IMAGE_SIZE


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)


@handle_errors
def train_cmd(
    dataset_dir: str = typer.Argument(
        ...,
        help="Folder written by `ctsearch prepare` (train.parquet, test.parquet); a local path or a URI such as s3://bucket/prepared.",
    ),
    out: str = typer.Argument(
        ...,
        help="Run directory, local or a URI such as s3://bucket/runs/r0; rerunning with the same OUT resumes after the last finished epoch.",
    ),
    backbone: str = typer.Option("resnet50", **choice(*BACKBONES), help=f"Backbone: {backbone_help()}."),
    image_size: int = typer.Option(
        224, min=16, max=MAX_IMAGE_SIZE, help="Side of the square network input, pixels."
    ),
    views: str = typer.Option(
        "clinical",
        **choice("clinical", "standard"),
        help="clinical: view 1 wide [-200,300] HU, view 2 narrow [50,150] HU; standard: both wide.",
    ),
    rescale: str = typer.Option(
        "reference",
        **choice("reference", "own"),
        help="reference: narrow view on the wide scale (reference code); own: stretch each window to [0,1].",
    ),
    jitter: str = typer.Option(
        "paper",
        **choice("paper", "reference"),
        help="Colour-jitter saturation: paper (0.4) or reference (0.2).",
    ),
    crop_scale: float = typer.Option(
        0.2,
        help="Smallest RandomResizedCrop area, fraction of the slice (paper 0.2; larger keeps more anatomy per view at small image sizes).",
    ),
    views_device: str = typer.Option(
        "auto",
        help="Where the two views are made: auto (the worker's device), cpu (torchvision, one image at a time: the reference), cuda (batched on the worker's GPU), cpu-batched (batched on the CPU).",
    ),
    train_slices: str = typer.Option(
        "protocol",
        **choice("protocol", "all"),
        help="Slices SimSiam trains on: protocol (train.parquet) or all (train_all.parquet: every slice of the train volumes, from `prepare --train-all-slices`). Evaluation always uses the protocol.",
    ),
    init: str = typer.Option(
        "imagenet",
        help="Start weights: imagenet (local file or torch cache, never downloaded), random, or a run dir / weight file.",
    ),
    zero_init_residual: bool = typer.Option(
        True,
        "--zero-init-residual/--no-zero-init-residual",
        help="With --init random: zero each residual block's last BN (SimSiam code; the untrained encoder is then nearly linear) or 1 (torchvision default, a full-depth random network).",
    ),
    weights: Optional[Path] = typer.Option(
        None, help="ImageNet weight file for --init imagenet (default: the torch cache)."
    ),
    epochs: int = typer.Option(
        250, min=1, help="Total epochs of the run (a rerun with more epochs continues)."
    ),
    batch_size: int = typer.Option(
        32, min=1, max=65536, help="Global batch size, slices (split over workers)."
    ),
    base_lr: float = typer.Option(0.05, help="Base learning rate; lr = base_lr x batch / 256."),
    schedule: str = typer.Option(
        "constant",
        **choice("constant", "cosine"),
        help="Learning-rate schedule: constant (paper) or cosine (original SimSiam).",
    ),
    fix_pred_lr: bool = typer.Option(
        False, "--fix-pred-lr", help="Keep the predictor's lr fixed under the cosine schedule."
    ),
    seed: int = typer.Option(0, help="Random seed (weights, views, data order)."),
    eval_every: int = typer.Option(
        5, min=0, help="Evaluate MAP@5 and 5-NN accuracy every N epochs (0: never)."
    ),
    workers: int = typer.Option(1, min=1, help="Ray Train workers (data parallel)."),
    gpus_per_worker: float = typer.Option(0.0, help="GPUs per worker (0: train on CPU)."),
    cpus_per_worker: float = typer.Option(
        1.0, help="CPUs reserved per worker (also its torch threads); leave some for Ray Data."
    ),
    max_failures: int = typer.Option(
        3, help="Worker failures to recover from (restart from the last checkpoint); -1: unlimited."
    ),
    placement: str = typer.Option(
        "pack",
        **choice("pack", "spread"),
        help="Worker placement on a cluster: pack (fewest nodes, fast all-reduce) or spread (one node each where possible).",
    ),
    address: Optional[str] = ADDRESS_OPT,
    json_out: bool = JSON_OPT,
    quiet: bool = QUIET_OPT,
) -> None:
    """Train a SimSiam encoder on prepared CT slices; writes checkpoints, metrics and the encoder into OUT."""
    from ctsearch import storage
    from ctsearch.jobs.runtime import run_job
    from ctsearch.jobs.train import TrainOptions, check_options, train

    dataset_dir, out = location(dataset_dir), location(out)
    opts = TrainOptions(
        backbone=backbone,
        image_size=image_size,
        views=views,
        rescale=rescale,
        jitter=jitter,
        crop_scale=crop_scale,
        views_device=views_device,
        train_slices=train_slices,
        init=init,
        zero_init_residual=zero_init_residual,
        weights=str(weights) if weights else None,
        epochs=epochs,
        batch_size=batch_size,
        base_lr=base_lr,
        schedule=schedule,
        fix_pred_lr=fix_pred_lr,
        seed=seed,
        eval_every=eval_every,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
        max_failures=max_failures,
        placement=placement,
    )
    check_options(opts)  # before any connection: a bad option never waits for a cluster

    bar = CallbackBar(f"training {storage.name(out)}", off=quiet)

    def show(row: dict, total: int) -> None:
        bar.update(row["epoch"], total)
        extra = (
            f"  MAP@5 {row['map_at_5']:.3f}  5-NN acc {row['knn_accuracy']:.3f}" if "map_at_5" in row else ""
        )
        rate = (
            f"  {row['images'] / row['seconds']:.0f} images/s"
            if row.get("images") and row["seconds"] > 0
            else ""
        )
        say(
            f"epoch {row['epoch']}/{total}  loss {row['loss']:.4f}  {row['seconds']:.0f} s{rate}{extra}",
            quiet,
        )

    try:
        summary = run_job(
            train,
            dataset_dir,
            out,
            opts,
            address=address,
            on_epoch=show,
            callbacks=("on_epoch",),
            status=lambda m: say(m, quiet),
        )
    finally:
        bar.close()
    if json_out:
        emit_json(summary)
    else:
        say(
            f"encoder written to {out} ({summary['epochs']} epochs, final loss {summary['final_loss']})",
            quiet,
        )
