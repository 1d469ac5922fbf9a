"""``ctsearch index``: embed an archive into an index directory (Ray Data + FAISS shards)."""

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
    say,
)
from ctsearch.errors import CTSearchInputError

# The library's choices (ctsearch.store.EMBEDDING_DTYPES, ctsearch.index.params.ANN_KINDS), spelled
# here so that --help and parsing import neither; tests/test_hostile_cli.py keeps them equal.
EMBEDDING_DTYPE_NAMES = ("float32", "float16")
ANN_KIND_NAMES = ("ivfpq", "hnsw")


def register(app: typer.Typer) -> None:
    app.command("index")(index_cmd)


@handle_errors
def index_cmd(
    source: str = typer.Argument(
        ...,
        help="Archive folder (NIfTI / DICOM, any layout), a manifest.parquet from `ctsearch prepare`, or one volume; "
        "or its URI (s3://bucket/archive/, s3://bucket/prepared/manifest.parquet).",
    ),
    model: str = typer.Option(
        ...,
        "--model",
        help="Run directory (or s3:// URI) of `ctsearch train` (model.json + encoder.safetensors).",
    ),
    out: str = typer.Option(
        ...,
        "--out",
        help="Index directory or s3:// URI; created, or extended when it already holds an index of the same model.",
    ),
    gpus: int = typer.Option(
        0, min=0, help="GPUs to embed on, one model per GPU (bf16, channels_last); 0: one model on the CPU."
    ),
    batch_size: Optional[int] = typer.Option(
        None,
        min=1,
        max=65536,
        help="Slices per model batch (default 64 on CPU, 256 per GPU: an H100/H200 needs big batches).",
    ),
    dtype: str = typer.Option(
        "float32",
        **choice(*EMBEDDING_DTYPE_NAMES),
        help="Stored embedding type: float32, or float16 to halve the files.",
    ),
    ann_threshold: int = typer.Option(
        200_000,
        min=1,
        help="Vectors from which a shard gets an ANN index instead of exact search (docs/scaling.md).",
    ),
    ann: str = typer.Option(
        "ivfpq",
        **choice(*ANN_KIND_NAMES),
        help="ANN kind at or above --ann-threshold: ivfpq (IVF-PQ + exact re-ranking) or hnsw.",
    ),
    shard_volumes: int = typer.Option(
        32, min=1, help="Volumes per shard, the unit committed at once (what a killed run can lose)."
    ),
    threads: Optional[int] = typer.Option(
        None, min=1, help="Torch threads of the CPU model (default: all cores)."
    ),
    address: Optional[str] = ADDRESS_OPT,
    id_salt_file: Optional[Path] = SALT_OPT,
    json_out: bool = JSON_OPT,
    quiet: bool = QUIET_OPT,
) -> None:
    """Embed every axial slice of SOURCE and add it to the index at --out.

    Volumes already in the index (same series id and content) are skipped; a killed run is
    finished by running the same command again. Failures go to OUT/errors.parquet.
    """
    check_faiss_wheels()
    from ctsearch import storage
    from ctsearch.ids import load_salt
    from ctsearch.storage import is_remote

    source = source if is_remote(source) else Path(source)  # a URI stays a string
    from ctsearch.index.params import check_ann

    # Before torch, Ray or the output folder: a bad combination leaves nothing behind.
    check_ann(ann_threshold, ann)
    id_salt = load_salt(id_salt_file)
    from ctsearch.jobs.index import IndexOptions, index_source
    from ctsearch.jobs.runtime import run_job

    bar = CallbackBar("indexing volumes", off=quiet or json_out)
    options = IndexOptions(
        gpus=gpus,
        batch_size=batch_size,
        dtype=dtype,
        ann_threshold=ann_threshold,
        ann=ann,
        shard_volumes=shard_volumes,
        threads=threads,
    )
    try:
        summary = run_job(
            index_source,
            source,
            model,
            out,
            options,
            address=address,
            on_volume=bar.update,
            id_salt=id_salt,
            status=lambda m: say(m, quiet or json_out),
            callbacks=("on_volume",),
        )
    finally:
        bar.close()
    failed = summary.volumes_failed + summary.scan_errors
    if failed and not (summary.volumes_indexed or summary.unchanged_skipped or summary.duplicates_skipped):
        # As prepare does: a batch job that could use none of its input failed, whatever it recorded.
        raise CTSearchInputError(
            source,
            f"no volume could be indexed ({summary.volumes_failed} failed, "
            f"{summary.scan_errors} unreadable files; see {storage.join(out, 'errors.parquet')})",
        )
    if json_out:
        emit_json(summary.to_json())
        return
    say(
        f"indexed {summary.volumes_indexed} volumes ({summary.rows_added} slices) into {out}; "
        f"skipped {summary.unchanged_skipped + summary.duplicates_skipped} already indexed; "
        f"{summary.volumes_failed} failed, {summary.scan_errors} unreadable files "
        f"(see {storage.join(out, 'errors.parquet')}); index now {summary.index_rows} slices in {summary.shards} shards",
        quiet,
    )
