"""Full disks and read-only places: one line naming the file, no temp file left behind, and a
rerun that just works once the space is back. Faults are injected where the bytes are written
(a parquet or FAISS writer failing as they do on a full tmpfs), so the tests need no mount."""

from __future__ import annotations

import errno

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import error_line
from typer.testing import CliRunner

from ctsearch.cli.main import app
from ctsearch.index import IndexWriter
from ctsearch.index.verify import verify_index
from ctsearch.model import ModelConfig

CFG = ModelConfig(backbone="tiny", image_size=64, model_id="tiny-untrained")
REFUSALS = {
    errno.ENOSPC: "No space left on device",
    errno.EROFS: "Read-only file system",
    errno.EACCES: "Permission denied",
}


def leftovers(folder):
    return sorted(str(p) for p in folder.rglob("*") if p.name.endswith(".tmp"))


@pytest.mark.parametrize("code", sorted(REFUSALS))
def test_refused_write_during_prepare_is_one_line_and_a_rerun_finishes(
    synth_archive, tmp_path, monkeypatch, code
):
    real = pq.write_table

    def failing(table, where, **kw):  # as pyarrow fails on a full tmpfs: half a file, no file name
        with open(where, "wb") as f:
            f.write(b"PAR1 half")
        raise OSError(code, f"Error writing bytes to file. Detail: [errno {code}] {REFUSALS[code]}")

    monkeypatch.setattr(pq, "write_table", failing)
    out = tmp_path / "prepared"
    line = error_line(CliRunner().invoke(app, ["prepare", str(synth_archive / "nifti"), str(out)]))
    assert REFUSALS[code] in line and str(out / "manifest.parquet") in line, line
    assert leftovers(out) == []
    monkeypatch.setattr(pq, "write_table", real)
    r = CliRunner().invoke(app, ["prepare", str(synth_archive / "nifti"), str(out)])
    assert r.exit_code == 0, r.output
    assert pq.read_table(out / "manifest.parquet").num_rows > 0


def _shard(w, s, n=6):
    rows = [dict(volume_id=f"v{s}", patient_id=f"p{s}", slice_index=i) for i in range(n)]
    vols = [dict(entry=f"v{s}", path=f"v{s}", volume_id=f"v{s}", series_id=f"v{s}", content_hash=f"h{s}",
                 size=1, mtime_ns=0, n_slices=n, status="indexed")]  # fmt: skip
    return w.commit_shard(rows, np.random.default_rng(s).standard_normal((n, CFG.embedding_dim)), vols, [])


def test_full_disk_during_a_shard_commit_keeps_the_index_intact(tmp_path, model_dir, monkeypatch):
    from ctsearch.index import writer as writer_module

    root = tmp_path / "idx"
    with IndexWriter.create(root, CFG, model_dir) as w:
        _shard(w, 0)

    def full(index, where):  # FAISS says it with a RuntimeError, after writing part of the file
        with open(where, "wb") as f:
            f.write(b"IxF")
        raise RuntimeError(
            f"Error in faiss::write_index: write error in {where}: 3 != 10240 (No space left on device)"
        )

    monkeypatch.setattr(writer_module.faiss, "write_index", full)
    with IndexWriter.open(root, CFG, model_dir) as w, pytest.raises(OSError) as info:
        _shard(w, 1)
    assert info.value.errno == errno.ENOSPC and info.value.filename.endswith("shard-00001.faiss")
    assert leftovers(root) == []
    monkeypatch.undo()
    assert verify_index(root) == []  # the committed shard is untouched; index.json still lists one
    with IndexWriter.open(root, CFG, model_dir) as w:  # space is back: the rerun commits
        _shard(w, 1)
    assert verify_index(root) == [] and IndexWriter.open(root, CFG, model_dir).close() is None


def test_cli_says_a_full_disk_in_one_line(tmp_path, monkeypatch):
    from ctsearch.errors import environment_error

    e = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.parquet"))
    wrapped = RuntimeError("task failed")
    wrapped.cause = e  # as ray.exceptions.RayTaskError carries a worker's exception
    assert str(environment_error(wrapped)) == f"{tmp_path / 'x.parquet'}: No space left on device; " + (
        "free some space and run the same command again (finished work is kept)"
    )
