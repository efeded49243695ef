"""Search speed side by side: the sparse inverted index, scipy.sparse and dense BLAS.

    python benchmarks/search_bench.py            # 1,000,000 x 1024, ~32 non-zeros/row, top-10
    python benchmarks/search_bench.py --quick    # 100,000 rows, 200 queries: seconds
    python benchmarks/search_bench.py --rows 2000000 --nnz 16 --skew 1.2 --num_threads 8
    python benchmarks/search_bench.py --rows 200000 --skew 0 --only_modes   # search modes only
    python benchmarks/search_bench.py --only_modes --swap 0.1   # identities that differ in support
    python benchmarks/search_bench.py --only_blocks --rows 200000 --num_queries 300 --num_threads 1
    python benchmarks/search_bench.py --only_mutable --rows 200000
    python benchmarks/search_bench.py --rows 200000 --num_queries 500 --output=results/search.json

Databases are generated at MegaFace scale: row i is non-zero in dimension d
with probability p_d, independently (so a dimension's postings are a
Bernoulli process, drawn with geometric gaps in O(nnz)); sum_d p_d is the
target mean non-zeros per row. Uniform popularity sets p_d = nnz / D; the
skewed case makes p_d Zipf-like (p_d ~ rank^-s, capped at 1), the
non-uniformity the FLOPs regularizer penalises: a query then touches
N * sum_d p_d^2 postings on average instead of N * nnz^2 / D. Queries come
from the same generator; values are uniform in (0.1, 1] (ReLU embeddings).

The identity-structured case is a face gallery: rows come in identity groups
of `--images_per_identity` near-duplicates (one support of `--nnz` dimensions per identity,
values scaled by U(0.8, 1.2) per image; `--swap` replaces a fraction of each
image's dimensions by random ones), stored in shuffled order; queries are
further noisy images of gallery identities. The index's search modes
(exhaustive, block-max pruned, auto, approx with a block budget) run on it and
on the uniform case, with blocks visited and postings read per query and
recall@k of approx against exact.

The methods of a case are timed in interleaved rounds of queries, so on a
shared machine they see the same background load. Every method's top-k
scores are checked against the index's before anything is printed.

Last, Milvus Lite (the embedded edition of Milvus, `--milvus_rows`, default
100,000: its inserts are slow) and the index on the same uniform rows.

`--only_blocks` times the exact modes for several `--block_sizes` on identity
groups (sharing their support, and swapping `--swap` of it, 0.1 unless set)
and on uniform rows; `--only_mutable` times a `MutableIndex` (base, delta,
tombstones, add, remove, compact, save, load) on `--rows` uniform rows.

Prints the tables and a JSON line each (none is asserted); `--output=PATH`
also writes them, with the command, commit, machine and date, as a result
file that the documentation renders (`python -m sparse_embed.results`).
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import scipy.sparse
from tqdm import tqdm

from sparse_embed.cli import deprecated_alias, make_parser
from sparse_embed.results import Column, command_line, write_result
from sparse_embed.search import SparseIndex
from sparse_embed.search.mutable import MutableIndex

# Scores a baseline holds at once (queries x rows), to bound its memory: dense
# float32 scores, and scipy's sparse products (which also hold indices and
# temporaries).
_DENSE_SCORES = 1 << 27
_SCIPY_SCORES = 1 << 25
# Largest database the batched-query table also multiplies as a dense float32 matrix.
_DENSE_BATCH_BYTES = 5 << 30
# Timing rounds per case, of at least _ROUND_QUERIES queries each (so per-call
# overheads stay small next to the work).
_ROUNDS = 10
_ROUND_QUERIES = 100

# (start, stop) -> sorted top-k scores [stop - start, k] of those queries.
Runner = Callable[[int, int], np.ndarray]
# Table name -> (columns, rows), as `sparse_embed.results.write_result` takes them.
Tables = dict[str, tuple[list[Column], list[dict]]]

BASELINE_COLUMNS = [Column("method", "method"), Column("rows", "rows"), Column("dim", "dim"),
                    Column("nnz_per_row", "nnz/row", ".1f"), Column("threads", "threads"),
                    Column("ms", "ms/query", ".3f"), Column("postings", "postings/query", ".0f"),
                    Column("expected", "expected N·Σp²", ".0f"),
                    Column("vs_sparse", "time vs sparse index", ".1f")]
MODE_COLUMNS = [Column("data", "data"), Column("mode", "mode"), Column("threads", "threads"),
                Column("ms", "ms/query", ".3f"), Column("vs_exhaustive", "speed-up vs exhaustive", ".1f"),
                Column("blocks", "blocks/query", ".1f"), Column("postings", "postings/query", ".0f"),
                Column("recall", "recall@k", ".3f")]
INDEX_COLUMNS = [Column("data", "data"), Column("values", "values"), Column("rows", "rows"),
                 Column("block_rows", "block rows"), Column("postings", "postings B/nnz", ".2f"),
                 Column("blocks", "blocks + order B/nnz", ".2f"), Column("total", "total B/nnz", ".2f"),
                 Column("forward", "forward store B/nnz", ".2f"),
                 Column("build_seconds", "build s", ".1f")]
BATCH_COLUMNS = [Column("data", "data"), Column("method", "method"), Column("threads", "threads"),
                 Column("ms", "ms/query", ".3f"),
                 Column("vs_one_at_a_time", "speed vs one at a time", ".2f")]
MILVUS_COLUMNS = [Column("method", "method"), Column("rows", "rows"), Column("queries", "queries"),
                  Column("insert_seconds", "insert s", ".1f"), Column("ms", "ms/query", ".3f"),
                  Column("vs_index", "time vs index", ".0f"),
                  Column("max_score_difference", "max score difference", ".1e")]
BLOCK_COLUMNS = [Column("data", "data"), Column("block_rows", "block rows"),
                 Column("exhaustive", "exhaustive ms", ".3f"), Column("pruned", "pruned ms", ".3f"),
                 Column("auto", "auto ms", ".3f"), Column("blocks", "pruned blocks/query", ".1f"),
                 Column("bytes_per_nnz", "B/nnz", ".2f")]
MUTABLE_COLUMNS = [Column("operation", "operation"), Column("ms", "ms", ".3f"), Column("per", "per")]


def dimension_rates(dim: int, nnz: float, skew: float) -> np.ndarray:
    """Probability that a row is non-zero in each dimension; they sum to `nnz`.

    Args:
        dim: Dimensions D.
        nnz: Target mean non-zeros per row, <= D.
        skew: 0 for uniform popularity, else the Zipf exponent s (p_d ~ rank^-s).
    """
    if skew == 0:
        return np.full(dim, nnz / dim)
    rates = np.arange(1, dim + 1, dtype=np.float64) ** -skew
    rates *= nnz / rates.sum()
    # Water-filling: a dimension cannot be non-zero more often than always.
    while (rates > 1).any():
        full = rates >= 1
        rates[full] = 1
        rates[~full] *= (nnz - full.sum()) / rates[~full].sum()
    return rates


def sparse_embeddings(rows: int, rates: np.ndarray, rng: np.random.Generator
                      ) -> scipy.sparse.csr_matrix:
    """float32 CSR [rows, D]: entry (i, d) non-zero with probability rates[d], values in (0.1, 1].

    Args:
        rows: Rows N.
        rates: [D] per-dimension probabilities.
        rng: Random generator.
    """
    postings = []
    for p in rates:
        if p >= 1:
            postings.append(np.arange(rows, dtype=np.int32))
            continue
        # Gaps between successive non-zero rows of a Bernoulli(p) process.
        draw = int(rows * p + 6 * np.sqrt(rows * p) + 16)
        positions = np.cumsum(rng.geometric(p, size=draw)) - 1
        while positions[-1] < rows:
            more = np.cumsum(rng.geometric(p, size=draw)) + positions[-1]
            positions = np.concatenate([positions, more])
        postings.append(positions[positions < rows].astype(np.int32))
    indptr = np.concatenate([[0], np.cumsum([len(p) for p in postings])])
    values = (0.1 + 0.9 * rng.random(int(indptr[-1]), dtype=np.float32)).astype(np.float32)
    csc = scipy.sparse.csc_matrix((values, np.concatenate(postings), indptr),
                                  shape=(rows, len(rates)))
    return csc.tocsr()


def identity_embeddings(rows: int, dim: int, nnz: int, group: int, rng: np.random.Generator,
                        swap: float = 0.0) -> tuple[scipy.sparse.csr_matrix, np.ndarray]:
    """float32 CSR [rows, D] in identity groups of `group` near-duplicates, shuffled, and the
    identity of each row.

    Args:
        rows: Rows N.
        dim: Dimensions D.
        nnz: Non-zeros per identity (duplicate draws merge, so rows hold about this many).
        group: Images per identity.
        rng: Random generator.
        swap: Probability that an image replaces one of its identity's dimensions by a random
            one (0: the images of an identity share their support).
    """
    identities = -(-rows // group)
    support = rng.integers(0, dim, (identities, nnz))
    base = (0.1 + 0.9 * rng.random((identities, nnz))).astype(np.float32)
    identity = rng.permutation(np.arange(rows) // group)
    values = base[identity] * rng.uniform(0.8, 1.2, (rows, nnz)).astype(np.float32)
    dims = support[identity]
    if swap > 0:
        dims = np.where(rng.random(dims.shape) < swap, rng.integers(0, dim, dims.shape), dims)
    matrix = scipy.sparse.csr_matrix(
        (values.ravel(), dims.ravel(), np.arange(0, rows * nnz + 1, nnz)), shape=(rows, dim))
    matrix.sum_duplicates()
    return matrix, identity


def modes_runner(index: SparseIndex, queries: scipy.sparse.csr_matrix, k: int, threads: int,
                 mode: str, max_blocks: int | None, counters: dict[str, list[float]],
                 rescore_k: int | None = None, rescore_exact: bool = False) -> Runner:
    """The index in one search mode (re-scoring the top rescore_k, or exactly, when set); appends
    each call's blocks / postings read and ids."""

    def run(start: int, stop: int) -> np.ndarray:
        ids, scores = index.search(queries[start:stop], k, num_threads=threads, mode=mode,
                                   max_blocks=max_blocks, rescore_k=rescore_k,
                                   rescore_exact=rescore_exact)
        counters["blocks"].append(float(index.stats["blocks_visited"].sum()))
        counters["scored"].append(float(index.stats["postings_scored"].sum()))
        counters["ids"].append(ids)
        return scores

    return run


def mode_rows(name: str, index: SparseIndex, queries: scipy.sparse.csr_matrix, k: int,
              threads: int, budget: int, int8: SparseIndex | None = None
              ) -> list[dict[str, float | str]]:
    """Times exhaustive, pruned, auto and approx on one data set; one result row per mode.

    With `int8` (the same rows as an int8 index with its float rows kept) it times the int8
    index too, exhaustive and auto on the quantized scores, auto re-scoring the top 2 k and
    10 k in float, and auto with exact re-scoring (the float index's results, asserted); their
    recall is against the exact float top-k.
    """
    modes = {"exhaustive": None, "pruned": None, "auto": None, f"approx {budget} blocks": budget}
    counters = {m: {"blocks": [], "scored": [], "ids": []} for m in modes}
    runners = {m: modes_runner(index, queries, k, threads, m.split()[0], b, counters[m])
               for m, b in modes.items()}
    if int8 is not None:
        int8_modes = {"int8 exhaustive": None, "int8 auto": None}
        int8_modes.update({f"int8 auto rescore {r}": r for r in (2 * k, 10 * k)})
        for m, rescore in int8_modes.items():
            modes[m] = None
            counters[m] = {"blocks": [], "scored": [], "ids": []}
            runners[m] = modes_runner(int8, queries, k, threads, m.split()[1], None, counters[m],
                                      rescore)
        modes["int8 auto rescore exact"] = None
        counters["int8 auto rescore exact"] = {"blocks": [], "scored": [], "ids": []}
        runners["int8 auto rescore exact"] = modes_runner(
            int8, queries, k, threads, "auto", None, counters["int8 auto rescore exact"],
            rescore_exact=True)
    q = queries.shape[0]
    ms, tops = time_interleaved(runners, q, name)
    for exact in ("pruned", "auto"):  # exact means identical
        np.testing.assert_array_equal(tops[exact], tops["exhaustive"])
        np.testing.assert_array_equal(np.concatenate(counters[exact]["ids"]),
                                      np.concatenate(counters["exhaustive"]["ids"]))
    if int8 is not None:  # exact on the dequantized rows; exact re-scoring: the float results
        np.testing.assert_array_equal(tops["int8 auto"], tops["int8 exhaustive"])
        np.testing.assert_array_equal(tops["int8 auto rescore exact"], tops["exhaustive"])
        np.testing.assert_array_equal(np.concatenate(counters["int8 auto rescore exact"]["ids"]),
                                      np.concatenate(counters["exhaustive"]["ids"]))
    exact_ids = np.concatenate(counters["exhaustive"]["ids"][1:])
    rows = []
    for m in modes:
        ids = np.concatenate(counters[m]["ids"][1:])  # [0] is the warm-up
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, exact_ids, strict=True)])
        rows.append({"data": name, "mode": m, "threads": threads, "ms": ms[m],
                     "vs_exhaustive": ms["exhaustive"] / ms[m],
                     "blocks": sum(counters[m]["blocks"][1:]) / q,
                     "postings": sum(counters[m]["scored"][1:]) / q, "recall": recall})
    return rows


def print_mode_rows(rows: list[dict[str, float | str]], index_stats: dict[str, dict]) -> None:
    header = (f"{'data':<22}{'mode':<26}{'threads':>8}{'ms/query':>10}{'speed-up':>10}"
              f"{'blocks/q':>10}{'postings/q':>12}{'recall@k':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['data']:<22}{r['mode']:<26}{r['threads']:>8}{r['ms']:>10.3f}"
              f"{r['vs_exhaustive']:>9.1f}x{r['blocks']:>10.1f}{r['postings']:>12.0f}"
              f"{r['recall']:>10.3f}")
    for name, st in index_stats.items():
        print(f"{name}: {st['rows']} rows, {st['blocks']} blocks of {st['block_rows']}, "
              f"{st['bytes_per_nnz']:.2f} + {st['block_bytes'] / st['nnz']:.2f} (block metadata, "
              f"order) = {(st['bytes'] + st['block_bytes']) / st['nnz']:.2f} bytes per non-zero, "
              + (f"forward store {st['rescore_bytes'] / st['nnz']:.2f} more, "
                 if st["rescore_bytes"] else "")
              + f"built in {st['build_seconds']:.1f} s")


def index_row(data: str, stats: dict) -> dict[str, float | int | str | None]:
    """One row of the index-size table from `SparseIndex.stats`."""
    nnz = stats["nnz"]
    return {"data": data, "values": stats["value_type"], "rows": stats["rows"],
            "block_rows": stats["block_rows"], "postings": stats["bytes_per_nnz"],
            "blocks": stats["block_bytes"] / nnz, "total": (stats["bytes"] + stats["block_bytes"]) / nnz,
            "forward": stats["rescore_bytes"] / nnz if stats["rescore_bytes"] else None,
            "build_seconds": stats["build_seconds"]}


def run_modes(args: argparse.Namespace, threads: int, rng: np.random.Generator) -> Tables:
    """The search-mode table (identity-structured and uniform data) and the index-size table."""
    rows, stats = [], {}
    log(f"generating the {args.rows} x {args.dim} identity-structured database ...")
    database, identity = identity_embeddings(args.rows, args.dim, int(args.nnz), args.group, rng,
                                             args.swap)
    picks = rng.choice(args.rows, args.queries)
    queries = database[picks].multiply(rng.uniform(0.8, 1.2, (args.queries, 1))).tocsr()
    queries.data *= rng.uniform(0.9, 1.1, queries.nnz).astype(np.float32)
    queries = queries.astype(np.float32)
    index = SparseIndex.from_csr(database.indptr, database.indices, database.data, args.dim,
                                 block_rows=args.block_rows)
    stats["identity"] = index.stats
    int8 = SparseIndex.from_csr(database.indptr, database.indices, database.data, args.dim,
                                block_rows=args.block_rows, value_type="int8", keep_float=True)
    stats["identity int8"] = int8.stats
    del database, identity
    rows += mode_rows("identity groups", index, queries, args.k, threads, args.budget, int8)
    del index, int8
    log(f"generating the {args.rows} x {args.dim} uniform database ...")
    rates = dimension_rates(args.dim, args.nnz, 0.0)
    database = sparse_embeddings(args.rows, rates, rng)
    queries = sparse_embeddings(args.queries, rates, rng)
    index = SparseIndex.from_csr(database.indptr, database.indices, database.data, args.dim,
                                 block_rows=args.block_rows)
    stats["uniform"] = index.stats
    int8 = SparseIndex.from_csr(database.indptr, database.indices, database.data, args.dim,
                                block_rows=args.block_rows, value_type="int8", keep_float=True)
    stats["uniform int8"] = int8.stats
    del database
    rows += mode_rows("uniform", index, queries, args.k, threads, args.budget, int8)
    print_mode_rows(rows, stats)
    print(json.dumps([{key: round(v, 6) if isinstance(v, float) else v for key, v in r.items()}
                      for r in rows]))
    names = {"identity": "identity groups", "identity int8": "identity groups",
             "uniform": "uniform", "uniform int8": "uniform"}
    return {"modes": (MODE_COLUMNS, rows),
            "index": (INDEX_COLUMNS, [index_row(names[n], st) for n, st in stats.items()])}


def batched_runner(index: SparseIndex, queries: scipy.sparse.csr_matrix, k: int, threads: int,
                   mode: str, batch: int, by_support: bool, ids: list[np.ndarray]) -> Runner:
    """The index answering groups of `batch` queries together; appends each call's ids."""

    def run(start: int, stop: int) -> np.ndarray:
        found, scores = index.search(queries[start:stop], k, num_threads=threads, mode=mode,
                                     batch=batch, group_by_support=by_support)
        ids.append(found)
        return scores

    return run


def batch_rows(name: str, index: SparseIndex, queries: scipy.sparse.csr_matrix, k: int,
               threads: int, mode: str, batches: list[int],
               baselines: dict[str, Runner] | None = None) -> list[dict[str, float | str]]:
    """Times one query at a time against groups of each size in `batches` (in the given order
    and grouped by support) on `threads` threads, and the baselines; one result row each."""
    variants = {"one at a time": (1, False)}
    for b in batches:
        variants[f"batch {b}, given order"] = (b, False)
        variants[f"batch {b}, by support"] = (b, True)
    ids: dict[str, list[np.ndarray]] = {v: [] for v in variants}
    runners = {v: batched_runner(index, queries, k, threads, mode, b, s, ids[v])
               for v, (b, s) in variants.items()}
    runners.update(baselines or {})
    ms, tops = time_interleaved(runners, queries.shape[0], f"{name}, {threads} threads")
    for v in variants:  # batched results are identical; the baselines agree to rounding
        np.testing.assert_array_equal(tops[v], tops["one at a time"])
        np.testing.assert_array_equal(np.concatenate(ids[v]), np.concatenate(ids["one at a time"]))
    for v in baselines or {}:
        np.testing.assert_allclose(tops[v], tops["one at a time"], rtol=1e-5, atol=1e-6)
    base = ms["one at a time"]
    return [{"data": name, "method": v, "threads": threads if v in variants else 1, "ms": ms[v],
             "vs_one_at_a_time": base / ms[v]} for v in runners]


def run_batched(args: argparse.Namespace, threads: int, rng: np.random.Generator) -> Tables:
    """The batched-query table: groups of queries accumulated together against one query at a
    time, on 1 and `threads` threads, on identity-structured probes (grouped by identity and in
    random order) and on uniform data, with scipy CSR and NumPy dense products on the identity
    data."""
    batches = [int(b) for b in args.batches.split(",")]
    thread_counts = sorted({1, threads})
    rows = []
    log(f"generating the {args.rows} x {args.dim} identity-structured database ...")
    database, identity = identity_embeddings(args.rows, args.dim, int(args.nnz), args.group, rng,
                                             args.swap)
    # Probes: every image of randomly chosen identities, noisier, one identity after the other.
    members = np.argsort(identity, kind="stable")
    starts = np.searchsorted(identity[members], np.arange(identity.max() + 2))
    chosen = rng.permutation(identity.max() + 1)[:-(-args.queries // args.group)]
    picks = np.concatenate([members[starts[c]:starts[c + 1]] for c in chosen])[:args.queries]
    grouped = database[picks].multiply(rng.uniform(0.8, 1.2, (len(picks), 1))).tocsr()
    grouped.data *= rng.uniform(0.9, 1.1, grouped.nnz).astype(np.float32)
    grouped = grouped.astype(np.float32)
    shuffled = grouped[rng.permutation(len(picks))]
    index = SparseIndex.from_csr(database.indptr, database.indices, database.data, args.dim,
                                 block_rows=args.block_rows)
    n, q = args.rows, len(picks)
    baselines = {"scipy.sparse CSR matmul": scipy_runner(shuffled, database.T.tocsr(), args.k,
                                                         max(1, _SCIPY_SCORES // n))}
    if n * args.dim * 4 <= _DENSE_BATCH_BYTES:
        baselines["NumPy dense matmul"] = dense_runner(shuffled.toarray(), database.toarray(),
                                                       args.k, max(1, _DENSE_SCORES // n))
    del database, identity
    for t in thread_counts:
        rows += batch_rows("identity, by identity", index, grouped, args.k, t, "exhaustive", batches)
        rows += batch_rows("identity, random order", index, shuffled, args.k, t, "exhaustive",
                           batches, baselines if t == thread_counts[0] else None)
    del index, baselines
    log(f"generating the {args.rows} x {args.dim} uniform database ...")
    rates = dimension_rates(args.dim, args.nnz, 0.0)
    database = sparse_embeddings(args.rows, rates, rng)
    queries = sparse_embeddings(q, rates, rng)
    index = SparseIndex.from_csr(database.indptr, database.indices, database.data, args.dim,
                                 block_rows=args.block_rows)
    del database
    for t in thread_counts:
        rows += batch_rows("uniform", index, queries, args.k, t, "auto", batches)
    header = f"{'data':<24}{'method':<26}{'threads':>8}{'ms/query':>10}{'vs one at a time':>18}"
    print(f"batched queries: {n} rows, {q} queries, top-{args.k}; mode exhaustive on the identity "
          f"data, auto (which falls back to exhaustive) on the uniform data")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['data']:<24}{r['method']:<26}{r['threads']:>8}{r['ms']:>10.3f}"
              f"{r['vs_one_at_a_time']:>17.2f}x")
    print(json.dumps([{key: round(v, 6) if isinstance(v, float) else v for key, v in r.items()}
                      for r in rows]))
    return {"batched": (BATCH_COLUMNS, rows)}


def top_scores(score_rows: list[np.ndarray], k: int) -> np.ndarray:
    """Sorted top-k of each score vector; a sparse product's missing rows score 0."""
    top = np.zeros((len(score_rows), k), np.float32)
    for i, scores in enumerate(score_rows):
        if len(scores) < k:
            scores = np.concatenate([scores, np.zeros(k - len(scores), scores.dtype)])
        best = scores[np.argpartition(scores, len(scores) - k)[-k:]]
        top[i] = np.sort(best)[::-1]
    return top


def engine_runner(index: SparseIndex, queries: scipy.sparse.csr_matrix, k: int, threads: int,
                  postings: list[float]) -> Runner:
    """The index on CSR queries; appends each call's postings touched to `postings`."""

    def run(start: int, stop: int) -> np.ndarray:
        _, scores = index.search(queries[start:stop], k, num_threads=threads)
        postings.append(float(index.stats["postings"].sum()))
        return scores

    return run


def scipy_runner(queries: scipy.sparse.csr_matrix, database_t: scipy.sparse.csr_matrix, k: int,
                 batch: int) -> Runner:
    """CSR queries @ CSR database.T (the inverted-index product), then argpartition."""

    def run(start: int, stop: int) -> np.ndarray:
        tops = []
        for a in range(start, stop, batch):
            product = (queries[a:min(stop, a + batch)] @ database_t).tocsr()
            tops.append(top_scores([product.data[product.indptr[i]:product.indptr[i + 1]]
                                    for i in range(product.shape[0])], k))
        return np.concatenate(tops)

    return run


def dense_runner(queries: np.ndarray, database: np.ndarray, k: int, batch: int) -> Runner:
    """Batched BLAS matmul, then argpartition."""

    def run(start: int, stop: int) -> np.ndarray:
        return np.concatenate([top_scores(list(queries[a:min(stop, a + batch)] @ database.T), k)
                               for a in range(start, stop, batch)])

    return run


def time_interleaved(runners: dict[str, Runner], num_queries: int, desc: str
                     ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Runs every method on each round of queries in turn.

    Args:
        runners: Method name -> runner.
        num_queries: Queries, split into rounds.
        desc: Progress-bar label.

    Returns:
        ms/query and the top-k scores of every method.
    """
    rounds = max(1, min(_ROUNDS, num_queries // _ROUND_QUERIES))
    bounds = np.linspace(0, num_queries, rounds + 1).astype(int)
    for runner in runners.values():  # warm-up: page in the data, start the threads
        runner(0, min(5, num_queries))
    seconds = dict.fromkeys(runners, 0.0)
    tops: dict[str, list[np.ndarray]] = {name: [] for name in runners}
    for start, stop in tqdm(list(zip(bounds[:-1], bounds[1:], strict=True)), desc=desc,
                            file=sys.stderr, leave=False):
        for name, runner in runners.items():
            begin = time.perf_counter()
            tops[name].append(runner(int(start), int(stop)))
            seconds[name] += time.perf_counter() - begin
    ms = {name: 1e3 * s / num_queries for name, s in seconds.items()}
    return ms, {name: np.concatenate(t) for name, t in tops.items()}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python benchmarks/search_bench.py`."""
    parser = make_parser(__doc__, "python benchmarks/search_bench.py")
    parser.add_argument("--rows", type=int, default=1_000_000, help="database rows N")
    parser.add_argument("--dim", type=int, default=1024, help="sparse dimensions D")
    parser.add_argument("--nnz", type=float, default=32, help="mean non-zeros per row")
    parser.add_argument("--num_queries", dest="queries", type=int, default=1000, help="queries timed")
    parser.add_argument("--k", type=int, default=10, help="results per query")
    parser.add_argument("--num_threads", dest="threads", type=int, default=0,
                        help="engine threads (0: every core)")
    parser.add_argument("--skew", type=float, default=1.0,
                        help="Zipf exponent of the skewed case (0: skip it)")
    parser.add_argument("--dense_dim", type=int, default=512, help="dense baseline dimension")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="100,000 rows and 200 queries")
    parser.add_argument("--images_per_identity", dest="group", type=int, default=10,
                        help="images per identity")
    parser.add_argument("--swap", type=float, default=0.0,
                        help="identity data: probability that an image swaps a dimension of its "
                             "identity's support for a random one")
    parser.add_argument("--block_rows", type=int, default=128, help="rows per pruning block")
    parser.add_argument("--max_blocks", dest="budget", type=int, default=8,
                        help="blocks per query in approx mode")
    parser.add_argument("--only_modes", action="store_true",
                        help="only the search-mode table (identity-structured and uniform)")
    parser.add_argument("--only_batched", action="store_true",
                        help="only the batched-query table (identity-structured and uniform data)")
    parser.add_argument("--batches", default="8",
                        help="comma-separated query group sizes of the batched-query table")
    parser.add_argument("--milvus_rows", type=int, default=100_000,
                        help="rows of the Milvus Lite comparison (0: skip it; its inserts are slow)")
    parser.add_argument("--milvus_queries", type=int, default=100,
                        help="queries of the Milvus Lite comparison")
    parser.add_argument("--only_blocks", action="store_true",
                        help="only the block-size table (exhaustive, pruned and auto for each of "
                             "--block_sizes on identity groups, with --swap, and uniform data)")
    parser.add_argument("--block_sizes", default="32,64,128,256",
                        help="comma-separated rows per block of the block-size table")
    parser.add_argument("--only_mutable", action="store_true",
                        help="only the MutableIndex table (search with a delta and tombstones, "
                             "add, remove, compact, save, load)")
    parser.add_argument("--output", default=None,
                        help="also write the tables as a result file (JSON, with the command, "
                             "commit, machine and date), e.g. results/search.json")
    deprecated_alias(parser, "--queries", "--num_queries")
    deprecated_alias(parser, "--threads", "--num_threads")
    deprecated_alias(parser, "--dense-dim", "--dense_dim")
    deprecated_alias(parser, "--group", "--images_per_identity")
    deprecated_alias(parser, "--block-rows", "--block_rows")
    deprecated_alias(parser, "--budget", "--max_blocks")
    deprecated_alias(parser, "--only-modes", "--only_modes")
    deprecated_alias(parser, "--only-batched", "--only_batched")
    deprecated_alias(parser, "--milvus-rows", "--milvus_rows")
    deprecated_alias(parser, "--milvus-queries", "--milvus_queries")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the benchmark and prints its table.

    Args:
        argv: Arguments after the script name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    # The command the result file records: this script with the arguments it was given.
    args.command = command_line([__file__, *argv]) if argv is not None else None
    if args.quick:
        args.rows, args.queries = 100_000, 200
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = args.threads or cpus
    k, n, q = args.k, args.rows, args.queries
    rng = np.random.default_rng(args.seed)
    only = {"modes": args.only_modes, "batched": args.only_batched, "blocks": args.only_blocks,
            "mutable": args.only_mutable}
    if sum(only.values()) > 1:
        raise SystemExit(f"choose at most one of {', '.join('--only_' + o for o in only)}")
    sizes = (f"{n} rows x {args.dim} dims, {args.nnz:g} non-zeros per row, {q} queries, top-{k}, "
             f"{threads} threads of {cpus} cores")
    if args.only_modes:
        save(args, "Search modes: exhaustive, pruned, auto, approx; float32 and int8",
             run_modes(args, threads, rng),
             f"{sizes}; identity groups of {args.group} images (swap {args.swap:g}), blocks of "
             f"{args.block_rows}; recall@k against the exact float32 top-k, before re-scoring for the "
             "plain int8 rows")
        return
    if args.only_batched:
        save(args, "Batched queries against one query at a time", run_batched(args, threads, rng),
             f"{sizes}; probes of whole identities (groups of {args.group}) in identity or random order")
        return
    if args.only_blocks:
        save(args, "Exact search modes by pruning block size", run_blocks(args, threads, rng),
             f"{sizes}; identity groups of {args.group} images")
        return
    if args.only_mutable:
        save(args, "MutableIndex: search with a delta and tombstones, updates, compaction, files",
             run_mutable(args, threads, rng), f"{sizes}; uniform rows")
        return

    # Uniform case: the index (one thread, all threads), scipy.sparse and dense BLAS.
    log(f"generating the {n} x {args.dim} uniform sparse database ...")
    rates = dimension_rates(args.dim, args.nnz, 0.0)
    database = sparse_embeddings(n, rates, rng)
    queries = sparse_embeddings(q, rates, rng)
    expected = n * float(np.sum(rates**2))
    nnz_per_row = database.nnz / n
    log("building the index ...")
    index = SparseIndex.from_csr(database.indptr, database.indices, database.data, args.dim)
    build_seconds, index_bytes = index.stats["build_seconds"], index.nbytes
    bytes_per_nnz = index_bytes / index.nnz
    database_t = database.T.tocsr()
    del database
    log(f"generating the {n} x {args.dense_dim} dense float32 database ...")
    dense = rng.standard_normal((n, args.dense_dim), dtype=np.float32)
    dense_queries = rng.standard_normal((q, args.dense_dim), dtype=np.float32)
    postings_1: list[float] = []
    postings_all: list[float] = []
    runners = {
        "sparse_1": engine_runner(index, queries, k, 1, postings_1),
        "sparse": engine_runner(index, queries, k, threads, postings_all),
        "scipy": scipy_runner(queries, database_t, k, max(1, _SCIPY_SCORES // n)),
        "dense": dense_runner(dense_queries, dense, k, max(1, _DENSE_SCORES // n)),
    }
    log("timing, in interleaved rounds ...")
    ms, tops = time_interleaved(runners, q, "uniform")
    # A benchmark of wrong answers would be meaningless.
    for name in ("sparse_1", "scipy"):
        np.testing.assert_allclose(tops[name], tops["sparse"], rtol=1e-5, atol=1e-6)
    postings = sum(postings_all[1:]) / q  # [0] is the warm-up
    del index, database_t, queries, dense, dense_queries, runners

    table: list[tuple] = [
        ("sparse index, uniform", n, args.dim, nnz_per_row, 1, ms["sparse_1"], postings, expected),
        ("sparse index, uniform", n, args.dim, nnz_per_row, threads, ms["sparse"], postings,
         expected),
        ("scipy.sparse CSR matmul", n, args.dim, nnz_per_row, 1, ms["scipy"], None, None),
        (f"dense BLAS matmul, {args.dense_dim}-d", n, args.dense_dim, float(args.dense_dim), cpus,
         ms["dense"], None, None),
    ]
    result: dict[str, float | int] = {
        "rows": n, "dim": args.dim, "nnz_per_row": nnz_per_row, "queries": q, "k": k,
        "threads": threads, "cpus": cpus, "sparse_ms_1thread": ms["sparse_1"],
        "sparse_ms": ms["sparse"], "postings_per_query": postings, "expected_postings": expected,
        "scipy_ms": ms["scipy"], "dense_dim": args.dense_dim, "dense_ms": ms["dense"],
        "dense_over_sparse": ms["dense"] / ms["sparse"],
        "scipy_over_sparse": ms["scipy"] / ms["sparse"],
        "build_seconds": build_seconds, "index_bytes": index_bytes, "bytes_per_nnz": bytes_per_nnz,
    }

    # Skewed case: what non-uniform dimension popularity costs the index.
    if args.skew > 0:
        log(f"generating the skewed database (Zipf s={args.skew:g}) ...")
        rates = dimension_rates(args.dim, args.nnz, args.skew)
        database = sparse_embeddings(n, rates, rng)
        queries = sparse_embeddings(q, rates, rng)
        skew_expected = n * float(np.sum(rates**2))
        skew_nnz = database.nnz / n
        index = SparseIndex.from_csr(database.indptr, database.indices, database.data, args.dim)
        del database
        skew_postings: list[float] = []
        runners = {
            "sparse_1": engine_runner(index, queries, k, 1, []),
            "sparse": engine_runner(index, queries, k, threads, skew_postings),
        }
        skew_ms, skew_tops = time_interleaved(runners, q, "skewed")
        np.testing.assert_allclose(skew_tops["sparse_1"], skew_tops["sparse"], rtol=1e-6)
        skew_post = sum(skew_postings[1:]) / q
        name = f"sparse index, zipf s={args.skew:g}"
        table.append((name, n, args.dim, skew_nnz, 1, skew_ms["sparse_1"], skew_post,
                      skew_expected))
        table.append((name, n, args.dim, skew_nnz, threads, skew_ms["sparse"], skew_post,
                      skew_expected))
        result.update(skew=args.skew, skew_sparse_ms_1thread=skew_ms["sparse_1"],
                      skew_sparse_ms=skew_ms["sparse"], skew_postings_per_query=skew_post,
                      skew_expected_postings=skew_expected)

    header = (f"{'method':<28}{'rows':>9}{'dim':>6}{'nnz/row':>9}{'threads':>8}"
              f"{'ms/query':>10}{'postings/q':>12}{'expected':>12}{'vs sparse':>10}")
    print(header)
    print("-" * len(header))
    for name, rows, dim, nnz, used, ms_query, post, exp in table:
        post_text = f"{post:>12.0f}" if post is not None else f"{'':>12}"
        exp_text = f"{exp:>12.0f}" if exp is not None else f"{'':>12}"
        is_baseline = name.startswith(("scipy", "dense"))
        ratio = f"{ms_query / ms['sparse']:>9.1f}x" if is_baseline else f"{'':>10}"
        print(f"{name:<28}{rows:>9}{dim:>6}{nnz:>9.1f}{used:>8}{ms_query:>10.3f}"
              f"{post_text}{exp_text}{ratio}")
    print(f"index: built in {build_seconds:.2f} s, {index_bytes / 2**20:.1f} MiB, "
          f"{bytes_per_nnz:.2f} bytes per non-zero (target <= 8)")
    print(f"dense/sparse {result['dense_over_sparse']:.1f}x (target >= 20x), "
          f"scipy/sparse {result['scipy_over_sparse']:.1f}x (target >= 3x), "
          f"sparse at {threads} threads")
    print(json.dumps({key: round(v, 6) if isinstance(v, float) else v
                      for key, v in result.items()}))
    columns = [c.key for c in BASELINE_COLUMNS[:-1]]
    tables: Tables = {"baselines": (BASELINE_COLUMNS, [
        dict(zip(columns, row, strict=True),
             vs_sparse=row[5] / ms["sparse"] if row[0].startswith(("scipy", "dense")) else None)
        for row in table])}
    print()
    tables.update(run_modes(args, threads, rng))
    print()
    tables.update(run_batched(args, threads, rng))
    if args.milvus_rows > 0:
        print()
        tables.update(run_milvus(args, rng))
    save(args, "Sparse index against scipy.sparse and dense BLAS; search modes; batched queries; "
         "Milvus Lite", tables,
         f"{sizes}; skewed case Zipf s={args.skew:g}; dense baseline {args.dense_dim}-d; identity "
         f"groups of {args.group} images, blocks of {args.block_rows}; batches {args.batches}; "
         f"Milvus Lite on {args.milvus_rows} uniform rows, {args.milvus_queries} queries")


def save(args: argparse.Namespace, title: str, tables: Tables, notes: str) -> None:
    """Writes the tables to `--output`, when given."""
    if args.output:
        path = write_result(args.output, title, tables, command=args.command, notes=notes)
        log(f"wrote {path}")


def run_milvus(args: argparse.Namespace, rng: np.random.Generator) -> Tables:
    """Milvus Lite's sparse inverted index against this index on the same uniform rows.

    Milvus Lite is Milvus's embedded edition, in the process: it is here to show
    that a gallery moves to a Milvus cluster unchanged, not to race the index.
    """
    try:
        from sparse_embed.search.milvus import benchmark
    except ImportError as e:
        print(f"Milvus Lite row skipped: {e} (pip install -e \".[milvus]\")")
        return {}

    rates = dimension_rates(args.dim, args.nnz, 0.0)
    log(f"generating the {args.milvus_rows} x {args.dim} database for Milvus Lite ...")
    database = sparse_embeddings(args.milvus_rows, rates, rng)
    queries = sparse_embeddings(args.milvus_queries, rates, rng)
    with tempfile.TemporaryDirectory() as tmp:
        row = benchmark(database, queries, args.k, uri=str(Path(tmp) / "milvus.db"))
    header = f"{'method':<28}{'rows':>9}{'queries':>9}{'insert s':>10}{'ms/query':>10}{'vs index':>10}"
    print(header)
    print("-" * len(header))
    print(f"{'sparse index, 1 thread':<28}{row['rows']:>9}{row['queries']:>9}{'':>10}"
          f"{row['index_ms_per_query']:>10.3f}")
    print(f"{'Milvus Lite sparse IP index':<28}{row['rows']:>9}{row['queries']:>9}"
          f"{row['insert_seconds']:>10.1f}{row['ms_per_query']:>10.1f}"
          f"{row['ms_per_query'] / row['index_ms_per_query']:>9.0f}x")
    print(f"top-{args.k} scores agree to {row['max_score_difference']:.1e}")
    print(json.dumps(row))
    return {"milvus": (MILVUS_COLUMNS, [
        {"method": "sparse index, 1 thread", "rows": row["rows"], "queries": row["queries"],
         "insert_seconds": None, "ms": row["index_ms_per_query"], "vs_index": None,
         "max_score_difference": None},
        {"method": "Milvus Lite sparse IP index", "rows": row["rows"], "queries": row["queries"],
         "insert_seconds": row["insert_seconds"], "ms": row["ms_per_query"],
         "vs_index": row["ms_per_query"] / row["index_ms_per_query"],
         "max_score_difference": row["max_score_difference"]}])}


def run_blocks(args: argparse.Namespace, threads: int, rng: np.random.Generator) -> Tables:
    """The block-size table: exhaustive, pruned and auto (identical results, asserted) for each
    block size on identity groups sharing their support, identity groups swapping part of it,
    and uniform rows."""
    swap = args.swap or 0.1
    cases = [("identity groups", 0.0), (f"identity groups, swap {swap:g}", swap), ("uniform", None)]
    rows = []
    for name, case_swap in cases:
        log(f"generating the {args.rows} x {args.dim} database: {name} ...")
        if case_swap is None:
            rates = dimension_rates(args.dim, args.nnz, 0.0)
            database = sparse_embeddings(args.rows, rates, rng)
            queries = sparse_embeddings(args.queries, rates, rng)
        else:
            database, _ = identity_embeddings(args.rows, args.dim, int(args.nnz), args.group, rng,
                                              case_swap)
            queries = database[rng.choice(args.rows, args.queries)]
            queries = queries.multiply(rng.uniform(0.8, 1.2, (args.queries, 1))).tocsr()
            queries.data *= rng.uniform(0.9, 1.1, queries.nnz).astype(np.float32)
            queries = queries.astype(np.float32)
        for block_rows in (int(b) for b in args.block_sizes.split(",")):
            index = SparseIndex.from_csr(database.indptr, database.indices, database.data, args.dim,
                                         block_rows=block_rows)
            counters = {m: {"blocks": [], "scored": [], "ids": []} for m in ("exhaustive", "pruned", "auto")}
            runners = {m: modes_runner(index, queries, args.k, threads, m, None, counters[m])
                       for m in counters}
            ms, tops = time_interleaved(runners, args.queries, f"{name}, blocks of {block_rows}")
            for m in ("pruned", "auto"):
                np.testing.assert_array_equal(tops[m], tops["exhaustive"])
            st = index.stats
            rows.append({"data": name, "block_rows": block_rows, **ms,
                         "blocks": sum(counters["pruned"]["blocks"][1:]) / args.queries,
                         "bytes_per_nnz": (st["bytes"] + st["block_bytes"]) / st["nnz"]})
            del index
    header = (f"{'data':<28}{'block rows':>11}{'exhaustive':>12}{'pruned':>10}{'auto':>10}"
              f"{'blocks/q':>10}{'B/nnz':>8}")
    print(f"exact modes by block size: {args.rows} rows, {args.queries} queries, top-{args.k}, "
          f"{threads} threads (ms/query)")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['data']:<28}{r['block_rows']:>11}{r['exhaustive']:>12.3f}{r['pruned']:>10.3f}"
              f"{r['auto']:>10.3f}{r['blocks']:>10.1f}{r['bytes_per_nnz']:>8.2f}")
    return {"blocks": (BLOCK_COLUMNS, rows)}


def median_ms(action: Callable[[int], object], repeats: int) -> float:
    """Median wall-clock milliseconds of action(i) for i in range(repeats)."""
    times = []
    for i in range(repeats):
        begin = time.perf_counter()
        action(i)
        times.append(time.perf_counter() - begin)
    return 1e3 * float(np.median(times))


def run_mutable(args: argparse.Namespace, threads: int, rng: np.random.Generator) -> Tables:
    """The MutableIndex table on uniform rows: search over a base alone, with a delta, with
    tombstones; the delta alone against NumPy; add, remove, compact, save and load."""
    n, k, q = args.rows, args.k, args.queries
    deltas = (1_000, 10_000)
    log(f"generating the {n} x {args.dim} uniform database and {sum(deltas)} more rows ...")
    rates = dimension_rates(args.dim, args.nnz, 0.0)
    database = sparse_embeddings(n, rates, rng)
    extra = {d: sparse_embeddings(d, rates, rng) for d in deltas}
    queries = sparse_embeddings(q, rates, rng)
    base = SparseIndex.from_csr(database.indptr, database.indices, database.data, args.dim)
    galleries = {"base alone (SparseIndex)": base}
    for d in deltas:
        galleries[f"MutableIndex, delta of {d:,} rows"] = mutable = MutableIndex.from_index(base)
        mutable.add(extra[d])
    removed = rng.choice(n, deltas[0], replace=False)
    name = f"MutableIndex, delta of {deltas[0]:,} rows and {len(removed):,} tombstones"
    galleries[name] = mutable = MutableIndex.from_index(base)
    mutable.add(extra[deltas[0]])
    mutable.remove(removed)

    def searcher(index: SparseIndex | MutableIndex, batch: scipy.sparse.csr_matrix) -> Runner:
        return lambda a, b: index.search(batch[a:b], k, num_threads=threads)[1]

    ms, _ = time_interleaved({g: searcher(i, queries) for g, i in galleries.items()}, q, "galleries")
    rows = [{"operation": f"search: {g}", "ms": ms[g], "per": "query"} for g in galleries]
    runners = {}
    for d in deltas:
        delta = extra[d]
        runners[f"search: delta of {d:,} rows alone, SparseIndex"] = searcher(
            SparseIndex.from_csr(delta.indptr, delta.indices, delta.data, args.dim), queries)
        runners[f"search: delta of {d:,} rows alone, NumPy dense matmul"] = dense_runner(
            queries.toarray(), delta.toarray(), k, max(1, _DENSE_SCORES // d))
    ms, _ = time_interleaved(runners, q, "delta alone")
    rows += [{"operation": r, "ms": ms[r], "per": "query"} for r in runners]
    one = sparse_embeddings(1, rates, rng)
    for d in deltas:
        index = galleries[f"MutableIndex, delta of {d:,} rows"]
        added = []
        rows.append({"operation": f"add one row to a delta of {d:,} rows",
                     "ms": median_ms(lambda i, index=index, added=added: added.append(index.add(one)[0]), 5),
                     "per": "call"})
        rows.append({"operation": f"remove one row from a delta of {d:,} rows",
                     "ms": median_ms(lambda i, index=index, added=added: index.remove([added[i]]), 5),
                     "per": "call"})
    index = galleries[f"MutableIndex, delta of {deltas[0]:,} rows"]
    live = np.setdiff1d(np.arange(n), removed)
    rows.append({"operation": "remove one base row (a tombstone)",
                 "ms": median_ms(lambda i: index.remove([live[i]]), 20), "per": "call"})
    mutable = galleries[name]
    with tempfile.TemporaryDirectory() as tmp:
        mutable.save(Path(tmp) / "gallery.mut")
        mutable.add(one)
        rows.append({"operation": "save, base unchanged (not rewritten)",
                     "ms": median_ms(lambda i: mutable.save(Path(tmp) / "gallery.mut"), 3), "per": "call"})
        rows.append({"operation": "load",
                     "ms": median_ms(lambda i: MutableIndex.load(Path(tmp) / "gallery.mut"), 3),
                     "per": "call"})
    begin = time.perf_counter()
    mutable.compact()
    rows.append({"operation": f"compact {len(mutable):,} live rows", "ms":
                 1e3 * (time.perf_counter() - begin), "per": "call"})
    print(f"MutableIndex: {n} base rows x {args.dim} dims, {q} queries, top-{k}, {threads} threads")
    for r in rows:
        print(f"{r['operation']:<72}{r['ms']:>10.3f} ms per {r['per']}")
    return {"mutable": (MUTABLE_COLUMNS, rows)}


if __name__ == "__main__":
    main()
