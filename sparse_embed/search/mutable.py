"""A search index that takes added and removed rows without a full rebuild.

    index = MutableIndex.from_index(SparseIndex.load("gallery.idx"))   # ids 0 .. N-1
    new_ids = index.add(new_faces)                    # the next free ids, or add(rows, ids=[...])
    index.remove([17, 42])
    ids, scores = index.search(probes, k=10)          # as one index over the live rows
    index.save("gallery.mut")                         # later: MutableIndex.load("gallery.mut")
    index.compact()                                   # one base index again

Layout: an immutable base `SparseIndex` (often memory-mapped from disk), a
small delta `SparseIndex` holding the rows added since the last `compact`,
and tombstones marking removed base rows. Every segment keeps an id map
(position -> caller id, increasing, so a segment's ties to the lower position
are ties to the lower caller id). Search asks the base for k + min(T, k)
results (T tombstones), again for k + T only for the queries whose top is
crowded by removed rows, the delta for k, and merges the lists by score: in
the exact modes the result is that of one `SparseIndex` over the live rows in
id order. A confidence per row (`add(..., confidence=...)`) lives in the
segments' index files, follows its row through remove and compact, and
`min_row_confidence` drops rows below it the way tombstones drop removed rows.
What a search returns, the update costs and the command line are on
the Search page of the documentation (`docs/search.md`, "Adding and removing
rows"); the directory `save` writes (segment files, id maps, a checksummed
`manifest.json` replaced atomically) on its Index file format page
(`docs/index-format.md`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse

from sparse_embed.errors import DataError
from sparse_embed.fileio import atomic_path
from sparse_embed.search.index import (
    DEFAULT_BATCH,
    DEFAULT_BLOCK_ROWS,
    DEFAULT_NUM_THREADS,
    DEFAULT_RERANK_K,
    DEFAULT_SEARCH_MODE,
    DEFAULT_VALUE_TYPE,
    DEFAULT_ZERO_THRESHOLD,
    SparseIndex,
    _confidence_vector,
    _query_rows,
    _value_options,
    check_min_row_confidence,
    hit_confidence,
    query_count,
)
from sparse_embed.search.sharded import _lookup, _merge_top

__all__ = ["MANIFEST_NAME", "MANIFEST_VERSION", "MutableIndex"]

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_SEGMENTS = ("base", "delta")
# Per-query statistics of `SparseIndex.stats` summed over the segments.
_STATS = ("postings", "postings_scored", "blocks_visited", "candidates", "seconds")


def _shape(a: Any) -> str:
    return "[" + ", ".join(str(s) for s in np.shape(a)) + "]"


def _fsync(path: Path) -> None:
    """Flushes a written file to disk, so a rename after it never points at lost data."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _empty_csr(dim: int) -> scipy.sparse.csr_matrix:
    return scipy.sparse.csr_matrix((0, dim), dtype=np.float32)


def _rows_csr(rows: Any, dim: int, zero_threshold: float) -> scipy.sparse.csr_matrix:
    """Canonical float32 CSR [n, dim] (sorted indices, no zeros) of dense or CSR rows.

    Args:
        rows: Dense [n, dim], a scipy.sparse matrix or an (indptr, indices, values) tuple.
        dim: The index dimension.
        zero_threshold: Dense entries with |x| at or below it are dropped.

    Raises:
        ValueError: On a wrong shape or dtype, out-of-range indices or non-finite values.
    """
    if isinstance(rows, tuple):
        if len(rows) != 3:
            raise ValueError("rows as CSR must be a tuple (indptr, indices, values)")
        indptr, indices, values = (np.asarray(p) for p in rows)
        if indptr.ndim != 1 or len(indptr) < 1 or indptr.dtype.kind not in "iu":
            raise ValueError(f"rows indptr must be a 1-D integer array [n + 1], got {_shape(indptr)}")
        if len(indices) and (indices.min() < 0 or indices.max() >= dim):
            raise ValueError(f"rows indices must lie in [0, {dim}), got [{indices.min()}, {indices.max()}]")
        m = scipy.sparse.csr_matrix((values, indices, indptr), shape=(len(indptr) - 1, dim))
    elif hasattr(rows, "tocsr"):
        m = rows.tocsr()
        if m.shape[1] != dim:
            raise ValueError(f"rows must have shape [n, {dim}], got {_shape(m)}")
    else:
        a = np.asarray(rows)
        if a.dtype.kind not in "fiub" or a.ndim != 2 or a.shape[1] != dim:
            raise ValueError(f"rows must be a real-valued array of shape [n, {dim}], "
                             f"got {a.dtype} {_shape(a)}")
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise ValueError("rows must be finite")
        m = scipy.sparse.csr_matrix(np.where(np.abs(a) > zero_threshold, a, 0))
    m = m.astype(np.float32)
    if not np.isfinite(m.data).all():
        raise ValueError("rows must be finite")
    m.sum_duplicates()
    m.eliminate_zeros()
    m.sort_indices()
    return m


def _id_vector(ids: Any, name: str) -> np.ndarray:
    a = np.asarray(ids)
    if a.ndim != 1 or (len(a) and a.dtype.kind not in "iu"):
        raise ValueError(f"{name} must be a 1-D integer array, got {a.dtype} {_shape(a)}")
    a = a.astype(np.int64)
    if len(a) and a.min() < 0:
        # -1 is the padding of short result lists.
        raise ValueError(f"{name} must be >= 0, got {_listed(np.sort(a[a < 0]))}")
    return a


def _listed(ids: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


class MutableIndex:
    """A base `SparseIndex`, a small delta segment and tombstones, searched as one index.

    Args:
        dim: The embedding dimension D of an empty index (use `from_index` or
            `load` to start from existing rows).
        block_rows: Rows per pruning block of the segments it builds.
        value_type: How the segments it builds store posting values ("float32" or "int8").
        keep_float: With "int8", the segments also keep their float32 rows for re-scoring.

    Raises:
        ValueError: If dim < 1, on an unknown value_type or keep_float without int8.
    """

    def __init__(self, dim: int, block_rows: int = DEFAULT_BLOCK_ROWS,
                 value_type: str = DEFAULT_VALUE_TYPE, keep_float: bool = False) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        self._dim = int(dim)
        self._block_rows = int(block_rows)
        self._value_type, self._keep_float = _value_options(value_type, keep_float)
        self._set_base(self._build(_empty_csr(self._dim)), np.zeros(0, np.int64))
        self._set_delta(_empty_csr(self._dim), np.zeros(0, np.int64))
        self._last: dict[str, Any] = {"queries": 0, "mode": DEFAULT_SEARCH_MODE,
                                      **{key: np.zeros(0) for key in _STATS}, "wall_seconds": 0.0}

    @classmethod
    def from_index(cls, index: SparseIndex, ids: Any | None = None) -> MutableIndex:
        """Starts from an existing index as the base (kept as is, not copied).

        Args:
            index: The base rows.
            ids: Caller ids of its rows, int64 [N] strictly increasing; None: 0 .. N-1.

        Raises:
            ValueError: If the ids are not [N] strictly increasing integers.
        """
        self = cls(index.dim, index.stats["block_rows"], index.value_type, index.keeps_float)
        base_ids = np.arange(len(index), dtype=np.int64) if ids is None else _id_vector(ids, "ids")
        if len(base_ids) != len(index):
            raise ValueError(f"ids must have shape [{len(index)}], got {_shape(base_ids)}")
        if (np.diff(base_ids) <= 0).any():
            raise ValueError("ids of a base index must be strictly increasing (its ties go to the "
                             "lower row, which must be the lower id)")
        self._set_base(index, base_ids)
        return self

    # Segments -----------------------------------------------------------------

    def _build(self, rows: scipy.sparse.csr_matrix, confidence: np.ndarray | None = None) -> SparseIndex:
        return SparseIndex.from_csr(rows.indptr, rows.indices, rows.data, self._dim,
                                    block_rows=self._block_rows, value_type=self._value_type,
                                    keep_float=self._keep_float, confidence=confidence)

    def _set_base(self, index: SparseIndex, ids: np.ndarray, saved: tuple[Path, str] | None = None,
                  dead: np.ndarray | None = None) -> None:
        self._base, self._base_ids = index, ids
        self._dead = np.zeros(len(ids), bool) if dead is None else dead
        # (directory, file stem) of the base's files when they are on disk unchanged.
        self._saved_base = saved

    def _set_delta(self, rows: scipy.sparse.csr_matrix, ids: np.ndarray,
                   confidence: np.ndarray | None = None) -> None:
        order = np.argsort(ids, kind="stable")
        self._delta_rows, self._delta_ids = rows[order], ids[order]
        self._delta_conf = None if confidence is None else confidence[order]
        self._delta = self._build(self._delta_rows, self._delta_conf)

    def _keeps_confidence(self) -> bool | None:
        """Whether the rows carry a confidence; None while no segment holds a row (the next add decides)."""
        if len(self._base):
            return self._base.confidence is not None
        if len(self._delta_ids):
            return self._delta_conf is not None
        return None

    def _row_confidence(self, ids: np.ndarray) -> np.ndarray:
        """float32 confidence of live caller ids (any shape); NaN for -1 and without confidence."""
        out = np.full(ids.shape, np.nan, np.float32)
        for seg_ids, conf, dead in ((self._base_ids, self._base.confidence, self._dead),
                                    (self._delta_ids, self._delta_conf, None)):
            if conf is None or not len(seg_ids):
                continue
            pos = np.clip(np.searchsorted(seg_ids, ids), 0, len(seg_ids) - 1)
            found = (ids >= 0) & (seg_ids[pos] == ids)
            if dead is not None:
                found &= ~dead[pos]
            out[found] = conf[pos[found]]
        return out

    def _live_in_base(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, base positions) of `ids` among the live base rows."""
        pos = np.clip(np.searchsorted(self._base_ids, ids), 0, max(len(self._base_ids) - 1, 0))
        found = np.zeros(len(ids), bool)
        if len(self._base_ids):
            found = (self._base_ids[pos] == ids) & ~self._dead[pos]
        return found, pos

    def _live_ids(self) -> np.ndarray:
        return np.union1d(self._base_ids[~self._dead], self._delta_ids)

    # Updates ------------------------------------------------------------------

    def add(self, rows: Any, ids: Any | None = None,
            zero_threshold: float = DEFAULT_ZERO_THRESHOLD, confidence: Any | None = None) -> np.ndarray:
        """Adds rows to the delta segment (rebuilt from its rows: it is small).

        Args:
            rows: Dense float [n, D], a scipy.sparse matrix [n, D] or a CSR
                tuple (indptr [n + 1], indices [nnz], values [nnz]).
            ids: int64 [n] caller ids >= 0, none of them live; None: the next
                free ids, above every id this index has held.
            zero_threshold: Dense entries with |x| at or below it are dropped.
            confidence: float [n], one per row; given exactly when the index's
                rows carry one (the first rows of an empty index decide).

        Returns:
            The ids of the added rows, int64 [n].

        Raises:
            ValueError: On a wrong shape (the message names [n, D]), non-finite
                values, ids that are negative, repeat or are already live
                (named), or a confidence that is not [n] finite values or is
                given to (or missing from) rows of an index without (with) one.
        """
        m = _rows_csr(rows, self._dim, zero_threshold)
        n = m.shape[0]
        conf = None if confidence is None else _confidence_vector(confidence, n, "confidence")
        keeps = self._keeps_confidence()
        if n and keeps is not None and keeps != (conf is not None):
            raise ValueError("this index keeps a confidence per row; the added rows need one too "
                             "(confidence=..., in an HDF5 file its 'confidence' dataset)" if keeps else
                             "this index has no row confidence; add rows without one (or build a new "
                             "index with it)")
        if ids is None:
            top = max(self._base_ids.max(initial=-1), self._delta_ids.max(initial=-1))
            new_ids = np.arange(top + 1, top + 1 + n, dtype=np.int64)
        else:
            new_ids = _id_vector(ids, "ids")
            if len(new_ids) != n:
                raise ValueError(f"ids must have shape [{n}], one per row, got {_shape(new_ids)}")
            unique, counts = np.unique(new_ids, return_counts=True)
            if (counts > 1).any():
                raise ValueError(f"duplicate ids in add: {_listed(unique[counts > 1])}")
            existing = np.sort(new_ids[self._live_in_base(new_ids)[0] | np.isin(new_ids, self._delta_ids)])
            if len(existing):
                raise ValueError(f"ids already in the index: {_listed(existing)}; remove them first")
        delta_conf = None
        if keeps or conf is not None:
            empty = np.zeros(0, np.float32)
            delta_conf = np.concatenate([empty if self._delta_conf is None else self._delta_conf,
                                         empty if conf is None else conf])
        self._set_delta(scipy.sparse.vstack([self._delta_rows, m], format="csr"),
                        np.concatenate([self._delta_ids, new_ids]), delta_conf)
        return new_ids

    def remove(self, ids: Any) -> None:
        """Removes rows by caller id: a tombstone in the base, a delta rebuild for added rows.

        Args:
            ids: int64 [n] live caller ids.

        Raises:
            ValueError: If an id repeats or is not in the index (named).
        """
        gone = _id_vector(ids, "ids")
        unique, counts = np.unique(gone, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"duplicate ids in remove: {_listed(unique[counts > 1])}")
        in_delta = np.isin(gone, self._delta_ids)
        in_base, pos = self._live_in_base(gone)
        unknown = gone[~in_delta & ~in_base]
        if len(unknown):
            raise ValueError(f"ids not in the index: {_listed(np.sort(unknown))}")
        self._dead = self._dead.copy()
        self._dead[pos[in_base]] = True
        if in_delta.any():
            keep = ~np.isin(self._delta_ids, gone[in_delta])
            self._set_delta(self._delta_rows[keep], self._delta_ids[keep],
                            None if self._delta_conf is None else self._delta_conf[keep])

    def compact(self) -> None:
        """Merges the live base rows and the delta into one new base index (ids kept)."""
        base_rows = self._base.to_csr()[~self._dead]
        ids = np.concatenate([self._base_ids[~self._dead], self._delta_ids])
        order = np.argsort(ids, kind="stable")
        rows = scipy.sparse.vstack([base_rows, self._delta_rows], format="csr")[order]
        conf = None
        if self._keeps_confidence():
            empty = np.zeros(0, np.float32)
            base_conf = self._base.confidence if len(self._base) else empty
            delta_conf = self._delta_conf if len(self._delta_ids) else empty
            conf = np.concatenate([base_conf[~self._dead], delta_conf])[order]
        self._set_base(self._build(rows, conf), ids[order])
        self._set_delta(_empty_csr(self._dim), np.zeros(0, np.int64))

    # Search -------------------------------------------------------------------

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
        """Top-k live rows of every query, as `SparseIndex.search` over the live rows.

        Args:
            queries: Dense float32 [Q, D], a scipy.sparse matrix [Q, D], or a CSR
                tuple (indptr [Q + 1], indices [nnz], values [nnz]).
            k: Results per query, >= 1 (may exceed the number of live rows).
            threshold: Only rows scoring strictly above it qualify; None: every row.
            rerank: Optional (database_dense float32 [R, Dd] whose row i belongs
                to caller id i, R > the largest live id; query_dense float32
                [Q, Dd]): the top `rerank_k` rows by sparse score are re-scored
                by dense inner product and the top k by dense score returned.
            rerank_k: Candidates re-ranked per query; >= k.
            num_threads: Worker threads of each segment's search; 0: every core.
            mode: One of `SEARCH_MODES`, as in `SparseIndex.search`; "approx" per segment.
            max_blocks: Blocks scored per query and segment in mode "approx"; None otherwise.
            rescore_k: Int8 segments with float rows: each re-scores its own top
                `rescore_k` (at least the rows it is asked for) by quantized score.
            rescore_exact: Int8 segments with float rows: the float32 result
                over the live rows.
            batch: Queries each segment accumulates together, as in
                `SparseIndex.search`; results do not depend on it.
            group_by_support: With batch > 1, groups formed by the queries'
                support, as in `SparseIndex.search`; results do not depend on it.
            query_confidence: Optional float [Q], reported with the hits.
            min_row_confidence: Only rows whose confidence is at or above it
                qualify, as in `SparseIndex.search`.
            return_confidence: Also return each hit's row and query confidence.

        Returns:
            ids int64 [Q, k] (caller ids) and scores float32 [Q, k], best first;
            -1 and -inf where fewer than k rows qualify. With return_confidence,
            also row_confidence and query_confidence float32 [Q, k], as in
            `SparseIndex.search`.

        Raises:
            ValueError: As `SparseIndex.search`, and on a re-rank database too
                short for the live ids.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        capacity = int(k)
        dense_db = dense_q = None
        if rerank is not None:
            if not isinstance(rerank, tuple | list) or len(rerank) != 2:
                raise ValueError("rerank must be a pair (database_dense [R, Dd], query_dense [Q, Dd])")
            if rerank_k < k:
                raise ValueError(f"rerank_k ({rerank_k}) must be >= k ({k})")
            dense_db = np.ascontiguousarray(rerank[0], np.float32)
            dense_q = np.ascontiguousarray(rerank[1], np.float32)
            span = 1 + max(int(self._base_ids[~self._dead].max(initial=-1)),
                           int(self._delta_ids.max(initial=-1)))
            if dense_db.ndim != 2 or len(dense_db) < span:
                raise ValueError(f"rerank database must have one row per caller id, at least [{span}, Dd], "
                                 f"got {_shape(dense_db)}")
            capacity = int(rerank_k)
        if not (hasattr(queries, "tocsr") or isinstance(queries, tuple)):
            # Converted once here rather than once per segment.
            queries = np.ascontiguousarray(queries, np.float32)
        floor = check_min_row_confidence(min_row_confidence, self._keeps_confidence() is True, rerank,
                                         rescore_k)
        q_conf = None if query_confidence is None else _confidence_vector(
            query_confidence, query_count(queries), "query_confidence")
        # Rows below the floor are left out exactly as removed rows are.
        base_dead, delta_dead = self._dead, None
        if floor is not None:
            if len(self._base):
                base_dead = self._dead | (self._base.confidence < floor)
            if len(self._delta_ids):
                delta_dead = self._delta_conf < floor
        start = time.perf_counter()
        options = {"threshold": threshold, "num_threads": num_threads, "mode": mode, "max_blocks": max_blocks,
                   "rescore_k": rescore_k, "rescore_exact": rescore_exact, "batch": batch,
                   "group_by_support": group_by_support}
        parts = [self._search_segment(index, seg_ids, dead, queries, capacity, options, dense_db, dense_q)
                 for index, seg_ids, dead in ((self._base, self._base_ids, base_dead),
                                              (self._delta, self._delta_ids, delta_dead))]
        ids, scores = _merge_top(np.concatenate([p[0] for p in parts], axis=1),
                                 np.concatenate([p[1] for p in parts], axis=1), capacity)
        if dense_db is not None:
            dense = _lookup(np.concatenate([p[2] for p in parts], axis=1),
                            np.concatenate([p[3] for p in parts], axis=1), ids)
            ids, scores = _merge_top(ids, dense, int(k))
        ids, scores = ids[:, :k], scores[:, :k]
        self._last = {"queries": len(ids), "mode": mode,
                      **{key: np.sum([p[4][key] for p in parts], axis=0)
                         for key in _STATS},
                      "wall_seconds": time.perf_counter() - start}
        if return_confidence:
            return ids, scores, self._row_confidence(ids), hit_confidence(ids, None, q_conf)[1]
        return ids, scores

    def _search_segment(self, index: SparseIndex, seg_ids: np.ndarray, dead: np.ndarray | None,
                        queries: Any, capacity: int, options: dict[str, Any],
                        dense_db: np.ndarray | None, dense_q: np.ndarray | None) -> tuple[Any, ...]:
        """One segment's live top `capacity` (caller ids), its dense-scored candidates and stats.

        With T tombstones the first pass asks for capacity + min(T, capacity)
        results: removed rows rarely crowd a query's top. Only the queries
        left with fewer than `capacity` live rows from a full list are asked
        again, for capacity + T, which always holds the live top `capacity`.

        Args:
            index: The segment.
            seg_ids: Caller id of each of its positions.
            dead: Tombstones by position, or None (the delta has none).
            queries: The queries, as given to `search`.
            capacity: Live results wanted per query.
            options: threshold, num_threads, mode, max_blocks, rescore_k and
                rescore_exact of `SparseIndex.search`.
            dense_db: Dense re-rank database by caller id, or None.
            dense_q: Dense queries, or None.

        Returns:
            ids [Q, capacity], scores, dense candidate ids [Q, W] and dense
            scores (empty without dense_db), and the segment's per-query stats.
        """
        removed = 0 if dead is None else int(dead.sum())
        first = capacity + min(removed, capacity)
        seg_dense = None
        if dense_db is not None:
            # The segment's rows of the dense database in its own order. Where its caller ids are
            # its positions (a base built from ids 0..N-1) that is the database itself; otherwise
            # a copy, which costs the whole database on every search.
            positions = (0 < len(seg_ids) <= len(dense_db) and seg_ids[0] == 0
                         and seg_ids[-1] == len(seg_ids) - 1 and bool((np.diff(seg_ids) == 1).all()))
            seg_dense = (dense_db[:len(seg_ids)] if positions
                         else np.take(dense_db, seg_ids, axis=0, mode="clip"), dense_q)

        def run(batch: Any, width: int, dense: tuple[Any, Any] | None) -> tuple[np.ndarray, ...]:
            # Tombstones widen the list asked for; re-scoring covers it all.
            opts = dict(options, rescore_k=None if options["rescore_k"] is None
                        else max(int(options["rescore_k"]), width))
            raw_ids, raw_scores = index.search(batch, width, **opts)
            stats = {key: np.asarray(index.stats[key]) for key in _STATS}
            ids, scores = self._caller_ids(raw_ids, raw_scores, seg_ids, dead)
            dense_ids = dense_scores = np.zeros((len(ids), 0))
            if dense is not None:
                # Same candidates again, scored by the core's dense dot product;
                # removed rows may lie past the dense database (clipped: never returned).
                dense_ids, dense_scores = index.search(batch, width, rerank=dense, rerank_k=width, **opts)
                dense_ids, dense_scores = self._caller_ids(dense_ids, dense_scores, seg_ids, dead)
            short = ((ids >= 0).sum(axis=1) < capacity) & (raw_ids[:, -1] >= 0)
            return (*_first_live(ids, scores, capacity), dense_ids, dense_scores, stats, short)

        ids, scores, dense_ids, dense_scores, stats, short = run(queries, first, seg_dense)
        if removed > first - capacity and short.any():
            again = np.flatnonzero(short)
            more = run(_query_rows(queries, again, self._dim), capacity + removed,
                       None if seg_dense is None else (seg_dense[0], seg_dense[1][again]))
            ids[again], scores[again] = more[0], more[1]
            if seg_dense is not None:
                width = max(dense_ids.shape[1], more[2].shape[1])
                dense_ids, dense_scores = _pad(dense_ids, width, -1), _pad(dense_scores, width, -np.inf)
                dense_ids[again] = _pad(more[2], width, -1)
                dense_scores[again] = _pad(more[3], width, -np.inf)
            for key, values in more[4].items():
                stats[key] = stats[key].copy()
                stats[key][again] += values
        return ids, scores, dense_ids, dense_scores, stats

    @staticmethod
    def _caller_ids(ids: np.ndarray, scores: np.ndarray, seg_ids: np.ndarray,
                    dead: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Segment positions -> caller ids; removed rows become padding (-1, -inf)."""
        valid = ids >= 0
        safe = np.where(valid, ids, 0)
        if dead is not None and len(dead):
            valid &= ~dead[safe]
        mapped = np.where(valid, seg_ids[safe] if len(seg_ids) else -1, -1)
        return mapped.astype(np.int64), np.where(valid, scores, np.float32(-np.inf)).astype(np.float32)

    # Persistence --------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Writes the index into `directory`; a reader never sees a half-written state.

        Args:
            directory: Created if missing; files of a previous save there are
                replaced (only after the new manifest is in place).
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(6)
        segments = {}
        for name, index, ids in (("base", self._base, self._base_ids),
                                 ("delta", self._delta, self._delta_ids)):
            stem = f"{name}-{token}"
            reuse = name == "base" and self._saved_base is not None and self._saved_base[0] == out.resolve()
            if reuse and all((out / f"{self._saved_base[1]}{ext}").is_file() for ext in (".idx", ".ids")):
                stem = self._saved_base[1]
            else:
                index.save(out / f"{stem}.idx")
                with atomic_path(out / f"{stem}.ids") as tmp:
                    tmp.write_bytes(ids.astype("<i8").tobytes())
                for ext in (".idx", ".ids"):
                    _fsync(out / f"{stem}{ext}")
            segments[name] = {"index": f"{stem}.idx", "ids": f"{stem}.ids", "rows": len(ids),
                              "ids_sha256": hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest()}
        body = {"version": MANIFEST_VERSION, "dim": self._dim, "block_rows": self._block_rows,
                "segments": segments, "tombstones": self._base_ids[self._dead].tolist()}
        manifest = dict(body, checksum=_checksum(body))
        with atomic_path(out / MANIFEST_NAME) as tmp:
            with open(tmp, "w") as f:
                json.dump(manifest, f)
                f.flush()
                os.fsync(f.fileno())
        self._saved_base = (out.resolve(), Path(segments["base"]["index"]).stem)
        referenced = {seg[key] for seg in segments.values() for key in ("index", "ids")}
        for path in out.iterdir():
            if path.name.startswith(_SEGMENTS) and path.suffix in (".idx", ".ids") \
                    and path.name not in referenced:
                path.unlink(missing_ok=True)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> MutableIndex:
        """Opens a directory written by `save` (the base is memory-mapped).

        Args:
            directory: The index directory.

        Raises:
            DataError: If the manifest is missing, corrupt or of an unknown
                version, or a segment file is missing or corrupt.
        """
        out = Path(directory)
        path = out / MANIFEST_NAME
        if not path.is_file():
            raise DataError(f"{path} not found: {out} is not a MutableIndex directory "
                            "(write one with MutableIndex.save or python -m sparse_embed.search "
                            "mutable-create)")
        try:
            manifest = json.loads(path.read_text())
            body = {key: value for key, value in manifest.items() if key != "checksum"}
            version = manifest["version"]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise DataError(f"{path} is not a MutableIndex manifest (unreadable JSON); "
                            "restore the directory or rebuild it") from None
        if version != MANIFEST_VERSION:
            raise DataError(f"{path} has manifest version {version!r}; this version reads "
                            f"{MANIFEST_VERSION}: rebuild the index or upgrade sparse_embed")
        if manifest.get("checksum") != _checksum(body):
            raise DataError(f"{path} fails its checksum (corrupted); restore the directory or rebuild it")
        try:
            self = cls(int(body["dim"]), int(body["block_rows"]))
            fields = ("index", "ids", "ids_sha256")
            segments = {name: {key: str(body["segments"][name][key]) for key in fields} for name in _SEGMENTS}
            tombstones = np.asarray(body["tombstones"], np.int64)
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path} lacks the fields of a version {MANIFEST_VERSION} manifest; "
                            "restore the directory or rebuild it") from None
        loaded = {}
        for name in _SEGMENTS:
            seg = segments[name]
            index = SparseIndex.load(out / seg["index"])
            ids_path = out / seg["ids"]
            if not ids_path.is_file():
                raise DataError(f"{ids_path} not found: the {name} segment of {out} is incomplete; "
                                "restore the directory or rebuild it")
            raw = ids_path.read_bytes()
            if hashlib.sha256(raw).hexdigest() != seg["ids_sha256"] or len(raw) != 8 * len(index):
                raise DataError(f"{ids_path} does not match {path} (corrupted id map); "
                                "restore the directory or rebuild it")
            if index.dim != self._dim:
                raise DataError(f"{out / seg['index']} has dimension {index.dim}, the manifest {self._dim}")
            loaded[name] = (index, np.frombuffer(raw, "<i8").astype(np.int64))
        base, base_ids = loaded["base"]
        self._value_type, self._keep_float = base.value_type, base.keeps_float
        self._set_base(base, base_ids, saved=(out.resolve(), Path(segments["base"]["index"]).stem),
                       dead=np.isin(base_ids, tombstones))
        delta, delta_ids = loaded["delta"]
        self._delta, self._delta_ids, self._delta_rows = delta, delta_ids, delta.to_csr()
        self._delta_conf = delta.confidence
        return self

    # Properties ---------------------------------------------------------------

    @property
    def stats(self) -> dict[str, Any]:
        """Segment sizes and the statistics of the last `search`.

        Keys: `rows` (live), `dim`, `base_rows`, `delta_rows`, `tombstones`,
        `nnz` and `bytes` (both segments, removed base rows included),
        `value_type` and `keep_float` (of the segments it builds), then
        for the last search `queries`, `mode`, per-query `postings`,
        `postings_scored`, `blocks_visited`, `candidates` and `seconds` summed
        over the segments (second asks of the base included), their means
        `postings_per_query`, `postings_scored_per_query`, `blocks_per_query`,
        `candidates_per_query`, `ms_per_query`, and `wall_seconds`.
        """
        last = self._last
        n = last["queries"]

        def mean(values: np.ndarray, scale: float = 1.0) -> float:
            return float(np.mean(values)) * scale if n else math.nan

        return {
            "rows": len(self),
            "dim": self._dim,
            "base_rows": len(self._base),
            "delta_rows": len(self._delta),
            "tombstones": int(self._dead.sum()),
            "nnz": self._base.nnz + self._delta.nnz,
            "bytes": self._base.nbytes + self._delta.nbytes,
            "value_type": self._value_type,
            "keep_float": self._keep_float,
            **last,
            "postings_per_query": mean(last["postings"]),
            "postings_scored_per_query": mean(last["postings_scored"]),
            "blocks_per_query": mean(last["blocks_visited"]),
            "candidates_per_query": mean(last["candidates"]),
            "ms_per_query": mean(last["seconds"], 1e3),
        }

    def __len__(self) -> int:
        return len(self._base_ids) - int(self._dead.sum()) + len(self._delta_ids)

    @property
    def dim(self) -> int:
        """The embedding dimension D."""
        return self._dim

    @property
    def ids(self) -> np.ndarray:
        """int64: the live caller ids, increasing."""
        return self._live_ids()

    @property
    def confidence(self) -> np.ndarray | None:
        """float32: the live rows' confidence in the order of `ids`, or None when the rows carry none."""
        if not self._keeps_confidence():
            return None
        return self._row_confidence(self._live_ids())

    def __repr__(self) -> str:
        return (f"MutableIndex(rows={len(self)}, dim={self._dim}, base_rows={len(self._base)}, "
                f"delta_rows={len(self._delta)}, tombstones={int(self._dead.sum())})")


def _first_live(ids: np.ndarray, scores: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first `width` entries with an id >= 0, in their order; padding after."""
    order = np.argsort(ids < 0, axis=1, kind="stable")[:, :width]
    ids, scores = np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)
    return _pad(ids, width, -1), _pad(scores, width, -np.inf)


def _pad(a: np.ndarray, width: int, value: float) -> np.ndarray:
    """`a` [Q, <= width] widened to [Q, width] with `value`."""
    if a.shape[1] >= width:
        return a.copy()
    return np.concatenate([a, np.full((len(a), width - a.shape[1]), value, a.dtype)], axis=1)




def _checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
