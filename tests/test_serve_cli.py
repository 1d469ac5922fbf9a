"""`ctsearch serve` as a user runs it: refused settings (before Ray starts), and a real process on
the session's Ray cluster that answers on 127.0.0.1 and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import error_line
from typer.testing import CliRunner

from ctsearch.cli.main import app


def test_refuses_a_non_loopback_host_without_a_token(serve_index):
    # Nothing is bound: the rule is checked before Ray or a socket is touched.
    line = error_line(CliRunner().invoke(app, ["serve", str(serve_index), "--host", "0.0.0.0"]))
    assert "--token-file" in line and "0.0.0.0" in line


def test_refuses_bad_token_files_and_options(serve_index, tmp_path):
    short = tmp_path / "short"
    short.write_text("abc\n")
    assert "at least 16" in error_line(
        CliRunner().invoke(app, ["serve", str(serve_index), "--token-file", str(short)])
    )
    assert "token file" in error_line(
        CliRunner().invoke(app, ["serve", str(serve_index), "--token-file", str(tmp_path / "none")])
    )
    assert "--max-replicas" in error_line(
        CliRunner().invoke(app, ["serve", str(serve_index), "--replicas", "3", "--max-replicas", "2"])
    )
    assert "not an index directory" in error_line(CliRunner().invoke(app, ["serve", str(tmp_path)]))


def test_options_scale_fixed_or_autoscaled():
    from ctsearch.serve.deploy import ServeOptions

    assert ServeOptions("i", replicas=2).scaling()["num_replicas"] == 2
    auto = ServeOptions("i", replicas=1, max_replicas=4).scaling()["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"]) == (1, 4)


def test_serve_process_answers_and_stops_on_sigterm(serve_index, ray_session, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ctsearch",
            "serve",
            str(serve_index),
            "--port",
            str(port),
            "--address",
            address,
            "--cpus-per-replica",
            "0.5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if "ctsearch serve: http://127.0.0.1" in line or (not line and proc.poll() is not None):
                break
        assert proc.poll() is None, proc.stderr.read()
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/health", timeout=60
        ) as r:  # no token on loopback
            assert json.loads(r.read()) == {"status": "ok"}
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "stopped" in err and "Traceback" not in err
        with pytest.raises(OSError):  # the port is free again: nothing listens
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_service_modules_import_without_ray():
    """Only ctsearch.serve.deploy needs Ray: the API, service and shard groups run without it."""
    modules = [
        "ctsearch.serve",
        "ctsearch.serve.shards",
        "ctsearch.serve.sources",
        "ctsearch.serve.service",
        "ctsearch.serve.api",
        "ctsearch.cli.serve",
    ]
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
