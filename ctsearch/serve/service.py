"""What one front replica of ``ctsearch serve`` does, without Ray: queries, search, cross-exam,
thumbnails and RELAX pair explanations over one or more shard groups.

The service holds the index's model (loaded once), its ``index.json`` and the source volumes it
has shown recently. Shards live in :class:`~ctsearch.serve.shards.ShardGroup` objects reached
through *callers*: :class:`LocalGroup` (in this process) or, under Ray Serve, a deployment handle
(``ctsearch.serve.deploy``). Every answer is a plain dict (JSON) or PNG bytes.

Example:
    >>> svc = SearchService("INDEX_DIR", [LocalGroup(ShardGroup("INDEX_DIR"))])     # doctest: +SKIP
    >>> asyncio.run(svc.search(Query.parse("liver_0:20"), k=5))["hits"][0]["score"]  # doctest: +SKIP
    1.0
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass

import numpy as np

from ctsearch.errors import CTSearchInputError
from ctsearch.index.format import HIT_COLUMNS
from ctsearch.serve.shards import ShardGroup, distinct_hits, merge_hits
from ctsearch.serve.sources import LRU, Sources, parse_window, read_upload, thumbnail_png, upload_digest

# Keys of a hit in the API, in the order the docs list them.
HIT_KEYS = (*HIT_COLUMNS, "format", "sop_instance_uid", "shard", "row")
ONE_PER = ("series", "study")
DEFAULT_MASKS = 1000  # RELAX masks per explanation; the paper uses 3000 (?masks=3000)
MAX_MASKS = 5000
MAX_K = 100
MAX_CANDIDATES = 10_000  # one_per: the deepest search for k distinct series/studies


class ServeError(Exception):
    """A request the service refuses: HTTP ``status`` and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, " ".join(str(message).split())


@dataclass(frozen=True)
class Query:
    """A query slice: a row of the index (``volume_id:slice_index``) or an uploaded file + slice."""

    volume_id: str | None = None
    slice_index: int | None = None
    upload: bytes | None = None

    @classmethod
    def parse(cls, ref: str | None, slice_index: int | None = None, upload: bytes | None = None) -> Query:
        """``ref`` = ``volume_id:slice_index`` (GET), or ``upload`` bytes and an optional slice (POST)."""
        if upload is not None:
            if ref:
                raise ServeError(
                    400, "give either a query row (query=volume_id:slice) or an uploaded file, not both"
                )
            return cls(slice_index=slice_index, upload=upload)
        if not ref:
            raise ServeError(
                400, "missing query: pass query=volume_id:slice_index, or POST a NIfTI/DICOM file"
            )
        vid, sep, si = str(ref).rpartition(":")
        if not sep or not vid or not si.lstrip("-").isdigit():
            raise ServeError(400, f"query must be volume_id:slice_index, got {ref!r}")
        if slice_index is not None:
            raise ServeError(400, "a query row names its slice; drop slice=")
        return cls(volume_id=vid, slice_index=int(si))


@dataclass
class Resolved:
    """A query made concrete: unit vector, metadata, and where its pixels are."""

    vector: np.ndarray
    meta: dict
    hu: np.ndarray | None = None  # int16 [y, x]; rows' pixels are read only when a picture needs them


class LocalGroup:
    """A shard group in this process, called like a remote one (in a worker thread)."""

    def __init__(self, group: ShardGroup):
        self.group = group

    async def call(self, method: str, *args):
        return await asyncio.to_thread(getattr(self.group, method), *args)


class SearchService:
    """Queries over an index directory served by ``groups`` (callers of ShardGroup methods, in shard order).

    Args:
        index_dir: the index directory (its ``model/`` and ``index.json`` are read here).
        groups: one caller per shard group, in shard order.
        id_salt: the index's salt, to hash ids of uploaded files and original ``patient`` ids.
        max_upload_bytes: larger uploads are refused (413).
        cached_volumes: source volumes kept decoded for thumbnails and explanations.
    """

    def __init__(
        self,
        index_dir: str | os.PathLike,
        groups: list,
        id_salt: bytes | None = None,
        max_upload_bytes: int = 512 << 20,
        cached_volumes: int = 8,
    ):
        import torch

        from ctsearch.index import Index
        from ctsearch.model import load_encoder

        self.index = Index.open(index_dir)
        self.groups = groups
        self.id_salt = id_salt
        self.max_upload_bytes = int(max_upload_bytes)
        self.encoder, self.config = load_encoder(
            self.index.model_dir, expected_sha256=self.index.encoder_sha256
        )
        self.encoder.eval()
        self._torch = torch
        self.sources = Sources(cached_volumes)
        self._uploads = LRU(4)
        self._figures = LRU(32)
        self._explaining = threading.Semaphore(1)  # RELAX is heavy: one at a time per replica
        self._catalogue: dict[str, dict] | None = None
        self._closing = threading.Event()

    # --------------------------------------------------------------------- index facts
    async def catalogue(self) -> dict[str, dict]:
        """volume_id -> catalogue row (ShardGroup.catalogue), over all groups; cached."""
        if self._catalogue is None:
            parts = await asyncio.gather(*(g.call("catalogue") for g in self.groups))
            self._catalogue = {v["volume_id"]: v for part in parts for v in part}
        return self._catalogue

    async def info(self) -> dict:
        """Model, dimensions, counts and shards of the served index."""
        m = self.index.manifest
        cat = await self.catalogue()
        return {
            "model": m["model"].get("model_id") or self.config.backbone,
            "backbone": self.config.backbone,
            "image_size": self.config.image_size,
            "embedding_dim": self.index.dim,
            "dtype": m.get("dtype"),
            "slices": int(m["rows"]),
            "volumes": len(cat),
            "patients": len({v["patient_id"] for v in cat.values()}),
            "shards": [{k: s.get(k) for k in ("name", "kind", "rows")} for s in m["shards"]],
            "shard_groups": len(self.groups),
            "pseudonymised": bool(self.index.ids.get("pseudonymised")),
            "max_upload_bytes": self.max_upload_bytes,
            "default_masks": DEFAULT_MASKS,
        }

    async def patients(self) -> list[dict]:
        """Patients with their examinations (volumes), for choosing a query: sorted by patient, then date."""
        by_patient: dict[str, list[dict]] = {}
        for v in (await self.catalogue()).values():
            by_patient.setdefault(v["patient_id"] or "", []).append({k: v[k] for k in v if k != "path"})
        return [
            {
                "patient_id": p,
                "exams": sorted(
                    ex, key=lambda e: (e["exam_date"] or "", e["study_id"] or "", e["volume_id"])
                ),
            }
            for p, ex in sorted(by_patient.items())
        ]

    async def volume_slices(self, volume_id: str) -> list[dict]:
        """(slice_index, z_mm) of every indexed slice of a volume, for the slider along z."""
        await self._volume(volume_id)
        parts = await asyncio.gather(*(g.call("slice_z", volume_id) for g in self.groups))
        return [{"slice_index": s, "z_mm": z} for s, z in sorted(x for p in parts for x in p)]

    async def _volume(self, volume_id: str) -> dict:
        v = (await self.catalogue()).get(volume_id)
        if v is None:
            raise ServeError(404, f"unknown volume {volume_id!r}: not in this index")
        return v

    async def warm(self) -> None:
        """Learn the slice order of the index's DICOM series in the background, so that the
        SOPInstanceUIDs of hits cost one header read (reading a series' headers takes ~1 ms per file)."""
        if self.index.ids.get("pseudonymised"):
            return  # UIDs are withheld there
        folders = [v["path"] for v in (await self.catalogue()).values() if v["path"]]
        await asyncio.to_thread(self._warm_dicom, folders[: self.sources.series_cached])

    def _warm_dicom(self, folders: list[str]) -> None:
        for f in folders:
            if self._closing.is_set():
                return
            if os.path.isdir(f):
                self.sources.dicom_files(f)

    def close(self) -> None:
        """Stop background work (the replica is going away)."""
        self._closing.set()

    # --------------------------------------------------------------------- queries
    async def resolve(self, q: Query) -> Resolved:
        """The query's unit vector, metadata (ids as the index stores them) and HU slice."""
        from ctsearch.index import l2_normalize

        if q.upload is None:
            v = await self._volume(q.volume_id)
            found = [
                x
                for part in await asyncio.gather(
                    *(g.call("lookup", q.volume_id, q.slice_index) for g in self.groups)
                )
                for x in part
            ]
            if not found:
                raise ServeError(
                    404,
                    f"slice {q.slice_index} of volume {q.volume_id!r} is not in the index "
                    f"(indexed slices: {v['slice_min']}..{v['slice_max']})",
                )
            if len(found) > 1:
                raise ServeError(
                    409,
                    f"row {q.volume_id}:{q.slice_index} is ambiguous ({len(found)} volumes share that id)",
                )
            vector, meta = found[0]
            return Resolved(l2_normalize(vector[None])[0], meta)
        return await asyncio.to_thread(self._resolve_upload, q)

    def _row_hu(self, meta: dict) -> np.ndarray:
        if not meta.get("path"):
            raise ServeError(404, f"row {meta['volume_id']}:{meta['slice_index']} has no source path")
        return self.sources.slice_hu(meta["path"], int(meta["slice_index"]), self._series_arg(meta))

    @staticmethod
    def _series_arg(meta: dict) -> str | None:
        from ctsearch.io.dicom import is_uid

        # A DICOM folder may hold several series; the row's series UID picks one (a pseudonym cannot).
        sid = meta.get("series_id") or ""
        return sid if os.path.isdir(meta.get("path") or "") and is_uid(sid) else None

    def _resolve_upload(self, q: Query) -> Resolved:
        from ctsearch.index import l2_normalize
        from ctsearch.model import embed
        from ctsearch.query import query_ids, slice_meta

        vol = self._uploads.get_or_make(
            upload_digest(q.upload), lambda: read_upload(q.upload, self.max_upload_bytes)
        )
        n = vol.hu.shape[0]
        s = n // 2 if q.slice_index is None else int(q.slice_index)
        if not 0 <= s < n:
            raise ServeError(
                400, f"slice {s} is out of range: the uploaded volume has {n} slices (0..{n - 1})"
            )
        with self._torch.inference_mode():
            vector = l2_normalize(embed(self.encoder, vol.hu[s : s + 1], self.config))[0]
        meta = slice_meta(
            vol, s, vol.series_id or "upload", None
        )  # pixel_hash: an indexed copy is no other exam
        meta = query_ids(self.index, meta, self.id_salt)  # the same hashing as `ctsearch search FILE`
        return Resolved(vector, {**meta, "upload": True, "n_slices": n}, np.asarray(vol.hu[s]))

    def _upload_series(self, q: Query) -> tuple[np.ndarray, np.ndarray]:
        """Every slice of an uploaded series embedded (cross-exam aligns the whole exam)."""
        from ctsearch.index import l2_normalize
        from ctsearch.model import embed

        vol = self._uploads.get_or_make(
            upload_digest(q.upload), lambda: read_upload(q.upload, self.max_upload_bytes)
        )
        with self._torch.inference_mode():
            return l2_normalize(embed(self.encoder, vol.hu, self.config)), vol.z_mm()

    # --------------------------------------------------------------------- search
    async def search_vector(
        self,
        vector: np.ndarray,
        k: int,
        patient: str | None = None,
        exclude_patient: str | None = None,
        one_per: str | None = None,
    ) -> list[dict]:
        """Top-k rows for a unit vector, over all groups (exactly ``Index.search``'s hits), then one per series/study."""
        deepest = min(int(self.index.manifest["rows"]), max(k, MAX_CANDIDATES))
        kk = k
        while True:
            parts = await asyncio.gather(
                *(g.call("search", vector[None], kk, patient, exclude_patient) for g in self.groups)
            )
            hits = merge_hits(parts, kk)[0]
            out = distinct_hits(hits, one_per, k)
            if one_per is None or len(out) >= k or len(hits) < kk or kk >= deepest:
                return out
            kk = min(kk * 4, deepest)  # duplicates of one series filled the list: look further

    async def search(
        self,
        q: Query,
        k: int = 5,
        patient: str | None = None,
        exclude_patient: str | None = None,
        one_per: str | None = None,
    ) -> dict:
        """``{"query": meta, "hits": [...]}`` with HIT_KEYS per hit."""
        if not 1 <= k <= MAX_K:
            raise ServeError(400, f"k must be between 1 and {MAX_K}, got {k}")
        if one_per not in (None, *ONE_PER):
            raise ServeError(400, f"one_per must be series or study, got {one_per!r}")
        if patient is not None and exclude_patient is not None:
            raise ServeError(400, "patient and exclude_patient exclude each other")
        patient, exclude_patient = (
            self.index.patient_key(patient, self.id_salt),
            self.index.patient_key(exclude_patient, self.id_salt),
        )
        r = await self.resolve(q)
        hits = await self.search_vector(r.vector, k, patient, exclude_patient, one_per)
        hits = await asyncio.to_thread(lambda: [self.public_hit(h) for h in hits])
        return {"query": self.public_query(r.meta), "hits": hits}

    def public_hit(self, h: dict) -> dict:
        """A hit as the API gives it: where to open the slice elsewhere (path, format, SOPInstanceUID)."""
        path = h.get("path") or ""
        is_dicom = os.path.isdir(path)
        sop = None
        # A pseudonymised index hides the DICOM UIDs that lead back to the hospital's PACS.
        if is_dicom and not self.index.ids.get("pseudonymised"):
            sop = self.sources.sop_instance_uid(path, int(h["slice_index"]))
        out = {**h, "format": "dicom" if is_dicom else ("nifti" if path else None), "sop_instance_uid": sop}
        return {k: out.get(k) for k in HIT_KEYS}

    def public_query(self, meta: dict) -> dict:
        keys = (
            "volume_id",
            "patient_id",
            "study_id",
            "series_id",
            "exam_date",
            "slice_index",
            "z_mm",
            "path",
            "upload",
            "n_slices",
        )
        out = {k: meta.get(k) for k in keys}
        out["upload"] = bool(meta.get("upload"))
        if (
            out["n_slices"] is None
            and meta.get("volume_id")
            and self._catalogue
            and meta["volume_id"] in self._catalogue
        ):
            out["n_slices"] = self._catalogue[meta["volume_id"]]["n_slices"]
        return out

    async def cross_exam(self, q: Query, per_exam: int = 5) -> dict:
        """The query's anatomy in each other examination of its patient (``crossexam.match_exams``):
        the groups send the patient's volumes, the front aligns them as ``ctsearch search --cross-exam``."""
        from ctsearch.crossexam import match_exams

        if not 1 <= per_exam <= 50:
            raise ServeError(400, f"per_exam must be between 1 and 50, got {per_exam}")
        r = await self.resolve(q)
        patient = r.meta.get("patient_id")
        if not patient:
            why = (
                "the index's ids are pseudonymised and the server has no --id-salt-file to hash the upload's patient id"
                if self.index.ids.get("pseudonymised")
                else "the query has no patient id"
            )
            raise ServeError(400, f"cross-exam needs the query's patient: {why}")
        own = None if r.meta.get("upload") else r.meta.get("volume_id")
        parts = await asyncio.gather(*(g.call("patient_volumes", patient) for g in self.groups))
        res = await asyncio.to_thread(
            match_exams,
            r.vector,
            [v for p in parts for v in p],
            query_volume=own,
            query_slice=r.meta.get("slice_index"),
            query_hash=r.meta.get("pixel_hash"),
            series=(lambda: self._upload_series(q)) if r.meta.get("upload") else None,
            per_exam=per_exam,
        )
        return {"query": self.public_query(r.meta), **res}

    # --------------------------------------------------------------------- pictures
    async def thumbnail(self, volume_id: str, slice_index: int, window: str | None, size: int = 256) -> bytes:
        """PNG of an indexed slice in a display window."""
        w, size = parse_window(window), _size(size)
        v = await self._volume(volume_id)
        meta = {
            "volume_id": volume_id,
            "slice_index": slice_index,
            "path": v["path"],
            "series_id": v["series_id"],
        }
        if not v["path"]:
            raise ServeError(404, f"volume {volume_id!r} has no source path in the index")
        hu = await asyncio.to_thread(self._row_hu, meta)
        return await asyncio.to_thread(thumbnail_png, hu, w, size)

    async def query_thumbnail(self, q: Query, window: str | None, size: int = 256) -> bytes:
        """PNG of the query slice (an upload's too) in a display window."""
        w, size = parse_window(window), _size(size)
        if q.upload is None:
            return await self.thumbnail(q.volume_id, q.slice_index, window, size)
        r = await asyncio.to_thread(self._resolve_upload, q)
        return await asyncio.to_thread(thumbnail_png, r.hu, w, size)

    async def explain(self, q: Query, hit: str, masks: int = DEFAULT_MASKS, seed: int = 0) -> bytes:
        """RELAX for a query/hit pair as one PNG: the two slices, each one's own importance, and
        the pair maps (which parts of the query make it similar to the hit, and the reverse)."""
        if not 10 <= masks <= MAX_MASKS:
            raise ServeError(400, f"masks must be between 10 and {MAX_MASKS}, got {masks}")
        h = Query.parse(hit)
        r, rh = await asyncio.gather(self.resolve(q), self.resolve(h))
        for x in (r, rh):
            if x.hu is None:
                x.hu = await asyncio.to_thread(self._row_hu, x.meta)
        key = (
            q.volume_id,
            q.slice_index,
            upload_digest(q.upload) if q.upload else None,
            h.volume_id,
            h.slice_index,
            masks,
            seed,
        )
        return await asyncio.to_thread(
            self._figures.get_or_make, key, lambda: self._explain_png(r, rh, masks, seed)
        )

    def _explain_png(self, q: Resolved, h: Resolved, masks: int, seed: int) -> bytes:
        from ctsearch.preprocess import eval_transform
        from ctsearch.relax import relax
        from ctsearch.report import grid, overlay, png_bytes, slice_rgb

        torch = self._torch
        with self._explaining:
            # As `ctsearch explain`: slices of different sizes go through the transform one by one.
            x = torch.cat([eval_transform(q.hu[None], self.config), eval_transform(h.hu[None], self.config)])
            kw = dict(num_masks=masks, batch_size=100, seed=seed)
            with torch.inference_mode():
                emb = self.encoder(x).float()
            own = relax(self.encoder, x, **kw)
            pair_q = relax(self.encoder, x[:1], target=emb[1:2], **kw)  # query toward the hit
            pair_h = relax(self.encoder, x[1:], target=emb[:1], **kw)  # the hit toward the query
        size = 256
        rows = [
            [slice_rgb(q.hu, size), slice_rgb(h.hu, size)],
            [overlay(q.hu, own.importance[0], size), overlay(h.hu, own.importance[1], size)],
            [overlay(q.hu, pair_q.importance[0], size), overlay(h.hu, pair_h.importance[0], size)],
        ]
        caps = [["query", "hit"], ["query: own RELAX", "hit: own RELAX"], ["query -> hit", "hit -> query"]]
        return png_bytes(grid(rows, caps))


def _size(size: int) -> int:
    if not 16 <= size <= 1024:
        raise ServeError(400, f"size must be between 16 and 1024 pixels, got {size}")
    return int(size)


def as_serve_error(e: CTSearchInputError) -> ServeError:
    """A library input error as a 400, or 413 for an upload over the limit."""
    return ServeError(413 if "over the server's limit" in e.problem else 400, str(e))
