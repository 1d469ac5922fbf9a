"""Bad input: one CTSearchInputError naming the file and the problem, or one errors row in a
scan -- never another exception type, never a silent skip."""

from __future__ import annotations

import gzip
import struct

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import random_volume

from ctsearch.errors import CTSearchInputError
from ctsearch.io import Volume, read_volume, scan_archive, write_dicom_series, write_nifti


def small_volume(shape=(4, 8, 8), seed=0, series_id="s") -> Volume:
    return random_volume(
        shape,
        seed,
        spacing=(3.0, 0.75, 0.75),
        origin=(0.0, 0.0, 0.0),
        hu_range=(-1000, 1500),
        patient_id="p",
        study_id="st",
        series_id=series_id,
        exam_date="2020-01-01",
    )


def nifti_bytes(tmp_path, shape=(4, 8, 8), suffix=".nii.gz") -> bytes:
    path = tmp_path / f"_good{suffix}"
    write_nifti(small_volume(shape), path)
    data = path.read_bytes()
    path.unlink()
    return data


def series(tmp_path, name="dcm", **kw):
    return write_dicom_series(small_volume(**kw), tmp_path / "in" / name, file_names="ordered")


def header_with_dims(tmp_path, dims, suffix):
    """A valid NIfTI header whose dims claim ``dims`` voxels, followed by 512 bytes of data."""
    raw = bytearray(nifti_bytes(tmp_path, suffix=".nii"))[: 352 + 512]
    struct.pack_into("<8h", raw, 40, 3, *dims, 1, 1, 1, 1)
    return gzip.compress(bytes(raw)) if suffix == ".nii.gz" else bytes(raw)


# Each case builds one bad input under tmp_path/"in" and returns
# (what to pass to read_volume, the file the message must name, read fragment, scan fragment).
def truncated_gzip_data(t):
    data = nifti_bytes(t, shape=(6, 32, 32))
    p = t / "in" / "cut.nii.gz"
    p.write_bytes(data[: int(len(data) * 0.7)])
    return p, p, "truncated", "truncated"


def truncated_gzip_header(t):
    p = t / "in" / "cut.nii.gz"
    p.write_bytes(nifti_bytes(t)[:20])
    return p, p, "gzip", "gzip"


def empty_nifti(t):
    p = t / "in" / "empty.nii.gz"
    p.write_bytes(b"")
    return p, p, "empty file", "empty file"


def empty_dicom_in_series(t):
    series(t)
    p = t / "in" / "dcm" / "zz.dcm"
    p.write_bytes(b"")
    return p.parent, p, "empty file", "empty file"


def text_named_dcm(t):
    series(t)
    p = t / "in" / "dcm" / "readme.dcm"
    p.write_text("Patient scans, do not delete\n")
    return p.parent, p, "not a DICOM file", "not a NIfTI"


def text_named_nii(t):
    p = t / "in" / "x.nii"
    p.write_text("hello\n" * 100)
    return p, p, "not a readable NIfTI", "not a readable NIfTI"


def huge_dims(t):
    p = t / "in" / "huge.nii"
    p.write_bytes(header_with_dims(t, (30000, 30000, 30000), ".nii"))
    return p, p, "limit", "limit"


def huge_dims_gz(t):
    p = t / "in" / "huge.nii.gz"
    p.write_bytes(header_with_dims(t, (4000, 4000, 100), ".nii.gz"))
    return p, p, "claims", "claims"


def plausible_dims_short_file(t):
    p = t / "in" / "short.nii"
    p.write_bytes(header_with_dims(t, (512, 512, 300), ".nii"))
    return p, p, "truncated", "truncated"


def plausible_dims_short_gz(t):
    """Within the deflate ratio, but the gzip trailer and stream disagree with the header."""
    p = t / "in" / "short.nii.gz"
    raw = bytearray(nifti_bytes(t, shape=(20, 64, 64), suffix=".nii"))
    struct.pack_into("<8h", raw, 40, 3, 64, 64, 40, 1, 1, 1, 1)  # twice the slices it holds
    p.write_bytes(gzip.compress(bytes(raw)))
    return p, p, "gzip stream holds", "gzip stream holds"


def two_d_nifti(t):
    p = t / "in" / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), p)
    return p, p, "3-D", "3-D"


def inconsistent_sizes(t):
    files = series(t)
    ds = pydicom.dcmread(files[1])
    ds.Rows, ds.Columns = 4, 4
    ds.PixelData = np.zeros((4, 4), "<u2").tobytes()
    ds.save_as(files[1])
    return files[0].parent, files[1], "slice is 4x4", "slice is 4x4"


def duplicate_positions(t):
    files = series(t)
    ds = pydicom.dcmread(files[2])
    ds.ImagePositionPatient = pydicom.dcmread(files[1]).ImagePositionPatient
    ds.save_as(files[2])
    return files[0].parent, files[2], "duplicate slice position", "duplicate slice position"


def missing_slice(t):
    files = series(t, shape=(5, 8, 8))
    files[2].unlink()
    return files[0].parent, files[0].parent, "irregular slice spacing", "irregular slice spacing"


def missing_pixel_data(t):
    files = series(t)
    ds = pydicom.dcmread(files[3])
    del ds.PixelData
    ds.save_as(files[3])
    return files[0].parent, files[3], "missing pixel data", "missing pixel data"


def truncated_dicom(t):
    files = series(t, shape=(3, 64, 64))
    files[1].write_bytes(files[1].read_bytes()[:-2000])
    return files[0].parent, files[1], "truncated file", "truncated file"


def rows_claim_too_big(t):
    files = series(t)
    ds = pydicom.dcmread(files[0])
    ds.Rows = ds.Columns = 60000
    ds.save_as(files[0])
    return files[0].parent, files[0], "pixel data holds", "pixel data holds"


def missing_position(t):
    files = series(t)
    ds = pydicom.dcmread(files[1])
    del ds.ImagePositionPatient
    ds.save_as(files[1])
    return files[0].parent, files[1], "lacks ImagePositionPatient", "lacks ImagePositionPatient"


def non_ct(t):
    files = series(t)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(f)
    return files[0].parent, files[0].parent, "modality MR, not CT", "modality MR, not CT"


def dicm_then_garbage(t):
    series(t)
    p = t / "in" / "dcm" / "garbage"
    p.write_bytes(
        b"\0" * 128 + b"DICM" + bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8))
    )
    return p.parent, p, "", ""


def single_dicom_file(t):
    files = series(t, shape=(1, 8, 8))
    return files[0], files[0], "single DICOM file", "single slice"


def nifti_of(t, data, name):
    p = t / "in" / name
    nib.save(nib.Nifti1Image(data, np.diag([0.75, 0.75, 3.0, 1.0])), p)
    return p


def complex_nifti(t):
    p = nifti_of(t, np.zeros((8, 8, 4), np.complex64), "complex.nii.gz")
    return p, p, "complex voxels", "complex voxels"


def rgb_nifti(t):
    rgb = np.zeros((8, 8, 4), np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")]))
    p = nifti_of(t, rgb, "rgb.nii.gz")
    return p, p, "RGB", "RGB"


def zero_pixdim(t):
    """No sform and pixdim 0: nibabel would quietly assume 1 mm voxels."""
    raw = bytearray(nifti_bytes(t, suffix=".nii"))
    struct.pack_into("<h", raw, 254, 0)  # sform_code: none
    struct.pack_into("<3f", raw, 80, 0.0, 0.0, 0.0)  # pixdim[1..3]
    p = t / "in" / "flat_geometry.nii"
    p.write_bytes(bytes(raw))
    return p, p, "no usable geometry", "no usable geometry"


def rgb_dicom(t):
    files = series(t)
    ds = pydicom.dcmread(files[1])
    ds.SamplesPerPixel = 3
    ds.save_as(files[1])
    return files[0].parent, files[1], "not a grayscale image", "not a grayscale image"


def one_bit_dicom(t):
    files = series(t)
    ds = pydicom.dcmread(files[2])
    ds.BitsAllocated = 1
    ds.save_as(files[2])
    return files[0].parent, files[2], "1-bit", "1-bit"


def empty_folder(t):
    p = t / "in" / "nothing"
    p.mkdir()
    return p, p, "holds no files", None


CASES = [
    truncated_gzip_data,
    truncated_gzip_header,
    empty_nifti,
    empty_dicom_in_series,
    text_named_dcm,
    text_named_nii,
    huge_dims,
    huge_dims_gz,
    plausible_dims_short_file,
    plausible_dims_short_gz,
    two_d_nifti,
    inconsistent_sizes,
    duplicate_positions,
    missing_slice,
    missing_pixel_data,
    truncated_dicom,
    rows_claim_too_big,
    missing_position,
    non_ct,
    dicm_then_garbage,
    single_dicom_file,
    empty_folder,
    complex_nifti,
    rgb_nifti,
    zero_pixdim,
    rgb_dicom,
    one_bit_dicom,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_read_volume_raises_one_clear_error(tmp_path, case):
    (tmp_path / "in").mkdir()
    target, culprit, fragment, _ = case(tmp_path)
    with pytest.raises(CTSearchInputError) as info:
        read_volume(target)
    message = str(info.value)
    assert "\n" not in message
    assert str(culprit) in message, message
    assert fragment in message, message


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_scan_reports_every_bad_input(tmp_path, case):
    (tmp_path / "in").mkdir()
    _, culprit, _, fragment = case(tmp_path)
    entries, errors = scan_archive(tmp_path / "in")
    if fragment is None:  # nothing there: nothing to report
        assert entries == [] and errors == []
        return
    hits = [e for e in errors if str(culprit) in e["path"] or e["path"] in str(culprit)]
    assert hits, errors
    assert all(e["stage"] == "scan" for e in errors)
    assert any(fragment in e["error"] for e in hits), hits
    # a broken series yields no entry; a bad extra file beside a good series leaves the series usable
    for e in entries:
        assert e.read().hu.shape == e.shape


def test_random_corruption_never_escapes_as_another_exception(tmp_path):
    rng = np.random.default_rng(0)
    good_nii = nifti_bytes(tmp_path, shape=(3, 16, 16), suffix=".nii")
    good_gz = nifti_bytes(tmp_path, shape=(3, 16, 16))
    good_dcm = series(tmp_path, name="src", shape=(2, 16, 16))[0].read_bytes()
    outcomes = {"ok": 0, "error": 0}
    for trial in range(60):
        kind = trial % 3
        data = bytearray([good_nii, good_gz, good_dcm][kind])
        for _ in range(int(rng.integers(1, 8))):  # overwrite a few random bytes, mostly in headers
            pos = int(rng.integers(0, min(len(data), 400 if rng.random() < 0.8 else len(data))))
            data[pos] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            data = data[: int(rng.integers(1, len(data)))]
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        if kind == 2:
            path = folder / "x.dcm"
            path.write_bytes(bytes(data))
            other = pydicom.dcmread(tmp_path / "in" / "src" / "slice_0001.dcm")
            other.save_as(folder / "y.dcm")
            target = folder
        else:
            target = path = folder / ("x.nii" if kind == 0 else "x.nii.gz")
            path.write_bytes(bytes(data))
        try:
            read_volume(target)
            outcomes["ok"] += 1
        except CTSearchInputError as e:
            assert str(folder) in str(e)
            outcomes["error"] += 1
        entries, errors = scan_archive(folder)
        assert len(entries) + len(errors) >= 1
    assert outcomes["error"] > 10  # the corruption did bite


def test_folder_of_nifti_is_not_a_dicom_series(tmp_path):
    write_nifti(small_volume(), tmp_path / "a.nii.gz")
    with pytest.raises(CTSearchInputError, match="holds NIfTI files, not a DICOM series"):
        read_volume(tmp_path)


def test_unreadable_file_in_series_folder_keeps_its_full_reason(tmp_path):
    series(tmp_path)
    (tmp_path / "in" / "dcm" / "x").write_bytes(b"\0" * 128 + b"DICM" + b"\x08\x00\x18\x00UI\xff\x7f")
    with pytest.raises(CTSearchInputError) as info:
        read_volume(tmp_path / "in" / "dcm")
    assert str(info.value).startswith(str(tmp_path / "in" / "dcm" / "x") + ": ")
    assert "DICOM" in info.value.problem


def _special_files(folder):
    """Every kind of non-regular file an archive on a real file system can hold; their names."""
    import os
    import socket

    os.mkfifo(folder / "pipe.nii.gz")  # a named pipe: opening it to read would block forever
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "sock.dcm"))
    sock.close()
    os.symlink("/dev/null", folder / "device.nii")  # a character device behind a link
    os.symlink(folder / "nowhere.nii.gz", folder / "dangling.nii.gz")
    os.symlink(folder / "loop_b", folder / "loop_a")
    os.symlink(folder / "loop_a", folder / "loop_b")
    (folder / "real").mkdir()
    os.symlink(folder / "real", folder / "linked_folder")
    return {
        "pipe.nii.gz": "named pipe",
        "sock.dcm": "socket",
        "device.nii": "device file",
        "dangling.nii.gz": "dangling symbolic link",
        "loop_a": "symbolic link loop",
        "loop_b": "symbolic link loop",
        "linked_folder": "link to a folder",
    }


def test_special_files_become_error_rows_and_the_scan_goes_on(tmp_path):
    (tmp_path / "in").mkdir()
    write_nifti(small_volume(), tmp_path / "in" / "good.nii.gz")
    expected = _special_files(tmp_path / "in")
    entries, errors = scan_archive(tmp_path / "in")  # would block forever on the pipe if opened
    assert [e.volume_id for e in entries] == ["good"]
    by_name = {e["path"].rsplit("/", 1)[-1]: e["error"] for e in errors}
    for name, fragment in expected.items():
        assert fragment in by_name.get(name, ""), (name, errors)


@pytest.mark.parametrize("name", ["pipe.nii.gz", "sock.dcm", "device.nii", "dangling.nii.gz", "loop_a"])
def test_read_volume_of_a_special_file_is_one_error(tmp_path, name):
    (tmp_path / "in").mkdir()
    fragment = _special_files(tmp_path / "in")[name]
    with pytest.raises(CTSearchInputError, match=fragment) as info:
        read_volume(tmp_path / "in" / name)
    assert str(info.value).startswith(str(tmp_path / "in" / name) + ": ")


def test_special_file_beside_a_dicom_series_leaves_the_series_readable(tmp_path):
    import os

    files = series(tmp_path)
    os.mkfifo(files[0].parent / "pipe")
    assert read_volume(files[0].parent).hu.shape == (4, 8, 8)


def test_gzip_damage_past_the_header_is_one_clear_error(tmp_path):
    """Damage the voxel data, or only the CRC in the trailer: the stream decompresses to the right
    length either way, and reading must still refuse it rather than return wrong pixels."""
    good = nifti_bytes(tmp_path, shape=(6, 32, 32))
    middle = bytearray(good)
    middle[len(good) // 2 : len(good) // 2 + 16] = bytes(16)
    crc = bytearray(good)
    crc[-8] ^= 0xFF  # CRC32 of the data; ISIZE (the last 4 bytes) still agrees with the header
    for name, data in (("middle", middle), ("crc", crc)):
        p = tmp_path / f"{name}.nii.gz"
        p.write_bytes(bytes(data))
        with pytest.raises(CTSearchInputError) as info:
            read_volume(p)
        message = str(info.value)
        assert "\n" not in message and str(p) in message and "cannot read voxel data" in message, message


def test_gzip_of_several_members_reads_as_one_stream(tmp_path):
    """`cat a.gz b.gz` is a valid gzip file (RFC 1952): the voxels may span members; zero padding
    after the last one is ignored."""
    raw = nifti_bytes(tmp_path, shape=(6, 32, 32), suffix=".nii")
    one = tmp_path / "one.nii.gz"
    one.write_bytes(gzip.compress(raw))
    parts = tmp_path / "parts.nii.gz"
    cuts = [0, 400, 3000, len(raw) - 5, len(raw)]  # the header alone, then voxels in three pieces
    parts.write_bytes(b"".join(gzip.compress(raw[a:b]) for a, b in zip(cuts, cuts[1:])))
    np.testing.assert_array_equal(read_volume(parts).hu, read_volume(one).hu)
    assert read_volume(one).hu.flags.writeable
    padded = tmp_path / "padded.nii.gz"  # zeros after the last member, which gzip.GzipFile accepts
    padded.write_bytes(one.read_bytes() + bytes(512))
    np.testing.assert_array_equal(read_volume(padded).hu, read_volume(one).hu)
