"""The commands with every input and output on s3://, against a real S3 API server (moto's, the
``s3_server`` / ``bucket`` fixtures of conftest.py): synth -> prepare -> train (and its resume) ->
evaluate -> explain -> report, one-line errors for what a store can get wrong, and credentials
never written anywhere."""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
import urllib.request
from pathlib import Path

import pytest
from conftest import error_line
from typer.testing import CliRunner

from ctsearch import storage
from ctsearch.cli.main import app

SIZE = 32  # px: the smallest slices train accepts; keeps the whole module near a minute of CPU


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Each test's own local copies of remote folders (storage.CACHE_ENV)."""
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def run(*args: str) -> tuple[dict | None, str]:
    """A ctsearch command in this process; (its --json result or None, everything it printed)."""
    # CTSEARCH_DEBUG: a failure shows the whole chain of causes, not the one line a user gets.
    r = CliRunner().invoke(app, [str(a) for a in args], env={"CTSEARCH_DEBUG": "1"})
    assert r.exit_code == 0, r.output + "".join(traceback.format_exception(*r.exc_info))
    out = r.stdout.strip()
    return (json.loads(out) if out.startswith("{") else None), r.output


def fails(*args: str) -> str:
    """The one error line of a command that must fail on bad input (exit 1, no traceback)."""
    return error_line(CliRunner().invoke(app, [str(a) for a in args]))


def secret_free(secret: str, *texts: str, folders: tuple[Path, ...] = (), bucket: str | None = None) -> None:
    """``secret`` is in none of ``texts``, no file under ``folders`` and no object of ``bucket``."""
    for t in texts:
        assert secret not in t
    for folder in folders:
        for f in Path(folder).rglob("*"):
            if f.is_file():
                assert secret.encode() not in f.read_bytes(), f
    if bucket is not None:
        for name in storage.list_files(bucket):
            assert secret.encode() not in storage.read_bytes(storage.join(bucket, name)), name


# ----------------------------------------------------------------------------- the whole pipeline


def test_pipeline_with_every_input_and_output_on_s3(bucket, cache, tmp_path, ray_session):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    printed: list[str] = []
    archive, prepared, r0 = f"{bucket}/archive", f"{bucket}/prepared", f"{bucket}/runs/r0"

    summary, text = run("synth", archive, "-n", "4", "--size", SIZE, "--seed", "0", "--json", "-q")
    printed.append(text)
    assert summary["out"] == archive and summary["nifti_dir"] == f"{archive}/nifti"
    assert summary["cases"][0]["nifti_image"] == f"{archive}/nifti/imagesTr/liver_0.nii.gz"
    assert storage.read_json(f"{archive}/synth.json", "synth summary")["cases"] == summary["cases"]
    assert "nifti/imagesTr/liver_3.nii.gz" in storage.list_files(archive)

    summary, text = run(
        "prepare",
        f"{archive}/nifti",
        prepared,
        "--protocol",
        "decathlon",
        "--train-volumes",
        "3",
        "--json",
    )
    printed.append(text)
    assert summary["out"] == prepared and summary["train_slices"] == 30 and summary["test_slices"] == 10
    assert set(storage.list_files(prepared)) == {
        "manifest.parquet",
        "errors.parquet",
        "protocol.json",
        "train.parquet",
        "test.parquet",
    }

    train = ("train", prepared, r0, "--backbone", "tiny", "--image-size", SIZE, "--init", "random")
    train += ("--batch-size", "8", "--eval-every", "1", "--json", "-q")
    summary, text = run(*train, "--epochs", "1")
    printed.append(text)
    assert summary["epochs"] == 1 and summary["encoder"] == f"{r0}/encoder.safetensors"
    files = storage.list_files(r0)
    for name in ("config.json", "metrics.jsonl", "model.json", "encoder.safetensors"):
        assert name in files
    assert any(n.startswith("checkpoints/checkpoint_") and n.endswith("model.safetensors") for n in files)
    assert ".lease" not in files  # released
    assert storage.read_json(f"{r0}/config.json", "run config")["dataset"] == prepared

    # A rerun with more epochs resumes from the checkpoint in the store.
    summary, text = run(*train, "--epochs", "2")
    printed.append(text)
    assert summary["resumed_after_epoch"] == 1 and summary["epochs"] == 2
    metrics = [json.loads(x) for x in storage.read_bytes(f"{r0}/metrics.jsonl").decode().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2]

    summary, text = run(
        "evaluate",
        prepared,
        "--model",
        r0,
        "--relax-masks",
        "0",
        "--out",
        f"{bucket}/evaluation.json",
        "--json",
    )
    printed.append(text)
    assert summary["queries"] == 10 and summary["dataset"] == prepared
    assert storage.read_json(f"{bucket}/evaluation.json", "evaluation")["runs"][0]["source"] == r0

    explain = f"{bucket}/explain"
    summary, text = run("explain", prepared, "--model", r0, "--out", explain, "--masks", "10", "--json")
    printed.append(text)
    assert summary["slices"] == 10 and summary["errors"] == 0 and summary["out"] == explain
    files = storage.list_files(explain)
    assert {"explanations.parquet", "errors.parquet", "explain.json", "explain-run.json"} <= set(files)
    assert sum(n.startswith("overlays/") for n in files) == 10
    assert not any(n.startswith("parts/") or n == ".lease" for n in files)  # folded, released

    index = f"{bucket}/index"
    summary, text = run("index", f"{archive}/nifti", "--model", r0, "--out", index, "--json", "-q")
    printed.append(text)
    assert summary["volumes_indexed"] == 4 and summary["index_rows"] == summary["rows_added"] > 0
    assert "index.json" in storage.list_files(index) and ".lease" not in storage.list_files(index)
    hits, text = run(
        "search", index, f"{archive}/nifti/imagesTr/liver_1.nii.gz", "--slice", "5", "-k", "3", "--json"
    )
    printed.append(text)
    hits = json.loads(text) if hits is None else hits
    assert len(hits) == 3 and hits[0]["path"] == f"{archive}/nifti/imagesTr/liver_1.nii.gz"
    assert hits[0]["slice_index"] == 5  # the query slice itself, read from the store both times
    summary, text = run("verify", index, "--json")
    printed.append(text)

    # The service on the index in the store, its shards in a group deployment of their own: the
    # replicas read the index and the source volumes with the driver's filesystems.
    from ctsearch.serve.deploy import ServeOptions, start, stop

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = start(ServeOptions(index, port=port, shards_per_replica=1, cpus_per_replica=0.5))
    try:
        ref = f"{hits[0]['volume_id']}:5"
        with urllib.request.urlopen(f"{base}api/search?query={ref}&k=3", timeout=120) as r:
            served = json.loads(r.read())["hits"]
        assert [(h["volume_id"], h["slice_index"]) for h in served] == [
            (h["volume_id"], h["slice_index"]) for h in hits
        ]
        with urllib.request.urlopen(f"{base}api/thumbnail?query={ref}", timeout=120) as r:
            assert r.read(8) == b"\x89PNG\r\n\x1a\n"  # decoded from the source volume in the bucket
    finally:
        stop()
    query_out = f"{bucket}/explain-query"
    summary, text = run(
        "explain",
        index,
        f"{archive}/nifti/imagesTr/liver_1.nii.gz",
        "--slice",
        "5",
        "-k",
        "2",
        "--masks",
        "10",
        "--out",
        query_out,
        "--json",
    )
    printed.append(text)
    assert any(n.endswith(".png") for n in storage.list_files(query_out))

    report = f"{bucket}/report.html"
    summary, text = run(
        "report", r0, explain, prepared, f"{bucket}/evaluation.json", "--out", report, "--json"
    )
    printed.append(text)
    assert {"evaluation", "training"} <= set(summary["sections"])
    page = storage.read_bytes(report).decode()
    assert r0 in page and str(cache) not in page  # inputs named as given, not as their local copies
    assert not (tmp_path / "report.html").exists()

    session = Path(ray_session._private.worker._global_node.get_session_dir_path())
    secret_free(secret, *printed, folders=(cache, session / "logs"), bucket=bucket)


# ----------------------------------------------------------------------------- without Ray


def test_store_errors_are_one_line_naming_the_uri(bucket, cache):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    lines = [
        fails("train", "s3://no-such-bucket-ctsearch/prepared", f"{bucket}/run", "--init", "random"),
        fails("train", f"{bucket}/nothing", f"{bucket}/run", "--init", "random"),
        fails("evaluate", "s3://no-such-bucket-ctsearch/prepared", "--model", f"{bucket}/run"),
        fails("explain", f"{bucket}/nothing", "--model", f"{bucket}/run"),
        fails("report", f"{bucket}/nothing"),
        fails("synth", "s3://no-such-bucket-ctsearch/archive", "-n", "1", "--size", "32"),
        fails("reproduce", f"{bucket}/prepared", f"{bucket}/table"),
    ]
    assert lines == [
        "error: s3://no-such-bucket-ctsearch/prepared: no such bucket (no-such-bucket-ctsearch)",
        f"error: {bucket}/nothing/train.parquet: no such slice dataset (run `ctsearch prepare --protocol decathlon` first)",
        "error: s3://no-such-bucket-ctsearch/prepared: no such bucket (no-such-bucket-ctsearch)",
        f"error: {bucket}/nothing: no such dataset folder (run `ctsearch prepare --protocol decathlon` first)",
        f"error: {bucket}/nothing: does not exist",
        "error: s3://no-such-bucket-ctsearch/archive: no such bucket (no-such-bucket-ctsearch)",
        f"error: {bucket}/prepared: `ctsearch reproduce` takes local folders only (train, evaluate and explain take URIs)",
    ]
    assert not any(secret in line for line in lines)


def tiny_dataset(folder: Path) -> Path:
    """A slice dataset of 6 train and 2 test slices of 32 px (no archive behind it)."""
    import numpy as np

    from ctsearch.store import SliceSet, write_slices

    for split, n in (("train", 6), ("test", 2)):
        write_slices(
            SliceSet(
                hu=np.zeros((n, 32, 32), np.int16),
                mask=np.zeros((n, 32, 32), np.uint8),
                label=np.arange(n, dtype=np.int8) % 2,
                volume_id=np.array([f"{split}-v"] * n, dtype=object),
                patient_id=np.array([f"{split}-p"] * n, dtype=object),
                slice_index=np.arange(n, dtype=np.int32),
                z_mm=np.arange(n, dtype=np.float64),
            ),
            folder / f"{split}.parquet",
        )
    return folder


def test_a_missing_model_and_an_output_bucket_fail_before_the_work(bucket, cache, tmp_path):
    slice_dataset = tiny_dataset(tmp_path / "prepared")
    storage.upload(slice_dataset, f"{bucket}/prepared")
    line = fails("evaluate", f"{bucket}/prepared", "--model", f"{bucket}/runs/none", "--relax-masks", "0")
    assert line == (
        f"error: {bucket}/runs/none: not a model directory: expected model.json and encoder.safetensors "
        "(written by `ctsearch train`)"
    )
    line = fails(
        "evaluate", slice_dataset, "--baseline", "random", "--out", "s3://no-such-bucket-ctsearch/e.json"
    )
    assert line == "error: s3://no-such-bucket-ctsearch/e.json: no such bucket (no-such-bucket-ctsearch)"


def test_synth_on_a_store_refuses_to_mix_two_archives(bucket, cache):
    where = f"{bucket}/a"
    run("synth", where, "-n", "1", "--size", "32", "-q")
    first = storage.list_files(where)
    run("synth", where, "-n", "1", "--size", "32", "-q")  # same settings: the same files again
    assert storage.list_files(where) == first
    line = fails("synth", where, "-n", "2", "--size", "32")
    assert line.endswith(
        "is not empty (a synth archive of other settings); choose an empty folder, or pass --overwrite to replace the archive"
    )
    run("synth", where, "-n", "2", "--size", "32", "--overwrite", "-q")
    assert storage.read_json(f"{where}/synth.json", "synth summary")["patients"] == 2
    storage.write_bytes(f"{where}/mine.txt", b"x")
    assert "holds files synth did not write (mine.txt)" in fails("synth", where, "-n", "1", "--overwrite")


def test_a_model_rewritten_in_place_is_fetched_again(bucket, cache, model_dir):
    from ctsearch.errors import CTSearchInputError
    from ctsearch.store import read_model_config, verify_encoder

    run_uri = f"{bucket}/runs/m"
    storage.upload(model_dir, run_uri)
    local = storage.model_folder(run_uri)
    assert local != Path(model_dir) and (local / "encoder.safetensors").is_file()
    assert storage.model_folder(f"{run_uri}/model.json") == local
    assert read_model_config(local).backbone == "tiny"
    assert len(verify_encoder(local)) == 64
    # The same size, other bytes, written later (a rerun of train): the copy follows the store.
    enc = bytearray((local / "encoder.safetensors").read_bytes())
    enc[-1] ^= 1
    time.sleep(1.1)  # S3 keeps modification times to the second
    storage.write_bytes(f"{run_uri}/encoder.safetensors", bytes(enc))
    assert (storage.model_folder(run_uri) / "encoder.safetensors").read_bytes() == bytes(enc)
    with pytest.raises(CTSearchInputError, match="does not match the sha256"):
        verify_encoder(local)  # model.json still records the old weights
    storage.delete(f"{run_uri}/encoder.safetensors")
    with pytest.raises(CTSearchInputError, match=f"^{run_uri}: not a model directory"):
        storage.model_folder(run_uri)


def test_a_work_folder_syncs_what_changed_and_one_writer_holds_it(bucket, cache):
    from ctsearch.errors import CTSearchInputError

    where = f"{bucket}/explain"
    storage.write_bytes(f"{where}/old.txt", b"old")
    with storage.work_folder(where, "`ctsearch explain`") as folder:
        assert (folder.path / "old.txt").read_bytes() == b"old"
        with pytest.raises(CTSearchInputError, match="another `ctsearch explain` is writing"):
            with storage.work_folder(where, "`ctsearch explain`"):
                pass
        (folder.path / "parts").mkdir()
        (folder.path / "parts" / "p0").write_bytes(b"part")
        folder.sync()
        assert storage.list_files(where) == {
            ".lease": storage.list_files(where)[".lease"],
            "old.txt": 3,
            "parts/p0": 4,
        }
        (folder.path / "parts" / "p0").unlink()
        (folder.path / "old.txt").write_bytes(b"new!")
    assert storage.list_files(where) == {"old.txt": 4}
    with pytest.raises(RuntimeError), storage.work_folder(where, "`ctsearch explain`") as folder:
        (folder.path / "committed").write_bytes(b"c")
        raise RuntimeError("killed mid-job")
    assert "committed" in storage.list_files(where)  # kept for the rerun


def test_a_store_without_conditional_writes_cannot_hold_a_run():
    from ctsearch.errors import CTSearchInputError

    with pytest.raises(CTSearchInputError, match="gs:// has no conditional writes here"):
        with storage.writer_lock("gs://bucket/run", "`ctsearch train`"):
            pass
