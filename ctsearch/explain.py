"""RELAX explanations of retrieval: the settings every explanation shares, and a query with its top-k.

``explain_query`` is ``ctsearch explain INDEX_DIR QUERY``: the query's and each hit's own RELAX
maps, the pair maps (query toward each hit, hit toward the query), saved as ``maps.npz`` and
drawn as ``explanation.png``, one tile per slice at the model's input size. The dataset mode,
every slice of a slice dataset, is the Ray job ``ctsearch.jobs.explain``.

Example:
    >>> ExplainOptions(num_masks=300).relax_kwargs("cpu")["batch_size"]
    100
    >>> res = explain_query("idx/", "scan.nii.gz", out="q/", options=ExplainOptions(num_masks=300))  # doctest: +SKIP
    >>> res["figure"]                                                                             # doctest: +SKIP
    'q/explanation.png'
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass

import numpy as np

from ctsearch import storage
from ctsearch.errors import CTSearchInputError

# Masked images per forward pass when none is given: what fits a CPU's caches and a GPU's memory.
RELAX_BATCH = {"cpu": 100, "cuda": 512}


def default_batch_size(device: str) -> int:
    """RELAX's masked images per forward pass on ``device`` ("cpu", "cuda" or "cuda:N")."""
    return RELAX_BATCH["cuda" if str(device).startswith("cuda") else "cpu"]


@dataclass
class ExplainOptions:
    """RELAX settings of an explanation (see ``ctsearch.relax.relax``), and what a dataset job keeps."""

    num_masks: int = 3000
    batch_size: int | None = None  # masked images per forward pass; None: RELAX_BATCH of the device
    grid: int = 7
    p: float = 0.5
    seed: int = 0
    tolerance: float | None = None
    check_every: int = 300
    precision: str = "auto"  # ctsearch.relax.PRECISIONS: auto = bf16 on CUDA, float32 on a CPU
    slices_per_call: int = 4
    keep_maps: bool = True
    render_png: bool = True

    def check(self) -> None:
        if (
            self.num_masks < 1
            or self.slices_per_call < 1
            or (self.batch_size is not None and self.batch_size < 1)
        ):
            raise CTSearchInputError(None, "--masks, --batch-size and --slices-per-call must be at least 1")
        if not 0.0 < self.p < 1.0 or self.grid < 2:
            raise CTSearchInputError(
                None, "mask keep probability must be in (0, 1) and the grid at least 2 cells"
            )
        if self.tolerance is not None and self.tolerance <= 0:
            raise CTSearchInputError(None, "--tolerance must be positive")
        from ctsearch.relax import PRECISIONS

        if self.precision not in PRECISIONS:
            raise CTSearchInputError(
                None, f"--precision must be one of {list(PRECISIONS)}, got {self.precision!r}"
            )

    def relax_kwargs(self, device: str) -> dict:
        """The keyword arguments of ``ctsearch.relax.relax`` these options stand for, on ``device``."""
        return {
            "num_masks": self.num_masks,
            "batch_size": self.batch_size or default_batch_size(device),
            "grid": self.grid,
            "p": self.p,
            "seed": self.seed,
            "tolerance": self.tolerance,
            "check_every": self.check_every,
            "precision": self.precision,
        }


# What `ctsearch report` needs of each slice: where it lies (z_mm) and which examination it is from.
SLICE_KEYS = ("volume_id", "patient_id", "exam_date", "slice_index", "z_mm", "path")


def explain_query(
    index_dir: str | os.PathLike,
    query: str,
    slice_index: int | None = None,
    k: int = 5,
    out: str | os.PathLike | None = None,
    options: ExplainOptions | None = None,
    patient: str | None = None,
    exclude_patient: str | None = None,
    id_salt: bytes | None = None,
) -> dict:
    """Query + top-k hits: own RELAX maps of each, and pair maps (query toward each hit, hit toward query).

    Writes OUT/maps.npz (importance, uncertainty [k+1, S, S]; pair_query_importance,
    pair_hit_importance [k, S, S]; meta as JSON) and OUT/explanation.png. OUT defaults to ``./explain-<volume>_<slice>``. ``id_salt``: on a
    pseudonymised index, hashes original patient ids given as ``patient`` / ``exclude_patient``
    and the ids of a file query (ctsearch.ids).

    Returns {"query", "hits", "masks_used", "figure", "maps"}.
    """
    import torch

    from ctsearch.index import Index
    from ctsearch.model import load_encoder
    from ctsearch.preprocess import eval_transform_each
    from ctsearch.query import embed_query
    from ctsearch.relax import relax
    from ctsearch.report.figures import png_bytes, query_figure

    options = options or ExplainOptions()
    index = Index.open(index_dir)
    patient, exclude_patient = (
        index.patient_key(patient, id_salt),
        index.patient_key(exclude_patient, id_salt),
    )
    vector, qmeta = embed_query(index, query, slice_index, id_salt)
    if not qmeta.get("path"):
        raise CTSearchInputError(query, "the index row has no source path, so its pixels cannot be explained")
    res = index.search(vector, k=k + 1, patient=patient, exclude_patient=exclude_patient)
    same = lambda h: (
        h.get("volume_id") == qmeta.get("volume_id")
        and int(h.get("slice_index", -1)) == int(qmeta["slice_index"])
    )  # noqa: E731
    hits = [h for h in res.hits[0] if not same(h)][:k]
    for h in hits:
        if not h.get("path"):
            raise CTSearchInputError(
                index_dir, f"hit {h.get('volume_id')}:{h.get('slice_index')} has no source path"
            )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder, config = load_encoder(index.model_dir, device, index.encoder_sha256)
    volumes: dict = {}
    hus = [_slice_hu(m["path"], int(m["slice_index"]), volumes) for m in [qmeta, *hits]]
    x = eval_transform_each(hus, config)
    kw = options.relax_kwargs(device)
    with torch.inference_mode():
        h = encoder(x.to(device)).float()
    own = relax(encoder, x, **kw)
    n = len(hits)
    arrays = {"importance": own.importance, "uncertainty": own.uncertainty}
    if n:
        arrays["pair_query_importance"] = relax(
            encoder, x[:1].expand(n, -1, -1, -1), target=h[1:], **kw
        ).importance
        arrays["pair_hit_importance"] = relax(encoder, x[1:], target=h[:1].expand(n, -1), **kw).importance
    safe = "".join(
        c if c.isalnum() or c in "-_." else "_" for c in f"{qmeta['volume_id']}_{qmeta['slice_index']}"
    )
    out = os.fspath(out or f"explain-{safe}")  # a folder or a URI
    meta = [{key: qmeta.get(key) for key in SLICE_KEYS}]
    meta += [{key: hh.get(key) for key in ("rank", "score", *SLICE_KEYS)} for hh in hits]
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays, meta=np.asarray(json.dumps(meta)))
    storage.write_bytes(storage.join(out, "maps.npz"), buf.getvalue())
    # Always drawn: --no-png is about the dataset job's per-slice overlays.
    figure = png_bytes(query_figure(hus, hits, arrays, config.image_size))
    storage.write_bytes(storage.join(out, "explanation.png"), figure)
    return {
        "query": meta[0],
        "hits": meta[1:],
        "masks_used": own.masks_used,
        "figure": storage.join(out, "explanation.png"),
        "maps": storage.join(out, "maps.npz"),
    }


def _slice_hu(path: str, slice_index: int, volumes: dict) -> np.ndarray:
    """Slice ``slice_index`` of the volume at ``path``, reading each volume once (``volumes`` caches)."""
    from ctsearch.io import read_volume

    if path not in volumes:
        volumes[path] = read_volume(path).hu
    hu = volumes[path]
    if not 0 <= slice_index < hu.shape[0]:
        raise CTSearchInputError(path, f"slice {slice_index} is out of range (0..{hu.shape[0] - 1})")
    return np.asarray(hu[slice_index])
