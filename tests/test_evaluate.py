"""ctsearch evaluate on the synthetic slice dataset: metrics agree with the library, table and JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ctsearch.cli.main import app
from ctsearch.jobs.evaluate import markdown_table, summary_stats
from ctsearch.metrics import knn_accuracy, map_at_k
from ctsearch.model import ModelConfig, build_encoder, embed, save_encoder
from ctsearch.store import read_slices


def test_evaluate_cli_table_and_json(slice_dataset, ray_session, tmp_path):
    cfg = ModelConfig(backbone="tiny", image_size=64)
    runs = []
    for s in (1, 2):
        torch.manual_seed(s)
        runs.append(save_encoder(build_encoder(cfg).eval(), cfg, tmp_path / f"r{s}"))
    args = [
        "evaluate",
        str(slice_dataset),
        "--model",
        str(runs[0]),
        "--model",
        str(runs[1]),
        "--name",
        "tiny",
        "--name",
        "tiny",
        "--baseline",
        "random",
        "--relax-masks",
        "12",
    ]
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert [row["name"] for row in res["rows"]] == ["tiny", "random init (seed 0), tiny"]
    assert res["shared_patients"] == 0  # measured on the split, not assumed
    tiny = res["rows"][0]
    assert tiny["n"] == 2 and len(tiny["map"]["values"]) == 2
    assert tiny["map"]["mean"] == pytest.approx(np.mean(tiny["map"]["values"]))
    assert tiny["map"]["std"] == pytest.approx(np.std(tiny["map"]["values"], ddof=1))
    # The job's numbers are the library's metrics on the same embeddings.
    train, test = read_slices(slice_dataset / "train.parquet"), read_slices(slice_dataset / "test.parquet")
    from ctsearch.model import load_encoder

    enc, c = load_encoder(runs[0])
    with torch.inference_mode():
        db, q = embed(enc, train.hu, c), embed(enc, test.hu, c)
    run0 = res["runs"][0]
    assert run0["map"] == pytest.approx(map_at_k(q, test.label, db, train.label, k=5), abs=1e-6)
    assert run0["acc"] == pytest.approx(knn_accuracy(q, test.label, db, train.label, k=5), abs=1e-6)
    assert 0 <= run0["rr"] <= 1 and run0["rr_slices"] == int(np.sum(test.label == 1))
    r = CliRunner().invoke(app, [*args[:4], "--relax-masks", "0"])
    assert r.exit_code == 0, r.output
    assert "| pretraining | runs | MAP@5 | ACC (5-NN) | RR |" in r.stdout and "n/a" in r.stdout


def test_table_formatting():
    rows = [
        {
            "name": "a",
            "n": 2,
            "map": summary_stats([0.9, 0.88]),
            "acc": summary_stats([0.8, 0.9]),
            "rr": summary_stats([0.1, 0.2]),
        },
        {
            "name": "b",
            "n": 1,
            "map": summary_stats([0.5]),
            "acc": summary_stats([0.5]),
            "rr": summary_stats([float("nan")]),
        },
    ]
    t = markdown_table(rows, 5).splitlines()
    assert t[2] == "| a | 2 | 89.0 ± 1.4 | 85.0 ± 7.1 | 15.00 ± 7.07 |"
    assert t[3] == "| b | 1 | 50.0 | 50.0 | n/a |"


def test_evaluate_errors(slice_dataset, tmp_path):
    r = CliRunner().invoke(app, ["evaluate", str(slice_dataset)])
    assert r.exit_code == 1 and "nothing to evaluate" in r.output
    r = CliRunner().invoke(app, ["evaluate", str(slice_dataset), "--model", str(tmp_path)])
    assert r.exit_code == 1 and "not a model directory" in r.output
    r = CliRunner().invoke(app, ["evaluate", str(tmp_path), "--baseline", "random", "--backbone", "tiny"])
    assert r.exit_code == 1 and "no train split" in r.output


def test_imagenet_baseline_from_a_local_file_is_evaluated_with_those_weights(
    slice_dataset, ray_session, tmp_path
):
    from torchvision.models import resnet18

    from ctsearch.model import initial_encoder_state

    torch.manual_seed(4)
    weights = tmp_path / "resnet18-imagenet.pth"
    torch.save(resnet18().state_dict(), weights)  # stands in for torchvision's file: same keys and shapes
    r = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(slice_dataset),
            "--baseline",
            "imagenet",
            "--weights",
            str(weights),
            "--backbone",
            "resnet18",
            "--image-size",
            "64",
            "--relax-masks",
            "0",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)["runs"][0]
    cfg = ModelConfig(backbone="resnet18", image_size=64)
    enc = build_encoder(cfg)
    enc.load_state_dict(initial_encoder_state("imagenet", cfg, weights=weights))
    train, test = read_slices(slice_dataset / "train.parquet"), read_slices(slice_dataset / "test.parquet")
    with torch.inference_mode():
        db, q = embed(enc.eval(), train.hu, cfg), embed(enc, test.hu, cfg)
    assert row["map"] == pytest.approx(map_at_k(q, test.label, db, train.label, k=5), abs=1e-6)
