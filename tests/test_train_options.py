"""Options that make small synthetic runs informative: every train slice, crop scale, residual BN init."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import error_line
from typer.testing import CliRunner

from ctsearch.errors import CTSearchInputError
from ctsearch.jobs.train import TrainOptions, check_options, read_metrics, train
from ctsearch.model import ModelConfig, SimSiam, build_encoder, embed, set_residual_bn
from ctsearch.prepare import prepare
from ctsearch.store import read_slices
from ctsearch.views import TwoViews, augmentation


def _opts(**kw) -> TrainOptions:
    base = dict(
        backbone="tiny", image_size=64, init="random", epochs=1, batch_size=16, eval_every=0, max_failures=0
    )
    return TrainOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def prepared_all(synth_archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared_all")
    summary = prepare(
        synth_archive / "nifti",
        out,
        protocol="decathlon",
        per_volume=5,
        train_volumes=6,
        seed=0,
        all_train_slices=True,
    )
    return out, summary


def test_prepare_all_train_slices_writes_every_slice_of_the_train_volumes(prepared_all, slice_dataset):
    out, summary = prepared_all
    every = read_slices(out / "train_all.parquet")
    train_s, test_s = read_slices(out / "train.parquet"), read_slices(out / "test.parquet")
    # The protocol files are the same with and without the option.
    plain = read_slices(slice_dataset / "train.parquet")
    np.testing.assert_array_equal(train_s.hu, plain.hu)
    np.testing.assert_array_equal(train_s.label, plain.label)
    np.testing.assert_array_equal(test_s.hu, read_slices(slice_dataset / "test.parquet").hu)
    # Every slice of each train volume, once, in order; none of a test volume.
    assert set(every.volume_id) == set(train_s.volume_id)
    assert not set(every.volume_id) & set(test_s.volume_id)
    for vid in set(every.volume_id):
        idx = every.slice_index[every.volume_id == vid]
        np.testing.assert_array_equal(idx, np.arange(idx.size))
    assert summary["train_all_slices"] == len(every) > len(train_s)
    # Labels follow the masks, and the protocol slices are the same images in both files.
    np.testing.assert_array_equal(every.label, every.mask.reshape(len(every), -1).max(axis=1) > 0)
    assert 0 < every.label.sum() < len(every)
    key = {(v, i): k for k, (v, i) in enumerate(zip(every.volume_id, every.slice_index))}
    rows = [key[(v, i)] for v, i in zip(train_s.volume_id, train_s.slice_index)]
    np.testing.assert_array_equal(every.hu[rows], train_s.hu)
    assert json.loads((out / "protocol.json").read_text())["all_train_slices"] is True
    assert not (slice_dataset / "train_all.parquet").exists()


def test_crop_scale_reaches_the_random_resized_crop():
    assert augmentation(64).transforms[0].scale == (0.2, 1.0)  # the paper's default
    assert augmentation(64, crop_scale=0.5).transforms[0].scale == (0.5, 1.0)
    assert TwoViews(ModelConfig(image_size=32), crop_scale=0.7).augment.transforms[0].scale == (0.7, 1.0)
    with pytest.raises(ValueError, match="crop_scale"):
        augmentation(64, crop_scale=0.0)


def test_crop_scale_one_keeps_the_whole_slice():
    """A bright square in a corner: every full-slice view shows it, small crops often miss it."""
    hu = np.full((32, 64, 64), -200, np.int16)
    hu[:, :8, :8] = 300

    def views(crop_scale):
        torch.manual_seed(0)
        x1, x2 = TwoViews(ModelConfig(image_size=64, views="standard"), crop_scale=crop_scale)(hu)
        return torch.cat([x1, x2])

    # Jitter and flips keep a uniform image uniform, so a view without the square has std 0.
    full = views(1.0).flatten(1).std(dim=1)
    small = views(0.2).flatten(1).std(dim=1)
    assert bool((full > 0.01).all())
    assert int((small < 1e-6).sum()) > 0


def test_set_residual_bn_makes_the_untrained_encoder_full_depth():
    cfg = ModelConfig(backbone="tiny", image_size=64)
    torch.manual_seed(0)
    enc = build_encoder(cfg).eval()
    x = torch.rand(4, 3, 64, 64)
    block = enc.layer2[0]
    assert float(block.bn2.weight.abs().max()) == 0.0  # SimSiam's zero_init_residual
    before = enc(x)
    set_residual_bn(enc, 1.0)
    assert float(block.bn2.weight.min()) == 1.0
    assert not torch.allclose(before, enc(x))
    r50 = set_residual_bn(build_encoder(ModelConfig(backbone="resnet50", image_size=64)), 1.0)
    assert float(r50.layer1[0].bn3.weight.min()) == 1.0


def test_check_options_rejects_bad_new_options():
    for bad in (dict(crop_scale=0.0), dict(crop_scale=1.5), dict(train_slices="every")):
        with pytest.raises(CTSearchInputError):
            check_options(_opts(**bad))


def test_train_on_all_slices_and_untrained_baseline_follows_the_init(ray_session, prepared_all, tmp_path):
    dataset, summary = prepared_all
    n_all = summary["train_all_slices"]
    out = tmp_path / "all"
    train(dataset, out, _opts(train_slices="all", crop_scale=0.5, zero_init_residual=False, eval_every=1))
    rows = read_metrics(out)
    assert rows[-1]["steps"] == n_all // 16 and rows[-1]["steps"] > summary["train_slices"] // 16
    config = json.loads((out / "config.json").read_text())["options"]
    assert (
        config["train_slices"] == "all"
        and config["crop_scale"] == 0.5
        and config["zero_init_residual"] is False
    )

    # Epoch 0 evaluates exactly the seeded initial encoder, with torchvision's residual BN init.
    torch.manual_seed(0)
    model = SimSiam(ModelConfig(backbone="tiny", image_size=64))
    set_residual_bn(model.encoder, 1.0)
    from ctsearch.metrics import map_at_k

    db, q = read_slices(dataset / "train.parquet"), read_slices(dataset / "test.parquet")
    cfg = ModelConfig(backbone="tiny", image_size=64)
    expected = map_at_k(
        embed(model.encoder, q.hu, cfg), q.label, embed(model.encoder, db.hu, cfg), db.label, k=5
    )
    assert rows[0]["epoch"] == 0 and rows[0]["map_at_5"] == pytest.approx(expected)

    # These options define the run: a rerun that changes one is refused.
    with pytest.raises(CTSearchInputError, match="--crop-scale 0.5 -> 0.2"):
        train(dataset, out, _opts(train_slices="all", crop_scale=0.2, zero_init_residual=False, epochs=2))


def test_train_slices_all_without_the_file_is_one_line_error(slice_dataset, tmp_path):
    with pytest.raises(CTSearchInputError, match="train_all.parquet.*--train-all-slices"):
        train(slice_dataset, tmp_path / "run", _opts(train_slices="all"))


def test_cli_prepare_and_train_accept_the_options(ray_session, synth_archive, tmp_path):
    from ctsearch.cli.main import app

    runner = CliRunner()
    prep = tmp_path / "prep"
    r = runner.invoke(
        app,
        [
            "prepare",
            str(synth_archive / "nifti"),
            str(prep),
            "--protocol",
            "decathlon",
            "--train-volumes",
            "6",
            "--train-all-slices",
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (prep / "train_all.parquet").is_file()
    r = runner.invoke(
        app,
        [
            "train",
            str(prep),
            str(tmp_path / "run"),
            "--backbone",
            "tiny",
            "--image-size",
            "64",
            "--init",
            "random",
            "--no-zero-init-residual",
            "--train-slices",
            "all",
            "--crop-scale",
            "0.5",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--eval-every",
            "0",
            "--workers",
            "2",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["epochs"] == 1 and Path(summary["encoder"]).is_file()
    # Every train slice, split equally over 2 workers, 8 per worker batch, drop_last.
    n_all = len(read_slices(prep / "train_all.parquet").hu)
    row = read_metrics(tmp_path / "run")[-1]
    assert row["steps"] == n_all // 2 // 8 and row["images"] == row["steps"] * 16 and np.isfinite(row["loss"])
    options = json.loads((tmp_path / "run" / "config.json").read_text())["options"]
    assert (options["train_slices"], options["crop_scale"], options["zero_init_residual"]) == (
        "all",
        0.5,
        False,
    )
    bad = runner.invoke(
        app,
        [
            "train",
            str(prep),
            str(tmp_path / "bad"),
            "--backbone",
            "tiny",
            "--init",
            "random",
            "--crop-scale",
            "2",
        ],
    )
    assert "--crop-scale" in error_line(bad)
