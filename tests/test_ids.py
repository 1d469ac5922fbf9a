"""Pseudonymised ids (--id-salt-file): the hash, the salt file, and prepare / index / search with a salt."""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import error_line
from typer.testing import CliRunner

from ctsearch.cli.main import app
from ctsearch.errors import CTSearchInputError
from ctsearch.ids import ids_block, is_pseudonym, load_salt, pseudonymise, pseudonymise_ids, salt_fingerprint
from ctsearch.index import Index, IndexWriter
from ctsearch.model import ModelConfig
from ctsearch.prepare import prepare
from ctsearch.store import read_slices

SALT = b"test-salt-0123456789abcdef"
OTHER = b"another-salt-0123456789abcdef"


# ----------------------------------------------------------------------------- the hash and the salt file


def test_pseudonymise_is_keyed_hmac_sha256():
    # RFC 4231 test case 2: HMAC-SHA256(key "Jefe", "what do ya want for nothing?") = 5bdcc146bf60754e...
    assert pseudonymise("what do ya want for nothing?", b"Jefe") == "p-5bdcc146bf60754e"
    expected = "p-" + hmac.new(SALT, b"synth-0003", hashlib.sha256).hexdigest()[:16]
    assert pseudonymise("synth-0003", SALT) == expected == pseudonymise("synth-0003", SALT)
    assert pseudonymise("synth-0003", OTHER) != expected
    assert pseudonymise("synth-0004", SALT) != expected
    assert is_pseudonym(expected) and not is_pseudonym("synth-0003") and not is_pseudonym("")
    assert pseudonymise(expected, SALT) == expected  # hashing twice changes nothing
    assert pseudonymise("", SALT) == "" and pseudonymise(None, SALT) == ""


def test_pseudonymise_ids_hashes_ids_and_uid_named_volumes_only():
    uid = "1.2.826.0.1.3680043.8.498.1"
    row = {
        "volume_id": uid,
        "patient_id": "P1",
        "study_id": "1.2.3",
        "series_id": uid,
        "exam_date": "2020-01-02",
        "slice_index": 4,
        "path": "/a/b",
    }
    out = pseudonymise_ids(row, SALT)
    assert out["volume_id"] == out["series_id"] == pseudonymise(uid, SALT)
    assert out["patient_id"] == pseudonymise("P1", SALT) and out["study_id"] == pseudonymise("1.2.3", SALT)
    assert {k: out[k] for k in ("exam_date", "slice_index", "path")} == {
        "exam_date": "2020-01-02",
        "slice_index": 4,
        "path": "/a/b",
    }
    nifti = pseudonymise_ids({"volume_id": "liver_3", "series_id": "liver_3"}, SALT)
    assert nifti["volume_id"] == "liver_3" and is_pseudonym(nifti["series_id"])
    assert pseudonymise_ids(row, None) == row


def test_load_salt_and_its_errors(tmp_path):
    good = tmp_path / "salt"
    good.write_bytes(SALT + b"\n")
    assert load_salt(good) == SALT  # one trailing newline stripped
    assert salt_fingerprint(SALT) == hashlib.sha256(SALT).hexdigest()[:12]
    assert ids_block(SALT) == {
        "pseudonymised": True,
        "scheme": "hmac-sha256-64",
        "salt_fingerprint": salt_fingerprint(SALT),
    }
    (tmp_path / "empty").write_bytes(b"\n")
    (tmp_path / "short").write_bytes(b"abc123\n")
    for name, problem in [("missing", "no such salt file"), ("empty", "empty"), ("short", "guessable")]:
        with pytest.raises(CTSearchInputError) as e:
            load_salt(tmp_path / name)
        assert (
            str(e.value).startswith(str(tmp_path / name))
            and problem in str(e.value)
            and "\n" not in str(e.value)
        )
    with pytest.raises(CTSearchInputError, match="cannot read"):
        load_salt(tmp_path)  # a folder: unreadable as a file


# ----------------------------------------------------------------------------- prepare


def _original_ids(manifest: Path) -> set[str]:
    """Patient, study and series ids, less those that are file names (NIfTI study and series ids
    default to the file stem, which the stored path and volume_id carry anyway)."""
    t = pq.read_table(manifest, columns=["volume_id", "patient_id", "study_id", "series_id"])
    ids = {v for c in ("patient_id", "study_id", "series_id") for v in t.column(c).to_pylist() if v}
    return ids - set(t.column("volume_id").to_pylist())


def _leaks(folder: Path, originals: set[str]) -> list[str]:
    """Original ids found in any file's bytes, or in any decoded string cell of its parquet files."""
    found = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        found += [f"{f.name}: {o}" for o in originals if o.encode() in data]
        if f.suffix == ".parquet":
            t = pq.read_table(f)
            for c in t.column_names:
                if t.schema.field(c).type == "string":
                    cells = set(t.column(c).to_pylist())
                    found += [f"{f.name}[{c}]: {o}" for o in originals if any(o in (v or "") for v in cells)]
    return found


def test_prepare_with_salt_writes_no_original_id_and_keeps_the_split(synth_archive, slice_dataset, tmp_path):
    out = tmp_path / "prepared"
    summary = prepare(
        synth_archive / "nifti",
        out,
        protocol="decathlon",
        per_volume=5,
        train_volumes=6,
        seed=0,
        id_salt=SALT,
    )
    originals = _original_ids(slice_dataset / "manifest.parquet")
    assert len(originals) == 8 and "synth-0000" in originals  # the 8 patients
    assert _leaks(slice_dataset, originals), "the check must see ids in an unsalted output"
    assert _leaks(out, originals) == []
    meta = json.loads((out / "protocol.json").read_text())
    assert meta["ids"] == ids_block(SALT) == summary["ids"]
    assert SALT.decode() not in (out / "protocol.json").read_text()
    plain = json.loads((slice_dataset / "protocol.json").read_text())
    assert meta["volumes"] == plain["volumes"]  # same cases, same slices, same split
    for split in ("train", "test"):
        a, b = read_slices(slice_dataset / f"{split}.parquet"), read_slices(out / f"{split}.parquet")
        assert a.volume_id.tolist() == b.volume_id.tolist() and np.array_equal(a.slice_index, b.slice_index)
        assert np.array_equal(a.hu, b.hu) and np.array_equal(a.label, b.label)
        assert b.patient_id.tolist() == [pseudonymise(p, SALT) for p in a.patient_id]
    m = pq.read_table(out / "manifest.parquet")
    assert json.loads(m.schema.metadata[b"ctsearch.ids"]) == ids_block(SALT)
    assert all(
        is_pseudonym(v) for c in ("patient_id", "study_id", "series_id") for v in m.column(c).to_pylist()
    )


def test_prepare_cli_hashes_dicom_uids_with_the_salt_file_from_the_environment(synth_archive, tmp_path):
    salt_file = tmp_path / "salt"
    salt_file.write_bytes(SALT)
    r = CliRunner().invoke(
        app,
        ["prepare", str(synth_archive / "dicom"), str(tmp_path / "out"), "--json"],
        env={"CTSEARCH_ID_SALT_FILE": str(salt_file)},
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ids"] == ids_block(SALT)
    rows = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert len(rows) == 8
    for row in rows:
        assert all(is_pseudonym(row[c]) for c in ("volume_id", "patient_id", "study_id", "series_id"))
        assert row["volume_id"] == row["series_id"]  # a DICOM volume is named by its (hashed) series UID
    from ctsearch.io import scan_archive

    uids = {u for e in scan_archive(synth_archive / "dicom")[0] for u in (e.study_id, e.series_id)}
    assert len(uids) == 16 and _leaks(tmp_path / "out", uids) == []
    r = CliRunner().invoke(
        app,
        [
            "prepare",
            str(synth_archive / "dicom"),
            str(tmp_path / "o2"),
            "--id-salt-file",
            str(tmp_path / "nope"),
        ],
    )
    assert r.exit_code == 1 and "nope: no such salt file" in r.output


# ----------------------------------------------------------------------------- index and search


@pytest.fixture(scope="module")
def two_exam_archive(tmp_path_factory):
    """2 patients x 2 examinations, NIfTI: liver_0/liver_1 are patient synth-0000, liver_2/liver_3 synth-0001."""
    from ctsearch.synth import synth_archive

    out = tmp_path_factory.mktemp("twoexam")
    synth_archive(out, volumes=2, exams=2, seed=3, size=64, fmt="nifti")
    return out / "nifti"


@pytest.fixture(scope="module")
def salt_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("salts")
    (d / "salt").write_bytes(SALT + b"\n")
    (d / "other").write_bytes(OTHER)
    return d / "salt", d / "other"


@pytest.fixture(scope="module")
def salted_index(two_exam_archive, model_dir, ray_session, tmp_path_factory):
    from ctsearch.jobs.index import index_source

    out = tmp_path_factory.mktemp("idx") / "index"
    summary = index_source(two_exam_archive, model_dir, out, shard_volumes=2, batch_size=32, id_salt=SALT)
    assert summary.volumes_indexed == 4 and summary.volumes_failed == 0
    return out


def _search(*args) -> list[dict]:
    r = CliRunner().invoke(app, ["search", *map(str, args), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_index_with_salt_stores_pseudonyms_only(salted_index, two_exam_archive):
    idx = Index.open(salted_index)
    assert idx.ids == ids_block(SALT)
    rows = pq.read_table(salted_index / "embeddings").to_pylist()
    assert {r["patient_id"] for r in rows} == {
        pseudonymise("synth-0000", SALT),
        pseudonymise("synth-0001", SALT),
    }
    assert {r["volume_id"] for r in rows} == {f"liver_{i}" for i in range(4)}
    from ctsearch.io import scan_archive

    originals = {e.patient_id for e in scan_archive(two_exam_archive)[0]}
    assert len(originals) == 2 and _leaks(salted_index, originals) == []


def test_exclude_patient_takes_the_original_id_or_the_pseudonym(salted_index, salt_files):
    p0 = pseudonymise("synth-0000", SALT)
    everyone = _search(salted_index, "liver_0:20", "-k", "400")
    assert {h["patient_id"] for h in everyone} == {p0, pseudonymise("synth-0001", SALT)}
    for value, extra in [("synth-0000", ["--id-salt-file", salt_files[0]]), (p0, [])]:
        hits = _search(salted_index, "liver_0:20", "-k", "400", "--exclude-patient", value, *extra)
        assert hits and all(h["patient_id"] != p0 for h in hits)
        only = _search(salted_index, "liver_2:20", "-k", "400", "--patient", value, *extra)
        assert only and all(h["patient_id"] == p0 for h in only)
    r = CliRunner().invoke(
        app, ["search", str(salted_index), "liver_0:20", "--exclude-patient", "synth-0000"]
    )
    assert r.exit_code == 1 and "--id-salt-file" in r.output and "pseudonym" in r.output
    r = CliRunner().invoke(
        app,
        [
            "search",
            str(salted_index),
            "liver_0:20",
            "--exclude-patient",
            "synth-0000",
            "--id-salt-file",
            str(salt_files[1]),
        ],
    )
    assert r.exit_code == 1 and "another salt" in r.output


def test_cross_exam_still_finds_the_other_exam(salted_index, two_exam_archive, salt_files):
    by_row = _search(salted_index, "liver_0:20", "--cross-exam")["exams"]
    assert [e["volume_id"] for e in by_row] == ["liver_1"]
    query = two_exam_archive / "imagesTr" / "liver_0.nii.gz"
    r = CliRunner().invoke(app, ["search", str(salted_index), str(query), "--cross-exam", "--json"])
    assert r.exit_code == 1 and "--id-salt-file" in r.output
    by_file = _search(salted_index, query, "--cross-exam", "--id-salt-file", salt_files[0])["exams"]
    assert [e["volume_id"] for e in by_file] == ["liver_1"]  # the indexed liver_0 is the query's own scan
    hits = _search(salted_index, query, "-k", "3", "--id-salt-file", salt_files[0])
    assert hits[0]["volume_id"] == "liver_0" and hits[0]["patient_id"] == pseudonymise("synth-0000", SALT)


def test_mixing_salts_is_refused(salted_index, two_exam_archive, model_dir, salt_files, tmp_path):
    base = ["index", str(two_exam_archive), "--model", str(model_dir), "--out", str(salted_index)]
    for extra, problem in [(["--id-salt-file", str(salt_files[1])], "another salt"), ([], "pseudonymised")]:
        r = CliRunner().invoke(app, base + extra)
        assert problem in error_line(r)
    plain = tmp_path / "plain"
    IndexWriter.open(plain, ModelConfig(backbone="tiny", image_size=64)).close()
    with pytest.raises(CTSearchInputError, match="kept as given"):
        IndexWriter.open(plain, ModelConfig(backbone="tiny", image_size=64), id_salt=SALT)


def test_duplicates_are_still_detected_with_a_salt(salted_index, two_exam_archive, model_dir, tmp_path):
    from ctsearch.jobs.index import index_source

    copy = tmp_path / "copy"
    shutil.copytree(two_exam_archive, copy)  # other paths, same series and contents
    summary = index_source(copy, model_dir, salted_index, shard_volumes=2, batch_size=32, id_salt=SALT)
    assert summary.duplicates_skipped == 4 and summary.rows_added == 0


def test_a_pseudonymised_manifest_needs_its_own_salt(tmp_path, two_exam_archive):
    from ctsearch.jobs.index import resolve_source

    prepare(two_exam_archive, tmp_path / "p", id_salt=SALT)
    manifest = tmp_path / "p" / "manifest.parquet"
    for salt, problem in [(None, "pseudonymised"), (OTHER, "another salt")]:
        with pytest.raises(CTSearchInputError, match=problem):
            resolve_source(manifest, salt)
    tasks, _ = resolve_source(manifest, SALT)
    assert {t["patient_id"] for t in tasks} == {
        pseudonymise("synth-0000", SALT),
        pseudonymise("synth-0001", SALT),
    }


def test_explain_on_a_salted_index_hashes_the_query_and_takes_the_original_id(
    salted_index, two_exam_archive, salt_files, tmp_path
):
    query = two_exam_archive / "imagesTr" / "liver_0.nii.gz"
    r = CliRunner().invoke(
        app,
        [
            "explain",
            str(salted_index),
            str(query),
            "--slice",
            "20",
            "-k",
            "2",
            "--masks",
            "8",
            "--exclude-patient",
            "synth-0000",
            "--id-salt-file",
            str(salt_files[0]),
            "--no-png",
            "--out",
            str(tmp_path / "q"),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    p0 = pseudonymise("synth-0000", SALT)
    assert res["query"]["patient_id"] == p0
    assert len(res["hits"]) == 2 and all(
        h["patient_id"] == pseudonymise("synth-0001", SALT) for h in res["hits"]
    )
    assert b"synth-0000" not in (tmp_path / "q" / "maps.npz").read_bytes()


def test_a_pseudonymised_dicom_manifest_indexes_with_its_salt(
    synth_archive, model_dir, ray_session, tmp_path
):
    """The manifest names each DICOM series by its pseudonym; the index job finds the series by it."""
    from ctsearch.io import scan_archive
    from ctsearch.jobs.index import index_source

    prepare(synth_archive / "dicom", tmp_path / "p", id_salt=SALT)
    out = tmp_path / "idx"
    summary = index_source(
        tmp_path / "p" / "manifest.parquet", model_dir, out, shard_volumes=4, batch_size=64, id_salt=SALT
    )
    assert summary.volumes_indexed == 8 and summary.volumes_failed == 0, summary
    entries = scan_archive(synth_archive / "dicom")[0]
    rows = pq.read_table(out / "embeddings", columns=["volume_id", "series_id", "patient_id"]).to_pylist()
    assert {r["series_id"] for r in rows} == {pseudonymise(e.series_id, SALT) for e in entries}
    assert all(r["volume_id"] == r["series_id"] for r in rows)
    uids = {u for e in entries for u in (e.study_id, e.series_id)}
    assert _leaks(out, uids) == []


def test_no_salt_file_means_no_salt():
    assert load_salt(None) is None
