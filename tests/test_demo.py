"""`ctsearch demo` end to end at toy size: every step runs and leaves its artefacts."""

from __future__ import annotations

import json

from test_report import parse_page
from typer.testing import CliRunner

from ctsearch.cli.demo import demo_steps
from ctsearch.cli.main import app


def test_demo_plan_keeps_test_patients_out_of_training(tmp_path):
    steps = demo_steps(tmp_path, volumes=8, size=64, epochs=2, backbone="tiny", seed=0, masks=10)
    assert [s[0] for s in steps] == [
        "synth",
        "prepare",
        "reproduce",
        "index",
        "search",
        "search",
        "explain",
        "report",
    ]
    assert steps[-1] == ["report", str(tmp_path), "--out", str(tmp_path / "report.html")]
    # Table 1 by reproduce into the demo folder, which the report reads (table.json, evaluation.json, runs/)
    reproduce = steps[2]
    assert reproduce[1:3] == [str(tmp_path / "prepared"), str(tmp_path)]
    assert reproduce[reproduce.index("--configs") + 1] == "clinical,standard,none"
    assert reproduce[reproduce.index("--seeds") + 1] == "1" and "--crossexam" in reproduce
    assert steps[3][steps[3].index("--model") + 1] == str(tmp_path / "runs" / "clinical-s0")
    prepare = steps[1]
    train_volumes = int(prepare[prepare.index("--train-volumes") + 1])
    assert train_volumes == 12  # 6 of 8 patients x 2 exams: both exams of a patient stay on one side
    query = steps[4][2]
    assert query.endswith(f"liver_{train_volumes}.nii.gz")  # the first exam of the first test patient


def test_demo_runs_end_to_end(tmp_path, ray_session):
    out = tmp_path / "demo"
    result = CliRunner().invoke(
        app,
        [
            "demo",
            str(out),
            "--volumes",
            "4",
            "--size",
            "32",
            "--epochs",
            "1",
            "--backbone",
            "tiny",
            "--masks",
            "50",
        ],
    )
    assert result.exit_code == 0, result.output
    index = json.loads((out / "index" / "index.json").read_text())
    assert index["rows"] > 0
    for run in ("clinical-s0", "standard-s0", "none-s0"):
        assert (out / "runs" / run / "encoder.safetensors").is_file()
    assert list((out / "explain").glob("*.png"))
    assert "MAP@5" in result.output and "demo finished" in result.output
    table = json.loads((out / "table.json").read_text())
    assert table["compared"] == ["map", "acc", "rr"] and len(table["comparisons"]) == 9
    for c in table["comparisons"]:
        assert c["verdict"] in result.output  # printed with Table 1
    # One test patient: the table says no verdict is possible
    assert (
        table["no_verdict"].startswith("With 1 test patient the smallest p")
        and table["no_verdict"] in result.output
    )
    assert f"Open the report: {out / 'report.html'}" in result.output
    page = parse_page(out / "report.html")  # balanced, self-contained
    text = " ".join(page.text)
    for row in (
        "HU clipping",
        "standard",
        "no self-supervision",
        "95% CI",
        table["comparisons"][0]["verdict"],
    ):
        assert row in text  # the Table-1 rows, intervals and verdicts
    # loss and retrieval curves of both trained runs; the untrained one has its epoch-0 retrieval only
    assert page.tags.count("svg") == 5
    assert any(t == "img" and k == "src" and v.startswith("data:image/png;base64,") for t, k, v in page.attrs)
    assert "Archive and index" in text
    assert "The same anatomy in the patient's earlier examination" in text and "coherent" in text
    assert not any(
        n in text for n in ("No evaluation result", "No training run", "No explain folder", "No index or")
    )
