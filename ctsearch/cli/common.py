"""What every command shares: one-line errors, progress, JSON output."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ctsearch.errors import CTSearchInputError, causes, environment_error, input_error, printable

err_console = Console(stderr=True)
T = TypeVar("T")
# Where a command's result goes. While a command runs, ``sys.stdout`` points at stderr, because
# Ray prints raylet warnings (e.g. "N worker processes have been started") from its own threads
# to whatever ``sys.stdout`` is, and those lines would corrupt ``--json`` output.
_result_stream: Any = None

JSON_OPT = typer.Option(False, "--json", help="Print a machine-readable JSON result on stdout.")
QUIET_OPT = typer.Option(False, "--quiet", "-q", help="No progress bars or chatter.")


def _check_address(value: str | None) -> str | None:
    """A malformed --address is a usage error while parsing: before Ray, torch or any output folder."""
    if value and value.strip() not in ("local", "auto"):
        from ctsearch.jobs.address import parse_address

        try:
            parse_address(value)
        except CTSearchInputError as e:
            raise typer.BadParameter(e.problem) from None
    return value


ADDRESS_OPT = typer.Option(
    None,
    "--address",
    callback=_check_address,
    help="Ray cluster address, HOST:PORT or ray://HOST:PORT (default: $RAY_ADDRESS, else start Ray in this process).",
)
# A file, never the salt itself: a command line ends up in shell history (ctsearch.ids).
SALT_OPT = typer.Option(
    None,
    "--id-salt-file",
    envvar="CTSEARCH_ID_SALT_FILE",
    show_envvar=False,
    help="Hash patient, study and series ids with the secret salt in this file (default: $CTSEARCH_ID_SALT_FILE).",
)


def choice(*names: str) -> dict[str, Any]:
    """``typer.Option`` keywords for an option with these allowed values: checked while parsing
    (a usage error, exit 2, before anything is imported or written) and listed in ``--help``.

    Example: ``typer.Option("float32", **choice("float32", "float16"), help=...)``.
    """

    def check(value: str | None) -> str | None:
        if value is not None and value not in names:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(names)}")
        return value

    return {"metavar": f"[{'|'.join(names)}]", "callback": check}


def check_faiss_wheels(distribution_names: list[str] | None = None) -> None:
    """Refuse to run with faiss-cpu and a faiss-gpu wheel installed together (the commands that use FAISS call it first).

    Both ship the same ``faiss`` module, so the second install silently overwrites files of the
    first and the result breaks in odd places. ctsearch depends on faiss-cpu only (docs/scaling.md).
    """
    if distribution_names is None:
        from importlib import metadata

        distribution_names = [d.metadata["Name"] or "" for d in metadata.distributions()]
    names = {n.lower().replace("_", "-") for n in distribution_names}
    gpu = sorted(n for n in names if n.startswith("faiss-gpu"))
    if gpu and "faiss-cpu" in names:
        raise ImportError(
            f"faiss-cpu and {', '.join(gpu)} are both installed; they ship the same `faiss` module and break "
            f"each other. ctsearch needs faiss-cpu only: pip uninstall -y {' '.join(gpu)} faiss-cpu && pip install faiss-cpu"
        )


def location(value: str | None):
    """A path argument as the commands take it: a URI (``s3://bucket/key``, see ctsearch.storage)
    stays a str, anything else is a ``Path`` exactly as before. Typer's ``Path`` type would fold a
    URI's ``//``, so the arguments that accept URIs are declared ``str`` and pass through here."""
    if value is None:
        return None
    from ctsearch.storage import is_remote

    return value if is_remote(value) else Path(value)


def debug_enabled() -> bool:
    return os.environ.get("CTSEARCH_DEBUG", "") not in ("", "0")


def handle_errors(fn: Callable) -> Callable:
    """Turn user errors into one line on stderr and exit code 1 (traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _result_stream
        outer, _result_stream = _result_stream, sys.stdout
        try:
            with contextlib.redirect_stdout(sys.stderr):
                return fn(*args, **kwargs)
        except CTSearchInputError as e:
            if debug_enabled():
                raise
            # escape: a path or option holding "[...]" is printed as given, not read as rich markup.
            user = input_error(e) or e  # from a Ray task: the error, not Ray's traceback text
            err_console.print(f"[red]error:[/red] {escape(str(user))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as e:
            if debug_enabled():
                raise
            # A full disk or read-only folder, or bad input met inside a Ray worker: the user's to fix.
            user = environment_error(e) or input_error(e)
            if user is not None:
                err_console.print(f"[red]error:[/red] {escape(str(user))}", highlight=False, soft_wrap=True)
                raise typer.Exit(1) from None
            # A node, actor or object lost on a cluster is not a bug of ours: say it in one line.
            # Every job resumes, so the advice is the same for all of them.
            if not _is_ray_failure(e):
                raise
            first = " ".join(str(e).split())[:300] or type(e).__name__
            err_console.print(
                f"[red]error:[/red] the Ray job failed ({type(e).__name__}: {escape(first)}); "
                "running the same command again finishes the work",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None
        finally:
            _result_stream = outer

    return wrapper


def _is_ray_failure(e: BaseException) -> bool:
    """A Ray system error (node or actor died, object lost, cluster unreachable), found without importing Ray."""
    names = {
        "RaySystemError",
        "NodeDiedError",
        "ActorDiedError",
        "ActorUnavailableError",
        "ObjectLostError",
        "OwnerDiedError",
        "WorkerCrashedError",
        "RayActorError",
        "GetTimeoutError",
        "ObjectFetchTimedOutError",
        "ObjectReconstructionFailedError",
        "TrainingFailedError",
        "ControllerError",
        "WorkerGroupError",
    }
    return any(type(x).__module__.startswith("ray.") and type(x).__name__ in names for x in causes(e))


def progress(items: Iterable[T], total: int | None, description: str, quiet: bool = False) -> Iterable[T]:
    """Iterate ``items`` with a progress bar on stderr (nothing when quiet or not a terminal)."""
    bar = CallbackBar(description, off=quiet)
    try:
        bar.update(0, total)
        for done, item in enumerate(items, 1):
            yield item
            bar.update(done, total)
    finally:
        bar.close()


class CallbackBar:
    """A progress bar on stderr driven by a job's ``on_...(done, total)`` callback (``update``).

    On a terminal it is a bar. When stderr is a log file (nohup, SLURM, Kubernetes) a bar would
    be invisible or thousands of redraws, so it prints a line instead, at most every
    ``$CTSEARCH_PROGRESS_SECONDS`` (default 30) seconds and once at the end:
    ``indexing volumes: 12/40 (30%), 0.52/s, ETA 54 s``. Nothing when ``off``; call ``close`` at the end.
    """

    def __init__(self, description: str, off: bool = False, clock: Callable[[], float] = time.monotonic):
        self.bar = self.task = None
        self.description, self.clock, self.lines = description, clock, not off and not sys.stderr.isatty()
        self.every = float(os.environ.get("CTSEARCH_PROGRESS_SECONDS", "30") or 30)
        self.start = self.last = clock()
        self.state: tuple[int, int] | None = None  # (done, total) last seen
        self.printed: tuple[int, int] | None = None  # (done, total) of the last line printed
        self.first: int | None = None  # done at the first update: a resumed job starts above 0
        if off or not sys.stderr.isatty():
            return
        cols = [TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
        self.bar = Progress(*cols, console=err_console, transient=True)

    def update(self, done: int, total: int) -> None:
        if self.lines:
            self._log(done, total)
        if self.bar is None:
            return
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task("", total=total)
        self.bar.update(self.task, completed=done)

    def _log(self, done: int, total: int, final: bool = False) -> None:
        now = self.clock()
        if self.first is None:
            self.first, self.start, self.last = done, now, now
        self.state = (done, total)
        if not final and now - self.last < self.every:
            return
        self.last, self.printed = now, self.state
        rate = (done - self.first) / max(now - self.start, 1e-9)
        line = f"{self.description}: {done}/{total}" + (f" ({100 * done / total:.0f}%)" if total else "")
        if done > self.first:
            line += f", {rate:.3g}/s"
            if total and done < total:
                line += f", ETA {_duration((total - done) / rate)}"
        say(line)

    def close(self) -> None:
        if self.lines and self.state is not None and self.state != self.printed:
            self._log(*self.state, final=True)
        if self.bar is not None and self.task is not None:
            self.bar.stop()


def _duration(seconds: float) -> str:
    """``54 s``, ``12 min``, ``3.5 h``: an ETA as a person reads it."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def say(message: str, quiet: bool = False) -> None:
    """Human chatter goes to stderr so stdout stays clean for --json.

    Printed as given (no rich markup): messages hold user paths, and ``[...]`` in a path is text.
    """
    if not quiet:
        err_console.print(printable(message), markup=False, highlight=False, soft_wrap=True)


def result_stream() -> Any:
    """The stream a command's result is written to: stdout, never shared with Ray's log lines."""
    return _result_stream or sys.stdout


def emit_result(text: str) -> None:
    out = result_stream()
    out.write(text if text.endswith("\n") else text + "\n")
    out.flush()


def emit_json(obj: Any) -> None:
    emit_result(json.dumps(obj, indent=2, default=str))
