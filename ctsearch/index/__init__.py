"""FAISS shards over slice embeddings: build, commit, load, search, merge top-k across shards.

One module per seam: ``params`` (which FAISS index a shard gets, and building it), ``search``
(one shard's top-k, merging shards' lists), ``format`` (the files of an index directory),
``writer`` (the commit protocol, :class:`IndexWriter`) and ``reader`` (:class:`Index`). The
names below are the package's API; docs/formats.md describes the directory.

Example:
    >>> import numpy as np, tempfile
    >>> from ctsearch.config import ModelConfig
    >>> d = tempfile.mkdtemp()
    >>> with IndexWriter.open(d, ModelConfig(backbone="tiny", image_size=64)) as w:
    ...     w.commit_shard([dict(volume_id="v", slice_index=i) for i in range(3)], np.eye(3, 128), volumes=[], errors=[])
    'shard-00000'
    >>> Index.open(d).search(np.eye(3, 128)[1], k=1).hits[0][0]["slice_index"]
    1
"""

from ctsearch.index.format import INDEX_JSON, META_COLUMNS, VOLUMES_SCHEMA, embeddings_to_table, table_vectors
from ctsearch.index.params import ANN_KINDS, DEFAULT_ANN_THRESHOLD, build_faiss, choose_kind, ivfpq_params
from ctsearch.index.reader import Index, SearchResult
from ctsearch.index.search import l2_normalize, merge_topk, search_shard, torch_topk
from ctsearch.index.writer import IndexWriter

__all__ = [
    "ANN_KINDS",
    "DEFAULT_ANN_THRESHOLD",
    "INDEX_JSON",
    "META_COLUMNS",
    "VOLUMES_SCHEMA",
    "Index",
    "IndexWriter",
    "SearchResult",
    "build_faiss",
    "choose_kind",
    "embeddings_to_table",
    "ivfpq_params",
    "l2_normalize",
    "merge_topk",
    "search_shard",
    "table_vectors",
    "torch_topk",
]
