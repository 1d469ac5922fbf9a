"""ctsearch explain: dataset mode (Ray job) and index mode (query + top-k, pair maps) on synthetic data."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from ctsearch.cli.main import app
from ctsearch.errors import CTSearchInputError
from ctsearch.store import read_slices


def test_explain_dataset_writes_maps_overlays_and_rr(slice_dataset, model_dir, ray_session, tmp_path):
    from ctsearch.jobs.explain import read_explanations

    out = tmp_path / "expl"
    r = CliRunner().invoke(
        app,
        [
            "explain",
            str(slice_dataset),
            "--model",
            str(model_dir),
            "--masks",
            "24",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    test = read_slices(slice_dataset / "test.parquet")
    assert summary["slices"] == len(test) and summary["errors"] == 0
    d = read_explanations(out / "explanations.parquet")
    assert d["importance"].shape == (len(test), 64, 64) and np.all(np.isfinite(d["importance"]))
    assert np.all(d["uncertainty"] >= 0) and np.all(d["masks_used"] == 24)
    liver = d["label"] == 1
    # RR exactly where a liver mask exists, in [0, 1]; its mean is what the summary reports.
    rr = np.array([np.nan if x is None else x for x in d["rr"]], float)
    assert liver.any() and np.all(np.isnan(rr[~liver]))
    assert np.all((rr[liver] >= 0) & (rr[liver] <= 1))
    assert summary["rr_mean"] == pytest.approx(np.nanmean(rr))
    for png in d["png"]:
        img = Image.open(out / png)
        assert img.size == (768, 256) and img.mode == "RGB"
    assert pq.read_table(out / "errors.parquet").num_rows == 0


def test_explain_dataset_bad_rows_go_to_errors(slice_dataset, model_dir, ray_session, tmp_path):
    from ctsearch.jobs.explain import ExplainOptions, explain_dataset

    t = pq.read_table(slice_dataset / "test.parquet")
    hu = t.column("hu").to_pylist()
    hu[0] = hu[0][:10]  # truncated pixels
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(
        t.set_column(t.schema.get_field_index("hu"), "hu", [hu]).cast(t.schema), bad / "test.parquet"
    )
    s = explain_dataset(bad, model_dir, tmp_path / "o", options=ExplainOptions(num_masks=8, render_png=False))
    errs = pq.read_table(tmp_path / "o" / "errors.parquet").to_pylist()
    assert s["errors"] == 1 and s["slices"] == t.num_rows - 1
    assert "undecodable" in errs[0]["error"] and errs[0]["stage"] == "explain"


def test_explain_needs_query_or_model(tmp_path):
    r = CliRunner().invoke(app, ["explain", str(tmp_path)])
    assert r.exit_code == 1 and "QUERY" in r.output


def test_a_bad_precision_is_one_line_and_writes_nothing(slice_dataset, model_dir, tmp_path):
    out = tmp_path / "expl"
    r = CliRunner().invoke(
        app,
        ["explain", str(slice_dataset), "--model", str(model_dir), "--out", str(out), "--precision", "fp8"],
    )
    assert r.exit_code == 1 and "--precision must be one of" in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_explain_query_and_top_k(synth_archive, model_dir, ray_session, tmp_path):
    from ctsearch.jobs.index import index_source

    idx = tmp_path / "idx"
    index_source(synth_archive / "nifti", model_dir, idx)
    vol = sorted((synth_archive / "nifti" / "imagesTr").glob("*.nii*"))[0]
    out = tmp_path / "q"
    r = CliRunner().invoke(
        app,
        [
            "explain",
            str(idx),
            str(vol),
            "--slice",
            "20",
            "-k",
            "2",
            "--masks",
            "16",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert len(res["hits"]) == 2 and res["query"]["slice_index"] == 20
    z = np.load(out / "maps.npz")
    assert z["importance"].shape == (3, 64, 64) and z["pair_query_importance"].shape == (2, 64, 64)
    assert z["pair_hit_importance"].shape == (2, 64, 64)
    assert not np.allclose(z["pair_query_importance"][0], z["importance"][0])
    # One tile per slice at the model's input size (64 px here), query + 2 hits, 4 px apart.
    assert Image.open(out / "explanation.png").size == (3 * 64 + 2 * 4, 4 * 64 + 3 * 4)
    # The query's own slice in another volume of its patient is the natural top hit; excluding the
    # patient makes the explanation about other people's anatomy.
    own = res["query"]["patient_id"]
    r = CliRunner().invoke(
        app,
        [
            "explain",
            str(idx),
            str(vol),
            "--slice",
            "20",
            "-k",
            "2",
            "--masks",
            "8",
            "--exclude-patient",
            own,
            "--no-png",
            "--out",
            str(tmp_path / "q2"),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)["hits"]
    assert len(hits) == 2 and all(h["patient_id"] != own for h in hits)


def test_explain_dataset_killed_and_rerun_finishes_without_redoing(
    slice_dataset, model_dir, ray_session, tmp_path, monkeypatch
):
    from ctsearch.jobs import explain as job

    opts = lambda: job.ExplainOptions(num_masks=8, render_png=False)  # noqa: E731
    monkeypatch.setattr(job, "PART_ROWS", 4)
    flush, calls = job._PartWriter.flush, []

    def dying_flush(self):
        flush(self)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job is killed right after its second commit

    monkeypatch.setattr(job._PartWriter, "flush", dying_flush)
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        job.explain_dataset(slice_dataset, model_dir, out, options=opts())
    committed = pq.read_table(out / "parts").num_rows
    assert committed >= 8 and not (out / "explanations.parquet").exists()

    monkeypatch.setattr(job._PartWriter, "flush", flush)
    progress = []
    s = job.explain_dataset(
        slice_dataset, model_dir, out, options=opts(), on_slice=lambda d, t: progress.append((d, t))
    )
    n = pq.read_metadata(slice_dataset / "test.parquet").num_rows
    assert s["resumed_with"] == committed and s["slices"] == n and s["errors"] == 0
    assert progress[0] == (committed, n) and progress[-1] == (n, n)
    assert not list((out / "parts").iterdir())
    resumed = job.read_explanations(out / "explanations.parquet")
    keys = list(zip(resumed["volume_id"], resumed["slice_index"]))
    assert len(set(keys)) == n

    job.explain_dataset(
        slice_dataset, model_dir, tmp_path / "w", options=opts()
    )  # the same job, never killed
    whole = job.read_explanations(tmp_path / "w" / "explanations.parquet")
    assert list(zip(whole["volume_id"], whole["slice_index"])) == keys
    np.testing.assert_allclose(resumed["importance"], whole["importance"], atol=1e-5)

    again = job.explain_dataset(slice_dataset, model_dir, out, options=opts())  # complete: nothing left to do
    assert again["resumed_with"] == n and again["slices"] == n
    with pytest.raises(CTSearchInputError, match="another relax"):
        job.explain_dataset(
            slice_dataset, model_dir, out, options=job.ExplainOptions(num_masks=16, render_png=False)
        )
    moved = tmp_path / "moved"  # the same dataset file under another folder, with one slice fewer
    moved.mkdir()
    t = pq.read_table(slice_dataset / "test.parquet")
    pq.write_table(t.slice(1), moved / "test.parquet")
    with pytest.raises(CTSearchInputError, match="another dataset, dataset_sha256"):
        job.explain_dataset(moved, model_dir, out, options=opts())


def test_explain_folder_has_one_writer(slice_dataset, model_dir, tmp_path):
    from ctsearch.jobs.explain import ExplainOptions, explain_dataset
    from ctsearch.store import lock_dir

    with lock_dir(tmp_path / "o", "`ctsearch explain`"):
        with pytest.raises(CTSearchInputError, match="another `ctsearch explain` is writing to this folder"):
            explain_dataset(slice_dataset, model_dir, tmp_path / "o", options=ExplainOptions(num_masks=8))


def test_killed_while_folding_parts_then_rerun_keeps_one_row_per_slice(tmp_path):
    """Killed after explanations.parquet was rewritten with the parts, before the parts were dropped."""
    import pyarrow as pa

    from ctsearch.jobs import explain as job
    from ctsearch.store import atomic_write_table, errors_table

    def row(i):
        return dict(volume_id="v", patient_id="p", slice_index=i, label=0, map_size=1, importance=b"\0" * 4,
                    uncertainty=b"\0" * 4, masks_used=8, mask_pixels=0, rr=None, png=None)  # fmt: skip

    parts = tmp_path / job.PARTS_DIR
    part_rows, err = [row(2), row(3)], [{"path": "d#v:9", "stage": "explain", "error": "bad"}]
    atomic_write_table(
        pa.Table.from_pylist(part_rows, schema=job.EXPLANATIONS_SCHEMA), parts / "expl-00000.parquet"
    )
    atomic_write_table(errors_table(err), parts / "errors-00000.parquet")
    # the finals as the killed fold left them: already holding the parts' rows
    finals = [row(0), row(1), *part_rows]
    atomic_write_table(
        pa.Table.from_pylist(finals, schema=job.EXPLANATIONS_SCHEMA), tmp_path / job.EXPLANATIONS_FILE
    )
    atomic_write_table(errors_table(err), tmp_path / "errors.parquet")
    rows, errors = job._fold_parts(tmp_path)
    assert [r["slice_index"] for r in rows] == [0, 1, 2, 3] and len(errors) == 1
    assert pq.read_table(tmp_path / job.EXPLANATIONS_FILE).num_rows == 4 and not list(parts.iterdir())
