"""``ctsearch evaluate``: MAP@K, kNN accuracy and RR of runs and baselines, as the paper's Table 1."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ctsearch.backbones import TRAINABLE
from ctsearch.cli.common import (
    ADDRESS_OPT,
    JSON_OPT,
    QUIET_OPT,
    emit_json,
    emit_result,
    handle_errors,
    location,
    say,
)
from ctsearch.explain import RELAX_BATCH


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_cmd)


@handle_errors
def evaluate_cmd(
    dataset_dir: str = typer.Argument(
        ...,
        help="Slice dataset from `ctsearch prepare --protocol decathlon` (train = database, test = queries); local or a URI.",
    ),
    model: List[str] = typer.Option(
        [], "--model", help="Run directory or run URI; repeat for several runs (same name -> mean ± std)."
    ),
    name: List[str] = typer.Option(
        [],
        "--name",
        help="Table name per --model, in order (default: from the run's config: init + views + backbone).",
    ),
    baseline: List[str] = typer.Option(
        [],
        "--baseline",
        help="Also evaluate an untrained backbone: random (seeded init) or imagenet (local weights). Repeatable.",
    ),
    k: int = typer.Option(5, "-k", "--k", min=1, help="K of MAP@K and of the k-NN classifier."),
    relax_masks: int = typer.Option(
        3000, "--relax-masks", min=0, max=1_000_000, help="RELAX masks per liver slice for RR (0 = skip RR)."
    ),
    batch_size: Optional[int] = typer.Option(
        None,
        "--batch-size",
        min=1,
        max=65536,
        help=f"RELAX masked images per forward pass (default {RELAX_BATCH['cpu']} CPU, {RELAX_BATCH['cuda']} GPU).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the random baseline and of the RELAX masks."),
    weights: Optional[Path] = typer.Option(
        None,
        "--weights",
        help="ImageNet weight file for --baseline imagenet (default: the local torch cache).",
    ),
    backbone: Optional[str] = typer.Option(
        None, "--backbone", help=f"Baselines without --model: backbone ({', '.join(TRAINABLE)})."
    ),
    image_size: Optional[int] = typer.Option(
        None, "--image-size", help="Baselines without --model: input size in px."
    ),
    gpus: int = typer.Option(0, "--gpus", help="GPUs for the RELAX part (one actor each); 0 = CPU actors."),
    workers: int = typer.Option(1, "--workers", help="CPU actors for the RELAX part when --gpus is 0."),
    crossexam: bool = typer.Option(
        False,
        "--crossexam",
        help="Also measure cross-examination retrieval on the test split's patients with two or more exams "
        "(every slice as a query against the patient's other exam; ground truth from `ctsearch synth --exams 2`): "
        "|Δz| of the top-1 slice from the true position, share within one slice thickness, rank correlation of "
        "the returned run with anatomical order, for plain top-k and the coherent method of `search --cross-exam`.",
    ),
    out: Optional[str] = typer.Option(
        None,
        "--out",
        help="Also write the whole result as JSON to this file, local or a URI (what `ctsearch report` reads).",
    ),
    address: Optional[str] = ADDRESS_OPT,
    json_out: bool = JSON_OPT,
    quiet: bool = QUIET_OPT,
) -> None:
    """Evaluate retrieval (MAP@K, k-NN accuracy) and explanations (RR) on the test split."""
    from ctsearch.config import ModelConfig
    from ctsearch.errors import CTSearchInputError
    from ctsearch.explain import ExplainOptions
    from ctsearch.jobs.evaluate import EvaluateOptions, evaluate
    from ctsearch.jobs.runtime import run_job
    from ctsearch.storage import require_bucket

    dataset_dir, out = location(dataset_dir), location(out)
    if out is not None:
        require_bucket(out)  # a URI's bucket checked before the work
    model = [location(m) for m in model]
    base_cfg = None
    if backbone or image_size:
        if model:
            raise CTSearchInputError(
                None,
                "--backbone/--image-size are for baselines without --model (baselines follow the first run's config)",
            )
        base_cfg = ModelConfig(backbone=backbone or "resnet50", image_size=image_size or 224).to_json()
    options = EvaluateOptions(
        k=k,
        relax_masks=relax_masks,
        relax_options=ExplainOptions(batch_size=batch_size, seed=seed),
        baseline_config=base_cfg,
        seed=seed,
        imagenet_weights=str(weights) if weights else None,
        gpus=gpus,
        workers=workers,
        crossexam=crossexam,
    )
    res = run_job(
        evaluate,
        dataset_dir,
        [str(m) for m in model],
        baselines=baseline,
        names=list(name) or None,
        options=options,
        address=address,
        log=lambda msg: say(f"evaluating {msg}", quiet or json_out),
        status=lambda m: say(m, quiet or json_out),
        callbacks=("log",),
    ).to_json()
    if out is not None:
        from ctsearch.storage import write_json

        write_json(out, res)
        say(f"result written to {out}", quiet or json_out)
    if json_out:
        emit_json(res)
        return
    from ctsearch.metrics import shared_patients_phrase

    emit_result(res["table"])
    say(
        f"{res['queries']} test queries ({res['liver_queries']} with liver) against {res['database']} train slices "
        f"({shared_patients_phrase(res.get('shared_patients'))}); "
        f"MAP@{k} as in the paper's eq. 5, values in percent, ± = sample std over runs"
        + (f"; RR over liver slices with {relax_masks} RELAX masks each" if relax_masks else "; RR skipped"),
        quiet,
    )
    if res["crossexam"]:
        c = res["crossexam"]
        emit_result("\n" + c["table"])
        say(
            f"cross-exam: {c['queries']} query slices in {c['exam_pairs']} ordered exam pairs of {c['patients']} test "
            f"patients with two or more exams ({c['single_exam_patients']} with one exam left out); "
            f"|Δz| = distance of the top-1 slice from the true anatomical position; run = {c['k']} slices",
            quiet,
        )
