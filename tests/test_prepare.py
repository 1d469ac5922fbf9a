"""ctsearch prepare: manifest, errors table, and the paper's slice protocol."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
from conftest import random_volume
from typer.testing import CliRunner

from ctsearch.cli.main import app
from ctsearch.io import write_nifti
from ctsearch.prepare import prepare, select_slices
from ctsearch.store import read_slices


def _decathlon(root, n_volumes: int, nz: int = 20, liver_z=(6, 14)):
    """A minimal Decathlon-layout archive: liver (label 1, tumour 2) on slices liver_z[0]..liver_z[1]-1."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(
        json.dumps({"name": "tiny", "labels": {"0": "background", "1": "liver", "2": "cancer"}})
    )
    for case in range(n_volumes):
        vol = random_volume(
            (nz, 16, 16),
            case,
            (2.0, 0.8, 0.8),
            (0, 0, -20.0 * case),
            hu_range=(-1000, 400),
            patient_id="",
            study_id="",
            series_id="",
            exam_date=None,
        )
        label = np.zeros(vol.hu.shape, np.uint8)
        label[liver_z[0] : liver_z[1], 4:12, 4:12] = 1
        label[liver_z[0] + 2, 6:8, 6:8] = 2
        write_nifti(
            vol,
            root / "imagesTr" / f"liver_{case}.nii.gz",
            label=label,
            label_path=root / "labelsTr" / f"liver_{case}.nii.gz",
        )
    return root


def test_select_slices_counts_and_kinds():
    label = np.zeros((30, 4, 4), np.uint8)
    label[10:14, 1, 1] = 2  # tumour-only slices still count as liver (label > 0)
    liver, other = select_slices(label, 5, np.random.default_rng(0))
    assert liver.tolist() == [10, 11, 12, 13]  # only 4 exist: all of them
    assert len(other) == 5 and not set(other) & set(range(10, 14))
    assert np.all(np.diff(other) > 0)


def test_protocol_split_counts_and_masks(tmp_path):
    archive = _decathlon(tmp_path / "arch", n_volumes=7)
    summary = prepare(archive, tmp_path / "out", protocol="decathlon", per_volume=3, train_volumes=5, seed=1)
    assert summary["volumes"] == 7 and summary["errors"] == 0
    assert (summary["train_volumes"], summary["test_volumes"]) == (5, 2)
    train, test = (
        read_slices(tmp_path / "out" / "train.parquet"),
        read_slices(tmp_path / "out" / "test.parquet"),
    )
    assert (len(train), len(test)) == (30, 12)
    assert sorted(set(train.volume_id)) == [f"liver_{i}" for i in range(5)]
    assert sorted(set(test.volume_id)) == ["liver_5", "liver_6"]
    assert train.hu.dtype == np.int16 and train.hu.shape == (30, 16, 16)
    # label 1 exactly where the mask has liver pixels, and liver slices come from the liver z-range
    assert np.array_equal(train.label == 1, train.mask.reshape(30, -1).any(axis=1))
    assert set(train.slice_index[train.label == 1]) <= set(range(6, 14))
    for split in (train, test):
        for v in set(split.volume_id):
            assert np.sum((split.volume_id == v) & (split.label == 1)) == 3
            assert np.sum((split.volume_id == v) & (split.label == 0)) == 3
    manifest = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert len(manifest) == 7 and all(r["label_path"] for r in manifest)


def test_protocol_is_seeded_and_independent_of_other_volumes(tmp_path):
    def chosen(out):  # (volume_id, slice_index) of both splits, in order
        s = [read_slices(tmp_path / out / f"{split}.parquet") for split in ("train", "test")]
        return [(v, int(i)) for p in s for v, i in zip(p.volume_id, p.slice_index)], s[0].hu

    a = _decathlon(tmp_path / "a", n_volumes=4)
    prepare(a, tmp_path / "o1", protocol="decathlon", per_volume=3, train_volumes=2, seed=3)
    prepare(a, tmp_path / "o2", protocol="decathlon", per_volume=3, train_volumes=2, seed=3)
    b = _decathlon(tmp_path / "b", n_volumes=2)  # the same first two volumes, fewer others
    prepare(b, tmp_path / "o3", protocol="decathlon", per_volume=3, train_volumes=1, seed=3)
    (c1, hu1), (c2, hu2), (c3, _) = (chosen(o) for o in ("o1", "o2", "o3"))
    assert c1 == c2 and np.array_equal(hu1, hu2)
    assert [c for c in c1 if c[0] in ("liver_0", "liver_1")] == c3
    prepare(a, tmp_path / "o4", protocol="decathlon", per_volume=3, train_volumes=2, seed=4)
    assert chosen("o4")[0] != c1


def test_bad_files_land_in_errors_and_the_rest_is_prepared(tmp_path):
    archive = _decathlon(tmp_path / "arch", n_volumes=3)
    (archive / "imagesTr" / "liver_9.nii.gz").write_bytes(b"\x1f\x8b\x08\x00broken")
    (archive / "notes.dcm").write_text("not a dicom file")
    result = CliRunner().invoke(
        app,
        [
            "prepare",
            str(archive),
            str(tmp_path / "out"),
            "--protocol",
            "decathlon",
            "--per-volume",
            "2",
            "--train-volumes",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["volumes"] == 3 and summary["train_slices"] == 8 and summary["test_slices"] == 4
    errors = pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist()
    paths = " ".join(e["path"] for e in errors)
    assert "liver_9.nii.gz" in paths and "notes.dcm" in paths
    assert all(e["error"] for e in errors)


def test_cli_user_errors_are_one_line(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["prepare", str(tmp_path / "nowhere"), str(tmp_path / "out")])
    assert (
        missing.exit_code == 1
        and "no such archive folder" in missing.output
        and "Traceback" not in missing.output
    )
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.nii").write_bytes(b"")
    empty = runner.invoke(app, ["prepare", str(tmp_path / "empty"), str(tmp_path / "out2")])
    assert empty.exit_code == 1 and "no readable volumes" in empty.output
    assert pq.read_table(tmp_path / "out2" / "errors.parquet").num_rows == 1


def test_synthetic_archive_prepares_with_fixture(slice_dataset):
    train, test = read_slices(slice_dataset / "train.parquet"), read_slices(slice_dataset / "test.parquet")
    assert len(set(train.volume_id)) == 6 and len(set(test.volume_id)) == 2
    assert len(train) == 60 and len(test) == 20
    assert train.label.sum() == 30 and test.label.sum() == 10


def test_split_is_by_patient_so_no_patient_is_on_both_sides(tmp_path):
    archive = _decathlon(tmp_path / "a", 6)
    for case in range(6):  # two examinations per patient
        (archive / "imagesTr" / f"liver_{case}.json").write_text(json.dumps({"patient_id": f"P{case // 2}"}))
    # By volume, 3 train volumes would cut patient P1 in two; by patient, P1 goes whole to train.
    summary = prepare(archive, tmp_path / "out", protocol="decathlon", per_volume=2, train_volumes=3)
    train, test = (read_slices(tmp_path / "out" / f"{s}.parquet") for s in ("train", "test"))
    assert set(train.patient_id) == {"P0", "P1"} and set(test.patient_id) == {"P2"}
    assert summary["train_volumes"] == 4 and summary["test_volumes"] == 2
    assert json.loads((tmp_path / "out" / "protocol.json").read_text())["split_by"] == "patient"


def test_an_empty_split_is_refused_before_anything_is_written(tmp_path):
    from conftest import error_line

    archive = _decathlon(tmp_path / "a", 3)
    out = tmp_path / "out"
    # The default --train-volumes 100 on an archive of 3 volumes would leave no test split.
    line = error_line(CliRunner().invoke(app, ["prepare", str(archive), str(out), "--protocol", "decathlon"]))
    assert "leaves the test split empty" in line and "3 labelled volumes of 3 patients" in line
    assert not out.exists()
    line = error_line(
        CliRunner().invoke(
            app, ["prepare", str(archive), str(out), "--protocol", "decathlon", "--train-volumes", "0"]
        )
    )
    assert "train split empty" in line and not out.exists()
