"""ctsearch.stats against hand computations, and `ctsearch reproduce` as a Ray Tune grid that resumes."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from ctsearch.stats import Comparison, bootstrap_ci, paired_comparison, sign_flip_p, verdict

# ----------------------------------------------------------------------------- statistics (no Ray)


def test_bootstrap_ci_of_two_values_spans_them_and_is_deterministic():
    # Resampled means of [a, b] are a, (a+b)/2, b with probability 1/4, 1/2, 1/4: the 2.5% and
    # 97.5% quantiles are a and b.
    assert bootstrap_ci(np.array([0.2, 0.6]), n_boot=4000, seed=3) == pytest.approx((0.4, 0.2, 0.6))
    assert bootstrap_ci(np.array([0.1, 0.5, 0.9]), seed=1) == bootstrap_ci(np.array([0.1, 0.5, 0.9]), seed=1)


def test_bootstrap_ci_of_constant_scores_is_a_point_and_shrinks_with_queries():
    assert bootstrap_ci(np.full(7, 0.3), n_boot=200) == pytest.approx((0.3, 0.3, 0.3))
    few = bootstrap_ci(np.tile([0.0, 1.0], 10))
    many = bootstrap_ci(np.tile([0.0, 1.0], 1000))
    # Binomial p = 0.5: half-width ~ 1.96 * 0.5 / sqrt(n): 0.22 for n = 20, 0.022 for n = 2000.
    assert few[2] - few[1] == pytest.approx(2 * 1.96 * 0.5 / np.sqrt(20), rel=0.15)
    assert many[2] - many[1] == pytest.approx(2 * 1.96 * 0.5 / np.sqrt(2000), rel=0.1)


def test_sign_flip_p_exact_by_hand():
    # d = [1, 2, 3], mean 2: of the 8 sign patterns only +++ and --- reach |mean| >= 2.
    assert sign_flip_p(np.array([1.0, 2.0, 3.0])) == 0.25
    # d = [1, -1]: every pattern has |mean| 0 or 1 >= 0: p = 1.
    assert sign_flip_p(np.array([1.0, -1.0])) == 1.0
    # d = [2, 1, 1, 1]: mean 1.25; |mean| >= 1.25 needs 2 with the three ones' majority sign and
    # all three alike (+-  -> 5/4 only with all signs equal): 2 of 16.
    assert sign_flip_p(np.array([2.0, 1.0, 1.0, 1.0])) == 2 / 16


def test_sign_flip_p_sampled_for_many_queries_is_never_zero():
    p = sign_flip_p(np.ones(40), n_perm=999, seed=0)
    assert p == pytest.approx(1 / 1000)  # only the observed pattern reaches mean 1 (2 of 2**40)


def test_paired_comparison_by_hand():
    # Two seeds x three queries; the differences are [[0.1, 0.1, 0.1], [0.3, 0.3, 0.3]].
    a = np.array([[0.5, 0.6, 0.7], [0.8, 0.9, 1.0]])
    b = a - np.array([[0.1], [0.3]])
    c = paired_comparison(a, b, n_boot=4000, seed=0)
    assert (c.seeds, c.queries) == (2, 3)
    assert c.difference == pytest.approx(0.2)
    # Queries do not matter (constant within a seed); resampling the two seeds gives 0.1, 0.2 or 0.3.
    assert (c.low, c.high) == pytest.approx((0.1, 0.3))
    # Per-query mean differences [0.2, 0.2, 0.2]: only +++ and --- reach 0.2, 2 of 8.
    assert c.p_value == 0.25
    same = paired_comparison(a, a, n_boot=100)
    assert (same.difference, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError):
        paired_comparison(a, a[:1])


def test_grouped_statistics_resample_and_flip_whole_patients_by_hand():
    # Two patients with slice scores [0, 0] and [1, 1]: resampling patients gives means 0, 0.5, 1.
    assert bootstrap_ci(
        np.array([0.0, 0.0, 1.0, 1.0]), n_boot=4000, groups=np.array(["p", "p", "q", "q"])
    ) == (pytest.approx((0.5, 0.0, 1.0)))
    # Differences [1, 1, 2] of patients [a, a, b]: per patient 2 and 2, so only ++ and -- of the
    # 4 patient sign patterns reach the observed |mean|: p = 1/2 (query by query it is 2/8).
    a, b = np.array([[1.0, 1.0, 2.0]]), np.zeros((1, 3))
    assert paired_comparison(a, b, n_boot=200, groups=np.array(["a", "a", "b"])).p_value == 0.5
    assert paired_comparison(a, b, n_boot=200).p_value == 0.25
    # Unequal patient sizes: the resampled mean is over the drawn slices, not over patient means.
    # Patients x: [0] and y: [1, 1, 1]; draws xx, xy, yx, yy give 0, 3/4, 3/4, 1.
    mean, low, high = bootstrap_ci(np.array([0.0, 1.0, 1.0, 1.0]), n_boot=4000, groups=np.array([0, 1, 1, 1]))
    assert (mean, low, high) == pytest.approx((0.75, 0.0, 1.0))
    with pytest.raises(ValueError):
        bootstrap_ci(np.ones(3), groups=np.array([0, 1]))


def test_verdicts_claim_a_direction_only_when_the_interval_excludes_zero():
    better = Comparison(0.014, 0.003, 0.025, 0.004, seeds=5, queries=1310)
    assert verdict("HU clipping", "standard", "MAP@5", better) == (
        "HU clipping > standard on MAP@5: +1.4 points, 95% CI [0.3, 2.5], p = 0.004"
    )
    worse = Comparison(-0.02, -0.03, -0.01, 0.01, seeds=3, queries=100)
    assert verdict("A", "B", "ACC (5-NN)", worse).startswith("A < B on ACC (5-NN): -2.0 points")
    # An interval that excludes 0 with a permutation p above 0.05 (few patients) claims nothing.
    few = Comparison(0.13, 0.05, 0.19, 0.125, seeds=2, queries=80)
    assert verdict("A", "B", "MAP@5", few).startswith("no detectable difference between A and B")
    level = Comparison(0.002, -0.008, 0.011, 0.6, seeds=3, queries=100)
    assert verdict("A", "B", "MAP@5", level).startswith("no detectable difference between A and B on MAP@5")


def _evaluation(per_query: dict[str, dict[str, list]], grid) -> dict:
    """evaluate's JSON (per_query) for runs named like the grid, rows as evaluate groups them."""
    from ctsearch.jobs.evaluate import summary_stats
    from ctsearch.jobs.reproduce import LABELS

    runs = []
    for c, s in grid:
        pq = per_query[f"{c}-s{s}"]
        run = {"name": LABELS[c], "source": f"runs/{c}-s{s}", "per_query": pq}
        for key, v in pq.items():
            run[key] = float(np.nanmean(np.array([np.nan if x is None else x for x in v], float)))
        runs.append(run)
    rows = []
    for c in dict.fromkeys(c for c, _ in grid):
        rs = [r for r in runs if r["name"] == LABELS[c]]
        rows.append(
            {"n": len(rs), **{key: summary_stats([r[key] for r in rs]) for key in ("map", "acc", "rr")}}
        )
    n = len(next(iter(per_query.values()))["map"])
    return {"k": 5, "queries": n, "liver_queries": 3, "database": 10, "runs": runs, "rows": rows}


def test_summarise_pairs_rr_on_the_liver_slices_every_run_scored_by_hand():
    from ctsearch.jobs.reproduce import ReproduceOptions, markdown, summarise

    grid = [("clinical", 0), ("clinical", 1), ("standard", 0), ("standard", 1)]
    # Five queries of patients p, p, q, r, r. RR exists for queries 0, 2 and 4 (liver slices);
    # query 4 failed in standard-s1 (a RELAX error), so A and B share queries 0 and 2 only.
    rr = {
        "clinical-s0": [0.6, None, 0.8, None, 0.5],
        "clinical-s1": [0.7, None, 0.9, None, 0.5],
        "standard-s0": [0.5, None, 0.7, None, 0.9],
        "standard-s1": [0.4, None, 0.6, None, None],
    }
    ones = [1.0] * 5
    per_query = {run: {"map": ones, "acc": ones, "rr": v} for run, v in rr.items()}
    patients = np.array(["p", "p", "q", "r", "r"])
    o = ReproduceOptions(configs=("clinical", "standard"), seeds=2, relax_masks=10, n_boot=4000)
    table = summarise(_evaluation(per_query, grid), grid, o, patients)

    (cmp,) = [c for c in table["comparisons"] if c["metric"] == "rr"]
    # Differences on queries 0 and 2: seed 0 [0.1, 0.1], seed 1 [0.3, 0.3]. Mean 0.2; the queries
    # do not matter, resampling the two seeds gives 0.1, 0.2 or 0.3; patients p and q each differ
    # by +0.2 on average: of their 4 sign patterns only ++ and -- reach |0.2|, p = 1/2.
    assert (cmp["queries"], cmp["patients"], cmp["seeds"]) == (2, 2, 2)
    assert cmp["difference"] == pytest.approx(0.2)
    assert (cmp["low"], cmp["high"]) == pytest.approx((0.1, 0.3))
    assert cmp["p_value"] == 0.5
    assert cmp["verdict"].startswith(
        "no detectable difference between HU clipping and standard on RR: +20.0 points"
    )
    clinical, standard = table["rows"]
    # A configuration's interval uses the queries scored in all its seeds: 0, 2, 4 and 0, 2.
    assert (clinical["rr"]["queries"], standard["rr"]["queries"], table["rr_queries"]) == (3, 2, 2)
    assert clinical["map"]["ci"] == [1.0, 1.0] and clinical["map"]["queries"] == 5
    # standard on queries 0 (patient p) and 2 (q): seed 0 [0.5, 0.7], seed 1 [0.4, 0.6]. Drawing
    # seed 1 twice and p twice (probability 1/4 x 1/4 > 2.5%) gives the lowest mean, 0.4; seed 0
    # twice and q twice the highest, 0.7: those are the 2.5% and 97.5% quantiles.
    assert standard["rr"]["ci"] == pytest.approx([0.4, 0.7])
    # One run's interval uses its own scored queries: standard-s1 has 0.4 and 0.6 (two patients).
    assert table["runs"][3]["rr"]["ci"] == pytest.approx([0.4, 0.6])
    md = markdown(table)
    assert "| pretraining | seeds | MAP@5 | 95% CI | ACC (5-NN) | 95% CI | RR | 95% CI |" in md
    assert "for RR the 2 liver slices scored in every run" in md and cmp["verdict"] in md
    assert "| standard-s1 | 100.0 [100.0, 100.0] | 100.0 [100.0, 100.0] | 50.00 [40.00, 60.00] |" in md
    # RR is compared on 2 patients: 4 sign patterns, the smallest p is 2/4: no verdict is possible.
    assert table["no_verdict"].startswith(
        "With 2 test patients the smallest p the sign-flip test can give is 2/2^2 = 0.5"
    )
    assert table["no_verdict"] in md

    # Without RELAX, RR is neither compared nor shown.
    o0 = ReproduceOptions(configs=("clinical", "standard"), seeds=2, relax_masks=0, n_boot=200)
    no_rr = summarise(_evaluation(per_query, grid), grid, o0, patients)
    assert {c["metric"] for c in no_rr["comparisons"]} == {"map", "acc"} and no_rr["rr_queries"] is None
    assert no_rr["no_verdict"].startswith("With 3 test patients")  # MAP and ACC: patients p, q, r
    assert "RR" not in markdown(no_rr)


# ----------------------------------------------------------------------------- reproduce (Ray Tune)


def _base():
    from ctsearch.jobs.train import TrainOptions

    return TrainOptions(
        backbone="tiny", image_size=64, init="random", epochs=1, batch_size=8, eval_every=1, max_failures=0
    )


def test_reproduce_grid_on_tune_matches_evaluate_and_resumes(ray_session, slice_dataset, tmp_path):
    from ctsearch.jobs.evaluate import evaluate
    from ctsearch.jobs.reproduce import ReproduceOptions, reproduce, run_dir
    from ctsearch.jobs.train import read_metrics

    out = tmp_path / "table1"
    opts = ReproduceOptions(configs=("clinical", "none"), seeds=2, n_boot=500, relax_masks=4)
    table = reproduce(slice_dataset, out, _base(), opts)
    assert sorted(table["trained"]) == ["clinical-s0", "clinical-s1", "none-s0", "none-s1"]
    assert table["reused"] == []
    assert (out / "table.md").read_text().startswith("| pretraining | seeds |")
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["runs"][0]["per_query"]["map"]
    # RR per query: a score on each liver slice of the test split (in test order), None elsewhere.
    import pyarrow.parquet as pq

    labels = pq.read_table(slice_dataset / "test.parquet", columns=["label"]).column(0).to_pylist()
    for run in evaluation["runs"]:
        rr = run["per_query"]["rr"]
        assert [v is not None for v in rr] == [label == 1 for label in labels]
        assert np.mean([v for v in rr if v is not None]) == pytest.approx(run["rr"])
    assert table["compared"] == ["map", "acc", "rr"] and table["rr_queries"] == sum(labels)
    on_disk = json.loads((out / "table.json").read_text())
    assert on_disk["rows"] == table["rows"]

    # Every trial left an ordinary run folder; `none` is epoch 0 of the trained run of its seed.
    dirs = {f"{c}-s{s}": run_dir(out.resolve(), c, s) for c in ("clinical", "none") for s in (0, 1)}
    for d in dirs.values():
        assert (d / "config.json").is_file() and (d / "encoder.safetensors").is_file()
    assert [r["epoch"] for r in read_metrics(dirs["clinical-s0"])] == [0, 1]
    for s in (0, 1):
        trained0, untrained = read_metrics(dirs[f"clinical-s{s}"])[0], read_metrics(dirs[f"none-s{s}"])[0]
        assert untrained["map_at_5"] == pytest.approx(trained0["map_at_5"])

    # The table's numbers are evaluate's on the same folders.
    direct = evaluate(
        slice_dataset,
        [dirs["clinical-s0"], dirs["clinical-s1"], dirs["none-s0"], dirs["none-s1"]],
        names=["a", "a", "b", "b"],
        relax_masks=4,
    )
    for row, ref in zip(table["rows"], direct.rows):
        assert row["map"]["mean"] == ref["map"]["mean"] and row["acc"]["std"] == ref["acc"]["std"]
        assert row["rr"]["mean"] == pytest.approx(ref["rr"]["mean"])
        for key in ("map", "rr"):
            assert row[key]["ci"][0] <= row[key]["mean"] <= row[key]["ci"][1]
    by_run = {r["source"]: r for r in direct.runs}
    for r in table["runs"]:
        assert r["map"]["value"] == by_run[r["run"]]["map"]
    for key in ("map", "rr"):
        (cmp,) = [c for c in table["comparisons"] if c["metric"] == key]
        assert (cmp["a"], cmp["b"], cmp["seeds"]) == ("clinical", "none", 2)
        mean = {
            c: np.mean([by_run[str(dirs[f"{c}-s{s}"])][key] for s in (0, 1)]) for c in ("clinical", "none")
        }
        assert cmp["difference"] == pytest.approx(mean["clinical"] - mean["none"])
        assert cmp["verdict"] in (out / "table.md").read_text()

    # A second call (an interrupted reproduce run again) reuses every finished trial.
    metrics_before = {n: (d / "metrics.jsonl").read_bytes() for n, d in dirs.items()}
    mtimes = {n: (d / "encoder.safetensors").stat().st_mtime_ns for n, d in dirs.items()}
    # Evaluation settings are not training settings: the runs are reused with RR off too.
    again = reproduce(slice_dataset, out, _base(), replace(opts, relax_masks=0))
    assert again["trained"] == [] and sorted(again["reused"]) == sorted(dirs)
    assert {n: (d / "metrics.jsonl").read_bytes() for n, d in dirs.items()} == metrics_before
    assert {n: (d / "encoder.safetensors").stat().st_mtime_ns for n, d in dirs.items()} == mtimes
    for row, before in zip(again["rows"], table["rows"]):
        assert row["map"] == before["map"] and row["acc"] == before["acc"]


def test_cli_reproduce_json_and_one_line_errors(ray_session, slice_dataset, tmp_path):
    from conftest import error_line
    from typer.testing import CliRunner

    from ctsearch.cli.main import app

    out = tmp_path / "t"
    args = [
        "reproduce",
        str(slice_dataset),
        str(out),
        "--configs",
        "none",
        "--seeds",
        "1",
        "--backbone",
        "tiny",
    ]
    args += ["--image-size", "64", "--init", "random", "--n-boot", "200", "--quiet"]
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    table = json.loads(res.stdout)
    assert table["trained"] == ["none-s0"] and table["rows"][0]["name"] == "no self-supervision"
    assert table["comparisons"] == []  # one configuration: nothing to compare
    # Settings that change what is trained are refused for a folder that holds other runs.
    assert "other options" in error_line(CliRunner().invoke(app, [*args, "--image-size", "32"]))
    assert "--configs" in error_line(CliRunner().invoke(app, [*args, "--configs", "clinical,hu"]))
