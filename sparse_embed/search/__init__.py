"""Exact top-k inner-product search over sparse embeddings.

`index` holds `SparseIndex`, the Python face of the C++ inverted index in
`search/`, its NumPy oracle and the `.bin` format of the original code;
`sharded` holds `ShardedIndex` (row-range shards searched in parallel, merged
exactly); `mutable` holds `MutableIndex` (add / remove / compact over a base
index, a delta segment and tombstones); `milvus` (imported by path: it needs the `milvus` extra) writes and
searches Milvus collections. The command line is `python -m sparse_embed.search`
(`__main__`).
"""

from sparse_embed.search.index import (
    DEFAULT_BATCH,
    DEFAULT_BLOCK_ROWS,
    DEFAULT_NUM_THREADS,
    DEFAULT_RERANK_K,
    DEFAULT_SEARCH_MODE,
    DEFAULT_VALUE_TYPE,
    DEFAULT_ZERO_THRESHOLD,
    MAX_BATCH,
    SEARCH_MODES,
    VALUE_TYPES,
    SparseIndex,
    brute_force_search,
    hdf5_to_bin,
    read_bin,
    write_bin,
)
from sparse_embed.search.mutable import MutableIndex
from sparse_embed.search.sharded import ShardedIndex

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_BLOCK_ROWS",
    "DEFAULT_NUM_THREADS",
    "DEFAULT_RERANK_K",
    "DEFAULT_SEARCH_MODE",
    "DEFAULT_VALUE_TYPE",
    "DEFAULT_ZERO_THRESHOLD",
    "MAX_BATCH",
    "SEARCH_MODES",
    "VALUE_TYPES",
    "MutableIndex",
    "ShardedIndex",
    "SparseIndex",
    "brute_force_search",
    "hdf5_to_bin",
    "read_bin",
    "write_bin",
]
