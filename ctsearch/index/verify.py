"""``ctsearch verify``: check every file of an index directory against its ``index.json``.

Search reads shards lazily and only the row groups of its hits, so damage can sit unnoticed for
a long time; this reads everything once and lists each file that is missing, unreadable or
disagrees with what index.json records (rows, dimension, encoder sha256). It never writes.

Example:
    >>> problems = verify_index("idx/")       # doctest: +SKIP
    >>> [f"{p}: {why}" for p, why in problems]  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq

from ctsearch import storage
from ctsearch.errors import CTSearchInputError
from ctsearch.index.format import ShardRecord, fetch_index, read_manifest
from ctsearch.store import read_model_config, require_model_dir, verify_encoder

Problem = tuple[str, str]  # (file, what is wrong with it)


def verify_index(root: str | os.PathLike) -> list[Problem]:
    """Every problem found in index directory ``root`` (empty: the index is intact).

    Raises:
        CTSearchInputError: ``root`` is not an index, or its index.json is unreadable (nothing
            else can be checked without it).
    """
    if storage.is_remote(root):  # every byte is read anyway: check the committed files, fetched
        uri, local = os.fspath(root).rstrip("/"), fetch_index(os.fspath(root))
        return [
            (uri + f[len(str(local)) :] if f.startswith(str(local)) else f, why)
            for f, why in verify_index(local)
        ]
    root = Path(root)
    manifest = read_manifest(root)
    problems: list[Problem] = []
    problems += _check_model(root, manifest)
    dim = int(manifest["embedding_dim"])
    shards = [ShardRecord.from_json(s) for s in manifest["shards"]]
    for s in shards:
        problems += _check_shard(root, s, dim)
    if shards or (root / "errors.parquet").exists():  # written at the first commit
        problems += _check_parquet(root / "errors.parquet", None)
    if sum(s.rows for s in shards) != int(manifest["rows"]):
        problems.append((str(root / "index.json"), "rows differ from the sum of its shards' rows"))
    return problems


def _check_model(root: Path, manifest: dict) -> list[Problem]:
    model = manifest["model"]
    d = root / model.get("dir", "model")
    if not model.get("encoder_sha256") and not d.exists():
        return []  # written without a model (IndexWriter from Python): row queries only
    try:
        require_model_dir(d)
        config = read_model_config(d)
        if model.get("encoder_sha256"):
            verify_encoder(d, model["encoder_sha256"], "index.json")
    except CTSearchInputError as e:
        return [(e.path or str(d), e.problem)]
    if config.embedding_dim != int(manifest["embedding_dim"]):
        return [
            (
                str(d / "model.json"),
                f"{config.backbone} gives {config.embedding_dim}-d vectors, index.json says {manifest['embedding_dim']}",
            )
        ]
    return []


def _check_shard(root: Path, s: ShardRecord, dim: int) -> list[Problem]:
    out = _check_parquet(root / "embeddings" / f"{s.name}.parquet", s.rows)
    out += _check_parquet(root / "volumes" / f"{s.name}.parquet", s.volumes)
    out += _check_parquet(root / "errors" / f"{s.name}.parquet", None)
    f = root / "faiss" / f"{s.name}.faiss"
    if not f.is_file():
        out.append((str(f), "missing (index.json lists this shard)"))
    else:
        try:
            index = faiss.read_index(str(f))
            if (index.ntotal, index.d) != (s.rows, dim):
                out.append(
                    (str(f), f"holds {index.ntotal} x {index.d} vectors, index.json says {s.rows} x {dim}")
                )
        except RuntimeError as e:
            out.append((str(f), f"unreadable FAISS index ({_first_line(e)})"))
    if s.kind == "ivfpq":
        f = root / "faiss" / f"{s.name}.vectors.npy"
        try:
            shape = np.load(f, mmap_mode="r").shape
            if shape != (s.rows, dim):
                out.append((str(f), f"shape {shape}, index.json says ({s.rows}, {dim})"))
        except FileNotFoundError:
            out.append((str(f), "missing (the re-ranking vectors of an IVF-PQ shard)"))
        except (ValueError, EOFError, OSError) as e:
            out.append((str(f), f"unreadable re-ranking vectors ({_first_line(e)})"))
    return out


def _check_parquet(path: Path, rows: int | None) -> list[Problem]:
    """Read every row group (a damaged page shows only when read); compare the row count."""
    if not path.is_file():
        return [(str(path), "missing (index.json lists it)")]
    try:
        n = sum(b.num_rows for b in pq.ParquetFile(path).iter_batches(batch_size=65536))
    except Exception as e:  # noqa: BLE001 - arrow raises many types on a damaged file
        return [(str(path), f"unreadable parquet ({_first_line(e)})")]
    if rows is not None and n != rows:
        return [(str(path), f"holds {n} rows, index.json says {rows}")]
    return []


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
