"""The index file format across versions: checksums against a Python XXH64 written from the spec,
version 1 files written by tests/index_files.py loading and searching as a fresh index, corrupted and
future-version files refused with one clear line."""

from __future__ import annotations

import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.sparse
from conftest import assert_user_error, run_module
from index_files import HEADER_SIZE_V1, SEGMENT_ROWS, header_hash, write_v1, xxh64

from sparse_embed.errors import DataError
from sparse_embed.search import SEARCH_MODES, SparseIndex, brute_force_search

pytestmark = pytest.mark.unit

EXACT_MODES = tuple(mode for mode in SEARCH_MODES if mode != "approx")
_PRIME32 = 2654435761


def sanity_buffer(size: int = 101) -> bytes:
    """The byte sequence of xxHash's own sanity check (each byte the top of a squared uint32)."""
    out, state = bytearray(), _PRIME32
    for _ in range(size):
        out.append(state >> 24)
        state = state * state & 0xFFFFFFFF
    return bytes(out)


# (input, seed, XXH64) from the reference implementation's sanity check and the spec's examples;
# 101 bytes cover the 32-byte stripes, 14 the 8- and 4-byte tail steps, 1 the byte step.
VECTORS = [
    (b"", 0, 0xEF46DB3751D8E999),
    (b"", _PRIME32, 0xAC75FDA2929B17EF),
    (sanity_buffer()[:1], 0, 0x4FCE394CC88952D8),
    (sanity_buffer()[:1], _PRIME32, 0x739840CB819FA723),
    (sanity_buffer()[:14], 0, 0xCFFA8DB881BC3A3D),
    (sanity_buffer()[:14], _PRIME32, 0x5B9611585EFCC9CB),
    (sanity_buffer(), 0, 0x0EAB543384F878AD),
    (sanity_buffer(), _PRIME32, 0xCAA65939306F1E21),
    (b"a", 0, 0xD24EC4F1A98C6E5B),
    (b"abc", 0, 0x44BC2CF5AD770999),
    (b"Nobody inspects the spammish repetition", 0, 0xFBCEA83C8A378BF1),
]


@pytest.mark.parametrize(("data", "seed", "expected"), VECTORS)
def test_xxh64_reference_vectors(data: bytes, seed: int, expected: int) -> None:
    assert xxh64(data, seed) == expected


def sparse_rows(rng: np.random.Generator, n: int, dim: int, density: float) -> np.ndarray:
    """float32 rows with negative values, an all-zero row and two identical rows (ties)."""
    x = np.where(rng.random((n, dim)) < density, rng.normal(size=(n, dim)), 0).astype(np.float32)
    if n > 3:
        x[1] = 0
        x[3] = x[2]
    return x


def test_python_xxh64_equals_the_checksums_the_writer_stores(tmp_path: Path) -> None:
    """The current writer's file: its header hash (last 8 header bytes) and payload hash (byte 48)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "current.idx"
    SparseIndex.from_dense(sparse_rows(rng, 500, 64, 0.1)).save(path)
    data = path.read_bytes()
    (header_size,) = struct.unpack_from("<I", data, 12)
    assert header_size > HEADER_SIZE_V1
    header = data[:header_size]
    (payload_hash,) = struct.unpack_from("<Q", header, 48)
    (stored_header_hash,) = struct.unpack_from("<Q", header, header_size - 8)
    assert xxh64(data[header_size:]) == payload_hash
    assert header_hash(header) == stored_header_hash


def assert_same_results(a: SparseIndex, b: SparseIndex, oracle: tuple[np.ndarray, np.ndarray],
                        queries: np.ndarray, k: int, threshold: float | None) -> None:
    for mode in EXACT_MODES:
        ids_a, scores_a = a.search(queries, k, threshold, mode=mode)
        ids_b, scores_b = b.search(queries, k, threshold, mode=mode)
        np.testing.assert_array_equal(ids_a, ids_b, err_msg=mode)
        np.testing.assert_array_equal(scores_a, scores_b, err_msg=mode)
        np.testing.assert_array_equal(ids_a, oracle[0], err_msg=mode)
        np.testing.assert_allclose(scores_a, oracle[1], rtol=1e-5, atol=1e-5, err_msg=mode)


@pytest.mark.parametrize(("n", "dim", "density", "k", "threshold"), [
    (600, 48, 0.15, 10, None),
    (600, 48, 0.15, 700, 0.5),          # k > N, and a threshold
    # More than one 65536-row segment block: positions restart at 0 in the second.
    (SEGMENT_ROWS + 4500, 24, 0.02, 7, None),
])
def test_version_1_file_searches_like_a_fresh_index(tmp_path: Path, n: int, dim: int, density: float,
                                                   k: int, threshold: float | None) -> None:
    rng = np.random.default_rng(n + dim)
    x = sparse_rows(rng, n, dim, density)
    labels = rng.integers(-5, 1000, n).astype(np.int32)
    write_v1(tmp_path / "old.idx", scipy.sparse.csr_matrix(x), labels)
    old = SparseIndex.load(tmp_path / "old.idx")
    assert (len(old), old.dim, old.nnz) == (n, dim, int((x != 0).sum()))
    np.testing.assert_array_equal(old.labels, labels)
    fresh = SparseIndex.from_dense(x, zero_threshold=0.0)
    queries = sparse_rows(rng, 40, dim, 0.3)
    queries[0] = 0  # an all-zero query
    queries[5] = x[2]  # a query with tied rows
    oracle = brute_force_search(x, queries, k, threshold=threshold)
    assert_same_results(old, fresh, oracle, queries, k, threshold)


def test_version_1_edge_cases_empty_index_and_no_labels(tmp_path: Path) -> None:
    write_v1(tmp_path / "empty.idx", np.zeros((0, 5), np.float32))
    empty = SparseIndex.load(tmp_path / "empty.idx")
    assert (len(empty), empty.dim, empty.labels) == (0, 5, None)
    ids, scores = empty.search(np.ones((2, 5), np.float32), 3)
    np.testing.assert_array_equal(ids, -1)
    assert np.isneginf(scores).all()

    x = np.zeros((20, 6), np.float32)
    x[7, 2] = 1.5
    write_v1(tmp_path / "one.idx", x)
    one = SparseIndex.load(tmp_path / "one.idx")
    assert one.labels is None
    ids, scores = one.search(np.eye(6, dtype=np.float32), 2, 0.0)
    expected_ids, expected_scores = brute_force_search(x, np.eye(6, dtype=np.float32), 2, threshold=0.0)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(scores, expected_scores)


def test_version_1_file_saves_as_the_current_version(tmp_path: Path) -> None:
    """An old file is upgraded by loading and saving it; the result searches the same."""
    rng = np.random.default_rng(3)
    x = sparse_rows(rng, 300, 32, 0.2)
    write_v1(tmp_path / "old.idx", x)
    old = SparseIndex.load(tmp_path / "old.idx")
    old.save(tmp_path / "new.idx")
    new = SparseIndex.load(tmp_path / "new.idx")
    (version,) = struct.unpack_from("<I", (tmp_path / "new.idx").read_bytes(), 8)
    assert version > 1
    queries = sparse_rows(rng, 20, 32, 0.3)
    assert_same_results(new, old, brute_force_search(x, queries, 5), queries, 5, None)


def flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:]


@pytest.mark.parametrize(("where", "message"), [
    ("payload", "is corrupted: checksum mismatch"),
    ("header", "is corrupted: header checksum mismatch"),
    ("labels", "is corrupted: checksum mismatch"),
])
def test_version_1_file_with_a_flipped_byte_is_refused(tmp_path: Path, where: str, message: str) -> None:
    rng = np.random.default_rng(4)
    x = sparse_rows(rng, 200, 16, 0.2)
    data = write_v1(tmp_path / "good.idx", x, np.arange(200, dtype=np.int32))
    # A value in the middle of the payload, the row count in the header, the last label.
    at = {"payload": len(data) // 2, "header": 17, "labels": len(data) - 64 + 3}[where]
    path = tmp_path / "bad.idx"
    path.write_bytes(flipped(data, at))
    with pytest.raises(DataError) as error:
        SparseIndex.load(path)
    text = str(error.value)
    assert str(path) in text and message in text and "\n" not in text


def test_truncated_version_1_file_is_refused(tmp_path: Path) -> None:
    data = write_v1(tmp_path / "good.idx", sparse_rows(np.random.default_rng(5), 100, 16, 0.2))
    path = tmp_path / "short.idx"
    path.write_bytes(data[:-64])
    with pytest.raises(DataError, match=r"short\.idx is truncated: \d+ bytes, expected \d+"):
        SparseIndex.load(path)


def future_version(data: bytes, version: int) -> bytes:
    """`data` (a current file) relabelled as `version`, its header checksum recomputed."""
    (header_size,) = struct.unpack_from("<I", data, 12)
    header = bytearray(data[:header_size])
    struct.pack_into("<I", header, 8, version)
    struct.pack_into("<Q", header, header_size - 8, header_hash(bytes(header)))
    return bytes(header) + data[header_size:]


def test_unknown_future_version_is_refused_with_its_number(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    SparseIndex.from_dense(sparse_rows(rng, 100, 16, 0.2)).save(tmp_path / "now.idx")
    future = tmp_path / "future.idx"
    future.write_bytes(future_version((tmp_path / "now.idx").read_bytes(), 99))
    with pytest.raises(DataError, match=r"future\.idx has index format version 99; "
                                        r"this build reads versions 1 to \d+"):
        SparseIndex.load(future)
    # A 64-byte header of an unknown version, checksums valid, is refused the same way.
    write_v1(tmp_path / "future1.idx", sparse_rows(rng, 100, 16, 0.2), version=77)
    with pytest.raises(DataError, match=r"future1\.idx has index format version 77"):
        SparseIndex.load(tmp_path / "future1.idx")


def write_queries(path: Path, queries: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("embedding", data=queries)


@pytest.mark.integration
def test_cli_queries_a_version_1_file_and_refuses_a_corrupted_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    x = sparse_rows(rng, 300, 24, 0.2)
    data = write_v1(tmp_path / "old.idx", x)
    queries = sparse_rows(rng, 12, 24, 0.3)
    write_queries(tmp_path / "q.hdf5", queries)
    proc = run_module("sparse_embed.search", "query", f"--index={tmp_path / 'old.idx'}",
                      f"--queries={tmp_path / 'q.hdf5'}", "--k=4", f"--output={tmp_path / 'r.npz'}")
    assert proc.returncode == 0, proc.stderr
    result = np.load(tmp_path / "r.npz")
    np.testing.assert_array_equal(result["ids"], brute_force_search(x, queries, 4)[0])

    (tmp_path / "bad.idx").write_bytes(flipped(data, len(data) // 2))
    proc = run_module("sparse_embed.search", "query", f"--index={tmp_path / 'bad.idx'}",
                      f"--queries={tmp_path / 'q.hdf5'}")
    assert_user_error(proc, "bad.idx is corrupted: checksum mismatch")
    (tmp_path / "future.idx").write_bytes(future_version(data, 42))
    proc = run_module("sparse_embed.search", "query", f"--index={tmp_path / 'future.idx'}",
                      f"--queries={tmp_path / 'q.hdf5'}")
    assert_user_error(proc, "future.idx has index format version 42")
