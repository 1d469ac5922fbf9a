"""What every command shares: the result on stdout stays clean whatever else prints."""

from __future__ import annotations

import json
import sys
import threading

import typer
from conftest import error_line
from typer.testing import CliRunner

from ctsearch.cli.common import emit_json, handle_errors
from ctsearch.errors import CTSearchInputError


def _app(command) -> typer.Typer:
    app = typer.Typer()
    app.command("run")(handle_errors(command))
    app.command("other")(lambda: None)  # two commands, so "run" is a subcommand as in ctsearch
    return app


def test_background_prints_go_to_stderr_and_json_stays_parseable():
    # Ray's log threads print raylet warnings to whatever sys.stdout is at that moment (CI broke on
    # "(raylet) WARNING: 8 PYTHON worker processes have been started" ahead of --json output).
    def command() -> None:
        t = threading.Thread(
            target=lambda: print("(raylet) WARNING: worker processes started", file=sys.stdout)
        )
        t.start()
        t.join()
        emit_json({"ok": True})

    r = CliRunner().invoke(_app(command), ["run"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"ok": True}
    assert "(raylet) WARNING" in r.stderr


def test_user_error_is_one_line_on_stderr_and_stdout_is_restored():
    def command() -> None:
        raise CTSearchInputError("/data/x.nii.gz", "is not a NIfTI file")

    before = sys.stdout
    r = CliRunner().invoke(_app(command), ["run"])
    assert r.stdout == "" and error_line(r) == "error: /data/x.nii.gz: is not a NIfTI file"
    assert sys.stdout is before
