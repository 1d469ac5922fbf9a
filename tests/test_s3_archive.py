"""Archives and manifests read from ``s3://`` (moto's S3 server on localhost): the same manifest,
errors, slices and index rows as from the local copy of the same archive, and damaged objects
as error rows naming their URIs."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ctsearch import storage
from ctsearch.cli.main import app
from ctsearch.io import detect_layout, scan_archive
from ctsearch.io import remote as remote_io
from ctsearch.prepare import prepare

DICOM_PATIENTS = 3  # patients' DICOM series uploaded (of the synthetic archive's): enough, and fast
SECRET = "ctsearch-test-secret-do-not-log"  # conftest's s3_server sets it as AWS_SECRET_ACCESS_KEY


@pytest.fixture(scope="module")
def archives(synth_archive, s3_server, tmp_path_factory):
    """(local root, s3 root): the synthetic archive (NIfTI Decathlon + DICOM) plus damaged files,
    on a local disk and uploaded as is to a bucket."""
    import boto3

    local = tmp_path_factory.mktemp("s3src") / "archive"
    shutil.copytree(synth_archive / "nifti", local / "nifti")
    for patient in sorted(p.name for p in (synth_archive / "dicom").iterdir())[:DICOM_PATIENTS]:
        shutil.copytree(synth_archive / "dicom" / patient, local / "dicom" / patient)
    good = (local / "nifti" / "imagesTr" / "liver_0.nii.gz").read_bytes()
    (local / "nifti" / "imagesTr" / "liver_98.nii.gz").write_bytes(good[: len(good) // 3])  # truncated
    shutil.copy(
        local / "nifti" / "labelsTr" / "liver_0.nii.gz", local / "nifti" / "labelsTr" / "liver_98.nii.gz"
    )
    (local / "dicom" / "notes.dcm").write_bytes(b"not a DICOM file, despite its name\n" * 8)
    bucket = "ctsearch-archives-" + uuid.uuid4().hex[:8]
    boto3.client("s3").create_bucket(Bucket=bucket)
    remote = f"s3://{bucket}/archive"
    names = [str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()]
    with ThreadPoolExecutor(16) as pool:  # storage.upload, 16 PUTs at a time
        list(pool.map(lambda n: storage.upload(local, remote, [n]), names))
    return local, remote


def _rel(value, root: str):
    """A path (or a message) with its archive root replaced, so local and s3 outputs compare."""
    return value.replace(root.rstrip("/"), "<archive>") if isinstance(value, str) else value


def _rows(rows: list[dict], root: str) -> list[dict]:
    return [{k: _rel(v, str(root)) for k, v in r.items()} for r in rows]


def _table_rows(path, root: str) -> list[dict]:
    return _rows(pq.read_table(path).to_pylist(), str(root))


@pytest.mark.parametrize("head_bytes", [remote_io.HEAD_BYTES, 4096])
@pytest.mark.parametrize("part", ["nifti", "dicom"])
def test_scan_of_a_bucket_equals_the_scan_of_the_local_copy(archives, part, head_bytes, monkeypatch):
    """Same entries, same error rows (paths as URIs); 4096: most objects are read by ranges only."""
    local, remote = archives
    monkeypatch.setattr(remote_io, "HEAD_BYTES", head_bytes)
    monkeypatch.setattr(remote_io, "WHOLE_BYTES", 2 * head_bytes)
    partial = []
    build = remote_io._Shadow.build
    monkeypatch.setattr(
        remote_io._Shadow, "build", lambda self: (build(self), partial.append(len(self.partial)))
    )
    le, lerr = scan_archive(local / part)
    re_, rerr = scan_archive(f"{remote}/{part}/")
    assert _rows([e.row() for e in re_], remote) == _rows([e.row() for e in le], local)
    assert _rows(rerr, remote) == _rows(lerr, local)
    assert [_rel(f, remote) for e in re_ for f in e.files] == [
        _rel(f, str(local)) for e in le for f in e.files
    ]
    assert all(e.path.startswith(remote + f"/{part}/") for e in re_)
    if head_bytes == 4096:
        assert partial[0] > 0, "no object was read by ranges"
    assert detect_layout(f"{remote}/{part}") == detect_layout(local / part)
    bad = {r["path"] for r in rerr}
    expected = {"nifti": f"{remote}/nifti/imagesTr/liver_98.nii.gz", "dicom": f"{remote}/dicom/notes.dcm"}[
        part
    ]
    assert expected in bad
    # A volume read back through the store equals the local one.
    v_remote, v_local = re_[0].read(), le[0].read()
    assert np.array_equal(v_remote.hu, v_local.hu) and v_remote.source == re_[0].path


def test_prepare_from_a_bucket_writes_the_same_dataset(archives, tmp_path):
    local, remote = archives
    kw = dict(protocol="decathlon", per_volume=3, train_volumes=6, seed=0)
    a = prepare(local / "nifti", tmp_path / "local", **kw)
    b = prepare(f"{remote}/nifti", tmp_path / "s3", **kw)
    assert {k: v for k, v in a.items() if k not in ("archive", "out")} == {
        k: v for k, v in b.items() if k not in ("archive", "out")
    }
    for name in ("manifest.parquet", "errors.parquet"):
        assert _table_rows(tmp_path / "s3" / name, remote) == _table_rows(tmp_path / "local" / name, local)
    for name in ("train.parquet", "test.parquet"):
        assert pq.read_table(tmp_path / "s3" / name).equals(pq.read_table(tmp_path / "local" / name))
    assert json.loads((tmp_path / "s3" / "protocol.json").read_text()) == json.loads(
        (tmp_path / "local" / "protocol.json").read_text()
    )
    errors = pq.read_table(tmp_path / "s3" / "errors.parquet").to_pylist()
    assert any(r["path"] == f"{remote}/nifti/imagesTr/liver_98.nii.gz" for r in errors)
    assert not any(SECRET in str(r) for r in errors)


def test_cli_prepare_takes_a_uri_and_a_missing_one_is_one_line(archives, tmp_path):
    local, remote = archives
    r = CliRunner().invoke(app, ["prepare", f"{remote}/dicom/", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert (
        summary["volumes"] == len(scan_archive(local / "dicom")[0]) > 1
        and summary["archive"] == f"{remote}/dicom"
    )
    errors = pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist()
    assert [e["path"] for e in errors] == [f"{remote}/dicom/notes.dcm"]
    r = CliRunner().invoke(app, ["prepare", f"{remote}/nope", str(tmp_path / "out2")])
    assert r.exit_code != 0 and "no such archive folder" in r.output and "Traceback" not in r.output


def test_a_volume_task_needs_only_the_uri_and_the_filesystem(archives, tmp_path):
    """The filesystem object travels to workers without the secret key, and reads with no AWS_*
    variables in the worker's environment."""
    _, remote = archives
    uri = f"{remote}/nifti/imagesTr/liver_0.nii.gz"
    fss = storage.filesystems([uri])
    blob = pickle.dumps(fss)
    assert SECRET.encode() not in blob
    code = (
        "import pickle, sys\n"
        "from ctsearch.io import read_volume\n"
        "from ctsearch.io.remote import read_volume_uri\n"
        "fss = pickle.loads(sys.stdin.buffer.read())\n"
        f"print(read_volume_uri({uri!r}, read_volume, fss=fss).hu.shape)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    r = subprocess.run([sys.executable, "-c", code], input=blob, env=env, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert r.stdout.decode().strip().startswith("(")


def test_fingerprint_and_content_hash_of_a_uri(archives):
    local, remote = archives
    nii = "nifti/imagesTr/liver_1.nii.gz"
    assert storage.content_hash(f"{remote}/{nii}") == storage.content_hash(local / nii)
    size, mtime = storage.fingerprint(f"{remote}/{nii}")
    assert size == (local / nii).stat().st_size and mtime > 0
    series = next(e for e in scan_archive(f"{remote}/dicom")[0])
    local_series = next(e for e in scan_archive(local / "dicom")[0] if e.volume_id == series.volume_id)
    assert storage.content_hash(series.path, series.files) == storage.content_hash(
        local_series.path, local_series.files
    )
    assert (
        storage.fingerprint(series.path, series.files)[0]
        == storage.fingerprint(local_series.path, local_series.files)[0]
    )
    with pytest.raises(FileNotFoundError):
        storage.fingerprint(f"{remote}/nifti/imagesTr/nope.nii.gz")


def _index_rows(index_dir, root: str) -> dict:
    from ctsearch.index import table_vectors

    rows = {}
    for f in sorted((index_dir / "embeddings").glob("*.parquet")):
        t = pq.read_table(f)
        for r, v in zip(t.drop(["embedding"]).to_pylist(), table_vectors(t)):
            rows[(r["volume_id"], r["slice_index"])] = (_rel(r["path"], root), {**r, "path": None}, v)
    return rows


def _errors(index_dir, root: str) -> list[dict]:
    return sorted(_table_rows(index_dir / "errors.parquet", root), key=lambda r: (r["path"], r["stage"]))


def test_index_from_a_bucket_equals_the_index_of_the_local_copy(archives, model_dir, ray_session, tmp_path):
    """The whole archive (NIfTI and DICOM, with the damaged files) from s3:// into a local index."""
    from ctsearch.jobs.index import index_source

    local, remote = archives
    a = index_source(local, model_dir, tmp_path / "local", shard_volumes=4, batch_size=64)
    b = index_source(remote, model_dir, tmp_path / "s3", shard_volumes=4, batch_size=64)
    assert (a.volumes_indexed, a.rows_added, a.volumes_failed + a.scan_errors) == (
        b.volumes_indexed,
        b.rows_added,
        b.volumes_failed + b.scan_errors,
    )
    ra, rb = _index_rows(tmp_path / "local", str(local)), _index_rows(tmp_path / "s3", remote)
    assert ra.keys() == rb.keys() and len(ra) == a.rows_added > 0
    for key in ra:
        assert ra[key][:2] == rb[key][:2]
        np.testing.assert_allclose(ra[key][2], rb[key][2], atol=1e-6)
    assert _errors(tmp_path / "s3", remote) == _errors(tmp_path / "local", str(local))
    assert any(
        e["path"].startswith(remote) for e in pq.read_table(tmp_path / "s3" / "errors.parquet").to_pylist()
    )
    vols = pq.read_table(tmp_path / "s3" / "volumes").to_pylist()
    assert {v["content_hash"] for v in vols} == {
        v["content_hash"] for v in pq.read_table(tmp_path / "local" / "volumes").to_pylist()
    }
    # Unchanged objects (same size and modification time in the store) are not read again.
    again = index_source(remote + "/", model_dir, tmp_path / "s3", shard_volumes=4)
    assert again.unchanged_skipped == b.volumes_seen and again.rows_added == 0


def test_index_from_a_manifest_in_a_bucket(archives, model_dir, ray_session, tmp_path):
    """A manifest written by prepare from s3:// and stored in the bucket: its rows name URIs,
    which the read tasks fetch; a damaged object (uploaded after the scan) is an error row."""
    from ctsearch.jobs.index import index_source

    _, remote = archives
    prepare(f"{remote}/nifti", tmp_path / "prep")
    rows = pq.read_table(tmp_path / "prep" / "manifest.parquet").to_pylist()[:3]
    storage.write_bytes(f"{remote}/prep/damaged/liver_97.nii.gz", b"\x1f\x8b\x08\x00 cut short")
    rows.append(
        {**rows[0], "volume_id": "liver_97", "series_id": "liver_97", "path": "damaged/liver_97.nii.gz"}
    )
    import pyarrow as pa

    from ctsearch.store import MANIFEST_SCHEMA

    manifest = f"{remote}/prep/manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), tmp_path / "m.parquet")
    storage.write_bytes(manifest, (tmp_path / "m.parquet").read_bytes())
    s = index_source(manifest, model_dir, tmp_path / "idx", shard_volumes=2)
    assert s.volumes_indexed == 3 and s.volumes_failed == 1
    errors = pq.read_table(tmp_path / "idx" / "errors.parquet").to_pylist()
    assert [e["path"] for e in errors] == [f"{remote}/prep/damaged/liver_97.nii.gz"]
    assert all(SECRET not in e["error"] for e in errors)
