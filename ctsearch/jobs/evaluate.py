"""``ctsearch evaluate``: the paper's Table 1 (MAP@K, kNN accuracy, RR) for runs and baselines.

Test slices are the queries, train slices the database (docs/evaluation.md). Embeddings are
computed here (1310 slices in the paper: seconds on a GPU); the RELAX part, 3000 forward passes
per liver slice, runs as the Ray Data job of ``ctsearch.jobs.explain`` over actors.

Runs of one configuration (same name: ``--name`` or their config) give mean ± std.

Example:
    >>> res = evaluate("prepared/", ["runs/a1", "runs/a2"], baselines=["imagenet"])  # doctest: +SKIP
    >>> print(res.table)                                                             # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ctsearch.config import ModelConfig
from ctsearch.errors import CTSearchInputError
from ctsearch.explain import ExplainOptions
from ctsearch.jobs.explain import count_nodes, explain_slices, slice_key
from ctsearch.metrics import METRICS, Ranking, percent_cell, shown_metrics
from ctsearch.model import EncoderSpec
from ctsearch.store import read_model_config, read_run_settings, read_slices


def run_name(model_dir: str | os.PathLike) -> str:
    """A Table-1 style name for a run: its init and views from config.json (model.json as fallback)."""
    from ctsearch import storage
    from ctsearch.config import MODEL_JSON, RUN_CONFIG

    try:
        # A run URI: a local copy of the two small files read here.
        local = (
            storage.cached_copy(model_dir, [RUN_CONFIG, MODEL_JSON])
            if storage.is_remote(model_dir)
            else model_dir
        )
        _, opts, model = read_run_settings(local)
    except CTSearchInputError:  # a name is a label: an unreadable config leaves it unknown
        opts, model = {}, {}
    views = opts.get("views", model.get("views", "?"))
    init = opts.get("init", "?")
    init = {"imagenet": "ImageNet", "random": "random init"}.get(init, "init from run" if init != "?" else "")
    what = (
        "SimSiam (HU clipping)"
        if views == "clinical"
        else "SimSiam (standard)"
        if views == "standard"
        else f"SimSiam ({views})"
    )
    backbone = model.get("backbone", opts.get("backbone", "?"))
    return f"{init + ' + ' if init else ''}{what}, {backbone}"


def embed_split(spec: EncoderSpec, hu: np.ndarray, device: str) -> np.ndarray:
    import torch

    from ctsearch.model import embed

    encoder, config = spec.load(device)
    with torch.inference_mode():
        return embed(encoder, hu, config, device=device)


def rr_of(
    spec: EncoderSpec,
    test_path: Path | str,
    options: ExplainOptions,
    gpus: int,
    workers: int,
    address: str | None,
    keys: list[str] | None = None,
) -> dict:
    """Mean relevance-rank accuracy over the test split's liver slices (Ray job).

    ``keys``: the test queries' slice keys (``slice_key``) in test order; then ``rr_per_query``
    [queries] holds each query's RR, None where it has none (no liver, an empty mask, an error).
    Every run is explained with the same RELAX masks (one seed), so these scores pair up across
    runs slice by slice.
    """
    scores, skipped, errors, nodes, by_key = [], 0, [], {}, {}
    for b in explain_slices(
        test_path, spec, options, gpus=gpus, workers=workers, liver_only=True, address=address
    ):
        count_nodes(nodes, b)
        for i in range(len(b["volume_id"])):
            if b["error"][i]:
                errors.append(f"{b['volume_id'][i]}:{int(b['slice_index'][i])}: {b['error'][i]}")
            elif np.isnan(b["rr"][i]):
                skipped += 1
            else:
                scores.append(float(b["rr"][i]))
                by_key[slice_key(b["volume_id"][i], b["slice_index"][i])] = scores[-1]
    out = {
        "rr": float(np.mean(scores)) if scores else float("nan"),
        "rr_slices": len(scores),
        "rr_skipped_empty_mask": skipped,
        "rr_errors": errors,
        "rr_nodes": nodes,
    }
    if keys is not None:
        out["rr_per_query"] = [by_key.get(key) for key in keys]
    return out


def summary_stats(values: list[float]) -> dict:
    """{"mean", "std" (sample; None for one value), "values"} over runs; None and NaN count as not measured."""
    v = np.asarray([x for x in values if x is not None and not np.isnan(x)], np.float64)
    if not len(v):
        return {"mean": None, "std": None, "values": values}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None, "values": values}


def markdown_table(rows: list[dict], k: int) -> str:
    """Rows shaped like the paper's Table 1 (values in percent, mean ± sample std over runs)."""
    shown = shown_metrics()
    lines = [
        "| pretraining | runs | " + " | ".join(m.header.format(k=k) for m in shown) + " |",
        "|---|---|" + "---|" * len(shown),
    ]
    for r in rows:
        cells = [percent_cell(r.get(m.key), m.decimals) for m in shown]
        lines.append(f"| {r['name']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class EvaluateOptions:
    """What ``ctsearch evaluate`` measures; where it runs (address) and its log are separate."""

    k: int = 5  # K of MAP@K and of the k-NN vote
    relax_masks: int = 3000  # RELAX masks per liver slice for RR; 0 skips RR
    relax_options: ExplainOptions | None = None  # other RELAX settings (batch size, seed)
    baseline_config: dict | None = None  # ModelConfig JSON of baselines (default: the first run's)
    seed: int = 0  # of the random baseline
    imagenet_weights: str | None = None  # local ImageNet file of the imagenet baseline
    gpus: int = 0  # for the RELAX part, one actor each; 0: CPU actors
    workers: int = 1  # CPU actors of the RELAX part
    crossexam: bool = False  # also measure cross-exam retrieval on the test split's two-exam patients
    # Also keep each run's score per query (``per_query``: metric key -> [n queries], test order;
    # "rr" with relax_masks, None for the queries without one): what ``ctsearch.stats``
    # bootstraps over (``ctsearch reproduce``). Off: it grows the JSON.
    per_query: bool = False


@dataclass
class EvaluateResult:
    """Per-run and per-name results (``to_json`` is what --json prints and --out writes)."""

    dataset: str
    k: int
    relax_masks: int
    queries: int
    database: int
    liver_queries: int
    runs: list[dict]  # one per run or baseline: name, source and each metric's value
    rows: list[dict]  # one per name: n, sources and each metric's summary_stats
    table: str  # the markdown table of the rows
    crossexam: dict | None = None  # with --crossexam: crossexam_table's input, its table and an example
    # Patients with slices in both train (database) and test (queries): 0 for a by-patient split.
    # Measured, never assumed: a query can retrieve its own patient's other slices otherwise.
    shared_patients: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


def evaluate(
    dataset_dir: str | os.PathLike,
    model_dirs: list[str | os.PathLike],
    baselines: list[str] | None = None,
    names: list[str] | None = None,
    options: EvaluateOptions | None = None,
    *,
    address: str | None = None,
    log: Callable[[str], None] = lambda msg: None,
    **option_values,
) -> EvaluateResult:
    """Evaluate runs and baselines on DATASET_DIR (test queries against the train database).

    Args:
        model_dirs: run directories; runs sharing a name are aggregated (mean ± std).
        baselines: any of "random" (untrained backbone, seeded) and "imagenet" (local weights).
        names: one name per run (default ``run_name``).
        options: what to measure (or its fields as keywords, e.g. ``relax_masks=0``).
    """
    import torch

    o = replace(options or EvaluateOptions(), **option_values)
    k = o.k
    baselines = list(baselines or [])
    if not model_dirs and not baselines:
        raise CTSearchInputError(None, "nothing to evaluate: give --model RUN_DIR and/or --baseline")
    if names and len(names) != len(model_dirs):
        raise CTSearchInputError(None, f"--name given {len(names)} times for {len(model_dirs)} --model runs")
    if k < 1:
        raise CTSearchInputError(None, "-k must be at least 1")
    from ctsearch import storage

    # A dataset URI: the splits' URIs (Ray Data reads them from the store), read whole from local copies.
    train_path, test_path = (
        storage.dataset_split(dataset_dir, "train"),
        storage.dataset_split(dataset_dir, "test"),
    )
    train, test = read_slices(storage.local_file(train_path)), read_slices(storage.local_file(test_path))
    if len(train) < k:
        raise CTSearchInputError(train_path, f"has {len(train)} slices, fewer than k={k}")
    if not len(test):
        raise CTSearchInputError(test_path, "has no slices")

    entries: list[tuple[str, str, EncoderSpec]] = []  # (group name, source, spec)
    for i, d in enumerate(model_dirs):
        entries.append((names[i] if names else run_name(d), str(d), EncoderSpec.run(d)))
    if baselines:
        cfg = ModelConfig.from_json(o.baseline_config) if o.baseline_config else None
        first = model_dirs[0] if model_dirs else None
        if first is not None and storage.is_remote(first):
            first = storage.model_folder(first)
        cfg = cfg or (read_model_config(first) if first is not None else None)
        if cfg is None:
            raise CTSearchInputError(None, "baselines without --model need --backbone and --image-size")
        for b in baselines:
            label = {"imagenet": "ImageNet only", "random": f"random init (seed {o.seed})"}.get(b, b)
            spec = EncoderSpec.baseline(b, cfg, o.seed, o.imagenet_weights)
            entries.append((f"{label}, {cfg.backbone}", f"baseline:{b}", spec))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    relax = replace(
        o.relax_options or ExplainOptions(),
        num_masks=max(1, o.relax_masks),
        keep_maps=False,
        render_png=False,
    )
    relax.check()
    cross = crossexam_volumes(dataset_dir) if o.crossexam else None  # read before the runs: fail early
    keys = [slice_key(v, i) for v, i in zip(test.volume_id, test.slice_index)]
    per_run = []
    for name, source, spec in entries:
        log(f"{name}: {source}")
        db = embed_split(spec, train.hu, device)
        q = embed_split(spec, test.hu, device)
        ranking = Ranking.compute(q, test.label, db, train.label, k)  # one neighbour search for every metric
        row = {"name": name, "source": source}
        scored = [m for m in METRICS if m.per_query is not None and k >= m.needs_k]
        per_query = {m.key: m.per_query(ranking) for m in scored}
        row.update({m.key: None for m in METRICS if m.per_query is not None})
        row.update({m.key: float(per_query[m.key].mean()) for m in scored})
        if o.per_query:
            row["per_query"] = {key: v.tolist() for key, v in per_query.items()}
        if o.relax_masks > 0:
            rr = rr_of(spec, test_path, relax, o.gpus, o.workers, address, keys if o.per_query else None)
            if o.per_query:  # None where a query has no RR (no liver, empty mask, error)
                row["per_query"]["rr"] = rr.pop("rr_per_query")
            row.update(rr)
        if cross is not None:
            row["crossexam"] = crossexam_of(spec, cross["patients"], k, device)
        per_run.append(row)

    groups: dict[str, list[dict]] = {}
    for r in per_run:
        groups.setdefault(r["name"], []).append(r)
    rows = []
    for name, rs in groups.items():
        row = {"name": name, "n": len(rs), "sources": [r["source"] for r in rs]}
        for m in METRICS:
            measured = m.per_query is not None or o.relax_masks > 0
            row[m.key] = (
                summary_stats([r.get(m.key) for r in rs])
                if measured
                else {"mean": None, "std": None, "values": []}
            )
        rows.append(row)
    return EvaluateResult(
        dataset=str(dataset_dir),
        k=k,
        relax_masks=o.relax_masks,
        queries=len(test),
        database=len(train),
        liver_queries=int(np.sum(test.label == 1)),
        runs=per_run,
        rows=rows,
        table=markdown_table(rows, k),
        crossexam=None if cross is None else crossexam_summary(cross, per_run, k),
        shared_patients=len(set(map(str, train.patient_id)) & set(map(str, test.patient_id))),
    )


# ----------------------------------------------------------------------------- cross-examination


def crossexam_volumes(dataset_dir: str | os.PathLike) -> dict:
    """The test split's patients with two or more examinations, read whole, with ground truth.

    Returns ``{"patients": {patient: [volume dicts by exam date]}, "single_exam_patients": n}``;
    a volume dict holds volume_id, exam_date, path, hu (int16 [n, y, x]), z (float [n], mm) and
    anat (float [n], ``ctsearch.synth.anatomical_positions``). Ground truth exists for archives
    written by ``ctsearch synth --exams 2`` (or more); anything else is a one-line error.
    """
    import pyarrow.parquet as pq

    from ctsearch import storage
    from ctsearch.io import read_volume
    from ctsearch.store import read_json
    from ctsearch.synth import anatomical_positions

    # A dataset URI: a local copy of the two small files read here.
    root = (
        storage.cached_copy(dataset_dir, ["protocol.json", "manifest.parquet"])
        if storage.is_remote(dataset_dir)
        else Path(dataset_dir)
    )
    protocol = read_json(
        root / "protocol.json", "slice protocol (from ctsearch prepare --protocol decathlon)"
    )
    test = {v["volume_id"] for v in protocol.get("volumes", []) if v.get("split") == "test"}
    by_patient: dict[str, list[dict]] = {}
    for r in pq.read_table(root / "manifest.parquet").to_pylist():
        if r["volume_id"] in test:
            by_patient.setdefault(r["patient_id"], []).append(r)
    several = {p: rs for p, rs in by_patient.items() if len(rs) > 1}
    if not several:
        raise CTSearchInputError(
            root,
            f"no patient of the test split has two examinations ({len(by_patient)} patients with one each); "
            "--crossexam needs an archive like `ctsearch synth --exams 2`",
        )
    truth = anatomical_positions([r["path"] for rs in several.values() for r in rs])
    patients = {}
    for p, rs in sorted(several.items()):
        vols = []
        for r in sorted(rs, key=lambda r: (r["exam_date"] or "", r["volume_id"])):
            vol = read_volume(r["path"])
            keys = ("volume_id", "exam_date", "path")
            vols.append({**{k: r[k] for k in keys}, "hu": vol.hu, "z": vol.z_mm(), "anat": truth[r["path"]]})
        patients[p] = vols
    return {"patients": patients, "single_exam_patients": len(by_patient) - len(several)}


def crossexam_of(spec: EncoderSpec, patients: dict[str, list[dict]], k: int, device: str) -> dict:
    """Plain top-k vs the coherent method (ctsearch.crossexam) for one encoder: every slice of every
    exam as a query against each other exam of its patient. Returns ``crossexam.summarise``'s dict
    plus ``example``: a later exam's mid-liver slice against the earlier exam (the report's figure)."""
    from ctsearch.crossexam import coherent_match, plain_topk, score_pair, summarise
    from ctsearch.index import l2_normalize

    scores, example = [], None
    for vols in patients.values():
        emb = [l2_normalize(embed_split(spec, v["hu"], device)) for v in vols]
        for a, qa in enumerate(vols):
            for b, ob in enumerate(vols):
                if a != b:
                    scores.append(score_pair(emb[a], qa["z"], qa["anat"], emb[b], ob["z"], ob["anat"], k))
        if example is None:
            # As in the paper's case study: a slice of the newest exam, 6 cm below the liver dome
            # (mid-liver), looked up in the exam before it.
            (q, o), (eq, eo) = (vols[-1], vols[-2]), (emb[-1], emb[-2])
            i = int(np.argmin(np.abs(q["anat"] + 60.0)))
            sim = eq @ eo.T
            m = coherent_match(sim, q["z"], o["z"], float(q["z"][i]), k)
            example = {
                "query": {
                    "volume_id": q["volume_id"],
                    "path": q["path"],
                    "exam_date": q["exam_date"],
                    "slice_index": i,
                    "z_mm": float(q["z"][i]),
                    "anatomical_mm": float(q["anat"][i]),
                },
                "other": {"volume_id": o["volume_id"], "path": o["path"], "exam_date": o["exam_date"]},
                "true_slice": int(np.argmin(np.abs(o["anat"] - q["anat"][i]))),
                "coherent": {"best": m.best, "run": m.run.tolist(), "confidence": m.confidence},
                "plain": plain_topk(sim[i], k).tolist(),
                "anatomical_mm": o["anat"].round(2).tolist(),
            }
    return {**summarise(scores), "pairs": len(scores), "example": example}


CROSSEXAM_COLUMNS = (
    ("mean_dz_mm", "mean \\|Δz\\| mm", "{:.1f}"),
    ("median_dz_mm", "median \\|Δz\\| mm", "{:.1f}"),
    ("within_thickness", "within 1 slice thickness", "{:.1%}"),
    ("rank_corr", "rank corr. of run with z", "{:.2f}"),
    ("run_overlap", "run overlap with truth", "{:.1%}"),
)


def crossexam_summary(cross: dict, per_run: list[dict], k: int) -> dict:
    """evaluate's ``crossexam`` block: counts, one row per run and method, the markdown table, an example."""
    rows = []
    for r in per_run:
        for method in ("plain", "coherent"):
            rows.append(
                {"name": r["name"], "source": r["source"], "method": method, **r["crossexam"][method]}
            )
    first = per_run[0]["crossexam"]
    example = first["example"]
    for r in per_run:  # one example (the first run's) is enough for the report
        r["crossexam"].pop("example", None)
    header = "| encoder | method | " + " | ".join(c[1] for c in CROSSEXAM_COLUMNS) + " |"
    lines = [header, "|---|---|" + "---|" * len(CROSSEXAM_COLUMNS)]
    label = {"plain": f"plain top-{k}", "coherent": "coherent (z offset)"}
    for row in rows:
        cells = ["" if row[c] is None else f.format(row[c]) for c, _, f in CROSSEXAM_COLUMNS]
        lines.append(f"| {row['name']} | {label[row['method']]} | " + " | ".join(cells) + " |")
    return {
        "patients": len(cross["patients"]),
        "single_exam_patients": cross["single_exam_patients"],
        "exam_pairs": first["pairs"],
        "queries": first["queries"],
        "k": k,
        "rows": rows,
        "table": "\n".join(lines),
        "example": {"name": per_run[0]["name"], **example},
    }
