"""``ctsearch report``: one self-contained HTML page of a demo folder or of the parts given by hand."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ctsearch.cli.common import JSON_OPT, QUIET_OPT, emit_json, handle_errors, location, say


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)


@handle_errors
def report_cmd(
    parts: List[str] = typer.Argument(
        ...,
        help="A demo folder, and/or run directories, an index directory, explain folders, "
        "a prepared dataset and an evaluation JSON (evaluate --out); each is recognised by what it holds. "
        "Local paths or URIs such as s3://bucket/runs/r0.",
    ),
    out: Optional[str] = typer.Option(
        None,
        "--out",
        "-o",
        help="HTML file to write, local or a URI (default: DEMO/report.html for one demo folder, else ./report.html).",
    ),
    title: str = typer.Option("ctsearch report", "--title", help="Page title."),
    json_out: bool = JSON_OPT,
    quiet: bool = QUIET_OPT,
) -> None:
    """Write one HTML page (no network, no scripts): Table-1 results, training curves, a query with its hits and RELAX maps, archive summary."""
    from ctsearch.report import collect_inputs, write_report

    out = location(out)
    parts = [_local_part(location(p)) for p in parts]
    inputs = collect_inputs(parts)
    if out is None:
        out = (
            parts[0] / "report.html"
            if len(parts) == 1 and parts[0].is_dir() and (parts[0] / "runs").is_dir()
            else Path("report.html")
        )
    summary = write_report(inputs, out, title)
    if json_out:
        emit_json(summary)
        return
    for note in summary["notes"]:
        say(f"left out: {note}", quiet)
    say(
        f"report: {out} ({', '.join(summary['sections']) or 'no sections'}; {summary['bytes'] / 1e6:.1f} MB)",
        quiet,
    )


def _local_part(part):
    """A report input as a local path: a URI's object or folder is copied from the store first
    (a run's checkpoints are left out: the report never reads them)."""
    from ctsearch import storage
    from ctsearch.errors import CTSearchInputError

    if not storage.is_remote(part):
        return part
    if storage.is_file(part):
        return storage.local_file(part)
    if not storage.is_dir(part):
        raise CTSearchInputError(part, "does not exist")
    # Its own cache folder, named as the part: the report labels runs by their folder's name.
    into = storage.cache_dir(f"{part}#report") / storage.name(part)
    return storage.fetch(part, exclude=("checkpoints", storage.Lease.FILE), into=into)
