"""Batched queries (groups accumulated together) against one query at a time and the NumPy oracle.

Batching only changes how the exhaustive accumulation reads postings, never a
query's arithmetic, so its results must equal batch=1 bit for bit on any
values: random float32 data checks that (where summation order would show).
On values that are multiples of 1/8 every score is exact in float32, so ids
and scores must also equal `brute_force_search`, ties included. A query is
only accumulated by blocks (the batched path) when its postings reach
rows / 64; the cases are sized so that they do, and one gallery spans two
65536-row segment blocks, so a group's rows are cut into several spans.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse

from sparse_embed.search.index import MAX_BATCH, SparseIndex, brute_force_search

pytestmark = pytest.mark.unit

BATCHES = (1, 2, 7)


def exact_matrix(rng: np.random.Generator, rows: int, cols: int, density: float,
                 negative: bool = False) -> np.ndarray:
    """Sparse float32 [rows, cols] with values in {1/8, ..., 2} (or +-), exact in float32."""
    low = -16 if negative else 1
    values = rng.integers(low, 17, size=(rows, cols)).astype(np.float32) / 8
    return np.where(rng.random((rows, cols)) < density, values, 0).astype(np.float32)


def identity_gallery(rng: np.random.Generator, groups: int, per_group: int, dim: int, nnz: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Rows in identity groups of near-duplicates (shared support, values +-1/8), shuffled, and
    probes: every row of the first identities, noisier, one identity after the other."""
    base = np.zeros((groups, dim), np.float32)
    for g in range(groups):
        base[g, rng.choice(dim, nnz, replace=False)] = rng.integers(2, 17, nnz) / 8
    rows = np.repeat(base, per_group, axis=0)
    noise = rng.integers(-1, 2, rows.shape) / 8
    rows = np.where(rows != 0, np.maximum(rows + noise, 1 / 8), 0).astype(np.float32)
    probes = np.where(rows[:6 * per_group] != 0,
                      rows[:6 * per_group] + rng.integers(-1, 2, (6 * per_group, dim)) / 8, 0)
    return rows[rng.permutation(len(rows))], probes.astype(np.float32)


def assert_same(actual: tuple[np.ndarray, np.ndarray], expected: tuple[np.ndarray, np.ndarray]
                ) -> None:
    np.testing.assert_array_equal(actual[0], expected[0])
    np.testing.assert_array_equal(actual[1], expected[1])


def check_batches(index: SparseIndex, queries, expected: tuple[np.ndarray, np.ndarray], k: int,
                  modes: tuple[str, ...] = ("exhaustive", "auto"), **kwargs) -> None:
    """Every group size, grouped by support or not, on 1 and 2 threads, equals `expected`."""
    for mode in modes:
        for batch in BATCHES:
            for threads in (1, 2):
                for by_support in (True, False):
                    assert_same(index.search(queries, k, mode=mode, batch=batch, num_threads=threads,
                                             group_by_support=by_support, **kwargs), expected)


@pytest.mark.parametrize("negative", [False, True])
def test_random_exact_values_match_oracle(negative: bool) -> None:
    rng = np.random.default_rng(1 if negative else 0)
    db = exact_matrix(rng, 900, 48, 0.3, negative)
    queries = exact_matrix(rng, 23, 48, 0.4, negative)  # 23: not a multiple of 2 or 7
    index = SparseIndex.from_dense(db)
    expected = brute_force_search(db, queries, 10)
    check_batches(index, queries, expected, 10)
    check_batches(index, scipy.sparse.csr_matrix(queries), expected, 10)


def test_float_values_bit_identical_to_one_at_a_time() -> None:
    """Random float32 values: summation order shows in the last bits, so equality with batch=1
    means every query kept its own order."""
    rng = np.random.default_rng(2)
    db = scipy.sparse.random(70_000, 64, density=0.15, random_state=3, dtype=np.float32,
                             format="csr")
    db.data -= 0.3  # negative values too
    queries = scipy.sparse.random(15, 64, density=0.3, random_state=4, dtype=np.float32,
                                  format="csr")
    index = SparseIndex.from_csr(db.indptr, db.indices, db.data, 64)
    expected = index.search(queries, 12, mode="exhaustive", batch=1)
    assert index.stats["blocks"] > 1
    check_batches(index, queries, expected, 12)
    dense_db = rng.standard_normal((70_000, 8), dtype=np.float32)
    dense_q = rng.standard_normal((15, 8), dtype=np.float32)
    reranked = index.search(queries, 5, mode="exhaustive", rerank=(dense_db, dense_q), rerank_k=40)
    check_batches(index, queries, reranked, 5, rerank=(dense_db, dense_q), rerank_k=40)
    for batch in (64, MAX_BATCH):  # spans of a few thousand rows
        assert_same(index.search(queries, 12, mode="exhaustive", batch=batch), expected)
    # CSR queries whose indices decrease or repeat are summed in their own order: alone.
    indices = np.concatenate([queries.indices[a:b][::-1] for a, b in
                              zip(queries.indptr[:-1], queries.indptr[1:], strict=True)])
    values = np.concatenate([queries.data[a:b][::-1] for a, b in
                             zip(queries.indptr[:-1], queries.indptr[1:], strict=True)])
    indices[queries.indptr[1] - 1] = indices[0]  # row 0 repeats a dimension
    unsorted = (queries.indptr.astype(np.int64), indices.astype(np.int32), values)
    expected = index.search(unsorted, 12, mode="exhaustive", batch=1)
    check_batches(index, unsorted, expected, 12)


def test_adversarial() -> None:
    """Ties, empty rows, all-zero queries, k > N, a threshold above every score."""
    rng = np.random.default_rng(5)
    db = np.zeros((300, 16), np.float32)
    db[:100, :4] = 0.5  # 100 tied rows
    db[100:250] = exact_matrix(rng, 150, 16, 0.5, negative=True)  # rows 250..299 stay empty
    queries = exact_matrix(rng, 9, 16, 0.6, negative=True)
    queries[0, :4] = 1.0
    queries[3] = 0.0  # all-zero query
    queries[6] = -queries[5]
    index = SparseIndex.from_dense(db)
    for k, threshold in ((5, None), (400, None), (7, 0.0), (10, 100.0), (20, -0.5)):
        expected = brute_force_search(db, queries, k, threshold=threshold)
        check_batches(index, queries, expected, k, threshold=threshold)


def test_identity_structured_probes() -> None:
    rng = np.random.default_rng(6)
    db, probes = identity_gallery(rng, 60, 10, 128, 16)
    index = SparseIndex.from_dense(db)
    expected = brute_force_search(db, probes, 10)
    check_batches(index, probes, expected, 10, modes=("exhaustive", "auto", "pruned"))
    shuffled = probes[rng.permutation(len(probes))]
    check_batches(index, shuffled, brute_force_search(db, shuffled, 10), 10)
    rerank = (rng.integers(-8, 9, (len(db), 6)).astype(np.float32) / 8,
              rng.integers(-8, 9, (len(probes), 6)).astype(np.float32) / 8)
    expected = brute_force_search(db, probes, 10, rerank=rerank, rerank_k=30)
    check_batches(index, probes, expected, 10, rerank=rerank, rerank_k=30)


@pytest.mark.parametrize("batch", [0, -1, MAX_BATCH + 1, 2.5, True])
def test_bad_batch(batch) -> None:
    index = SparseIndex.from_dense(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match="batch must be an integer in"):
        index.search(np.eye(4, dtype=np.float32), 2, batch=batch)


def test_int8_index_batched_equals_one_at_a_time() -> None:
    """On int8 postings (codes looked up in per-term product tables) batching changes nothing
    either, before and after the exact re-scoring from the float rows."""
    db = scipy.sparse.random(20_000, 48, density=0.2, random_state=7, dtype=np.float32,
                             format="csr")
    db.data -= 0.2  # negative values: int8 codes, not uint8
    queries = scipy.sparse.random(17, 48, density=0.3, random_state=8, dtype=np.float32,
                                  format="csr")
    index = SparseIndex.from_csr(db.indptr, db.indices, db.data, 48, value_type="int8",
                                 keep_float=True)
    check_batches(index, queries, index.search(queries, 10, mode="exhaustive", batch=1), 10)
    expected = index.search(queries, 10, mode="exhaustive", batch=1, rescore_k=40)
    check_batches(index, queries, expected, 10, rescore_k=40)
    float_index = SparseIndex.from_csr(db.indptr, db.indices, db.data, 48)
    np.testing.assert_array_equal(expected[1], float_index.search(queries, 10)[1])


def test_int8_exact_rescoring_batched() -> None:
    """rescore_exact in groups: each query's rows within twice the quantization error bound of
    its k-th quantized score are collected while the group is accumulated, so the results are
    batch=1's and the float32 index's (ids, scores, ties among duplicated rows), with or without
    a threshold; rescore_k's re-scored top-k and its certificates equal batch=1's too."""
    rng = np.random.default_rng(9)
    db = scipy.sparse.random(30_000, 40, density=0.2, random_state=10, dtype=np.float32,
                             format="csr")
    db.data = rng.uniform(-0.5, 2.0, db.nnz).astype(np.float32)  # moved by quantization
    db = scipy.sparse.vstack([db, db[:500]]).tocsr()  # exact duplicates: float ties
    queries = db[rng.choice(db.shape[0], 13)].tocsr()
    queries.data *= rng.uniform(0.8, 1.2, queries.nnz).astype(np.float32)
    index = SparseIndex.from_csr(db.indptr, db.indices, db.data, 40, value_type="int8",
                                 keep_float=True)
    float_index = SparseIndex.from_csr(db.indptr, db.indices, db.data, 40)
    for threshold in (None, 1.5):
        expected = float_index.search(queries, 10, mode="exhaustive", threshold=threshold)
        one = index.search(queries, 10, mode="exhaustive", threshold=threshold, rescore_exact=True)
        assert_same(one, expected)
        check_batches(index, queries, expected, 10, threshold=threshold, rescore_exact=True)
    expected = index.search(queries, 10, mode="exhaustive", batch=1, rescore_k=12)
    certified = index.stats["certified"].copy()
    assert 0 < certified.sum() < len(certified)  # the bound proves some top-k, not all
    for batch in BATCHES[1:]:
        assert_same(index.search(queries, 10, mode="exhaustive", batch=batch, rescore_k=12),
                    expected)
        np.testing.assert_array_equal(index.stats["certified"], certified)
