"""FAISS shards and search without Ray: exact vs ANN, merging across shards, filters, commits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import SimulatedCrash, crash_index_writer

from ctsearch.crossexam import cross_exam
from ctsearch.errors import CTSearchInputError
from ctsearch.index import (
    Index,
    IndexWriter,
    build_faiss,
    l2_normalize,
    merge_topk,
    search_shard,
    torch_topk,
)
from ctsearch.model import ModelConfig

CFG = ModelConfig(backbone="tiny", image_size=64)  # D = 128


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """FAISS's OpenMP threads spin against each other on a busy 2-core box (10x slower builds)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def clustered(n: int, d: int, clusters: int, seed: int, spread: float = 0.35) -> np.ndarray:
    """Unit vectors around random cluster centres: neighbours that mean something, like real embeddings."""
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.standard_normal((clusters, d)))
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d)) / np.sqrt(d)
    return l2_normalize(x)


def exact_topk(db: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :k]


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def rows_for(n: int, patient_of=lambda i: f"p{i % 7}", volume_of=lambda i: f"v{i // 50}") -> list[dict]:
    return [
        dict(
            volume_id=volume_of(i),
            patient_id=patient_of(i),
            study_id=f"s{i // 50}",
            series_id=volume_of(i),
            exam_date=None,
            slice_index=i % 50,
            z_mm=float(i % 50) * 2.5,
            path=f"{volume_of(i)}.nii.gz",
        )
        for i in range(n)
    ]


def volumes_for(rows: list[dict]) -> list[dict]:
    vids = sorted({r["volume_id"] for r in rows})
    return [
        dict(
            entry=v,
            path=f"{v}.nii.gz",
            volume_id=v,
            series_id=v,
            content_hash=v,
            size=1,
            mtime_ns=0,
            n_slices=sum(r["volume_id"] == v for r in rows),
            status="indexed",
        )
        for v in vids
    ]


def make_index(path, vectors, rows, shard_sizes, **kw) -> Index:
    w = IndexWriter.open(path, CFG, **kw)
    start = 0
    for size in shard_sizes:
        part = rows[start : start + size]
        w.commit_shard(part, vectors[start : start + size], volumes_for(part), errors=[])
        start += size
    return Index.open(path)


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_ann_agrees_with_exact_search(kind):
    db = clustered(20_000, 128, clusters=400, seed=0)
    q = clustered(200, 128, clusters=400, seed=0)[:200] + 0.0
    q = l2_normalize(q + 0.05 * np.random.default_rng(1).standard_normal(q.shape) / np.sqrt(128))
    index, params = build_faiss(db, kind)
    exact = db if kind == "ivfpq" else None
    scores, ids = search_shard(index, kind, params, exact, q, 5)
    truth = exact_topk(db, q, 5)
    assert recall_at(ids, truth) >= 0.95
    # the scores returned are exact inner products of the hits
    np.testing.assert_allclose(scores, np.take_along_axis(q @ db.T, ids, axis=1), atol=1e-4)


def test_merge_across_shards_equals_one_exact_search(tmp_path):
    db = clustered(1_000, 128, clusters=30, seed=2)
    idx = make_index(tmp_path / "i", db, rows_for(1_000), [300, 450, 250])
    q = clustered(20, 128, clusters=30, seed=3)
    res = idx.search(q, k=7)
    offsets = np.cumsum([0, 300, 450])
    global_ids = offsets[res.shard] + res.row
    truth = exact_topk(db, q, 7)
    np.testing.assert_allclose(res.scores, np.take_along_axis(q @ db.T, truth, axis=1), atol=1e-5)
    assert recall_at(global_ids, truth) == 1.0


def test_merge_topk_pads_missing_hits():
    s, sh, ii = merge_topk(
        [np.array([[0.9, -np.inf]], np.float32), np.array([[0.95]], np.float32)],
        [np.array([[4, -1]]), np.array([[2]])],
        k=4,
    )
    assert sh.tolist() == [[1, 0, -1, -1]] and ii.tolist() == [[2, 4, -1, -1]]
    assert np.isneginf(s[0, 2:]).all()


def test_self_search_and_row_metadata(tmp_path):
    db = clustered(600, 128, clusters=20, seed=4)
    rows = rows_for(600)
    idx = make_index(tmp_path / "i", db, rows, [200, 400])
    v, meta = idx.lookup("v7", 13)
    assert meta == {k: rows[7 * 50 + 13][k] for k in meta}
    hit = idx.search(v, k=3).hits[0][0]
    assert (hit["volume_id"], hit["slice_index"], hit["rank"]) == ("v7", 13, 1)
    assert hit["score"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(Exception, match="no row v99:1"):
        idx.lookup("v99", 1)


@pytest.mark.parametrize("threshold", [10**9, 1_500])  # all flat / ANN shards
def test_patient_filters_are_never_violated(tmp_path, threshold):
    db = clustered(4_000, 128, clusters=50, seed=5)
    idx = make_index(tmp_path / "i", db, rows_for(4_000), [2_000, 2_000], ann_threshold=threshold)
    assert {s.kind for s in idx.shards} == ({"flat"} if threshold > 4_000 else {"ivfpq"})
    q = db[:10]  # each query's own patient holds its best match
    res = idx.search(q, k=30, exclude_patient="p0")
    assert all(len(h) == 30 and all(x["patient_id"] != "p0" for x in h) for h in res.hits)
    only = idx.search(q, k=30, patient="p3")
    assert all(len(h) == 30 and all(x["patient_id"] == "p3" for x in h) for h in only.hits)
    assert idx.search(q, k=5, patient="nobody").hits == [[]] * 10


def test_float16_index_scores_close_to_float32(tmp_path):
    db = clustered(500, 128, clusters=10, seed=6)
    a = make_index(tmp_path / "a", db, rows_for(500), [500])
    b = make_index(tmp_path / "b", db, rows_for(500), [500], dtype="float16")
    q = db[:5]
    np.testing.assert_allclose(a.search(q, 5).scores, b.search(q, 5).scores, atol=2e-3)
    assert (tmp_path / "b" / "embeddings" / "shard-00000.parquet").stat().st_size < 0.6 * (
        tmp_path / "a" / "embeddings" / "shard-00000.parquet"
    ).stat().st_size


def test_compaction_merges_flat_shards_into_one_ann_shard(tmp_path):
    db = clustered(3_000, 128, clusters=60, seed=7)
    rows = rows_for(3_000)
    w = IndexWriter.open(tmp_path / "i", CFG, ann_threshold=2_500)
    for a in range(0, 3_000, 1_000):
        w.commit_shard(rows[a : a + 1_000], db[a : a + 1_000], volumes_for(rows[a : a + 1_000]), errors=[])
    before = Index.open(tmp_path / "i").search(db[:50], k=5)
    name = w.compact()
    idx = Index.open(tmp_path / "i")
    assert [s.name for s in idx.shards] == [name] and idx.shards[0].kind == "ivfpq"
    assert len(idx) == 3_000 and idx.shards[0].volumes == 60
    assert sorted(f.name for f in (tmp_path / "i" / "embeddings").iterdir()) == [f"{name}.parquet"]
    after = idx.search(db[:50], k=5)
    key = lambda r: [{(h["volume_id"], h["slice_index"]) for h in q} for q in r.hits]  # noqa: E731
    assert np.mean([len(a & b) / 5 for a, b in zip(key(after), key(before))]) >= 0.95


def test_a_reader_opened_before_compaction_searches_the_new_commit(tmp_path):
    db = clustered(3_000, 128, clusters=60, seed=7)
    rows = rows_for(3_000)
    with IndexWriter.open(tmp_path / "i", CFG, ann_threshold=2_500) as w:
        for a in range(0, 3_000, 1_000):
            w.commit_shard(
                rows[a : a + 1_000], db[a : a + 1_000], volumes_for(rows[a : a + 1_000]), errors=[]
            )
        reader = Index.open(tmp_path / "i")  # a long-lived reader: shard files load on first search
        w.compact()  # removes the three flat shards' files
    res = reader.search(db[:20], k=5)
    assert [s.kind for s in reader.shards] == ["ivfpq"]
    fresh = Index.open(tmp_path / "i").search(db[:20], k=5)
    assert np.array_equal(res.row, fresh.row) and np.allclose(res.scores, fresh.scores)
    assert reader.refresh() is False  # nothing new since


def test_crash_between_files_and_commit_leaves_the_old_index(tmp_path, monkeypatch):
    db = clustered(200, 128, clusters=5, seed=8)
    rows = rows_for(200)
    w = IndexWriter.open(tmp_path / "i", CFG)
    w.commit_shard(rows[:100], db[:100], volumes_for(rows[:100]), errors=[])
    with monkeypatch.context() as m:
        crash_index_writer(m, "files", 1)
        with pytest.raises(SimulatedCrash):
            w.commit_shard(rows[100:], db[100:], volumes_for(rows[100:]), errors=[])
    assert (tmp_path / "i" / "embeddings" / "shard-00001.parquet").exists()  # written, never committed
    assert len(Index.open(tmp_path / "i")) == 100
    w.close()  # what the crashed process's exit does to its lock
    w2 = IndexWriter.open(tmp_path / "i", CFG)  # the next writer removes the leftovers
    assert not (tmp_path / "i" / "embeddings" / "shard-00001.parquet").exists()
    assert w2.commit_shard(rows[100:], db[100:], volumes_for(rows[100:]), errors=[]) == "shard-00001"
    assert len(Index.open(tmp_path / "i")) == 200
    assert json.loads((tmp_path / "i" / "index.json").read_text())["volumes"] == 4


@pytest.mark.parametrize("point", ["files", "commit"])
def test_killed_during_compaction_then_rerun_gives_the_uninterrupted_index(tmp_path, monkeypatch, point):
    """files: the merged shard is written, index.json not yet; commit: index.json lists the merged
    shard, the flat shards' files are not yet removed. Either way the next writer finishes the job."""
    from ctsearch.index.verify import verify_index

    db = clustered(900, 128, clusters=9, seed=10)
    rows = rows_for(900)

    def build(root):
        w = IndexWriter.open(root, CFG, ann_threshold=800, ann="hnsw")
        for a in range(0, 900, 300):
            w.commit_shard(rows[a : a + 300], db[a : a + 300], volumes_for(rows[a : a + 300]), errors=[])
        return w

    with build(tmp_path / "clean") as w:
        w.compact()
    w = build(tmp_path / "i")
    with monkeypatch.context() as m:
        crash_index_writer(m, point, 1)
        with pytest.raises(SimulatedCrash):
            w.compact()
    w.close()  # the killed process's lock goes with it
    assert verify_index(tmp_path / "i") == []  # readable as it stands: the old or the new commit
    with IndexWriter.open(tmp_path / "i", CFG, ann_threshold=800, ann="hnsw") as w2:
        w2.compact()  # a rerun compacts again (after files) or finds nothing left to merge (after commit)
    assert verify_index(tmp_path / "i") == []
    a, b = Index.open(tmp_path / "i"), Index.open(tmp_path / "clean")
    assert [s.kind for s in a.shards] == ["hnsw"] and len(a) == len(b) == 900
    names = {s.name for s in a.shards}
    for sub in ("embeddings", "volumes", "errors"):  # no leftovers of the merged or the flat shards
        assert {f.stem for f in (tmp_path / "i" / sub).glob("shard-*.parquet")} == names
    ra, rb = a.search(db[:20], k=5), b.search(db[:20], k=5)
    assert [[(h["volume_id"], h["slice_index"]) for h in q] for q in ra.hits] == [
        [(h["volume_id"], h["slice_index"]) for h in q] for q in rb.hits
    ]


def test_torch_exact_search_matches_faiss(tmp_path):
    """The device='cuda' code path (torch matmul), run here on CPU tensors."""
    db = clustered(800, 128, clusters=20, seed=9)
    idx = make_index(tmp_path / "i", db, rows_for(800), [800])
    q, denied = db[:8], np.arange(0, 800, 7)
    stored = idx.shard_vectors(idx.shards[0])  # what a GPU reader puts on the device
    s_f, i_f = search_shard(build_faiss(stored, "flat")[0], "flat", {}, None, q, 5, denied=denied)
    s_t, i_t = torch_topk(q, torch.from_numpy(np.ascontiguousarray(stored)), 5, None, denied)
    np.testing.assert_allclose(s_t, s_f, atol=1e-5)
    assert (i_t == i_f).all()


def test_cross_exam_finds_the_same_level_in_the_other_exam(tmp_path):
    """Two exams of one patient: slice i of exam 1 and slice i+3 of exam 2 show the same anatomy."""
    rng = np.random.default_rng(1)
    anatomy = l2_normalize(rng.standard_normal((40, 128)))
    e1 = l2_normalize(anatomy[:30] + 0.1 * rng.standard_normal((30, 128)) / np.sqrt(128))
    e2 = l2_normalize(anatomy[3:33] + 0.1 * rng.standard_normal((30, 128)) / np.sqrt(128))
    other = clustered(30, 128, 3, seed=2)
    rows = (
        [
            dict(
                volume_id="e1",
                patient_id="p",
                study_id="s1",
                series_id="e1",
                exam_date="2020-01-01",
                slice_index=i,
                z_mm=2.0 * i,
                path="e1",
            )
            for i in range(30)
        ]
        + [
            dict(
                volume_id="e2",
                patient_id="p",
                study_id="s2",
                series_id="e2",
                exam_date="2021-01-01",
                slice_index=i,
                z_mm=2.0 * i + 100,
                path="e2",
            )
            for i in range(30)
        ]
        + [
            dict(
                volume_id="o",
                patient_id="q",
                study_id="s3",
                series_id="o",
                exam_date=None,
                slice_index=i,
                z_mm=0.0,
                path="o",
            )
            for i in range(30)
        ]
    )
    idx = make_index(tmp_path / "i", np.concatenate([e1, e2, other]), rows, [45, 45])
    exams = cross_exam(idx, e1[10], "p", exclude_volume="e1", per_exam=3, query_slice=10)["exams"]
    assert [e["volume_id"] for e in exams] == ["e2"]
    assert exams[0]["offset_mm"] == pytest.approx(100.0 - 6.0)  # e2's slice i + 3 lies at e1's z + 94 mm
    assert exams[0]["best"]["slice_index"] == 7
    zs = [m["z_mm"] for m in exams[0]["matches"]]
    assert zs == sorted(zs) and len(zs) == 3


def test_torch_topk_rescores_float16_candidates_in_float32():
    """A float16 matmul alone reorders near-ties; re-scoring its candidates in float32 restores them."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 256)).astype(np.float32)
    db = centres[rng.integers(0, 50, 20000)] + 0.05 * rng.normal(size=(20000, 256)).astype(np.float32)
    db16 = (db / np.linalg.norm(db, axis=1, keepdims=True)).astype(np.float16)
    q = db16[:200].astype(np.float32) + 0.01 * rng.normal(size=(200, 256)).astype(np.float32)
    truth = np.argsort(-(q @ db16.astype(np.float32).T), axis=1)[:, :5]

    def recall(ids):
        return np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ids, truth)])

    x = torch.from_numpy(db16)
    plain, rescored = recall(torch_topk(q, x, 5, rescore=0)[1]), recall(torch_topk(q, x, 5)[1])
    assert rescored >= 0.98 and rescored > plain + 0.2


def test_one_writer_at_a_time_and_the_lock_dies_with_the_writer(tmp_path):
    db = clustered(100, 128, clusters=5, seed=10)
    rows = rows_for(100)
    w = IndexWriter.open(tmp_path / "i", CFG)
    with pytest.raises(
        CTSearchInputError, match=f"another `ctsearch index` is writing to this folder \\(pid {os.getpid()}"
    ):
        IndexWriter.open(tmp_path / "i", CFG)
    w.commit_shard(rows, db, volumes_for(rows), errors=[])  # the refused writer deleted nothing
    w.close()
    with pytest.raises(RuntimeError, match="closed"):
        w.commit_shard(rows, db, volumes_for(rows), errors=[])
    with IndexWriter.open(tmp_path / "i", CFG) as w2:
        assert len(Index.open(tmp_path / "i")) == 100 and w2.manifest["shards"][0]["name"] == "shard-00000"
    # A process killed while writing leaves its lock file but not its lock.
    code = (
        f"from ctsearch.index import IndexWriter; from ctsearch.model import ModelConfig; import os; "
        f"IndexWriter.open({str(tmp_path / 'i')!r}, ModelConfig(backbone='tiny', image_size=64)); os._exit(9)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    IndexWriter.open(tmp_path / "i", CFG).close()
