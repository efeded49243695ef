"""Block-max pruned, auto and approximate search against the exhaustive mode and the NumPy oracle.

Inputs are multiples of 1/8 (as in test_search.py), so every score is exact
in float32 whatever the summation order: ids must match the oracle exactly,
ties included, and the pruned and auto modes must equal the exhaustive one bit
for bit. Approx with a budget of every block runs the pruning code without the
auto mode's switch to exhaustive accumulation, so it covers pruning on data
where auto would not prune.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse

from sparse_embed.search.index import SEARCH_MODES, SparseIndex, brute_force_search

pytestmark = pytest.mark.unit

EXACT_MODES = ("exhaustive", "pruned", "auto")


def exact_matrix(rng: np.random.Generator, rows: int, cols: int, density: float,
                 negative: bool = False) -> np.ndarray:
    """Sparse float32 [rows, cols] with values in {1/8, ..., 2} (or +-), exact in float32."""
    low = -16 if negative else 1
    values = rng.integers(low, 17, size=(rows, cols)).astype(np.float32) / 8
    return np.where(rng.random((rows, cols)) < density, values, 0).astype(np.float32)


def identity_gallery(rng: np.random.Generator, groups: int, per_group: int, dim: int, nnz: int
                     ) -> np.ndarray:
    """Rows in identity groups of near-duplicates, shuffled: a group shares its support and
    its values up to +-1/8; values are multiples of 1/8."""
    base = np.zeros((groups, dim), np.float32)
    for g in range(groups):
        base[g, rng.choice(dim, nnz, replace=False)] = rng.integers(2, 17, nnz) / 8
    rows = np.repeat(base, per_group, axis=0)
    noise = rng.integers(-1, 2, rows.shape) / 8
    rows = np.where(rows != 0, np.maximum(rows + noise, 1 / 8), 0).astype(np.float32)
    return rows[rng.permutation(len(rows))]


def assert_same(actual: tuple[np.ndarray, np.ndarray], expected: tuple[np.ndarray, np.ndarray]
                ) -> None:
    np.testing.assert_array_equal(actual[0], expected[0])
    np.testing.assert_array_equal(actual[1], expected[1])


def check_all_modes(index: SparseIndex, db: np.ndarray, queries, k: int, **kwargs) -> None:
    """pruned == auto == exhaustive == oracle, and approx with every block == pruned, on 1 and 2
    threads."""
    expected = brute_force_search(db, queries, k, **kwargs)
    for threads in (1, 2):
        for mode in EXACT_MODES:
            assert_same(index.search(queries, k, mode=mode, num_threads=threads, **kwargs), expected)
        assert_same(index.search(queries, k, mode="approx", max_blocks=index.stats["blocks"],
                                 num_threads=threads, **kwargs), expected)


@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("block_rows", [8, 32, 128])
def test_random_data_all_modes_match_oracle(negative: bool, block_rows: int) -> None:
    rng = np.random.default_rng(1)
    db = exact_matrix(rng, 700, 40, 0.15, negative)
    queries = exact_matrix(rng, 40, 40, 0.2, negative)
    index = SparseIndex.from_dense(db, block_rows=block_rows)
    assert index.row_order is not None and sorted(index.row_order) == list(range(700))
    for threshold in (None, 0.0, -0.5, 1.0):
        for k in (1, 10):
            check_all_modes(index, db, queries, k, threshold=threshold)


def test_adversarial_inputs() -> None:
    """Ties, empty rows, duplicate rows, all-zero queries, k > N, threshold above all,
    one block, a last partial block, and CSR queries with repeated and unsorted dimensions."""
    rng = np.random.default_rng(2)
    db = exact_matrix(rng, 77, 12, 0.3, negative=True)
    db[::6] = 0                     # empty rows
    db[40:50] = db[3]               # duplicate rows: ties decided by the caller id
    db[60:64] = np.eye(4, 12) * 2   # ties between one-hot rows
    queries = exact_matrix(rng, 20, 12, 0.4, negative=True)
    queries[0] = 0                  # all-zero query
    queries[1] = db[3]
    queries[2] = -db[3]
    top = float((queries @ db.T).max())
    for block_rows in (8, 128):     # 10 blocks with a partial last one; a single block
        index = SparseIndex.from_dense(db, block_rows=block_rows)
        for threshold in (None, 0.0, -1.0, top, top + 1):
            for k in (1, 3, 77, 100):
                check_all_modes(index, db, queries, k, threshold=threshold)
    csr = (np.array([0, 3, 5]), np.array([4, 1, 4, 7, 7]),
           np.array([1.0, -0.5, 0.25, 2.0, -1.0], np.float32))
    dense = np.zeros((2, 12), np.float32)
    np.add.at(dense, (np.repeat([0, 1], [3, 2]), csr[1]), csr[2])
    index = SparseIndex.from_dense(db, block_rows=8)
    for mode in EXACT_MODES:
        assert_same(index.search(csr, 5, mode=mode), index.search(csr, 5, mode="exhaustive"))
        assert_same(index.search(csr, 5, mode=mode), brute_force_search(db, dense, 5))


def test_empty_database_and_one_row() -> None:
    for db in (np.zeros((0, 5), np.float32), np.array([[0, 1, 0, 0, -2]], np.float32)):
        index = SparseIndex.from_dense(db, block_rows=8)
        queries = np.array([[0, 1, 0, 0, 1], [0, 0, 0, 0, 0]], np.float32)
        for mode in EXACT_MODES:
            assert_same(index.search(queries, 3, mode=mode), brute_force_search(db, queries, 3))


@pytest.fixture(scope="module")
def identity_index() -> tuple[np.ndarray, np.ndarray, SparseIndex]:
    rng = np.random.default_rng(3)
    db = identity_gallery(rng, groups=300, per_group=10, dim=256, nnz=12)
    # Probes near gallery identities: a gallery row with its values nudged.
    probes = np.where(db[:60] != 0, db[:60] + rng.integers(0, 2, db[:60].shape) / 8, 0
                      ).astype(np.float32)
    return db, probes, SparseIndex.from_dense(db, block_rows=32)


def test_identity_structured_data_prunes_exactly(identity_index) -> None:
    db, probes, index = identity_index
    for kwargs in ({}, {"threshold": 2.0}):
        check_all_modes(index, db, probes, 10, **kwargs)
    index.search(probes, 10, mode="pruned")
    stats = index.stats
    # The reordering puts each identity in one or two blocks: pruning scores a
    # small fraction of them and of the postings the exhaustive mode reads.
    assert stats["blocks_per_query"] < 0.25 * stats["blocks"]
    assert stats["postings_scored_per_query"] < 0.5 * stats["postings_per_query"]
    assert (stats["blocks_visited"] >= 1).all() and stats["mode"] == "pruned"


def test_reordering_tightens_the_bounds(identity_index) -> None:
    """The same gallery in the caller's (shuffled) order visits more blocks, with the same results."""
    db, probes, index = identity_index
    plain = SparseIndex.from_dense(db, block_rows=32, reorder=False)
    assert plain.row_order is None
    assert_same(plain.search(probes, 10, mode="pruned"), index.search(probes, 10, mode="pruned"))
    print(f"blocks visited per query: reordered {index.stats['blocks_per_query']:.1f}, "
          f"caller order {plain.stats['blocks_per_query']:.1f} of {plain.stats['blocks']}")
    assert index.stats["blocks_per_query"] < plain.stats["blocks_per_query"]


def test_approx_recall_grows_with_the_budget(identity_index) -> None:
    db, probes, index = identity_index
    exact_ids, _ = index.search(probes, 10, mode="pruned")
    recalls = []
    for budget in (1, 2, 4, index.stats["blocks"]):
        ids, scores = index.search(probes, 10, mode="approx", max_blocks=budget)
        assert (index.stats["blocks_visited"] <= budget).all()
        hits = [len(set(a) & set(b)) for a, b in zip(ids, exact_ids, strict=True)]
        recalls.append(sum(hits) / exact_ids.size)
        # Whatever approx returns is scored exactly and sorted.
        assert (np.diff(scores, axis=1) <= 0).all()
    print("approx recall@10 for budgets 1, 2, 4, all:", [round(r, 3) for r in recalls])
    assert recalls[-1] == 1.0
    assert recalls == sorted(recalls)


def test_rerank_semantics_in_every_mode() -> None:
    rng = np.random.default_rng(4)
    db = exact_matrix(rng, 300, 16, 0.2, negative=True)
    queries = exact_matrix(rng, 12, 16, 0.3, negative=True)
    db_dense = (rng.integers(-8, 9, (300, 6)) / 4).astype(np.float32)
    q_dense = (rng.integers(-8, 9, (12, 6)) / 4).astype(np.float32)
    index = SparseIndex.from_dense(db, block_rows=16)
    for rerank_k in (5, 40):
        check_all_modes(index, db, queries, 5, rerank=(db_dense, q_dense), rerank_k=rerank_k,
                        threshold=-0.5)


def test_save_load_keeps_the_order_and_results(tmp_path, identity_index) -> None:
    db, probes, index = identity_index
    csr = scipy.sparse.csr_matrix(db)
    labels = np.arange(len(db)) % 7
    index = SparseIndex.from_csr(csr.indptr, csr.indices, csr.data, db.shape[1], labels=labels,
                                 block_rows=32)
    path = tmp_path / "gallery.idx"
    index.save(path)
    loaded = SparseIndex.load(path)
    np.testing.assert_array_equal(loaded.row_order, index.row_order)
    np.testing.assert_array_equal(loaded.labels, labels)
    assert loaded.stats["block_entries"] == index.stats["block_entries"]
    for mode in EXACT_MODES:
        assert_same(loaded.search(probes, 10, mode=mode), index.search(probes, 10, mode=mode))
    assert_same(loaded.search(probes, 10, mode="pruned"), brute_force_search(db, probes, 10))


def test_bad_modes_and_budgets() -> None:
    index = SparseIndex.from_dense(np.eye(4, dtype=np.float32))
    queries = np.eye(4, dtype=np.float32)
    assert SEARCH_MODES == ("exhaustive", "pruned", "approx", "auto")
    with pytest.raises(ValueError, match="unknown search mode 'fast'; valid modes: exhaustive"):
        index.search(queries, 1, mode="fast")
    with pytest.raises(ValueError, match="max_blocks applies to mode approx only"):
        index.search(queries, 1, mode="auto", max_blocks=3)
    with pytest.raises(ValueError, match="approx search needs max_blocks >= 1"):
        index.search(queries, 1, mode="approx")
    with pytest.raises(ValueError, match="max_blocks applies to mode approx only"):
        index.search(queries, 1, mode="pruned", max_blocks=3)
    for block_rows in (7, 4, 1 << 17):
        with pytest.raises(ValueError, match="block_rows must be a power of two"):
            SparseIndex.from_dense(queries, block_rows=block_rows)


def test_identity_groups_are_contiguous_in_the_row_order(identity_index) -> None:
    """The MinHash order keeps the rows of one support side by side: every identity's 10 images
    take 10 consecutive positions."""
    db, _, index = identity_index
    _, support = np.unique(db != 0, axis=0, return_inverse=True)
    position = np.empty(len(db), np.int64)
    position[index.row_order] = np.arange(len(db))
    for group in range(support.max() + 1):
        at = np.sort(position[support.ravel() == group])
        assert len(at) == 10 and at[-1] - at[0] == 9, (group, at)


def test_row_order_ties_and_empty_rows() -> None:
    """Rows of one support keep the caller's order among themselves; empty rows go last."""
    rng = np.random.default_rng(5)
    db = np.zeros((50, 20), np.float32)
    db[:, [2, 7, 11]] = rng.integers(1, 9, (50, 3)) / 8
    db[[4, 9, 30]] = 0
    order = SparseIndex.from_dense(db, block_rows=8).row_order
    full = [i for i in range(50) if i not in (4, 9, 30)]
    np.testing.assert_array_equal(order, full + [4, 9, 30])


@pytest.mark.parametrize("block_rows", [8, 16, 64])
def test_small_blocks_on_identity_data(identity_index, block_rows: int) -> None:
    db, probes, _ = identity_index
    index = SparseIndex.from_dense(db, block_rows=block_rows)
    check_all_modes(index, db, probes[:20], 10)
    index.search(probes, 10, mode="pruned")
    # An identity spans at most two blocks of 8 or more rows; the first k-th score
    # leaves few others.
    assert index.stats["blocks_per_query"] < 0.05 * index.stats["blocks"]


def test_auto_prunes_identity_data_and_accumulates_uniform_data(identity_index) -> None:
    db, probes, index = identity_index
    assert_same(index.search(probes, 10, mode="auto"), index.search(probes, 10, mode="pruned"))
    pruned_blocks = index.search(probes, 10, mode="pruned") and index.stats["blocks_visited"]
    index.search(probes, 10, mode="auto")
    np.testing.assert_array_equal(index.stats["blocks_visited"], pruned_blocks)
    rng = np.random.default_rng(6)
    uniform = exact_matrix(rng, 4000, 64, 0.1)
    queries = exact_matrix(rng, 10, 64, 0.1)
    # Blocks of 8: a dimension's block list is nearly as long as its postings; of 128: every
    # block holds every dimension and few can be skipped.
    for block_rows in (8, 128):
        plain = SparseIndex.from_dense(uniform, block_rows=block_rows)
        assert_same(plain.search(queries, 10, mode="auto"), brute_force_search(uniform, queries, 10))
        assert (plain.stats["blocks_visited"] == plain.stats["blocks"]).all()
        assert (plain.stats["postings_scored"] == plain.stats["postings"]).all()


def test_auto_accumulates_when_the_seeds_are_a_large_part_of_the_rows(identity_index) -> None:
    """3,000 rows in blocks of 128 (24 blocks): the 8 seed blocks alone are a third of the rows,
    so auto accumulates exhaustively even where pruning would skip blocks; in blocks of 32 (94
    blocks, seeds a twelfth) it prunes."""
    db, probes, index = identity_index
    coarse = SparseIndex.from_dense(db, block_rows=128)
    assert_same(coarse.search(probes, 10, mode="auto"), coarse.search(probes, 10, mode="exhaustive"))
    coarse.search(probes, 10, mode="auto")
    assert (coarse.stats["blocks_visited"] == coarse.stats["blocks"]).all()
    coarse.search(probes, 10, mode="pruned")
    assert coarse.stats["blocks_per_query"] < coarse.stats["blocks"] / 2
    index.search(probes, 10, mode="auto")
    assert index.stats["blocks_per_query"] < index.stats["blocks"] / 2


def test_float_scores_identical_across_exact_modes() -> None:
    """Arbitrary float32 values (rounding in every sum, near-ties between near-duplicates): the
    pruning bound's slack must keep pruned and auto bit-identical to exhaustive."""
    rng = np.random.default_rng(7)
    base = np.where(rng.random((200, 96)) < 0.15, rng.random((200, 96)), 0)
    db = (np.repeat(base, 6, axis=0) * rng.uniform(0.999, 1.001, (1200, 96))).astype(np.float32)
    db[rng.random(db.shape) < 0.01] *= -1
    db = db[rng.permutation(len(db))]
    queries = (db[:30] * rng.uniform(0.99, 1.01, (30, 96))).astype(np.float32)
    index = SparseIndex.from_dense(db, block_rows=16)
    for kwargs in ({}, {"threshold": 1.0}):
        want = index.search(queries, 10, mode="exhaustive", **kwargs)
        for mode in ("pruned", "auto"):
            assert_same(index.search(queries, 10, mode=mode, **kwargs), want)
        assert_same(index.search(queries, 10, mode="approx", max_blocks=index.stats["blocks"],
                                 **kwargs), want)
    index.search(queries, 10, mode="pruned")
    assert index.stats["blocks_per_query"] < 0.5 * index.stats["blocks"]


def noisy_identity_gallery(rng: np.random.Generator, groups: int, per_group: int, dim: int, nnz: int,
                           swap: float) -> tuple[np.ndarray, np.ndarray]:
    """Identity groups whose images differ in support, shuffled, and each row's identity: every
    image replaces each of its identity's nnz dimensions by a random one with probability swap;
    values are multiples of 1/8."""
    support = np.stack([rng.choice(dim, nnz, replace=False) for _ in range(groups)])
    identity = np.repeat(np.arange(groups), per_group)
    dims = support[identity]
    dims = np.where(rng.random(dims.shape) < swap, rng.integers(0, dim, dims.shape), dims)
    db = np.zeros((len(identity), dim), np.float32)
    np.put_along_axis(db, dims, (rng.integers(2, 17, dims.shape) / 8).astype(np.float32), axis=1)
    shuffle = rng.permutation(len(identity))
    return db[shuffle], identity[shuffle]


def test_row_order_keeps_identities_with_differing_supports_together() -> None:
    """Images that each swap 10% of their identity's 32 dimensions (Jaccard ~0.7 between two of
    them) still land side by side: a signature sort alone scatters them, since two images agree
    on all of its 3 minima only about a third of the time. Pruning then scores a few blocks."""
    rng = np.random.default_rng(11)
    db, identity = noisy_identity_gallery(rng, groups=500, per_group=10, dim=1024, nnz=32, swap=0.1)
    index = SparseIndex.from_dense(db, block_rows=16)
    position = np.empty(len(db), np.int64)
    position[index.row_order] = np.arange(len(db))
    at = position[np.argsort(identity, kind="stable")].reshape(500, 10)
    near = np.abs(at - np.median(at, axis=1, keepdims=True)) < 16
    assert near.mean() > 0.9, near.mean()
    assert (at.max(axis=1) - at.min(axis=1) < 16).mean() > 0.7
    probes = np.where(db[:40] != 0, db[:40] + rng.integers(0, 2, db[:40].shape) / 8, 0
                      ).astype(np.float32)
    check_all_modes(index, db, probes, 10)
    index.search(probes, 10, mode="pruned")
    assert index.stats["blocks_per_query"] < 0.02 * index.stats["blocks"]
    # Auto sees block lists far shorter than rows in random order would give, and prunes too;
    # on uniform rows, whose lists are as long as random ones, it accumulates exhaustively.
    index.search(probes, 10, mode="auto")
    assert index.stats["blocks_per_query"] < 0.02 * index.stats["blocks"]
    scattered = np.where(rng.random(db.shape) < 32 / 1024, db.max(), 0).astype(np.float32)
    uniform = SparseIndex.from_dense(scattered, block_rows=16)
    uniform.search(probes, 10, mode="auto")
    assert (uniform.stats["blocks_visited"] == uniform.stats["blocks"]).all()


def kept_identity_gallery(rng: np.random.Generator, groups: int, per_group: int, dim: int, nnz: int,
                          keep: float, extra: int, probes: int
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noisy identity groups, shuffled, each row's identity, and probes of gallery identities:
    every image (probes too) keeps each of its identity's nnz dimensions with probability keep
    and adds `extra` random dimensions of its own (issue 23's "noisy identity groups"); values
    are multiples of 1/8."""
    support = np.stack([rng.choice(dim, nnz, replace=False) for _ in range(groups)])

    def images(who: np.ndarray) -> np.ndarray:
        rows = np.zeros((len(who), dim), np.float32)
        kept = rng.random((len(who), nnz)) < keep
        values = (rng.integers(2, 17, (len(who), nnz)) / 8).astype(np.float32)
        np.put_along_axis(rows, support[who], np.where(kept, values, 0), axis=1)
        own = rng.integers(0, dim, (len(who), extra))
        np.put_along_axis(rows, own, (rng.integers(1, 9, own.shape) / 8).astype(np.float32), axis=1)
        return rows

    identity = rng.permutation(np.repeat(np.arange(groups), per_group))
    return images(identity), identity, images(rng.integers(0, groups, probes))


@pytest.fixture(scope="module")
def kept_identity() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return kept_identity_gallery(np.random.default_rng(12), groups=200, per_group=10, dim=1024,
                                 nnz=32, keep=0.75, extra=8, probes=30)


def test_row_order_is_a_permutation_whose_inverse_restores_caller_ids(kept_identity) -> None:
    """The build order is a permutation; a row's stored values (to_csr, in caller order) and the
    ids a search returns are the caller's."""
    db, _, probes = kept_identity
    index = SparseIndex.from_dense(db, block_rows=8)
    order = index.row_order
    assert order is not None and np.array_equal(np.sort(order), np.arange(len(db)))
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(db))
    np.testing.assert_array_equal(order[inverse], np.arange(len(db)))
    np.testing.assert_array_equal(index.to_csr().toarray(), db)
    ids, _ = index.search(db[:20], 1, mode="exhaustive")
    scores = (db[:20] @ db.T)
    np.testing.assert_array_equal(scores[np.arange(20), ids[:, 0]], scores.max(axis=1))


def test_kept_identities_cluster_and_prune_exactly(kept_identity) -> None:
    """Images that keep 75% of their identity's 32 dimensions and add 8 of their own (Jaccard
    ~0.4 between two of them) still share blocks: pruning scores few, and every exact mode, float
    and int8 with exact re-scoring, equals the oracle on 1 and 2 threads."""
    db, identity, probes = kept_identity
    index = SparseIndex.from_dense(db, block_rows=8)
    position = np.empty(len(db), np.int64)
    position[index.row_order] = np.arange(len(db))
    at = position[np.argsort(identity, kind="stable")].reshape(-1, 10)
    assert (np.abs(at - np.median(at, axis=1, keepdims=True)) < 16).mean() > 0.9
    check_all_modes(index, db, probes, 10)
    index.search(probes, 10, mode="pruned")
    assert index.stats["blocks_per_query"] < 0.05 * index.stats["blocks"]
    int8 = SparseIndex.from_dense(db, block_rows=8, value_type="int8", keep_float=True)
    expected = brute_force_search(db, probes, 10)
    for threads in (1, 2):
        for mode in EXACT_MODES:
            assert_same(int8.search(probes, 10, mode=mode, num_threads=threads, rescore_exact=True),
                        expected)
