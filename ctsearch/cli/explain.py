"""``ctsearch explain``: RELAX maps and overlays for a query and its top-k, or for a whole slice dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ctsearch.cli.common import (
    ADDRESS_OPT,
    JSON_OPT,
    QUIET_OPT,
    SALT_OPT,
    CallbackBar,
    check_faiss_wheels,
    choice,
    emit_json,
    handle_errors,
    location,
    say,
)
from ctsearch.errors import CTSearchInputError
from ctsearch.explain import RELAX_BATCH

MAX_MASKS = 1_000_000  # RELAX converges long before; a larger count is a typo that would run for days


def register(app: typer.Typer) -> None:
    app.command("explain")(explain_cmd)


@handle_errors
def explain_cmd(
    target: str = typer.Argument(
        ...,
        help="An index directory (with QUERY), or a slice dataset directory (with --model); local or a URI such as s3://bucket/prepared.",
    ),
    query: Optional[str] = typer.Argument(
        None, help="Index mode: a NIfTI file / DICOM series folder, or a row volume_id:slice_index."
    ),
    model: Optional[str] = typer.Option(
        None, "--model", help="Dataset mode: the run directory (or run URI) whose encoder is explained."
    ),
    split: str = typer.Option(
        "test",
        "--split",
        **choice("train", "test"),
        help="Dataset mode: which split to explain (train or test).",
    ),
    slice_: Optional[int] = typer.Option(
        None, "--slice", help="Index mode: slice of a file/folder QUERY (default: the middle slice)."
    ),
    k: int = typer.Option(
        5, "-k", "--k", min=1, help="Index mode: retrieved slices to explain with the query."
    ),
    patient: Optional[str] = typer.Option(
        None, "--patient", help="Index mode: only retrieve slices of this patient id."
    ),
    exclude_patient: Optional[str] = typer.Option(
        None,
        "--exclude-patient",
        help="Index mode: never retrieve slices of this patient id (e.g. the query's own).",
    ),
    out: Optional[str] = typer.Option(
        None,
        "--out",
        help="Output folder, local or a URI (default: RUN_DIR/explanations/SPLIT, or ./explain-<query>).",
    ),
    masks: int = typer.Option(
        3000, "--masks", min=1, max=MAX_MASKS, help="RELAX masks per slice (3000 in the paper)."
    ),
    batch_size: Optional[int] = typer.Option(
        None,
        "--batch-size",
        min=1,
        max=65536,
        help=f"Masked images per forward pass (default {RELAX_BATCH['cpu']} on CPU, {RELAX_BATCH['cuda']} on GPU).",
    ),
    slices_per_call: int = typer.Option(
        4, "--slices-per-call", help="Dataset mode: slices explained together by one actor call."
    ),
    tolerance: Optional[float] = typer.Option(
        None,
        "--tolerance",
        help="Stop adding masks once the maps change by less than this fraction of their range per 300 masks.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the random masks."),
    precision: str = typer.Option(
        "auto",
        "--precision",
        help="Encoder arithmetic: auto (bf16 on GPU, float32 on CPU) | float32 | bf16 (CPU: ~2x faster where supported).",
    ),
    gpus: int = typer.Option(0, "--gpus", help="Dataset mode: GPUs to use (one actor each); 0 = CPU actors."),
    workers: int = typer.Option(1, "--workers", help="Dataset mode without GPUs: CPU actors."),
    no_png: bool = typer.Option(False, "--no-png", help="Do not write PNG overlays."),
    address: Optional[str] = ADDRESS_OPT,
    id_salt_file: Optional[Path] = SALT_OPT,
    json_out: bool = JSON_OPT,
    quiet: bool = QUIET_OPT,
) -> None:
    """Explain representations with RELAX: importance + uncertainty maps, PNG overlays, RR where liver masks exist."""
    from ctsearch import storage
    from ctsearch.explain import ExplainOptions

    target, model, out = location(target), location(model), location(out)
    opts = ExplainOptions(
        num_masks=masks,
        batch_size=batch_size,
        seed=seed,
        tolerance=tolerance,
        precision=precision,
        slices_per_call=slices_per_call,
        render_png=not no_png,
    )
    opts.check()
    if model is not None:
        if query is not None:
            raise CTSearchInputError(
                query, "dataset mode (--model) takes no QUERY; to explain a query, give an index directory"
            )
        from ctsearch.jobs.explain import explain_dataset
        from ctsearch.jobs.runtime import run_job

        storage.dataset_split(
            target, split
        )  # a wrong folder or split is reported before anything is announced
        storage.require_bucket(out or model)
        if out is None:
            out = (
                storage.join(model, "explanations", split)
                if storage.is_remote(model)
                else model / "explanations" / split
            )
        say(
            f"explaining {target}/{split}.parquet with {model} ({masks} masks per slice) -> {out}",
            quiet or json_out,
        )
        bar = CallbackBar("explaining slices", off=quiet or json_out)
        try:
            summary = run_job(
                explain_dataset,
                target,
                model,
                out,
                split=split,
                options=opts,
                gpus=gpus,
                workers=workers,
                address=address,
                on_slice=bar.update,
                status=lambda m: say(m, quiet or json_out),
                callbacks=("on_slice",),
            )
        finally:
            bar.close()
        if summary["resumed_with"]:
            say(
                f"resumed: {summary['resumed_with']} slices were already explained in {out}",
                quiet or json_out,
            )
        if json_out:
            emit_json({**summary, "out": str(out)})
            return
        rr = (
            f"{summary['rr_mean']:.4f} over {summary['rr_slices']} liver slices"
            if summary["rr_mean"] is not None
            else "n/a (no liver masks)"
        )
        say(f"{summary['slices']} slices explained, {summary['errors']} errors; mean RR {rr}", quiet)
        say(
            f"maps: {out}/explanations.parquet, overlays: {out}/overlays/, errors: {out}/errors.parquet",
            quiet,
        )
        return
    if query is None:
        raise CTSearchInputError(target, "give a QUERY (index mode) or --model RUN_DIR (dataset mode)")
    check_faiss_wheels()
    from ctsearch.explain import explain_query
    from ctsearch.ids import load_salt

    summary = explain_query(
        target,
        query,
        slice_,
        k,
        out,
        opts,
        patient=patient,
        exclude_patient=exclude_patient,
        id_salt=load_salt(id_salt_file),
    )
    if json_out:
        emit_json(summary)
        return
    say(
        f"query {summary['query']['volume_id']}:{summary['query']['slice_index']} and {len(summary['hits'])} hits explained",
        quiet,
    )
    say(f"figure: {summary['figure']}, maps: {summary['maps']}", quiet)
