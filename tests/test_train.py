"""``ctsearch train`` on Ray Train: learning, resume, worker-failure recovery, two workers, CLI."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ctsearch.errors import CTSearchInputError
from ctsearch.jobs.train import (
    CHECKPOINT_DIR,
    FAIL_ENV,
    FAIL_MARKER,
    TrainOptions,
    _load_checkpoint,
    _save_checkpoint,
    read_metrics,
    train,
)
from ctsearch.model import ModelConfig, SimSiam, embed, load_encoder
from ctsearch.ssl import build_optimizer
from ctsearch.store import SliceSet, read_slices, write_slices

OFFSET_SD = 120.0


def _phantoms(n: int, seed: int, size: int = 64) -> SliceSet:
    """Abdomen-like slices: a soft-tissue body with random bright/dark distractors; odd rows add a liver.

    Each slice's body is shifted by a random HU offset (sd OFFSET_SD HU): a nuisance that dominates
    untrained features and that SimSiam's brightness/contrast jitter teaches the encoder to ignore.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    hu = np.full((n, size, size), -1000, np.int16)
    mask = np.zeros((n, size, size), np.uint8)
    label = (np.arange(n) % 2).astype(np.int8)
    for i in range(n):
        body = ((yy - 0.5) / 0.42) ** 2 + ((xx - 0.5) / 0.46) ** 2 < 1
        img = np.where(body, rng.normal(-20, 25, (size, size)), -1000.0)
        for _ in range(rng.integers(1, 4)):  # bone / gas distractors anywhere in the body
            cy, cx, r = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.03, 0.08)
            img[((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) & body] = rng.choice([500.0, -900.0])
        if label[i]:
            cy, cx = rng.uniform(0.35, 0.5), rng.uniform(0.3, 0.45)
            liver = (
                ((yy - cy) / rng.uniform(0.15, 0.22)) ** 2 + ((xx - cx) / rng.uniform(0.18, 0.25)) ** 2 < 1
            ) & body
            img[liver] = rng.normal(100, 8, liver.sum())
            mask[i][liver] = 1
        hu[i] = np.where(body, img + rng.normal(0, OFFSET_SD), img).clip(-1000, 2000).astype(np.int16)
    ids = np.array([f"v{seed}_{i // 5}" for i in range(n)], dtype=object)
    return SliceSet(
        hu=hu,
        mask=mask,
        label=label,
        volume_id=ids,
        patient_id=ids,
        slice_index=np.arange(n, dtype=np.int32),
        z_mm=np.arange(n, dtype=np.float64),
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small slice dataset in the layout of ``ctsearch prepare`` (train.parquet, test.parquet)."""
    out = tmp_path_factory.mktemp("slices")
    write_slices(_phantoms(96, seed=0), out / "train.parquet")
    write_slices(_phantoms(100, seed=1), out / "test.parquet")
    return out


def _opts(**kw) -> TrainOptions:
    base = dict(
        backbone="tiny", image_size=64, init="random", epochs=2, batch_size=16, eval_every=1, max_failures=0
    )
    return TrainOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def run2(ray_session, dataset, tmp_path_factory) -> tuple[Path, dict]:
    """(run folder, summary) of 2 epochs, evaluated at each; shared, so tests that go on from it
    train a copy (Ray Train's checkpoint snapshot names its checkpoints relative to the run)."""
    out = tmp_path_factory.mktemp("run2") / "run"
    return out, train(dataset, out, _opts(epochs=2))


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_run_dir_is_complete_and_rerun_resumes_at_next_epoch(run2, dataset, tmp_path):
    run, s1 = run2
    out = _copy(run, tmp_path)
    rows1 = read_metrics(out)
    assert [r["epoch"] for r in rows1] == [0, 1, 2] and s1["epochs"] == 2
    assert all(np.isfinite(r["loss"]) for r in rows1[1:])
    config = json.loads((out / "config.json").read_text())
    assert config["options"]["seed"] == 0 and config["options"]["views"] == "clinical"
    assert {"torch", "ray", "ctsearch"} <= set(config["versions"])
    ckpts = sorted(p for p in (out / CHECKPOINT_DIR).glob("checkpoint_*") if p.is_dir())
    assert ckpts, "no checkpoint written"
    _, _, epoch = _load_checkpoint(str(ckpts[-1]))  # safetensors + torch.load(weights_only=True)
    assert epoch == 2

    s2 = train(dataset, out, _opts(epochs=3))
    rows2 = read_metrics(out)
    assert [r["epoch"] for r in rows2] == [0, 1, 2, 3]
    assert rows2[:3] == rows1, "epochs 1-2 were trained or evaluated again"
    assert s2["resumed_after_epoch"] == 2 and s2["epochs"] == 3

    encoder, cfg = load_encoder(out)
    assert cfg.backbone == "tiny" and cfg.image_size == 64
    test = read_slices(dataset / "test.parquet")
    assert embed(encoder, test.hu[:4], cfg).shape == (4, 128)


def test_rerun_with_other_options_is_refused_and_leaves_the_run_as_it_was(run2, dataset):
    run, _ = run2
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(CTSearchInputError, match="--views 'clinical' -> 'standard'"):
        train(dataset, run, _opts(epochs=3, views="standard"))
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_run_from_before_the_newer_options_still_resumes(run2, dataset, tmp_path):
    """config.json of a run made before --crop-scale, --train-slices and --zero-init-residual existed."""
    out = _copy(run2[0], tmp_path)
    config = json.loads((out / "config.json").read_text())
    for key in ("crop_scale", "train_slices", "zero_init_residual"):
        del config["options"][key]
    (out / "config.json").write_text(json.dumps(config))
    s = train(dataset, out, _opts(epochs=3))
    assert s["resumed_after_epoch"] == 2 and s["epochs"] == 3


def test_a_run_directory_has_one_writer(dataset, tmp_path):
    from ctsearch.store import lock_dir

    out = tmp_path / "run"
    with lock_dir(out, "`ctsearch train`"):  # as a training process holds it
        with pytest.raises(CTSearchInputError, match="another `ctsearch train` is writing to this folder"):
            train(dataset, out, _opts(epochs=1, eval_every=0))
    assert not (out / "config.json").exists()  # refused before touching the run


def test_worker_failure_restarts_from_last_checkpoint(ray_session, dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv(FAIL_ENV, "2")
    train(dataset, out, _opts(epochs=3, eval_every=0, max_failures=1))
    failed_at = (out / FAIL_MARKER).stat().st_mtime
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[0]["finished_at"] < failed_at, "epoch 1 was trained again after the failure"
    assert rows[1]["finished_at"] > failed_at


def test_failure_without_retries_fails_and_rerun_resumes(ray_session, dataset, tmp_path, monkeypatch):
    """A crash mid-run (no retries left) leaves a run that the same command finishes."""
    out = tmp_path / "run"
    monkeypatch.setenv(FAIL_ENV, "2")
    with pytest.raises(Exception):  # noqa: B017 - whatever Ray Train wraps the worker failure in
        train(dataset, out, _opts(epochs=3, eval_every=0, max_failures=0))
    assert [r["epoch"] for r in read_metrics(out)] == [1]
    first = read_metrics(out)[0]
    s = train(dataset, out, _opts(epochs=3, eval_every=0, max_failures=0))  # marker exists: no second failure
    assert s["resumed_after_epoch"] == 1
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[0] == first


def test_training_learns_and_does_not_collapse(ray_session, dataset, tmp_path):
    out = tmp_path / "run"
    # A high lr so that three dozen steps of a tiny model show the effect (seeded, so deterministic;
    # measured here: 5-NN accuracy 0.80 untrained -> 0.87, MAP@5 0.77 -> 0.85).
    train(dataset, out, _opts(epochs=6, eval_every=6, base_lr=1.0, views="standard"))
    rows = read_metrics(out)
    untrained, trained = rows[0], rows[-1]
    assert [r["epoch"] for r in rows if "knn_accuracy" in r] == [0, 6]
    assert trained["embedding_std"] > 0.2 / np.sqrt(128), rows
    assert trained["knn_accuracy"] > untrained["knn_accuracy"], rows
    assert trained["map_at_5"] > untrained["map_at_5"], rows


@pytest.mark.parametrize("read_by", ["driver", "ray-data"])
def test_a_slice_with_the_wrong_byte_count_is_one_line_naming_file_and_slice(
    ray_session, dataset, tmp_path, monkeypatch, read_by
):
    """A train.parquet whose checksums hold but one slice's pixels are short (another tool wrote
    it): one line before training, whichever reads the file, not a worker's traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import error_line

    from ctsearch.cli.main import app
    from ctsearch.jobs import train as train_job

    bad = tmp_path / "bad"
    bad.mkdir()
    t = pq.read_table(dataset / "train.parquet")
    hu = t.column("hu").to_pylist()
    hu[5] = hu[5][:100]
    i = t.schema.get_field_index("hu")
    pq.write_table(t.set_column(i, t.schema.field(i), pa.array(hu, pa.binary())), bad / "train.parquet")
    shutil.copy(dataset / "test.parquet", bad / "test.parquet")
    if read_by == "ray-data":  # the path of a dataset too large for the driver to read
        monkeypatch.setattr(train_job, "SMALL_DATASET_BYTES", 0)
    args = ["train", str(bad), str(tmp_path / "run"), "--backbone", "tiny", "--image-size", "64"]
    r = CliRunner().invoke(app, [*args, "--init", "random", "--epochs", "1", "--eval-every", "0"])
    line = error_line(r)
    assert (
        str(bad / "train.parquet") in line
        and "volume v0_1 slice 5: hu holds 100 bytes, not 64x64 int16" in line
    )
    assert not (tmp_path / "run" / "encoder.safetensors").exists()


def test_check_pixel_rows_names_nulls_sizes_and_masks():
    import pyarrow as pa

    from ctsearch.store import check_pixel_rows

    def table(**cols):
        base = {"height": [2, 2], "width": [3, 3], "hu": [b"\0" * 12] * 2, "mask": [b"\0" * 6] * 2}
        return pa.table({**base, **cols})

    good = table()
    assert check_pixel_rows(good, "s.parquet") is good
    cases = [
        (dict(hu=[b"\0" * 12, None]), "row 1: hu holds no bytes (null), not 2x3 int16 (12)"),
        (dict(height=[2, 0]), "row 1: hu holds 12 bytes, not 0x3 int16 (0)"),
        (dict(width=[None, 3]), "row 0: hu holds 12 bytes, not 2x0 int16 (0)"),
        (dict(mask=[b"\0" * 6, b"\0" * 12]), "row 1: mask holds 12 bytes, not 2x3 uint8 (6)"),
    ]
    for cols, problem in cases:
        with pytest.raises(CTSearchInputError, match=re.escape(f"s.parquet: {problem}")):
            check_pixel_rows(table(**cols), "s.parquet")


def test_training_checkpoint_roundtrip_gives_identical_embeddings(dataset, tmp_path):
    cfg = ModelConfig(backbone="tiny", image_size=64)
    torch.manual_seed(0)
    model = SimSiam(cfg)
    model(torch.rand(8, 3, 64, 64), torch.rand(8, 3, 64, 64))  # move BN statistics off their defaults
    opt = build_optimizer(model, batch_size=8)
    _save_checkpoint(model, opt, 7, str(tmp_path))
    model_state, optim_state, epoch = _load_checkpoint(str(tmp_path))
    restored = SimSiam(cfg)
    restored.load_state_dict(model_state)
    build_optimizer(restored, batch_size=8).load_state_dict(optim_state)
    hu = read_slices(dataset / "test.parquet").hu[:6]
    assert epoch == 7
    np.testing.assert_array_equal(embed(restored.encoder, hu, cfg), embed(model.encoder, hu, cfg))


def test_cli_train_one_line_errors(dataset, tmp_path):
    """Bad input fails before Ray starts (a CLI training run, with --json and --workers 2, is
    test_train_options.test_cli_prepare_and_train_accept_the_options)."""
    from ctsearch.cli.main import app

    runner = CliRunner()
    r = runner.invoke(app, ["train", str(tmp_path / "nowhere"), str(tmp_path / "x"), "--init", "random"])
    assert r.exit_code == 1 and "train.parquet" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["train", str(dataset), str(tmp_path / "y"), "--backbone", "vgg"])
    # a choice is checked while parsing: a usage error (exit 2) naming the value, before Ray starts
    assert r.exit_code == 2 and "'vgg' is not one of" in r.output and "Traceback" not in r.output
