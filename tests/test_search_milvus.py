"""Milvus Lite round trip: `to_milvus` + `MilvusIndex.search` equal the exact `SparseIndex` search."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import missing_dependency

from sparse_embed.data.embeddings import Embeddings, write_hdf5
from sparse_embed.errors import DataError
from sparse_embed.search import SparseIndex, brute_force_search
from tests.conftest import assert_user_error, run_module

pytestmark = pytest.mark.integration


def _milvus():
    """The milvus module; skips outside CI (fails in CI and `make test`) when the extra is missing."""
    try:
        from sparse_embed.search import milvus
    except ImportError as e:
        missing_dependency(f"the milvus extra is not installed ({e}); run pip install -e \".[milvus]\"")
    return milvus


N, DIM, DENSE = 300, 64, 8


def grid_rows(rng: np.random.Generator, n: int, density: float) -> np.ndarray:
    """Non-negative multiples of 1/4: float32 sums are exact in any order, and scores tie often."""
    x = rng.integers(1, 5, size=(n, DIM)).astype(np.float32) / 4
    x[rng.random((n, DIM)) > density] = 0
    return x


def write(path, x):
    write_hdf5(path, Embeddings(x, np.arange(len(x)) % 7, tuple(f"id{i}/img.jpg" for i in range(len(x)))))
    return path


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    milvus = _milvus()
    tmp = tmp_path_factory.mktemp("milvus")
    rng = np.random.default_rng(11)
    db = grid_rows(rng, N, 0.1)
    db[5] = 0  # an empty row: stored with no dimension a query has, it scores 0
    db[100:110] = db[7]  # duplicates: ties
    dense = rng.integers(-3, 4, size=(N, DENSE)).astype(np.float32) / 8
    uri = str(tmp / "milvus.db")
    summary = milvus.to_milvus(write(tmp / "g.hdf5", db), uri, "gallery",
                               dense_path=write(tmp / "d.hdf5", dense), zero_threshold=0.0, batch_rows=128,
                               progress=False)
    assert summary["rows"] == N and summary["nnz"] == np.count_nonzero(db) and summary["dense_dim"] == DENSE
    queries = grid_rows(rng, 20, 0.15)
    queries[0] = 0  # all-zero query: every row scores 0
    queries[1] = db[7]
    return {"milvus": milvus, "tmp": tmp, "uri": uri, "db": db, "dense": dense, "queries": queries,
            "q_dense": rng.integers(-3, 4, size=(20, DENSE)).astype(np.float32) / 8,
            "index": milvus.MilvusIndex(uri, "gallery")}


@pytest.mark.parametrize(("k", "threshold"), [(1, None), (10, None), (10, 1.0), (400, None), (400, 0.5)])
def test_round_trip_equals_exact_search(gallery, k, threshold):
    index = gallery["index"]
    assert (len(index), index.dim, index.dense_dim) == (N, DIM, DENSE)
    want = SparseIndex.from_dense(gallery["db"], 0.0).search(gallery["queries"], k, threshold)
    oracle = brute_force_search(gallery["db"], gallery["queries"], k, threshold)
    got = index.search(gallery["queries"], k, threshold)
    for ids, scores in (got, oracle):
        np.testing.assert_array_equal(ids, want[0])
        np.testing.assert_array_equal(scores, want[1])


def test_rerank_equals_exact_search(gallery):
    rerank = (gallery["dense"], gallery["q_dense"])
    index = SparseIndex.from_dense(gallery["db"], 0.0)
    want = index.search(gallery["queries"], 5, rerank=rerank, rerank_k=40)
    got = gallery["index"].search(gallery["queries"], 5, rerank=gallery["q_dense"], rerank_k=40)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_random_floats_equal_up_to_rounding(gallery):
    """Milvus Lite sums in float64, the index in float32: scores agree to float32 rounding."""
    milvus = gallery["milvus"]
    rng = np.random.default_rng(5)
    db = rng.random((200, DIM)).astype(np.float32) * (rng.random((200, DIM)) < 0.15)
    queries = rng.random((15, DIM)).astype(np.float32) * (rng.random((15, DIM)) < 0.2)
    milvus.to_milvus(write(gallery["tmp"] / "r.hdf5", db), gallery["uri"], "floats", zero_threshold=0.0,
                     progress=False)
    got = milvus.MilvusIndex(gallery["uri"], "floats").search(queries, 10)
    want = brute_force_search(db, queries, 10)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
    gaps = np.abs(np.diff(want[1], axis=1)) > 1e-5
    separated = np.ones(want[1].shape, bool)
    separated[:, 1:] &= gaps
    separated[:, :-1] &= gaps
    np.testing.assert_array_equal(got[0][separated], want[0][separated])


def test_bad_input(gallery):
    milvus, tmp, uri = gallery["milvus"], gallery["tmp"], gallery["uri"]
    index = gallery["index"]
    with pytest.raises(ValueError, match=r"\[Q, 64\]"):
        index.search(np.ones((2, 32), np.float32), 3)
    with pytest.raises(ValueError, match="non-negative"):
        index.search(-np.ones((2, DIM), np.float32), 3)
    with pytest.raises(ValueError, match=r"rerank query vectors must have shape \[20, 8\]"):
        index.search(gallery["queries"], 3, rerank=np.ones((20, 4), np.float32))
    with pytest.raises(DataError, match="cannot reach Milvus at http://127.0.0.1:1"):
        milvus.MilvusIndex("http://127.0.0.1:1", "gallery")
    with pytest.raises(DataError, match="not found"):
        milvus.MilvusIndex(str(tmp / "absent.db"), "gallery")
    with pytest.raises(DataError, match="collection 'nope' not found"):
        milvus.MilvusIndex(uri, "nope")
    with pytest.raises(DataError, match="already exists.*--overwrite"):
        milvus.to_milvus(tmp / "g.hdf5", uri, "gallery", progress=False)
    negative = write(tmp / "neg.hdf5", -np.ones((3, DIM), np.float32))
    with pytest.raises(DataError, match="row 0 has negative entries"):
        milvus.to_milvus(negative, uri, "negative", progress=False)
    # A collection with another schema, written by a plain client.
    client = milvus.MilvusClient(uri)
    schema = milvus.MilvusClient.create_schema(auto_id=False)
    schema.add_field("pk", milvus.DataType.INT64, is_primary=True)
    schema.add_field("vector", milvus.DataType.FLOAT_VECTOR, dim=4)
    client.create_collection("foreign", schema=schema)
    with pytest.raises(DataError, match="'foreign'.*another schema"):
        milvus.MilvusIndex(uri, "foreign")


@pytest.mark.slow
def test_cli(gallery, tmp_path):
    uri = str(tmp_path / "cli.db")
    gallery_file = gallery["tmp"] / "g.hdf5"
    proc = run_module("sparse_embed.search", "to-milvus", f"--embeddings={gallery_file}", f"--uri={uri}",
                      "--collection=cli", f"--dense={gallery['tmp'] / 'd.hdf5'}", "--zero_threshold=0")
    assert proc.returncode == 0, proc.stderr
    assert f"{N} rows, {DIM} dims" in proc.stdout and f"dense vectors of {DENSE} dims" in proc.stdout
    proc = run_module("sparse_embed.search", "to-milvus", f"--embeddings={gallery_file}",
                      "--uri=http://127.0.0.1:1", "--collection=cli")
    assert_user_error(proc, "cannot reach Milvus at http://127.0.0.1:1")
    proc = run_module("sparse_embed.search", "to-milvus", f"--embeddings={gallery_file}", f"--uri={uri}",
                      "--collection=cli")
    assert_user_error(proc, "already exists")
    proc = run_module("sparse_embed.search", "to-milvus", f"--embeddings={tmp_path / 'missing.hdf5'}",
                      f"--uri={uri}", "--collection=other")
    assert_user_error(proc, "missing.hdf5 not found")
    want = brute_force_search(gallery["db"], gallery["queries"], 10)
    queries = write(tmp_path / "q.hdf5", gallery["queries"])
    proc = run_module("sparse_embed.search", "query", f"--uri={uri}", "--collection=cli",
                      f"--queries={queries}", "--k=10", f"--output={tmp_path / 'r.npz'}")
    assert proc.returncode == 0, proc.stderr
    assert f"20 queries, collection cli in {uri}, {N} rows" in proc.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "r.npz")["ids"], want[0])
    np.testing.assert_array_equal(np.load(tmp_path / "r.npz")["scores"], want[1])
    proc = run_module("sparse_embed.search", "query", f"--uri={uri}", "--collection=cli",
                      f"--queries={write(tmp_path / 'narrow.hdf5', gallery['queries'][:, :32])}")
    assert_user_error(proc, "narrow.hdf5", "[Q, 64]")
    proc = run_module("sparse_embed.search", "query", "--uri=http://127.0.0.1:1", "--collection=cli",
                      f"--queries={queries}")
    assert_user_error(proc, "cannot reach Milvus at http://127.0.0.1:1")
    proc = run_module("sparse_embed.search", "query", f"--uri={uri}", "--collection=cli",
                      f"--queries={queries}", "--mode=pruned")
    assert_user_error(proc, "drop them with --uri")
    # Opened here only now: a Milvus Lite database is open to one process at a time.
    with gallery["milvus"].MilvusIndex(uri, "cli") as index:
        got = index.search(gallery["queries"], 10)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.slow
def test_cli_refuses_a_collection_of_another_schema(tmp_path):
    _milvus()
    uri = str(tmp_path / "foreign.db")
    # Written by a plain client in another process: a Milvus Lite database is open to one process at a time.
    foreign = ("from pymilvus import DataType, MilvusClient\n"
               f"client = MilvusClient({uri!r})\n"
               "schema = MilvusClient.create_schema(auto_id=False)\n"
               "schema.add_field('pk', DataType.INT64, is_primary=True)\n"
               "schema.add_field('vector', DataType.FLOAT_VECTOR, dim=4)\n"
               "client.create_collection('faces', schema=schema)\n")
    proc = subprocess.run([sys.executable, "-c", foreign], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    queries = write(tmp_path / "q.hdf5", np.ones((2, DIM), np.float32))
    proc = run_module("sparse_embed.search", "query", f"--uri={uri}", "--collection=faces",
                      f"--queries={queries}")
    assert_user_error(proc, "collection 'faces'", "another schema")
