"""``ctsearch synth``: write a synthetic liver CT archive (Decathlon NIfTI and/or DICOM)."""

from __future__ import annotations

import typer

from ctsearch.cli.common import JSON_OPT, QUIET_OPT, emit_json, handle_errors, location, progress, say


def register(app: typer.Typer) -> None:
    @app.command("synth")
    @handle_errors
    def synth_cmd(
        out: str = typer.Argument(
            ...,
            help="Output folder (local, or a URI such as s3://bucket/archive): OUT/nifti (Decathlon layout), OUT/dicom, OUT/synth.json.",
        ),
        volumes: int = typer.Option(
            8, "--volumes", "-n", help="Number of synthetic patients (each gets --exams volumes)."
        ),
        seed: int = typer.Option(0, "--seed", help="Seed: the same seed writes the same archive."),
        fmt: str = typer.Option("nifti", "--format", help="nifti | dicom | both."),
        size: int = typer.Option(
            512, "--size", help="Slice matrix in px (size x size); the field of view stays in mm."
        ),
        exams: int = typer.Option(
            1, "--exams", help="Examinations per patient; later exams are later in time, with grown lesions."
        ),
        overwrite: bool = typer.Option(
            False,
            "--overwrite",
            help="Replace an existing archive in OUT (only one synth wrote) instead of refusing.",
        ),
        json_out: bool = JSON_OPT,
        quiet: bool = QUIET_OPT,
    ) -> None:
        """Write a synthetic abdominal CT archive with liver (1) and tumour (2) labels."""
        from ctsearch.synth import synth_archive

        summary = synth_archive(
            location(out),
            volumes=volumes,
            seed=seed,
            size=size,
            fmt=fmt,
            exams=exams,
            overwrite=overwrite,
            progress=lambda items, total, desc: progress(items, total, desc, quiet or json_out),
        )
        if json_out:
            emit_json(summary.to_json())
            return
        where = ", ".join(str(d) for d in (summary.nifti_dir, summary.dicom_dir) if d)
        say(
            f"{summary.volumes} volumes ({summary.patients} patients x {exams} exams), {summary.slices} slices "
            f"of {size}x{size} px -> {where}",
            quiet,
        )
