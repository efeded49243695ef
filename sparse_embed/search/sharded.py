"""A gallery split by row range into several `SparseIndex` shards, searched as one.

    index = ShardedIndex.build(gallery, shard_rows=250_000, directory="gallery.shards")
    index = ShardedIndex(["gallery.shards/shard-00000.idx", "gallery.shards/shard-00001.idx"])
    ids, scores = index.search(probes, k=10)            # the ids of one index over all rows

Shard i holds global rows offset_i .. offset_i + len(shard_i) - 1; by default
the offsets follow the shards' order. Every shard answers its own top-k on a
thread pool (the C++ search releases the GIL) with every option of
`SparseIndex.search`, and the lists are merged by score, ties to the lower
global id, so in every mode but "approx" (a block budget per shard) the result
is that of one `SparseIndex` over the concatenated rows (a confidence per row
travels in each shard's file; `min_row_confidence` filters in every shard).
Re-ranking re-scores
the global top `rerank_k` in a second pass on each shard with its slice of the
dense database. The rules are on the Search page of the documentation
(`docs/search.md`, "What a search returns" and "Sharded galleries").
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from sparse_embed.search.index import (
    DEFAULT_BATCH,
    DEFAULT_NUM_THREADS,
    DEFAULT_RERANK_K,
    DEFAULT_SEARCH_MODE,
    DEFAULT_VALUE_TYPE,
    DEFAULT_ZERO_THRESHOLD,
    SEARCH_MODES,
    SparseIndex,
    _confidence_vector,
    check_min_row_confidence,
    hit_confidence,
    query_count,
)

__all__ = ["SHARD_FILE_PATTERN", "ShardedIndex"]

# File name of shard i written by `ShardedIndex.build`.
SHARD_FILE_PATTERN = "shard-{:05d}.idx"
# Per-query counters of `SparseIndex.stats` that add up over shards.
_SUMMED_STATS = ("postings", "postings_scored", "blocks_visited", "candidates")


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def _dense_matrix(x: Any, name: str, expected: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "fiub" or a.ndim != 2:
        raise ValueError(f"{name} must be a real-valued array of shape {expected}, "
                         f"got {a.dtype} {list(a.shape)}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _merge_top(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the best k of (ids, scores) by score, ties to the lower id; -1 entries last.

    Args:
        ids: int64 [Q, M] global ids, -1 for padding.
        scores: float32 [Q, M], -inf for padding.
        k: Columns kept.

    Returns:
        ids int64 [Q, k] and scores float32 [Q, k], padded with -1 and -inf.
    """
    num_queries, width = ids.shape
    if width < k:
        ids = np.concatenate([ids, np.full((num_queries, k - width), -1, np.int64)], axis=1)
        scores = np.concatenate([scores, np.full((num_queries, k - width), -np.inf, np.float32)], axis=1)
    # Padding sorts after every real result: its score is -inf and, among
    # equal scores, an id past every real one.
    id_key = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((id_key, -scores.astype(np.float64)), axis=1)[:, :k]
    top_ids = np.take_along_axis(ids, order, axis=1)
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_scores[top_ids < 0] = -np.inf
    return top_ids, top_scores


def _lookup(keys: np.ndarray, values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """values[j] where keys[q, j] == wanted[q, i], per row q; wanted ids < 0 give -inf.

    Args:
        keys: int64 [Q, M] ids, unique per row among those >= 0.
        values: float32 [Q, M].
        wanted: int64 [Q, K] ids, each present in its row of `keys` or < 0.
    """
    num_queries = len(keys)
    # One flat sorted key space: (query, id) -> query * span + id + 1.
    span = int(max(keys.max(initial=-1), wanted.max(initial=-1))) + 2
    rows = np.arange(num_queries, dtype=np.int64)[:, None]
    flat_keys = (rows * span + keys + 1).ravel()
    order = np.argsort(flat_keys, kind="stable")
    sorted_keys = flat_keys[order]
    flat_wanted = (rows * span + wanted + 1).ravel()
    pos = np.clip(np.searchsorted(sorted_keys, flat_wanted), 0, len(sorted_keys) - 1)
    found = values.ravel()[order[pos]].reshape(wanted.shape)
    return np.where(wanted < 0, np.float32(-np.inf), found).astype(np.float32)


class ShardedIndex:
    """Exact top-k over several `SparseIndex` shards, each holding a range of global rows.

    Args:
        shards: `SparseIndex` objects or paths of files written by `SparseIndex.save`
            (memory-mapped by `SparseIndex.load`).
        offsets: Global id of each shard's first row; None places the shards
            one after another in the order given. Ranges must not overlap.

    Raises:
        ValueError: If there are no shards, their dimensions differ, or the
            offsets are negative, of the wrong count or overlapping.
        DataError: If a shard file is missing or not an index file.
    """

    def __init__(self, shards: Sequence[SparseIndex | str | os.PathLike],
                 offsets: Sequence[int] | None = None) -> None:
        if isinstance(shards, str | os.PathLike) or not len(shards):
            raise ValueError("ShardedIndex needs a non-empty list of indexes or index files")
        self._shards = [s if isinstance(s, SparseIndex) else SparseIndex.load(s) for s in shards]
        dims = sorted({s.dim for s in self._shards})
        if len(dims) > 1:
            found = ", ".join(f"shard {i}: {s.dim}" for i, s in enumerate(self._shards))
            raise ValueError(f"all shards must have the same dimension, got {found}; "
                             "rebuild them from one embedding file")
        sizes = np.array([len(s) for s in self._shards], np.int64)
        if offsets is None:
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        else:
            starts = np.asarray(offsets, np.int64)
            if starts.shape != sizes.shape or (starts < 0).any():
                raise ValueError(f"offsets must be {len(sizes)} non-negative integers, "
                                 f"one per shard, got {list(offsets)}")
            by_start = np.argsort(starts, kind="stable")
            ends = starts[by_start] + sizes[by_start]
            if (starts[by_start][1:] < ends[:-1]).any():
                raise ValueError(f"shard row ranges overlap: offsets {starts.tolist()} "
                                 f"with sizes {sizes.tolist()}")
        self._offsets = starts
        self._sizes = sizes
        self._last: dict[str, Any] = {"queries": 0, "mode": DEFAULT_SEARCH_MODE,
                                      **{key: np.zeros(0, np.int64) for key in _SUMMED_STATS},
                                      "seconds": np.zeros(0, np.float64), "wall_seconds": 0.0}

    @classmethod
    def build(cls, rows: Any, shard_rows: int, directory: str | os.PathLike,
              zero_threshold: float = DEFAULT_ZERO_THRESHOLD, value_type: str = DEFAULT_VALUE_TYPE,
              keep_float: bool = False, confidence: Any | None = None) -> ShardedIndex:
        """Splits rows into shards of `shard_rows` rows, saves each, returns the loaded set.

        Each file is written to a temporary name and renamed, so a killed
        build leaves only complete shards.

        Args:
            rows: Dense float [N, D] (a NumPy array or anything sliced by rows
                into one, like an h5py dataset, read one shard at a time) or a
                scipy.sparse matrix [N, D].
            shard_rows: Rows per shard, >= 1; the last shard holds the rest.
            directory: Where `shard-00000.idx`, `shard-00001.idx`, ... go.
            zero_threshold: Dense entries with |x| at or below it are dropped.
            value_type: How each shard stores its posting values ("float32" or "int8").
            keep_float: With "int8", each shard also keeps its float32 rows for re-scoring.
            confidence: Optional float [N], one per row: each shard keeps and
                saves its slice (see `SparseIndex.from_dense`).

        Raises:
            ValueError: On a bad shape, dtype or shard size, an unknown
                value_type, keep_float without int8, or a confidence that is
                not [N] finite values (checked before any shard is written).
        """
        if isinstance(shard_rows, bool) or not isinstance(shard_rows, int | np.integer) or shard_rows < 1:
            raise ValueError(f"shard_rows must be an integer >= 1, got {shard_rows!r}")
        shape = tuple(rows.shape)
        if len(shape) != 2:
            raise ValueError(f"rows must have shape [N, D], got {list(shape)}")
        n, dim = shape
        conf = None if confidence is None else _confidence_vector(confidence, n, "confidence")
        csr = rows.tocsr() if hasattr(rows, "tocsr") else None
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, start in enumerate(range(0, max(n, 1), int(shard_rows))):
            stop = min(start + int(shard_rows), n)
            part_conf = None if conf is None else conf[start:stop]
            if csr is not None:
                part = csr[start:stop]
                shard = SparseIndex.from_csr(part.indptr, part.indices, part.data, dim,
                                             value_type=value_type, keep_float=keep_float,
                                             confidence=part_conf)
            else:
                shard = SparseIndex.from_dense(
                    _dense_matrix(rows[start:stop], "rows", "[N, D]").reshape(stop - start, dim),
                    zero_threshold, value_type=value_type, keep_float=keep_float, confidence=part_conf)
            path = out / SHARD_FILE_PATTERN.format(i)
            shard.save(path)
            paths.append(path)
        return cls(paths)

    def search(
        self,
        queries: Any,
        k: int,
        threshold: float | None = None,
        rerank: tuple[Any, Any] | None = None,
        rerank_k: int = DEFAULT_RERANK_K,
        num_threads: int = DEFAULT_NUM_THREADS,
        mode: str = DEFAULT_SEARCH_MODE,
        max_blocks: int | None = None,
        rescore_k: int | None = None,
        rescore_exact: bool = False,
        batch: int = DEFAULT_BATCH,
        group_by_support: bool = True,
        query_confidence: Any | None = None,
        min_row_confidence: float | None = None,
        return_confidence: bool = False,
    ) -> tuple[np.ndarray, ...]:
        """Top-k over all shards, as `SparseIndex.search` over the concatenated rows.

        Args:
            queries: Dense float32 [Q, D], a scipy.sparse matrix [Q, D], or a CSR
                tuple (indptr [Q + 1], indices [nnz], values [nnz]).
            k: Results per query, >= 1 (may exceed the number of rows).
            threshold: Only rows scoring strictly above it qualify; None: every row.
            rerank: Optional (database_dense float32 [R, Dd] indexed by global id,
                with R = `span`, query_dense float32 [Q, Dd]): the global top
                `rerank_k` rows by sparse score are re-scored by dense inner
                product and the top k by dense score are returned.
            rerank_k: Candidates re-ranked per query; >= k.
            num_threads: Worker threads in all; 0 uses every core the process
                may run on. Shards run concurrently, each on its share.
            mode: One of `SEARCH_MODES`: the exact ones equal the unsharded
                search, "approx" is per shard (see the module docstring).
            max_blocks: Blocks scored per query and shard in mode "approx", >= 1; None otherwise.
            rescore_k: Int8 shards with float rows: each shard re-scores its own
                top `rescore_k` by quantized score (see `SparseIndex.search`).
            rescore_exact: Int8 shards with float rows: the float32 result of
                every shard, hence of the unsharded float32 index.
            batch: Queries each shard accumulates together, as in
                `SparseIndex.search`; results do not depend on it.
            group_by_support: With batch > 1, groups formed by the queries'
                support, as in `SparseIndex.search`; results do not depend on it.
            query_confidence: Optional float [Q], reported with the hits.
            min_row_confidence: Only rows whose confidence is at or above it
                qualify, as in `SparseIndex.search` (every shard needs a confidence).
            return_confidence: Also return each hit's row and query confidence.

        Returns:
            ids int64 [Q, k] (global ids) and scores float32 [Q, k], best first;
            -1 and -inf where fewer than k rows qualify. With return_confidence,
            also row_confidence and query_confidence float32 [Q, k] (NaN for
            padding and where there is none), as in `SparseIndex.search`.

        Raises:
            ValueError: On bad shapes or dtypes, non-finite values, k < 1,
                rerank_k < k, an unknown mode, a max_blocks that does not fit it,
                re-scoring options a shard cannot take, or confidence arguments
                it cannot take (as `SparseIndex.search`).
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if mode not in SEARCH_MODES:
            raise ValueError(f"unknown search mode {mode!r}; valid modes: {', '.join(SEARCH_MODES)}")
        options = {"mode": mode, "max_blocks": max_blocks, "rescore_k": rescore_k,
                   "rescore_exact": rescore_exact, "batch": batch,
                   "group_by_support": group_by_support,
                   "min_row_confidence": check_min_row_confidence(
                       min_row_confidence, all(s.confidence is not None for s in self._shards),
                       rerank, rescore_k)}
        capacity = int(k)
        dense_db = dense_q = None
        if rerank is not None:
            if not isinstance(rerank, tuple | list) or len(rerank) != 2:
                raise ValueError("rerank must be a pair (database_dense [N, Dd], query_dense [Q, Dd])")
            if rerank_k < k:
                raise ValueError(f"rerank_k ({rerank_k}) must be >= k ({k})")
            dense_db = _dense_matrix(rerank[0], "rerank database", f"[{self.span}, Dd]")
            dense_q = _dense_matrix(rerank[1], "rerank queries", "[Q, Dd]")
            if len(dense_db) != self.span:
                raise ValueError(f"rerank database must have one row per global id, [{self.span}, Dd], "
                                 f"got {list(dense_db.shape)}")
            capacity = int(rerank_k)
        if not (hasattr(queries, "tocsr") or isinstance(queries, tuple)):
            # Converted once here rather than once per shard.
            queries = _dense_matrix(queries, "queries", f"[Q, {self.dim}]")
        q_conf = None if query_confidence is None else _confidence_vector(
            query_confidence, query_count(queries), "query_confidence")
        total = int(num_threads) if num_threads > 0 else _available_cores()
        workers = max(1, min(len(self._shards), total))
        per_shard = max(1, total // workers)

        def run(i: int) -> tuple[np.ndarray, ...]:
            shard, offset = self._shards[i], self._offsets[i]
            ids, scores = shard.search(queries, capacity, threshold, num_threads=per_shard, **options)
            stats = shard.stats
            dense_ids = dense_scores = np.zeros((len(ids), 0), np.int64)
            if dense_db is not None:
                shard_db = dense_db[offset:offset + self._sizes[i]]
                dense_ids, dense_scores = shard.search(queries, capacity, threshold,
                                                       rerank=(shard_db, dense_q), rerank_k=capacity,
                                                       num_threads=per_shard, **options)
                dense_ids = np.where(dense_ids < 0, -1, dense_ids + offset)
            return (np.where(ids < 0, -1, ids + offset), scores, dense_ids, dense_scores,
                    {key: stats[key] for key in (*_SUMMED_STATS, "seconds")})

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(run, range(len(self._shards))))
        ids, scores = _merge_top(np.concatenate([p[0] for p in parts], axis=1),
                                 np.concatenate([p[1] for p in parts], axis=1), capacity)
        if dense_db is not None:
            dense = _lookup(np.concatenate([p[2] for p in parts], axis=1),
                            np.concatenate([p[3] for p in parts], axis=1), ids)
            ids, scores = _merge_top(ids, dense, int(k))
        ids, scores = ids[:, :k], scores[:, :k]
        self._last = {"queries": len(ids), "mode": mode,
                      **{key: np.sum([p[4][key] for p in parts], axis=0)
                         for key in (*_SUMMED_STATS, "seconds")},
                      "wall_seconds": time.perf_counter() - start}
        if return_confidence:
            return (ids, scores, *hit_confidence(ids, self.confidence, q_conf))
        return ids, scores

    @property
    def confidence(self) -> np.ndarray | None:
        """float32 [span] row confidence by global id (NaN between shards), or None when no shard has one."""
        if all(s.confidence is None for s in self._shards):
            return None
        out = np.full(self.span, np.nan, np.float32)
        for shard, offset, size in zip(self._shards, self._offsets, self._sizes, strict=True):
            if shard.confidence is not None:
                out[offset:offset + size] = shard.confidence
        return out

    @property
    def stats(self) -> dict[str, Any]:
        """Sizes summed over the shards and the statistics of the last `search`.

        Keys as `SparseIndex.stats` (`rows`, `dim`, `nnz`, `bytes`,
        `bytes_per_nnz`, `build_seconds`, `queries`, `mode`, per-query
        `postings`, `postings_scored`, `blocks_visited`, `candidates` and
        `seconds` summed over the shards, their means, `wall_seconds`), plus
        `shards`.
        """
        last = self._last
        n = last["queries"]

        def mean(values: np.ndarray, scale: float = 1.0) -> float:
            return float(np.mean(values)) * scale if n else math.nan

        nnz = sum(s.nnz for s in self._shards)
        nbytes = sum(s.nbytes for s in self._shards)
        return {
            "shards": len(self._shards),
            "rows": len(self),
            "dim": self.dim,
            "nnz": nnz,
            "bytes": nbytes,
            "bytes_per_nnz": nbytes / nnz if nnz else math.nan,
            "build_seconds": sum(s.stats["build_seconds"] for s in self._shards),
            **last,
            "postings_per_query": mean(last["postings"]),
            "postings_scored_per_query": mean(last["postings_scored"]),
            "blocks_per_query": mean(last["blocks_visited"]),
            "candidates_per_query": mean(last["candidates"]),
            "ms_per_query": mean(last["seconds"], 1e3),
        }

    def __len__(self) -> int:
        return int(self._sizes.sum())

    @property
    def span(self) -> int:
        """One past the largest global id: the rows a dense re-rank database needs."""
        return int((self._offsets + self._sizes).max(initial=0))

    @property
    def dim(self) -> int:
        """The embedding dimension D shared by every shard."""
        return self._shards[0].dim

    @property
    def shards(self) -> tuple[SparseIndex, ...]:
        """The shards, in the order given."""
        return tuple(self._shards)

    @property
    def offsets(self) -> np.ndarray:
        """int64 [shards]: the global id of each shard's first row."""
        return self._offsets.copy()

    def __repr__(self) -> str:
        return f"ShardedIndex(shards={len(self._shards)}, rows={len(self)}, dim={self.dim})"
