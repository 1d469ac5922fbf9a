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


def test_user_error_raised_in_a_ray_train_worker_is_the_one_line_error():
    """A worker's CTSearchInputError crosses Ray (pickled: path and problem kept) and Ray Train
    wraps it; the command still prints it as the user's one line, not as a failed Ray job."""
    import pickle

    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from ctsearch.io.dicom import NotAxialCTSeries

    for e in (
        CTSearchInputError("s3://b/run", "cannot open this storage location"),
        NotAxialCTSeries("a", "b"),
    ):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and (back.path, back.problem, str(back)) == (e.path, e.problem, str(e))

    inner = CTSearchInputError("s3://b/run", "cannot open this storage location")
    failure = WorkerGroupError("[Rank 0]: ...", {0: UserExceptionWithTraceback(inner, "Traceback ...")})

    def command() -> None:
        raise pickle.loads(pickle.dumps(failure))

    r = CliRunner().invoke(_app(command), ["run"])
    assert error_line(r) == "error: s3://b/run: cannot open this storage location"


def test_a_full_disk_in_a_train_worker_and_a_looping_chain_of_causes():
    """A Train worker's full disk is the user's one line too; a chain of causes that loops (an
    exception that is its own context's context) ends instead of hanging the error handler."""
    import errno

    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from ctsearch.errors import causes

    full = OSError(errno.ENOSPC, "No space left on device", "/runs/r1/checkpoint")
    failure = WorkerGroupError("[Rank 1]: ...", {1: UserExceptionWithTraceback(full, "Traceback ...")})

    def command() -> None:
        raise failure

    r = CliRunner().invoke(_app(command), ["run"])
    assert error_line(r).startswith("error: /runs/r1/checkpoint: No space left on device; free some space")

    a, b = RuntimeError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    assert [type(x).__name__ for x in causes(a)] == ["RuntimeError", "ValueError"]

    def looping() -> None:
        raise a

    r = CliRunner().invoke(_app(looping), ["run"])
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)  # a bug of ours: not hidden


def test_progress_in_a_log_file_is_a_line_every_n_seconds(monkeypatch, capsys):
    from ctsearch.cli.common import CallbackBar

    monkeypatch.setenv("CTSEARCH_PROGRESS_SECONDS", "10")
    now = [0.0]
    bar = CallbackBar("indexing volumes", clock=lambda: now[0])  # stderr is captured: not a terminal
    for t, done in [(0, 12), (5, 14), (20, 22), (21, 40)]:  # a resumed job: 12 were done before
        now[0] = t
        bar.update(done, 40)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "indexing volumes: 22/40 (55%), 0.5/s, ETA 36 s",  # the first line 10 s after the start
        "indexing volumes: 40/40 (100%), 1.33/s",  # and the end, whenever it comes
    ]
    quiet = CallbackBar("x", off=True, clock=lambda: now[0])
    quiet.update(1, 2)
    quiet.close()
    assert capsys.readouterr().err == ""


def test_ray_start_up_says_what_it_is_doing(monkeypatch):
    from ctsearch.jobs import runtime

    started = []
    monkeypatch.setattr(runtime.ray, "is_initialized", lambda: bool(started))
    monkeypatch.setattr(runtime.ray, "init", lambda **kw: started.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    heard: list[str] = []
    assert (
        runtime.run_job(lambda address: runtime.start_ray(address) or "done", status=heard.append) == "done"
    )
    assert heard == ["starting Ray on this machine (127.0.0.1 only) ..."] and started
    runtime.start_ray(None)  # outside run_job, and already started: silent
    assert len(heard) == 1
