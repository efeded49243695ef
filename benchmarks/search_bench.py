"""Search speed side by side: the sparse inverted index, scipy.sparse and dense BLAS.

    python benchmarks/search_bench.py            # 1,000,000 x 1024, ~32 non-zeros/row, top-10
    python benchmarks/search_bench.py --quick    # 100,000 rows, 200 queries: seconds
    python benchmarks/search_bench.py --rows 2000000 --nnz 16 --skew 1.2 --threads 8

Databases are generated at MegaFace scale: row i is non-zero in dimension d
with probability p_d, independently (so a dimension's postings are a
Bernoulli process, drawn with geometric gaps in O(nnz)); sum_d p_d is the
target mean non-zeros per row. Uniform popularity sets p_d = nnz / D; the
skewed case makes p_d Zipf-like (p_d ~ rank^-s, capped at 1), the
non-uniformity the FLOPs regularizer penalises: a query then touches
N * sum_d p_d^2 postings on average instead of N * nnz^2 / D. Queries come
from the same generator.

Prints one table and one JSON line (numbers for the README; none is asserted).
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import scipy.sparse
from tqdm import tqdm

from sparse_embed.search import SparseIndex

# Scores a baseline holds at once (queries x rows), to bound its memory: dense
# float32 scores, and scipy's sparse products (which also hold indices and
# temporaries).
_DENSE_SCORES = 1 << 27
_SCIPY_SCORES = 1 << 25


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


def time_sparse(index: SparseIndex, queries: scipy.sparse.csr_matrix, k: int, threads: int
                ) -> tuple[float, float, np.ndarray]:
    """(ms/query wall, postings/query, scores) of the index on all queries."""
    index.search(queries[: min(10, queries.shape[0])], k, num_threads=threads)  # warm-up
    start = time.perf_counter()
    _, scores = index.search(queries, k, num_threads=threads)
    elapsed = time.perf_counter() - start
    return 1e3 * elapsed / queries.shape[0], index.stats["postings_per_query"], scores


def time_batched(name: str, num_queries: int, batch: int,
                 score_batch: Callable[[int, int], list[np.ndarray]], k: int
                 ) -> tuple[float, np.ndarray]:
    """(ms/query, sorted top-k scores) of a baseline that scores query batches.

    Args:
        name: Shown in the progress bar.
        num_queries: Queries to run.
        batch: Queries per batch.
        score_batch: (start, stop) -> one score vector per query of the batch
            (for a sparse product: the scores of the rows it touched).
        k: Results per query.
    """
    top = np.zeros((num_queries, k), np.float32)
    start_time = time.perf_counter()
    for start in tqdm(range(0, num_queries, batch), desc=name, file=sys.stderr, leave=False):
        stop = min(num_queries, start + batch)
        for offset, scores in enumerate(score_batch(start, stop)):
            if len(scores) < k:  # untouched rows of a sparse product score 0
                scores = np.concatenate([scores, np.zeros(k - len(scores), scores.dtype)])
            best = scores[np.argpartition(scores, len(scores) - k)[-k:]]
            top[start + offset] = np.sort(best)[::-1]
    elapsed = time.perf_counter() - start_time
    return 1e3 * elapsed / num_queries, top


def sparse_product_scores(queries: scipy.sparse.csr_matrix, database_t: scipy.sparse.csr_matrix
                          ) -> Callable[[int, int], list[np.ndarray]]:
    """Batch scorer of the scipy baseline: CSR queries @ CSR database.T, touched rows only."""

    def score(start: int, stop: int) -> list[np.ndarray]:
        product = (queries[start:stop] @ database_t).tocsr()
        return [product.data[product.indptr[i]:product.indptr[i + 1]] for i in range(stop - start)]

    return score


def dense_product_scores(queries: np.ndarray, database: np.ndarray
                         ) -> Callable[[int, int], list[np.ndarray]]:
    """Batch scorer of the dense baseline: one BLAS matmul per batch."""

    def score(start: int, stop: int) -> list[np.ndarray]:
        return list(queries[start:stop] @ database.T)

    return score


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="database rows N")
    parser.add_argument("--dim", type=int, default=1024, help="sparse dimensions D")
    parser.add_argument("--nnz", type=float, default=32, help="mean non-zeros per row")
    parser.add_argument("--queries", type=int, default=1000, help="queries timed")
    parser.add_argument("--k", type=int, default=10, help="results per query")
    parser.add_argument("--threads", type=int, default=0, help="engine threads (0: every core)")
    parser.add_argument("--skew", type=float, default=1.0,
                        help="Zipf exponent of the skewed case (0: skip it)")
    parser.add_argument("--dense-dim", type=int, default=512, help="dense baseline dimension")
    parser.add_argument("--baseline-queries", type=int, default=None,
                        help="queries timed for scipy and dense (default: --queries)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="100,000 rows and 200 queries")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.queries = 100_000, 200
    threads = args.threads or os.cpu_count() or 1
    baseline_queries = min(args.baseline_queries or args.queries, args.queries)
    k = args.k
    rng = np.random.default_rng(args.seed)
    rows_out: list[tuple] = []
    result: dict[str, float | int | str] = {
        "rows": args.rows, "dim": args.dim, "nnz_per_row": args.nnz, "queries": args.queries,
        "k": k, "threads": threads, "cpus": os.cpu_count() or 1,
    }

    # Uniform sparse case: engine (1 thread, all threads) and scipy.sparse.
    log(f"generating {args.rows} x {args.dim} uniform sparse database ...")
    rates = dimension_rates(args.dim, args.nnz, 0.0)
    database = sparse_embeddings(args.rows, rates, rng)
    queries = sparse_embeddings(args.queries, rates, rng)
    expected = args.rows * float(np.sum(rates**2))
    log("building the index ...")
    index = SparseIndex.from_csr(database.indptr, database.indices, database.data, args.dim)
    build_seconds = index.stats["build_seconds"]
    bytes_per_nnz = index.nbytes / index.nnz
    real_nnz = database.nnz / args.rows
    log("timing the sparse index ...")
    ms_1, postings, _ = time_sparse(index, queries, k, 1)
    ms_all, _, engine_top = time_sparse(index, queries, k, threads)
    name = "sparse index, uniform"
    rows_out.append((name, args.rows, args.dim, real_nnz, 1, ms_1, postings, expected))
    rows_out.append((name, args.rows, args.dim, real_nnz, threads, ms_all, postings, expected))
    result.update(sparse_ms_1thread=ms_1, sparse_ms=ms_all, postings_per_query=postings,
                  expected_postings=expected, build_seconds=build_seconds,
                  bytes_per_nnz=bytes_per_nnz, index_bytes=index.nbytes)
    del index

    log("timing scipy.sparse (queries @ database.T, CSR x CSR) ...")
    database_t = database.T.tocsr()
    sub = queries[:baseline_queries]

    scipy_batch = max(1, _SCIPY_SCORES // args.rows)
    scipy_ms, scipy_top = time_batched("scipy", baseline_queries, scipy_batch,
                                       sparse_product_scores(sub, database_t), k)
    # A benchmark of wrong answers would be meaningless: the engine's top-k
    # scores must be scipy's.
    np.testing.assert_allclose(engine_top[:baseline_queries], scipy_top, rtol=1e-5, atol=1e-6)
    rows_out.append(("scipy.sparse CSR matmul", args.rows, args.dim, real_nnz, 1, scipy_ms,
                     None, None))
    result.update(scipy_ms=scipy_ms)
    del database, database_t, queries, sub

    # Skewed sparse case.
    if args.skew > 0:
        log(f"generating the skewed database (Zipf s={args.skew}) ...")
        rates = dimension_rates(args.dim, args.nnz, args.skew)
        database = sparse_embeddings(args.rows, rates, rng)
        queries = sparse_embeddings(args.queries, rates, rng)
        expected_skew = args.rows * float(np.sum(rates**2))
        index = SparseIndex.from_csr(database.indptr, database.indices, database.data, args.dim)
        skew_nnz = database.nnz / args.rows
        del database
        log("timing the sparse index on the skewed database ...")
        skew_ms_1, skew_postings, _ = time_sparse(index, queries, k, 1)
        skew_ms_all, _, _ = time_sparse(index, queries, k, threads)
        name = f"sparse index, zipf s={args.skew:g}"
        rows_out.append((name, args.rows, args.dim, skew_nnz, 1, skew_ms_1, skew_postings,
                         expected_skew))
        rows_out.append((name, args.rows, args.dim, skew_nnz, threads, skew_ms_all, skew_postings,
                         expected_skew))
        result.update(skew=args.skew, skew_sparse_ms_1thread=skew_ms_1, skew_sparse_ms=skew_ms_all,
                      skew_postings_per_query=skew_postings, skew_expected_postings=expected_skew)
        del index, queries

    # Dense brute force with BLAS.
    log(f"generating {args.rows} x {args.dense_dim} dense float32 database ...")
    dense = rng.standard_normal((args.rows, args.dense_dim), dtype=np.float32)
    dense_queries = rng.standard_normal((baseline_queries, args.dense_dim), dtype=np.float32)
    log("timing dense BLAS (batched matmul + argpartition) ...")

    dense_batch = max(1, _DENSE_SCORES // args.rows)
    dense_ms, _ = time_batched("dense", baseline_queries, dense_batch,
                               dense_product_scores(dense_queries, dense), k)
    rows_out.append((f"dense BLAS matmul, {args.dense_dim}-d", args.rows, args.dense_dim,
                     float(args.dense_dim), os.cpu_count() or 1, dense_ms, None, None))
    result.update(dense_dim=args.dense_dim, dense_ms=dense_ms,
                  dense_over_sparse=dense_ms / ms_all, scipy_over_sparse=scipy_ms / ms_all)
    del dense

    header = (f"{'method':<28}{'rows':>9}{'dim':>6}{'nnz/row':>9}{'threads':>8}"
              f"{'ms/query':>10}{'postings/q':>12}{'expected':>12}{'vs sparse':>10}")
    print(header)
    print("-" * len(header))
    for name, rows, dim, nnz, used, ms, post, exp in rows_out:
        post_text = f"{post:>12.0f}" if post is not None else f"{'':>12}"
        exp_text = f"{exp:>12.0f}" if exp is not None else f"{'':>12}"
        ratio = f"{ms / ms_all:>9.1f}x" if name.startswith(("scipy", "dense")) else f"{'':>10}"
        print(f"{name:<28}{rows:>9}{dim:>6}{nnz:>9.1f}{used:>8}{ms:>10.3f}"
              f"{post_text}{exp_text}{ratio}")
    print(f"index: built in {build_seconds:.2f} s, {result['index_bytes'] / 2**20:.1f} MiB, "
          f"{bytes_per_nnz:.2f} bytes per non-zero (target <= 8)")
    print(f"dense/sparse {dense_ms / ms_all:.1f}x (target >= 20x), "
          f"scipy/sparse {scipy_ms / ms_all:.1f}x (target >= 3x); "
          f"sparse at {threads} threads, {baseline_queries} baseline queries")
    print(json.dumps({key: round(v, 6) if isinstance(v, float) else v
                      for key, v in result.items()}))


if __name__ == "__main__":
    main()
