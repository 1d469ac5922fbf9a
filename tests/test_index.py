"""`ctsearch index` end to end on the synthetic archive: Ray Data pipeline, shards, resume, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SimulatedCrash, crash_index_writer, error_line
from typer.testing import CliRunner

from ctsearch.cli.main import app
from ctsearch.index import Index, table_vectors
from ctsearch.jobs.index import index_source
from ctsearch.model import ModelConfig, build_encoder, save_encoder
from ctsearch.query import embed_query


@pytest.fixture(scope="module")
def archive(synth_archive, tmp_path_factory):
    """The synthetic NIfTI archive plus one corrupt volume."""
    out = tmp_path_factory.mktemp("archive") / "nifti"
    shutil.copytree(synth_archive / "nifti", out)
    (out / "imagesTr" / "liver_99.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 truncated gzip")
    return out


@pytest.fixture(scope="module")
def built(archive, model_dir, ray_session, tmp_path_factory):
    """One clean index of ``archive`` in 3-volume shards."""
    out = tmp_path_factory.mktemp("idx") / "index"
    summary = index_source(archive, model_dir, out, shard_volumes=3, batch_size=32)
    return out, summary


def _row_set(index_dir) -> set[tuple[str, int]]:
    idx = Index.open(index_dir)
    rows = set()
    for s in idx.shards:
        t = pq.read_table(
            index_dir / "embeddings" / f"{s.name}.parquet", columns=["volume_id", "slice_index"]
        )
        pairs = list(zip(t.column("volume_id").to_pylist(), t.column("slice_index").to_pylist()))
        assert len(pairs) == len(set(pairs)), "duplicate rows inside a shard"
        assert not rows & set(pairs), "the same slice in two shards"
        rows |= set(pairs)
    return rows


def _embeddings(index_dir) -> dict:
    out = {}
    for f in sorted((index_dir / "embeddings").glob("*.parquet")):
        t = pq.read_table(f)
        for key, v in zip(
            zip(t.column("volume_id").to_pylist(), t.column("slice_index").to_pylist()), table_vectors(t)
        ):
            out[key] = v
    return out


def test_index_covers_every_slice_and_records_the_corrupt_volume(built, synth_archive):
    out, summary = built
    n_slices = sum(c.shape[0] for c in _synth_cases(synth_archive))
    assert summary.volumes_indexed == 8 and summary.rows_added == n_slices
    rows = _row_set(out)
    assert len(rows) == n_slices  # every slice of every readable volume, once
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert any(e["path"].endswith("liver_99.nii.gz") for e in errors)
    manifest = json.loads((out / "index.json").read_text())
    assert manifest["rows"] == n_slices and len(manifest["shards"]) == 3
    assert manifest["model"]["model_id"] == "tiny-untrained"
    assert manifest["preprocessing"]["transform"] == "ctsearch.views.eval_transform"
    t = pq.read_table(out / "embeddings" / f"{manifest['shards'][0]['name']}.parquet")
    assert t.schema.field("embedding").type.list_size == 128
    np.testing.assert_allclose(np.linalg.norm(table_vectors(t), axis=1), 1.0, atol=1e-5)
    z = t.column("z_mm").to_numpy()
    assert np.all(np.isfinite(z))


def _synth_cases(root):
    from ctsearch.io import scan_archive

    entries, _ = scan_archive(root / "nifti")
    return entries


def test_volume_that_fails_to_read_lands_in_errors_and_the_rest_is_indexed(archive, model_dir, tmp_path):
    """A manifest row whose file broke after `prepare`: a read error in the pipeline, not a scan error."""
    import pyarrow as pa

    from ctsearch.io import scan_archive

    entries, _ = scan_archive(archive)
    rows = [e.row() for e in entries[:2]]
    bad = tmp_path / "liver_50.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    rows.append({**rows[0], "volume_id": "liver_50", "path": str(bad), "series_id": "liver_50"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    out = tmp_path / "index"
    s = index_source(tmp_path / "manifest.parquet", model_dir, out)
    assert s.volumes_indexed == 2 and s.volumes_failed == 1
    assert len(_row_set(out)) == sum(e.shape[0] for e in entries[:2])
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert [e["stage"] for e in errors if e["path"] == str(bad)] == ["read"]
    # the failed volume is not retried while the file is unchanged, and is retried once it changes
    assert index_source(tmp_path / "manifest.parquet", model_dir, out).unchanged_skipped == 3
    shutil.copy(entries[2].path, bad)
    fixed = index_source(tmp_path / "manifest.parquet", model_dir, out)
    assert fixed.volumes_indexed == 1 and fixed.rows_added == entries[2].shape[0]


def test_second_run_adds_nothing(built, archive, model_dir):
    out, _ = built
    before = _row_set(out)
    again = index_source(archive, model_dir, out, shard_volumes=3)
    assert again.rows_added == 0 and again.shards_added == []
    assert again.unchanged_skipped == again.volumes_seen == 8
    assert _row_set(out) == before


def test_search_returns_the_query_slice_first(built):
    out, _ = built
    idx = Index.open(out)
    v, meta = idx.lookup("liver_3", 30)
    hit = idx.search(v, k=5).hits[0][0]
    assert (hit["volume_id"], hit["slice_index"]) == ("liver_3", 30)
    assert hit["score"] == pytest.approx(1.0, abs=1e-4)


def test_search_by_a_slice_of_another_file_finds_the_same_anatomy(built, synth_archive):
    """The DICOM copy of liver_3 is another file with identical HU: its slice 30 must find liver_3:30."""
    out, _ = built
    folder = next(p for p in (synth_archive / "dicom").rglob("series-*") if "synth-0003" in str(p))
    idx = Index.open(out)
    v, meta = embed_query(idx, folder, slice_index=30)
    hit = idx.search(v, k=3).hits[0][0]
    assert (hit["volume_id"], hit["slice_index"]) == ("liver_3", 30)
    assert hit["score"] == pytest.approx(1.0, abs=1e-3)


def test_exclude_patient_never_returns_that_patient(built):
    out, _ = built
    idx = Index.open(out)
    v, meta = idx.lookup("liver_3", 30)
    p = meta["patient_id"]
    res = idx.search(v, k=50, exclude_patient=p)
    assert len(res.hits[0]) == 50 and all(h["patient_id"] != p for h in res.hits[0])
    only = idx.search(v, k=10, patient=p)
    assert only.hits[0] and all(h["patient_id"] == p for h in only.hits[0])


@pytest.mark.parametrize("crash", ["commit:1", "files:2"])
def test_killed_run_then_rerun_gives_the_clean_row_set(
    built, archive, model_dir, tmp_path, monkeypatch, crash
):
    clean_dir, _ = built
    out = tmp_path / "index"
    point, n = crash.split(":")
    with monkeypatch.context() as m:
        crash_index_writer(m, point, int(n))
        with pytest.raises(SimulatedCrash):
            index_source(archive, model_dir, out, shard_volumes=3, batch_size=32)
    committed = json.loads((out / "index.json").read_text())["shards"]
    assert 1 <= len(committed) < 3  # stopped halfway, whole shards only
    index_source(archive, model_dir, out, shard_volumes=3, batch_size=32)
    assert _row_set(out) == _row_set(clean_dir)
    a, b = _embeddings(out), _embeddings(clean_dir)
    assert all(np.allclose(a[k], b[k], atol=1e-5) for k in b)
    # no files of uncommitted shards left behind
    names = {s["name"] for s in json.loads((out / "index.json").read_text())["shards"]}
    assert {f.stem for f in (out / "embeddings").glob("*.parquet")} == names
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert sum(e["path"].endswith("liver_99.nii.gz") for e in errors) == 1


def test_second_archive_adds_shards_and_skips_copies(built, archive, synth_archive, model_dir, tmp_path):
    out = tmp_path / "index"
    shutil.copytree(built[0], out)
    before = _row_set(out)
    second = tmp_path / "second"
    second.mkdir()
    shutil.copy(archive / "imagesTr" / "liver_0.nii.gz", second / "liver_0.nii.gz")  # same content, new path
    shutil.copytree(next((synth_archive / "dicom").iterdir()), second / "dicom_patient")
    s = index_source(second, model_dir, out, shard_volumes=3)
    assert s.duplicates_skipped == 1 and s.volumes_indexed == 1
    assert len(s.shards_added) == 1
    rows = _row_set(out)
    assert before < rows and len(rows - before) == 64


def test_cli_index_and_search_json(built, archive, model_dir, tmp_path):
    out = built[0]
    runner = CliRunner()
    r = runner.invoke(app, ["search", str(out), "liver_2:20", "-k", "4", "--json"])
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)
    assert len(hits) == 4 and [h["rank"] for h in hits] == [1, 2, 3, 4]
    for key in ("rank", "score", "volume_id", "patient_id", "study_id", "slice_index", "z_mm", "path"):
        assert all(key in h for h in hits)
    assert (hits[0]["volume_id"], hits[0]["slice_index"]) == ("liver_2", 20)
    p = hits[0]["patient_id"]
    r = runner.invoke(app, ["search", str(out), "liver_2:20", "-k", "20", "--exclude-patient", p, "--json"])
    assert r.exit_code == 0 and all(h["patient_id"] != p for h in json.loads(r.stdout))
    r = runner.invoke(app, ["search", str(out), "nope:3", "--json"])
    assert r.exit_code == 1 and "nope:3" in r.output
    r = runner.invoke(app, ["index", str(archive), "--model", str(model_dir), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rows_added"] == 0
    r = runner.invoke(app, ["index", str(archive), "--model", str(model_dir), "--out", str(out)])
    assert r.exit_code == 0 and "8 of 8 volumes already indexed" in r.stderr, r.output  # a rerun says so


def test_other_model_is_refused(built, archive, tmp_path):
    other = tmp_path / "other"
    cfg = ModelConfig(backbone="tiny", image_size=64)
    torch.manual_seed(1)
    save_encoder(build_encoder(cfg), cfg, other)
    r = CliRunner().invoke(app, ["index", str(archive), "--model", str(other), "--out", str(built[0])])
    assert r.exit_code == 1 and "another model" in r.output


def test_cli_index_of_nothing_usable_fails_with_one_line(model_dir, ray_session, tmp_path):
    bad = tmp_path / "scan.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    out = tmp_path / "index"
    r = CliRunner().invoke(app, ["index", str(bad), "--model", str(model_dir), "--out", str(out), "--json"])
    assert r.stdout == "" and error_line(r) == (
        f"error: {bad}: no volume could be indexed (1 failed, 0 unreadable files; see {out / 'errors.parquet'})"
    )
    assert pq.read_table(out / "errors.parquet").column("path").to_pylist() == [str(bad)]


def test_the_reading_stage_never_imports_torch(synth_archive):
    """CPU workers that read volumes, and preprocess them for a CPU model, must not pay torch's
    import (seconds, and ~450 MB per worker)."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from ctsearch.config import ModelConfig\n"
        "from ctsearch.jobs.index import read_volume_rows, resolve_source\n"
        "tasks, _ = resolve_source(sys.argv[1])\n"
        "task = {**tasks[0], 'order': 0, 'shard': 0, 'size': 0, 'mtime_ns': 0}\n"
        "batch = {k: np.asarray([v], dtype=object) for k, v in task.items()}\n"
        "slabs = list(read_volume_rows(batch, set(), config=ModelConfig(image_size=48).to_json()))\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print(sum(len(s['pixels']) for s in slabs), slabs[0]['n_rows'][0], slabs[0]['pixels'].shape[1:])\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(synth_archive / "nifti")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows, n_rows, shape = r.stdout.split(maxsplit=2)
    assert rows == n_rows and int(rows) > 0 and shape.strip() == "(1, 48, 48)"


def test_slabs_cover_every_slice_and_the_actor_preprocesses_them_alike(synth_archive, model_dir, ray_session):
    """Volumes leave the reading stage in slabs; the GPU path (HU rows preprocessed inside the
    embedding actor, here on the CPU) gives the same embeddings as the CPU path (pixels made in
    the reading tasks)."""
    from ctsearch.jobs.index import SLAB_SLICES, Embedder, preprocess, read_volume_rows, resolve_source
    from ctsearch.model import load_encoder

    tasks, _ = resolve_source(synth_archive / "nifti")
    task = {**tasks[0], "order": 0, "shard": 0, "size": 0, "mtime_ns": 0}
    slabs = list(read_volume_rows({k: np.asarray([v], dtype=object) for k, v in task.items()}, set()))
    n = int(slabs[0]["n_rows"][0])
    assert len(slabs) == -(-n // SLAB_SLICES) > 1
    assert np.concatenate([s["slice_index"] for s in slabs]).tolist() == list(range(n))
    _, config = load_encoder(model_dir)
    embed = Embedder(str(model_dir), threads=1)
    slab = slabs[1]
    on_actor = embed(dict(slab))["embedding"]
    in_tasks = embed(preprocess(dict(slab), config.to_json()))["embedding"]
    assert on_actor.shape == (len(slab["path"]), config.embedding_dim)
    np.testing.assert_allclose(on_actor, in_tasks, atol=1e-6)
    assert np.allclose(np.linalg.norm(on_actor, axis=1), 1.0, atol=1e-5)


def test_the_embedding_actor_used_outside_ray_connects_to_nothing(model_dir):
    """Embedder and read_volume_rows are plain callables too: outside Ray they record no node and
    never try to reach the cluster RAY_ADDRESS names (here an unreachable one)."""
    import os
    import subprocess
    import sys

    code = (
        "import numpy as np, sys\n"
        "from ctsearch.jobs.index import Embedder\n"
        "e = Embedder(sys.argv[1], threads=1)\n"
        "b = {'pixels': np.zeros((2, 1, 64, 64), np.float32), 'status': np.array(['indexed', 'error'], dtype=object)}\n"
        "out = e(b)\n"
        "print(out['embedding'].shape, list(out['embed_node']), bool(out['embedding'][1].any()))\n"
    )
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    r = subprocess.run(
        [sys.executable, "-c", code, str(model_dir)], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "(2, 128) ['', ''] False"
