"""The same commands on a real multi-node Ray cluster, and on one whose nodes fail.

A head node and worker nodes run as separate processes on 127.0.0.1 (tests/local_cluster.py).
The commands run as separate processes too, the three ways a user reaches a cluster:
``--address HOST:PORT`` (a driver on a cluster node), ``--address ray://HOST:PORT`` (Ray Client)
and ``ray job submit -- ctsearch ...`` (what a KubeRay RayJob does). Node ids that the jobs record
(per training epoch, per volume read, per slice embedded or explained) show where work ran.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from local_cluster import CLUSTER_ENV

pytestmark = pytest.mark.cluster

LAUNCHER = Path(__file__).with_name("local_cluster.py")
RAY = Path(sys.executable).with_name("ray")
TINY = [
    "--backbone",
    "tiny",
    "--image-size",
    "64",
    "--init",
    "random",
    "--batch-size",
    "8",
    "--eval-every",
    "0",
]


class LocalCluster:
    def __init__(self, info: dict):
        self.info = info
        self.gcs, self.client, self.dashboard = info["gcs"], info["client"], info["dashboard"]
        self.worker_ids = {w["node_id"] for w in info["workers"]}

    def env(self) -> dict:
        env = {**os.environ, **CLUSTER_ENV, "RAY_AUTH_TOKEN": self.info["token"]}
        env.pop("RAY_ADDRESS", None)
        return env

    def ctsearch(self, *args, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ctsearch", *map(str, args)], env=self.env(),
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip

    def start(self, *args) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "ctsearch", *map(str, args)], env=self.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def submit(self, *args, timeout: float = 600) -> subprocess.CompletedProcess:
        """``ray job submit`` of one ctsearch command; its output is the job's log."""
        cmd = [
            str(RAY),
            "job",
            "submit",
            "--address",
            self.dashboard,
            "--",
            sys.executable,
            "-m",
            "ctsearch",
            *map(str, args),
        ]
        return subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout)

    def kill_node(self, node_id: str) -> None:
        """SIGKILL a worker node's raylet: the node, and the workers it started, are gone."""
        node = next(w for w in self.info["workers"] if w["node_id"] == node_id)
        os.kill(node["pids"]["raylet"][0], signal.SIGKILL)

    def kill_head(self, only: str | None = None) -> None:
        """SIGKILL the head node's processes (``only``: just that one, e.g. "gcs_server")."""
        for name, pids in self.info["head"]["pids"].items():
            if only and name != only:
                continue
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def local_cluster(folder: Path, workers: int = 2):
    info_path = folder / "cluster.json"
    log = open(folder / "cluster.log", "w")
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, str(LAUNCHER), str(info_path), "--workers", str(workers)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not info_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"local cluster did not start: {(folder / 'cluster.log').read_text()[-2000:]}"
                )
            time.sleep(0.5)
        yield LocalCluster(json.loads(info_path.read_text()))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (no CPUs) + two worker nodes of 2 CPUs each, shared by the tests of the three ways."""
    with local_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


def ok_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout)


def job_json(result: subprocess.CompletedProcess) -> dict:
    """The JSON a ctsearch command printed inside a ``ray job submit`` log."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = result.stdout
    start = text.index("\n{") + 1
    depth = 0
    for end, ch in enumerate(text[start:], start):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return json.loads(text[start : end + 1])
    raise AssertionError(f"no JSON in the job log: {text[-2000:]}")


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def row_set(index_dir: Path) -> list[tuple[str, int]]:
    """Every (volume_id, slice_index) of the committed shards, duplicates kept (sorted)."""
    manifest = json.loads((index_dir / "index.json").read_text())
    rows = []
    for s in manifest["shards"]:
        t = pq.read_table(
            index_dir / "embeddings" / f"{s['name']}.parquet", columns=["volume_id", "slice_index"]
        )
        rows += zip(t.column("volume_id").to_pylist(), t.column("slice_index").to_pylist())
    return sorted(rows)


def vectors(index_dir: Path) -> dict:
    from ctsearch.index import table_vectors

    out = {}
    for f in (index_dir / "embeddings").glob("*.parquet"):
        t = pq.read_table(f)
        keys = zip(t.column("volume_id").to_pylist(), t.column("slice_index").to_pylist())
        out.update(zip(keys, table_vectors(t)))
    return out


@pytest.fixture(scope="module")
def client_index(cluster, synth_archive, model_dir, tmp_path_factory):
    """``ctsearch index --address ray://...`` of the synthetic archive: the reference index."""
    out = tmp_path_factory.mktemp("client") / "index"
    summary = ok_json(cluster.ctsearch("index", synth_archive / "nifti", "--model", model_dir, "--out", out,
                                       "--shard-volumes", "2", "--address", cluster.client, "--json"))  # fmt: skip
    return out, summary


# ------------------------------------------------------------------------------------ three ways in


def test_train_with_two_workers_on_two_nodes_through_address(cluster, slice_dataset, tmp_path):
    run = tmp_path / "run"
    summary = ok_json(cluster.ctsearch("train", slice_dataset, run, *TINY, "--epochs", "2", "--workers", "2",
                                       "--placement", "spread", "--address", cluster.gcs, "--json"))  # fmt: skip
    assert summary["epochs"] == 2
    rows = [r for r in metrics(run) if "loss" in r]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:  # rank 0 and rank 1 on two different worker nodes, every epoch
        assert len(set(r["nodes"])) == 2 and set(r["nodes"]) <= cluster.worker_ids, r["nodes"]
    assert (run / "encoder.safetensors").is_file()


def test_index_through_ray_client_runs_on_the_cluster(client_index, cluster, synth_archive):
    out, summary = client_index
    assert summary["volumes_indexed"] == 8 and summary["volumes_failed"] == 0
    assert summary["rows_added"] == summary["index_rows"] == len(row_set(out))
    used = set(summary["nodes"]["read"]) | set(summary["nodes"]["embed"])
    assert used <= cluster.worker_ids and len(used) >= 2, summary["nodes"]
    assert sum(summary["nodes"]["read"].values()) == 8
    assert sum(summary["nodes"]["embed"].values()) == summary["rows_added"]


def test_index_through_job_submission_equals_the_ray_client_index(
    client_index, cluster, synth_archive, model_dir, tmp_path
):
    reference, _ = client_index
    out = tmp_path / "index"
    summary = job_json(cluster.submit("index", synth_archive / "nifti", "--model", model_dir, "--out", out,
                                      "--shard-volumes", "2", "--json"))  # fmt: skip
    assert set(summary["nodes"]["embed"]) <= cluster.worker_ids
    assert row_set(out) == row_set(reference)
    a, b = vectors(out), vectors(reference)
    assert all(np.allclose(a[k], b[k], atol=1e-5) for k in b)


def test_explain_through_job_submission(cluster, slice_dataset, model_dir, tmp_path):
    out = tmp_path / "explain"
    summary = job_json(cluster.submit("explain", slice_dataset, "--model", model_dir, "--out", out,
                                      "--masks", "40", "--no-png", "--json"))  # fmt: skip
    assert summary["slices"] == pq.read_metadata(slice_dataset / "test.parquet").num_rows
    assert set(summary["nodes"]) <= cluster.worker_ids and sum(summary["nodes"].values()) == summary["slices"]
    assert (out / "explanations.parquet").is_file()


def test_evaluate_through_ray_client(cluster, slice_dataset, model_dir):
    res = ok_json(cluster.ctsearch("evaluate", slice_dataset, "--model", model_dir, "--relax-masks", "40",
                                   "--address", cluster.client, "--json"))  # fmt: skip
    (run,) = res["runs"]
    assert 0.0 <= run["map"] <= 1.0 and run["rr_slices"] > 0
    assert set(run["rr_nodes"]) <= cluster.worker_ids and sum(run["rr_nodes"].values()) == run["rr_slices"]


# ------------------------------------------------------------------------------------ nodes that fail


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"command ended before {what}: {out[-2000:]} {err[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_a_worker_node_killed_during_train_restarts_from_the_checkpoint(slice_dataset, tmp_path):
    run = tmp_path / "run"
    epochs = 12
    with local_cluster(tmp_path, workers=3) as c:
        proc = c.start("train", slice_dataset, run, *TINY, "--epochs", str(epochs), "--workers", "2",
                       "--placement", "spread", "--max-failures", "3", "--address", c.gcs, "--json")  # fmt: skip
        _wait_for(
            lambda: (run / "metrics.jsonl").exists() and len(metrics(run)) >= 2, 240, "two epochs", proc
        )
        victim = metrics(run)[-1]["nodes"][0]  # rank 0's node: it writes metrics and checkpoints
        c.kill_node(victim)
        out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    rows = [r for r in metrics(run) if "loss" in r]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))  # every epoch once, none twice
    before = [r for r in rows if victim in r["nodes"]]
    after = rows[len(before) :]
    assert before and after, "the kill must land mid-run"
    assert all(victim not in r["nodes"] and len(set(r["nodes"])) == 2 for r in after)
    assert json.loads(out)["epochs"] == epochs


def test_a_worker_node_killed_during_index_loses_and_doubles_nothing(
    client_index, synth_archive, model_dir, tmp_path
):
    reference, _ = client_index
    out = tmp_path / "index"
    args = [
        "index",
        synth_archive / "nifti",
        "--model",
        model_dir,
        "--out",
        out,
        "--shard-volumes",
        "1",
        "--batch-size",
        "16",
    ]
    with local_cluster(tmp_path, workers=3) as c:
        proc = c.start(*args, "--address", c.gcs, "--json")

        def committed() -> int:
            with contextlib.suppress(OSError, ValueError):
                return len(json.loads((out / "index.json").read_text())["shards"])
            return 0

        _wait_for(lambda: committed() >= 1, 240, "the first shard commit", proc)
        c.kill_node(sorted(c.worker_ids)[0])
        stdout, stderr = proc.communicate(timeout=400)
        if proc.returncode != 0:  # failing is allowed, with one line
            one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
        ok_json(c.ctsearch(*args, "--address", c.gcs, "--json"))  # the rerun finishes whatever is left
    assert row_set(out) == row_set(reference)  # nothing lost, nothing doubled
    a, b = vectors(out), vectors(reference)
    assert all(np.allclose(a[k], b[k], atol=1e-5) for k in b)


@pytest.mark.parametrize("way", ["address", "client"])
def test_the_head_going_away_gives_one_line_not_a_hang(way, synth_archive, model_dir, tmp_path):
    """A driver off the head node (--address) loses the head's GCS; a Ray Client loses the whole head."""
    out = tmp_path / "index"
    with local_cluster(tmp_path, workers=1) as c:
        proc = c.start("index", synth_archive / "nifti", "--model", model_dir, "--out", out, "--shard-volumes", "1",
                       "--address", c.gcs if way == "address" else c.client)  # fmt: skip
        _wait_for(lambda: (out / "index.json").exists(), 240, "the job to start", proc)
        # On one machine every node shares 127.0.0.1 and a driver attaches to the head's raylet, which
        # would take the driver with it; a driver on another machine loses the GCS only.
        c.kill_head(only="gcs_server" if way == "address" else None)
        stdout, stderr = proc.communicate(timeout=150)  # the watchdog gives up after ~10 s
    line = one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    assert "Ray cluster" in line or "Ray job" in line, line


# ------------------------------------------------------------------------------------ bad addresses


@pytest.mark.parametrize("address", ["head", "ray//head:10001", "head:99999", "http://head:8265"])
def test_a_malformed_address_is_a_usage_error_and_writes_nothing(address, slice_dataset, tmp_path):
    """Checked while the command line is parsed (exit 2, as for every bad option), before Ray."""
    from typer.testing import CliRunner

    from ctsearch.cli.main import app

    r = CliRunner().invoke(
        app, ["train", str(slice_dataset), str(tmp_path / "run"), *TINY, "--address", address]
    )
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    text = " ".join(r.output.replace("│", " ").split())  # rich wraps the message in a box
    assert f"Invalid value for '--address': --address '{address}'" in text, text
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_an_unreachable_cluster_is_one_line_and_writes_nothing(scheme, synth_archive, model_dir, tmp_path):
    import socket

    with socket.socket() as s:  # a port on which nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_ADDRESS": f"{scheme}127.0.0.1:{port}"}  # the environment variable works too
    r = subprocess.run([sys.executable, "-m", "ctsearch", "index", str(synth_archive / "nifti"), "--model", str(model_dir),
                        "--out", str(tmp_path / "index")], env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert "cannot connect to the Ray cluster" in one_error_line(r)
    assert not (tmp_path / "index").exists()


def test_ray_client_without_its_extra_says_what_to_install(synth_archive, model_dir, tmp_path, monkeypatch):
    from conftest import error_line
    from typer.testing import CliRunner

    from ctsearch.cli.main import app

    # grpc is what `ray[client]` adds; hiding it is what a plain `pip install ray` looks like.
    monkeypatch.setitem(sys.modules, "grpc", None)
    r = CliRunner().invoke(app, ["index", str(synth_archive / "nifti"), "--model", str(model_dir),
                                 "--out", str(tmp_path / "index"), "--address", "ray://127.0.0.1:1"])  # fmt: skip
    assert "ray[client]" in error_line(r)
    assert not (tmp_path / "index").exists()
