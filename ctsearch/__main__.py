"""``python -m ctsearch`` is the ``ctsearch`` command."""

from ctsearch.cli.main import app

app(prog_name="ctsearch")
