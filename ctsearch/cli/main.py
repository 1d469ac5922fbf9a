"""The ``ctsearch`` command line: one module per command group, each with ``register(app)``."""

from __future__ import annotations

import importlib
import logging
import os

import typer

app = typer.Typer(
    name="ctsearch",
    help="Content-based image retrieval for CT archives: synth, prepare, train, index, search, explain, evaluate, reproduce, report, serve, demo.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors.")) -> None:
    if debug:
        os.environ["CTSEARCH_DEBUG"] = "1"
    else:
        # nibabel logs what it "fixes" in a header (e.g. a zero voxel size set to 1 mm) on stderr;
        # ctsearch refuses such files with its own one-line error, so the log line is noise.
        logging.getLogger("nibabel").setLevel(logging.ERROR)


@app.command()
def version() -> None:
    """Print the ctsearch version."""
    from ctsearch import __version__

    typer.echo(__version__)


# In the order `ctsearch --help` lists them; each module imports its heavy dependencies lazily.
COMMAND_MODULES = [
    "synth",
    "prepare",
    "train",
    "index",
    "verify",
    "search",
    "explain",
    "evaluate",
    "reproduce",
    "report",
    "serve",
    "demo",
]

for _name in COMMAND_MODULES:
    importlib.import_module(f"ctsearch.cli.{_name}").register(app)
