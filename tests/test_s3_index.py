"""An index on a real S3 API server (moto, 127.0.0.1): commits by conditional writes, a writer's
lease instead of flock, readers on a local mirror, and a killed `ctsearch index` run finished by a rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import error_line
from typer.testing import CliRunner

from ctsearch import storage
from ctsearch.cli.main import app
from ctsearch.config import ModelConfig
from ctsearch.errors import CTSearchInputError
from ctsearch.index import Index, IndexWriter

CONFIG = ModelConfig(backbone="tiny", image_size=64)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))


def _shard(w: IndexWriter, volume: str, n: int = 4, seed: int = 0) -> str:
    v = np.random.default_rng(seed).normal(size=(n, 128)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    rows = [
        dict(
            volume_id=volume,
            patient_id="p-" + volume,
            study_id="s",
            series_id=volume,
            exam_date=None,
            slice_index=i,
            z_mm=float(i),
            path=f"{volume}.nii.gz",
        )
        for i in range(n)
    ]
    vol = dict(
        path=f"{volume}.nii.gz",
        volume_id=volume,
        series_id=volume,
        entry=f"{volume}.nii.gz",
        content_hash="h" + volume,
        size=1,
        mtime_ns=0,
        n_slices=n,
        status="indexed",
    )
    return w.commit_shard(rows, v, volumes=[vol], errors=[])


def _rows(index: Index) -> list[tuple[str, int]]:
    out = []
    for s in index.shards:
        t = pq.read_table(
            index.root / "embeddings" / f"{s.name}.parquet", columns=["volume_id", "slice_index"]
        )
        out += list(zip(t.column("volume_id").to_pylist(), t.column("slice_index").to_pylist()))
    return sorted(out)


def test_commits_land_in_the_store_and_readers_search_them(bucket, model_dir):
    uri = bucket + "/idx"
    with IndexWriter.open(uri, CONFIG, model_dir) as w:
        a = _shard(w, "v1", seed=1)
    assert not storage.exists(uri + "/.lease")  # released
    names = storage.list_files(uri)
    assert {"index.json", "model/model.json", "model/encoder.safetensors", f"faiss/{a}.faiss"} <= set(names)
    assert a.startswith("shard-00000-") and len(a) == len("shard-00000-") + 8  # write-once, unique
    index = Index.open(uri)
    assert _rows(index) == [("v1", i) for i in range(4)]
    q = index.shard_vectors(index.shards[0])[2:3]
    assert index.search(q, k=1).hits[0][0]["slice_index"] == 2
    with IndexWriter.open(uri, CONFIG, model_dir) as w:  # continues the committed index
        assert w.unchanged("v1.nii.gz", (1, 0))
        _shard(w, "v2", seed=2)
    assert index.refresh() and len(index) == 8  # a reader sees the new commit
    r = CliRunner().invoke(app, ["verify", uri])
    assert r.exit_code == 0 and "every file matches" in r.stdout, r.output


def test_a_second_writer_is_refused_while_the_first_holds_the_lease(bucket, model_dir):
    uri = bucket + "/idx"
    with IndexWriter.open(uri, CONFIG, model_dir) as w:
        _shard(w, "v1")
        with pytest.raises(CTSearchInputError, match="another `ctsearch index` is writing"):
            IndexWriter.open(uri, CONFIG, model_dir)
        _shard(w, "v2")  # the refused writer changed nothing
    assert _rows(Index.open(uri)) == sorted([("v1", i) for i in range(4)] + [("v2", i) for i in range(4)])


def test_of_two_writers_exactly_one_commits(bucket, model_dir):
    """A writer stalled past its lease's expiry is taken over; its next commit fails, whole."""
    uri = bucket + "/idx"
    with IndexWriter.open(uri, CONFIG, model_dir) as w:
        _shard(w, "v0")
    stalled = IndexWriter.open(uri, CONFIG, model_dir)
    stalled._lease._stop.set()  # stops renewing: as if the process hung
    expired = json.loads(storage.read_bytes(uri + "/.lease"))
    expired["expires"] = time.time() - 1
    storage.write_bytes(uri + "/.lease", json.dumps(expired).encode())
    taker = IndexWriter.open(uri, CONFIG, model_dir)  # takes the expired lease over, fences
    with pytest.raises(CTSearchInputError, match="another writer committed to this index"):
        _shard(stalled, "late")
    _shard(taker, "v1")
    taker.close()
    committed = {v for v, _ in _rows(Index.open(uri))}
    assert committed == {"v0", "v1"}
    # The stalled writer's uploads were never committed; the next writer deletes them.
    with IndexWriter.open(uri, CONFIG, model_dir):
        pass
    listed = set(storage.list_files(uri))
    shards = {s["name"] for s in json.loads(storage.read_bytes(uri + "/index.json"))["shards"]}
    assert {n.split("/")[1].split(".")[0] for n in listed if n.startswith("embeddings/")} == shards


def test_a_lease_deleted_by_hand_still_lets_only_one_writer_commit(bucket, model_dir):
    uri = bucket + "/idx"
    first = IndexWriter.open(uri, CONFIG, model_dir)  # creates the index
    first._lease._stop.set()
    storage.delete(uri + "/.lease")  # an operator "unlocks" the index while the first still runs
    second = IndexWriter.open(uri, CONFIG, model_dir)
    with pytest.raises(CTSearchInputError, match="another writer committed to this index"):
        _shard(first, "x")
    _shard(second, "y")
    second.close()
    assert {v for v, _ in _rows(Index.open(uri))} == {"y"}


def test_an_index_uri_with_other_files_and_no_index_json_is_refused(bucket, model_dir):
    storage.write_bytes(bucket + "/other/notes.txt", b"x")
    with pytest.raises(CTSearchInputError, match="has no index.json"):
        IndexWriter.open(bucket + "/other", CONFIG, model_dir)
    r = CliRunner().invoke(app, ["search", bucket + "/nothing", "liver_0:3"])
    assert "not an index" in error_line(r) and bucket + "/nothing" in error_line(r)


def test_index_killed_mid_run_then_rerun_gives_exactly_the_rows(
    synth_archive, model_dir, bucket, tmp_path, ray_session
):
    """`ctsearch index --out s3://...` killed with SIGKILL after a commit; the same job again (in
    this process) takes over the dead writer's lease at once and ends with every slice exactly once."""
    from ctsearch.jobs.index import index_source

    uri = bucket + "/idx"
    cmd = [
        sys.executable,
        "-m",
        "ctsearch",
        "index",
        str(synth_archive / "nifti"),
        "--model",
        str(model_dir),
        "--out",
        uri,
        "--shard-volumes",
        "1",
        "--quiet",
    ]
    env = dict(os.environ, CTSEARCH_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.time() + 600  # a loaded CI machine: Ray starts slowly
    shards = 0
    while time.time() < deadline and proc.poll() is None:
        data, _ = storage.get_versioned(uri + "/index.json")
        shards = len(json.loads(data)["shards"]) if data else 0
        if shards >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    assert 2 <= shards < 8, f"the kill must land mid-run ({shards} shards): {err.decode()[-2000:]}"
    assert storage.exists(uri + "/.lease")  # the dead writer's lease is still there
    summary = index_source(str(synth_archive / "nifti"), model_dir, uri, shard_volumes=1)
    assert summary.unchanged_skipped >= 2  # what the killed run committed is not redone
    rows = _rows(Index.open(uri))
    assert len(rows) == len(set(rows))
    volumes = sorted(p.name.split(".")[0] for p in (synth_archive / "nifti" / "imagesTr").glob("*.nii.gz"))
    assert sorted({v for v, _ in rows}) == volumes
    index = Index.open(uri)
    assert len(rows) == len(index) == sum(s.rows for s in index.shards)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in out.decode() + err.decode()
