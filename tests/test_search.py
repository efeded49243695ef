"""The C++ inverted index against the NumPy brute-force oracle.

Most inputs are multiples of 1/8 in [-2, 2]: every product and partial sum is
exactly representable in float32, so scores are exact whatever the summation
order and ids must match the oracle exactly, ties included.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.sparse

from sparse_embed.errors import DataError
from sparse_embed.search import (
    DEFAULT_RERANK_K,
    SparseIndex,
    brute_force_search,
    read_bin,
    write_bin,
)

pytestmark = pytest.mark.unit


def exact_matrix(rng: np.random.Generator, rows: int, cols: int, density: float,
                 negative: bool = False) -> np.ndarray:
    """Sparse float32 [rows, cols] with values in {1/8, ..., 2} (or +-), exact in float32."""
    low = -16 if negative else 1
    values = rng.integers(low, 17, size=(rows, cols)).astype(np.float32) / 8
    return np.where(rng.random((rows, cols)) < density, values, 0).astype(np.float32)


def assert_same(actual: tuple[np.ndarray, np.ndarray], expected: tuple[np.ndarray, np.ndarray]
                ) -> None:
    np.testing.assert_array_equal(actual[0], expected[0])
    np.testing.assert_array_equal(actual[1], expected[1])
    assert actual[0].dtype == np.int64 and actual[1].dtype == np.float32


@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("threshold", [None, 0.0, -0.5, 1.0])
@pytest.mark.parametrize("k", [1, 7, 64])
def test_exact_inputs_match_oracle(negative: bool, threshold: float | None, k: int) -> None:
    rng = np.random.default_rng(0)
    db = exact_matrix(rng, 300, 24, 0.15, negative)
    queries = exact_matrix(rng, 40, 24, 0.2, negative)
    index = SparseIndex.from_dense(db)
    expected = brute_force_search(db, queries, k, threshold=threshold)
    assert_same(index.search(queries, k, threshold=threshold), expected)


def test_query_formats_agree() -> None:
    """Dense, scipy.sparse (CSR and COO) and (indptr, indices, values) queries give one answer."""
    rng = np.random.default_rng(1)
    db = exact_matrix(rng, 200, 16, 0.2, negative=True)
    queries = exact_matrix(rng, 30, 16, 0.3, negative=True)
    index = SparseIndex.from_dense(db)
    expected = brute_force_search(db, queries, 5)
    csr = scipy.sparse.csr_matrix(queries)
    for form in (queries, queries.astype(np.float64), csr, csr.tocoo(),
                 (csr.indptr, csr.indices, csr.data)):
        assert_same(index.search(form, 5), expected)
    assert_same(brute_force_search(db, (csr.indptr, csr.indices, csr.data), 5), expected)


def test_database_formats_agree() -> None:
    rng = np.random.default_rng(2)
    db = exact_matrix(rng, 150, 20, 0.2)
    queries = exact_matrix(rng, 10, 20, 0.3)
    csr = scipy.sparse.csr_matrix(db)
    expected = SparseIndex.from_dense(db).search(queries, 4)
    assert_same(SparseIndex.from_csr(csr.indptr, csr.indices, csr.data, 20).search(queries, 4),
                expected)
    assert_same(brute_force_search(csr, queries, 4), expected)


def test_random_float_inputs_within_tolerance() -> None:
    """Continuous values: scores match to float tolerance and every id is a true top-k row."""
    rng = np.random.default_rng(3)
    db = np.where(rng.random((500, 64)) < 0.1, rng.standard_normal((500, 64)), 0).astype(np.float32)
    queries = np.where(rng.random((50, 64)) < 0.2, rng.standard_normal((50, 64)), 0)
    queries = queries.astype(np.float32)
    index = SparseIndex.from_dense(db)
    ids, scores = index.search(queries, 10, threshold=0.1)
    oracle_ids, oracle_scores = brute_force_search(db, queries, 10, threshold=0.1)
    np.testing.assert_allclose(scores, oracle_scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ids == -1, oracle_ids == -1)
    true = queries.astype(np.float64) @ db.T.astype(np.float64)
    for q in range(len(queries)):
        valid = ids[q][ids[q] >= 0]
        assert len(set(valid.tolist())) == len(valid)
        np.testing.assert_allclose(true[q, valid], scores[q, :len(valid)], rtol=1e-5, atol=1e-5)


def test_zero_threshold_drops_small_entries() -> None:
    db = np.array([[0.5, 0.05, -0.05], [0.0, -0.25, 0.125]], np.float32)
    index = SparseIndex.from_dense(db, zero_threshold=0.1)
    assert index.nnz == 3
    kept = np.where(np.abs(db) > 0.1, db, 0)
    queries = np.ones((1, 3), np.float32)
    assert_same(index.search(queries, 2), brute_force_search(kept, queries, 2))


def test_empty_rows_and_all_zero_queries() -> None:
    """An all-zero query scores 0 everywhere: with no threshold the lowest ids come first."""
    rng = np.random.default_rng(4)
    db = exact_matrix(rng, 50, 8, 0.3)
    db[::3] = 0
    queries = np.zeros((3, 8), np.float32)
    index = SparseIndex.from_dense(db)
    ids, scores = index.search(queries, 5)
    np.testing.assert_array_equal(ids, np.tile(np.arange(5), (3, 1)))
    np.testing.assert_array_equal(scores, 0)
    ids, scores = index.search(queries, 5, threshold=0.0)
    np.testing.assert_array_equal(ids, -1)
    np.testing.assert_array_equal(scores, -np.inf)
    assert_same(index.search(queries, 5, threshold=-1.0),
                brute_force_search(db, queries, 5, threshold=-1.0))


def test_empty_database() -> None:
    index = SparseIndex.from_dense(np.zeros((0, 4), np.float32))
    assert len(index) == 0
    ids, scores = index.search(np.ones((2, 4), np.float32), 3)
    np.testing.assert_array_equal(ids, -1)
    np.testing.assert_array_equal(scores, -np.inf)


def test_ties_lower_row_id_first() -> None:
    """Duplicate vectors tie exactly; the lower row id wins, in the index and the oracle."""
    base = np.array([[1, 0, 0.5, 0], [0, 0.25, 0, 1], [0.5, 0.5, 0.5, 0.5]], np.float32)
    db = base[[2, 0, 1, 0, 2, 1, 0, 2]]
    query = np.array([[1, 1, 1, 1]], np.float32)
    # Row scores: 2, 1.5, 1.25, 1.5, 2, 1.25, 1.5, 2.
    ids, scores = SparseIndex.from_dense(db).search(query, 8)
    np.testing.assert_array_equal(ids[0], [0, 4, 7, 1, 3, 6, 2, 5])
    np.testing.assert_array_equal(scores[0], [2, 2, 2, 1.5, 1.5, 1.5, 1.25, 1.25])
    assert_same((ids, scores), brute_force_search(db, query, 8))


def test_negative_scores_rank_below_untouched_rows() -> None:
    """With activation `none`, rows sharing no dimension (score 0) beat negative scores;
    an exact cancellation scores 0 too and ties with them by id."""
    db = np.array([
        [-1, 0, 0, 0],    # -1
        [0, 0, 1, 0],     # untouched: 0
        [1, -1, 0, 0],    # 1 - 1 = 0 exactly
        [2, 0, 0, 0],     # 2
        [0, 0, 0, 0],     # empty: 0
        [-0.5, -0.5, 0, 0],  # -1
    ], np.float32)
    query = np.array([[1, 1, 0, 0]], np.float32)
    index = SparseIndex.from_dense(db)
    ids, scores = index.search(query, 6)
    np.testing.assert_array_equal(ids[0], [3, 1, 2, 4, 0, 5])
    np.testing.assert_array_equal(scores[0], [2, 0, 0, 0, -1, -1])
    for threshold in (None, -1.0, -0.5, 0.0):
        assert_same(index.search(query, 6, threshold=threshold),
                    brute_force_search(db, query, 6, threshold=threshold))


def test_k_larger_than_n_pads() -> None:
    rng = np.random.default_rng(5)
    db = exact_matrix(rng, 6, 10, 0.5)
    queries = exact_matrix(rng, 4, 10, 0.5)
    ids, scores = SparseIndex.from_dense(db).search(queries, 9)
    assert ids.shape == (4, 9) and scores.shape == (4, 9)
    np.testing.assert_array_equal(ids[:, 6:], -1)
    np.testing.assert_array_equal(scores[:, 6:], -np.inf)
    assert_same((ids, scores), brute_force_search(db, queries, 9))


def test_threshold_above_every_score() -> None:
    rng = np.random.default_rng(6)
    db = exact_matrix(rng, 40, 10, 0.5)
    queries = exact_matrix(rng, 5, 10, 0.5)
    top = float((queries @ db.T).max())
    ids, scores = SparseIndex.from_dense(db).search(queries, 3, threshold=top)
    np.testing.assert_array_equal(ids, -1)
    np.testing.assert_array_equal(scores, -np.inf)
    index = SparseIndex.from_dense(db)
    index.search(queries, 3, threshold=top)
    assert index.stats["candidates"].sum() == 0


def test_both_accumulation_modes_and_blocks() -> None:
    """Queries touching few postings (touched-row mode) and many (blocked mode) over a
    database spanning several 65536-row score blocks."""
    rng = np.random.default_rng(7)
    n, d = 140_000, 32
    db = scipy.sparse.random(n, d, density=0.06, format="lil", random_state=7,
                             data_rvs=lambda size: rng.integers(-16, 17, size) / 8)
    # Dimensions 0-3 are rare (about 1 row in 1000), and a few rows score
    # exactly 0 (1 - 1), +0.5 or -0.5 against query 2, across blocks.
    db[:, :4] = 0
    rare = rng.choice(n, 150, replace=False)
    db[rare, rng.integers(0, 4, 150)] = 1
    special = {10: (1, 1), 70_000: (1, 1), 139_999: (1, 1), 20: (1, 0), 30: (0, 1)}
    for row, (a, b) in special.items():
        db[row, 1], db[row, 2] = a, b
    db = db.tocsr().astype(np.float32)
    db.eliminate_zeros()
    queries = exact_matrix(rng, 12, d, 0.5, negative=True)
    queries[:3] = 0
    queries[0, 3] = 1                  # one rare dimension
    queries[2, [1, 2]] = [0.5, -0.5]   # row 1 is all zero
    queries[3:, :4] = 0
    index = SparseIndex.from_csr(db.indptr, db.indices, db.data, d)
    for threshold in (None, 0.0, -0.25, -1.0):
        assert_same(index.search(queries, 20, threshold=threshold),
                    brute_force_search(db, queries, 20, threshold=threshold))
    # Queries 0-2 are in the touched-rows regime (postings < rows / 64), the
    # rest in the blocked one.
    postings = index.stats["postings"]
    assert (postings[:3] * 64 < n).all() and (postings[3:] * 64 > n).all()


def numpy_rerank(db: np.ndarray, queries: np.ndarray, db_dense: np.ndarray,
                 q_dense: np.ndarray, k: int, rerank_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Straightforward re-rank: full sort by sparse score, then by dense score (ids break ties)."""
    ids = np.full((len(queries), k), -1, np.int64)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    sparse = queries @ db.T
    for q in range(len(queries)):
        first = sorted(range(len(db)), key=lambda r: (-sparse[q, r], r))[:rerank_k]
        dense = {r: float(db_dense[r] @ q_dense[q]) for r in first}
        final = sorted(first, key=lambda r: (-dense[r], r))[:k]
        ids[q, :len(final)] = final
        scores[q, :len(final)] = [dense[r] for r in final]
    return ids, scores


@pytest.mark.parametrize("rerank_k", [5, 12, 200])
def test_dense_rerank_matches_numpy(rerank_k: int) -> None:
    rng = np.random.default_rng(8)
    db = exact_matrix(rng, 120, 16, 0.2, negative=True)
    queries = exact_matrix(rng, 15, 16, 0.3, negative=True)
    db_dense = (rng.integers(-8, 9, (120, 12)) / 4).astype(np.float32)
    q_dense = (rng.integers(-8, 9, (15, 12)) / 4).astype(np.float32)
    index = SparseIndex.from_dense(db)
    result = index.search(queries, 5, rerank=(db_dense, q_dense), rerank_k=rerank_k)
    assert_same(result, numpy_rerank(db, queries, db_dense, q_dense, 5, rerank_k))
    assert_same(result, brute_force_search(db, queries, 5, rerank=(db_dense, q_dense),
                                           rerank_k=rerank_k))


def test_dense_rerank_with_threshold_and_padding() -> None:
    rng = np.random.default_rng(9)
    db = exact_matrix(rng, 60, 10, 0.2)
    queries = exact_matrix(rng, 8, 10, 0.2)
    db_dense = (rng.integers(-8, 9, (60, 6)) / 4).astype(np.float32)
    q_dense = (rng.integers(-8, 9, (8, 6)) / 4).astype(np.float32)
    index = SparseIndex.from_dense(db)
    kwargs = {"threshold": 0.5, "rerank": (db_dense, q_dense), "rerank_k": 4}
    ids, scores = index.search(queries, 3, **kwargs)
    assert_same((ids, scores), brute_force_search(db, queries, 3, **kwargs))
    # Only rows above the threshold are re-ranked, so some queries come back short.
    assert (ids == -1).any()


def test_rerank_argument_errors() -> None:
    rng = np.random.default_rng(10)
    db = exact_matrix(rng, 20, 8, 0.3)
    index = SparseIndex.from_dense(db)
    queries = exact_matrix(rng, 3, 8, 0.3)
    dense = np.ones((20, 4), np.float32)
    with pytest.raises(ValueError, match="rerank_k"):
        index.search(queries, 5, rerank=(dense, np.ones((3, 4))), rerank_k=4)
    with pytest.raises(ValueError, match=r"\[N, Dd\] with N = 20"):
        index.search(queries, 2, rerank=(dense[:10], np.ones((3, 4))))
    with pytest.raises(ValueError, match=r"\[3, 4\]"):
        index.search(queries, 2, rerank=(dense, np.ones((3, 5))))
    with pytest.raises(ValueError, match="pair"):
        index.search(queries, 2, rerank=dense)
    assert DEFAULT_RERANK_K == 1000


def test_rerank_reports_a_non_finite_value_where_it_reads_it() -> None:
    """The dense database is checked row by row as candidates are re-scored, not scanned whole on
    every search (which cost O(rows x dims) per call): a non-finite value in a candidate row is
    one error naming it; the queries are checked whole."""
    rng = np.random.default_rng(12)
    db = exact_matrix(rng, 20, 8, 0.3)
    index = SparseIndex.from_dense(db)
    queries = exact_matrix(rng, 3, 8, 0.3)
    (top,) = index.search(queries[:1], 1)[0][0]
    dense = np.ones((20, 4), np.float32)
    dense[top, 1] = np.nan
    with pytest.raises(ValueError, match=rf"rerank database must be finite; row {top} column 1 is nan"):
        index.search(queries[:1], 1, rerank=(dense, np.ones((1, 4), np.float32)), rerank_k=1)
    with pytest.raises(ValueError, match="rerank queries must be finite"):
        index.search(queries, 1, rerank=(np.ones((20, 4), np.float32), np.full((3, 4), np.inf)))


def test_thread_count_invariance() -> None:
    rng = np.random.default_rng(11)
    db = np.where(rng.random((3000, 48)) < 0.1, rng.random((3000, 48)), 0).astype(np.float32)
    queries = np.where(rng.random((64, 48)) < 0.15, rng.random((64, 48)), 0).astype(np.float32)
    db_dense = rng.standard_normal((3000, 8)).astype(np.float32)
    q_dense = rng.standard_normal((64, 8)).astype(np.float32)
    index = SparseIndex.from_dense(db)
    for kwargs in ({}, {"threshold": 0.2}, {"rerank": (db_dense, q_dense), "rerank_k": 50}):
        reference = index.search(queries, 10, num_threads=1, **kwargs)
        for threads in (0, 2, 3, 7):
            assert_same(index.search(queries, 10, num_threads=threads, **kwargs), reference)


def test_stats_count_postings_and_candidates() -> None:
    rng = np.random.default_rng(12)
    db = exact_matrix(rng, 400, 30, 0.1, negative=True)
    queries = exact_matrix(rng, 25, 30, 0.2, negative=True)
    index = SparseIndex.from_dense(db)
    # Exhaustive: its candidates count covers every row, not only the scored blocks.
    index.search(queries, 5, threshold=-0.5, mode="exhaustive")
    stats = index.stats
    lengths = (db != 0).sum(axis=0)
    np.testing.assert_array_equal(stats["postings"], (queries != 0) @ lengths)
    scores = queries @ db.T
    np.testing.assert_array_equal(stats["candidates"], ((scores != 0) & (scores > -0.5)).sum(1))
    assert stats["queries"] == 25 and stats["postings_per_query"] == stats["postings"].mean()
    assert (stats["seconds"] >= 0).all() and stats["ms_per_query"] >= 0
    assert stats["rows"] == 400 and stats["dim"] == 30 and stats["nnz"] == (db != 0).sum()
    assert stats["bytes"] == 8 * (30 + 1) + 6 * stats["nnz"]  # segments, postings


def test_stats_before_search() -> None:
    stats = SparseIndex.from_dense(np.eye(3, dtype=np.float32)).stats
    assert stats["queries"] == 0 and np.isnan(stats["postings_per_query"])


@pytest.mark.parametrize("rows", [500, 70_000])  # one, then two 65536-row blocks
def test_save_load_round_trip(tmp_path, rows: int) -> None:
    rng = np.random.default_rng(13)
    db = exact_matrix(rng, rows, 40, 0.1, negative=True)
    csr = scipy.sparse.csr_matrix(db)
    labels = rng.integers(-5, 100, rows)
    index = SparseIndex.from_csr(csr.indptr, csr.indices, csr.data, 40, labels=labels)
    path = tmp_path / "gallery.idx"
    index.save(path)
    assert sorted(os.listdir(tmp_path)) == ["gallery.idx"]
    loaded = SparseIndex.load(path)
    assert loaded.memory_mapped and not index.memory_mapped
    assert (len(loaded), loaded.dim) == (rows, 40)
    assert (loaded.nnz, loaded.nbytes) == (index.nnz, index.nbytes)
    np.testing.assert_array_equal(loaded.labels, labels)
    queries = exact_matrix(rng, 20, 40, 0.2, negative=True)
    assert_same(loaded.search(queries, 7), index.search(queries, 7))
    # A loaded index saves to the identical file.
    loaded.save(tmp_path / "again.idx")
    assert (tmp_path / "again.idx").read_bytes() == path.read_bytes()


def test_save_load_without_labels(tmp_path) -> None:
    index = SparseIndex.from_dense(np.eye(5, dtype=np.float32))
    index.save(tmp_path / "eye.idx")
    loaded = SparseIndex.load(tmp_path / "eye.idx")
    assert loaded.labels is None
    assert_same(loaded.search(np.eye(5, dtype=np.float32), 1),
                (np.arange(5)[:, None], np.ones((5, 1), np.float32)))


@pytest.fixture
def saved_index(tmp_path):
    rng = np.random.default_rng(14)
    index = SparseIndex.from_dense(exact_matrix(rng, 200, 16, 0.2))
    path = tmp_path / "index.idx"
    index.save(path)
    return path


def test_load_rejects_truncated(saved_index) -> None:
    data = saved_index.read_bytes()
    for size in (len(data) - 1, len(data) // 2, 70, 40):
        saved_index.write_bytes(data[:size])
        with pytest.raises(DataError, match="truncated"):
            SparseIndex.load(saved_index)


def test_load_rejects_corrupted(saved_index) -> None:
    data = bytearray(saved_index.read_bytes())
    for position, message in ((len(data) // 2, "checksum mismatch"),
                              (20, "header checksum"), (9, "header checksum")):
        corrupted = bytearray(data)
        corrupted[position] ^= 0x40
        saved_index.write_bytes(bytes(corrupted))
        with pytest.raises(DataError, match=message):
            SparseIndex.load(saved_index)
    saved_index.write_bytes(bytes(data) + b"\0" * 64)
    with pytest.raises(DataError, match="trailing"):
        SparseIndex.load(saved_index)


def test_load_rejects_foreign_files(tmp_path) -> None:
    bin_path = tmp_path / "emb.bin"
    write_bin(bin_path, np.eye(4, dtype=np.float32), np.arange(4))
    foreign = tmp_path / "foreign.idx"
    foreign.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    for path in (bin_path, foreign):
        with pytest.raises(DataError, match="not a sparse-embed index"):
            SparseIndex.load(path)
    (tmp_path / "empty.idx").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        SparseIndex.load(tmp_path / "empty.idx")
    with pytest.raises(DataError, match="cannot open"):
        SparseIndex.load(tmp_path / "missing.idx")
    with pytest.raises(DataError):
        SparseIndex.load(tmp_path)


def test_bin_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(15)
    emb = np.where(rng.random((300, 24)) < 0.2, rng.standard_normal((300, 24)), 0)
    emb = emb.astype(np.float32)
    emb[5] = 0  # an empty row
    labels = rng.integers(0, 30, 300)
    path = tmp_path / "emb.bin"
    nnz = write_bin(path, emb, labels, zero_threshold=0.1)
    kept = np.where(np.abs(emb) > 0.1, emb, 0)
    assert nnz == (kept != 0).sum()
    matrix, read_labels = read_bin(path, dim=24)
    np.testing.assert_array_equal(matrix.toarray(), kept)
    np.testing.assert_array_equal(read_labels, labels)
    assert read_labels.dtype == np.int32 and matrix.dtype == np.float32
    index = SparseIndex.from_bin(path, dim=24)
    np.testing.assert_array_equal(index.labels, labels)
    queries = exact_matrix(rng, 10, 24, 0.3)
    assert_same(index.search(queries, 6), SparseIndex.from_dense(kept).search(queries, 6))
    # The dimension is inferred from the largest index when not given.
    assert SparseIndex.from_bin(path).dim == read_bin(path)[0].shape[1] <= 24


def test_bin_file_layout(tmp_path) -> None:
    """The exact bytes of the original format: N, then label, nnz, indices, values per row."""
    path = tmp_path / "two.bin"
    write_bin(path, np.array([[0, 1.5, 0], [0, 0, 0]], np.float32), np.array([7, -1]))
    words = np.fromfile(path, "<i4")
    np.testing.assert_array_equal(words[:5], [2, 7, 1, 1, np.float32(1.5).view(np.int32)])
    np.testing.assert_array_equal(words[5:], [-1, 0])


def test_bin_rejects_bad_files(tmp_path) -> None:
    path = tmp_path / "emb.bin"
    write_bin(path, np.eye(6, dtype=np.float32), np.arange(6))
    data = path.read_bytes()
    bad = tmp_path / "bad.bin"
    for content, fragment in ((data[:-4], "truncated|past the end|declares"),
                              (data + b"\0\0\0\0", "trailing"),
                              (b"\xff\xff\xff\x7f" + data[4:], "declares")):
        bad.write_bytes(content)
        with pytest.raises(DataError, match=fragment):
            SparseIndex.from_bin(bad)
        with pytest.raises(DataError, match=fragment):
            read_bin(bad)
    with pytest.raises(DataError, match="cannot open"):
        SparseIndex.from_bin(tmp_path / "missing.bin")
    with pytest.raises(DataError, match="not found"):
        read_bin(tmp_path / "missing.bin")


def test_write_bin_rejects_bad_input(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        write_bin(tmp_path / "a.bin", np.ones(3, np.float32), np.arange(3))
    with pytest.raises(ValueError, match=r"labels must have shape \[2\]"):
        write_bin(tmp_path / "a.bin", np.ones((2, 3), np.float32), np.arange(3))
    with pytest.raises(ValueError, match="int32"):
        write_bin(tmp_path / "a.bin", np.ones((1, 3), np.float32), np.array([2**40]))
    with pytest.raises(ValueError, match="finite"):
        write_bin(tmp_path / "a.bin", np.full((1, 3), np.nan, np.float32), np.arange(1))
    assert not list(tmp_path.iterdir())


def test_bad_shapes_and_dtypes() -> None:
    index = SparseIndex.from_dense(np.eye(16, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        SparseIndex.from_dense(np.ones(16, np.float32))
    with pytest.raises(ValueError, match="real-valued"):
        SparseIndex.from_dense(np.array([["a", "b"]]))
    with pytest.raises(ValueError, match=r"\[Q, 16\]"):
        index.search(np.ones((2, 15), np.float32), 3)
    with pytest.raises(ValueError, match=r"\[Q, 16\]"):
        index.search(np.ones(16, np.float32), 3)
    with pytest.raises(ValueError, match=r"\[Q, 16\]"):
        index.search(scipy.sparse.csr_matrix(np.ones((2, 8))), 3)
    with pytest.raises(ValueError, match="real-valued"):
        index.search(np.ones((2, 16), np.complex64), 3)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        index.search((np.array([0, 1]), np.array([16]), np.array([1.0])), 3)
    with pytest.raises(ValueError, match="integer"):
        index.search((np.array([0, 1]), np.array([1.0]), np.array([1.0])), 3)
    with pytest.raises(ValueError, match="indptr"):
        index.search((np.array([0, 5]), np.array([1]), np.array([1.0])), 3)
    with pytest.raises(ValueError, match="finite"):
        index.search(np.full((1, 16), np.nan, np.float32), 3)
    with pytest.raises(ValueError, match="k must"):
        index.search(np.ones((1, 16), np.float32), 0)
    with pytest.raises(ValueError, match="num_threads"):
        index.search(np.ones((1, 16), np.float32), 1, num_threads=-1)
    with pytest.raises(ValueError, match="finite"):
        SparseIndex.from_dense(np.array([[np.inf]], np.float32))
    with pytest.raises(ValueError, match="zero_threshold"):
        SparseIndex.from_dense(np.ones((2, 2), np.float32), zero_threshold=-1)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        SparseIndex.from_csr([0, 1], [4], [1.0], 4)
    with pytest.raises(ValueError, match="labels"):
        SparseIndex.from_csr([0, 1], [1], [1.0], 4, labels=[1, 2])
    with pytest.raises(ValueError, match="non-decreasing"):
        SparseIndex.from_csr([0, 1, 0], [1], [1.0], 4)


def test_oracle_closed_form() -> None:
    """The oracle on a case worked by hand."""
    db = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], np.float32)
    ids, scores = brute_force_search(db, np.array([[2, 1]], np.float32), 3, threshold=0.5)
    np.testing.assert_array_equal(ids, [[2, 0, 1]])
    np.testing.assert_array_equal(scores, [[3, 2, 1]])
    ids, scores = brute_force_search(db, np.array([[0, 0]], np.float32), 5)
    np.testing.assert_array_equal(ids, [[0, 1, 2, 3, -1]])
    np.testing.assert_array_equal(scores, [[0, 0, 0, 0, -np.inf]])
