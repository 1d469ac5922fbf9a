"""Volume I/O: one canonical orientation for NIfTI and DICOM, whatever wrote them."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import random_volume
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from ctsearch.errors import CTSearchInputError
from ctsearch.io import (
    Volume,
    read_dicom_series,
    read_label,
    read_volume,
    scan_archive,
    write_dicom_series,
    write_nifti,
)

SPACING = (2.5, 0.703125, 0.8)  # z, y, x
ORIGIN = (-180.5, -200.25, -333.0)  # LPS x, y, z of voxel 0


def make_volume(shape=(6, 32, 32), seed=0, **ids) -> Volume:
    return random_volume(shape, seed, SPACING, ORIGIN, **ids)


def flipped(vol: Volume, axes_zyx) -> Volume:
    """The same scan stored with other axis directions: data and affine flipped together."""
    hu, affine = vol.hu, vol.affine.copy()
    for ax in axes_zyx:
        hu = np.flip(hu, axis=ax)
        col = 2 - ax  # affine column of this array axis (i = x = array axis 2)
        n = vol.hu.shape[ax]
        affine[:3, 3] += affine[:3, col] * (n - 1)
        affine[:3, col] *= -1
    return Volume(
        hu=np.ascontiguousarray(hu),
        spacing_mm=vol.spacing_mm,
        affine=affine,
        patient_id=vol.patient_id,
        study_id=vol.study_id,
        series_id=vol.series_id,
        exam_date=vol.exam_date,
    )


def assert_same_scan(a: Volume, b: Volume):
    assert a.hu.dtype == np.int16 and b.hu.dtype == np.int16
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_allclose(a.spacing_mm, b.spacing_mm, rtol=1e-6)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)


def test_nifti_and_dicom_of_one_volume_read_back_identical(tmp_path):
    vol = make_volume()
    write_nifti(vol, tmp_path / "liver_7.nii.gz")
    write_dicom_series(vol, tmp_path / "dcm")
    from_nifti = read_volume(tmp_path / "liver_7.nii.gz")
    from_dicom = read_volume(tmp_path / "dcm")
    assert_same_scan(from_nifti, vol)
    assert_same_scan(from_dicom, vol)
    assert from_nifti.patient_id == "liver_7" and from_nifti.exam_date is None
    assert from_dicom.patient_id == "liver_7" and from_dicom.exam_date == "2021-03-04"
    assert pydicom.uid.UID(from_dicom.series_id).is_valid and from_dicom.series_id != from_dicom.study_id
    assert from_dicom.z_mm()[0] == pytest.approx(ORIGIN[2])  # slice 0 is the most inferior


@pytest.mark.parametrize("axes", [(0,), (1, 2), (0, 1, 2), (2,)])
def test_any_stored_orientation_reads_canonical(tmp_path, axes):
    vol = make_volume(shape=(5, 12, 16))
    other = flipped(vol, axes)
    assert not np.array_equal(other.hu, vol.hu)
    write_nifti(other, tmp_path / "o.nii.gz")
    write_dicom_series(other, tmp_path / "dcm")
    assert_same_scan(read_volume(tmp_path / "o.nii.gz"), vol)
    assert_same_scan(read_volume(tmp_path / "dcm"), vol)


def test_transposed_in_plane_dicom_reads_canonical(tmp_path):
    """Rows running along x instead of y (ImageOrientationPatient 0,1,0,1,0,0)."""
    vol = make_volume(shape=(4, 10, 14))
    a = vol.affine
    swapped = Volume(
        hu=np.ascontiguousarray(vol.hu.transpose(0, 2, 1)),
        spacing_mm=vol.spacing_mm,
        affine=a[:, [1, 0, 2, 3]],
        patient_id="p",
        study_id="s",
        series_id="t",
    )
    files = write_dicom_series(swapped, tmp_path / "dcm")
    iop = [float(v) for v in pydicom.dcmread(files[0]).ImageOrientationPatient]
    assert iop == [0, 1, 0, 1, 0, 0]
    assert_same_scan(read_volume(tmp_path / "dcm"), vol)


def test_shuffled_dicom_files_give_the_same_volume(tmp_path):
    vol = make_volume(shape=(7, 16, 16))
    files = write_dicom_series(vol, tmp_path / "a", file_names="ordered")
    rng = np.random.default_rng(3)
    shuffled = tmp_path / "b"
    # Random names in nested folders, InstanceNumber scrambled: only the positions tell the order.
    for path, inst in zip(files, rng.permutation(len(files))):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = int(inst) + 1
        out = shuffled / f"{rng.integers(1e9):x}" / f"{rng.integers(1e9):x}"
        out.parent.mkdir(parents=True)
        ds.save_as(out)
    assert_same_scan(read_volume(shuffled), vol)
    assert_same_scan(read_volume(tmp_path / "a"), vol)


def test_signed_pixels_and_fractional_slope(tmp_path):
    vol = make_volume(shape=(3, 8, 8))
    for k, path in enumerate(write_dicom_series(vol, tmp_path / "dcm", file_names="ordered")):
        ds = pydicom.dcmread(path)
        ds.PixelRepresentation = 1
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, 0
        ds.PixelData = (vol.hu[k].astype(np.int32) * 2).astype("<i2").tobytes()
        ds.save_as(path)
    assert_same_scan(read_volume(tmp_path / "dcm"), vol)


def test_pydicom_ct_small_matches_apply_modality_lut(tmp_path):
    src = get_testdata_file("CT_small.dcm")
    ref = pydicom.dcmread(src)
    expected = np.rint(apply_modality_lut(ref.pixel_array, ref)).astype(np.int16)
    z0 = float(ref.ImagePositionPatient[2])
    order = [2, 0, 1]  # files named against their position
    for n, k in enumerate(order):
        ds = pydicom.dcmread(src)
        ds.ImagePositionPatient = [ref.ImagePositionPatient[0], ref.ImagePositionPatient[1], z0 + 5.0 * k]
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["ct_small", str(k)])
        ds.PixelData = (ref.pixel_array + k).astype("<i2").tobytes()  # tell the slices apart
        ds.save_as(tmp_path / f"{n}.dcm")
    vol = read_volume(tmp_path)
    assert vol.shape == (3, ref.Rows, ref.Columns)
    for k in range(3):
        np.testing.assert_array_equal(vol.hu[k], expected + k)
    assert vol.spacing_mm[0] == pytest.approx(5.0)
    assert vol.spacing_mm[1] == pytest.approx(float(ref.PixelSpacing[0]))


@pytest.mark.parametrize(
    "signed,slope,intercept",
    [
        (0, 1, -1024),  # the common CT case: unsigned stored values, integer intercept
        (1, 1, 0),
        (1, 3, -32768),  # clips at int16's bounds on both sides
        (0, -2, 40000),
        (1, 0.5, -1024.0),  # fractional: pydicom's float path
        (1, 1, -1024.25),
        (0, None, None),  # no rescale tags: the stored values
        (1, "lut", None),  # a modality LUT sequence
    ],
)
def test_integer_rescale_equals_pydicoms_modality_lut(tmp_path, signed, slope, intercept):
    """The int32 rescale gives exactly what pydicom's float64 modality LUT, rounded and clipped,
    gives; everything it does not cover still goes through pydicom."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from ctsearch.io.dicom import _decode_slice

    (path,) = write_dicom_series(make_volume(shape=(1, 16, 16)), tmp_path / "dcm", file_names="ordered")
    ds = pydicom.dcmread(path)
    rng = np.random.default_rng(signed)
    ds.PixelRepresentation = signed
    stored = rng.integers(-32768, 32768, (16, 16)) if signed else rng.integers(0, 65536, (16, 16))
    ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()
    del ds.RescaleSlope, ds.RescaleIntercept
    if slope == "lut":
        item = Dataset()
        item.add_new("LUTDescriptor", "US", [256, 0, 16])
        item.ModalityLUTType = "HU"
        item.add_new("LUTData", "US", [int(v) for v in rng.integers(0, 4096, 256)])
        ds.ModalityLUTSequence = Sequence([item])
    elif slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.save_as(path)
    back = pydicom.dcmread(path)
    want = np.clip(np.rint(apply_modality_lut(back.pixel_array, back).astype(np.float64)), -32768, 32767)
    got = _decode_slice(str(path))
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, want.astype(np.int16))


@pytest.mark.parametrize("dtype", ["int8", "uint8", "<i2", "<u2", "<i4", "float32"])
@pytest.mark.parametrize("slope,intercept", [(1, 0), (1, -1024), (3, -32768), (-2, 40000), (0.5, -1024.25)])
def test_to_hu_int16_exact_path_equals_the_float_rescale(dtype, slope, intercept):
    """Every reader's rescale (NIfTI scl_*, DICOM Rescale*): the int32 path for integer pixels and
    integer rescales gives what float64 arithmetic, rounded and clipped, gives."""
    from ctsearch.io.volume import to_hu_int16

    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else np.iinfo(np.int16)
    rng = np.random.default_rng(0)
    raw = rng.integers(info.min, int(info.max) + 1, (3, 7, 5)).astype(dtype)
    raw.flat[:2] = info.min, info.max  # both ends of the stored range
    want = np.clip(np.rint(raw.astype(np.float64) * slope + intercept), -32768, 32767).astype(np.int16)
    got = to_hu_int16(raw, slope, intercept)
    assert got.dtype == np.int16 and got.shape == raw.shape
    np.testing.assert_array_equal(got, want)


def test_to_hu_int16_float_input_nan_and_infinities():
    from ctsearch.io.volume import to_hu_int16

    raw = np.array([np.nan, np.inf, -np.inf, 2.5, -2.5, 1e9], np.float32)
    np.testing.assert_array_equal(to_hu_int16(raw), [-1024, 32767, -32768, 2, -2, 32767])
    stored = np.array([-5, 7], np.int16)
    assert to_hu_int16(stored) is stored  # nothing to rescale: no copy


def test_rle_compressed_series_decodes(tmp_path):
    vol = make_volume(shape=(3, 8, 8))
    for path in write_dicom_series(vol, tmp_path / "dcm"):
        ds = pydicom.dcmread(path)
        ds.compress(pydicom.uid.RLELossless)  # pydicom's own encoder and decoder
        ds.save_as(path)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID.is_compressed
    assert_same_scan(read_volume(tmp_path / "dcm"), vol)


def test_compressed_without_plugin_names_the_plugin(tmp_path):
    pytest.importorskip("pydicom")
    for module in ("jpeg_ls", "pylibjpeg", "gdcm"):
        try:
            __import__(module)
            pytest.skip(f"{module} is installed: JPEG-LS decodes here")
        except ImportError:
            pass
    src = pydicom.dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    for k in range(2):
        ds = pydicom.dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
        ds.Modality = "CT"
        ds.ImagePositionPatient = [0, 0, 3.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["jls", str(k)])
        ds.save_as(tmp_path / f"s{k}")
    assert src.file_meta.TransferSyntaxUID.is_compressed
    with pytest.raises(CTSearchInputError, match="install pyjpegls"):
        read_volume(tmp_path)


def test_label_roundtrip_and_shape_check(tmp_path):
    vol = make_volume(shape=(5, 12, 16))
    label = (vol.hu > 1000).astype(np.uint8) + (vol.hu > 2000)
    other = flipped(vol, (0, 2))
    write_nifti(other, tmp_path / "i.nii.gz", label=np.flip(label, (0, 2)), label_path=tmp_path / "l.nii.gz")
    got = read_volume(tmp_path / "i.nii.gz")
    np.testing.assert_array_equal(read_label(tmp_path / "l.nii.gz", got), label)
    small = make_volume(shape=(2, 12, 16))
    with pytest.raises(CTSearchInputError, match="label shape"):
        read_label(tmp_path / "l.nii.gz", small)


def write_foreign_nifti(vol: Volume, path, label=None, label_path=None):
    """What another tool may write: an LPS-like affine (negative diagonal, axes L, P, I in
    nibabel's RAS terms: slices stored top-down) and scaled int16 (scl_slope 2, scl_inter -1024)."""
    data = np.flip(vol.hu, axis=0).transpose(2, 1, 0)  # [i, j, k] running L, P, I
    nz = vol.hu.shape[0]
    sz, sy, sx = vol.spacing_mm
    top = vol.affine @ np.array([0, 0, nz - 1, 1.0])  # LPS of the stored first voxel
    affine_ras = np.diag([-sx, -sy, -sz, 1.0])
    affine_ras[:3, 3] = [-top[0], -top[1], top[2]]
    stored = ((data.astype(np.int32) + 1024) // 2).astype(np.int16)
    img = nib.Nifti1Image(stored, affine_ras)
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, os.fspath(path))
    if label is not None:
        lab = np.flip(label, axis=0).transpose(2, 1, 0).astype(np.uint8)
        nib.save(nib.Nifti1Image(lab, affine_ras), os.fspath(label_path))


def even(vol: Volume) -> Volume:
    """Values a slope-2 file can hold exactly."""
    vol.hu = (vol.hu // 2 * 2).astype(np.int16)
    return vol


def test_foreign_scaled_lps_nifti(tmp_path):
    vol = even(make_volume(shape=(4, 10, 12)))
    write_foreign_nifti(vol, tmp_path / "liver_9.nii.gz")
    img = nib.load(tmp_path / "liver_9.nii.gz")
    assert nib.aff2axcodes(img.affine) == ("L", "P", "I") and img.dataobj.slope == 2.0
    got = read_volume(tmp_path / "liver_9.nii.gz")
    assert_same_scan(got, vol)
    assert got.patient_id == "liver_9"


def test_nifti_sidecar_ids(tmp_path):
    vol = make_volume(shape=(2, 4, 4))
    write_nifti(vol, tmp_path / "scan.nii.gz")
    (tmp_path / "scan.json").write_text(json.dumps({"patient_id": "P17", "exam_date": "2019-05-02"}))
    got = read_volume(tmp_path / "scan.nii.gz")
    assert (got.patient_id, got.study_id, got.exam_date) == ("P17", "scan", "2019-05-02")
    entries, errors = scan_archive(tmp_path)
    assert errors == [] and [(e.patient_id, e.exam_date) for e in entries] == [("P17", "2019-05-02")]


def _localizer(tmp_path, folder):
    loc = make_volume(shape=(1, 16, 16), series_id="loc")
    for path in write_dicom_series(loc, folder, rng_seed=9):
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal scout
        ds.save_as(path)


def test_read_dicom_series_splits_and_skips_with_reasons(tmp_path):
    ct = make_volume(shape=(4, 8, 8), series_id="axial")
    write_dicom_series(ct, tmp_path / "exam")
    _localizer(tmp_path, tmp_path / "exam")
    mr = make_volume(shape=(3, 8, 8), series_id="mr", seed=1)
    for path in write_dicom_series(mr, tmp_path / "exam" / "sub", rng_seed=4):
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(path)
    sag = make_volume(shape=(3, 8, 8), series_id="sag", seed=2)
    sag.affine = sag.affine[:, [1, 2, 0, 3]]  # rows along y, columns along z: sagittal slices
    write_dicom_series(sag, tmp_path / "exam" / "sag", rng_seed=5)

    vols, skipped = read_dicom_series(tmp_path / "exam")
    assert len(vols) == 1
    assert_same_scan(vols[0], ct)
    reasons = sorted(s["error"].split("skipped, ")[1] for s in skipped)
    assert len(reasons) == 3
    assert reasons[0].startswith("localizer")
    assert reasons[1].startswith("modality MR")
    assert reasons[2].startswith("non-axial (sagittal")
    with pytest.raises(CTSearchInputError, match="holds 4 DICOM series; pass the folder of one series"):
        read_volume(tmp_path / "exam")
    assert_same_scan(read_volume(tmp_path / "exam", series_id=vols[0].series_id), ct)


def test_scan_archive_written_by_another_tool(tmp_path):
    """Decathlon NIfTI (LPS-like, scaled int16) + DICOM copies (unsigned, intercept -1024) in
    nested random folders + a localizer + corrupt files: right counts, identical HU, errors listed."""
    root = tmp_path / "archive"
    dec = root / "Task03_Liver"
    (dec / "imagesTr").mkdir(parents=True)
    (dec / "labelsTr").mkdir()
    (dec / "imagesTs").mkdir()
    (dec / "dataset.json").write_text(json.dumps({"name": "Liver", "training": []}))
    rng = np.random.default_rng(0)
    vols = {}
    for case in (0, 1, 10):
        vol = even(
            make_volume(
                shape=(4 + case % 3, 16, 12),
                seed=case,
                patient_id=f"liver_{case}",
                study_id=f"liver_{case}",
                series_id=f"liver_{case}",
            )
        )
        vols[case] = vol
        label = (vol.hu > 0).astype(np.uint8)
        name = f"liver_{case}.nii.gz"
        write_foreign_nifti(vol, dec / "imagesTr" / name, label, dec / "labelsTr" / name)
        folder = root / "dicom" / f"{rng.integers(1e9):x}" / f"{rng.integers(1e9):x}"
        write_dicom_series(vol, folder, rng_seed=case)
    write_nifti(make_volume(shape=(3, 8, 8)), dec / "imagesTs" / "liver_200.nii.gz")
    _localizer(tmp_path, root / "dicom" / "scout")
    # Corrupt inputs, each must become an error row.
    good = (dec / "imagesTr" / "liver_0.nii.gz").read_bytes()
    (dec / "imagesTr" / "liver_5.nii.gz").write_bytes(good[: len(good) // 2])  # truncated gzip
    (dec / "labelsTr" / "liver_5.nii.gz").write_bytes(good)
    (dec / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"\x00\x05\x16\x07" + b"\0" * 60)
    (dec / "labelsTr" / "liver_77.nii.gz").write_bytes(good)  # label without image
    (root / "dicom" / "notes.dcm").write_text("this is not DICOM\n")
    (root / "dicom" / "empty").write_bytes(b"")
    broken_vol = make_volume(shape=(4, 8, 8), series_id="broken")
    broken = write_dicom_series(broken_vol, root / "dicom" / "b", file_names="ordered")
    ds = pydicom.dcmread(broken[2])
    del ds.PixelData  # a slice whose pixel data is missing
    ds.save_as(broken[2])

    entries, errors = scan_archive(root)
    nifti = [e for e in entries if e.format == "nifti"]
    dicom = [e for e in entries if e.format == "dicom"]
    assert sorted(e.volume_id for e in nifti) == ["liver_0", "liver_1", "liver_10", "liver_200"]
    assert len(dicom) == 3
    by_case = {e.case_number: e for e in nifti}
    assert by_case[200].label_path is None and by_case[0].label_path.endswith("labelsTr/liver_0.nii.gz")
    for e in dicom:
        twin = by_case[e.case_number]
        assert e.shape == twin.shape == vols[e.case_number].shape
        np.testing.assert_allclose(e.spacing_mm, twin.spacing_mm, rtol=1e-6)
        a, b = e.read(), twin.read()
        assert_same_scan(a, b)
        assert_same_scan(a, vols[e.case_number])
        np.testing.assert_array_equal(twin.read_label(b), (b.hu > 0).astype(np.uint8))
        # the manifest row re-reads the same volume through read_volume
        row = e.row()
        assert_same_scan(read_volume(row["path"], series_id=row["series_id"]), a)
        assert row["nz"] == a.shape[0] and row["format"] == "dicom"

    def reason(name):
        hits = [r for r in errors if os.path.basename(r["path"]) == name or r["path"].endswith(name)]
        assert len(hits) == 1, (name, errors)
        assert hits[0]["stage"] == "scan"
        return hits[0]["error"]

    assert "gzip" in reason("imagesTr/liver_5.nii.gz")
    assert "macOS" in reason("._liver_0.nii.gz")
    assert "label without an image" in reason("liver_77.nii.gz")
    assert "not a NIfTI" in reason("notes.dcm")
    assert "empty" in reason("empty")
    assert "localizer" in reason("scout")
    assert "missing pixel data" in reason("b/slice_0002.dcm")
    assert len(errors) == 7


def test_scan_single_nifti_file_and_missing_root(tmp_path):
    write_nifti(make_volume(shape=(2, 4, 4)), tmp_path / "liver_3.nii")
    entries, errors = scan_archive(tmp_path / "liver_3.nii")
    assert [(e.volume_id, e.case_number, e.shape) for e in entries] == [
        ("liver_3", 3, (2, 4, 4))
    ] and errors == []
    with pytest.raises(CTSearchInputError, match="no such file"):
        scan_archive(tmp_path / "nope")


def test_synthetic_archive_nifti_and_dicom_copies_identical(synth_archive):
    """The shared synthetic archive (ctsearch.synth): both copies of every case scan and read the same."""
    nifti_entries, nifti_errors = scan_archive(synth_archive / "nifti")
    dicom_entries, dicom_errors = scan_archive(synth_archive / "dicom")
    assert nifti_errors == [] and dicom_errors == []
    assert len(nifti_entries) == len(dicom_entries) == 8
    assert all(e.label_path for e in nifti_entries)
    by_folder = {os.path.realpath(e.path): e for e in dicom_entries}
    cases = json.loads((synth_archive / "synth.json").read_text())["cases"]
    for case, n in zip(sorted(cases, key=lambda c: int(c["case"].split("_")[1])), nifti_entries):
        assert n.volume_id == case["case"]
        d = by_folder[os.path.realpath(case["dicom_folder"])]
        assert d.shape == n.shape and d.exam_date == case["exam_date"]
        assert_same_scan(d.read(), n.read())


def test_scanning_a_valid_nifti_gz_reads_no_voxel_data(tmp_path, monkeypatch):
    """The header check trusts a gzip trailer that agrees with the header: no decompression."""
    import ctsearch.io.nifti as nifti_mod

    write_nifti(make_volume(shape=(6, 32, 32)), tmp_path / "liver_1.nii.gz")

    def no_stream(*a, **k):
        raise AssertionError("decompressed the whole file to check a valid header")

    monkeypatch.setattr(nifti_mod, "_gzip_problem", no_stream)
    entries, errors = scan_archive(tmp_path)
    assert errors == [] and entries[0].shape == (6, 32, 32)


def test_decathlon_dataset_json_ids_and_sidecar_override(tmp_path):
    """Patient ids and exam dates written into dataset.json (as ctsearch synth does) reach every reader."""
    import json

    from ctsearch.io import Volume, read_volume, scan_archive, write_nifti

    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    hu = np.zeros((4, 8, 8), np.int16)
    for case in (0, 1):
        vol = Volume(hu=hu, spacing_mm=(1.0, 1.0, 1.0), affine=Volume.affine_from((1, 1, 1), (0, 0, 0)))
        write_nifti(
            vol,
            tmp_path / "imagesTr" / f"liver_{case}.nii.gz",
            label=np.zeros(hu.shape, np.uint8),
            label_path=tmp_path / "labelsTr" / f"liver_{case}.nii.gz",
        )
    training = [
        {
            "image": f"./imagesTr/liver_{c}.nii.gz",
            "label": f"./labelsTr/liver_{c}.nii.gz",
            "patient_id": "P7",
            "exam_date": f"201{c}-01-02",
        }
        for c in (0, 1)
    ]
    (tmp_path / "dataset.json").write_text(json.dumps({"training": training, "test": []}))
    (tmp_path / "imagesTr" / "liver_1.json").write_text(json.dumps({"patient_id": "P8"}))
    entries, errors = scan_archive(tmp_path)
    assert not errors
    ids = {e.volume_id: (e.patient_id, e.exam_date) for e in entries}
    assert ids == {"liver_0": ("P7", "2010-01-02"), "liver_1": ("P8", "2011-01-02")}
    vol = read_volume(tmp_path / "imagesTr" / "liver_0.nii.gz")
    assert (vol.patient_id, vol.exam_date, vol.series_id) == ("P7", "2010-01-02", "liver_0")
