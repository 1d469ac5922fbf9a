"""``ctsearch reproduce DATASET_DIR OUT``: Table 1 (configurations x seeds) as one Ray Tune job, with intervals and verdicts."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ctsearch.backbones import BACKBONES, backbone_help
from ctsearch.cli.common import (
    ADDRESS_OPT,
    JSON_OPT,
    QUIET_OPT,
    choice,
    emit_json,
    emit_result,
    handle_errors,
    say,
)
from ctsearch.config import MAX_IMAGE_SIZE


def register(app: typer.Typer) -> None:
    app.command("reproduce")(reproduce_cmd)


@handle_errors
def reproduce_cmd(
    dataset_dir: str = typer.Argument(
        ...,
        help="Slice dataset from `ctsearch prepare --protocol decathlon` (trained on and evaluated); a local folder.",
    ),
    out: str = typer.Argument(
        ...,
        help="Output folder: runs/<config>-s<seed>/ (ordinary run folders), table.json, table.md; a local folder.",
    ),
    configs: str = typer.Option(
        "clinical,standard,none",
        help="Comma-separated: clinical (SimSiam, HU-clipping views), standard (SimSiam, wide views), "
        "none (no self-supervision: the start encoder of that seed).",
    ),
    seeds: int = typer.Option(5, min=1, help="Seeds per configuration (0..N-1)."),
    backbone: str = typer.Option("resnet50", **choice(*BACKBONES), help=f"Backbone: {backbone_help()}."),
    image_size: int = typer.Option(
        224, min=16, max=MAX_IMAGE_SIZE, help="Side of the square network input, pixels."
    ),
    init: str = typer.Option(
        "imagenet",
        help="Start weights of every configuration: imagenet (local file or torch cache) or random.",
    ),
    weights: Optional[Path] = typer.Option(
        None, help="ImageNet weight file for --init imagenet (default: the torch cache)."
    ),
    zero_init_residual: bool = typer.Option(
        True,
        "--zero-init-residual/--no-zero-init-residual",
        help="With --init random: each residual block's last BN at 0 (SimSiam code) or 1 (a full-depth random network).",
    ),
    train_slices: str = typer.Option(
        "protocol",
        **choice("protocol", "all"),
        help="Slices SimSiam trains on: protocol (train.parquet) or all (train_all.parquet, `prepare --train-all-slices`).",
    ),
    rescale: str = typer.Option(
        "reference",
        **choice("reference", "own"),
        help="Narrow view's intensity rescale: reference (paper's code) or own (stretch each window).",
    ),
    crop_scale: float = typer.Option(0.2, help="Smallest RandomResizedCrop area (paper 0.2)."),
    epochs: int = typer.Option(250, min=1, help="Epochs of each SimSiam run."),
    batch_size: int = typer.Option(32, min=1, max=65536, help="Global batch size, slices."),
    base_lr: float = typer.Option(0.05, help="Base learning rate; lr = base_lr x batch / 256."),
    schedule: str = typer.Option("constant", **choice("constant", "cosine"), help="Learning-rate schedule."),
    eval_every: int = typer.Option(5, min=0, help="Each run's own MAP@5 / 5-NN every N epochs (0: never)."),
    workers: int = typer.Option(1, min=1, help="Ray Train workers per trial."),
    gpus_per_worker: float = typer.Option(0.0, help="GPUs per worker (0: train on CPU)."),
    cpus_per_worker: float = typer.Option(1.0, help="CPUs reserved per worker."),
    max_concurrent: int = typer.Option(
        0, min=0, help="Trials at once (0: as many as the cluster's CPUs and GPUs hold)."
    ),
    k: int = typer.Option(5, "-k", "--k", min=1, help="K of MAP@K and of the k-NN classifier."),
    relax_masks: int = typer.Option(
        0, min=0, max=1_000_000, help="RELAX masks per liver slice for RR (0: skip RR, the slow part)."
    ),
    n_boot: int = typer.Option(10_000, min=100, help="Bootstrap resamples (and permutations)."),
    crossexam: bool = typer.Option(
        False,
        "--crossexam",
        help="Also measure cross-examination retrieval of every run (as `ctsearch evaluate --crossexam`; "
        "archives of `ctsearch synth --exams 2`), into OUT/evaluation.json and the report.",
    ),
    address: Optional[str] = ADDRESS_OPT,
    json_out: bool = JSON_OPT,
    quiet: bool = QUIET_OPT,
) -> None:
    """Train every configuration x seed as Ray Tune trials (finished ones reused), evaluate, print Table 1 with verdicts."""
    from ctsearch.errors import CTSearchInputError
    from ctsearch.jobs.reproduce import ReproduceOptions, reproduce
    from ctsearch.jobs.runtime import run_job
    from ctsearch.jobs.train import TrainOptions
    from ctsearch.storage import is_remote

    for where in (dataset_dir, out):
        if is_remote(where):  # a URI is refused, never folded into a local folder named "s3:"
            raise CTSearchInputError(
                where, "`ctsearch reproduce` takes local folders only (train, evaluate and explain take URIs)"
            )
    dataset_dir, out = Path(dataset_dir), Path(out)

    base = TrainOptions(
        backbone=backbone,
        image_size=image_size,
        init=init,
        weights=str(weights) if weights else None,
        zero_init_residual=zero_init_residual,
        train_slices=train_slices,
        rescale=rescale,
        crop_scale=crop_scale,
        epochs=epochs,
        batch_size=batch_size,
        base_lr=base_lr,
        schedule=schedule,
        eval_every=eval_every,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
    )
    options = ReproduceOptions(
        configs=tuple(c.strip() for c in configs.split(",") if c.strip()),
        seeds=seeds,
        k=k,
        relax_masks=relax_masks,
        n_boot=n_boot,
        max_concurrent=max_concurrent,
        crossexam=crossexam,
    )
    table = run_job(
        reproduce,
        dataset_dir,
        out,
        base,
        options,
        address=address,
        log=lambda m: say(m, quiet or json_out),
        status=lambda m: say(m, quiet or json_out),
        callbacks=("log",),
    )
    if json_out:
        emit_json(table)
        return
    emit_result(table["markdown"])
    if table.get("crossexam"):
        c = table["crossexam"]
        emit_result("\n" + c["table"])
        say(
            f"cross-exam: {c['queries']} query slices in {c['exam_pairs']} ordered exam pairs of {c['patients']} test "
            f"patients with two or more exams; |Δz| = distance of the top-1 slice from the true anatomical position",
            quiet,
        )
    say(f"table written to {out / 'table.md'} and {out / 'table.json'}", quiet)
