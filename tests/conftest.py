"""Shared fixtures: one Ray session per test run, and one small synthetic archive + slice dataset."""

from __future__ import annotations

import os

import pytest

# Keep torch from oversubscribing the CPU when Ray workers run beside the test process.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Every Ray the tests start advertises and listens on 127.0.0.1 only (read when Ray is imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray Train's controller polls its workers every 2 s, so it sees a run end (or a worker fail) up
# to 2 s late; the suite trains ~20 runs. A poll that takes longer is not an error (only one
# hanging for RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 min, is). Inherited by every Ray node
# the tests start.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def pytest_collection_modifyitems(config, items):
    """Every test that needs Ray (the session's, through a fixture, or a cluster of its own) is
    marked ``ray``: ``pytest -m "not ray"`` is the fast loop."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()) or item.get_closest_marker("cluster"):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_session():
    """Ray started once for the whole session; 4 logical CPUs even on 2 cores so data and training both get CPU."""
    import ray

    if not ray.is_initialized():
        # Ray's workers inherit the environment of the moment Ray starts. Started without the
        # s3_server fixture's AWS_* variables, whatever the order tests run in, every job on a
        # bucket must hand its workers the driver's filesystems (storage.adopt), as on a cluster
        # whose nodes have no keys.
        aws = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("AWS_")}
        try:
            # address="local": never the test cluster that tests/local_cluster.py may have started.
            ray.init(
                address="local",
                num_cpus=4,
                include_dashboard=False,
                log_to_driver=False,
                logging_level="ERROR",
            )
        finally:
            os.environ.update(aws)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """An untrained tiny encoder at 64 px (seed 0), saved as a run directory: enough to tell
    slices apart, fast on CPU. Read-only: tests that need to change a run make their own."""
    import torch

    from ctsearch.model import ModelConfig, build_encoder, save_encoder

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="tiny", image_size=64, model_id="tiny-untrained")
    return save_encoder(build_encoder(cfg).eval(), cfg, tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def synth_archive(tmp_path_factory):
    """A small synthetic archive: 8 patients, 64 px slices, NIfTI (Decathlon layout) + DICOM, seed 0."""
    from ctsearch.synth import synth_archive as make

    out = tmp_path_factory.mktemp("synth")
    make(out, volumes=8, seed=0, size=64, fmt="both")
    return out


@pytest.fixture(scope="session")
def slice_dataset(synth_archive, tmp_path_factory):
    """``ctsearch prepare --protocol decathlon`` output for ``synth_archive``: 6 train / 2 test volumes."""
    from ctsearch.prepare import prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare(synth_archive / "nifti", out, protocol="decathlon", per_volume=5, train_volumes=6, seed=0)
    return out


def random_volume(
    shape=(6, 32, 32),
    seed=0,
    spacing=(2.5, 0.703125, 0.8),
    origin=(-180.5, -200.25, -333.0),
    hu_range=(-1024, 2500),
    **ids,
):
    """A ``Volume`` of seeded random HU, the one small phantom of the I/O tests (ctsearch.synth makes
    anatomical ones). Random pixels make any flip or transpose of the axes change the array, so it
    cannot hide; ``ids`` override the default patient, study, series ids and exam date."""
    import numpy as np

    from ctsearch.io import Volume

    hu = np.random.default_rng(seed).integers(*hu_range, size=shape).astype(np.int16)
    ids = {
        "patient_id": "liver_7",
        "study_id": "liver_7",
        "series_id": "liver_7",
        "exam_date": "2021-03-04",
    } | ids
    return Volume(hu=hu, spacing_mm=spacing, affine=Volume.affine_from(spacing, origin), **ids)


def error_line(result) -> str:
    """The one ``error: ...`` line of a CLI result that failed on bad input (exit 1, no traceback).

    Other stderr lines are allowed: the session's Ray prints warnings (e.g. "N worker processes
    have been started") from its own threads, and they can land while any command runs.
    """
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture(scope="session")
def serve_archive(tmp_path_factory):
    """3 patients with 2 examinations each, 64 px, NIfTI + DICOM (seed 1): queries across exams."""
    from ctsearch.synth import synth_archive as make

    out = tmp_path_factory.mktemp("serve-synth")
    make(out, volumes=3, seed=1, size=64, fmt="both", exams=2)
    return out


@pytest.fixture(scope="session")
def serve_index(serve_archive, model_dir, tmp_path_factory):
    """The DICOM copy of ``serve_archive`` indexed with ``model_dir``, 2 volumes per shard (3 shards)."""
    from ctsearch.io import scan_archive

    entries, _ = scan_archive(serve_archive / "dicom")
    return index_entries(entries, model_dir, tmp_path_factory.mktemp("serve-index") / "idx")


def index_entries(entries, model_dir, out, volumes_per_shard: int = 2):
    """Index scan entries (ctsearch.io.ScanEntry) into ``out`` with the encoder in ``model_dir``.

    Written with the library's IndexWriter in this process (as `ctsearch index` writes it, without
    the Ray Data pipeline, which costs a minute on 2 cores and is tested elsewhere)."""
    import numpy as np

    from ctsearch.index import IndexWriter, l2_normalize
    from ctsearch.model import embed, load_encoder
    from ctsearch.store import content_hash, file_fingerprint

    encoder, config = load_encoder(model_dir)
    with IndexWriter.open(out, config, model_dir) as w:
        for start in range(0, len(entries), volumes_per_shard):
            rows, vectors, volumes = [], [], []
            for e in entries[start : start + volumes_per_shard]:
                vol = e.read()
                vectors.append(l2_normalize(embed(encoder, vol.hu, config)))
                z = vol.z_mm()
                rows += [
                    dict(
                        volume_id=e.volume_id,
                        patient_id=e.patient_id,
                        study_id=e.study_id,
                        series_id=e.series_id,
                        exam_date=e.exam_date,
                        slice_index=k,
                        z_mm=float(z[k]),
                        path=e.path,
                    )
                    for k in range(vol.hu.shape[0])
                ]
                size, mtime = file_fingerprint(e.path)
                volumes.append(
                    dict(
                        entry=f"{e.path}#{e.series_id}",
                        path=e.path,
                        volume_id=e.volume_id,
                        series_id=e.series_id,
                        content_hash=content_hash(e.path),
                        pixel_hash=vol.pixel_hash(),
                        size=size,
                        mtime_ns=mtime,
                        n_slices=vol.hu.shape[0],
                        status="indexed",
                    )
                )
            w.commit_shard(rows, np.concatenate(vectors), volumes, errors=[])
    return out


class SimulatedCrash(RuntimeError):
    """What ``crash_index_writer`` raises in place of a killed process."""


def crash_index_writer(monkeypatch, point: str, n: int) -> None:
    """Make the n-th commit of every IndexWriter stop like a killed process, at ``point``:
    ``files`` (the shard's files are written, index.json is not) or ``commit`` (just after it)."""
    from ctsearch.index import IndexWriter

    commit, calls = IndexWriter._commit, []

    def dying_commit(self, *args, **kwargs):
        calls.append(1)
        if point == "files" and len(calls) == n:
            raise SimulatedCrash(f"simulated crash before commit #{n}")
        commit(self, *args, **kwargs)
        if point == "commit" and len(calls) == n:
            raise SimulatedCrash(f"simulated crash after commit #{n}")

    monkeypatch.setattr(IndexWriter, "_commit", dying_commit)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API server (moto's standalone server) on 127.0.0.1 that checks credentials, and
    the standard AWS environment variables holding a valid key for the whole session. Yields the
    endpoint URL. A request signed with other keys (or none) is refused, as by AWS."""
    import json
    import socket
    import subprocess
    import sys
    import time

    pytest.importorskip("moto.server", reason="moto[server] is in the test extras (pip install -e '.[test]')")
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    # Credentials are enforced after the first 3 requests: the ones below that create the key.
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"moto server exited: {log.read_text()[-500:]}")
            time.sleep(0.1)
    iam = boto3.client(
        "iam",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="setup",
        aws_secret_access_key="setup",
    )
    iam.create_user(UserName="ctsearch-test")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="ctsearch-test", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="ctsearch-test")["AccessKey"]
    env = {
        "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def bucket(s3_server, request):
    """A fresh, empty bucket for one test; yields ``s3://<name>``."""
    import re
    import uuid

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"
