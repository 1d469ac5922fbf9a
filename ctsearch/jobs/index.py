"""``ctsearch index``: embed every slice of an archive with Ray Data, commit FAISS shards.

The pipeline follows Ray's batch-inference guide, one stage per resource:

    volume paths --map_batches(read_volume_rows)--> slabs of slices: HU int16, or    CPU tasks, one per volume
                                                    preprocessed pixels (CPU model)
                 --map_batches(Embedder)---------> L2-normalised embeddings         actor pool (1 model / GPU)
                 --iter_batches (driver)---------> shard complete? write + commit   driver

Only paths travel into the object store. CPU tasks do what must be on a CPU: reading and
decompressing; they never import torch (a worker would pay seconds and ~450 MB for it). With
GPUs the embedding actor windows and resizes whole batches on its device, so a CPU core's time
goes to decoding alone; with a CPU model, preprocessing runs in the reading tasks, beside the
model rather than in its process. A volume leaves its reading task as slabs of ``SLAB_SLICES``
slices, so the model starts on a volume before it is fully read and no block holds a whole
volume.

The unit of work is a shard: ``shard_volumes`` volumes whose rows are committed together
(index.IndexWriter.commit_shard). A volume already in the index (same series id and content
hash), or a path already handled with the same size and mtime, is skipped; a killed run leaves
whole shards only, so running it again finishes the rest without duplicates or gaps.

Example:
    >>> summary = index_source("archive/", "runs/r1", "idx/", IndexOptions(shard_volumes=8))  # doctest: +SKIP
    >>> summary.rows_added, summary.errors                                                  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from ctsearch import storage
from ctsearch.config import ModelConfig
from ctsearch.errors import CTSearchInputError
from ctsearch.ids import check_same_salt, is_pseudonym, pseudonymise, pseudonymise_ids
from ctsearch.index import DEFAULT_ANN_THRESHOLD, IndexWriter, l2_normalize
from ctsearch.index.format import META_COLUMNS
from ctsearch.index.params import AnnKind
from ctsearch.jobs.runtime import announce, node_id, shared_value, start_ray
from ctsearch.store import EmbeddingDtype, content_hash, read_parquet

ID_COLUMNS = ("volume_id", "patient_id", "study_id", "series_id", "exam_date")
SLAB_SLICES = 32  # slices per block leaving a reading task
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- source -> volume tasks


def resolve_source(source: str | os.PathLike, id_salt: bytes | None = None) -> tuple[list[dict], list[dict]]:
    """An archive folder, a manifest.parquet or one volume -> (volume tasks, scan errors).

    Each task is ``{path, format, volume_id, patient_id, study_id, series_id, exam_date}``;
    ids are "" where only reading the volume will tell. A manifest whose ids ``ctsearch prepare``
    pseudonymised is only read with the same ``id_salt``. A URI (``s3://bucket/archive``,
    ``s3://bucket/prepared/manifest.parquet``) is listed and read through ctsearch.storage; its
    tasks carry URIs, which the read tasks fetch themselves.
    """
    if storage.is_remote(source):
        return _resolve_remote(str(source).rstrip("/"), id_salt)
    src = Path(source)
    if not src.exists():
        raise CTSearchInputError(src, "no such file or folder")
    if src.is_file() and src.suffix == ".parquet":
        return _manifest_tasks(read_parquet(src), src, src.parent, id_salt), []  # corrupt: one line
    if src.is_file():
        return [_task({"path": str(src)}, None, id_salt)], []
    from ctsearch.io import scan_archive

    entries, errors = scan_archive(src)
    return [_task(_as_dict(e), None, id_salt) for e in entries], [dict(e) for e in errors]


def _manifest_tasks(t, src, base, id_salt: bytes | None) -> list[dict]:
    """A manifest table's volume tasks; relative paths are taken from ``base`` (its folder)."""
    if "path" not in t.column_names:
        raise CTSearchInputError(src, "not a manifest: no 'path' column (write one with `ctsearch prepare`)")
    recorded = json.loads((t.schema.metadata or {}).get(b"ctsearch.ids", b"null"))
    if recorded and recorded.get("pseudonymised"):
        check_same_salt(recorded, id_salt, src, "to index it")
    return [_task(r, base, id_salt) for r in t.to_pylist()]


def _resolve_remote(src: str, id_salt: bytes | None) -> tuple[list[dict], list[dict]]:
    """resolve_source for a URI: a manifest object, an archive prefix, or one volume."""
    info = storage.info(src)
    if info.type == pafs.FileType.NotFound:
        raise CTSearchInputError(src, "no such file or folder")
    if info.type == pafs.FileType.File and src.endswith(".parquet"):
        fs, path = storage.resolve(src)
        t = read_parquet(src, lambda _: pq.read_table(path, filesystem=fs))
        return _manifest_tasks(t, src, src.rsplit("/", 1)[0], id_salt), []
    if info.type == pafs.FileType.File:
        return [_task({"path": src}, None, id_salt)], []
    from ctsearch.io import scan_archive

    entries, errors = scan_archive(src)
    return [_task(_as_dict(e), None, id_salt) for e in entries], [dict(e) for e in errors]


def _as_dict(entry) -> dict:
    """A scan entry (ScanEntry) as the fields a volume task is made of."""
    return {k: getattr(entry, k) for k in ("path", "format", "files", *ID_COLUMNS)}


def _task(r: dict, base: Path | str | None, id_salt: bytes | None = None) -> dict:
    path = str(r["path"])
    if isinstance(base, str):  # a manifest on a store: its relative paths are relative to its folder
        if not storage.is_remote(path) and not os.path.isabs(path):
            path = storage.join(base, path)
    elif base is not None and not os.path.isabs(path) and not os.path.exists(path):
        path = str(base / path)
    is_dir = storage.is_dir(path) if storage.is_remote(path) and not r.get("format") else os.path.isdir(path)
    fmt = r.get("format") or ("dicom" if is_dir else "nifti")
    ids = {c: str(r.get(c) or "") for c in ID_COLUMNS}
    # A DICOM folder can hold several series: the source's series id is part of the unit's name.
    # Hashed like the rows' series id: the entry is stored in the volumes table.
    series = pseudonymise(ids["series_id"], id_salt) if id_salt is not None else ids["series_id"]
    entry = f"{path}#{series}" if fmt == "dicom" and series else path
    return {
        "path": path,
        "format": fmt,
        "entry": entry,
        "files": [str(f) for f in (r.get("files") or ())],
        **ids,
    }


# ----------------------------------------------------------------------------- pipeline stages


def read_volume_rows(
    batch: dict[str, np.ndarray],
    known_ref,
    id_salt: bytes | None = None,
    config: dict | None = None,
    filesystems: dict | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Volume tasks -> slabs of rows, one row per axial slice, or one status row.

    A slab's ``hu`` is one int16 array [rows, y, x] (Ray Data keeps it as one tensor buffer: no
    per-slice objects to copy). Status rows (``status`` error | duplicate, ``n_rows`` 1) carry an
    empty [rows, 0, 0] ``hu``; every row
    carries the volume's ``n_rows`` so the driver knows when a volume, and its shard, is complete.
    With ``id_salt`` every row's ids are already hashed (ctsearch.ids). With a model ``config``
    each slab is preprocessed here (``pixels`` instead of ``hu``): the CPU model's path.
    A task whose path is a URI fetches the volume's objects into a node-local temp folder with
    the driver's ``filesystems`` (ctsearch.storage.filesystems), reads and deletes them.
    """
    known = shared_value(known_ref)
    here = node_id()
    for i in range(len(batch["path"])):
        rows, hu = _volume_rows({k: batch[k][i] for k in batch}, known, id_salt, filesystems)
        for a in range(0, len(rows), SLAB_SLICES):
            slab = rows[a : a + SLAB_SLICES]
            out = {k: [r[k] for r in slab] for k in slab[0]}
            out["read_node"] = [here] * len(slab)
            cols = {
                k: np.asarray(v, dtype=object) if k in _OBJECT_COLS else np.asarray(v) for k, v in out.items()
            }
            cols["hu"] = hu[a : a + SLAB_SLICES] if hu is not None else np.zeros((len(slab), 0, 0), np.int16)
            yield cols if config is None else preprocess(cols, config)


_OBJECT_COLS = {
    "path",
    "entry",
    "format",
    "status",
    "error",
    "content_hash",
    "pixel_hash",
    "stage",
    "read_node",
    *ID_COLUMNS,
}


def _volume_rows(
    task: dict, known: set, id_salt: bytes | None = None, filesystems: dict | None = None
) -> tuple[list[dict], np.ndarray | None]:
    """(a volume's rows, its HU [n, y, x] int16), or ([one status row], None)."""
    path = str(task["path"])
    from ctsearch.io import read_volume
    from ctsearch.io.remote import volume_copy

    base = {k: task[k] for k in ("path", "entry", "shard", "order", "size", "mtime_ns")}
    base["path"], base["entry"] = path, str(task["entry"])
    status = dict(
        status="indexed",
        error="",
        stage="",
        content_hash="",
        pixel_hash="",
        height=0,
        width=0,
        slice_index=-1,
        z_mm=float("nan"),
        **_final_ids(task, None, path, id_salt),
    )
    try:
        # A local path is read where it is; a URI's objects are fetched into a temp folder first.
        with volume_copy(path, str(task["format"]), list(task["files"]) or None, filesystems) as (
            local,
            files,
        ):
            chash = content_hash(local, files)
            series = str(task["series_id"]) if task["format"] == "dicom" and task["series_id"] else None
            if series and is_pseudonym(series):  # a pseudonymised manifest names the series by its hash
                series = _series_by_pseudonym(local, series, id_salt)
            vol = read_volume(local, series_id=series)
    except CTSearchInputError as e:
        return [{**base, **status, "status": "error", "stage": "read", "error": e.problem, "n_rows": 1}], None
    except Exception as e:  # a reader bug must not stop the archive: record it and go on
        error = f"{type(e).__name__}: {e}"
        return [{**base, **status, "status": "error", "stage": "read", "error": error, "n_rows": 1}], None
    ids = _final_ids(task, vol, path, id_salt)
    # pixel_hash: copies of one scan in other files (NIfTI + DICOM) are not another exam (crossexam).
    status.update(ids, content_hash=chash, pixel_hash=vol.pixel_hash())
    if f"{ids['series_id']}|{chash}" in known:
        return [{**base, **status, "status": "duplicate", "n_rows": 1}], None
    hu, z = np.ascontiguousarray(vol.hu, dtype="<i2"), vol.z_mm()
    n, h, w = hu.shape
    if n == 0:
        return [
            {
                **base,
                **status,
                "status": "error",
                "stage": "read",
                "error": "volume has no slices",
                "n_rows": 1,
            }
        ], None
    return [
        {
            **base,
            **status,
            "height": h,
            "width": w,
            "slice_index": k,
            "z_mm": float(z[k]),
            "n_rows": n,
        }
        for k in range(n)
    ], hu


def _final_ids(task: dict, vol, path: str, salt: bytes | None) -> dict:
    """The one place the index job finalises a volume's ids (rows, volume records, duplicate keys):
    the source's ids, else the volume's own (``vol`` None: not read), hashed with ``salt`` if given."""
    ids = {c: str(task[c] or "") for c in ID_COLUMNS}
    if vol is not None:
        for c in ("patient_id", "study_id", "series_id", "exam_date"):
            ids[c] = ids[c] or str(getattr(vol, c) or "")
        ids["volume_id"] = ids["volume_id"] or ids["series_id"] or Path(path).name
    return pseudonymise_ids(ids, salt)


def _series_by_pseudonym(folder: str, pseudonym: str, salt: bytes | None) -> str | None:
    """The SeriesInstanceUID in ``folder`` whose pseudonym is ``pseudonym``."""
    from ctsearch.io import dicom
    from ctsearch.io.formats import walk_files

    groups, _ = dicom.group_series(walk_files(folder))
    for uid in groups:
        if salt is not None and pseudonymise(uid, salt) == pseudonym:
            return uid
    if len(groups) == 1:
        return None  # the folder's only series: read it (its ids are hashed again, to the same values)
    raise CTSearchInputError(folder, f"no DICOM series with pseudonym {pseudonym} here (another salt?)")


def preprocess(batch: dict[str, np.ndarray], config: dict, device: str | None = None):
    """HU rows -> ``pixels`` [n, 1, S, S] by ctsearch.preprocess (zeros for status rows).

    One grey channel travels to the model (``Embedder`` feeds it to a grey-input encoder): on the
    CPU path a third of the bytes through the object store (S = 224: 200 kB per slice, not 600 kB).
    Without a ``device`` (a reading task) this is numpy alone: the task never imports torch. With
    one (the embedding actor) ``pixels`` is a tensor there, made by torch with the same weights.
    """
    cfg = ModelConfig.from_json(config)
    n, S = len(batch["path"]), cfg.image_size
    out = {k: v for k, v in batch.items() if k != "hu"}
    if device is None:
        from ctsearch.preprocess import eval_pixels

        groups = list(_hu_groups(batch))
        if len(groups) == 1 and len(groups[0][0]) == n:  # every row a slice of one size: no copy
            out["pixels"] = eval_pixels(groups[0][1], cfg)
            return out
        pixels = np.zeros((n, 1, S, S), np.float32)
        for rows, hu in groups:
            pixels[rows] = eval_pixels(hu, cfg)
        out["pixels"] = pixels
        return out
    import torch

    from ctsearch.preprocess import eval_transform

    pixels = torch.zeros((n, 1, S, S), device=device)
    for rows, hu in _hu_groups(batch):
        hu = torch.from_numpy(np.ascontiguousarray(hu)).to(device, non_blocking=True)
        pixels[torch.from_numpy(rows).to(device)] = eval_transform(hu, cfg, channels=1)
    out["pixels"] = pixels
    return out


def _hu_groups(batch: dict[str, np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row indices, HU [rows, y, x]) per slice size among the batch's indexed rows.

    Ray Data hands a batch whose slices are all one size over as one array (no copy); mixed
    sizes, or status rows among them, come as an object array of per-row arrays.
    """
    ok = batch["status"] == "indexed"
    hu = batch["hu"]
    if hu.dtype != object:
        rows = np.flatnonzero(ok)
        if len(rows):
            yield rows, hu if len(rows) == len(hu) else hu[rows]
        return
    shapes = np.array([h.shape for h in hu])
    for shape in {tuple(shapes[i]) for i in np.flatnonzero(ok)}:
        rows = np.flatnonzero(ok & (shapes == shape).all(axis=1))
        yield rows, np.stack([hu[i] for i in rows])


class Embedder:
    """The encoder, once per actor: ``pixels`` (or ``hu``, preprocessed here) -> ``embedding`` [n, D].

    Embeddings are float32 and L2-normalised. On a GPU: bf16 autocast and channels_last; on CPU:
    float32 with ``threads`` torch threads.
    """

    def __init__(self, model_dir: str, device: str = "cpu", threads: int | None = None, filesystems=None):
        import torch

        from ctsearch.model import fold_batchnorm, grey_input, load_encoder

        storage.adopt(filesystems)  # a model in an index on a store: fetched with the driver's keys
        if device == "cpu" and threads:
            torch.set_num_threads(int(threads))
        self.device = device
        # Every batch has the same shape but the last: let cuDNN time its algorithms once.
        torch.backends.cudnn.benchmark = device != "cpu"
        model, self.config = load_encoder(model_dir, device=device)
        # Grey slices in where the encoder allows (no pseudo-RGB copy of every input), and
        # BatchNorm folded into the convolutions.
        grey = grey_input(model)
        self.grey = grey is not None
        self.model = fold_batchnorm(grey if self.grey else model)
        if device != "cpu":
            self.model = self.model.to(memory_format=torch.channels_last)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from ctsearch.preprocess import to_rgb

        if "hu" in batch:
            batch = preprocess(batch, self.config.to_json(), self.device)
        x = torch.as_tensor(batch["pixels"], device=self.device)
        ok = batch["status"] == "indexed"
        emb = np.zeros((len(x), self.config.embedding_dim), np.float32)
        if ok.any():
            with torch.inference_mode():
                # Status rows (errors, duplicates) carry zeros; most batches have none to leave out.
                xs = x if ok.all() else x[torch.from_numpy(ok).to(self.device)]
                if not self.grey:
                    xs = to_rgb(xs)
                if self.device != "cpu":
                    xs = xs.contiguous(memory_format=torch.channels_last)
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        e = self.model(xs)
                else:
                    e = self.model(xs)
                emb[ok] = l2_normalize(e.float().cpu().numpy())
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["embedding"] = emb
        out["embed_node"] = np.full(len(x), node_id(), dtype=object)
        return out


# ----------------------------------------------------------------------------- driver


@dataclass
class IndexOptions:
    """What ``ctsearch index`` builds (docs/scaling.md); how it runs (address, progress) is separate."""

    gpus: int = 0  # GPUs to embed on, one model each; 0: one model on the CPU
    batch_size: int | None = None  # slices per model batch; None: 64 on CPU, 256 on a GPU
    dtype: EmbeddingDtype = "float32"  # stored embeddings; float16 halves the files
    ann_threshold: int = DEFAULT_ANN_THRESHOLD  # vectors from which a shard gets an ANN index
    ann: AnnKind = "ivfpq"  # ANN kind at or above the threshold
    shard_volumes: int = 32  # volumes per shard, the unit committed at once
    threads: int | None = None  # torch threads of the CPU model (None: all cores)

    def check(self) -> None:
        if self.shard_volumes < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise CTSearchInputError(None, "--shard-volumes and --batch-size must be >= 1")


@dataclass
class IndexSummary:
    """What one ``index_source`` run did, and the index it left (``to_json`` is the CLI's --json)."""

    volumes_seen: int = 0
    unchanged_skipped: int = 0
    duplicates_skipped: int = 0
    volumes_indexed: int = 0
    volumes_failed: int = 0
    rows_added: int = 0
    shards_added: list[str] = field(default_factory=list)
    scan_errors: int = 0
    # Ray node id -> volumes read there / slices embedded there: where the work ran.
    nodes: dict[str, dict[str, int]] = field(default_factory=lambda: {"read": {}, "embed": {}})
    index_rows: int = 0
    shards: int = 0
    errors: int = 0
    compacted_into: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def index_source(
    source: str | os.PathLike,
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    options: IndexOptions | None = None,
    *,
    address: str | None = None,
    on_volume: Callable[[int, int], None] | None = None,
    id_salt: bytes | None = None,
    **option_values,
) -> IndexSummary:
    """Index ``source`` (archive folder, manifest.parquet or one volume) into ``out``.

    ``options`` (or its fields as keywords: ``index_source(src, run, out, shard_volumes=8)``) say
    what to build. ``id_salt``: hash patient, study and series ids with it (ctsearch.ids); an
    index is only extended with the salt it was made with, or without one if it was made without.
    ``on_volume(done, total)`` is called as volumes finish (for progress bars).
    """
    options = replace(options or IndexOptions(), **option_values)
    options.check()
    from ctsearch.model import load_encoder

    model_dir = storage.model_folder(model_dir)  # a run URI: its local copy, fetched once here
    _, config = load_encoder(model_dir)  # validates the model dir before any work
    # Before the output folder exists: a missing archive or a corrupt manifest leaves nothing behind.
    tasks, scan_errors = resolve_source(source, id_salt)
    with IndexWriter.open(
        out,
        config,
        model_dir,
        dtype=options.dtype,
        ann_threshold=options.ann_threshold,
        ann=options.ann,
        id_salt=id_salt,
    ) as writer:
        if scan_errors:
            writer.add_scan_errors(scan_errors)
        pending, unchanged = _changed_tasks(writer, tasks)
        if unchanged:
            announce(f"{unchanged} of {len(tasks)} volumes already indexed in {out}: skipped")
        summary = IndexSummary(
            volumes_seen=len(tasks), unchanged_skipped=unchanged, scan_errors=len(scan_errors)
        )
        if pending:
            _run_pipeline(
                pending,
                writer,
                config,
                options,
                summary,
                address=address,
                on_volume=on_volume,
                id_salt=id_salt,
            )
        summary.compacted_into = writer.compact()
        summary.index_rows, summary.shards = writer.manifest["rows"], len(writer.manifest["shards"])
        summary.errors = writer.manifest["errors"]
        return summary


def _changed_tasks(writer: IndexWriter, tasks: list[dict]) -> tuple[list[dict], int]:
    """(tasks whose path is new or changed since the index handled it, with size and mtime; count of the others)."""
    pending, unchanged = [], 0
    for t in tasks:
        try:
            size, mtime = storage.fingerprint(t["path"], t["files"] or None)
        except (OSError, CTSearchInputError):
            size, mtime = -1, -1
        if writer.unchanged(t["entry"], (size, mtime)):
            unchanged += 1
            continue
        pending.append({**t, "size": size, "mtime_ns": mtime})
    return pending, unchanged


def model_memory_bytes(config: ModelConfig, batch_size: int) -> int:
    """What one embedding actor holds: ~1 GiB of Python + torch runtime, weights (x2 while
    loading) and ~16 activations per input (measured: ~1.2 GiB for resnet50 at batch 32 on CPU).

    Declaring it is good practice, and also what keeps Ray Data from fusing decoding into the
    model actor (operators with different resource requests are never fused), so the model
    never waits on decoding.
    """
    from ctsearch.model import build_encoder

    params = sum(p.numel() for p in build_encoder(config).parameters()) * 4
    return int(2**30 + 2 * params + batch_size * 3 * config.image_size**2 * 4 * 16)


def _run_pipeline(
    pending: list[dict],
    writer: IndexWriter,
    config: ModelConfig,
    options: IndexOptions,
    summary: IndexSummary,
    *,
    address: str | None,
    on_volume: Callable[[int, int], None] | None,
    id_salt: bytes | None,
) -> None:
    start_ray(address)
    gpus, shard_volumes = options.gpus, options.shard_volumes
    batch_size = options.batch_size or (256 if gpus else 64)
    for j, t in enumerate(pending):
        t["order"], t["shard"] = j, j // shard_volumes
    n_shards = (len(pending) + shard_volumes - 1) // shard_volumes
    known_ref = ray.put(writer.known_keys())
    device = "cuda" if gpus else "cpu"
    threads = options.threads or os.cpu_count() or 1
    # One task per volume. Preprocessing is part of the task for a CPU model; a GPU actor does it
    # on its device. (A separate preprocess stage would be fused with reading and take its batch
    # size: 64 volumes per task, one core reading a whole archive.)
    ds = ray.data.from_items(pending, override_num_blocks=len(pending)).map_batches(
        read_volume_rows,
        batch_size=1,
        fn_kwargs={
            "known_ref": known_ref,
            "id_salt": id_salt,
            "config": None if gpus else config.to_json(),
            # Stores' filesystems resolved here: workers need not share the driver's environment.
            "filesystems": storage.filesystems(t["path"] for t in pending),
        },
        num_cpus=1,
    )
    ds = ds.map_batches(
        Embedder,
        batch_size=batch_size,
        fn_constructor_kwargs={
            # The index's own copy of the model: on a store, each actor's node fetches it.
            "model_dir": storage.join(writer.remote, "model")
            if writer.remote
            else str(writer.root / "model"),
            "device": device,
            "threads": threads,
            "filesystems": storage.filesystems([writer.remote] if writer.remote else []),
        },
        # Batches queued at each actor: it starts the next as soon as one ends.
        compute=ray.data.ActorPoolStrategy(size=max(1, gpus), max_tasks_in_flight_per_actor=4),
        num_gpus=1 if gpus else 0,
        num_cpus=1,
        memory=model_memory_bytes(config, batch_size),
    )
    by_shard: dict[int, list[dict]] = defaultdict(list)  # shard -> batches of rows
    remaining = defaultdict(int)  # shard -> volumes not yet complete
    for t in pending:
        remaining[t["shard"]] += 1
    seen = defaultdict(int)  # volume order -> rows received
    done = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        by_shard_batch = defaultdict(list)
        for i in range(len(batch["order"])):
            by_shard_batch[int(batch["shard"][i])].append(i)
        for shard, idx in by_shard_batch.items():
            by_shard[shard].append({k: v[idx] for k, v in batch.items()})
            for i in idx:
                o = int(batch["order"][i])
                seen[o] += 1
                if seen[o] == int(batch["n_rows"][i]):
                    remaining[shard] -= 1
                    done += 1
                    if on_volume:
                        on_volume(done, len(pending))
            if remaining[shard] == 0:
                _commit(writer, by_shard.pop(shard), summary)
    if log.isEnabledFor(logging.DEBUG):  # where the time went, stage by stage (bench/index.py --stats)
        log.debug("%s", ds.stats())
    if any(remaining.values()) or by_shard:
        raise RuntimeError(
            f"pipeline ended with {sum(remaining.values())} volumes incomplete (of {n_shards} shards)"
        )


def _commit(writer: IndexWriter, parts: list[dict], summary: IndexSummary) -> None:
    """Rows of one complete shard -> volumes/errors records + embeddings, committed atomically."""
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.lexsort((cols["slice_index"], cols["order"]))  # deterministic row order
    cols = {k: v[order] for k, v in cols.items()}
    volumes, errors, keep = [], [], []
    starts = np.flatnonzero(np.r_[True, cols["order"][1:] != cols["order"][:-1]])
    for a, b in zip(starts, np.r_[starts[1:], len(order)]):
        r = {k: cols[k][a] for k in cols}
        status = str(r["status"])
        # The same content twice in one run (or committed since the job started) is a duplicate.
        if status == "indexed" and writer.is_indexed(str(r["series_id"]), str(r["content_hash"])):
            status = "duplicate"
        if status == "indexed" and any(
            v["status"] == "indexed"
            and (v["series_id"], v["content_hash"]) == (str(r["series_id"]), str(r["content_hash"]))
            for v in volumes
        ):
            status = "duplicate"
        read_at = str(r["read_node"])
        summary.nodes["read"][read_at] = summary.nodes["read"].get(read_at, 0) + 1
        volumes.append(
            {
                "entry": str(r["entry"]),
                "path": str(r["path"]),
                "volume_id": str(r["volume_id"]),
                "series_id": str(r["series_id"]),
                "content_hash": str(r["content_hash"]),
                "pixel_hash": str(r["pixel_hash"]),
                "size": int(r["size"]),
                "mtime_ns": int(r["mtime_ns"]),
                "n_slices": int(b - a) if status == "indexed" else 0,
                "status": status,
            }
        )
        if status == "error":
            errors.append({"path": str(r["path"]), "stage": str(r["stage"]), "error": str(r["error"])})
            summary.volumes_failed += 1
        elif status == "duplicate":
            summary.duplicates_skipped += 1
        else:
            keep.append(np.arange(a, b))
            summary.volumes_indexed += 1
    idx = np.concatenate(keep) if keep else np.zeros(0, np.int64)
    for node, count in zip(*np.unique(cols["embed_node"][idx].astype(str), return_counts=True)):
        summary.nodes["embed"][node] = summary.nodes["embed"].get(node, 0) + int(count)
    rows = [{c: _py(cols[c][i]) for c in META_COLUMNS} for i in idx]
    for r in rows:
        r["exam_date"] = r["exam_date"] or None
    vectors = (
        cols["embedding"][idx] if len(idx) else np.zeros((0, writer.manifest["embedding_dim"]), np.float32)
    )
    name = writer.commit_shard(rows, vectors, volumes, errors)
    summary.rows_added += len(rows)
    summary.shards_added.append(name)


def _py(v):
    return v.item() if isinstance(v, np.generic) else v
