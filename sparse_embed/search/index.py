"""Exact top-k inner-product search over sparse embeddings.

`SparseIndex` is the Python face of the C++ inverted index in `search/`: for
every dimension it stores the contiguous postings (row id, value) of the
database rows that are non-zero there, so a query only touches the postings
of its own non-zero dimensions (their count is the paper's FLOPs).

    index = SparseIndex.from_dense(gallery, zero_threshold=1e-4)
    ids, scores = index.search(probes, k=10)                      # exact, all cores
    ids, scores = index.search(probes, k=10, mode="pruned")       # exact, block-max pruning
    ids, scores = index.search(probes, k=10, rerank=(gallery_dense, probes_dense))
    index.save("gallery.idx")
    index = SparseIndex.load("gallery.idx")                        # memory-mapped
    index = SparseIndex.from_dense(gallery, confidence=gallery_confidence)   # kept and saved
    ids, scores, row_conf, query_conf = index.search(
        probes, k=10, query_confidence=probe_confidence, return_confidence=True)
    ids, scores = index.search(probes, k=10, min_row_confidence=0.5)  # exact, confident rows only

What a search returns (scores, threshold, ties to the lower row id, short
lists, re-ranking), the search modes and what each guarantees, the row order
(rows clustered by MinHash bands of their support, then sorted by their MinHash
signature) and block metadata behind pruning, int8 values with exact
re-scoring, batched queries and confidence are described once, on the Search page of the
documentation (`docs/search.md`); `brute_force_search` is the NumPy oracle of
those rules. The file `save` writes and `load` checks and memory-maps, and the
`.bin` files of the original sparse-embed code, are on its Index file format
page (`docs/index-format.md`).

The command line is `sparse_embed/search/__main__.py`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sparse_embed.errors import ConfigError, DataError
from sparse_embed.fileio import atomic_path

try:
    from sparse_embed import _search
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(
        "the C++ search extension sparse_embed._search is not built; run `pip install -e .` "
        "(or `python setup.py build_ext --inplace`) in the repository"
    ) from e

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
    "SparseIndex",
    "brute_force_search",
    "hdf5_to_bin",
    "read_bin",
    "write_bin",
]

# The defaults live in the C++ header; the binding exports them.
DEFAULT_RERANK_K: int = _search.DEFAULT_RERANK_K
DEFAULT_NUM_THREADS: int = _search.DEFAULT_NUM_THREADS
DEFAULT_ZERO_THRESHOLD: float = _search.DEFAULT_ZERO_THRESHOLD
DEFAULT_BLOCK_ROWS: int = _search.DEFAULT_BLOCK_ROWS
DEFAULT_SEARCH_MODE: str = _search.DEFAULT_SEARCH_MODE
DEFAULT_BATCH: int = _search.DEFAULT_BATCH
MAX_BATCH: int = _search.MAX_BATCH
SEARCH_MODES: tuple[str, ...] = tuple(_search.SEARCH_MODES)
DEFAULT_VALUE_TYPE: str = _search.DEFAULT_VALUE_TYPE
VALUE_TYPES: tuple[str, ...] = tuple(_search.VALUE_TYPES)

# Dense queries x database rows scored at once by the oracle (float64 scores).
_ORACLE_BATCH_ELEMENTS = 1 << 22
# Rows of a .bin file encoded at once by `write_bin`.
_BIN_CHUNK_ROWS = 1 << 16

_INT32 = np.iinfo(np.int32)


def _shape(a: Any) -> str:
    return "[" + ", ".join(str(s) for s in np.shape(a)) + "]"


def _real_matrix(x: Any, name: str, expected: str) -> np.ndarray:
    """`x` as a C-contiguous float32 matrix; ValueError naming `expected` otherwise."""
    a = np.asarray(x)
    if a.dtype.kind not in "fiub":
        raise ValueError(
            f"{name} must be a real-valued array of shape {expected}, got dtype {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape {expected}, got {_shape(a)}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _int_vector(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "iu" or a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D integer array, got {a.dtype} {_shape(a)}")
    return a.astype(np.int64, copy=False)


def _csr_arrays(csr: Any, dim: int | None, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr int64, indices int32, values float32) of a scipy.sparse matrix or a CSR triple.

    Args:
        csr: A scipy.sparse matrix (any format) or an (indptr, indices, values) tuple.
        dim: The number of columns the indices must stay below; None skips the check.
        name: What the matrix is, for error messages.
    """
    if hasattr(csr, "tocsr"):
        m = csr.tocsr()
        if dim is not None and m.shape[1] != dim:
            raise ValueError(f"{name} must have shape [Q, {dim}], got {_shape(m)}")
        parts: Sequence[Any] = (m.indptr, m.indices, m.data)
    else:
        parts = csr
        if len(parts) != 3:
            raise ValueError(f"{name} as CSR must be a tuple (indptr, indices, values)")
    indptr = _int_vector(parts[0], f"{name} indptr")
    indices = _int_vector(parts[1], f"{name} indices")
    values = np.asarray(parts[2])
    if values.dtype.kind not in "fiub" or values.ndim != 1:
        raise ValueError(
            f"{name} values must be a 1-D real array, got {values.dtype} {_shape(values)}")
    if len(indices) and (indices.min() < 0 or (dim is not None and indices.max() >= dim)
                         or indices.max() > _INT32.max):
        bound = dim if dim is not None else _INT32.max
        raise ValueError(f"{name} indices must lie in [0, {bound}), got "
                         f"[{indices.min()}, {indices.max()}]")
    return indptr, indices.astype(np.int32), values.astype(np.float32, copy=False)


def _is_csr(x: Any) -> bool:
    return hasattr(x, "tocsr") or isinstance(x, tuple)


def _confidence_vector(x: Any, rows: int, name: str) -> np.ndarray:
    """`x` as a finite float32 [rows] vector; ValueError in one line otherwise.

    Args:
        x: One confidence per row (higher = more trusted).
        rows: The number of rows it must cover.
        name: What it is, for error messages.
    """
    a = np.asarray(x)
    if a.dtype.kind not in "fiub" or a.shape != (rows,):
        raise ValueError(f"{name} must be a real-valued array of shape [{rows}], one per row, got "
                         f"{a.dtype} {_shape(a)}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(a))
    if len(bad):
        raise ValueError(f"{name} must be finite; {len(bad)} value(s) are not (row {bad[0]}: {a[bad[0]]})")
    return a


def check_min_row_confidence(value: float | None, has_confidence: bool, rerank: Any,
                             rescore_k: int | None) -> float | None:
    """The checked `min_row_confidence` search argument (None: no filter).

    Args:
        value: Rows whose confidence is below it are left out; None keeps every row.
        has_confidence: Whether the index keeps a confidence per row.
        rerank: The search's `rerank` argument (exclusive with the filter).
        rescore_k: The search's `rescore_k` argument (exclusive with the filter).

    Raises:
        ValueError: On a non-finite value, an index without confidence, or
            `rerank` / `rescore_k` with it.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating) \
            or not math.isfinite(value):
        raise ValueError(f"min_row_confidence must be a finite number, got {value!r}")
    if not has_confidence:
        raise ValueError("min_row_confidence needs an index built with a confidence per row "
                         "(confidence=...)")
    if rerank is not None or rescore_k is not None:
        raise ValueError("min_row_confidence excludes rerank and rescore_k (their candidate lists "
                         "would count the rows it leaves out); pass one of them")
    return float(value)


def query_count(queries: Any) -> int:
    """Rows of dense, scipy.sparse or (indptr, indices, values) queries."""
    if isinstance(queries, tuple):
        return len(queries[0]) - 1 if len(queries) == 3 else 0
    return int(np.shape(queries)[0]) if np.ndim(queries) else 0


def hit_confidence(ids: np.ndarray, row_confidence: np.ndarray | None,
                   query_confidence: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(row confidence, query confidence) float32 [Q, k] of each hit; NaN where there is none.

    Args:
        ids: int64 [Q, k] hits, -1 for padding.
        row_confidence: float32 confidence by id (ids index it), or None.
        query_confidence: float32 [Q], or None.
    """
    hit = ids >= 0
    rows = np.full(ids.shape, np.nan, np.float32)
    if row_confidence is not None:
        rows[hit] = row_confidence[ids[hit]]
    queries = np.full(ids.shape, np.nan, np.float32)
    if query_confidence is not None:
        queries[hit] = np.broadcast_to(query_confidence[:, None], ids.shape)[hit]
    return rows, queries


def _query_rows(queries: Any, rows: np.ndarray, dim: int) -> Any:
    """The queries at `rows`, for dense, scipy.sparse or (indptr, indices, values) queries."""
    import scipy.sparse

    if isinstance(queries, tuple):
        indptr, indices, values = queries
        queries = scipy.sparse.csr_matrix((values, indices, indptr), shape=(len(indptr) - 1, dim))
    if hasattr(queries, "tocsr"):
        return queries.tocsr()[rows]
    return queries[rows]


def _value_options(value_type: str, keep_float: bool) -> tuple[str, bool]:
    """Checked (value_type, keep_float) build arguments.

    Args:
        value_type: One of `VALUE_TYPES`.
        keep_float: Keep the float32 rows for re-scoring; int8 only.
    """
    if value_type not in VALUE_TYPES:
        raise ValueError(
            f"unknown value_type {value_type!r}; valid value types: {', '.join(VALUE_TYPES)}")
    if keep_float and value_type != "int8":
        raise ValueError("keep_float applies to value_type='int8' only (a float32 index holds the "
                         "float values already)")
    return value_type, bool(keep_float)


class SparseIndex:
    """Inverted index over sparse embeddings: exact top-k inner-product search.

    Build one with `from_dense`, `from_csr`, `from_bin` or `load`. Searches may
    run concurrently from several Python threads (the index is read-only and
    the GIL is released); `stats` then describes whichever finished last.

    Args:
        index: The compiled index; use the `from_*` constructors or `load`.
    """

    def __init__(self, index: Any) -> None:
        self._index = index
        # Copied out of the core once (the index never changes it), read-only.
        self._confidence: np.ndarray | None = index.confidence
        if self._confidence is not None:
            self._confidence.setflags(write=False)
        self._last: dict[str, Any] = {
            "queries": 0,
            "postings": np.zeros(0, np.int64),
            "candidates": np.zeros(0, np.int64),
            "seconds": np.zeros(0, np.float64),
            "blocks_visited": np.zeros(0, np.int64),
            "postings_scored": np.zeros(0, np.int64),
            "certified": np.zeros(0, bool),
            "mode": DEFAULT_SEARCH_MODE,
            "rescore_k": None,
            "rescore_exact": False,
            "wall_seconds": 0.0,
        }

    @classmethod
    def from_dense(cls, x: Any, zero_threshold: float = DEFAULT_ZERO_THRESHOLD,
                   block_rows: int = DEFAULT_BLOCK_ROWS, reorder: bool = True,
                   value_type: str = DEFAULT_VALUE_TYPE, keep_float: bool = False,
                   confidence: Any | None = None) -> SparseIndex:
        """Indexes the rows of a dense matrix.

        Args:
            x: float32 [N, D] embeddings (other real dtypes are converted).
            zero_threshold: Entries with |x| at or below it are dropped; >= 0.
            block_rows: Rows per pruning block, a power of two in [8, 65536].
            reorder: Store similar rows side by side (tighter block bounds);
                ids stay the caller's either way.
            value_type: How posting values are stored: "float32" or "int8"
                (see docs/search.md).
            keep_float: With "int8", also keep the float32 rows (for
                `search(rescore_k=...)` and an exact `to_csr`).
            confidence: Optional float [N], one per row (higher = more
                trusted): kept and saved with the index, reported with the
                hits, never used for ranking unless a search asks
                (`min_row_confidence`).

        Raises:
            ValueError: On a bad shape or dtype, non-finite values, a negative
                threshold, a bad block_rows, an unknown value_type,
                keep_float without int8, or a confidence that is not [N]
                finite values.
        """
        options = _value_options(value_type, keep_float)
        dense = _real_matrix(x, "database", "[N, D]")
        conf = None if confidence is None else _confidence_vector(confidence, len(dense), "confidence")
        return cls(_search.Index.from_dense(dense, float(zero_threshold), int(block_rows), bool(reorder),
                                            *options)).with_confidence(conf)

    @classmethod
    def from_csr(cls, indptr: Any, indices: Any, values: Any, dim: int,
                 labels: Any | None = None, block_rows: int = DEFAULT_BLOCK_ROWS,
                 reorder: bool = True, value_type: str = DEFAULT_VALUE_TYPE,
                 keep_float: bool = False, confidence: Any | None = None) -> SparseIndex:
        """Indexes CSR rows (scipy's `m.indptr, m.indices, m.data`).

        Args:
            indptr: int [N + 1], row i holds entries indptr[i]:indptr[i+1].
            indices: int [nnz] dimensions, in [0, dim).
            values: float [nnz]; explicit zeros are dropped.
            dim: The embedding dimension D.
            labels: Optional int32 [N] labels, kept as `labels`.
            block_rows: Rows per pruning block, a power of two in [8, 65536].
            reorder: Store similar rows side by side (tighter block bounds);
                ids stay the caller's either way.
            value_type: How posting values are stored: "float32" or "int8"
                (see docs/search.md).
            keep_float: With "int8", also keep the float32 rows (for
                `search(rescore_k=...)` and an exact `to_csr`).
            confidence: Optional float [N], one per row, as in `from_dense`.

        Raises:
            ValueError: On bad shapes, dtypes, out-of-range indices, non-finite
                values, a bad block_rows, an unknown value_type, keep_float
                without int8, or a confidence that is not [N] finite values.
        """
        options = _value_options(value_type, keep_float)
        parts = _csr_arrays((indptr, indices, values), int(dim), "database")
        conf = None if confidence is None else _confidence_vector(
            confidence, len(parts[0]) - 1, "confidence")
        label_array = None
        if labels is not None:
            label_array = _int_vector(labels, "labels")
            if len(label_array) and not (_INT32.min <= label_array.min()
                                         and label_array.max() <= _INT32.max):
                raise ValueError("labels must fit in int32")
            label_array = label_array.astype(np.int32)
        return cls(_search.Index.from_csr(*parts, int(dim), label_array, int(block_rows),
                                          bool(reorder), *options)).with_confidence(conf)

    @classmethod
    def from_bin(cls, path: str | os.PathLike, dim: int | None = None,
                 block_rows: int = DEFAULT_BLOCK_ROWS, reorder: bool = True,
                 value_type: str = DEFAULT_VALUE_TYPE, keep_float: bool = False) -> SparseIndex:
        """Indexes a `.bin` embedding file, keeping its labels as `labels`.

        Args:
            path: The `.bin` file.
            dim: The embedding dimension; None infers 1 + the largest index.
            block_rows: Rows per pruning block, a power of two in [8, 65536].
            reorder: Store similar rows side by side; ids stay the file's row numbers.
            value_type: How posting values are stored: "float32" or "int8"
                (see docs/search.md).
            keep_float: With "int8", also keep the float32 rows (for
                `search(rescore_k=...)` and an exact `to_csr`).

        Raises:
            DataError: If the file is missing, truncated or malformed.
            ValueError: On an unknown value_type or keep_float without int8.
        """
        options = _value_options(value_type, keep_float)
        try:
            return cls(_search.Index.from_bin(os.fspath(path), int(dim or 0), int(block_rows),
                                              bool(reorder), *options))
        except _search.FormatError as e:
            raise DataError(str(e)) from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparseIndex:
        """Memory-maps an index written by `save`, after checking its size and checksums.

        Args:
            path: The index file.

        Raises:
            DataError: If the file is missing, truncated, corrupted or not an index file.
        """
        try:
            return cls(_search.Index.load(os.fspath(path)))
        except _search.FormatError as e:
            raise DataError(str(e)) from None

    def save(self, path: str | os.PathLike) -> None:
        """Writes the index (versioned, checksummed) to a temporary name, then renames it.

        Args:
            path: Destination file.
        """
        try:
            with atomic_path(path) as tmp:
                self._index.save(os.fspath(tmp))
        except _search.FormatError as e:
            raise DataError(str(e)) from None

    def with_confidence(self, confidence: Any | None) -> SparseIndex:
        """This index (sharing its postings) with a confidence per row; None drops it.

        Args:
            confidence: float [N] by caller row id (higher = more trusted), or None.

        Raises:
            ValueError: Unless it holds N finite values.
        """
        if confidence is None:
            return SparseIndex(self._index.with_confidence(None))
        return SparseIndex(self._index.with_confidence(
            _confidence_vector(confidence, len(self), "confidence")))

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
        """Top-k rows of every query by inner product, on all cores; exact unless mode="approx".

        Args:
            queries: Dense float32 [Q, D], a scipy.sparse matrix [Q, D], or a CSR
                tuple (indptr [Q + 1], indices [nnz], values [nnz]).
            k: Results per query, >= 1 (may exceed the number of rows).
            threshold: Only rows scoring strictly above it qualify; None: every row.
            rerank: Optional (database_dense float32 [N, Dd], query_dense float32
                [Q, Dd]): the top `rerank_k` rows by sparse score are re-scored
                by the inner product of these dense vectors, and the top k by
                dense score (ties: lower row id) are returned with their dense
                scores.
            rerank_k: Candidates re-ranked per query; >= k.
            num_threads: Worker threads; 0 uses every core the process may
                run on. Results do not depend on it.
            mode: "exhaustive", "pruned" (block-max pruning, identical
                results), "approx" (pruned, at most `max_blocks` blocks
                scored per query) or "auto" (pruned or exhaustive, whichever
                the query's block lists say is cheaper; identical results);
                see docs/search.md.
            max_blocks: Blocks scored per query in mode "approx", >= 1; None otherwise.
            rescore_k: On an int8 index built with keep_float: the top
                `rescore_k` rows by quantized score (>= k) are re-scored
                exactly from their float32 values and the top k by exact
                score (above `threshold`) returned; None: quantized scores.
                Not combined with `rerank`.
            rescore_exact: On an int8 index built with keep_float: return
                the float32 index's results (ids, scores, ties) in every
                exact mode, re-scoring every row whose quantized score is
                within twice the quantization error bound of the k-th (the
                pruned modes skip the blocks that fall short by that margin).
                Not combined with `rescore_k` or `rerank`.
            batch: Queries per group, in [1, MAX_BATCH]: a thread accumulates
                the queries of its group that are answered exhaustively (mode
                "exhaustive", and the exhaustive fall-back of "auto") together,
                reading each posting of their dimensions once per group.
                Results are identical to batch=1, with `rescore_k`,
                `rescore_exact` and `rerank` too (each query of a group keeps
                its own top-k and exact re-scoring rows, re-scored or
                re-ranked after the group's accumulation).
            group_by_support: With batch > 1, form groups from the queries
                sorted by the MinHash signature of their support (as the build
                orders rows), so queries that share dimensions share a group;
                False keeps the given order. Results do not depend on it.
            query_confidence: Optional float [Q], one per query, reported with
                its hits (never used for ranking).
            min_row_confidence: Only rows whose confidence is at or above it
                qualify (rows below it are left out before the top-k, exactly;
                not with `rerank` or `rescore_k`); None: every row. Needs an
                index built with a confidence.
            return_confidence: Also return each hit's row confidence and
                query confidence.

        Returns:
            ids int64 [Q, k] and scores float32 [Q, k], best first; -1 and
            -inf where fewer than k rows qualify. With return_confidence, also
            row_confidence and query_confidence float32 [Q, k]: the hit row's
            and its query's confidence, NaN for padding and where the index
            (or the call) has none.

        Raises:
            ValueError: On bad shapes or dtypes (the message names the expected
                shape), non-finite values, k < 1, rerank_k < k, an unknown mode,
                a max_blocks that does not fit the mode, rescore_k < k,
                rescore_k / rescore_exact on an index without float rows, with
                `rerank` or with each other, a batch outside [1, MAX_BATCH], a
                query_confidence that is not [Q] finite values, or a
                min_row_confidence that is not finite, on an index without
                confidence or with rerank / rescore_k.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if mode not in SEARCH_MODES:
            raise ValueError(f"unknown search mode {mode!r}; valid modes: {', '.join(SEARCH_MODES)}")
        if rescore_k is not None:
            if isinstance(rescore_k, bool) or not isinstance(rescore_k, int | np.integer) \
                    or rescore_k < k:
                raise ValueError(f"rescore_k must be an integer >= k ({k}), got {rescore_k!r}")
            if not self.keeps_float:
                raise ValueError("rescore_k needs an int8 index built with keep_float=True (the "
                                 "float rows it re-scores from)")
            if rerank is not None:
                raise ValueError("rescore_k and rerank are exclusive; pass one of them")
        if rescore_exact:
            if not self.keeps_float:
                raise ValueError("rescore_exact needs an int8 index built with keep_float=True (the "
                                 "float rows it re-scores from)")
            if rerank is not None or rescore_k is not None:
                raise ValueError("rescore_exact excludes rescore_k and rerank; pass one of them")
        if isinstance(batch, bool) or not isinstance(batch, int | np.integer) or not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch must be an integer in [1, {MAX_BATCH}] (queries accumulated "
                             f"together; 1: one at a time), got {batch!r}")
        options: dict[str, Any] = {
            "rerank_k": int(rerank_k), "num_threads": int(num_threads), "mode": mode,
            "max_blocks": None if max_blocks is None else int(max_blocks),
            "rescore_k": 0 if rescore_k is None else int(rescore_k),
            "rescore_exact": bool(rescore_exact), "batch": int(batch),
            "group_by_support": bool(group_by_support)}
        if rerank is not None:
            if not isinstance(rerank, tuple | list) or len(rerank) != 2:
                raise ValueError(
                    "rerank must be a pair (database_dense [N, Dd], query_dense [Q, Dd])")
            options["rerank_database"] = _real_matrix(rerank[0], "rerank database", "[N, Dd]")
            options["rerank_queries"] = _real_matrix(rerank[1], "rerank queries", "[Q, Dd]")
        threshold = None if threshold is None else float(threshold)
        row_confidence = self.confidence
        floor = check_min_row_confidence(min_row_confidence, row_confidence is not None, rerank,
                                         rescore_k)
        if _is_csr(queries):
            queries = _csr_arrays(queries, self.dim, "queries")
        else:
            queries = _real_matrix(queries, "queries", f"[Q, {self.dim}]")
        q_conf = None if query_confidence is None else _confidence_vector(
            query_confidence, query_count(queries), "query_confidence")
        start = time.perf_counter()
        if floor is None:
            ids, scores, stats = self._search_once(queries, int(k), threshold, options)
        else:
            ids, scores, stats = self._search_confident(queries, int(k), threshold, options,
                                                        row_confidence < floor)
        self._last = {"queries": len(ids), **stats, "mode": mode, "rescore_k": rescore_k,
                      "rescore_exact": bool(rescore_exact),
                      "wall_seconds": time.perf_counter() - start}
        if return_confidence:
            return (ids, scores, *hit_confidence(ids, row_confidence, q_conf))
        return ids, scores

    def _search_once(self, queries: Any, k: int, threshold: float | None,
                     options: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """One call of the core: ids, scores and the per-query statistics.

        Args:
            queries: A CSR triple or a dense float32 matrix, checked.
            k: Results per query.
            threshold: As in `search`.
            options: The core's search keywords.
        """
        if isinstance(queries, tuple):
            result = self._index.search_csr(*queries, k, threshold, **options)
        else:
            result = self._index.search_dense(queries, k, threshold, **options)
        ids, scores, postings, candidates, seconds, blocks, scored, certified = result
        return ids, scores, {"postings": postings, "candidates": candidates, "seconds": seconds,
                             "blocks_visited": blocks, "postings_scored": scored,
                             "certified": certified}

    def _search_confident(self, queries: Any, k: int, threshold: float | None,
                          options: dict[str, Any], dropped: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """The top-k of the rows not `dropped`, exactly (in the exact modes).

        With E dropped rows, the first pass asks for k + min(E, k) results
        (dropped rows rarely crowd a query's top); only the queries left with
        fewer than k kept rows from a full list ask again for k + E, which
        always holds the top k kept rows, in order. (The tombstones of
        `MutableIndex` work the same way.)

        Args:
            queries: A CSR triple or a dense float32 matrix, checked.
            k: Results per query.
            threshold: As in `search`.
            options: The core's search keywords.
            dropped: bool [N] by caller id: rows left out.
        """
        removed = int(dropped.sum())

        def run(batch: Any, width: int) -> tuple[np.ndarray, ...]:
            raw_ids, raw_scores, stats = self._search_once(batch, width, threshold, options)
            gone = raw_ids >= 0
            gone[gone] = dropped[raw_ids[gone]]
            ids = np.where(gone, -1, raw_ids)
            order = np.argsort(ids < 0, axis=1, kind="stable")[:, :k]
            kept_ids = np.take_along_axis(ids, order, axis=1)
            kept_scores = np.take_along_axis(np.where(gone, np.float32(-np.inf), raw_scores), order, axis=1)
            short = ((kept_ids >= 0).sum(axis=1) < k) & (raw_ids[:, -1] >= 0)
            return kept_ids, kept_scores, stats, short

        ids, scores, stats, short = run(queries, k + min(removed, k))
        if removed > k and short.any():
            again = np.flatnonzero(short)
            subset = _query_rows(queries, again, self.dim)
            if hasattr(subset, "tocsr"):
                subset = _csr_arrays(subset, self.dim, "queries")
            more_ids, more_scores, more_stats, _ = run(subset, k + removed)
            ids[again], scores[again] = more_ids, more_scores
            for key, values in more_stats.items():
                if key != "certified":
                    stats[key] = stats[key].copy()
                    stats[key][again] += values
        return ids, scores, stats

    def to_csr(self) -> Any:
        """The indexed rows as a scipy.sparse.csr_matrix float32 [N, D] in caller-id order.

        Indices are sorted within each row. The values are the float32 values
        as indexed for a float32 index or an int8 one built with keep_float,
        and the dequantized values (code * scale, what the search ranks)
        otherwise.
        """
        import scipy.sparse

        indptr, indices, values = self._index.to_csr()
        return scipy.sparse.csr_matrix((values, indices, indptr), shape=(len(self), self.dim))

    @property
    def stats(self) -> dict[str, Any]:
        """The index's size and the statistics of the last `search`.

        Keys: `rows`, `dim`, `nnz`, `value_type`, `bytes`, `bytes_per_nnz`
        (postings, segment bounds, labels, int8 scales), `block_bytes` (block
        metadata and row order), `rescore_bytes` (the forward store of an
        int8 index built with keep_float, else 0), `block_rows`, `blocks`,
        `block_entries`, `build_seconds` (build, or load and verification),
        then for the last search: `queries`, `mode`, `rescore_k`,
        per-query arrays `postings` (postings of the query's dimensions: the
        paper's FLOPs, what the exhaustive mode reads), `postings_scored`
        (postings actually read), `blocks_visited` (row blocks scored; every
        block when accumulated exhaustively), `candidates` (rows with a non-zero
        score above the threshold; in the pruned modes, among the blocks
        scored), `certified` (bool: with rescore_k in an exact mode, whether
        the quantization error bound proves the re-scored top-k is the exact
        top-k of the float rows) and `seconds`, their means
        `postings_per_query`, `postings_scored_per_query`, `blocks_per_query`,
        `candidates_per_query`, `certified_fraction`, `ms_per_query` (per
        query on one thread), and `wall_seconds` (the whole call). Means are
        NaN before the first search.
        """
        last = self._last
        n = last["queries"]

        def mean(values: np.ndarray, scale: float = 1.0) -> float:
            return float(values.mean()) * scale if n else math.nan

        return {
            "rows": len(self),
            "dim": self.dim,
            "nnz": self.nnz,
            "value_type": self.value_type,
            "bytes": self.nbytes,
            "bytes_per_nnz": self.nbytes / self.nnz if self.nnz else math.nan,
            "block_bytes": self._index.block_nbytes,
            "rescore_bytes": self.rescore_nbytes,
            "block_rows": self._index.block_rows,
            "blocks": self._index.num_blocks,
            "block_entries": self._index.block_entries,
            "build_seconds": self._index.build_seconds,
            **last,
            "postings_per_query": mean(last["postings"]),
            "postings_scored_per_query": mean(last["postings_scored"]),
            "blocks_per_query": mean(last["blocks_visited"]),
            "candidates_per_query": mean(last["candidates"]),
            "certified_fraction": mean(last["certified"]),
            "ms_per_query": mean(last["seconds"], 1e3),
        }

    def __len__(self) -> int:
        return self._index.rows

    @property
    def dim(self) -> int:
        """The embedding dimension D."""
        return self._index.dim

    @property
    def nnz(self) -> int:
        """Stored postings (non-zero database entries)."""
        return self._index.nnz

    @property
    def nbytes(self) -> int:
        """Bytes every query may read besides the block metadata (`stats["block_bytes"]`).

        Postings (6 per non-zero, 3 with int8 values), segment bounds, labels and
        the int8 scales; the forward store is `rescore_nbytes`.
        """
        return self._index.nbytes

    @property
    def rescore_nbytes(self) -> int:
        """Bytes of the forward store (float rows read only when re-scoring), 0 without one."""
        return self._index.rescore_nbytes

    @property
    def value_type(self) -> str:
        """How posting values are stored: "float32" or "int8"."""
        return self._index.value_type

    @property
    def keeps_float(self) -> bool:
        """Whether an int8 index keeps its float32 rows (`search(rescore_k=...)` works)."""
        return self._index.keeps_float

    @property
    def confidence(self) -> np.ndarray | None:
        """float32 [N] confidence by caller row id (`confidence=...` at build, kept by `save`), else None."""
        return self._confidence

    @property
    def labels(self) -> np.ndarray | None:
        """int32 [N] labels (from `from_bin` or `from_csr(labels=...)`), else None."""
        return self._index.labels

    @property
    def memory_mapped(self) -> bool:
        """Whether the postings are mapped from a file (`load`) rather than built in memory."""
        return self._index.memory_mapped

    @property
    def row_order(self) -> np.ndarray | None:
        """uint32 [N]: the caller row id stored at each position, or None when rows keep their order."""
        return self._index.row_order

    def __repr__(self) -> str:
        return (f"SparseIndex(rows={len(self)}, dim={self.dim}, nnz={self.nnz}, "
                f"value_type={self.value_type!r}, memory_mapped={self.memory_mapped})")


def _dense64(x: Any, dim: int | None, name: str) -> np.ndarray:
    """float64 [rows, dim] copy of a dense matrix, scipy.sparse matrix or CSR triple."""
    expected = "[N, D]" if dim is None else f"[Q, {dim}]"
    if hasattr(x, "tocsr"):
        a = _real_matrix(x.toarray(), name, expected)
    elif isinstance(x, tuple):
        if dim is None:
            raise ValueError(f"{name} as a CSR tuple needs the dimension of the database")
        indptr, indices, values = _csr_arrays(x, dim, name)
        rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        entries = slice(indptr[0], indptr[-1])
        a = np.zeros((len(indptr) - 1, dim), np.float32)
        np.add.at(a, (rows, indices[entries]), values[entries])
    else:
        a = _real_matrix(x, name, expected)
    if dim is not None and a.shape[1] != dim:
        raise ValueError(f"{name} must have shape {expected}, got {_shape(a)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} must be finite")
    return a.astype(np.float64)


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int, threshold: np.float32 | None
           ) -> tuple[np.ndarray, np.ndarray]:
    """The best k (score desc, id asc) of float32 `scores` above `threshold`."""
    if threshold is not None:
        keep = scores > threshold
        scores, ids = scores[keep], ids[keep]
    if len(scores) > k:
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]
        keep = scores >= kth
        scores, ids = scores[keep], ids[keep]
    order = np.lexsort((ids, -scores))[:k]
    return ids[order], scores[order]


def brute_force_search(
    database: Any,
    queries: Any,
    k: int,
    threshold: float | None = None,
    rerank: tuple[Any, Any] | None = None,
    rerank_k: int = DEFAULT_RERANK_K,
) -> tuple[np.ndarray, np.ndarray]:
    """NumPy oracle with the semantics of `SparseIndex.search` (see docs/search.md).

    Scores are computed in float64 and rounded to float32 before ranking, so
    with exactly representable inputs the ids match the index exactly.

    Args:
        database: Dense [N, D] or a scipy.sparse matrix.
        queries: Dense [Q, D], a scipy.sparse matrix or a CSR tuple (indptr, indices, values).
        k: Results per query, >= 1.
        threshold: Only rows scoring strictly above it qualify; None: every row.
        rerank: Optional (database_dense [N, Dd], query_dense [Q, Dd]), as in `SparseIndex.search`.
        rerank_k: Candidates re-ranked per query; >= k.

    Returns:
        ids int64 [Q, k] and scores float32 [Q, k]; -1 and -inf where fewer than k rows qualify.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    db = _dense64(database, None, "database")
    n, dim = db.shape
    q = _dense64(queries, dim, "queries")
    num_queries = len(q)
    capacity = k
    if rerank is not None:
        if rerank_k < k:
            raise ValueError(f"rerank_k ({rerank_k}) must be >= k ({k})")
        capacity = rerank_k
        db_dense = _real_matrix(rerank[0], "rerank database", "[N, Dd]").astype(np.float64)
        q_dense = _real_matrix(rerank[1], "rerank queries", "[Q, Dd]").astype(np.float64)
        if len(db_dense) != n or q_dense.shape != (num_queries, db_dense.shape[1]):
            raise ValueError(f"rerank must be ([{n}, Dd], [{num_queries}, Dd]), got "
                             f"({_shape(db_dense)}, {_shape(q_dense)})")
    cut = None if threshold is None else np.float32(threshold)
    ids = np.full((num_queries, k), -1, np.int64)
    scores = np.full((num_queries, k), -np.inf, np.float32)
    row_ids = np.arange(n, dtype=np.int64)
    batch = max(1, _ORACLE_BATCH_ELEMENTS // max(n, 1))
    for start in range(0, num_queries, batch):
        block = (q[start:start + batch] @ db.T).astype(np.float32)
        for offset, row_scores in enumerate(block):
            qi = start + offset
            top_ids, top_scores = _top_k(row_scores, row_ids, capacity, cut)
            if rerank is not None:
                dense = (db_dense[top_ids] @ q_dense[qi]).astype(np.float32)
                top_ids, top_scores = _top_k(dense, top_ids, k, None)
            ids[qi, :len(top_ids)] = top_ids
            scores[qi, :len(top_ids)] = top_scores
    return ids, scores


def _encode_bin_rows(block: np.ndarray, labels: np.ndarray, zero_threshold: float) -> np.ndarray:
    """The .bin records of a float32 [rows, D] block, as one int32 array."""
    mask = np.abs(block) > zero_threshold
    rows, cols = np.nonzero(mask)
    counts = mask.sum(axis=1)
    sizes = 2 + 2 * counts
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    out = np.empty(int(sizes.sum()), np.int32)
    out[starts] = labels
    out[starts + 1] = counts
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    within = np.arange(len(rows)) - first[rows]
    out[starts[rows] + 2 + within] = cols
    out[starts[rows] + 2 + counts[rows] + within] = block[rows, cols].view(np.int32)
    return out


def write_bin(path: str | os.PathLike, embeddings: Any, labels: Any,
              zero_threshold: float = DEFAULT_ZERO_THRESHOLD) -> int:
    """Writes embeddings in the `.bin` format, atomically.

    Args:
        path: Output file.
        embeddings: float [N, D]: a NumPy array or anything sliced by rows into
            one (an h5py dataset is read in chunks, never whole).
        labels: int [N], must fit in int32.
        zero_threshold: Entries with |x| at or below it are left out.

    Returns:
        The number of non-zeros written.

    Raises:
        ValueError: On bad shapes or dtypes, labels outside int32 or non-finite values.
    """
    shape = tuple(embeddings.shape)
    if len(shape) != 2:
        raise ValueError(f"embeddings must have shape [N, D], got {list(shape)}")
    n = shape[0]
    label_array = _int_vector(labels, "labels")
    if len(label_array) != n:
        raise ValueError(f"labels must have shape [{n}], got {_shape(label_array)}")
    if n and (label_array.min() < _INT32.min or label_array.max() > _INT32.max):
        raise ValueError("labels must fit in int32 for the .bin format")
    if not zero_threshold >= 0:
        raise ValueError(f"zero_threshold must be >= 0, got {zero_threshold}")
    nnz = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(np.int32(n).astype("<i4").tobytes())
        for start in range(0, n, _BIN_CHUNK_ROWS):
            block = _real_matrix(embeddings[start:start + _BIN_CHUNK_ROWS], "embeddings", "[N, D]")
            if not np.isfinite(block).all():
                raise ValueError(
                    f"embeddings must be finite (rows {start}..{start + len(block) - 1})")
            records = _encode_bin_rows(block, label_array[start:start + len(block)], zero_threshold)
            nnz += (len(records) - 2 * len(block)) // 2
            f.write(records.astype("<i4", copy=False).tobytes())
    return nnz


def read_bin(path: str | os.PathLike, dim: int | None = None) -> tuple[Any, np.ndarray]:
    """Reads a `.bin` embedding file.

    Args:
        path: The file.
        dim: The embedding dimension; None infers 1 + the largest index.

    Returns:
        A scipy.sparse.csr_matrix float32 [N, dim] (entries as stored) and int32 labels [N].

    Raises:
        DataError: If the file is missing, truncated or malformed.
    """
    import scipy.sparse

    if not Path(path).is_file():
        raise DataError(f".bin file {path} not found")
    size = Path(path).stat().st_size
    if size < 4 or size % 4:
        raise DataError(
            f"{path} is not a .bin embedding file ({size} bytes is not 4 + a multiple of 4)")
    words = np.fromfile(path, dtype="<i4")
    n = int(words[0])
    if n < 0 or 1 + 2 * n > len(words):
        raise DataError(f"{path} declares {n} rows but holds {size} bytes (truncated?)")
    labels = np.empty(n, np.int32)
    indptr = np.zeros(n + 1, np.int64)
    starts = np.empty(n, np.int64)
    pos = 1
    for i in range(n):
        if pos + 2 > len(words):
            raise DataError(f"{path} is truncated at row {i}")
        nnz = int(words[pos + 1])
        if nnz < 0 or pos + 2 + 2 * nnz > len(words):
            raise DataError(f"{path}: row {i} declares {nnz} non-zeros past the end of the file")
        labels[i] = words[pos]
        starts[i] = pos + 2
        indptr[i + 1] = indptr[i] + nnz
        pos += 2 + 2 * nnz
    if pos != len(words):
        raise DataError(f"{path} has {4 * (len(words) - pos)} trailing bytes after {n} rows")
    counts = np.diff(indptr)
    within = np.arange(indptr[-1]) - np.repeat(indptr[:-1], counts)
    index_at = np.repeat(starts, counts) + within
    indices = words[index_at]
    values = words[index_at + np.repeat(counts, counts)].view(np.float32)
    if len(indices) and indices.min() < 0:
        raise DataError(f"{path} has a negative index")
    inferred = int(indices.max()) + 1 if len(indices) else 1
    if dim is not None and inferred > dim:
        raise DataError(f"{path} has index {inferred - 1}, outside dim {dim}")
    matrix = scipy.sparse.csr_matrix((values, indices, indptr), shape=(n, dim or inferred))
    return matrix, labels


def hdf5_to_bin(hdf5_path: str | os.PathLike, bin_path: str | os.PathLike,
                threshold: float = DEFAULT_ZERO_THRESHOLD) -> tuple[int, int, int]:
    """Converts an embedding HDF5 file (`embedding` [N, D], `label` [N]) to `.bin`.

    Args:
        hdf5_path: File written by `python -m sparse_embed.embed`.
        bin_path: The `.bin` file to write (atomically).
        threshold: Entries with |x| at or below it are left out.

    Returns:
        (rows, dims, non-zeros) written.

    Raises:
        DataError: If the file is missing, not HDF5, or lacks a dataset.
        ConfigError: If the threshold is negative.
    """
    import h5py

    if not threshold >= 0:
        raise ConfigError(f"--zero_threshold must be >= 0, got {threshold}")
    if not Path(hdf5_path).is_file():
        raise DataError(f"embedding file {hdf5_path} not found")
    try:
        f = h5py.File(hdf5_path, "r")
    except OSError as e:
        raise DataError(f"{hdf5_path} is not a readable HDF5 file ({e})") from None
    with f:
        for name in ("embedding", "label"):
            if name not in f:
                raise DataError(f"{hdf5_path} has no {name!r} dataset; write it with "
                                "python -m sparse_embed.embed --output")
        embedding, label = f["embedding"], f["label"]
        if embedding.ndim != 2 or label.shape != (embedding.shape[0],):
            raise DataError(f"{hdf5_path}: 'embedding' must be [N, D] and 'label' [N], got "
                            f"{list(embedding.shape)} and {list(label.shape)}")
        try:
            nnz = write_bin(bin_path, embedding, label[:], zero_threshold=threshold)
        except ValueError as e:
            raise DataError(f"{hdf5_path}: {e}") from None
        return embedding.shape[0], embedding.shape[1], nnz
