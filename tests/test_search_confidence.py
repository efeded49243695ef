"""A confidence per row and per query through the search index: kept and saved with the index
(version 4 files; files without it stay version 3), carried by shards and the mutable index's
add / remove / compact, mapped through the row order to caller ids, reported with every hit, never
changing the ranking unless `min_row_confidence` asks, which is exact against a NumPy oracle.

Values are multiples of 1/8 with few terms, exactly representable in float32, so scores are exact
whatever the summation order and the oracle's ids and scores must match bit for bit."""

from __future__ import annotations

import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import assert_main_user_error, call_main
from test_search_format import future_version

from sparse_embed.data import embeddings as embedding_files
from sparse_embed.errors import DataError
from sparse_embed.search import (
    SEARCH_MODES,
    MutableIndex,
    ShardedIndex,
    SparseIndex,
    brute_force_search,
)
from sparse_embed.search.__main__ import main as search_main

pytestmark = pytest.mark.unit

EXACT_MODES = tuple(mode for mode in SEARCH_MODES if mode != "approx")


def rows(rng: np.random.Generator, n: int, dim: int = 24, density: float = 0.25) -> np.ndarray:
    values = rng.integers(-8, 17, size=(n, dim)) / 8
    return np.where(rng.random((n, dim)) < density, values, 0).astype(np.float32)


def confidences(rng: np.random.Generator, n: int) -> np.ndarray:
    # Few distinct values: rows tie with the floor, which keeps them (at or above it).
    return (rng.integers(0, 8, n) / 8).astype(np.float32)


def oracle(database: np.ndarray, queries: np.ndarray, k: int, keep: np.ndarray,
           ids: np.ndarray | None = None, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Brute force over the kept rows only, positions mapped back to the rows' ids."""
    ids = np.arange(len(database)) if ids is None else ids
    kept_ids = ids[keep]
    if not len(kept_ids):
        return np.full((len(queries), k), -1), np.full((len(queries), k), -np.inf, np.float32)
    found, scores = brute_force_search(database[keep], queries, k, threshold=threshold)
    return np.where(found >= 0, kept_ids[np.maximum(found, 0)], -1), scores


def test_confidence_round_trips_through_save_and_the_row_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, conf = rows(rng, 200), rng.normal(size=200).astype(np.float32)
    index = SparseIndex.from_dense(x, confidence=conf, block_rows=8)
    assert index.row_order is not None and not np.array_equal(index.row_order, np.arange(200))
    np.testing.assert_array_equal(index.confidence, conf)
    index.save(tmp_path / "a.idx")
    data = (tmp_path / "a.idx").read_bytes()
    version, flags = struct.unpack_from("<I", data, 8)[0], struct.unpack_from("<I", data, 40)[0]
    assert (version, flags & 8) == (4, 8)
    loaded = SparseIndex.load(tmp_path / "a.idx")
    np.testing.assert_array_equal(loaded.confidence, conf)
    queries = rows(rng, 15)
    ids, _, row_conf, query_conf = loaded.search(queries, 6, query_confidence=np.arange(15),
                                                 return_confidence=True)
    np.testing.assert_array_equal(row_conf, conf[ids])
    np.testing.assert_array_equal(query_conf, np.broadcast_to(np.arange(15.0)[:, None], ids.shape))
    # CSR builds keep it too, and with_confidence(None) drops it.
    csr = SparseIndex.from_csr([0, 1, 1], [2], [1.0], dim=4, confidence=[0.5, 0.25])
    np.testing.assert_array_equal(csr.confidence, [0.5, 0.25])
    assert csr.with_confidence(None).confidence is None


def test_files_without_confidence_stay_version_3_and_a_v3_header_cannot_claim_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rows(rng, 50)
    SparseIndex.from_dense(x).save(tmp_path / "old.idx")
    assert struct.unpack_from("<I", (tmp_path / "old.idx").read_bytes(), 8)[0] == 3
    old = SparseIndex.load(tmp_path / "old.idx")
    assert old.confidence is None
    ids, scores, row_conf, query_conf = old.search(x[:3], 4, return_confidence=True)
    assert np.isnan(row_conf).all() and np.isnan(query_conf).all()
    # A version 4 file relabelled as version 3 carries a flag version 3 does not know: refused.
    SparseIndex.from_dense(x, confidence=np.ones(50)).save(tmp_path / "new.idx")
    (tmp_path / "relabelled.idx").write_bytes(future_version((tmp_path / "new.idx").read_bytes(), 3))
    with pytest.raises(DataError, match=r"relabelled\.idx is corrupted: implausible header fields"):
        SparseIndex.load(tmp_path / "relabelled.idx")
    # A reader of versions 1 to 3 refuses the new file by its version (what this build says of 5).
    (tmp_path / "v5.idx").write_bytes(future_version((tmp_path / "new.idx").read_bytes(), 5))
    with pytest.raises(DataError, match=r"v5\.idx has index format version 5; this build reads versions "
                                        r"1 to 4"):
        SparseIndex.load(tmp_path / "v5.idx")


@pytest.mark.parametrize("mode", EXACT_MODES)
def test_ranking_is_unchanged_by_confidence(mode: str) -> None:
    rng = np.random.default_rng(2)
    x, queries = rows(rng, 300), rows(rng, 20)
    plain = SparseIndex.from_dense(x, block_rows=8)
    with_conf = SparseIndex.from_dense(x, block_rows=8, confidence=confidences(rng, 300))
    expected = plain.search(queries, 7, mode=mode)
    got = with_conf.search(queries, 7, mode=mode, query_confidence=rng.random(20))
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("mode", "floor", "threshold", "batch"),
                         [(mode, 0.5, None, 1) for mode in EXACT_MODES]
                         + [("exhaustive", 0.875, 0.0, 4), ("auto", -1.0, None, 1),
                            ("pruned", 2.0, None, 1), ("exhaustive", 0.125, 1.0, 1)])
def test_min_row_confidence_equals_the_oracle(mode: str, floor: float, threshold: float | None,
                                              batch: int) -> None:
    """Every fraction of dropped rows: none (-1), few, most (0.875: the second ask), all (2)."""
    rng = np.random.default_rng(3)
    x, queries, conf = rows(rng, 400), rows(rng, 25), confidences(rng, 400)
    index = SparseIndex.from_dense(x, block_rows=8, confidence=conf)
    ids, scores, row_conf, _ = index.search(queries, 9, threshold, mode=mode, batch=batch,
                                            min_row_confidence=floor, return_confidence=True)
    expected_ids, expected_scores = oracle(x, queries, 9, conf >= floor, threshold=threshold)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(scores, expected_scores)
    assert (row_conf[ids >= 0] >= floor).all()


def test_min_row_confidence_with_csr_queries_and_int8_exact_rescoring() -> None:
    import scipy.sparse

    rng = np.random.default_rng(4)
    x, queries, conf = rows(rng, 300), rows(rng, 12), confidences(rng, 300)
    int8 = SparseIndex.from_dense(x, value_type="int8", keep_float=True, confidence=conf)
    ids, scores = int8.search(scipy.sparse.csr_matrix(queries), 5, rescore_exact=True,
                              min_row_confidence=0.75)
    expected_ids, expected_scores = oracle(x, queries, 5, conf >= 0.75)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(scores, expected_scores)


def test_sharded_index_carries_each_shards_confidence(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    x, queries, conf = rows(rng, 250), rows(rng, 10), confidences(rng, 250)
    index = ShardedIndex(ShardedIndex.build(x, 90, tmp_path, confidence=conf).shards)
    np.testing.assert_array_equal(index.confidence, conf)
    ids, scores, row_conf, _ = index.search(queries, 6, min_row_confidence=0.5, return_confidence=True)
    expected_ids, expected_scores = oracle(x, queries, 6, conf >= 0.5)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(row_conf[ids >= 0], conf[ids[ids >= 0]])


def test_mutable_index_keeps_confidence_through_add_remove_compact_and_save(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    x, queries, conf = rows(rng, 260), rows(rng, 15), confidences(rng, 260)
    index = MutableIndex(24, block_rows=8)
    index.add(x[:200], confidence=conf[:200])
    index.compact()
    index.add(x[200:], ids=np.arange(1000, 1060), confidence=conf[200:])
    ids_of = np.concatenate([np.arange(200), np.arange(1000, 1060)])
    removed = np.concatenate([np.arange(0, 200, 9), [1003, 1040]])
    index.remove(removed)
    live = ~np.isin(ids_of, removed)

    def check(mutable: MutableIndex) -> None:
        np.testing.assert_array_equal(mutable.confidence, conf[live])
        for floor in (None, 0.625):
            keep = live if floor is None else live & (conf >= floor)
            got = mutable.search(queries, 8, min_row_confidence=floor, return_confidence=True)
            expected_ids, expected_scores = oracle(x, queries, 8, keep, ids_of)
            np.testing.assert_array_equal(got[0], expected_ids)
            np.testing.assert_array_equal(got[1], expected_scores)
            hit = got[0] >= 0
            np.testing.assert_array_equal(got[2][hit], conf[np.searchsorted(ids_of, got[0][hit])])

    check(index)
    index.save(tmp_path / "m")
    loaded = MutableIndex.load(tmp_path / "m")
    check(loaded)
    loaded.compact()
    check(loaded)
    with pytest.raises(ValueError, match="keeps a confidence per row"):
        loaded.add(x[:2], ids=[5000, 5001])
    with pytest.raises(ValueError, match="no row confidence"):
        MutableIndex.from_index(SparseIndex.from_dense(x)).add(x[:1], confidence=[1.0])


@pytest.mark.parametrize(("call", "message"), [
    (lambda ix, q: SparseIndex.from_dense(q, confidence=[1.0]),
     r"confidence must be a real-valued array of shape \[5\]"),
    (lambda ix, q: SparseIndex.from_dense(q, confidence=[1, 2, np.nan, 4, 5]), "confidence must be finite"),
    (lambda ix, q: ix.search(q, 3, query_confidence=np.ones(4)), r"query_confidence .* shape \[5\]"),
    (lambda ix, q: ix.search(q, 3, query_confidence=[0, 1, np.inf, 0, 0]), "query_confidence must be finite"),
    (lambda ix, q: ix.search(q, 3, min_row_confidence=np.nan), "min_row_confidence must be a finite number"),
    (lambda ix, q: ix.with_confidence(None).search(q, 3, min_row_confidence=0.5),
     "needs an index built with a confidence"),
    (lambda ix, q: ix.search(q, 3, min_row_confidence=0.5, rerank=(q, q)), "excludes rerank and rescore_k"),
])
def test_bad_confidence_is_one_clear_error(call, message: str) -> None:
    rng = np.random.default_rng(7)
    queries = rows(rng, 5)
    index = SparseIndex.from_dense(queries, confidence=np.ones(5))
    with pytest.raises(ValueError, match=message):
        call(index, queries)


def test_cli_builds_from_hdf5_confidence_and_reports_it(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """shard and mutable-create keep the gallery file's `confidence`; query writes each hit's row and
    query confidence and filters with --min_row_confidence, exactly; bad files are one line, exit 2."""
    rng = np.random.default_rng(8)
    x, queries = rows(rng, 120), rows(rng, 8)
    conf, query_conf = confidences(rng, 120), rng.random(8).astype(np.float32)
    names = tuple(f"img{i}.jpg" for i in range(120))
    embedding_files.write_hdf5(tmp_path / "g.hdf5",
                               embedding_files.Embeddings(x, np.arange(120), names, conf))
    embedding_files.write_hdf5(tmp_path / "q.hdf5",
                               embedding_files.Embeddings(queries, np.arange(8), names[:8], query_conf))
    assert call_main(search_main, "shard", f"--embeddings={tmp_path / 'g.hdf5'}", "--shards=2",
                     f"--output={tmp_path / 'shards'}") == 0
    assert call_main(search_main, "mutable-create", f"--embeddings={tmp_path / 'g.hdf5'}",
                     f"--index={tmp_path / 'mut'}", "--block_rows=8") == 0
    shards = ",".join(str(tmp_path / "shards" / f"shard-0000{i}.idx") for i in range(2))
    for index in (shards, str(tmp_path / "mut")):
        out = tmp_path / "r.npz"
        assert call_main(search_main, "query", f"--index={index}", f"--queries={tmp_path / 'q.hdf5'}",
                         "--k=5", "--min_row_confidence=0.5", f"--output={out}") == 0
        result = np.load(out)
        expected_ids, expected_scores = oracle(x, queries, 5, conf >= 0.5)
        np.testing.assert_array_equal(result["ids"], expected_ids)
        np.testing.assert_array_equal(result["scores"], expected_scores)
        np.testing.assert_array_equal(result["row_confidence"], conf[expected_ids])
        np.testing.assert_array_equal(result["query_confidence"],
                                      np.broadcast_to(query_conf[:, None], (8, 5)))
    capsys.readouterr()
    # A gallery whose confidence has the wrong length or a NaN: one line, exit 2, nothing written.
    for bad in (np.ones(119, np.float32), np.where(np.arange(120) == 3, np.nan, conf)):
        path = tmp_path / "bad.hdf5"
        with h5py.File(path, "w") as f:
            f["embedding"], f["confidence"] = x, bad
        assert_main_user_error(capsys, search_main, ["shard", f"--embeddings={path}", "--shards=2",
                                                     f"--output={tmp_path / 'bad_shards'}"],
                               "bad.hdf5", "'confidence'")
        assert not (tmp_path / "bad_shards").exists()
        assert_main_user_error(capsys, search_main, ["mutable-create", f"--embeddings={path}",
                                                     f"--index={tmp_path / 'bad_mut'}"],
                               "bad.hdf5", "'confidence'")
        assert not (tmp_path / "bad_mut" / "manifest.json").exists()
    embedding_files.write_hdf5(tmp_path / "plain.hdf5", embedding_files.Embeddings(x[:3], np.arange(3), ()))
    assert_main_user_error(capsys, search_main, ["add", f"--index={tmp_path / 'mut'}",
                                                 f"--embeddings={tmp_path / 'plain.hdf5'}"],
                           "plain.hdf5", "keeps a confidence per row")
    SparseIndex.from_dense(x).save(tmp_path / "plain.idx")
    assert_main_user_error(capsys, search_main, ["query", f"--index={tmp_path / 'plain.idx'}",
                                                 f"--queries={tmp_path / 'q.hdf5'}",
                                                 "--min_row_confidence=0.5"],
                           "--min_row_confidence", "built with a confidence")
