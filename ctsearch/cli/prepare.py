"""``ctsearch prepare``: archive -> manifest (+ the paper's slice protocol)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ctsearch.cli.common import (
    JSON_OPT,
    QUIET_OPT,
    SALT_OPT,
    emit_json,
    handle_errors,
    location,
    progress,
    say,
)
from ctsearch.errors import CTSearchInputError


def register(app: typer.Typer) -> None:
    @app.command("prepare")
    @handle_errors
    def prepare_cmd(
        archive: str = typer.Argument(
            ...,
            help="Archive folder: Decathlon layout, NIfTI files, or a DICOM tree of any depth; "
            "or its URI (s3://bucket/archive).",
        ),
        out: str = typer.Argument(
            ...,
            help="Output folder for manifest.parquet, errors.parquet (and train/test.parquet): local, or a URI such as s3://bucket/prepared.",
        ),
        protocol: str = typer.Option(
            None,
            "--protocol",
            help="Also cut a slice dataset: 'decathlon' (the paper's 5 liver + 5 non-liver slices per volume).",
        ),
        per_volume: int = typer.Option(
            5, "--per-volume", help="Slices per volume of each kind (with and without liver)."
        ),
        train_volumes: int = typer.Option(
            100,
            "--train-volumes",
            help="Train split: the volumes of the first patients by case number until it holds N volumes "
            "(a patient is never on both sides); the rest is test. Both splits must be non-empty.",
        ),
        seed: int = typer.Option(0, "--seed", help="Seed of the slice choice."),
        train_all_slices: bool = typer.Option(
            False,
            "--train-all-slices",
            help="Also write train_all.parquet: every slice of the train volumes (unlabelled training for `ctsearch train --train-slices all`).",
        ),
        id_salt_file: Optional[Path] = SALT_OPT,
        json_out: bool = JSON_OPT,
        quiet: bool = QUIET_OPT,
    ) -> None:
        """Scan ARCHIVE into OUT/manifest.parquet (one row per volume) and OUT/errors.parquet."""
        from ctsearch.ids import load_salt
        from ctsearch.prepare import prepare
        from ctsearch.storage import is_remote

        archive = archive if is_remote(archive) else Path(archive)  # a URI stays a string

        out = location(out)
        summary = prepare(
            archive,
            out,
            protocol=protocol,
            per_volume=per_volume,
            train_volumes=train_volumes,
            seed=seed,
            all_train_slices=train_all_slices,
            progress=lambda items, total, desc: progress(items, total, desc, quiet or json_out),
            id_salt=load_salt(id_salt_file),
        )
        if summary["volumes"] == 0:
            raise CTSearchInputError(
                archive, f"no readable volumes ({summary['errors']} errors, listed in {out}/errors.parquet)"
            )
        if json_out:
            emit_json(summary)
            return
        say(
            f"{summary['volumes']} volumes, {summary['errors']} errors -> {out}/manifest.parquet, errors.parquet",
            quiet,
        )
        if protocol:
            say(
                f"{protocol}: train {summary['train_volumes']} volumes / {summary['train_slices']} slices, "
                f"test {summary['test_volumes']} volumes / {summary['test_slices']} slices"
                + (
                    f", all train slices {summary['train_all_slices']} -> train_all.parquet"
                    if train_all_slices
                    else ""
                ),
                quiet,
            )
            if summary["short_volumes"]:
                say(
                    f"warning: {len(summary['short_volumes'])} volumes had too few slices of one kind (see protocol.json)",
                    quiet,
                )
