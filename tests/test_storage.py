"""The storage seam (ctsearch.storage) on a local folder and on a real S3 API server (moto)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ctsearch import storage
from ctsearch.errors import CTSearchInputError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("bucket") + "/root"


def test_files_round_trip_and_listing(root):
    storage.write_bytes(storage.join(root, "a.txt"), b"one")
    storage.write_bytes(storage.join(root, "sub", "b.bin"), b"\x00" * 5)
    assert storage.read_bytes(storage.join(root, "a.txt")) == b"one"
    assert storage.list_files(root) == {"a.txt": 3, "sub/b.bin": 5}
    assert storage.is_file(storage.join(root, "a.txt")) and storage.is_dir(root)
    assert not storage.exists(storage.join(root, "nope"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "nope"))
    storage.delete(storage.join(root, "a.txt"))
    storage.delete(storage.join(root, "a.txt"))  # twice: not an error
    assert storage.list_files(root) == {"sub/b.bin": 5}


def test_a_cached_copy_follows_the_store_and_staged_output_uploads(root, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    with storage.staged_output(root) as out:
        (out / "x").mkdir(parents=True, exist_ok=True)
        (out / "x" / "f.json").write_text('{"a": 1}')
    assert storage.read_json(storage.join(root, "x", "f.json"), "test file") == {"a": 1}
    local = storage.cached_copy(root)
    assert json.loads((local / "x" / "f.json").read_text()) == {"a": 1}
    storage.write_bytes(storage.join(root, "x", "f.json"), b'{"a": 22}')
    assert json.loads((storage.cached_copy(root) / "x" / "f.json").read_text()) == {"a": 22}


def test_a_failed_job_uploads_nothing(bucket):
    with pytest.raises(RuntimeError), storage.staged_output(bucket + "/out") as out:
        (out / "half.txt").write_text("half")
        raise RuntimeError("job failed")
    assert storage.list_files(bucket + "/out") == {}


def test_conditional_writes_let_exactly_one_writer_win(bucket):
    loc = bucket + "/index.json"
    t1 = storage.put_if(loc, b"first", None)
    assert t1 and storage.put_if(loc, b"second", None) is None  # it exists now
    t2 = storage.put_if(loc, b"third", t1)
    assert t2 and storage.put_if(loc, b"fourth", t1) is None  # a stale version loses
    assert storage.get_versioned(loc) == (b"third", t2)
    assert storage.get_versioned(bucket + "/none") == (None, None)


def test_conditional_writes_need_a_store_that_has_them(tmp_path):
    with pytest.raises(CTSearchInputError, match="conditional writes"):
        storage.put_if(f"gs://b/{tmp_path.name}", b"x", None)


def test_a_lease_admits_one_writer_and_frees_on_release(bucket):
    a = storage.Lease(bucket + "/idx", "`ctsearch index`", ttl=30).acquire()
    with pytest.raises(CTSearchInputError, match="another `ctsearch index` is writing"):
        storage.Lease(bucket + "/idx", "`ctsearch index`", ttl=30).acquire()
    a.release()
    assert not storage.exists(bucket + "/idx/.lease")
    storage.Lease(bucket + "/idx", "`ctsearch index`", ttl=30).acquire().release()


def test_an_expired_lease_or_a_dead_local_holder_is_taken_over(bucket):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)  # that process has exited
    import socket
    import time

    for body in (
        {"holder": "pid 1 on elsewhere", "host": "elsewhere", "pid": 1, "expires": time.time() - 1},
        {"holder": f"pid {pid}", "host": socket.gethostname(), "pid": pid, "expires": time.time() + 600},
    ):
        storage.write_bytes(bucket + "/idx/.lease", json.dumps(body).encode())
        storage.Lease(bucket + "/idx", "`ctsearch index`").acquire().release()
    storage.write_bytes(
        bucket + "/idx/.lease",
        json.dumps(
            {"holder": "pid 7 on elsewhere", "host": "elsewhere", "pid": 7, "expires": time.time() + 600}
        ).encode(),
    )
    with pytest.raises(CTSearchInputError, match="pid 7 on elsewhere"):
        storage.Lease(bucket + "/idx", "`ctsearch index`").acquire()


def test_a_renewal_that_finds_the_lease_taken_marks_it_lost(bucket):
    lease = storage.Lease(bucket + "/idx", "`ctsearch index`", ttl=0.3).acquire()
    storage.write_bytes(bucket + "/idx/.lease", b'{"holder": "someone else"}')  # taken over behind its back
    import time

    for _ in range(50):
        if lease.lost:
            break
        time.sleep(0.05)
    assert lease.lost
    lease.release()
    assert storage.exists(bucket + "/idx/.lease")  # not ours any more: left alone


def test_a_missing_bucket_and_wrong_endpoint_are_one_line_errors(s3_server, monkeypatch):
    with pytest.raises(CTSearchInputError, match="s3://no-such-bucket-ctsearch/x.*no such bucket"):
        storage.read_json("s3://no-such-bucket-ctsearch/x/config.json", "run config")
    with pytest.raises(CTSearchInputError, match="no such bucket"):
        storage.write_bytes("s3://no-such-bucket-ctsearch/x/config.json", b"{}")


def test_credentials_never_reach_an_error_message(bucket):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    with pytest.raises(CTSearchInputError) as e:
        storage.read_json(bucket + "/missing.json", "run config")
    assert secret not in str(e.value)


def test_the_keys_come_from_the_environment_and_travel_with_the_filesystem(bucket, monkeypatch, tmp_path):
    """The server checks signatures: wrong keys are a one-line error naming the URI and not the
    secret; a filesystem object shipped to a process without AWS variables (a Ray worker) still works."""
    import pickle

    storage.write_bytes(bucket + "/k.txt", b"signed")
    fs, path = storage.resolve(bucket + "/k.txt")
    (tmp_path / "fs.pkl").write_bytes(pickle.dumps((fs, path)))
    bare = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    code = "import pickle,sys; fs, p = pickle.load(open(sys.argv[1], 'rb')); print(fs.open_input_stream(p).read().decode())"
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "fs.pkl")], env=bare, capture_output=True, text=True
    )
    assert r.stdout.strip() == "signed", r.stderr[-500:]
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    for call in (
        lambda: storage.read_bytes(bucket + "/k.txt"),
        lambda: storage.put_if(bucket + "/n", b"x", None),
    ):
        with pytest.raises(CTSearchInputError, match="access denied") as e:
            call()
        assert bucket in str(e.value) and "not-the-secret" not in str(e.value) and secret not in str(e.value)


def test_gz_objects_are_stored_as_given(bucket):
    """pyarrow's streams default to compression="detect": a .gz name must not make the store
    gzip the bytes again on write, nor un-gzip them on read (a .nii.gz is read as what it is)."""
    import boto3

    data = b"\x1f\x8b" + bytes(range(256)) * 40
    loc = bucket + "/v/liver_0.nii.gz"
    storage.write_bytes(loc, data)
    b, key = loc.split("://", 1)[1].split("/", 1)
    assert boto3.client("s3").get_object(Bucket=b, Key=key)["Body"].read() == data
    assert storage.read_bytes(loc) == data
