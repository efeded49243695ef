"""int8 postings, exact float re-scoring and `SparseIndex.to_csr`.

The oracle of an int8 index is a float32 index of its dequantized rows (what
`to_csr` returns without the forward store): every posting adds the same
float32 product in the same order, so every mode must return the same ids
and the same scores bit for bit, and the exact modes the ids of the NumPy
brute force on the dequantized matrix. Re-scoring is checked against the
float32 index of the original rows: the re-scored top-k must be the best k,
by the float index's own scores, among the rows of the quantized top
rescore_k. Values are random floats (not multiples of 1/8) so quantization
really moves them.
"""

from __future__ import annotations

import struct
import subprocess

import numpy as np
import pytest
import scipy.sparse
from index_files import header_hash

from sparse_embed.errors import DataError
from sparse_embed.search.index import VALUE_TYPES, SparseIndex, brute_force_search, write_bin

pytestmark = pytest.mark.unit

EXACT_MODES = ("exhaustive", "pruned", "auto")


def random_rows(rng: np.random.Generator, rows: int, dim: int, density: float,
                negative_dims: int) -> scipy.sparse.csr_matrix:
    """float32 CSR rows with positive values, except in the first `negative_dims` dimensions
    (either sign); a few values far below their dimension's scale."""
    m = scipy.sparse.random(rows, dim, density=density, random_state=rng, format="csr",
                            dtype=np.float32)
    m.data = rng.uniform(0.01, 2.0, m.nnz).astype(np.float32)
    signed = m.indices < negative_dims
    m.data[signed] *= rng.choice([-1.0, 1.0], signed.sum()).astype(np.float32)
    m.data[::97] *= np.float32(1e-4)  # below half a level: keeps the smallest code
    return m


def identity_rows(rng: np.random.Generator, groups: int, per_group: int, dim: int, nnz: int
                  ) -> scipy.sparse.csr_matrix:
    """Identity groups of near-duplicates (shared support, values within 5%), shuffled."""
    base = np.zeros((groups, dim), np.float32)
    for g in range(groups):
        base[g, rng.choice(dim, nnz, replace=False)] = rng.uniform(0.1, 1.0, nnz)
    rows = np.repeat(base, per_group, axis=0) * rng.uniform(0.95, 1.05, (groups * per_group, dim))
    return scipy.sparse.csr_matrix(rows[rng.permutation(len(rows))].astype(np.float32))


def build(m: scipy.sparse.csr_matrix, **kwargs) -> SparseIndex:
    return SparseIndex.from_csr(m.indptr, m.indices, m.data, m.shape[1], block_rows=16, **kwargs)


def queries_of(rng: np.random.Generator, m: scipy.sparse.csr_matrix, count: int
               ) -> scipy.sparse.csr_matrix:
    """Perturbed database rows (a face probe: a gallery identity, another image)."""
    picks = m[rng.choice(m.shape[0], count)].tocsr()
    picks.data = (picks.data * rng.uniform(0.8, 1.2, picks.nnz)).astype(np.float32)
    return picks


def assert_same(actual: tuple[np.ndarray, np.ndarray], expected: tuple[np.ndarray, np.ndarray]
                ) -> None:
    np.testing.assert_array_equal(actual[0], expected[0])
    np.testing.assert_array_equal(actual[1], expected[1])


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[scipy.sparse.csr_matrix, scipy.sparse.csr_matrix]]:
    rng = np.random.default_rng(0)
    out = {}
    for name, m in {"relu": random_rows(rng, 1500, 48, 0.15, 0),
                    "signed": random_rows(rng, 1500, 48, 0.15, 16),
                    "identity": identity_rows(rng, 150, 10, 64, 8)}.items():
        out[name] = (m, queries_of(rng, m, 40))
    return out


@pytest.mark.parametrize("name", ["relu", "signed", "identity"])
def test_int8_ranks_the_dequantized_rows_exactly(data, name):
    """Every mode on the int8 index == the same mode on a float32 index of its dequantized rows
    (ids and float32 scores), the exact modes == brute force on them; counters agree."""
    m, queries = data[name]
    index = build(m, value_type="int8")
    dequantized = index.to_csr()
    reference = build(dequantized)
    expected = brute_force_search(dequantized, queries, 10)
    for mode in EXACT_MODES:
        result = index.search(queries, 10, mode=mode, num_threads=2)
        assert_same(result, reference.search(queries, 10, mode=mode))
        np.testing.assert_array_equal(result[0], expected[0])
        for key in ("postings", "candidates", "blocks_visited", "postings_scored"):
            np.testing.assert_array_equal(index.stats[key], reference.stats[key])
    assert_same(index.search(queries, 10, mode="approx", max_blocks=3),
                reference.search(queries, 10, mode="approx", max_blocks=3))
    assert_same(index.search(queries, 10, threshold=0.5), reference.search(queries, 10, threshold=0.5))
    dense = queries.toarray()
    assert_same(index.search(dense, 10, mode="pruned"), reference.search(dense, 10, mode="pruned"))


@pytest.mark.parametrize("name", ["relu", "signed"])
def test_quantization_error_and_support(data, name):
    """Every non-zero stays a non-zero of its sign; the error is at most half a level of its
    dimension (uint8: max / 255 for non-negative dimensions, int8: max |x| / 127 otherwise),
    at most a level for the values below half a level."""
    m, _ = data[name]
    dequantized = build(m, value_type="int8").to_csr()
    original = m.copy()
    original.sort_indices()
    np.testing.assert_array_equal(dequantized.indptr, original.indptr)
    np.testing.assert_array_equal(dequantized.indices, original.indices)
    assert (np.sign(dequantized.data) == np.sign(original.data)).all()
    dims = original.indices
    peak = np.zeros(m.shape[1], np.float32)
    np.maximum.at(peak, dims, np.abs(original.data))
    signed = np.zeros(m.shape[1], bool)
    signed[dims[original.data < 0]] = True
    level = peak / np.where(signed, 127, 255)
    error = np.abs(dequantized.data - original.data)
    small = np.abs(original.data) < level[dims] / 2
    assert small.any() and (~small).any()
    assert (error[~small] <= level[dims][~small] * (0.5 + 1e-4)).all()
    assert (error[small] <= level[dims][small]).all()
    np.testing.assert_allclose(np.abs(dequantized.data[small]), level[dims][small], rtol=1e-6)


@pytest.mark.parametrize("name", ["relu", "signed", "identity"])
def test_rescore_returns_the_exact_top_among_the_quantized_candidates(data, name):
    """rescore_k: the best k by float32 score (as the float index computes it, bit for bit)
    among the quantized top rescore_k; certified queries equal the float index's top-k."""
    m, queries = data[name]
    index = build(m, value_type="int8", keep_float=True)
    exact = build(m)
    everything = exact.search(queries, m.shape[0], mode="exhaustive")
    exact_top = exact.search(queries, 10)
    for mode in EXACT_MODES:
        candidates, _ = index.search(queries, 30, mode=mode)
        ids, scores = index.search(queries, 10, mode=mode, rescore_k=30, num_threads=2)
        certified = index.stats["certified"]
        for q in range(len(ids)):
            score_of = dict(zip(everything[0][q], everything[1][q], strict=True))
            pool = sorted(((score_of[i], i) for i in candidates[q]), key=lambda s: (-s[0], s[1]))
            np.testing.assert_array_equal(ids[q], [i for _, i in pool[:10]])
            np.testing.assert_array_equal(scores[q], np.float32([s for s, _ in pool[:10]]))
            if certified[q]:
                np.testing.assert_array_equal(ids[q], exact_top[0][q])
        assert certified.any()
    # Re-scoring every row is the float index's search, certified.
    assert_same(index.search(queries, 10, rescore_k=m.shape[0]), exact_top)
    assert index.stats["certified"].all()
    assert_same(index.search(queries, 10, rescore_k=m.shape[0], threshold=1.0),
                exact.search(queries, 10, threshold=1.0))
    # Approx mode re-scores too, but certifies nothing.
    index.search(queries, 10, mode="approx", max_blocks=2, rescore_k=30)
    assert not index.stats["certified"].any()


@pytest.mark.parametrize("name", ["relu", "signed", "identity"])
def test_rescore_exact_returns_the_float_index_results(data, name):
    """rescore_exact: ids, float32 scores and ties of the float32 index of the same rows, in every
    exact mode, with and without threshold, on dense and CSR queries, k beyond the rows too."""
    m, queries = data[name]
    index = build(m, value_type="int8", keep_float=True)
    exact = build(m)
    for mode in EXACT_MODES:
        for threshold in (None, 0.5, 1e6):
            expected = exact.search(queries, 10, threshold=threshold, mode=mode)
            assert_same(index.search(queries, 10, threshold=threshold, mode=mode,
                                     rescore_exact=True, num_threads=2), expected)
            assert index.stats["certified"].all() and index.stats["rescore_exact"]
        assert_same(index.search(queries.toarray(), 10, mode=mode, rescore_exact=True),
                    exact.search(queries.toarray(), 10, mode=mode))
    few = queries[:3]
    assert_same(index.search(few, m.shape[0] + 5, rescore_exact=True),
                exact.search(few, m.shape[0] + 5))
    index.search(queries, 10, mode="approx", max_blocks=2, rescore_exact=True)
    assert not index.stats["certified"].any()


def test_rescore_exact_on_sparse_queries_and_zero_scores():
    """Queries with fewer postings than rows / 64 take the touched-rows path; rows scoring 0
    (untouched, or touched and cancelled out) compete by caller id as in the float index. The
    CSR queries repeat a dimension, and one is all zeros."""
    rng = np.random.default_rng(4)
    dense = np.zeros((4000, 16), np.float32)
    rare = rng.choice(4000, 12, replace=False)
    dense[rare, 0] = rng.uniform(-1, 1, 12)
    dense[rare, 1] = -dense[rare, 0] * rng.choice([1.0, 1.001], 12)  # near cancellation
    dense[:, 2:] = (rng.random((4000, 14)) < 0.3) * rng.uniform(0.1, 1, (4000, 14))
    m = scipy.sparse.csr_matrix(dense)
    index = build(m, value_type="int8", keep_float=True)
    exact = build(m)
    queries = (np.array([0, 2, 3, 5, 5]), np.array([0, 1, 0, 0, 0], np.int32),
               np.float32([0.7, 0.7, -1.5, 1.0, 0.5]))
    for mode in EXACT_MODES:
        for threshold in (None, -0.1, 0.0):
            assert_same(index.search(queries, 20, threshold=threshold, mode=mode, rescore_exact=True),
                        exact.search(queries, 20, threshold=threshold, mode=mode))


def test_dense_rerank_on_int8(data):
    """The dense re-rank of an int8 index re-ranks the dequantized top rerank_k."""
    m, queries = data["signed"]
    rng = np.random.default_rng(1)
    db_dense = rng.standard_normal((m.shape[0], 8)).astype(np.float32)
    q_dense = rng.standard_normal((queries.shape[0], 8)).astype(np.float32)
    index = build(m, value_type="int8")
    expected = brute_force_search(index.to_csr(), queries, 5, rerank=(db_dense, q_dense), rerank_k=20)
    ids, _ = index.search(queries, 5, rerank=(db_dense, q_dense), rerank_k=20, mode="pruned")
    np.testing.assert_array_equal(ids, expected[0])


def test_bytes_and_stats(data):
    """int8: 3 bytes a posting, 5 per dimension (scale, sign), 8 a block entry; the forward
    store is counted apart."""
    m, _ = data["relu"]
    floats, codes, kept = build(m), build(m, value_type="int8"), build(m, value_type="int8",
                                                                       keep_float=True)
    segments = 8 * (m.shape[1] + 1)
    assert floats.nbytes == segments + 6 * m.nnz
    assert codes.nbytes == kept.nbytes == segments + 3 * m.nnz + 5 * m.shape[1]
    entries = codes.stats["block_entries"]
    assert entries == floats.stats["block_entries"]
    assert floats.stats["block_bytes"] - codes.stats["block_bytes"] == 8 * entries
    assert (codes.rescore_nbytes, kept.rescore_nbytes) == (0, 8 * (m.shape[0] + 1) + 8 * m.nnz)
    assert (codes.value_type, kept.stats["value_type"], floats.value_type) == ("int8", "int8",
                                                                               "float32")
    assert kept.keeps_float and not codes.keeps_float and not floats.keeps_float


@pytest.mark.parametrize("keep_float", [False, True])
def test_int8_save_load(data, tmp_path, keep_float):
    m, queries = data["signed"]
    index = build(m, value_type="int8", keep_float=keep_float)
    path = tmp_path / "int8.idx"
    index.save(path)
    loaded = SparseIndex.load(path)
    assert loaded.memory_mapped and (loaded.value_type, loaded.keeps_float) == ("int8", keep_float)
    assert (loaded.nbytes, loaded.rescore_nbytes, loaded.stats["block_bytes"]) == (
        index.nbytes, index.rescore_nbytes, index.stats["block_bytes"])
    assert (loaded.to_csr() != index.to_csr()).nnz == 0
    options = {"rescore_k": 25} if keep_float else {}
    for mode in EXACT_MODES:
        assert_same(loaded.search(queries, 10, mode=mode, **options),
                    index.search(queries, 10, mode=mode, **options))
    loaded.save(tmp_path / "again.idx")
    assert (tmp_path / "again.idx").read_bytes() == path.read_bytes()
    data_bytes = bytearray(path.read_bytes())
    data_bytes[-100] ^= 0x10
    (tmp_path / "bad.idx").write_bytes(bytes(data_bytes))
    with pytest.raises(DataError, match="checksum"):
        SparseIndex.load(tmp_path / "bad.idx")


def with_version(data: bytes, version: int) -> bytes:
    """`data` (a 128-byte-header index file) with another version and its header hash redone."""
    header = bytearray(data[:128])
    header[8:12] = struct.pack("<I", version)
    header[120:128] = struct.pack("<Q", header_hash(bytes(header)))
    return bytes(header) + data[128:]


def test_version_2_files_load(data, tmp_path):
    """A float32 index is laid out as in version 2: the same file with version 2 loads and
    searches the same; an int8 file claiming version 2 is refused."""
    m, queries = data["identity"]
    index = build(m)
    index.save(tmp_path / "v3.idx")
    (tmp_path / "v2.idx").write_bytes(with_version((tmp_path / "v3.idx").read_bytes(), 2))
    v2 = SparseIndex.load(tmp_path / "v2.idx")
    for mode in EXACT_MODES:
        assert_same(v2.search(queries, 10, mode=mode), index.search(queries, 10, mode=mode))
    build(m, value_type="int8").save(tmp_path / "int8.idx")
    (tmp_path / "int8_v2.idx").write_bytes(with_version((tmp_path / "int8.idx").read_bytes(), 2))
    with pytest.raises(DataError):
        SparseIndex.load(tmp_path / "int8_v2.idx")


@pytest.mark.parametrize("reorder", [True, False])
def test_to_csr_returns_the_rows(data, reorder):
    """Caller-id order, sorted indices; float values exact for float32 and keep_float."""
    rng = np.random.default_rng(2)
    m, _ = data["signed"]
    m = m.copy()
    m.data[::5] = 0  # explicit zeros are not stored
    shuffled = scipy.sparse.csr_matrix(m)
    for i in range(shuffled.shape[0]):  # unsorted indices within each row
        lo, hi = shuffled.indptr[i], shuffled.indptr[i + 1]
        perm = lo + rng.permutation(hi - lo)
        shuffled.indices[lo:hi], shuffled.data[lo:hi] = shuffled.indices[perm], shuffled.data[perm]
    expected = m.copy()
    expected.eliminate_zeros()
    expected.sort_indices()
    for kwargs in ({}, {"value_type": "int8", "keep_float": True}):
        index = SparseIndex.from_csr(shuffled.indptr, shuffled.indices, shuffled.data, m.shape[1],
                                     reorder=reorder, **kwargs)
        out = index.to_csr()
        assert out.shape == m.shape and out.has_sorted_indices
        np.testing.assert_array_equal(out.indptr, expected.indptr)
        np.testing.assert_array_equal(out.indices, expected.indices)
        np.testing.assert_array_equal(out.data, expected.data)
    empty = SparseIndex.from_dense(np.zeros((3, 4), np.float32), value_type="int8").to_csr()
    assert empty.shape == (3, 4) and empty.nnz == 0


def test_bad_arguments(data):
    m, queries = data["relu"]
    with pytest.raises(ValueError, match="unknown value_type 'int4'; valid value types: "
                       + ", ".join(VALUE_TYPES)):
        build(m, value_type="int4")
    with pytest.raises(ValueError, match="keep_float applies to value_type='int8' only"):
        SparseIndex.from_dense(m.toarray(), keep_float=True)
    kept = build(m, value_type="int8", keep_float=True)
    with pytest.raises(ValueError, match=r"rescore_k must be an integer >= k \(10\), got 5"):
        kept.search(queries, 10, rescore_k=5)
    for index in (build(m), build(m, value_type="int8")):
        with pytest.raises(ValueError, match="rescore_k needs an int8 index built with keep_float"):
            index.search(queries, 10, rescore_k=20)
    dense = np.zeros((m.shape[0], 2), np.float32)
    with pytest.raises(ValueError, match="rescore_k and rerank are exclusive"):
        kept.search(queries, 10, rescore_k=20, rerank=(dense, np.zeros((queries.shape[0], 2))))
    with pytest.raises(ValueError, match="rescore_exact needs an int8 index built with keep_float"):
        build(m, value_type="int8").search(queries, 10, rescore_exact=True)
    with pytest.raises(ValueError, match="rescore_exact excludes rescore_k and rerank"):
        kept.search(queries, 10, rescore_k=20, rescore_exact=True)


@pytest.mark.integration
def test_search_binary_int8_and_rescore(tmp_path):
    """search/search --value_type int8 [--rescore_k R|exact] returns the ids of the Python int8 index on
    the same rows (queries: the first rows of the file); bad combinations exit 2."""
    from test_search_cli import copy_search_dir, make

    directory = copy_search_dir(tmp_path / "search")
    assert make(directory, "search").returncode == 0
    m = random_rows(np.random.default_rng(3), 600, 32, 0.2, 8)
    write_bin(tmp_path / "db.bin", m.toarray(), np.arange(600) % 60)
    queries, database = m[:300], m[300:]
    for extra, kwargs in ((["--value_type", "int8"], {}),
                          (["--value_type", "int8", "--rescore_k", "40"], {"rescore_k": 40}),
                          (["--value_type", "int8", "--rescore_k", "exact"], {"rescore_exact": True})):
        proc = subprocess.run([str(directory / "search"), str(tmp_path / "db.bin"), "0", "none",
                               "--output_ids", str(tmp_path / "ids.npy"), *extra],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "(int8 values)" in proc.stdout
        index = SparseIndex.from_csr(database.indptr, database.indices, database.data, 32,
                                     value_type="int8", keep_float=bool(kwargs))
        np.testing.assert_array_equal(np.load(tmp_path / "ids.npy"),
                                      index.search(queries, 10, **kwargs)[0])
    for extra, message in ((["--rescore_k", "40"], "add --value_type int8"),
                           (["--value_type", "int4"], "unknown value type 'int4'"),
                           (["--value_type", "int8", "--rescore_k", "5"], "must be >= --k (10)")):
        proc = subprocess.run([str(directory / "search"), str(tmp_path / "db.bin"), "0", "none",
                               *extra], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr.splitlines()[-1], proc.stderr
