"""A search query -> (unit vector, metadata), embedded with an index's own model.

A query is a NIfTI file or DICOM series folder (one slice of it), or a row reference
``volume_id:slice_index`` to a slice already in the index. Used by ``ctsearch search`` and
``ctsearch explain``; the index reader itself never runs a model.

Example:
    >>> from ctsearch.index import Index
    >>> vector, meta = embed_query(Index.open("idx/"), "scan.nii.gz", slice_index=40)  # doctest: +SKIP
    >>> vector.shape, meta["slice_index"]                                             # doctest: +SKIP
    ((128,), 40)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ctsearch import storage
from ctsearch.errors import CTSearchInputError
from ctsearch.ids import check_same_salt, pseudonymise_ids, withhold_ids
from ctsearch.index import Index, l2_normalize


def slice_meta(vol, s: int, volume_id: str, path: str | None) -> dict:
    """A query slice's metadata, as an index row's (META_COLUMNS) plus the volume's ``pixel_hash``,
    which recognises the index's copies of this scan (ctsearch.crossexam)."""
    return {
        "volume_id": volume_id,
        "patient_id": vol.patient_id,
        "study_id": vol.study_id,
        "series_id": vol.series_id,
        "exam_date": vol.exam_date,
        "slice_index": s,
        "z_mm": float(vol.z_mm()[s]),
        "path": path,
        "pixel_hash": vol.pixel_hash(),
    }


def embed_query(
    index: Index, query: str | os.PathLike, slice_index: int | None = None, id_salt: bytes | None = None
) -> tuple[np.ndarray, dict]:
    """``query`` -> (unit vector [d], its metadata with META_COLUMNS).

    ``slice_index``: the slice of a file/folder query (default: the middle slice); a row
    reference names its own. On a pseudonymised index a file's ids are hashed like the rows'
    (with ``id_salt``, which must be the index's), so its patient can be recognised; without a
    salt they are left empty rather than shown beside pseudonyms.
    """
    if storage.exists(query):  # a file or folder, local or a URI
        p = query if storage.is_remote(query) else Path(query)
        from ctsearch.io import read_volume
        from ctsearch.model import embed, load_encoder

        vol = read_volume(p)
        n = vol.hu.shape[0]
        s = n // 2 if slice_index is None else int(slice_index)
        if not 0 <= s < n:
            raise CTSearchInputError(
                p, f"--slice {s} is out of range: the volume has {n} slices (0..{n - 1})"
            )
        encoder, config = load_encoder(index.model_dir, expected_sha256=index.encoder_sha256)
        v = l2_normalize(embed(encoder, vol.hu[s : s + 1], config))[0]
        meta = slice_meta(vol, s, vol.series_id or storage.name(p), str(p))
        return v, query_ids(index, meta, id_salt)
    vid, sep, si = str(query).rpartition(":")
    if sep and vid and si.lstrip("-").isdigit():
        if slice_index is not None:
            raise CTSearchInputError(query, "a row reference names its slice; drop --slice")
        v, meta = index.lookup(vid, int(si))
        return l2_normalize(v[None])[0], meta
    raise CTSearchInputError(query, "no such file or folder, and not a row reference volume_id:slice_index")


def embed_series(index: Index, path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Every slice of a file/folder query: (unit vectors float32 [n, d] in slice order, z float [n] mm),
    embedded with the index's model; what ``search --cross-exam`` aligns when the index holds
    neither the query's series nor a copy of it."""
    from ctsearch.io import read_volume
    from ctsearch.model import embed, load_encoder

    vol = read_volume(path)
    encoder, config = load_encoder(index.model_dir)
    return l2_normalize(embed(encoder, vol.hu, config)), vol.z_mm()


def query_ids(index: Index, meta: dict, id_salt: bytes | None) -> dict:
    """A file query's ids as ``index`` stores them: hashed with ``id_salt`` on a pseudonymised index
    (which must be the index's salt), withheld there without one, else as given."""
    if not index.ids.get("pseudonymised"):
        return meta
    if id_salt is None:
        return withhold_ids(meta)
    check_same_salt(index.ids, id_salt, index.root, "to hash the query's ids")
    return pseudonymise_ids(meta, id_salt)
