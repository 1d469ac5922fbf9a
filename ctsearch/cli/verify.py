"""``ctsearch verify``: check every file of an index directory against its index.json."""

from __future__ import annotations

import typer

from ctsearch.cli.common import JSON_OPT, check_faiss_wheels, emit_json, emit_result, handle_errors
from ctsearch.errors import CTSearchInputError, printable


def register(app: typer.Typer) -> None:
    app.command("verify")(verify_cmd)


@handle_errors
def verify_cmd(
    index_dir: str = typer.Argument(..., help="Index directory (or s3:// URI) written by `ctsearch index`."),
    json_out: bool = JSON_OPT,
) -> None:
    """Read every file of INDEX_DIR once and check it against index.json (read-only).

    Prints one line per missing, unreadable or mismatching file (rows, vector dimension,
    encoder sha256) and exits 1 when there is any; exit 0 means every file matches.

    Example: ctsearch verify /data/index
    """
    check_faiss_wheels()
    from ctsearch.index.verify import verify_index

    problems = verify_index(index_dir)
    if json_out:
        emit_json(
            {
                "index": str(index_dir),
                "ok": not problems,
                "problems": [{"file": f, "problem": p} for f, p in problems],
            }
        )
    else:
        for f, p in problems:
            emit_result(f"damaged: {printable(f)}: {printable(p)}")
    if problems:
        raise CTSearchInputError(index_dir, f"{len(problems)} damaged or missing files (listed above)")
    if not json_out:
        emit_result(f"ok: {index_dir}: every file matches index.json")
