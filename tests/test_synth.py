"""Synthetic phantoms: determinism, label semantics, plausible HU, per-patient variation, exams, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import error_line
from typer.testing import CliRunner

from ctsearch.synth import (
    LIVER,
    NOMINAL_MATRIX,
    TUMOUR,
    exam_geometry,
    max_slices,
    sample_exam,
    sample_patient,
    synth_volume,
)

SIZE = 64


@pytest.fixture(scope="module")
def phantoms():
    """Four patients' first examinations at 64 px."""
    return [synth_volume(seed, size=SIZE, index=seed) for seed in range(4)]


def _liver_rows(label: np.ndarray) -> np.ndarray:
    return np.flatnonzero(label.reshape(label.shape[0], -1).max(axis=1) > 0)


def test_deterministic_given_seed():
    a_vol, a_lab = synth_volume(7, size=48)
    b_vol, b_lab = synth_volume(np.random.default_rng(7), size=48)
    assert np.array_equal(a_vol.hu, b_vol.hu) and np.array_equal(a_lab, b_lab)
    assert np.allclose(a_vol.affine, b_vol.affine) and a_vol.exam_date == b_vol.exam_date
    c_vol, _ = synth_volume(8, size=48)
    assert c_vol.hu.shape != a_vol.hu.shape or not np.array_equal(c_vol.hu, a_vol.hu)


def test_volume_contract(phantoms):
    for vol, label in phantoms:
        assert vol.hu.dtype == np.int16 and label.dtype == np.uint8
        assert vol.hu.shape == label.shape and vol.hu.shape[1:] == (SIZE, SIZE)
        assert vol.hu.shape[0] <= max_slices(SIZE)
        assert set(np.unique(label).tolist()) <= {0, LIVER, TUMOUR}
        assert vol.patient_id.startswith("synth-") and vol.exam_date
        sz, sy, sx = vol.spacing_mm
        assert np.allclose(np.diag(vol.affine)[:3], (sx, sy, sz))
        # Slice 0 is the most inferior: z grows with the index.
        assert np.all(np.diff(vol.z_mm()) > 0)


def test_liver_z_range_contiguous_with_slices_on_both_sides(phantoms):
    for vol, label in phantoms:
        rows = _liver_rows(label)
        assert rows.size >= 5
        assert np.array_equal(rows, np.arange(rows[0], rows[-1] + 1)), (
            "liver slices must be one contiguous run"
        )
        # Negatives from both sides: pelvis/lower abdomen below, thorax above.
        assert rows[0] > 0 and rows[-1] < label.shape[0] - 1
        extent = (rows[-1] - rows[0] + 1) * vol.spacing_mm[0]
        assert 100 <= extent <= 240, f"liver craniocaudal extent {extent:.0f} mm"


def test_liver_tapers_at_dome_and_tip(phantoms):
    """The first and last liver slices hold far less liver than the widest one (hard positives)."""
    for _, label in phantoms:
        rows = _liver_rows(label)
        area = (label[rows] > 0).sum(axis=(1, 2))
        assert area[0] < 0.35 * area.max() and area[-1] < 0.35 * area.max()


def test_tumours_inside_liver_and_hypodense(phantoms):
    seen = 0
    for vol, label in phantoms:
        for k in np.flatnonzero((label == TUMOUR).any(axis=(1, 2))):
            seen += 1
            tum, liv = label[k] == TUMOUR, label[k] > 0
            ys, xs = np.nonzero(tum)
            ly, lx = np.nonzero(liv)
            assert (
                ys.min() >= ly.min()
                and ys.max() <= ly.max()
                and xs.min() >= lx.min()
                and xs.max() <= lx.max()
            )
            # Every tumour pixel touches liver (or more tumour): lesions are embedded, not floating.
            grown = np.zeros_like(liv)
            grown[1:-1, 1:-1] = liv[:-2, 1:-1] | liv[2:, 1:-1] | liv[1:-1, :-2] | liv[1:-1, 2:]
            assert np.all(grown[tum] | ~tum[tum])
        if (label == TUMOUR).sum() > 50:
            assert np.median(vol.hu[label == TUMOUR]) < np.median(vol.hu[label == LIVER]) - 10
    assert seen > 0, "no tumour in the test phantoms: pick other seeds"


def test_hu_ranges_plausible(phantoms):
    for vol, label in phantoms:
        hu = vol.hu
        liver = np.median(hu[label == LIVER])
        assert 50 <= liver <= 150, liver
        top = hu[-3:]  # thorax: lungs inside the body
        body_rows = top[:, SIZE // 3 : 2 * SIZE // 3, SIZE // 8 : -SIZE // 8]
        assert (body_rows < -700).mean() > 0.05
        assert (hu > 500).any(), "bones with hard edges"
        assert ((hu > -140) & (hu < -60)).mean() > 0.02, "fat"
        assert hu.min() >= -3024 and hu.max() <= 3071
        # Organs with liver-like HU outside the liver (spleen, kidneys, heart, vessels).
        liverish = (np.abs(hu.astype(np.int32) - liver) < 25) & (label == 0)
        assert liverish.sum() > 0.3 * (label == LIVER).sum()


def test_per_patient_variation(phantoms):
    spacings = {round(v.spacing_mm[2], 3) for v, _ in phantoms}
    thick = {round(v.spacing_mm[0], 3) for v, _ in phantoms}
    assert len(spacings) > 1 and len(thick) > 1
    liver_hu = [float(np.median(v.hu[lab == LIVER])) for v, lab in phantoms]
    assert max(liver_hu) - min(liver_hu) > 5
    for seed in range(20):
        rng = np.random.default_rng(seed)
        p = sample_patient(rng)
        e = sample_exam(rng, p)
        assert 0.6 <= e.spacing_xy <= 0.9 and 1.0 <= e.thickness <= 5.0
        assert 8 <= e.noise_hu <= 25 and 60 <= e.liver_hu <= 130
        assert 250 <= e.z_top - e.z_bottom <= 600
        spacing, thickness, n = exam_geometry(e, NOMINAL_MATRIX)
        assert spacing == pytest.approx(e.spacing_xy) and n <= max_slices(NOMINAL_MATRIX)
        assert thickness >= e.thickness


def test_second_exam_is_later_same_patient_grown_lesions():
    compared = 0
    for seed in range(6):
        (v1, l1), (v2, l2) = synth_volume(seed, size=SIZE, exams=2)
        assert v1.patient_id == v2.patient_id and v1.study_id != v2.study_id
        assert v2.exam_date > v1.exam_date
        assert v1.z_mm()[0] != v2.z_mm()[0] or v1.hu.shape != v2.hu.shape, "a different scan range"
        t1 = (l1 == TUMOUR).sum() * np.prod(v1.spacing_mm)
        t2 = (l2 == TUMOUR).sum() * np.prod(v2.spacing_mm)
        if t1 > 2000:  # mm^3: big enough that voxelisation cannot hide the growth
            compared += 1
            assert t2 > t1
        # Same anatomy: liver volume within 25 % (breathing shifts and voxelisation only).
        lv1 = (l1 > 0).sum() * np.prod(v1.spacing_mm)
        lv2 = (l2 > 0).sum() * np.prod(v2.spacing_mm)
        assert abs(lv2 - lv1) < 0.25 * lv1
    assert compared > 0


def test_cli_writes_decathlon_and_dicom(tmp_path: Path):
    from ctsearch.cli.main import app
    from ctsearch.io import read_volume

    out = tmp_path / "archive"
    res = CliRunner().invoke(
        app,
        [
            "synth",
            str(out),
            "--volumes",
            "2",
            "--seed",
            "3",
            "--size",
            "32",
            "--format",
            "both",
            "--exams",
            "2",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["volumes"] == 4 and summary["patients"] == 2
    ds = json.loads((out / "nifti" / "dataset.json").read_text())
    assert ds["labels"] == {"0": "background", "1": "liver", "2": "cancer"} and ds["numTraining"] == 4
    for entry in ds["training"]:
        assert (out / "nifti" / entry["image"]).is_file() and (out / "nifti" / entry["label"]).is_file()
    series = sorted(p for p in (out / "dicom").glob("*/*/*") if p.is_dir())
    assert len(series) == 4
    case = summary["cases"][0]
    nii = read_volume(case["nifti_image"])
    dcm = read_volume(case["dicom_folder"])
    assert np.array_equal(nii.hu, dcm.hu)
    assert dcm.patient_id == case["patient_id"]
    import pydicom

    ds0 = pydicom.dcmread(next(Path(case["dicom_folder"]).iterdir()))
    for tag in (
        "PatientName",
        "PatientBirthDate",
        "PatientAddress",
        "InstitutionName",
        "ReferringPhysicianName",
    ):
        assert not str(ds0.get(tag, "") or ""), tag


def test_cli_bad_format_is_one_line(tmp_path: Path):
    from ctsearch.cli.main import app

    res = CliRunner().invoke(app, ["synth", str(tmp_path / "x"), "--format", "png", "--size", "32"])
    assert "format must be one of" in error_line(res)


def test_fixture_archive_layout(synth_archive):
    nifti = synth_archive / "nifti"
    assert len(list((nifti / "imagesTr").glob("liver_*.nii.gz"))) == 8
    assert len(list((nifti / "labelsTr").glob("liver_*.nii.gz"))) == 8
    assert json.loads((synth_archive / "synth.json").read_text())["volumes"] == 8


def test_synth_never_mixes_two_archives_in_one_folder(tmp_path):
    from conftest import error_line
    from typer.testing import CliRunner

    from ctsearch.cli.main import app

    def synth(*args):
        return CliRunner().invoke(
            app, ["synth", str(tmp_path / "a"), "--size", "16", "--format", "nifti", *args]
        )

    assert synth("--volumes", "3").exit_code == 0
    assert synth("--volumes", "3").exit_code == 0  # the same settings: the same files again
    assert "other settings" in error_line(synth("--volumes", "2"))
    assert len(list((tmp_path / "a" / "nifti" / "imagesTr").iterdir())) == 3  # untouched
    r = synth("--volumes", "2", "--overwrite")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "a" / "nifti" / "imagesTr").iterdir()) == [
        "liver_0.nii.gz",
        "liver_1.nii.gz",
    ]
    (tmp_path / "a" / "notes.txt").write_text("mine")
    assert "did not write (notes.txt)" in error_line(synth("--volumes", "1", "--overwrite"))
    assert (tmp_path / "a" / "notes.txt").exists() and (tmp_path / "a" / "nifti").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("")
    r = CliRunner().invoke(app, ["synth", str(tmp_path / "b"), "--size", "16", "--volumes", "1"])
    assert "is not empty" in error_line(r) and sorted(p.name for p in (tmp_path / "b").iterdir()) == ["x"]
