"""``ctsearch prepare``: scan an archive into a manifest, and cut the paper's slice protocol.

The manifest has one row per volume (``store.MANIFEST_SCHEMA``) and every input that could not be
used is a row of ``errors.parquet``. With ``protocol="decathlon"`` each labelled volume also gives
``per_volume`` slices that contain liver (label > 0) and ``per_volume`` that do not; volumes ordered
by case number go to ``train.parquet`` (the first ``train_volumes``) and ``test.parquet`` (the rest).

Slice choice rule (documented in docs/formats.md): for each volume, draw uniformly without
replacement from its liver slices and, separately, from its non-liver slices, with a generator
seeded by ``(seed, case number)``; so adding or removing other volumes never changes a volume's
slices. A volume with fewer slices of a kind gives all it has, and ``protocol.json`` says so.

Example:
    >>> summary = prepare("Task03_Liver", "prepared", protocol="decathlon")   # doctest: +SKIP
    >>> summary["volumes"], summary["train_slices"], summary["test_slices"]  # doctest: +SKIP
    (131, 1000, 310)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa

from ctsearch import storage
from ctsearch.errors import CTSearchInputError
from ctsearch.ids import ids_block, pseudonymise_ids
from ctsearch.io import ScanEntry, scan_archive
from ctsearch.store import (
    MANIFEST_SCHEMA,
    SliceSet,
    atomic_write_json,
    atomic_write_table,
    errors_table,
    write_slices,
)

PROTOCOLS = ("decathlon",)


def select_slices(
    label: np.ndarray, per_volume: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Pick slice indices with and without liver.

    Args:
        label: uint8 [z, y, x] segmentation (0 background, > 0 liver or tumour).
        per_volume: how many slices of each kind to draw.
        rng: the volume's generator.

    Returns:
        (liver_indices, non_liver_indices): sorted int arrays of at most ``per_volume`` each.
    """
    has_liver = label.reshape(label.shape[0], -1).max(axis=1) > 0
    picks = []
    for pool in (np.flatnonzero(has_liver), np.flatnonzero(~has_liver)):
        n = min(per_volume, pool.size)
        picks.append(np.sort(rng.choice(pool, size=n, replace=False)) if n else pool[:0])
    return picks[0], picks[1]


def _protocol_order(entries: list[ScanEntry]) -> list[ScanEntry]:
    """Labelled volumes by case number (liver_0, liver_1, ...), then by id for those without one."""
    labelled = [e for e in entries if e.label_path]
    return sorted(labelled, key=lambda e: (e.case_number is None, e.case_number or 0, e.volume_id))


def split_by_patient(ordered: list[ScanEntry], train_volumes: int) -> list[str]:
    """``"train"`` or ``"test"`` per entry of ``ordered``: patients in order of their first volume
    go to train until it holds ``train_volumes`` volumes, all of a patient's volumes together,
    so no patient is ever on both sides (train may hold a few more than ``train_volumes``).

    Example:
        >>> from types import SimpleNamespace as E
        >>> split_by_patient([E(patient_id=p) for p in "aabbc"], 1)
        ['train', 'train', 'test', 'test', 'test']
    """
    side: dict[str, str] = {}
    n_train = 0
    for e in ordered:
        if e.patient_id not in side:
            side[e.patient_id] = "train" if n_train < train_volumes else "test"
        n_train += side[e.patient_id] == "train"
    return [side[e.patient_id] for e in ordered]


def _slice_set(vol, entry: ScanEntry, label: np.ndarray, idx: np.ndarray) -> SliceSet:
    """The slices ``idx`` of a volume, labelled 1 where they contain liver."""
    mask = (label[idx] > 0).astype(np.uint8)
    n = idx.size
    return SliceSet(
        hu=vol.hu[idx],
        mask=mask,
        label=(mask.reshape(n, -1).max(axis=1, initial=0) > 0).astype(np.int8),
        volume_id=np.array([entry.volume_id] * n, dtype=object),
        # The entry's id, not the volume's: the entry's ids are the final (possibly hashed) ones,
        # both read from the same source.
        patient_id=np.array([entry.patient_id] * n, dtype=object),
        slice_index=idx.astype(np.int32),
        z_mm=vol.z_mm()[idx],
    )


def _cut(
    entry: ScanEntry, per_volume: int, seed: int, every_slice: bool = False
) -> tuple[SliceSet, dict, SliceSet | None]:
    vol = entry.read()
    label = entry.read_label(vol)
    rng = np.random.default_rng([seed, entry.case_number if entry.case_number is not None else 0])
    liver, other = select_slices(label, per_volume, rng)
    slices = _slice_set(vol, entry, label, np.concatenate([liver, other]))
    record = {
        "volume_id": entry.volume_id,
        "case_number": entry.case_number,
        "liver": liver.tolist(),
        "non_liver": other.tolist(),
    }
    everything = _slice_set(vol, entry, label, np.arange(vol.hu.shape[0])) if every_slice else None
    return slices, record, everything


def _final_ids(entries: list[ScanEntry], salt: bytes | None) -> list[ScanEntry]:
    """The one place prepare finalises ids: hashed with ``salt`` (ctsearch.ids), else as given."""
    if salt is None:
        return entries
    keys = ("volume_id", "patient_id", "study_id", "series_id")
    return [
        dataclasses.replace(e, **pseudonymise_ids({k: getattr(e, k) for k in keys}, salt)) for e in entries
    ]


def _concat(parts: list[SliceSet]) -> SliceSet:
    shapes = {p.hu.shape[1:] for p in parts}
    if len(shapes) > 1:
        raise CTSearchInputError(
            None, f"volumes have different slice sizes {sorted(shapes)}; the slice protocol needs one size"
        )
    fields = SliceSet.__dataclass_fields__
    return SliceSet(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in fields})


def prepare(
    archive: str | os.PathLike,
    out: str | os.PathLike,
    *,
    protocol: str | None = None,
    per_volume: int = 5,
    train_volumes: int = 100,
    seed: int = 0,
    all_train_slices: bool = False,
    progress: Callable[[Iterable, int, str], Iterable] | None = None,
    id_salt: bytes | None = None,
) -> dict:
    """Scan ``archive`` (a folder, or its URI) and write ``out/manifest.parquet``, ``out/errors.parquet`` (and the protocol files).

    With ``all_train_slices`` the protocol also writes ``out/train_all.parquet``: every slice of the
    training volumes, labelled by its mask, for self-supervised training on more unlabelled slices
    (``ctsearch train --train-slices all``); evaluation still uses ``train.parquet``/``test.parquet``.

    With ``id_salt`` (ctsearch.ids) patient, study and series ids are hashed in every output; the
    protocol's case order and train/test split are computed from the original ids first, so they
    do not change. The ``ids`` block (protocol.json, and the manifest's parquet metadata
    ``ctsearch.ids``) records whether and with which salt fingerprint.

    Returns a summary dict: volumes, errors, and for a protocol train/test volumes and slices.

    ``out`` may be an object-store URI (``s3://bucket/prepared``): the files are written into a
    staging folder and uploaded when prepare succeeds (``storage.staged_output``).
    """
    if storage.is_remote(out):
        storage.require_bucket(out)
        with storage.staged_output(out) as stage:
            summary = prepare(
                archive,
                stage,
                protocol=protocol,
                per_volume=per_volume,
                train_volumes=train_volumes,
                seed=seed,
                all_train_slices=all_train_slices,
                progress=progress,
                id_salt=id_salt,
            )
        return {**summary, "out": os.fspath(out)}
    # A URI (s3://bucket/archive) is scanned and read through ctsearch.storage (ctsearch.io.remote).
    archive = os.fspath(archive).rstrip("/") if storage.is_remote(archive) else Path(archive)
    out = Path(out)
    if not (storage.exists(archive) if isinstance(archive, str) else archive.exists()):
        raise CTSearchInputError(archive, "no such archive folder")
    if protocol is not None and protocol not in PROTOCOLS:
        raise CTSearchInputError(None, f"unknown protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
    if per_volume < 1 or train_volumes < 0:
        raise CTSearchInputError(None, "--per-volume must be >= 1 and --train-volumes >= 0")
    progress = progress or (lambda items, total, desc: items)

    entries, errors = scan_archive(archive)
    ordered = _protocol_order(entries)  # from the original ids, before any hashing
    entries, ordered = _final_ids(entries, id_salt), _final_ids(ordered, id_salt)
    splits = split_by_patient(ordered, train_volumes)
    if protocol == "decathlon" and ordered:  # checked before anything is written
        for side in ("train", "test"):
            if side not in splits:
                patients = len({e.patient_id for e in ordered})
                raise CTSearchInputError(
                    archive,
                    f"--train-volumes {train_volumes} leaves the {side} split empty: the archive has "
                    f"{len(ordered)} labelled volumes of {patients} patients; choose a --train-volumes "
                    "that leaves volumes on both sides",
                )
    ids = ids_block(id_salt)
    manifest = pa.Table.from_pylist([e.row() for e in entries], schema=MANIFEST_SCHEMA)
    manifest = manifest.replace_schema_metadata({b"ctsearch.ids": json.dumps(ids).encode()})
    atomic_write_table(manifest, out / "manifest.parquet")
    summary: dict = {"archive": str(archive), "out": str(out), "volumes": len(entries), "ids": ids}

    if protocol == "decathlon":
        if not ordered:
            raise CTSearchInputError(
                archive, "no labelled volumes found: the decathlon protocol needs imagesTr/ with labelsTr/"
            )
        parts: dict[str, list[SliceSet]] = {"train": [], "test": [], "train_all": []}
        records: list[dict] = []
        for entry, split in zip(progress(ordered, len(ordered), "cutting slices"), splits):
            try:
                slices, record, everything = _cut(
                    entry, per_volume, seed, all_train_slices and split == "train"
                )
            except CTSearchInputError as e:
                errors.append({"path": entry.path, "stage": "protocol", "error": e.problem})
                continue
            parts[split].append(slices)
            if everything is not None:
                parts["train_all"].append(everything)
            records.append({**record, "split": split, "short": len(slices) < 2 * per_volume})
        for split, split_parts in parts.items():
            if split == "train_all" and not all_train_slices:
                continue
            if split_parts:
                write_slices(_concat(split_parts), out / f"{split}.parquet")
            summary[f"{split}_volumes"] = len(split_parts)
            summary[f"{split}_slices"] = int(sum(len(p) for p in split_parts))
        short = [r["volume_id"] for r in records if r["short"]]
        summary["short_volumes"] = short
        meta = {
            "protocol": protocol,
            "per_volume": per_volume,
            "train_volumes": train_volumes,
            "seed": seed,
            "all_train_slices": all_train_slices,
            "split_by": "patient",  # no patient has volumes on both sides (split_by_patient)
            "rule": "uniform without replacement within liver / non-liver slices, rng seeded by (seed, case_number)",
            "ids": ids,
            "volumes": records,
        }
        atomic_write_json(meta, out / "protocol.json")

    atomic_write_table(errors_table(errors), out / "errors.parquet")
    summary["errors"] = len(errors)
    return summary
