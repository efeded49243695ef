"""ShardedIndex: sharded == unsharded == brute force, ties, empty shards, k > N, re-rank; the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse

from sparse_embed.data.embeddings import Embeddings, write_hdf5
from sparse_embed.search import SEARCH_MODES, SparseIndex, brute_force_search
from sparse_embed.search.sharded import ShardedIndex
from tests.conftest import assert_user_error, run_module

pytestmark = pytest.mark.unit

DIM = 48


def tied_rows(rng: np.random.Generator, n: int, density: float = 0.15) -> np.ndarray:
    """Rows of small multiples of 1/4 (sums exact in float32, so scores tie often), some empty."""
    x = rng.integers(-2, 5, size=(n, DIM)).astype(np.float32) / 4
    x[rng.random((n, DIM)) > density] = 0
    x[rng.random(n) < 0.1] = 0
    return x


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    db = tied_rows(rng, 300)
    db[40:60] = db[10]  # duplicate rows: equal scores across shard boundaries
    queries = tied_rows(rng, 25, density=0.3)
    queries[0] = 0  # all-zero query: every row scores 0
    return {"db": db, "queries": queries,
            "db_dense": rng.integers(-3, 4, size=(300, 8)).astype(np.float32) / 8,
            "q_dense": rng.integers(-3, 4, size=(25, 8)).astype(np.float32) / 8}


def split(db: np.ndarray, bounds: list[int]) -> list[SparseIndex]:
    return [SparseIndex.from_dense(db[a:b], zero_threshold=0.0)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


# Shard boundaries cut through the duplicate block and include empty shards.
BOUNDS = [0, 0, 45, 45, 200, 300]


@pytest.mark.parametrize("k", [1, 7, 400])
@pytest.mark.parametrize("threshold", [None, 0.3])
def test_sharded_equals_unsharded_and_oracle(data, k, threshold):
    whole = SparseIndex.from_dense(data["db"], zero_threshold=0.0)
    sharded = ShardedIndex(split(data["db"], BOUNDS))
    want = brute_force_search(data["db"], data["queries"], k, threshold)
    one = whole.search(data["queries"], k, threshold)
    got = sharded.search(data["queries"], k, threshold, num_threads=2)
    for ids, scores in (one, got):
        np.testing.assert_array_equal(ids, want[0])
        np.testing.assert_array_equal(scores, want[1])
    if k == 400:
        assert (got[0][:, 300:] == -1).all() and np.isneginf(got[1][:, 300:]).all()


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_sharded_rerank_equals_unsharded(data, threshold):
    rerank = (data["db_dense"], data["q_dense"])
    whole = SparseIndex.from_dense(data["db"], zero_threshold=0.0)
    sharded = ShardedIndex(split(data["db"], BOUNDS))
    one = whole.search(data["queries"], 5, threshold, rerank=rerank, rerank_k=20)
    got = sharded.search(data["queries"], 5, threshold, rerank=rerank, rerank_k=20)
    want = brute_force_search(data["db"], data["queries"], 5, threshold, rerank=rerank, rerank_k=20)
    for ids, scores in (got, one):
        np.testing.assert_array_equal(ids, want[0])
        np.testing.assert_array_equal(scores, want[1])


def assert_equal_up_to_rounding(got, want, tol=1e-6):
    """Scores within float32 rounding of a sum; ids equal wherever no other score is that close."""
    np.testing.assert_allclose(got[1], want[1], rtol=tol, atol=tol)
    gaps = np.abs(np.diff(want[1], axis=1)) > 4 * tol
    separated = np.ones(want[1].shape, bool)
    separated[:, 1:] &= gaps
    separated[:, :-1] &= gaps
    np.testing.assert_array_equal(got[0][separated], want[0][separated])


def test_random_floats_equal_up_to_rounding_with_rerank_and_csr_queries():
    """Arbitrary float32 values: the core's summation order depends on the index size (see sharded.py)."""
    rng = np.random.default_rng(3)
    db = scipy.sparse.random(500, DIM, density=0.2, format="csr", random_state=1, dtype=np.float32)
    queries = scipy.sparse.random(30, DIM, density=0.2, format="csr", random_state=2, dtype=np.float32)
    dense_db = rng.standard_normal((500, 16)).astype(np.float32)
    dense_q = rng.standard_normal((30, 16)).astype(np.float32)
    whole = SparseIndex.from_csr(db.indptr, db.indices, db.data, DIM)
    parts = [db[a:b] for a, b in ((0, 170), (170, 171), (171, 500))]
    sharded = ShardedIndex([SparseIndex.from_csr(p.indptr, p.indices, p.data, DIM) for p in parts])
    for kwargs in ({}, {"rerank": (dense_db, dense_q), "rerank_k": 40}):
        assert_equal_up_to_rounding(sharded.search(queries, 10, **kwargs),
                                    whole.search(queries, 10, **kwargs))


def test_explicit_offsets_and_stats(data):
    db = data["db"]
    # Shards given out of order, with explicit offsets, equal the in-order set.
    low, high = SparseIndex.from_dense(db[:120], 0.0), SparseIndex.from_dense(db[120:], 0.0)
    sharded = ShardedIndex([high, low], offsets=[120, 0])
    want = brute_force_search(db, data["queries"], 9)
    got = sharded.search(data["queries"], 9)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    stats = sharded.stats
    whole = SparseIndex.from_dense(db, 0.0)
    whole.search(data["queries"], 9)
    assert (stats["shards"], stats["rows"], stats["dim"], stats["nnz"]) == (2, 300, DIM, whole.nnz)
    assert stats["queries"] == 25
    # Postings touched are a property of the data, not of how it is split.
    np.testing.assert_array_equal(stats["postings"], whole.stats["postings"])
    assert stats["postings_per_query"] == whole.stats["postings_per_query"]


def test_build_writes_loadable_shards(data, tmp_path):
    sharded = ShardedIndex.build(data["db"], 128, tmp_path / "shards", zero_threshold=0.0)
    files = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert files == ["shard-00000.idx", "shard-00001.idx", "shard-00002.idx"]
    assert [len(s) for s in sharded.shards] == [128, 128, 44]
    assert all(s.memory_mapped for s in sharded.shards)
    want = brute_force_search(data["db"], data["queries"], 6, 0.0)
    got = ShardedIndex(sorted((tmp_path / "shards").iterdir())).search(data["queries"], 6, 0.0)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_bad_input():
    a = SparseIndex.from_dense(np.eye(4, 8, dtype=np.float32))
    b = SparseIndex.from_dense(np.eye(4, 6, dtype=np.float32))
    with pytest.raises(ValueError, match="same dimension.*shard 0: 8, shard 1: 6"):
        ShardedIndex([a, b])
    with pytest.raises(ValueError, match="overlap"):
        ShardedIndex([a, a], offsets=[0, 2])
    with pytest.raises(ValueError, match="non-empty"):
        ShardedIndex([])
    with pytest.raises(ValueError, match=r"\[Q, 8\]"):
        ShardedIndex([a, a]).search(np.ones((2, 6), np.float32), 3)
    with pytest.raises(ValueError, match="one row per global id"):
        ShardedIndex([a, a]).search(np.ones((2, 8), np.float32), 3,
                                    rerank=(np.ones((4, 2), np.float32), np.ones((2, 2), np.float32)))


@pytest.mark.slow
def test_cli_shard_and_query(data, tmp_path):
    def hdf5(path, x):
        write_hdf5(path, Embeddings(x, np.arange(len(x)), tuple(f"f{i}.jpg" for i in range(len(x)))))
        return path

    gallery, probes = hdf5(tmp_path / "g.hdf5", data["db"]), hdf5(tmp_path / "q.hdf5", data["queries"])
    proc = run_module("sparse_embed.search", "shard", f"--embeddings={gallery}", "--shards=3",
                      f"--output={tmp_path / 'idx'}", "--zero_threshold=0")
    assert proc.returncode == 0, proc.stderr
    shards = sorted(str(p) for p in (tmp_path / "idx").iterdir())
    assert len(shards) == 3 and "3 shards" in proc.stdout
    want = brute_force_search(data["db"], data["queries"], 4)
    for out in ("r.npz", "r.json"):
        proc = run_module("sparse_embed.search", "query", "--index=" + ",".join(shards),
                          f"--queries={probes}", "--k=4", f"--output={tmp_path / out}")
        assert proc.returncode == 0, proc.stderr
        assert "ms/query" in proc.stdout
        if out.endswith(".npz"):
            got = np.load(tmp_path / out)
            ids, scores = got["ids"], got["scores"]
        else:
            doc = json.loads((tmp_path / out).read_text())
            ids, scores = np.array(doc["ids"]), np.array(doc["scores"], np.float32)
        np.testing.assert_array_equal(ids, want[0])
        np.testing.assert_array_equal(scores, want[1])
    proc = run_module("sparse_embed.search", "query", "--index=" + ",".join(shards), f"--queries={probes}",
                      "--k=4", "--mode=pruned", f"--output={tmp_path / 'p.npz'}")
    assert proc.returncode == 0, proc.stderr
    assert "(pruned)" in proc.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "p.npz")["ids"], want[0])
    proc = run_module("sparse_embed.search", "query", "--index=" + ",".join(shards), f"--queries={probes}",
                      "--max_blocks=3")
    assert_user_error(proc, "--max_blocks goes with --mode=approx")
    other = hdf5(tmp_path / "o.hdf5", np.ones((3, 5), np.float32))
    proc = run_module("sparse_embed.search", "query", "--index=" + ",".join(shards),
                      f"--queries={other}", "--k=4")
    assert_user_error(proc, "[Q, 48]")
    proc = run_module("sparse_embed.search", "query", f"--index={tmp_path / 'missing.idx'}",
                      f"--queries={probes}")
    assert_user_error(proc, "missing.idx")


@pytest.mark.parametrize("mode", [m for m in SEARCH_MODES if m != "approx"])
@pytest.mark.parametrize("threshold", [None, 0.3])
def test_exact_modes_equal_unsharded(data, mode, threshold):
    whole = SparseIndex.from_dense(data["db"], zero_threshold=0.0, block_rows=8)
    sharded = ShardedIndex([SparseIndex.from_dense(data["db"][a:b], 0.0, block_rows=8)
                            for a, b in zip(BOUNDS[:-1], BOUNDS[1:], strict=True)])
    rerank = (data["db_dense"], data["q_dense"])
    for kwargs in ({}, {"rerank": rerank, "rerank_k": 20}):
        want = whole.search(data["queries"], 6, threshold, mode=mode, **kwargs)
        got = sharded.search(data["queries"], 6, threshold, mode=mode, num_threads=2, **kwargs)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    sharded.search(data["queries"], 6, threshold, mode=mode)
    stats = sharded.stats
    assert stats["mode"] == mode
    blocks = sum(s.stats["blocks"] for s in sharded.shards)
    # Every shard's blocks in the exhaustive mode; at most those when pruning.
    assert (stats["blocks_visited"] <= blocks).all()
    if mode in ("exhaustive", "pruned"):
        assert (stats["blocks_visited"] == blocks).all() == (mode == "exhaustive")
    assert (stats["postings_scored"] <= stats["postings"]).all()


def test_approx_is_per_shard(data):
    shards = [SparseIndex.from_dense(data["db"][a:b], 0.0, block_rows=8) for a, b in ((0, 150), (150, 300))]
    sharded = ShardedIndex(shards)
    got = sharded.search(data["queries"], 5, mode="approx", max_blocks=2)
    # The merge of each shard's own approximate top-5 (ids offset), ties to the lower id.
    parts = [s.search(data["queries"], 5, mode="approx", max_blocks=2) for s in shards]
    ids = np.concatenate([parts[0][0], np.where(parts[1][0] < 0, -1, parts[1][0] + 150)], axis=1)
    scores = np.concatenate([parts[0][1], parts[1][1]], axis=1)
    order = np.lexsort((np.where(ids < 0, 1 << 40, ids), -scores), axis=1)[:, :5]
    np.testing.assert_array_equal(got[0], np.take_along_axis(ids, order, axis=1))
    np.testing.assert_array_equal(got[1], np.take_along_axis(scores, order, axis=1))
    assert (sharded.stats["blocks_visited"] <= 4).all()
    # The scores returned are the rows' true scores, and a budget past every block is exact.
    exact = data["queries"].astype(np.float64) @ data["db"].T.astype(np.float64)
    valid = got[0] >= 0
    true_scores = np.take_along_axis(exact, np.maximum(got[0], 0), 1).astype(np.float32)
    np.testing.assert_array_equal(got[1][valid], true_scores[valid])
    full = sharded.search(data["queries"], 5, mode="approx", max_blocks=1 << 20)
    np.testing.assert_array_equal(full[0], brute_force_search(data["db"], data["queries"], 5)[0])
    with pytest.raises(ValueError, match="unknown search mode 'fast'"):
        sharded.search(data["queries"], 5, mode="fast")


def random_float_rows(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    """Non-negative random floats (not on a grid), so int8 quantization moves every value."""
    x = rng.uniform(0.01, 1.0, (n, dim)).astype(np.float32)
    x[rng.random((n, dim)) > 0.2] = 0
    return x


@pytest.mark.parametrize("mode", ["exhaustive", "pruned", "auto"])
def test_int8_shards_rescore_to_the_float32_unsharded_result(mode):
    rng = np.random.default_rng(31)
    db, queries = random_float_rows(rng, 300), random_float_rows(rng, 20)
    whole = SparseIndex.from_dense(db, 0.0, block_rows=8)
    sharded = ShardedIndex([SparseIndex.from_dense(db[a:b], 0.0, block_rows=8, value_type="int8",
                                                   keep_float=True)
                            for a, b in zip(BOUNDS[:-1], BOUNDS[1:], strict=True)])
    for threshold in (None, 2.0):
        want = whole.search(queries, 6, threshold, mode=mode)
        got = sharded.search(queries, 6, threshold, mode=mode, rescore_exact=True, num_threads=2)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    # rescore_k: every shard's re-scored rows carry their exact float32 scores.
    ids, scores = sharded.search(queries, 6, mode=mode, rescore_k=12)
    exact = queries.astype(np.float64) @ db.T.astype(np.float64)
    np.testing.assert_allclose(scores, np.take_along_axis(exact, ids, axis=1), rtol=1e-5)
    with pytest.raises(ValueError, match="keep_float"):
        ShardedIndex([SparseIndex.from_dense(db)]).search(queries, 3, rescore_exact=True)


@pytest.mark.integration
def test_cli_int8_shards_and_rescore(tmp_path):
    rng = np.random.default_rng(32)
    db, queries = random_float_rows(rng, 200), random_float_rows(rng, 15)
    gallery, probes = tmp_path / "g.hdf5", tmp_path / "q.hdf5"
    for path, x in ((gallery, db), (probes, queries)):
        write_hdf5(path, Embeddings(x, np.arange(len(x)), tuple(f"f{i}.jpg" for i in range(len(x)))))
    proc = run_module("sparse_embed.search", "shard", f"--embeddings={gallery}", "--shards=2",
                      f"--output={tmp_path / 'idx'}", "--value_type=int8", "--keep_float")
    assert proc.returncode == 0, proc.stderr
    shards = ",".join(sorted(str(p) for p in (tmp_path / "idx").iterdir()))
    proc = run_module("sparse_embed.search", "query", f"--index={shards}", f"--queries={probes}", "--k=5",
                      "--rescore_k=exact", f"--output={tmp_path / 'r.npz'}")
    assert proc.returncode == 0, proc.stderr
    want = SparseIndex.from_dense(db).search(queries, 5)
    got = np.load(tmp_path / "r.npz")
    np.testing.assert_array_equal(got["ids"], want[0])
    np.testing.assert_array_equal(got["scores"], want[1])
    for args, message in (
            (["shard", f"--embeddings={gallery}", "--shards=2", f"--output={tmp_path / 'x'}", "--keep_float"],
             "--keep_float goes with --value_type=int8"),
            (["query", f"--index={shards}", f"--queries={probes}", "--rescore_k=lots"],
             "--rescore_k must be a number of rows or 'exact'"),
            (["query", f"--index={shards}", f"--queries={probes}", "--k=5", "--rescore_k=2"],
             "--rescore_k: rescore_k must be an integer >= k")):
        assert_user_error(run_module("sparse_embed.search", *args), message)


@pytest.mark.parametrize("mode", ["exhaustive", "auto"])
@pytest.mark.parametrize("group_by_support", [True, False])
def test_batched_queries_equal_unsharded_and_oracle(data, mode, group_by_support):
    """`batch` and `group_by_support` go to every shard: the results are those of one index."""
    whole = SparseIndex.from_dense(data["db"], zero_threshold=0.0, block_rows=8)
    sharded = ShardedIndex([SparseIndex.from_dense(data["db"][a:b], 0.0, block_rows=8)
                            for a, b in zip(BOUNDS[:-1], BOUNDS[1:], strict=True)])
    rerank = (data["db_dense"], data["q_dense"])
    for threshold in (None, 0.3):
        for kwargs in ({}, {"rerank": rerank, "rerank_k": 20}):
            want = brute_force_search(data["db"], data["queries"], 6, threshold, **kwargs)
            one = whole.search(data["queries"], 6, threshold, mode=mode, batch=4,
                               group_by_support=group_by_support, **kwargs)
            got = sharded.search(data["queries"], 6, threshold, mode=mode, num_threads=2, batch=4,
                                 group_by_support=group_by_support, **kwargs)
            for ids, scores in (one, got):
                np.testing.assert_array_equal(ids, want[0])
                np.testing.assert_array_equal(scores, want[1])
    with pytest.raises(ValueError, match="batch must be an integer"):
        sharded.search(data["queries"], 6, batch=0)
