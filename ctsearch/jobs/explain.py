"""``ctsearch explain DATASET_DIR --model RUN_DIR``: RELAX for every slice of a slice dataset.

Ray Data, following the batch-inference guide:

    read_parquet(split.parquet) --map_batches(Explainer)--> maps, RR, PNG bytes   actor pool (1 model / GPU or CPU worker)
                                --iter_batches (driver)---> PNG files, explanations.parquet, errors.parquet

Each actor loads the encoder once and explains ``slices_per_call`` slices per call, all
pushed through the encoder together (``ctsearch.relax.relax``). A slice that cannot be
decoded or explained becomes a row of ``errors.parquet``; the others go on.

``explain_slices`` is shared with ``ctsearch evaluate`` (RR of the test split's liver slices).

Example:
    >>> summary = explain_dataset("prepared/", "runs/r0", "runs/r0/explanations/test")  # doctest: +SKIP
    >>> summary["rr_mean"], summary["errors"]                                          # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from ctsearch import storage
from ctsearch.errors import CTSearchInputError
from ctsearch.explain import ExplainOptions
from ctsearch.jobs.runtime import node_id, shared_value, start_ray
from ctsearch.model import EncoderSpec
from ctsearch.store import (
    SLICES_SCHEMA,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_table,
    content_hash,
    decode_pixels,
    errors_table,
)

EXPLANATIONS_FILE = "explanations.parquet"
SUMMARY_FILE = "explain.json"

EXPLANATIONS_SCHEMA = pa.schema(
    [
        ("volume_id", pa.string()),
        ("patient_id", pa.string()),
        ("slice_index", pa.int32()),
        ("label", pa.int8()),
        ("map_size", pa.int32()),  # maps are [map_size, map_size]: the model's input frame
        ("importance", pa.binary()),  # float32 little-endian, row-major
        ("uncertainty", pa.binary()),  # float32 little-endian, row-major
        ("masks_used", pa.int32()),
        ("mask_pixels", pa.int64()),  # liver pixels in the centre square of the slice (RR's M)
        ("rr", pa.float64()),  # relevance-rank accuracy; null where the slice has no liver mask
        ("png", pa.string()),  # overlay path relative to the output folder; null when not written
    ]
)


def slice_key(volume_id: str, slice_index: int) -> str:
    return f"{volume_id}:{int(slice_index)}"


def png_name(volume_id: str, slice_index: int) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(volume_id))
    return f"overlays/{safe}_{int(slice_index):04d}.png"


class Explainer:
    """Ray Data actor: decodes slices, runs RELAX on a batch of them, scores RR, renders overlays."""

    def __init__(self, encoder_spec: EncoderSpec, options: dict, torch_threads: int | None = None):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # RELAX runs thousands of same-shaped batches: let cuDNN time its algorithms once.
        torch.backends.cudnn.benchmark = self.device == "cuda"
        self.encoder, self.config = encoder_spec.load(self.device)
        if self.device == "cuda":  # NHWC weights beside relax()'s NHWC inputs: no layout conversions
            self.encoder = self.encoder.to(memory_format=torch.channels_last)
        self.opts = ExplainOptions(**options)
        self.relax_kwargs = self.opts.relax_kwargs(self.device)

    def _decode(self, batch: dict, i: int) -> tuple[np.ndarray, np.ndarray]:
        h, w = int(batch["height"][i]), int(batch["width"][i])
        hu_b, mask_b = batch["hu"][i], batch["mask"][i]
        try:
            hu = decode_pixels(hu_b, h, w)
        except ValueError as e:
            raise ValueError(f"hu {e}") from None
        if not mask_b:  # a slice without a liver mask: RR is undefined, the maps are not
            return hu, np.zeros((h, w), np.uint8)
        try:
            return hu, decode_pixels(mask_b, h, w, "u1")
        except ValueError as e:
            raise ValueError(f"mask {e}") from None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ctsearch.metrics import relevance_rank_accuracy
        from ctsearch.preprocess import eval_transform
        from ctsearch.relax import relax
        from ctsearch.report.figures import centre_square, explanation_panel, png_bytes

        n = len(batch["volume_id"])
        S = self.config.image_size
        out = {
            "volume_id": [str(v) for v in batch["volume_id"]],
            "patient_id": [str(v) for v in batch["patient_id"]],
            "slice_index": np.asarray(batch["slice_index"], np.int32),
            "label": np.asarray(batch["label"], np.int8),
            "map_size": np.full(n, S, np.int32),
            "importance": [b""] * n,
            "uncertainty": [b""] * n,
            "masks_used": np.zeros(n, np.int32),
            "mask_pixels": np.zeros(n, np.int64),
            "rr": np.full(n, np.nan),
            "png_bytes": [b""] * n,
            "error": [""] * n,
            "node": [node_id()] * n,  # where the work ran (job summaries count slices per node)
        }
        decoded = {}
        for i in range(n):
            try:
                decoded[i] = self._decode(batch, i)
            except Exception as e:  # noqa: BLE001 - recorded per slice, the batch goes on
                out["error"][i] = f"undecodable slice: {e}"
        # Slices of one dataset share a size; group anyway so a stray size cannot fail a batch.
        by_shape: dict[tuple, list[int]] = {}
        for i, (hu, _) in decoded.items():
            by_shape.setdefault(hu.shape, []).append(i)
        for idx in by_shape.values():
            try:
                x = eval_transform(np.stack([decoded[i][0] for i in idx]), self.config)
                res = relax(self.encoder, x, **self.relax_kwargs)
            except Exception as e:  # noqa: BLE001
                for i in idx:
                    out["error"][i] = f"RELAX failed: {type(e).__name__}: {e}"
                continue
            masks = np.stack([centre_square(decoded[i][1]) for i in idx])
            scores, _, _ = relevance_rank_accuracy(res.importance, masks)
            for j, i in enumerate(idx):
                out["masks_used"][i] = res.masks_used
                out["mask_pixels"][i] = int(np.count_nonzero(masks[j]))
                out["rr"][i] = scores[j]
                if self.opts.keep_maps:
                    out["importance"][i] = np.ascontiguousarray(res.importance[j], "<f4").tobytes()
                    out["uncertainty"][i] = np.ascontiguousarray(res.uncertainty[j], "<f4").tobytes()
                if self.opts.render_png:
                    title = f"{out['volume_id'][i]} slice {int(out['slice_index'][i])}"
                    if not np.isnan(scores[j]):
                        title += f"  RR {scores[j]:.3f}"
                    panel = explanation_panel(
                        decoded[i][0], res.importance[j], res.uncertainty[j], title=title
                    )
                    out["png_bytes"][i] = png_bytes(panel)
        return {k: np.asarray(v, dtype=object) if isinstance(v, list) else v for k, v in out.items()}


def _drop_keys(batch: dict[str, np.ndarray], keys) -> dict[str, np.ndarray]:
    keys = shared_value(keys)
    keep = np.array(
        [slice_key(v, i) not in keys for v, i in zip(batch["volume_id"], batch["slice_index"])], bool
    )
    return {k: v[keep] for k, v in batch.items()}


def explain_slices(
    path: Path | str,
    encoder_spec: EncoderSpec,
    options: ExplainOptions,
    gpus: int = 0,
    workers: int = 1,
    liver_only: bool = False,
    address: str | None = None,
    skip: set[str] | None = None,
):
    """Run the Explainer over a slice parquet file; yields numpy batches of its output.

    ``skip``: slice keys (``slice_key``) not to explain, e.g. those a killed run already wrote.
    """
    start_ray(address)
    where, fs = storage.arrow_source(str(path))  # a URI: Ray Data reads it through the store's filesystem
    ds = ray.data.read_parquet(where, filesystem=fs).select_columns(SLICES_SCHEMA.names)
    if liver_only:
        from ray.data.expressions import col

        ds = ds.filter(expr=col("label") == 1)
    if skip:
        ds = ds.map_batches(_drop_keys, fn_kwargs={"keys": ray.put(skip)}, batch_format="numpy")
    pool = max(1, gpus) if gpus else max(1, workers)
    # Each actor reserves one Ray CPU (so the parquet reader always gets one too) but lets torch
    # use this machine's share of cores: RELAX is convolution-bound.
    threads = max(1, min(os.cpu_count() or 1, int(ray.cluster_resources().get("CPU", 1))) // pool)
    ds = ds.map_batches(
        Explainer,
        batch_size=options.slices_per_call,
        fn_constructor_kwargs={
            "encoder_spec": encoder_spec,
            "options": asdict(options),
            "torch_threads": threads,
        },
        compute=ray.data.ActorPoolStrategy(size=pool),
        num_gpus=1 if gpus else 0,
        num_cpus=1,
        batch_format="numpy",
    )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def count_nodes(nodes: dict[str, int], batch: dict[str, np.ndarray]) -> None:
    """Add an Explainer batch's slices to ``nodes`` (Ray node id -> slices explained there)."""
    for node in batch["node"]:
        nodes[str(node)] = nodes.get(str(node), 0) + 1


RUN_FILE = "explain-run.json"  # what the folder's explanations were made with (for resuming)
PARTS_DIR = "parts"
PART_ROWS = 32  # slices per committed part: what a killed job can lose


def explain_dataset(
    dataset_dir: str | os.PathLike,
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    split: str = "test",
    options: ExplainOptions | None = None,
    gpus: int = 0,
    workers: int = 1,
    address: str | None = None,
    on_slice: Callable[[int, int], None] | None = None,
) -> dict:
    """Explain every slice of DATASET_DIR/<split>.parquet with the encoder in ``model_dir``.

    Writes into ``out_dir``: explanations.parquet (EXPLANATIONS_SCHEMA), overlays/*.png,
    errors.parquet and explain.json (settings, counts, mean RR). Returns the summary dict.
    ``on_slice(done, total)`` is called as slices finish (for progress bars).

    Resumable: results are committed every PART_ROWS slices under ``out_dir/parts/``; running
    the same job again explains only the slices in neither explanations.parquet, a part nor
    errors, then folds everything into the final files. Other settings or another model in the
    same folder are refused (they would mix maps that are not comparable).
    """
    options = options or ExplainOptions()
    options.check()
    path = storage.dataset_split(dataset_dir, split)  # a URI stays one: Ray Data reads it from the store
    local_split = storage.local_file(path)  # for the whole-file reads here (the file itself when local)
    spec = EncoderSpec.run(model_dir)
    # One writer per folder: two jobs would write the same parts and fold each other's files. In a
    # store: a lease, and a local copy of the folder uploaded at each commit (storage.work_folder).
    with storage.work_folder(out_dir, "`ctsearch explain`") as folder:
        out = folder.path
        _claim_folder(out, path, model_dir, options, local_split)

        done = _done_keys(out)
        nodes: dict[str, int] = {}
        total = pq.read_metadata(local_split).num_rows
        todo = total - len(done & _slice_keys(local_split))
        part = _PartWriter(out, options.render_png, on_commit=folder.sync)
        if on_slice:
            on_slice(total - todo, total)
        if todo:
            for b in explain_slices(
                path, spec, options, gpus=gpus, workers=workers, address=address, skip=done
            ):
                count_nodes(nodes, b)
                part.add(b, path)
                if on_slice:
                    on_slice(total - todo + part.seen, total)
            part.flush()

        rows, errors = _fold_parts(out)
        rr = [r["rr"] for r in rows if r["rr"] is not None]
        liver_without_mask = sum(1 for r in rows if r["label"] == 1 and r["rr"] is None)
        summary = {
            "dataset": str(path),
            "model": str(model_dir),
            "split": split,
            "slices": len(rows),
            "errors": len(errors),
            "resumed_with": total - todo,
            "rr_mean": float(np.mean(rr)) if rr else None,
            "rr_slices": len(rr),
            "liver_slices_without_mask": liver_without_mask,
            "masks_used_mean": float(np.mean([r["masks_used"] for r in rows])) if rows else None,
            "nodes": nodes,
            "options": asdict(options),
            "outputs": {
                "explanations": EXPLANATIONS_FILE,
                "errors": "errors.parquet",
                "overlays": "overlays/" if options.render_png else None,
            },
        }
        atomic_write_json(summary, out / SUMMARY_FILE)
        return summary


def _claim_folder(
    out: Path, dataset: Path | str, model_dir, options: ExplainOptions, local_dataset: Path | None = None
) -> None:
    """Record what this folder's explanations are made with; refuse to mix in other settings."""
    from ctsearch.config import ENCODER_FILE

    # Only what changes the maps: PNGs, forward batch size and slices per call do not.
    maps = {
        k: v
        for k, v in asdict(options).items()
        if k in ("num_masks", "grid", "p", "seed", "tolerance", "check_every", "precision", "keep_maps")
    }
    # The dataset's content, not only its path: a re-run `prepare` may choose other slices.
    remote_model = storage.is_remote(model_dir)
    run = {
        "dataset": str(dataset) if storage.is_remote(dataset) else str(dataset.resolve()),
        "dataset_sha256": content_hash(local_dataset or dataset),
        "encoder_sha256": content_hash(
            (storage.model_folder(model_dir) if remote_model else Path(model_dir)) / ENCODER_FILE
        ),
        "relax": maps,
    }
    f = out / RUN_FILE
    if f.is_file():
        old = json.loads(f.read_text())
        if old != run:
            diff = sorted(k for k in run if old.get(k) != run[k])
            raise CTSearchInputError(
                out,
                f"holds explanations made with another {', '.join(diff)}; "
                "use the same settings to resume, or a new --out folder",
            )
    elif (out / EXPLANATIONS_FILE).exists():
        raise CTSearchInputError(
            out, f"holds {EXPLANATIONS_FILE} without {RUN_FILE}; choose a new --out folder"
        )
    else:
        atomic_write_json(run, f)


def _slice_keys(path: Path) -> set[str]:
    """``slice_key`` of every row of a parquet file with volume_id and slice_index columns."""
    t = pq.read_table(path, columns=["volume_id", "slice_index"])
    return {
        slice_key(v, i)
        for v, i in zip(t.column("volume_id").to_pylist(), t.column("slice_index").to_pylist())
    }


def _error_key(err_path: str) -> str:
    return err_path.rsplit("#", 1)[-1]


def _done_keys(out: Path) -> set[str]:
    """Slices already explained or failed, in the final files or in committed parts."""
    keys = set()
    for f in [out / EXPLANATIONS_FILE, *sorted((out / PARTS_DIR).glob("expl-*.parquet"))]:
        if f.is_file():
            keys |= _slice_keys(f)
    for f in [out / "errors.parquet", *sorted((out / PARTS_DIR).glob("errors-*.parquet"))]:
        if f.is_file():
            keys |= {_error_key(p) for p in pq.read_table(f, columns=["path"]).column("path").to_pylist()}
    return keys


class _PartWriter:
    """Collects the Explainer's output and commits it every PART_ROWS slices (PNG files first)."""

    def __init__(self, out: Path, render_png: bool, on_commit: Callable[[], None] | None = None):
        self.out, self.render_png, self.on_commit = out, render_png, on_commit
        self.rows: list[dict] = []
        self.errors: list[dict] = []
        self.seen = 0
        existing = [int(f.stem.split("-")[1]) for f in (out / PARTS_DIR).glob("*-*.parquet")]
        self.next = max(existing, default=-1) + 1

    def add(self, b: dict, path: Path) -> None:
        for i in range(len(b["volume_id"])):
            self.seen += 1
            vid, si = str(b["volume_id"][i]), int(b["slice_index"][i])
            if b["error"][i]:
                self.errors.append(
                    {"path": f"{path}#{slice_key(vid, si)}", "stage": "explain", "error": str(b["error"][i])}
                )
                continue
            png = None
            if self.render_png:
                png = png_name(vid, si)
                atomic_write_bytes(b["png_bytes"][i], self.out / png)
            rr = float(b["rr"][i])
            self.rows.append(
                {
                    "volume_id": vid,
                    "patient_id": str(b["patient_id"][i]),
                    "slice_index": si,
                    "label": int(b["label"][i]),
                    "map_size": int(b["map_size"][i]),
                    "importance": b["importance"][i],
                    "uncertainty": b["uncertainty"][i],
                    "masks_used": int(b["masks_used"][i]),
                    "mask_pixels": int(b["mask_pixels"][i]),
                    "rr": None if np.isnan(rr) else rr,
                    "png": png,
                }
            )
        if len(self.rows) + len(self.errors) >= PART_ROWS:
            self.flush()

    def flush(self) -> None:
        """Errors first: a slice counts as done once it is in either file, so neither may be lost."""
        parts = self.out / PARTS_DIR
        if self.errors:
            atomic_write_table(errors_table(self.errors), parts / f"errors-{self.next:05d}.parquet")
        if self.rows:
            atomic_write_table(
                pa.Table.from_pylist(self.rows, schema=EXPLANATIONS_SCHEMA),
                parts / f"expl-{self.next:05d}.parquet",
            )
        if self.rows or self.errors:
            self.next += 1
        self.rows, self.errors = [], []
        if self.on_commit is not None:
            self.on_commit()


def _fold_parts(out: Path) -> tuple[list[dict], list[dict]]:
    """Final explanations.parquet and errors.parquet = previous finals + parts; then drop the parts."""
    parts = out / PARTS_DIR
    expl = [out / EXPLANATIONS_FILE, *sorted(parts.glob("expl-*.parquet"))]
    errs = [out / "errors.parquet", *sorted(parts.glob("errors-*.parquet"))]
    # A job killed after writing the finals but before dropping the parts has the parts' rows in
    # both: one row per slice (and per error) is kept, so the rerun's result is the uninterrupted one.
    by_key = {
        slice_key(r["volume_id"], r["slice_index"]): r
        for f in expl
        if f.is_file()
        for r in pq.read_table(f).to_pylist()
    }
    rows = sorted(by_key.values(), key=lambda r: (r["volume_id"], r["slice_index"]))
    seen = {tuple(r.values()): r for f in errs if f.is_file() for r in pq.read_table(f).to_pylist()}
    errors = list(seen.values())
    atomic_write_table(pa.Table.from_pylist(rows, schema=EXPLANATIONS_SCHEMA), out / EXPLANATIONS_FILE)
    atomic_write_table(errors_table(errors), out / "errors.parquet")
    for f in [*expl[1:], *errs[1:]]:
        f.unlink()
    return rows, errors


def read_explanations(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """explanations.parquet -> columns as numpy, with importance/uncertainty as float32 [n, S, S]."""
    t = pq.read_table(path)
    d = {name: t.column(name).to_numpy(zero_copy_only=False) for name in t.column_names}
    s = d["map_size"]
    for key in ("importance", "uncertainty"):
        d[key] = (
            np.stack(
                [
                    np.frombuffer(b, "<f4").reshape(int(m), int(m))
                    if b
                    else np.full((int(m), int(m)), np.nan, np.float32)
                    for b, m in zip(d[key], s)
                ]
            )
            if len(s)
            else np.zeros((0, 0, 0), np.float32)
        )
    return d
