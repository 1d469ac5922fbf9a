"""`ctsearch demo` end to end at toy size: every step runs and leaves its artefacts."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from ctsearch.cli.demo import demo_steps
from ctsearch.cli.main import app


def test_demo_plan_keeps_test_patients_out_of_training(tmp_path):
    steps = demo_steps(tmp_path, volumes=8, size=64, epochs=2, backbone="tiny", seed=0, masks=10)
    assert [s[0] for s in steps] == ["synth", "prepare", "train", "train", "index", "search", "search", "explain", "evaluate"]
    prepare = steps[1]
    train_volumes = int(prepare[prepare.index("--train-volumes") + 1])
    assert train_volumes == 12  # 6 of 8 patients x 2 exams: both exams of a patient stay on one side
    query = steps[5][2]
    assert query.endswith(f"liver_{train_volumes}.nii.gz")  # the first exam of the first test patient


def test_demo_runs_end_to_end(tmp_path, ray_session):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", str(out), "--volumes", "4", "--size", "32", "--epochs", "1",
                                      "--backbone", "tiny", "--masks", "50"])
    assert result.exit_code == 0, result.output
    index = json.loads((out / "index" / "index.json").read_text())
    assert index["rows"] > 0
    for run in ("hu-clipping", "standard"):
        assert (out / "runs" / run / "encoder.safetensors").is_file()
    assert list((out / "explain").glob("*.png"))
    assert "MAP@5" in result.output and "demo finished" in result.output
