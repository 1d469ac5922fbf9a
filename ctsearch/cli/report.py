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
    from ctsearch.storage import require_bucket

    out = location(out)
    if out is not None:
        require_bucket(out)
    given = [location(p) for p in parts]
    parts = [_local_part(p) for p in given]
    aliases = {str(local): str(p) for local, p in zip(parts, given) if str(local) != str(p)}
    inputs = collect_inputs(parts)
    if out is None:
        out = (
            parts[0] / "report.html"
            if len(parts) == 1 and parts[0].is_dir() and (parts[0] / "runs").is_dir()
            else Path("report.html")
        )
        if out != Path("report.html") and str(given[0]) != str(parts[0]):  # a demo folder in a store
            from ctsearch.storage import join

            out = join(given[0], "report.html")
    summary = write_report(inputs, out, title, aliases=aliases)
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
    storage.require_bucket(part)
    if storage.is_file(part):
        return storage.local_file(part)
    if not storage.is_dir(part):
        raise CTSearchInputError(part, "does not exist")
    # Its own cache folder, named as the part: the report labels runs by their folder's name.
    cache = storage.cache_dir(part)
    into = cache.with_name(f"{cache.name}-report") / storage.name(part)
    return storage.cached_copy(part, exclude=("checkpoints", storage.Lease.FILE), into=into)
