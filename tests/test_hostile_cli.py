"""Hostile command lines: bad options are refused while parsing (nothing written, torch not
imported), and errors print what they are given on one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import error_line
from typer.testing import CliRunner

from ctsearch.cli.main import app

# Each: (arguments after `ctsearch index ARCHIVE --model RUN --out OUT`, exit code, text in the output).
BAD_INDEX_OPTIONS = [
    (["--ann", "lsh"], 2, "ivfpq"),
    (["--dtype", "float64"], 2, "float16"),
    (["--address", "not an address"], 2, "not a Ray address"),
    (["--address", "head:99999"], 2, "out of range"),
    (["--batch-size", "0"], 2, "--batch-size"),
    (["--shard-volumes", "-1"], 2, "--shard-volumes"),
    (["--ann-threshold", "100"], 1, "IVF-PQ"),  # IVF-PQ on too few vectors
]

_PROBE = """
import json, sys
from typer.testing import CliRunner
from ctsearch.cli.main import app
out = []
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(app, args)
    out.append([r.exit_code, r.output])
print(json.dumps({"results": out, "torch": "torch" in sys.modules, "ray": "ray" in sys.modules}))
"""


def test_bad_index_options_leave_nothing_behind_and_never_import_torch(tmp_path, model_dir):
    runs = [
        ["index", str(tmp_path), "--model", str(model_dir), "--out", str(tmp_path / f"out{i}"), *args]
        for i, (args, _, _) in enumerate(BAD_INDEX_OPTIONS)
    ]
    # A fresh interpreter: this test process has long imported torch.
    p = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(runs)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "300"},  # usage errors are boxed; no wrapping mid-message
    )
    assert p.returncode == 0, p.stderr
    probe = json.loads(p.stdout.strip().splitlines()[-1])
    for i, ((args, code, fragment), (exit_code, output)) in enumerate(
        zip(BAD_INDEX_OPTIONS, probe["results"])
    ):
        assert exit_code == code, (args, output)
        assert fragment in output and "Traceback" not in output, (args, output)
        assert not (tmp_path / f"out{i}").exists(), args  # no folder, index.json or lock
    assert not probe["torch"] and not probe["ray"]


def test_choices_are_listed_in_help_and_match_the_library():
    from ctsearch.cli.index import ANN_KIND_NAMES, EMBEDDING_DTYPE_NAMES
    from ctsearch.index.params import ANN_KINDS
    from ctsearch.store import EMBEDDING_DTYPES

    assert EMBEDDING_DTYPE_NAMES == tuple(EMBEDDING_DTYPES) and ANN_KIND_NAMES == ANN_KINDS
    r = CliRunner().invoke(app, ["index", "--help"], env={"COLUMNS": "200"})
    assert "float32|float16" in r.output and "ivfpq|hnsw" in r.output
    r = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert "clinical|standard" in r.output and "constant|cosine" in r.output


@pytest.mark.parametrize(
    "args", [["train", "d", "o", "--views", "wide"], ["explain", "i", "q", "--masks", "0"]]
)
def test_other_bad_choices_and_bounds_are_usage_errors(args, tmp_path):
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("name", ["scan[red]x[/red]", "new\nline", "esc\x1b[31mred", "tab\there"])
def test_hostile_file_names_are_printed_literally_on_one_line(tmp_path, name):
    missing = tmp_path / name / "idx"
    line = error_line(CliRunner().invoke(app, ["search", str(missing), "v:1"]))
    assert "\x1b" not in line and "\t" not in line
    shown = name.replace("\n", "\\n").replace("\x1b", "\\x1b").replace("\t", "\\t")
    assert shown in line, line
