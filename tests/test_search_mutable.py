"""MutableIndex: add / remove / compact against an index rebuilt from the live rows and the oracle;
save / load, a save killed at any point, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
from conftest import ROOT

from sparse_embed.errors import DataError
from sparse_embed.search import SEARCH_MODES, SparseIndex, brute_force_search
from sparse_embed.search.mutable import MANIFEST_NAME, MutableIndex

pytestmark = pytest.mark.unit

DIM = 24
EXACT_MODES = tuple(m for m in SEARCH_MODES if m != "approx")


def grid_rows(rng: np.random.Generator, n: int, density: float = 0.3) -> np.ndarray:
    """Multiples of 1/4 (float32 sums exact, many ties), some rows empty."""
    x = rng.integers(-2, 5, size=(n, DIM)).astype(np.float32) / 4
    x[rng.random((n, DIM)) > density] = 0
    x[rng.random(n) < 0.1] = 0
    return x


def rebuilt(live: dict[int, np.ndarray], queries: np.ndarray, k: int, **kwargs
            ) -> tuple[np.ndarray, np.ndarray]:
    """One SparseIndex over the live rows in increasing id order, positions mapped to the ids."""
    ids = np.array(sorted(live), np.int64)
    rows = np.stack([live[i] for i in ids]) if len(ids) else np.zeros((0, DIM), np.float32)
    got, scores = SparseIndex.from_dense(rows, 0.0, block_rows=8).search(queries, k, **kwargs)
    return np.where(got < 0, -1, ids[np.maximum(got, 0)] if len(ids) else -1), scores


def check(index: MutableIndex, live: dict[int, np.ndarray], queries: np.ndarray) -> None:
    assert len(index) == len(live)
    np.testing.assert_array_equal(index.ids, sorted(live))
    ids_sorted = np.array(sorted(live), np.int64)
    rows = np.stack([live[i] for i in ids_sorted]) if live else np.zeros((0, DIM), np.float32)
    for k in (1, 5, len(live) + 3):
        for threshold in (None, 0.25):
            for mode in EXACT_MODES:
                got = index.search(queries, k, threshold, mode=mode, num_threads=1)
                want = rebuilt(live, queries, k, threshold=threshold, mode=mode)
                np.testing.assert_array_equal(got[0], want[0])
                np.testing.assert_array_equal(got[1], want[1])
            if live:
                oracle_ids, oracle_scores = brute_force_search(rows, queries, k, threshold)
                np.testing.assert_array_equal(got[0], np.where(oracle_ids < 0, -1, ids_sorted[oracle_ids]))
                np.testing.assert_array_equal(got[1], oracle_scores)
    # A block budget past every block is the exact search.
    got = index.search(queries, 4, mode="approx", max_blocks=1 << 20)
    np.testing.assert_array_equal(got[0], rebuilt(live, queries, 4)[0])


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    q = grid_rows(np.random.default_rng(1), 9, density=0.5)
    q[0] = 0  # every row scores 0: the order is the id order
    return q


def test_add_remove_compact_sequence(queries):
    rng = np.random.default_rng(0)
    base = grid_rows(rng, 60)
    base[30:36] = base[2]  # duplicate rows: ties between base and delta rows
    index = MutableIndex.from_index(SparseIndex.from_dense(base, 0.0, block_rows=8))
    live = dict(enumerate(base))
    check(index, live, queries)

    added = grid_rows(rng, 12)
    added[:3] = base[2]
    new_ids = index.add(added)  # dense, next free ids
    np.testing.assert_array_equal(new_ids, np.arange(60, 72))
    live.update(zip(new_ids.tolist(), added, strict=True))
    check(index, live, queries)

    index.remove([2, 31, 61, 0])  # base tombstones and a delta row
    for i in (2, 31, 61, 0):
        del live[i]
    assert index.stats["tombstones"] == 3 and index.stats["delta_rows"] == 11
    check(index, live, queries)

    csr = scipy.sparse.csr_matrix(grid_rows(rng, 5))
    index.add(csr, ids=[2, 500, 7_000_000_000, 61, 1000])  # re-adds removed ids, CSR rows, int64 ids
    live.update(zip([2, 500, 7_000_000_000, 61, 1000], csr.toarray(), strict=True))
    check(index, live, queries)
    extra = grid_rows(rng, 1)
    assert index.add(extra)[0] == 7_000_000_001
    live[7_000_000_001] = extra[0]

    index.compact()
    stats = index.stats
    assert (stats["tombstones"], stats["delta_rows"], stats["base_rows"]) == (0, 0, len(live))
    check(index, live, queries)

    index.remove(list(live))  # everything
    live.clear()
    check(index, live, queries)
    ids, scores = index.search(queries, 3)
    assert (ids == -1).all() and np.isneginf(scores).all()
    index.add(base[:4], ids=[9, 8, 7, 6])
    live.update(zip([9, 8, 7, 6], base[:4], strict=True))
    check(index, live, queries)
    index.compact()
    check(index, live, queries)


def test_removed_rows_crowding_the_top(queries):
    """15 removed copies of the best row: the base is asked again for k + T results."""
    rng = np.random.default_rng(6)
    base = grid_rows(rng, 40)
    base[:20] = 2.0  # every query's best rows, tied
    index = MutableIndex.from_index(SparseIndex.from_dense(base, 0.0, block_rows=8))
    added = grid_rows(rng, 3)
    index.add(added)
    index.remove(np.arange(3, 18))
    live = {i: r for i, r in enumerate(base) if not 3 <= i < 18}
    live.update(zip(range(40, 43), added, strict=True))
    check(index, live, np.abs(queries))
    dense_db = rng.integers(-4, 5, size=(43, 6)).astype(np.float32) / 8
    dense_q = rng.integers(-4, 5, size=(len(queries), 6)).astype(np.float32) / 8
    ids = np.array(sorted(live))
    rows = np.stack([live[i] for i in ids])
    got = index.search(np.abs(queries), 3, rerank=(dense_db, dense_q), rerank_k=6)
    want_ids, want_scores = brute_force_search(rows, np.abs(queries), 3, rerank=(dense_db[ids], dense_q),
                                               rerank_k=6)
    np.testing.assert_array_equal(got[0], ids[want_ids])
    np.testing.assert_array_equal(got[1], want_scores)


def test_rerank_across_segments(queries):
    rng = np.random.default_rng(2)
    base = grid_rows(rng, 40)
    index = MutableIndex.from_index(SparseIndex.from_dense(base, 0.0), ids=np.arange(0, 80, 2))
    added = grid_rows(rng, 10)
    index.add(added, ids=np.arange(1, 20, 2))
    index.remove([0, 4, 3])
    live = dict(zip(range(0, 80, 2), base, strict=True)) | dict(zip(range(1, 20, 2), added, strict=True))
    for i in (0, 4, 3):
        del live[i]
    dense_db = rng.integers(-4, 5, size=(80, 6)).astype(np.float32) / 8
    dense_q = rng.integers(-4, 5, size=(len(queries), 6)).astype(np.float32) / 8
    ids = np.array(sorted(live))
    rows = np.stack([live[i] for i in ids])
    for threshold in (None, 0.25):
        got = index.search(queries, 4, threshold, rerank=(dense_db, dense_q), rerank_k=12)
        want_ids, want_scores = brute_force_search(rows, queries, 4, threshold,
                                                   rerank=(dense_db[ids], dense_q), rerank_k=12)
        np.testing.assert_array_equal(got[0], np.where(want_ids < 0, -1, ids[want_ids]))
        np.testing.assert_array_equal(got[1], want_scores)
    with pytest.raises(ValueError, match=r"one row per caller id, at least \[79, Dd\]"):
        index.search(queries, 4, rerank=(dense_db[:50], dense_q))


def test_bad_input():
    index = MutableIndex(DIM)
    index.add(np.eye(3, DIM, dtype=np.float32), ids=[5, 6, 7])
    with pytest.raises(ValueError, match=rf"shape \[n, {DIM}\], got float32 \[2, 5\]"):
        index.add(np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match="duplicate ids in add: 4"):
        index.add(np.ones((2, DIM), np.float32), ids=[4, 4])
    with pytest.raises(ValueError, match="already in the index: 6, 7"):
        index.add(np.ones((3, DIM), np.float32), ids=[7, 6, 1])
    with pytest.raises(ValueError, match="one per row"):
        index.add(np.ones((2, DIM), np.float32), ids=[1])
    with pytest.raises(ValueError, match="not in the index: 1, 9"):
        index.remove([9, 5, 1])
    with pytest.raises(ValueError, match="finite"):
        index.add(np.full((1, DIM), np.nan, np.float32))
    with pytest.raises(ValueError, match="strictly increasing"):
        MutableIndex.from_index(SparseIndex.from_dense(np.eye(2, DIM, dtype=np.float32)), ids=[3, 1])
    # -1 pads short result lists, so it cannot be an id.
    with pytest.raises(ValueError, match="ids must be >= 0, got -2, -1"):
        index.add(np.ones((3, DIM), np.float32), ids=[-1, 8, -2])
    with pytest.raises(ValueError, match="ids must be >= 0, got -1"):
        MutableIndex.from_index(SparseIndex.from_dense(np.eye(2, DIM, dtype=np.float32)), ids=[-1, 1])
    assert len(index) == 3  # failed calls change nothing


def test_save_load_round_trip(tmp_path, queries):
    rng = np.random.default_rng(3)
    base = grid_rows(rng, 50)
    index = MutableIndex.from_index(SparseIndex.from_dense(base, 0.0))
    index.save(tmp_path / "g")
    base_file = next(p.name for p in (tmp_path / "g").iterdir() if p.name.startswith("base-"))
    index.add(grid_rows(rng, 7), ids=np.arange(100, 107))
    index.remove([1, 104, 49])
    index.save(tmp_path / "g")
    # Only the delta and the manifest changed: the base file is reused, old deltas are gone.
    names = sorted(p.name for p in (tmp_path / "g").iterdir())
    assert base_file in names and len(names) == 5, names
    loaded = MutableIndex.load(tmp_path / "g")
    assert (len(loaded), loaded.stats["tombstones"], loaded.stats["delta_rows"]) == (54, 2, 6)
    for mode in EXACT_MODES:
        want = index.search(queries, 8, mode=mode)
        got = loaded.search(queries, 8, mode=mode)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    loaded.add(grid_rows(rng, 2), ids=[104, 1])  # the delta read back from its file takes more rows
    loaded.compact()
    loaded.save(tmp_path / "g")
    assert base_file not in {p.name for p in (tmp_path / "g").iterdir()}
    assert len(MutableIndex.load(tmp_path / "g")) == 56


def test_save_interrupted_before_the_manifest_keeps_the_old_state(tmp_path, queries, monkeypatch):
    rng = np.random.default_rng(4)
    index = MutableIndex.from_index(SparseIndex.from_dense(grid_rows(rng, 30), 0.0))
    index.save(tmp_path / "g")
    before = index.search(queries, 5)
    index.add(grid_rows(rng, 4))
    index.remove([0, 1])
    real_replace = os.replace

    def killed(src, dst):
        if Path(dst).name == MANIFEST_NAME:
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        index.save(tmp_path / "g")
    monkeypatch.setattr(os, "replace", real_replace)
    old = MutableIndex.load(tmp_path / "g")
    assert len(old) == 30
    np.testing.assert_array_equal(old.search(queries, 5)[0], before[0])
    index.save(tmp_path / "g")  # the next save cleans up the orphaned segment files
    assert len(list((tmp_path / "g").iterdir())) == 5
    assert len(MutableIndex.load(tmp_path / "g")) == 32


SAVER = """
import sys
import numpy as np
from sparse_embed.search.mutable import MutableIndex
index = MutableIndex(8)
index.add(np.eye(8, dtype=np.float32))
index.save(sys.argv[1])
print("ready", flush=True)
while True:
    index.add(np.ones((200, 8), np.float32))  # state n: 8 + 200 n rows
    index.save(sys.argv[1])
    index.remove(index.ids[-200:])
    index.save(sys.argv[1])
"""


@pytest.mark.slow
def test_save_killed_at_random_points_leaves_a_complete_state(tmp_path):
    directory = tmp_path / "g"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for delay in (0.05, 0.13, 0.31):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(directory)], stdout=subprocess.PIPE,
                                text=True, env=env)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        index = MutableIndex.load(directory)
        assert len(index) in (8, 208)
        ids, scores = index.search(np.eye(8, dtype=np.float32), 1)
        np.testing.assert_array_equal(ids[:, 0], np.arange(8))


def test_load_refuses_bad_directories(tmp_path):
    index = MutableIndex(DIM)
    index.add(np.eye(4, DIM, dtype=np.float32))
    with pytest.raises(DataError, match="not a MutableIndex directory"):
        MutableIndex.load(tmp_path / "none")
    index.save(tmp_path / "g")
    manifest = tmp_path / "g" / MANIFEST_NAME
    text = manifest.read_text()
    manifest.write_text(text.replace('"version": 1', '"version": 9'))
    with pytest.raises(DataError, match="manifest version 9; this version reads 1"):
        MutableIndex.load(tmp_path / "g")
    manifest.write_text(text.replace('"tombstones": []', '"tombstones": [2]'))
    with pytest.raises(DataError, match="fails its checksum"):
        MutableIndex.load(tmp_path / "g")
    manifest.write_text(text[:-5])
    with pytest.raises(DataError, match="unreadable JSON"):
        MutableIndex.load(tmp_path / "g")
    manifest.write_text(text)
    ids_file = next((tmp_path / "g").glob("delta-*.ids"))
    good_ids = ids_file.read_bytes()
    ids_file.write_bytes(good_ids[:-8])
    with pytest.raises(DataError, match="corrupted id map"):
        MutableIndex.load(tmp_path / "g")
    ids_file.write_bytes(good_ids)
    delta = next((tmp_path / "g").glob("delta-*.idx"))
    data = bytearray(delta.read_bytes())
    data[-1] ^= 0xFF
    delta.write_bytes(bytes(data))
    with pytest.raises(DataError, match=delta.name):
        MutableIndex.load(tmp_path / "g")
    delta.unlink()
    with pytest.raises(DataError, match=delta.name):
        MutableIndex.load(tmp_path / "g")


def test_stats_add_up_over_the_segments(queries):
    rng = np.random.default_rng(8)
    rows = grid_rows(rng, 60)
    whole = SparseIndex.from_dense(rows, 0.0, block_rows=8)
    index = MutableIndex.from_index(SparseIndex.from_dense(rows[:45], 0.0, block_rows=8))
    index.add(rows[45:])
    for mode in ("exhaustive", "pruned"):
        whole.search(queries, 5, mode=mode)
        index.search(queries, 5, mode=mode)
        stats = index.stats
        assert (stats["rows"], stats["base_rows"], stats["delta_rows"], stats["mode"]) == (60, 45, 15, mode)
        assert stats["nnz"] == whole.nnz
        # Postings of the query's dimensions do not depend on how the rows are split.
        np.testing.assert_array_equal(stats["postings"], whole.stats["postings"])
        assert stats["postings_per_query"] == whole.stats["postings_per_query"]
        assert (stats["postings_scored"] <= stats["postings"]).all()


def test_int8_segments_rescore_to_the_float32_result(tmp_path):
    rng = np.random.default_rng(41)

    def rows(n: int) -> np.ndarray:  # random floats off any grid: quantization moves them
        x = rng.uniform(0.01, 1.0, (n, DIM)).astype(np.float32)
        x[rng.random((n, DIM)) > 0.3] = 0
        return x

    base, added, probes = rows(120), rows(30), rows(12)
    index = MutableIndex.from_index(SparseIndex.from_dense(base, 0.0, block_rows=8, value_type="int8",
                                                           keep_float=True))
    live = dict(enumerate(base))
    live.update(zip(index.add(added).tolist(), added, strict=True))
    index.remove([3, 50, 121])
    for i in (3, 50, 121):
        del live[i]

    def assert_float32_result(ix: MutableIndex) -> None:
        for mode in EXACT_MODES:
            want = rebuilt(live, probes, 7, mode=mode)
            got = ix.search(probes, 7, mode=mode, rescore_exact=True)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])

    assert_float32_result(index)
    index.save(tmp_path / "g")
    loaded = MutableIndex.load(tmp_path / "g")
    assert_float32_result(loaded)
    loaded.compact()
    assert loaded.stats["delta_rows"] == 0
    assert (loaded.stats["value_type"], loaded.stats["keep_float"]) == ("int8", True)
    assert_float32_result(loaded)
    # rescore_k: the returned rows carry their exact float32 scores.
    ids, scores = loaded.search(probes, 5, rescore_k=10)
    rows_by_id = np.zeros((max(live) + 1, DIM), np.float32)
    for i, x in live.items():
        rows_by_id[i] = x
    exact = probes.astype(np.float64) @ rows_by_id.T.astype(np.float64)
    np.testing.assert_allclose(scores, np.take_along_axis(exact, ids, axis=1), rtol=1e-5)
    with pytest.raises(ValueError, match="keep_float"):
        MutableIndex(DIM, keep_float=True)


@pytest.mark.parametrize("group_by_support", [True, False])
def test_batched_queries_equal_one_index_over_the_live_rows(queries, group_by_support):
    """`batch` and `group_by_support` go to every segment: results as one index, and as batch=1."""
    rng = np.random.default_rng(9)
    base = grid_rows(rng, 50)
    index = MutableIndex.from_index(SparseIndex.from_dense(base, 0.0, block_rows=8))
    added = grid_rows(rng, 8)
    index.add(added)
    index.remove([1, 2, 3, 52])
    live = {i: r for i, r in enumerate(base) if i not in (1, 2, 3)}
    live.update((50 + j, r) for j, r in enumerate(added) if 50 + j != 52)
    many = np.concatenate([queries, grid_rows(rng, 11, density=0.5)])
    for mode in ("exhaustive", "auto"):
        for threshold in (None, 0.25):
            got = index.search(many, 5, threshold, mode=mode, batch=3, group_by_support=group_by_support)
            want = rebuilt(live, many, 5, threshold=threshold, mode=mode)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
            one = index.search(many, 5, threshold, mode=mode)
            np.testing.assert_array_equal(got[0], one[0])
            np.testing.assert_array_equal(got[1], one[1])
    with pytest.raises(ValueError, match="batch must be an integer"):
        index.search(many, 5, batch=0)
