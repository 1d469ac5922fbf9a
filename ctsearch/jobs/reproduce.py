"""``ctsearch reproduce``: Table 1 as one job, a Ray Tune grid of trainings, evaluated, with intervals and verdicts.

One Tune trial per configuration and seed writes an ordinary run folder ``OUT/runs/<config>-s<seed>``:

- ``clinical`` / ``standard``: ``ctsearch.jobs.train.train`` with ``--views`` set to the configuration
  and ``--seed`` to the seed. The trial only drives: it starts the run's own Ray Train V2
  ``TorchTrainer`` (Train inside Tune, as Ray Train V2 supports), whose workers hold the CPUs/GPUs.
- ``none``: no self-supervision, the encoder SimSiam training would start from with that seed
  (``--init``: ImageNet weights, or a seeded random network), saved without training
  (``epochs`` 0 in its config.json, metrics.jsonl holds its epoch-0 evaluation).

A trial whose run folder is finished with the same settings is not started again, so a killed
reproduce resumes: unfinished runs continue from their last checkpoint (``train``'s own resume).
Then every run is evaluated by ``ctsearch.jobs.evaluate.evaluate`` (the same numbers as
``ctsearch evaluate`` on these folders) and ``ctsearch.stats`` adds bootstrap intervals, paired
comparisons and verdicts. Writes ``OUT/table.json``, ``OUT/table.md`` and ``OUT/evaluation.json``
(``ctsearch evaluate --out``'s JSON, with per-query scores).

Example:
    >>> from ctsearch.jobs.train import TrainOptions  # doctest: +SKIP
    >>> reproduce("prepared/", "table1/", TrainOptions(backbone="tiny", image_size=64, init="random", epochs=5))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ctsearch.errors import CTSearchInputError
from ctsearch.jobs.evaluate import EvaluateOptions, evaluate
from ctsearch.jobs.train import (
    METRICS_FILE,
    TrainOptions,
    _prepare_run_dir,
    check_options,
    check_same_run,
    read_metrics,
    read_run_config,
    train,
)
from ctsearch.metrics import METRICS, percent_cell
from ctsearch.stats import N_BOOT, bootstrap_ci, no_verdict_possible, paired_comparison, verdict
from ctsearch.store import atomic_write_bytes, atomic_write_json

CONFIGS = ("clinical", "standard", "none")
LABELS = {"clinical": "HU clipping", "standard": "standard", "none": "no self-supervision"}
# The paper's ordering, pair by pair: the better-claimed configuration first.
PAIRS = (("clinical", "standard"), ("standard", "none"), ("clinical", "none"))
TABLE_JSON, TABLE_MD, EVALUATION_JSON = "table.json", "table.md", "evaluation.json"


@dataclass
class ReproduceOptions:
    """The grid and what is measured; training settings come as a ``TrainOptions`` (``base``)."""

    configs: tuple[str, ...] = CONFIGS
    seeds: int = 5  # seeds 0..seeds-1
    k: int = 5
    relax_masks: int = 0  # RELAX masks per liver slice for RR; 0 skips RR (the slow part)
    n_boot: int = N_BOOT
    max_concurrent: int = 0  # trials at once; 0: as many as the cluster's CPUs (or GPUs) hold
    crossexam: bool = False  # also evaluate's cross-examination retrieval (archives of `synth --exams 2`)


def run_dir(out: Path, config: str, seed: int) -> Path:
    return out / "runs" / f"{config}-s{seed}"


def trial_options(base: TrainOptions, config: str, seed: int) -> TrainOptions:
    """The training options of one trial; ``none`` keeps views (unused) and records 0 epochs."""
    if config == "none":
        return replace(base, seed=seed, epochs=0)
    return replace(base, views=config, seed=seed)


def is_finished(out: Path, opts: TrainOptions) -> bool:
    """OUT holds the finished run of ``opts`` (raises when it holds a run with other settings)."""
    old = read_run_config(out)
    if old is None:
        return False
    check_same_run(out, old, opts)
    done = max((r["epoch"] for r in read_metrics(out)), default=-1)
    return (out / "encoder.safetensors").is_file() and done == opts.epochs


def write_untrained(dataset_dir: Path, out: Path, opts: TrainOptions) -> None:
    """The ``none`` run: SimSiam's starting encoder for ``opts.seed``, saved as a run folder."""
    import torch

    from ctsearch.jobs.train import _append_metrics, _evaluate
    from ctsearch.model import SimSiam, initial_encoder_state, save_encoder, set_residual_bn
    from ctsearch.store import lock_dir, read_slices

    mcfg = opts.model_config()
    # As train_loop_per_worker builds it, so `none` is epoch 0 of the trained runs of this seed.
    torch.manual_seed(opts.seed)
    model = SimSiam(mcfg)
    if not opts.zero_init_residual:
        set_residual_bn(model.encoder, 1.0)
    state = initial_encoder_state(opts.init, mcfg, opts.weights)
    if state is not None:
        model.encoder.load_state_dict(state)
    with lock_dir(out, "`ctsearch reproduce`"):  # one writer per run folder, as `train` has
        _prepare_run_dir(out, opts, dataset_dir)
        atomic_write_bytes(b"", out / METRICS_FILE)
        eval_data = (read_slices(dataset_dir / "train.parquet"), read_slices(dataset_dir / "test.parquet"))
        _append_metrics(out, {"epoch": 0, **_evaluate(model.eval(), mcfg, eval_data, "cpu")})
        save_encoder(model.encoder, mcfg, out)


def _trial(config: dict) -> None:
    """One Tune trial: the run folder of one configuration and seed."""
    from ray import tune

    t = config["trial"]
    opts = TrainOptions(**t["options"])
    if t["config"] == "none":
        write_untrained(Path(t["dataset"]), Path(t["run_dir"]), opts)
    else:
        train(t["dataset"], t["run_dir"], opts)
    tune.report({"finished": 1})


def _run_trials(trials: list[dict], out: Path, base: TrainOptions, max_concurrent: int) -> None:
    """Run the trials as one Ray Tune grid; the first failed trial's error is raised."""
    import ray
    from ray import tune

    cpus = base.workers * base.cpus_per_worker
    gpus = base.workers * base.gpus_per_worker
    if not max_concurrent:
        # Each trial's TorchTrainer reserves its own workers; starting more trials than the
        # cluster can run at once leaves them waiting for workers, so Tune starts only these.
        have = ray.cluster_resources()
        fits = [have.get("CPU", 1) // (cpus + 1)] + ([have.get("GPU", 0) // gpus] if gpus else [])
        max_concurrent = max(1, int(min(fits)))
    # Tune's new console output prints an experiment box and a TensorBoard hint even at verbose=0;
    # its legacy reporter, used when RAY_AIR_NEW_OUTPUT is 0, is silent at verbose=0.
    previous = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        tuner = tune.Tuner(
            # The trial itself only drives its TorchTrainer (a fraction of a CPU; `none` trials embed once).
            tune.with_resources(_trial, {"cpu": 0.1}),
            param_space={"trial": tune.grid_search(trials)},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=max_concurrent,
                # OUT/tune/<config>-s<seed>: Tune's trial folder named like the run folder it writes.
                trial_dirname_creator=lambda trial: Path(trial.config["trial"]["run_dir"]).name,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=str(out),
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
        results = tuner.fit()
    finally:
        if previous is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = previous
    for result in results:
        if result.error is not None:
            cause = getattr(result.error, "cause", None) or result.error
            if isinstance(cause, CTSearchInputError):
                raise CTSearchInputError(cause.path, cause.problem) from None
            raise result.error


def reproduce(
    dataset_dir: str | os.PathLike,
    out: str | os.PathLike,
    base: TrainOptions,
    options: ReproduceOptions | None = None,
    *,
    address: str | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> dict:
    """Train (or reuse) every configuration x seed in OUT/runs as Ray Tune trials, evaluate, write the table.

    Returns table.json's content.
    """
    from ctsearch.jobs.runtime import start_ray

    o = options or ReproduceOptions()
    unknown = [c for c in o.configs if c not in CONFIGS]
    if unknown or not o.configs or len(set(o.configs)) != len(o.configs):
        raise CTSearchInputError(
            None, f"--configs must be distinct names of {list(CONFIGS)}, got {o.configs}"
        )
    if o.seeds < 1:
        raise CTSearchInputError(None, "--seeds must be at least 1")
    check_options(base)
    dataset_dir, out = Path(dataset_dir).resolve(), Path(out).resolve()
    for split in ("train", "test"):
        if not (dataset_dir / f"{split}.parquet").is_file():
            raise CTSearchInputError(
                dataset_dir / f"{split}.parquet",
                "no such slice dataset (run `ctsearch prepare --protocol decathlon` first)",
            )

    grid = [(c, s) for c in o.configs for s in range(o.seeds)]
    todo, reused = [], []
    for c, s in grid:
        opts = trial_options(base, c, s)
        d = run_dir(out, c, s)
        if is_finished(d, opts):  # also refuses a folder that holds other settings, before any work
            reused.append(d.name)
        else:
            todo.append(
                {"config": c, "options": asdict(opts), "run_dir": str(d), "dataset": str(dataset_dir)}
            )
    if reused:
        log(f"reusing {len(reused)} finished runs: {', '.join(reused)}")
    if todo:
        # Seed by seed: an interrupted grid leaves whole seeds of every configuration, comparable.
        todo.sort(key=lambda t: t["options"]["seed"])
        start_ray(address)
        log(
            f"training {len(todo)} runs as Ray Tune trials: {', '.join(Path(t['run_dir']).name for t in todo)}"
        )
        _run_trials(todo, out, base, o.max_concurrent)

    res = evaluate(
        dataset_dir,
        [run_dir(out, c, s) for c, s in grid],
        names=[LABELS[c] for c, _ in grid],
        options=EvaluateOptions(k=o.k, relax_masks=o.relax_masks, per_query=True, crossexam=o.crossexam),
        address=address,
        log=lambda msg: log(f"evaluating {msg}"),
    )
    evaluation = res.to_json()
    # evaluate's own JSON too (as `ctsearch evaluate --out`): what `ctsearch report` reads today.
    atomic_write_json(evaluation, out / EVALUATION_JSON)
    import pyarrow.parquet as pq

    # The queries' patients, in evaluate's (test) order: the bootstrap resamples patients, since
    # slices of one patient are not independent queries.
    patients = pq.read_table(dataset_dir / "test.parquet", columns=["patient_id"]).column(0).to_numpy()
    table = summarise(evaluation, grid, o, np.asarray(patients, dtype=str))
    table.update(
        dataset=str(dataset_dir),
        settings={k: v for k, v in asdict(base).items() if k not in ("views", "seed")},
        trained=[Path(t["run_dir"]).name for t in todo],
        reused=reused,
    )
    if evaluation.get("crossexam"):  # the whole block (rows, example) is in evaluation.json
        cross = evaluation["crossexam"]
        keep = ("patients", "single_exam_patients", "exam_pairs", "queries", "k", "table")
        table["crossexam"] = {key: cross[key] for key in keep}
    table["markdown"] = markdown(table)
    atomic_write_json(table, out / TABLE_JSON)
    atomic_write_bytes((table["markdown"] + "\n").encode(), out / TABLE_MD)
    return table


def compared(relax_masks: int) -> tuple[str, ...]:
    """The metrics with per-query scores, which get intervals and paired comparisons: MAP@K and
    k-NN accuracy over every test query, and RR over the liver slices when RELAX ran."""
    return ("map", "acc", "rr") if relax_masks else ("map", "acc")


def _scores(per_query: list) -> np.ndarray:
    """One run's per-query scores as floats, NaN where a query has none (RR off the liver)."""
    return np.asarray([np.nan if v is None else v for v in per_query], np.float64)


def summarise(
    evaluation: dict, grid: list[tuple[str, int]], o: ReproduceOptions, patients: np.ndarray | None = None
) -> dict:
    """Rows (mean ± std over seeds, bootstrap interval), runs (interval each) and paired comparisons
    from ``evaluate``'s JSON with ``per_query`` for the runs of ``grid``, in that order.
    ``patients`` [queries]: each query's patient, the unit the bootstraps resample (None: queries).

    A query without a score (RR: not a liver slice, an empty mask, a RELAX error) is left out;
    an interval or comparison uses the queries scored in every run it covers, so A and B are
    always compared on the same slices.
    """
    k = evaluation["k"]
    keys = compared(o.relax_masks)
    if patients is None:
        patients = np.arange(evaluation["queries"])
        resampled = "queries"
    else:
        resampled = "patients"

    def interval(runs: np.ndarray, seed: int = 0) -> tuple[list[float], int]:
        ok = np.all(np.isfinite(runs), axis=0)  # runs [seeds, queries]
        if not ok.any():
            return [math.nan, math.nan], 0
        _, low, high = bootstrap_ci(runs[:, ok], o.n_boot, seed=seed, groups=patients[ok])
        return [low, high], int(ok.sum())

    runs, scores = [], {}  # scores[config][metric] = [seeds, queries]
    for (c, s), r in zip(grid, evaluation["runs"]):
        entry = {"config": c, "seed": s, "run": r["source"]}
        for key in keys:
            run_scores = _scores(r["per_query"][key])
            entry[key] = {"value": r[key], "ci": interval(run_scores[None], seed=s)[0]}
            scores.setdefault(c, {}).setdefault(key, []).append(run_scores)
        runs.append(entry)
    scores = {c: {key: np.stack(v) for key, v in by_key.items()} for c, by_key in scores.items()}
    rows = []
    for c, row in zip(dict.fromkeys(c for c, _ in grid), evaluation["rows"]):
        summary = {"config": c, "name": LABELS[c], "seeds": row["n"]}
        for m in METRICS:
            if m.header:
                summary[m.key] = {key: row[m.key][key] for key in ("mean", "std")}
        for key in keys:
            summary[key]["ci"], summary[key]["queries"] = interval(scores[c][key])
        rows.append(summary)
    comparisons = []
    for a, b in PAIRS:
        if a in scores and b in scores:
            for m in (m for m in METRICS if m.key in keys):
                a_scores, b_scores = scores[a][m.key], scores[b][m.key]
                ok = np.all(np.isfinite(a_scores), axis=0) & np.all(np.isfinite(b_scores), axis=0)
                if not ok.any():
                    continue
                cmp = paired_comparison(a_scores[:, ok], b_scores[:, ok], o.n_boot, groups=patients[ok])
                metric = m.header.format(k=k)
                comparisons.append(
                    {
                        "a": a,
                        "b": b,
                        "metric": m.key,
                        **cmp.to_json(),
                        "patients": len(set(patients[ok].tolist())),
                        "verdict": verdict(LABELS[a], LABELS[b], metric, cmp),
                    }
                )
    groups = [c["patients"] for c in comparisons]
    return {
        "k": k,
        "configs": list(dict.fromkeys(c for c, _ in grid)),
        "seeds": o.seeds,
        "queries": evaluation["queries"],
        "liver_queries": evaluation.get("liver_queries"),
        "resampled": resampled,
        "patients": None if resampled == "queries" else len(set(patients.tolist())),
        "database": evaluation["database"],
        "relax_masks": o.relax_masks,
        # RR's queries: the liver slices with a score in every run (those with a mask, no error)
        "rr_queries": int(
            np.all(np.isfinite(np.concatenate([v["rr"] for v in scores.values()])), axis=0).sum()
        )
        if "rr" in keys
        else None,
        "compared": list(keys),
        "n_boot": o.n_boot,
        "rows": rows,
        "runs": runs,
        "comparisons": comparisons,
        # Too few patients for any verdict (the sign-flip test's smallest p): said once, plainly.
        "no_verdict": no_verdict_possible(min(groups), o.n_boot, f"test {resampled}") if groups else None,
    }


def _ci_cell(stat: dict, decimals: int) -> str:
    low, high = stat.get("ci") or (math.nan, math.nan)
    return f"[{100 * low:.{decimals}f}, {100 * high:.{decimals}f}]"


def markdown(table: dict) -> str:
    """table.md: Table 1 (mean ± std over seeds, 95% bootstrap CI), the verdicts, then every run."""
    k = table["k"]
    keys = table.get("compared") or compared(table["relax_masks"])
    shown = [m for m in METRICS if m.header and (m.key in keys or table["relax_masks"])]
    head = []
    for m in shown:
        head += [m.header.format(k=k)] + (["95% CI"] if m.key in keys else [])
    lines = ["| pretraining | seeds | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    for r in table["rows"]:
        cells = []
        for m in shown:
            cells.append(percent_cell(r[m.key], m.decimals))
            if m.key in keys:
                cells.append(_ci_cell(r[m.key], m.decimals))
        lines.append(f"| {r['name']} | {r['seeds']} | " + " | ".join(cells) + " |")
    rr = table.get("rr_queries")
    lines += [
        "",
        f"Values in percent: mean ± sample std over seeds; 95% CI: bootstrap ({table['n_boot']} resamples) "
        f"over seeds and {table['queries']} test queries"
        + (f" of {table['patients']} patients (whole patients resampled)" if table["patients"] else "")
        + (f", for RR the {rr} liver slices scored in every run" if rr is not None else "")
        + "; p: sign-flip permutation test.",
        "",
    ]
    lines += [f"- {c['verdict']}" for c in table["comparisons"]]
    if table.get("no_verdict"):
        lines += ["", table["no_verdict"]]
    by_key = {m.key: m for m in METRICS}
    lines += [
        "",
        "| run | " + " | ".join(f"{by_key[key].header.format(k=k)} (95% CI)" for key in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for r in table["runs"]:
        cells = []
        for key in keys:
            d = by_key[key].decimals
            value = r[key]["value"]
            shown_value = "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.{d}f}"
            cells.append(f"{shown_value} {_ci_cell(r[key], d)}")
        lines.append(f"| {Path(r['run']).name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
