"""Cross-examination retrieval: ground truth from `ctsearch synth`, the coherent method against plain
top-k, copies of one scan, and the one-exam message (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import index_entries
from typer.testing import CliRunner

from ctsearch.cli.main import app
from ctsearch.crossexam import coherent_match, cross_exam, plain_topk, rank_correlation, score_pair, summarise
from ctsearch.errors import CTSearchInputError
from ctsearch.index import Index, l2_normalize
from ctsearch.io import read_volume, scan_archive
from ctsearch.report import ReportInputs, build_report
from ctsearch.synth import anatomical_positions


@pytest.fixture(scope="module")
def two_exams(tmp_path_factory):
    """3 patients x 2 exams, 64 px, NIfTI + DICOM (seed 3)."""
    from ctsearch.synth import synth_archive

    out = tmp_path_factory.mktemp("two-exams")
    summary = synth_archive(out, volumes=3, seed=3, size=64, fmt="both", exams=2)
    return out, summary


@pytest.fixture(scope="module")
def random_encoder(tmp_path_factory):
    """An untrained tiny encoder with torchvision's residual init (a non-degenerate random baseline)."""
    from ctsearch.model import EncoderSpec, ModelConfig, save_encoder

    encoder, cfg = EncoderSpec.baseline("random", ModelConfig(backbone="tiny", image_size=64), 0, None).load(
        "cpu"
    )
    return save_encoder(encoder.eval(), cfg, tmp_path_factory.mktemp("random-encoder"))


def test_ground_truth_places_the_same_anatomy_at_the_same_value_in_both_exams(two_exams):
    out, summary = two_exams
    truth = anatomical_positions(
        [c.nifti_image for c in summary.cases] + [c.dicom_folder for c in summary.cases]
    )
    for c in summary.cases:
        vol = read_volume(c.nifti_image)
        z = truth[c.nifti_image]
        # The frame: LPS z minus this exam's liver dome; NIfTI and DICOM copies carry the same truth.
        np.testing.assert_allclose(z, vol.z_mm() - c.dome_z_lps, atol=0.02)
        np.testing.assert_array_equal(z, truth[c.dicom_folder])
    for first, second in zip(summary.cases[::2], summary.cases[1::2]):
        assert first.patient_id == second.patient_id and first.scan_range_mm != second.scan_range_mm
        thick = max(first.spacing_mm[0], second.spacing_mm[0])
        for end in (0, 1):  # the liver's first and last slice sit at the same anatomy in both exams
            a = truth[first.nifti_image][first.liver_slices[end]]
            b = truth[second.nifti_image][second.liver_slices[end]]
            assert abs(a - b) <= 2 * thick  # up to a slice each: the tip and the dome are slivers
        assert -2 * thick < truth[first.nifti_image][first.liver_slices[1]] <= 0.5  # the dome is 0
    with pytest.raises(CTSearchInputError, match="synth.json"):
        anatomical_positions([out.parent / "elsewhere.nii.gz"])


def test_coherent_match_recovers_the_offset_where_single_slices_are_ambiguous():
    """A body whose levels repeat every 40 mm (plus a faint unique trace): one slice cannot tell
    which repeat it is, the whole exam can."""
    rng = np.random.default_rng(0)
    period = l2_normalize(rng.standard_normal((40, 64)))
    unique = l2_normalize(rng.standard_normal((400, 64)))

    def exam(z: np.ndarray, repeats: float = 1.0) -> np.ndarray:
        level = np.round(z).astype(int)
        x = repeats * period[level % 40] + 0.15 * unique[level] + 0.3 * rng.standard_normal((len(z), 64)) / 8
        return l2_normalize(x)

    z_a, z_b = 100 + 2.5 * np.arange(80), 60 + 5.0 * np.arange(50)  # anatomy in mm; other range, thickness
    shift_a, shift_b = -700.0, 230.0  # table positions: LPS z = anatomy + shift
    ea, eb = exam(z_a), exam(z_b)
    s = score_pair(ea, z_a + shift_a, z_a, eb, z_b + shift_b, z_b, k=5)
    assert len(s["query"]) == 80  # every query's anatomy lies inside the other scan
    assert np.all(s["coherent_dz"] <= 5.0) and s["coherent_dz"].mean() < s["plain_dz"].mean()
    assert np.mean(s["plain_dz"] > 5.0) > 0.2  # plain top-1 lands on another repeat often
    m = coherent_match(ea @ eb.T, z_a + shift_a, z_b + shift_b, z_a[30] + shift_a, k=5)
    assert m.offset_mm == pytest.approx(shift_b - shift_a, abs=5.0)
    assert m.run.tolist() == list(range(m.best - 2, m.best + 3))
    # The repeat 40 mm away nearly ties: low confidence. Without repeats the match is clear.
    clear = coherent_match(exam(z_a, 0.0) @ exam(z_b, 0.0).T, z_a, z_b, z_a[30], k=5)
    assert m.confidence < 0.5 < clear.confidence and clear.offset_mm == pytest.approx(0.0, abs=2.5)
    summary = summarise([s])
    far = score_pair(ea, z_a, z_a, eb, z_b + 1000, z_b + 1000)  # scans that share no anatomy: no queries
    assert far == {} and summarise([far, s]) == summary and summarise([far])["coherent"]["mean_dz_mm"] is None
    assert summary["coherent"]["within_thickness"] == 1.0
    assert summary["coherent"]["rank_corr"] == pytest.approx(1.0)  # a run is in anatomical order
    assert summary["plain"]["mean_dz_mm"] > summary["coherent"]["mean_dz_mm"]


def test_one_slice_alone_is_plain_argmax_and_runs_stay_inside_the_exam():
    profile = np.array([0.1, 0.9, 0.3, 0.95, 0.2])
    z = np.arange(5) * 3.0
    m = coherent_match(profile[None], np.zeros(1), z, 0.0, k=3)
    assert m.best == 3 == plain_topk(profile, 1)[0] and m.run.tolist() == [2, 3, 4]
    assert coherent_match(profile[None], np.zeros(1), z, 0.0, k=9).run.tolist() == [0, 1, 2, 3, 4]
    assert plain_topk(profile, 3).tolist() == [3, 1, 2]
    assert rank_correlation(np.arange(3), np.array([1.0, 2.0, 3.0])) == pytest.approx(1.0)
    assert rank_correlation(np.arange(3), np.array([3.0, 2.0, 1.0])) == pytest.approx(-1.0)


def test_coherent_beats_plain_topk_on_a_synthetic_archive(two_exams, random_encoder):
    """Real phantoms, an untrained encoder: the whole-exam offset lands far more top-1 slices
    within one slice thickness of the truth than plain top-k."""
    import torch

    from ctsearch.model import embed, load_encoder

    _, summary = two_exams
    encoder, cfg = load_encoder(random_encoder)
    truth = anatomical_positions([c.nifti_image for c in summary.cases])
    exams = []
    for c in summary.cases:
        vol = read_volume(c.nifti_image)
        with torch.inference_mode():
            exams.append((l2_normalize(embed(encoder, vol.hu, cfg)), vol.z_mm(), truth[c.nifti_image]))
    scores = [score_pair(*exams[i], *exams[i ^ 1], k=5) for i in range(len(exams))]
    s = summarise(scores)
    assert s["queries"] > 100
    # Measured 0.48 vs 0.11 within one thickness, 9 vs 75 mm mean |dz|: margins for other BLAS.
    assert s["coherent"]["within_thickness"] > s["plain"]["within_thickness"] + 0.25
    assert s["coherent"]["mean_dz_mm"] < s["plain"]["mean_dz_mm"] / 2
    assert s["coherent"]["run_overlap"] > s["plain"]["run_overlap"]


@pytest.fixture(scope="module")
def both_formats_index(two_exams, random_encoder, tmp_path_factory):
    """Patients 0 and 1 with both exams in NIfTI and DICOM; patient 2 with its first exam only, twice."""
    out, summary = two_exams
    entries = scan_archive(out / "nifti")[0] + scan_archive(out / "dicom")[0]
    p2_exam2 = {summary.cases[5].case, summary.cases[5].dicom_folder}
    keep = [e for e in entries if e.volume_id not in p2_exam2 and e.path not in p2_exam2]
    return index_entries(keep, random_encoder, tmp_path_factory.mktemp("both") / "idx", volumes_per_shard=3)


def test_a_copy_of_the_query_scan_is_not_another_exam(two_exams, both_formats_index):
    _, summary = two_exams
    index = Index.open(both_formats_index)
    first, second = summary.cases[0], summary.cases[1]
    v, meta = index.lookup(first.case, 20)
    res = cross_exam(index, v, first.patient_id, exclude_volume=first.case, query_slice=20)
    # Exam 1 as DICOM has the query's pixels: left out. Exam 2 appears once, its copy named.
    assert len(res["exams"]) == 1 and res["message"] is None
    (exam,) = res["exams"]
    assert {exam["volume_id"], *exam["copies"]} == {second.case, _dicom_volume_id(index, second)}
    assert res["copies_of_query"] == [_dicom_volume_id(index, first)]
    zs = [m["z_mm"] for m in exam["matches"]]
    assert zs == sorted(zs) and len(zs) == 5 and exam["best"] in exam["matches"]
    assert 0.0 <= exam["confidence"] <= 1.0
    assert res["context_slices"] == first.shape[0]  # the whole query exam was aligned


def test_one_exam_gets_a_message_not_an_empty_table(two_exams, both_formats_index):
    _, summary = two_exams
    only = summary.cases[4]  # patient 2: its first exam, as NIfTI and as DICOM
    r = CliRunner().invoke(
        app, ["search", str(both_formats_index), f"{only.case}:10", "--cross-exam", "--json"]
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["exams"] == [] and res["copies_of_query"]
    assert "no other examination" in res["message"] and "copy of the query's own scan" in res["message"]
    r = CliRunner().invoke(app, ["search", str(both_formats_index), f"{only.case}:10", "--cross-exam"])
    assert r.exit_code == 0 and "no other examination of this patient" in r.stdout
    # A file query is recognised by its pixels too: the indexed DICOM copy of the file is not offered.
    r = CliRunner().invoke(
        app, ["search", str(both_formats_index), only.dicom_folder, "--cross-exam", "--json"]
    )
    assert r.exit_code == 0 and json.loads(r.stdout)["exams"] == []


def test_a_file_query_aligns_its_whole_series_when_the_index_lacks_it(two_exams, random_encoder, tmp_path):
    _, summary = two_exams
    first, second = summary.cases[0], summary.cases[1]
    later = [e for e in scan_archive(Path(second.nifti_image).parent.parent)[0] if e.volume_id == second.case]
    idx = index_entries(later, random_encoder, tmp_path / "idx")
    args = ["search", str(idx), first.nifti_image, "--slice", "30", "--cross-exam", "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert [e["volume_id"] for e in res["exams"]] == [second.case]
    assert res["context_slices"] == first.shape[0] and res["copies_of_query"] == []


def test_evaluate_measures_both_methods_and_refuses_one_exam_archives(
    two_exams, random_encoder, slice_dataset, tmp_path
):
    from ctsearch.jobs.evaluate import evaluate
    from ctsearch.prepare import prepare

    out, _ = two_exams
    prepare(out / "nifti", tmp_path / "p", protocol="decathlon", train_volumes=2, seed=0)
    res = evaluate(tmp_path / "p", [str(random_encoder)], relax_masks=0, crossexam=True).to_json()
    c = res["crossexam"]
    assert c["patients"] == 2 and c["exam_pairs"] == 4 and c["queries"] > 50
    methods = {r["method"]: r for r in c["rows"]}
    assert methods["coherent"]["mean_dz_mm"] < methods["plain"]["mean_dz_mm"]
    assert "plain top-5" in c["table"] and "coherent" in c["table"]
    ex = c["example"]
    assert ex["coherent"]["best"] in ex["coherent"]["run"] and len(ex["plain"]) == 5
    assert 0 <= ex["true_slice"] < len(ex["anatomical_mm"])
    # The report shows the table and the example: query, matched run, truth, plain top-k.
    (tmp_path / "evaluation.json").write_text(json.dumps(res))
    page, info = build_report(ReportInputs(evaluation=tmp_path / "evaluation.json"))
    assert "crossexam" in info["sections"] and "coherent (one z offset per exam)" in page
    assert page.count("data:image/png;base64,") == 1 and "No example figure" not in page
    with pytest.raises(CTSearchInputError, match="two examinations"):
        evaluate(slice_dataset, [str(random_encoder)], relax_masks=0, crossexam=True)


def _dicom_volume_id(index: Index, case) -> str:
    rows = [m for j, ids in enumerate(index.patient_rows(case.patient_id)) for m in index.rows(j, ids)]
    return next(m["volume_id"] for m in rows if m["path"] == case.dicom_folder)
