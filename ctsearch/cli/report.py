"""``ctsearch report``: one self-contained HTML page of a demo folder or of the parts given by hand."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ctsearch.cli.common import JSON_OPT, QUIET_OPT, emit_json, handle_errors, say


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)


@handle_errors
def report_cmd(
    parts: List[Path] = typer.Argument(
        ...,
        help="A demo folder, and/or run directories, an index directory, explain folders, "
        "a prepared dataset and an evaluation JSON (evaluate --out); each is recognised by what it holds.",
    ),
    out: Optional[Path] = typer.Option(
        None,
        "--out",
        "-o",
        help="HTML file to write (default: DEMO/report.html for one demo folder, else ./report.html).",
    ),
    title: str = typer.Option("ctsearch report", "--title", help="Page title."),
    json_out: bool = JSON_OPT,
    quiet: bool = QUIET_OPT,
) -> None:
    """Write one HTML page (no network, no scripts): Table-1 results, training curves, a query with its hits and RELAX maps, archive summary."""
    from ctsearch.report import collect_inputs, write_report

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
