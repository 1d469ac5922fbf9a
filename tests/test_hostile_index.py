"""Damaged index and model state: one line naming the file, never a traceback or a wrong answer.

The index here is built with IndexWriter directly (no Ray): two flat shards of seeded random
vectors, with the session's tiny model copied in as `ctsearch index` does.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import error_line, random_volume
from typer.testing import CliRunner

from ctsearch.cli.main import app
from ctsearch.errors import CTSearchInputError
from ctsearch.index import IndexWriter
from ctsearch.io import write_nifti
from ctsearch.model import ModelConfig, build_encoder, load_encoder, save_encoder

CFG = ModelConfig(backbone="tiny", image_size=64, model_id="tiny-untrained")


def build_index(root, model_dir, shards=2, per_shard=6):
    rng = np.random.default_rng(0)
    with IndexWriter.create(root, CFG, model_dir) as w:
        for s in range(shards):
            rows = [dict(volume_id=f"v{s}", patient_id=f"p{s}", slice_index=i) for i in range(per_shard)]
            vols = [
                dict(
                    entry=f"v{s}.nii.gz",
                    path=f"v{s}.nii.gz",
                    volume_id=f"v{s}",
                    series_id=f"v{s}",
                    content_hash=f"h{s}",
                    size=1,
                    mtime_ns=0,
                    n_slices=per_shard,
                    status="indexed",
                )
            ]
            w.commit_shard(rows, rng.standard_normal((per_shard, CFG.embedding_dim)), vols, [])
    return root


@pytest.fixture
def index(tmp_path, model_dir):
    return build_index(tmp_path / "idx", model_dir)


@pytest.fixture(scope="module")
def query(tmp_path_factory):
    p = tmp_path_factory.mktemp("q") / "q.nii.gz"
    write_nifti(random_volume((3, 64, 64)), p)
    return p


def other_model(path, seed=1):
    torch.manual_seed(seed)
    return save_encoder(build_encoder(CFG), CFG, path)


def search(index, query, *extra):
    return CliRunner().invoke(app, ["search", str(index), str(query), *extra])


def test_intact_index_searches_and_verifies(index, query):
    r = search(index, query, "--json")
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)) == 5
    r = CliRunner().invoke(app, ["verify", str(index)])
    assert r.exit_code == 0 and "every file matches" in r.stdout, r.output


# --- encoders that are not the ones recorded: the worst failure is a confident wrong answer


def test_replaced_index_encoder_refuses_search_extend_and_verify(index, query, model_dir, tmp_path):
    other = other_model(tmp_path / "other")
    shutil.copy(other / "encoder.safetensors", index / "model" / "encoder.safetensors")
    line = error_line(search(index, query))
    assert str(index / "model" / "encoder.safetensors") in line and "sha256" in line
    with pytest.raises(CTSearchInputError, match="sha256 recorded in index.json"):
        IndexWriter.open(index, CFG, model_dir)
    r = CliRunner().invoke(app, ["verify", str(index)])
    assert r.exit_code == 1 and "damaged:" in r.stdout and "encoder.safetensors" in r.stdout


def test_whole_model_folder_swapped_is_caught_by_index_json(index, query, tmp_path):
    # model.json and weights agree with each other; only index.json knows they are not the index's.
    other = other_model(tmp_path / "other")
    for f in ("model.json", "encoder.safetensors"):
        shutil.copy(other / f, index / "model" / f)
    line = error_line(search(index, query))
    assert "index.json" in line and "encoder.safetensors" in line


def test_run_dir_with_replaced_weights_is_refused(tmp_path):
    run = other_model(tmp_path / "run", seed=2)
    shutil.copy(other_model(tmp_path / "x", seed=3) / "encoder.safetensors", run / "encoder.safetensors")
    with pytest.raises(CTSearchInputError, match="model.json"):
        load_encoder(run)


# --- damaged files: (what to do to the index, the file the one line must name)


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _model_json(index, **change):
    p = index / "model" / "model.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **change}))
    return p


DAMAGE = {
    "index_json_truncated": lambda i: (_truncate(i / "index.json"), i / "index.json")[1],
    "index_json_not_object": lambda i: ((i / "index.json").write_text("[1, 2]"), i / "index.json")[1],
    "index_json_no_shards": lambda i: (
        (i / "index.json").write_text(
            json.dumps({k: v for k, v in json.loads((i / "index.json").read_text()).items() if k != "shards"})
        ),
        i / "index.json",
    )[1],
    "faiss_missing": lambda i: (
        (i / "faiss" / "shard-00001.faiss").unlink(),
        i / "faiss" / "shard-00001.faiss",
    )[1],
    "faiss_truncated": lambda i: (
        _truncate(i / "faiss" / "shard-00000.faiss"),
        i / "faiss" / "shard-00000.faiss",
    )[1],
    "embeddings_truncated": lambda i: (
        _truncate(i / "embeddings" / "shard-00000.parquet"),
        i / "embeddings" / "shard-00000.parquet",
    )[1],
    "embeddings_missing": lambda i: (
        (i / "embeddings" / "shard-00001.parquet").unlink(),
        i / "embeddings" / "shard-00001.parquet",
    )[1],
    "encoder_truncated": lambda i: (
        _truncate(i / "model" / "encoder.safetensors"),
        i / "model" / "encoder.safetensors",
    )[1],
    "model_json_not_object": lambda i: (
        (i / "model" / "model.json").write_text('"tiny"'),
        i / "model" / "model.json",
    )[1],
    "model_json_other_backbone": lambda i: _model_json(i, backbone="resnet9000"),
    "model_json_impossible_size": lambda i: _model_json(i, image_size=0),
    "model_json_reversed_window": lambda i: _model_json(i, wide=[300, -200]),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_index_gives_one_line_naming_the_file(index, query, case):
    culprit = DAMAGE[case](index)
    line = error_line(search(index, query))
    assert str(culprit) in line, line
    r = CliRunner().invoke(app, ["verify", str(index)])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert str(culprit) in r.output, r.output


def test_truncated_encoder_in_a_run_dir_is_one_line(tmp_path):
    run = other_model(tmp_path / "run")
    m = json.loads((run / "model.json").read_text())
    del m[
        "encoder_sha256"
    ]  # an older run folder: no record to compare with, the load itself must fail cleanly
    (run / "model.json").write_text(json.dumps(m))
    _truncate(run / "encoder.safetensors")
    with pytest.raises(CTSearchInputError, match="encoder.safetensors"):
        load_encoder(run)


def test_model_json_naming_another_backbone_than_its_weights(tmp_path):
    run = other_model(tmp_path / "run")
    m = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**m, "backbone": "resnet18"}))
    with pytest.raises(CTSearchInputError, match="not a resnet18 encoder"):
        load_encoder(run)


# --- bounds


def test_empty_index_searched_is_one_line(tmp_path, model_dir, query):
    IndexWriter.create(tmp_path / "idx", CFG, model_dir).close()
    assert "holds no slices" in error_line(search(tmp_path / "idx", query))


@pytest.mark.parametrize("k", ["0", "-3"])
def test_zero_or_negative_k_is_a_usage_error(index, query, k):
    r = search(index, query, "-k", k)
    assert r.exit_code == 2 and "Traceback" not in r.output and "-k" in r.output, r.output


def test_absurd_k_returns_every_row_and_says_so(index, query):
    r = search(index, query, "-k", str(10**15), "--json")
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)) == 12
    assert "12 slices" in r.stderr


def test_corrupt_manifest_is_one_line_and_leaves_no_index_folder(tmp_path, model_dir):
    from ctsearch.jobs.index import index_source

    manifest = tmp_path / "manifest.parquet"
    manifest.write_bytes(b"PAR1" + b"\0" * 64)  # a parquet file cut short
    with pytest.raises(CTSearchInputError, match="not a readable parquet file") as info:
        index_source(manifest, model_dir, tmp_path / "idx")
    assert info.value.path == str(manifest)
    assert not (tmp_path / "idx").exists()


def test_extending_an_index_with_a_damaged_volumes_table_names_it(index, model_dir):
    _truncate(index / "volumes" / "shard-00000.parquet")
    with pytest.raises(CTSearchInputError, match="not a readable parquet file") as info:
        IndexWriter.open(index, CFG, model_dir)
    assert info.value.path.endswith("volumes/shard-00000.parquet")


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_reranking_vectors_of_an_ivfpq_shard_name_the_file(tmp_path, model_dir, query, damage):
    root = tmp_path / "idx"
    n = 1100  # the fewest an IVF-PQ shard trains on is 1024
    rows = [dict(volume_id=f"v{i // 50}", patient_id=f"p{i // 100}", slice_index=i % 50) for i in range(n)]
    vols = [dict(entry="v", path="v", volume_id="v", series_id="v", content_hash="h", size=1, mtime_ns=0,
                 n_slices=n, status="indexed")]  # fmt: skip
    with IndexWriter.create(root, CFG, model_dir, ann_threshold=1024) as w:
        w.commit_shard(rows, np.random.default_rng(1).standard_normal((n, CFG.embedding_dim)), vols, [])
    vectors = root / "faiss" / "shard-00000.vectors.npy"
    assert vectors.exists() and search(root, query).exit_code == 0
    if damage == "truncated":
        _truncate(vectors, 0.3)
    else:
        vectors.unlink()
    assert str(vectors) in error_line(search(root, query))
    r = CliRunner().invoke(app, ["verify", str(root)])
    assert r.exit_code == 1 and str(vectors) in r.stdout, r.output
