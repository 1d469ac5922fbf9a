"""``ctsearch explain``: RELAX maps and overlays for a query and its top-k, or for a whole slice dataset."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from ctsearch.cli.common import ADDRESS_OPT, JSON_OPT, QUIET_OPT, SALT_OPT, CallbackBar, emit_json, handle_errors, say
from ctsearch.errors import CTSearchInputError


def register(app: typer.Typer) -> None:
    app.command("explain")(explain_cmd)


@handle_errors
def explain_cmd(
    target: Path = typer.Argument(..., help="An index directory (with QUERY), or a slice dataset directory (with --model)."),
    query: Optional[str] = typer.Argument(None, help="Index mode: a NIfTI file / DICOM series folder, or a row volume_id:slice_index."),
    model: Optional[Path] = typer.Option(None, "--model", help="Dataset mode: the run directory whose encoder is explained."),
    split: str = typer.Option("test", "--split", help="Dataset mode: which split to explain (train or test)."),
    slice_: Optional[int] = typer.Option(None, "--slice", help="Index mode: slice of a file/folder QUERY (default: the middle slice)."),
    k: int = typer.Option(5, "-k", "--k", help="Index mode: retrieved slices to explain with the query."),
    patient: Optional[str] = typer.Option(None, "--patient", help="Index mode: only retrieve slices of this patient id."),
    exclude_patient: Optional[str] = typer.Option(None, "--exclude-patient", help="Index mode: never retrieve slices of this patient id (e.g. the query's own)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: RUN_DIR/explanations/SPLIT, or ./explain-<query>)."),
    masks: int = typer.Option(3000, "--masks", help="RELAX masks per slice (3000 in the paper)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Masked images per forward pass (default 100 on CPU, 512 on GPU)."),
    slices_per_call: int = typer.Option(4, "--slices-per-call", help="Dataset mode: slices explained together by one actor call."),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", help="Stop adding masks once the maps change by less than this fraction of their range per 300 masks."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random masks."),
    gpus: int = typer.Option(0, "--gpus", help="Dataset mode: GPUs to use (one actor each); 0 = CPU actors."),
    workers: int = typer.Option(1, "--workers", help="Dataset mode without GPUs: CPU actors."),
    no_png: bool = typer.Option(False, "--no-png", help="Do not write PNG overlays."),
    address: Optional[str] = ADDRESS_OPT,
    id_salt_file: Optional[Path] = SALT_OPT,
    json_out: bool = JSON_OPT,
    quiet: bool = QUIET_OPT,
) -> None:
    """Explain representations with RELAX: importance + uncertainty maps, PNG overlays, RR where liver masks exist."""
    from ctsearch.jobs.explain import ExplainOptions

    opts = ExplainOptions(num_masks=masks, batch_size=batch_size, seed=seed, tolerance=tolerance,
                          slices_per_call=slices_per_call, render_png=not no_png)  # fmt: skip
    opts.check()
    if model is not None:
        if query is not None:
            raise CTSearchInputError(query, "dataset mode (--model) takes no QUERY; to explain a query, give an index directory")
        from ctsearch.jobs.explain import explain_dataset, split_path
        from ctsearch.jobs.runtime import run_job

        split_path(target, split)  # a wrong folder or split is reported before anything is announced
        out = out or model / "explanations" / split
        say(f"explaining {target}/{split}.parquet with {model} ({masks} masks per slice) -> {out}", quiet or json_out)
        bar = CallbackBar("explaining slices", off=quiet or json_out)
        try:
            summary = run_job(explain_dataset, target, model, out, split=split, options=opts, gpus=gpus,
                              workers=workers, address=address, on_slice=bar.update, callbacks=("on_slice",))
        finally:
            bar.close()
        if summary["resumed_with"]:
            say(f"resumed: {summary['resumed_with']} slices were already explained in {out}", quiet or json_out)
        if json_out:
            emit_json({**summary, "out": str(out)})
            return
        rr = f"{summary['rr_mean']:.4f} over {summary['rr_slices']} liver slices" if summary["rr_mean"] is not None else "n/a (no liver masks)"
        say(f"{summary['slices']} slices explained, {summary['errors']} errors; mean RR {rr}", quiet)
        say(f"maps: {out}/explanations.parquet, overlays: {out}/overlays/, errors: {out}/errors.parquet", quiet)
        return
    if query is None:
        raise CTSearchInputError(target, "give a QUERY (index mode) or --model RUN_DIR (dataset mode)")
    from ctsearch.ids import load_salt

    summary = explain_query(target, query, slice_, k, out, opts, patient=patient, exclude_patient=exclude_patient,
                            id_salt=load_salt(id_salt_file))
    if json_out:
        emit_json(summary)
        return
    say(f"query {summary['query']['volume_id']}:{summary['query']['slice_index']} and {len(summary['hits'])} hits explained", quiet)
    say(f"figure: {summary['figure']}, maps: {summary['maps']}", quiet)


def _slice_hu(path: str, slice_index: int, cache: dict) -> np.ndarray:
    from ctsearch.io import read_volume

    if path not in cache:
        cache[path] = read_volume(path).hu
    hu = cache[path]
    if not 0 <= slice_index < hu.shape[0]:
        raise CTSearchInputError(path, f"slice {slice_index} is out of range (0..{hu.shape[0] - 1})")
    return np.asarray(hu[slice_index])


def explain_query(index_dir: Path, query: str, slice_index: int | None, k: int, out: Path | None, opts,
                  patient: str | None = None, exclude_patient: str | None = None, id_salt: bytes | None = None) -> dict:
    """Query + top-k hits: own RELAX maps of each, and pair maps (query toward each hit, hit toward query).

    ``id_salt``: on a pseudonymised index, hashes original patient ids given as ``patient`` /
    ``exclude_patient`` and the ids of a file query (ctsearch.ids).
    """
    import torch

    from ctsearch.index import Index
    from ctsearch.model import load_encoder
    from ctsearch.relax import relax
    from ctsearch.report import grid, overlay, png_bytes, slice_rgb, write_bytes_atomic
    from ctsearch.views import eval_transform

    index = Index.open(index_dir)
    patient, exclude_patient = index.patient_key(patient, id_salt), index.patient_key(exclude_patient, id_salt)
    vector, qmeta = index.embed_query(query, slice_index, id_salt)
    if not qmeta.get("path"):
        raise CTSearchInputError(query, "the index row has no source path, so its pixels cannot be explained")
    res = index.search(vector, k=k + 1, patient=patient, exclude_patient=exclude_patient)
    same = lambda h: h.get("volume_id") == qmeta.get("volume_id") and int(h.get("slice_index", -1)) == int(qmeta["slice_index"])  # noqa: E731
    hits = [h for h in res.hits[0] if not same(h)][:k]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder, config = load_encoder(index.model_dir, device)
    cache: dict = {}
    hus = [_slice_hu(qmeta["path"], int(qmeta["slice_index"]), cache)]
    for h in hits:
        if not h.get("path"):
            raise CTSearchInputError(index_dir, f"hit {h.get('volume_id')}:{h.get('slice_index')} has no source path")
        hus.append(_slice_hu(h["path"], int(h["slice_index"]), cache))
    shapes = {a.shape for a in hus}
    x = torch.cat([eval_transform(a[None], config) for a in hus]) if len(shapes) > 1 else eval_transform(np.stack(hus), config)
    batch = opts.batch_size or (512 if device == "cuda" else 100)
    kw = dict(num_masks=opts.num_masks, batch_size=batch, seed=opts.seed, tolerance=opts.tolerance, check_every=opts.check_every)
    with torch.inference_mode():
        h = encoder(x.to(device)).float()
    own = relax(encoder, x, **kw)
    n = len(hits)
    if n:
        pair_q = relax(encoder, x[:1].expand(n, -1, -1, -1), target=h[1:], **kw)  # query toward each hit
        pair_h = relax(encoder, x[1:], target=h[:1].expand(n, -1), **kw)  # each hit toward the query
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{qmeta['volume_id']}_{qmeta['slice_index']}")
    out = Path(out or f"explain-{safe}")
    out.mkdir(parents=True, exist_ok=True)
    # z_mm and exam_date let `ctsearch report` say where a slice lies and which examination it is from.
    keys = ("volume_id", "patient_id", "exam_date", "slice_index", "z_mm", "path")
    meta = [{k2: qmeta.get(k2) for k2 in keys}]
    meta += [{k2: hh.get(k2) for k2 in ("rank", "score", *keys)} for hh in hits]
    arrays = {"importance": own.importance, "uncertainty": own.uncertainty}
    if n:
        arrays.update(pair_query_importance=pair_q.importance, pair_hit_importance=pair_h.importance)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays, meta=np.asarray(json.dumps(meta)))
    write_bytes_atomic(buf.getvalue(), out / "maps.npz")
    size = 224
    slices = [slice_rgb(a, size) for a in hus]
    rows = [slices, [overlay(a, own.importance[i], size) for i, a in enumerate(hus)]]
    caps = [["query"] + [f"#{hh['rank']} {hh['score']:.3f}" for hh in hits], ["query RELAX"] + ["hit RELAX"] * n]
    if n:
        blank = np.zeros_like(slices[0])
        rows.append([blank] + [overlay(hus[0], pair_q.importance[j], size) for j in range(n)])
        rows.append([blank] + [overlay(hus[j + 1], pair_h.importance[j], size) for j in range(n)])
        caps += [["", *["query -> this hit"] * n], ["", *["this hit -> query"] * n]]
    write_bytes_atomic(png_bytes(grid(rows, caps)), out / "explanation.png")
    return {"query": meta[0], "hits": meta[1:], "masks_used": own.masks_used, "figure": str(out / "explanation.png"),
            "maps": str(out / "maps.npz")}  # fmt: skip
