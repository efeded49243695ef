"""Open-set retrieval metrics: Recall@K, MAP@R, R-precision, Precision@1.

The metric-learning protocol (CUB, Cars, SOP, and held-out face identities):
every labelled embedding queries all the others of the same file, itself
excluded, ranked by inner product (cosine for the L2-normalised embeddings
`sparse_embed.embed` writes). For a query of class c, R is the number of
*other* items of class c (Musgrave et al., "A Metric Learning Reality Check",
ECCV 2020), and rel_i says whether its i-th neighbour is of class c:

- `recall@K`: fraction of queries with at least one of their K nearest
  neighbours of their class (the metric-learning convention, not the
  fraction of the class retrieved);
- `precision@1`: fraction whose nearest neighbour is of their class (equal to
  recall@1 by definition; reported under both names because papers use both);
- `r_precision`: mean over queries of (1/R) sum_{i<=R} rel_i;
- `map@r`: mean over queries of (1/R) sum_{i<=R} rel_i * P@i, with P@i the
  fraction of the first i neighbours of the class.

With the items' confidences (a probabilistic run's `confidence` dataset), two
more say whether the confident queries are the ones answered well
(`sparse_embed.metrics.uncertainty`, as "Probabilistic Embeddings Revisited"
computes them; lower is better): `erc_recall@1` and `erc_map@r`, the mean over
k of the mean error (1 - recall@1, 1 - AP@R) of the k most confident queries.

Queries whose class has no other item cannot be answered, are left out of
every metric and counted (`queries_without_match`). Items labelled -1 (no
label) stay in the database as distractors but never query.

The neighbours come from an exact search with one tie rule: equal scores go to
the lower row id. Sparse embeddings are searched with the C++ inverted index
(`sparse_embed.search.SparseIndex`), dense ones by NumPy matrix products in
blocks; `search="auto"` picks by the fraction of zero entries, and the result
says which it used. The query itself is removed by its row id, not by its
position: with duplicates or ties it need not rank first.

    python -m sparse_embed.evaluate retrieval --embeddings=dense.hdf5,sparse.hdf5 \\
        --output=retrieval.json --plot=recall.png

This module imports NumPy, h5py and the search extension only (matplotlib for
the plot), never TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sparse_embed.cli import examples, format_results, make_parser, user_errors_exit
from sparse_embed.errors import ConfigError, DataError
from sparse_embed.metrics.sparsity import DEFAULT_ZERO_THRESHOLD, run_names, split_paths
from sparse_embed.registry import Registry

DEFAULT_KS = (1, 2, 4, 8)
# `search="auto"` uses the inverted index from this fraction of zero entries
# up. A ReLU embedding without a sparsity regularizer is about half zeros: the
# index would then touch a quarter of the dense multiply-adds through scattered
# postings, which BLAS matrix products beat; regularized embeddings are far
# sparser (the demo's FLOPs run: 83% zeros).
AUTO_SPARSE_ZERO_FRACTION = 0.75
# Query x database scores held at once by the dense search (float32: 64 MiB).
_DENSE_BLOCK_ELEMENTS = 1 << 24

# (database float32 [N, D], query rows int64 [Q], k, zero_threshold, num_threads)
#   -> (neighbour ids int64 [Q, k] best first, ms per query, postings per query)
Search = Callable[[np.ndarray, np.ndarray, int, float, int], tuple[np.ndarray, float, float]]
SEARCHES: Registry[Search] = Registry("retrieval search")


def _top_k_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k best scores of every row, score descending, ties to the lower id.

    Args:
        scores: float32 [Q, N], finite.
        k: 1 <= k <= N.

    Returns:
        int64 [Q, k].
    """
    if k == scores.shape[1]:
        return np.argsort(-scores, axis=1, kind="stable").astype(np.int64)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(scores, top, axis=1).min(axis=1)
    # argpartition picks an arbitrary subset of the rows tied at the k-th
    # score; where more tie than fit, take the lowest ids of them.
    for row in np.flatnonzero((scores >= kth[:, None]).sum(axis=1) > k):
        candidates = np.flatnonzero(scores[row] >= kth[row])
        top[row] = candidates[np.argsort(-scores[row, candidates], kind="stable")[:k]]
    order = np.lexsort((top, -np.take_along_axis(scores, top, axis=1)), axis=1)
    return np.take_along_axis(top, order, axis=1).astype(np.int64)


@SEARCHES.register("dense")
def dense_search(database: np.ndarray, query_rows: np.ndarray, k: int, zero_threshold: float,
                 num_threads: int) -> tuple[np.ndarray, float, float]:
    """Exact top-k of database rows by float32 inner product, NumPy matrix products in blocks.

    Args:
        database: float32 [N, D]; the queries are its rows `query_rows`.
        query_rows: int64 [Q] row ids of the queries.
        k: Neighbours per query, 1 <= k <= N.
        zero_threshold: Unused: every entry takes part in a dense product.
        num_threads: Unused: BLAS sizes its own thread pool.

    Returns:
        (ids int64 [Q, k] best first, ties to the lower id; ms per query;
        multiply-adds per query, N * D, the dense counterpart of postings).
    """
    del zero_threshold, num_threads
    n, d = database.shape
    ids = np.empty((len(query_rows), k), np.int64)
    batch = max(1, _DENSE_BLOCK_ELEMENTS // n)
    start = time.perf_counter()
    for first in range(0, len(query_rows), batch):
        rows = query_rows[first:first + batch]
        ids[first:first + len(rows)] = _top_k_rows(database[rows] @ database.T, k)
    seconds = time.perf_counter() - start
    return ids, 1e3 * seconds / max(len(query_rows), 1), float(n * d)


@SEARCHES.register("sparse")
def sparse_search(database: np.ndarray, query_rows: np.ndarray, k: int, zero_threshold: float,
                  num_threads: int) -> tuple[np.ndarray, float, float]:
    """Exact top-k of database rows by inner product through the C++ inverted index.

    Args:
        database: float32 [N, D]; the queries are its rows `query_rows`.
        query_rows: int64 [Q] row ids of the queries.
        k: Neighbours per query, 1 <= k <= N.
        zero_threshold: Entries with |x| at or below it are zero, in the index and the queries.
        num_threads: Search threads; 0: every core.

    Returns:
        (ids int64 [Q, k] best first, ties to the lower id; the index's ms per
        query; postings touched per query, the paper's FLOPs measured).
    """
    from sparse_embed.search import SparseIndex

    index = SparseIndex.from_dense(database, zero_threshold=zero_threshold)
    queries = database[query_rows]
    # The queries are database rows: thresholded alike, so a row scores itself as the index stores it.
    queries = np.where(np.abs(queries) > zero_threshold, queries, np.float32(0))
    ids, _ = index.search(queries, k, threshold=None, num_threads=num_threads)
    stats = index.stats
    return ids, stats["ms_per_query"], stats["postings_per_query"]


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    values = tuple(ks)
    if not values or any(isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1
                         for k in values):
        raise ConfigError(f"ks must be integers >= 1 (e.g. 1,2,4,8), got {list(values)}")
    return tuple(sorted({int(k) for k in values}))


def retrieval_metrics(embeddings: np.ndarray, labels: np.ndarray, ks: Sequence[int] = DEFAULT_KS,
                      search: str = "auto", zero_threshold: float = DEFAULT_ZERO_THRESHOLD,
                      num_threads: int = 0, confidences: np.ndarray | None = None) -> dict[str, Any]:
    """Recall@K, MAP@R, R-precision and Precision@1 of every item against the rest (module docstring).

    Args:
        embeddings: Real [N, D], finite (L2-normalised for cosine ranking).
        labels: Integer [N] class labels; -1 marks an unlabelled item (a distractor).
        ks: The K of Recall@K, each >= 1 (K beyond N - 1 counts all other items).
        search: `auto` (by the fraction of zeros), `sparse` (inverted index) or `dense` (NumPy).
        zero_threshold: |x| at or below it counts as zero, for `auto` and the index; >= 0.
        num_threads: Threads of the sparse search; 0: every core.
        confidences: Finite float [N], higher = more trusted; None: no
            confidence metrics.

    Returns:
        `recall@K` for each K, `map@r`, `r_precision`, `precision@1` (floats in
        [0, 1]); `queries` (answered), `queries_without_match` (left out: no
        other item of their class); `search` (the path used), `zero_fraction`,
        `ms_per_query` and `postings_per_query` (postings touched by the
        index, or N * D multiply-adds for the dense search); with confidences,
        `erc_recall@1` and `erc_map@r` over the answered queries.

    Raises:
        DataError: On a bad shape or dtype, non-finite values (confidences
            included), no labels, or no item sharing its label with another.
        ConfigError: On bad `ks`, `search`, `zero_threshold` or `num_threads`.
    """
    ks = _check_ks(ks)
    if not (np.isfinite(zero_threshold) and zero_threshold >= 0):
        raise ConfigError(f"zero_threshold must be a finite number >= 0, got {zero_threshold}")
    if isinstance(num_threads, bool) or not isinstance(num_threads, int | np.integer) or num_threads < 0:
        raise ConfigError(f"num_threads must be an integer >= 0 (0: every core), got {num_threads!r}")
    x = np.asarray(embeddings)
    y = np.asarray(labels)
    if x.dtype.kind not in "fiub" or x.ndim != 2 or x.shape[1] == 0:
        raise DataError(f"embeddings must be a real [N, D] array, got {x.dtype} {list(x.shape)}")
    if y.dtype.kind not in "iu" or y.shape != (len(x),):
        raise DataError(f"labels must be integers of shape [{len(x)}], got {y.dtype} {list(y.shape)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise DataError("embeddings must be finite (found NaN or inf)")
    y = y.astype(np.int64)
    if confidences is not None:
        confidences = np.asarray(confidences, np.float64)
        if confidences.shape != (len(x),) or not np.isfinite(confidences).all():
            raise DataError(f"confidences must be {len(x)} finite numbers (one per embedding), got "
                            f"shape {list(confidences.shape)}")
    labelled = y >= 0
    if not labelled.any():
        raise DataError("no labels (every label is -1); embed a labelled source "
                        "(one folder per class, or TFRecords)")
    _, inverse, counts = np.unique(y[labelled], return_inverse=True, return_counts=True)
    others = np.full(len(y), -1, np.int64)
    others[labelled] = counts[inverse] - 1
    query_rows = np.flatnonzero(others >= 1)
    if not len(query_rows):
        raise DataError(f"no item shares its label with another ({int(labelled.sum())} labelled "
                        f"items, {len(counts)} classes): retrieval needs two or more items of a class")

    if search != "auto" and search not in SEARCHES:
        raise ConfigError(f"search must be one of auto, {', '.join(SEARCHES.names())}; got {search!r}")
    zero_fraction = float(np.mean(np.abs(x) <= zero_threshold))
    if search == "auto":
        search = "sparse" if zero_fraction >= AUTO_SPARSE_ZERO_FRACTION else "dense"
    searcher = SEARCHES.get(search)
    r = others[query_rows]
    # One extra neighbour: the query itself, removed below.
    k = min(len(x), max(ks[-1], int(r.max())) + 1)
    ids, ms_per_query, postings_per_query = searcher(x, query_rows, k, zero_threshold, num_threads)
    # Stable: the query's own row (found at most once) moves to the end, the others keep their order.
    own = np.argsort(ids == query_rows[:, None], axis=1, kind="stable")
    neighbours = np.take_along_axis(ids, own, axis=1)[:, :k - 1]
    relevant = y[neighbours] == y[query_rows][:, None]
    within_r = np.arange(k - 1) < r[:, None]
    precision_at = np.cumsum(relevant, axis=1) / np.arange(1, k)
    results: dict[str, Any] = {f"recall@{kk}": float(relevant[:, :kk].any(axis=1).mean()) for kk in ks}
    average_precision = (precision_at * (relevant & within_r)).sum(axis=1) / r
    results["map@r"] = float(average_precision.mean())
    results["r_precision"] = float(((relevant & within_r).sum(axis=1) / r).mean())
    results["precision@1"] = float(relevant[:, 0].mean())
    results["queries"] = len(query_rows)
    results["queries_without_match"] = int(np.sum(others == 0))
    results["search"] = search
    results["zero_fraction"] = zero_fraction
    results["ms_per_query"] = float(ms_per_query)
    results["postings_per_query"] = float(postings_per_query)
    if confidences is not None:
        from sparse_embed.metrics.uncertainty import error_reject_area

        results["erc_recall@1"] = error_reject_area(1.0 - relevant[:, 0], confidences[query_rows])
        results["erc_map@r"] = error_reject_area(1.0 - average_precision, confidences[query_rows])
    return results


def _parse_ks(value: str) -> tuple[int, ...]:
    try:
        return _check_ks([int(k) for k in value.split(",") if k.strip()])
    except ValueError:
        raise ConfigError(
            f"--ks must be comma-separated integers >= 1 (e.g. 1,2,4,8), got {value!r}") from None


DESCRIPTION = ("Open-set retrieval (each embedding queries the rest of its file): Recall@K, "
               "MAP@R, R-precision, Precision@1, with search time.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares the options of `evaluate retrieval` on `parser`.

    Args:
        parser: The sub-command's parser.
    """
    parser.add_argument("--embeddings", required=True,
                        help="HDF5 file(s) written by sparse_embed.embed, comma-separated to compare runs.")
    parser.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)),
                        help="The K of Recall@K (default: %(default)s).")
    parser.add_argument("--search", default="auto",
                        help=f"auto: the inverted index from {100 * AUTO_SPARSE_ZERO_FRACTION:g}%% zero "
                             "entries up, else dense NumPy search (default: %(default)s).")
    parser.add_argument("--zero_threshold", type=float, default=DEFAULT_ZERO_THRESHOLD,
                        help="|x| at or below it counts as zero (default: %(default)s, as in training).")
    parser.add_argument("--num_threads", type=int, default=0,
                        help="Threads of the sparse search; 0: every core (default).")
    parser.add_argument("--output", help="JSON file of the metrics, one entry per file.")
    parser.add_argument("--plot", help="Recall@K bar chart PNG; default: beside --output (.recall.png).")


def run_command(args: argparse.Namespace) -> None:
    """Runs `evaluate retrieval`: prints the table, writes JSON and the plot.

    Args:
        args: The options `add_arguments` declares, parsed.
    """
    from sparse_embed.data.embeddings import read_hdf5
    from sparse_embed.fileio import atomic_path

    ks = _parse_ks(args.ks)
    if args.search != "auto" and args.search not in SEARCHES:
        raise ConfigError(f"--search must be one of auto, {', '.join(SEARCHES.names())}; "
                          f"got {args.search!r}")
    paths = split_paths(args.embeddings)
    files = {name: (path, read_hdf5(path)) for name, path in zip(run_names(paths), paths, strict=True)}
    results = {}
    for name, (path, data) in files.items():
        try:
            results[name] = retrieval_metrics(data.embedding, data.label, ks, args.search,
                                              args.zero_threshold, args.num_threads, data.confidence)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None
    print(format_results(results), end="")
    if args.output:
        records = {name: {"file": files[name][0], "zero_threshold": args.zero_threshold, **r}
                   for name, r in results.items()}
        with atomic_path(args.output) as tmp:
            tmp.write_text(json.dumps(records, indent=2) + "\n")
    plot = args.plot or (Path(args.output).with_suffix(".recall.png") if args.output else None)
    if plot:
        from sparse_embed.plots import plot_recall_at_k

        plot_recall_at_k({name: {k: r[f"recall@{k}"] for k in ks} for name, r in results.items()}, plot)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.evaluate retrieval`."""
    parser = make_parser(f"{DESCRIPTION}\n\n{examples(__doc__)}",
                         "python -m sparse_embed.evaluate retrieval")
    add_arguments(parser)
    return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """`python -m sparse_embed.evaluate retrieval ...`.

    Args:
        argv: Arguments after the sub-command; None reads sys.argv.
    """
    run_command(build_parser().parse_args(argv))
