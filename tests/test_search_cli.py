"""Search command lines: `python -m sparse_embed.search hdf5-to-bin`, the mutable index commands
(mutable-create / add / remove / compact / info, and query over the directory), the C++ `search`
binary (built from a copy of search/ with its Makefile; one database file or several shards, merged
exactly) and the run targets."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, assert_main_user_error, assert_user_error, run_module

from sparse_embed.data import embeddings as embedding_files
from sparse_embed.search import (
    SEARCH_MODES,
    MutableIndex,
    SparseIndex,
    brute_force_search,
    read_bin,
    write_bin,
)
from sparse_embed.search.__main__ import main as search_main

pytestmark = pytest.mark.integration

def copy_search_dir(destination: Path) -> Path:
    """A copy of search/ (its C++ sources, headers and Makefile), so builds never touch the checkout."""
    destination.mkdir(parents=True, exist_ok=True)
    for path in (ROOT / "search").iterdir():
        if path.name == "Makefile" or path.suffix in (".cpp", ".h"):
            shutil.copy(path, destination / path.name)
    return destination


def make(directory: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "-C", str(directory), *args],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def search_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """search/ copied to a temporary directory with the `search` binary built by make."""
    if shutil.which("make") is None:
        pytest.skip("`make` is not installed")
    if not any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++")):
        pytest.skip("no C++ compiler (c++, g++ or clang++) to build search/search")
    directory = copy_search_dir(tmp_path_factory.mktemp("search"))
    proc = make(directory, "search")
    assert proc.returncode == 0, proc.stderr
    return directory


def identities(rng: np.random.Generator, rows: int, dim: int, people: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Sparse embeddings clustered by identity, values exact in float32 (multiples of 1/8)."""
    labels = rng.integers(0, people, rows)
    prototypes = np.where(rng.random((people, dim)) < 0.15, rng.integers(4, 17, (people, dim)), 0)
    noise = np.where(rng.random((rows, dim)) < 0.05, rng.integers(1, 9, (rows, dim)), 0)
    return ((prototypes[labels] + noise) / 8).astype(np.float32), labels


def parse(output: str, name: str) -> float:
    match = re.search(rf"^\s*{re.escape(name)}\s+([-0-9.]+)", output, re.MULTILINE)
    assert match, (name, output)
    return float(match.group(1))


def test_cli_splits_one_file_into_queries_and_database(search_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    emb, labels = identities(rng, 400, 48, 30)
    write_bin(tmp_path / "db.bin", emb, labels)
    proc = subprocess.run([str(search_dir / "search"), str(tmp_path / "db.bin"), "0", "0",
                           "--num_threads", "2", "--k", "5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # Fewer than 20,000 rows: half are the queries, and the CLI says so.
    assert "only 400 rows; the first 200 are the queries" in out
    queries, q_labels, db, db_labels = emb[:200], labels[:200], emb[200:], labels[200:]
    assert parse(out, "N") == 200 and parse(out, "D") == 48
    assert parse(out, "NNZ") == pytest.approx(100 * (db != 0).mean(), abs=1e-3)
    expected_postings = ((queries != 0) @ (db != 0).sum(axis=0)).mean()
    assert parse(out, "postings/query") == pytest.approx(expected_postings, abs=0.1)
    assert parse(out, "ms/query") >= 0
    ids, _ = brute_force_search(db, queries, 5, threshold=0.0)
    top1 = np.where(ids[:, 0] >= 0, db_labels[ids[:, 0]], -1)
    assert parse(out, "rank-1 label agreement") == pytest.approx((top1 == q_labels).mean(),
                                                                 abs=5e-5)


def test_cli_query_file_and_dense_rerank(search_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    db, db_labels = identities(rng, 300, 32, 20)
    queries, q_labels = identities(rng, 40, 32, 20)
    db_dense = (rng.integers(-8, 9, (300, 8)) / 4).astype(np.float32)
    q_dense = (rng.integers(-8, 9, (40, 8)) / 4).astype(np.float32)
    write_bin(tmp_path / "db.bin", db, db_labels)
    write_bin(tmp_path / "q.bin", queries, q_labels)
    np.save(tmp_path / "db.npy", db_dense)
    np.save(tmp_path / "q.npy", q_dense)
    proc = subprocess.run([str(search_dir / "search"), str(tmp_path / "db.bin"), "20", "none",
                           str(tmp_path / "q.bin"), "--k", "3",
                           "--db_dense", str(tmp_path / "db.npy"),
                           "--query_dense", str(tmp_path / "q.npy")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "re-rank top 20 with 8-d dense vectors" in proc.stdout
    assert parse(proc.stdout, "N") == 300
    ids, _ = brute_force_search(db, queries, 3, rerank=(db_dense, q_dense), rerank_k=20)
    hits = (db_labels[ids] == q_labels[:, None]).any(axis=1).mean()
    assert parse(proc.stdout, "label in top-3") == pytest.approx(hits, abs=5e-5)


@pytest.mark.parametrize("args, message", [
    ([], "expected 3 or 4 positional arguments"),
    (["x.bin", "10"], "expected 3 or 4 positional arguments"),
    (["x.bin", "ten", "0"], "rerank_topk must be an integer"),
    (["x.bin", "10", "abc"], "threshold must be a number"),
    (["x.bin", "10", "0", "--bogus", "1"], "unknown option --bogus"),
    (["x.bin", "10", "0", "--num_threads"], "--num_threads needs a value"),
    (["x.bin", "2", "0", "--k", "5", "--db_dense", "d.npy"], "must be >= --k"),
])
def test_cli_bad_arguments(search_dir: Path, args: list[str], message: str) -> None:
    proc = subprocess.run([str(search_dir / "search"), *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: search <db.bin>")
    assert message in proc.stderr


def test_cli_old_option_spellings(search_dir: Path, tmp_path: Path) -> None:
    """--name=value works, and the old spellings (--topk, --threads, --ids, ...) still do, each with one
    deprecation line, for the same results."""
    rng = np.random.default_rng(2)
    emb, labels = identities(rng, 200, 32, 20)
    write_bin(tmp_path / "db.bin", emb, labels)
    new = subprocess.run([str(search_dir / "search"), str(tmp_path / "db.bin"), "0", "0", "--k=4",
                          "--num_threads=1", f"--output_ids={tmp_path / 'new.npy'}"],
                         capture_output=True, text=True, timeout=120)
    old = subprocess.run([str(search_dir / "search"), str(tmp_path / "db.bin"), "0", "0", "--topk", "4",
                          "--threads", "1", "--ids", str(tmp_path / "old.npy")],
                         capture_output=True, text=True, timeout=120)
    assert new.returncode == 0 and old.returncode == 0, (new.stderr, old.stderr)
    assert new.stderr == ""
    assert old.stderr.splitlines() == [
        f"search: warning: {o} is deprecated and goes in the next release; use {n}"
        for o, n in (("--topk", "--k"), ("--threads", "--num_threads"), ("--ids", "--output_ids"))]
    np.testing.assert_array_equal(np.load(tmp_path / "new.npy"), np.load(tmp_path / "old.npy"))


def test_cli_bad_files(search_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.run([str(search_dir / "search"), str(tmp_path / "missing.bin"), "0", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"search: error: cannot open {tmp_path / 'missing.bin'}: No such file or directory"]
    (tmp_path / "junk.bin").write_bytes(b"\x10\x00\x00\x00" + b"\x01" * 13)
    proc = subprocess.run([str(search_dir / "search"), str(tmp_path / "junk.bin"), "0", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not a .bin embedding file" in proc.stderr
    # A real file cut short: bad input too, one line, status 2.
    rng = np.random.default_rng(0)
    write_bin(tmp_path / "whole.bin", np.abs(rng.normal(size=(20, 8))).astype(np.float32),
              np.arange(20))
    data = (tmp_path / "whole.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    proc = subprocess.run([str(search_dir / "search"), str(tmp_path / "cut.bin"), "0", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("target, variable, default", [
    ("runmegaface", "MEGAFACE_BIN", "data/megaface/megaface_distractors.bin"),
    ("runfacescrub", "FACESCRUB_BIN", "data/megaface/facescrub.bin"),
])
def test_make_run_targets_explain_missing_files(tmp_path: Path, target: str, variable: str,
                                                default: str) -> None:
    if shutil.which("make") is None:
        pytest.skip("`make` is not installed")
    directory = copy_search_dir(tmp_path / "search")
    missing = tmp_path / "nowhere.bin"
    for args, path in (([f"{variable}={missing}"], str(missing)), ([], default)):
        proc = make(directory, target, *args)
        assert proc.returncode != 0
        assert path in proc.stderr and "not found" in proc.stderr
        assert "python -m sparse_embed.embed" in proc.stderr
        assert "python -m sparse_embed.search hdf5-to-bin emb.hdf5" in proc.stderr
    # The file check comes first: nothing was compiled.
    assert not (directory / "search").exists()


def test_make_runfacescrub_runs_the_binary(search_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    emb, labels = identities(rng, 60, 16, 5)
    write_bin(tmp_path / "facescrub.bin", emb, labels)
    proc = make(search_dir, "runfacescrub", f"FACESCRUB_BIN={tmp_path / 'facescrub.bin'}",
                "RERANK_TOPK=0", "SEARCH_ARGS=--num_threads 1")
    assert proc.returncode == 0, proc.stderr
    assert "postings/query" in proc.stdout and "rank-1 label agreement" in proc.stdout


def write_hdf5(path: Path, **datasets: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        for name, data in datasets.items():
            f.create_dataset(name, data=data)


def test_hdf5_to_bin(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    emb = np.where(rng.random((70, 12)) < 0.4, rng.standard_normal((70, 12)), 0)
    emb = emb.astype(np.float32)
    labels = rng.integers(0, 9, 70)
    write_hdf5(tmp_path / "emb.hdf5", embedding=emb, label=labels,
               filename=np.array([b"a"] * 70))
    proc = run_module("sparse_embed.search", "hdf5-to-bin", str(tmp_path / "emb.hdf5"),
                      str(tmp_path / "emb.bin"), "--zero_threshold", "0.25")
    assert proc.returncode == 0, proc.stderr
    kept = np.where(np.abs(emb) > 0.25, emb, 0)
    assert f"{(kept != 0).sum() / 70:.2f} non-zeros per row" in proc.stdout
    matrix, read_labels = read_bin(tmp_path / "emb.bin", dim=12)
    np.testing.assert_array_equal(matrix.toarray(), kept)
    np.testing.assert_array_equal(read_labels, labels)


def test_hdf5_to_bin_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.bin"
    assert_main_user_error(capsys, search_main, ["hdf5-to-bin", tmp_path / "missing.hdf5", out],
                           "not found", "missing.hdf5")
    write_hdf5(tmp_path / "no_label.hdf5", embedding=np.ones((3, 4), np.float32))
    assert_main_user_error(capsys, search_main, ["hdf5-to-bin", tmp_path / "no_label.hdf5", out],
                           "no 'label' dataset")
    (tmp_path / "text.hdf5").write_text("not hdf5")
    assert_main_user_error(capsys, search_main, ["hdf5-to-bin", tmp_path / "text.hdf5", out],
                           "not a readable HDF5 file")
    write_hdf5(tmp_path / "ok.hdf5", embedding=np.ones((3, 4), np.float32), label=np.arange(3))
    assert_main_user_error(capsys, search_main, ["hdf5-to-bin", tmp_path / "ok.hdf5", out,
                                                 "--zero_threshold", "-1"], "--zero_threshold must be >= 0")
    # The old spelling of the zero threshold still works, with one deprecation line first.
    proc = run_module("sparse_embed.search", "hdf5-to-bin", str(tmp_path / "ok.hdf5"), str(out),
                      "--threshold", "-1")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0].endswith("--threshold is deprecated and goes in the next release; "
                                                "use --zero_threshold")
    assert "--zero_threshold must be >= 0" in proc.stderr.splitlines()[1]
    assert not out.exists()


def run_search(search_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(search_dir / "search"), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def shard_files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A gallery of 300 rows (duplicates across file boundaries: ties) as one file and as shards."""
    rng = np.random.default_rng(5)
    directory = tmp_path_factory.mktemp("shards")
    db, labels = identities(rng, 300, 40, 25)
    db[100:110] = db[95]
    queries, q_labels = identities(rng, 30, 40, 25)
    queries[0] = 0
    write_bin(directory / "all.bin", db, labels)
    write_bin(directory / "q.bin", queries, q_labels)
    # Row ranges [0, 0) [0, 100) [100, 220) [220, 300); the third as an index file.
    write_bin(directory / "s0.bin", db[:0], labels[:0])
    write_bin(directory / "s1.bin", db[:100], labels[:100])
    SparseIndex.from_dense(db[100:220], 0.0).save(directory / "s2.idx")
    write_bin(directory / "s3.bin", db[220:], labels[220:])
    dense = (rng.integers(-8, 9, (300, 8)) / 4).astype(np.float32)
    q_dense = (rng.integers(-8, 9, (30, 8)) / 4).astype(np.float32)
    np.save(directory / "db.npy", dense)
    np.save(directory / "q.npy", q_dense)
    shards = ",".join(str(directory / f) for f in ("s0.bin", "s1.bin", "s2.idx", "s3.bin"))
    return {"dir": directory, "db": db, "queries": queries, "dense": dense, "q_dense": q_dense,
            "shards": shards}


@pytest.mark.parametrize("rerank_topk, threshold", [(0, "0.5"), (0, "none"), (25, "none")])
def test_cli_several_database_files_merge_exactly(search_dir: Path, shard_files: dict, tmp_path: Path,
                                                  rerank_topk: int, threshold: str) -> None:
    d = shard_files["dir"]
    dense_args = ["--db_dense", d / "db.npy", "--query_dense", d / "q.npy"] if rerank_topk else []
    results = []
    for db, name in ((d / "all.bin", "one"), (shard_files["shards"], "many")):
        proc = run_search(search_dir, db, rerank_topk, threshold, d / "q.bin", "--k", "7",
                          "--num_threads", "2", *dense_args, "--output_ids", tmp_path / f"{name}_ids.npy",
                          "--output_scores", tmp_path / f"{name}_scores.npy")
        assert proc.returncode == 0, proc.stderr
        assert parse(proc.stdout, "N") == 300 and parse(proc.stdout, "D") == 40
        results.append((np.load(tmp_path / f"{name}_ids.npy"), np.load(tmp_path / f"{name}_scores.npy"),
                        proc.stdout))
    assert parse(results[1][2], "shards") == 4
    rerank = (shard_files["dense"], shard_files["q_dense"]) if rerank_topk else None
    want = brute_force_search(shard_files["db"], shard_files["queries"], 7,
                              None if threshold == "none" else float(threshold), rerank=rerank,
                              rerank_k=max(rerank_topk, 7))
    for ids, scores, _ in results:
        np.testing.assert_array_equal(ids, want[0])
        np.testing.assert_array_equal(scores, want[1])
    # Postings touched are a property of the data, not of how it is split.
    assert parse(results[0][2], "postings/query") == parse(results[1][2], "postings/query")


def test_cli_splits_queries_off_several_files(search_dir: Path, shard_files: dict, tmp_path: Path) -> None:
    d = shard_files["dir"]
    db = shard_files["db"]
    # 300 rows: the first 150 are the queries, all of a.bin and the start of b.bin.
    write_bin(tmp_path / "a.bin", db[:120], np.zeros(120, int))
    write_bin(tmp_path / "b.bin", db[120:], np.zeros(180, int))
    proc = run_search(search_dir, f"{tmp_path / 'a.bin'},{tmp_path / 'b.bin'}", 20, "none", "--k", "4",
                      "--db_dense", d / "db.npy", "--output_ids", tmp_path / "ids.npy")
    assert proc.returncode == 0, proc.stderr
    assert "only 300 rows; the first 150 are the queries" in proc.stdout
    want, _ = brute_force_search(db[150:], db[:150], 4, rerank=(shard_files["dense"][150:],
                                                                shard_files["dense"][:150]), rerank_k=20)
    np.testing.assert_array_equal(np.load(tmp_path / "ids.npy"), want)
    proc = run_search(search_dir, f"{tmp_path / 'a.bin'},{d / 's2.idx'}", 0, "0")
    assert proc.returncode == 2 and "needs .bin database files" in proc.stderr


def test_cli_refuses_mismatched_database_files(search_dir: Path, shard_files: dict, tmp_path: Path) -> None:
    d = shard_files["dir"]
    SparseIndex.from_dense(np.eye(4, 32, dtype=np.float32)).save(tmp_path / "narrow.idx")
    for files, message in (
            ([d / "s2.idx", tmp_path / "narrow.idx"], "database files of different dimensions: "),
            ([tmp_path / "narrow.idx", d / "s1.bin"], "outside the dimension 32 of"),
            ([d / "s1.bin", tmp_path / "missing.idx"], "missing.idx")):
        proc = run_search(search_dir, ",".join(map(str, files)), 0, "0", d / "q.bin")
        assert proc.returncode == 2
        assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
    proc = run_search(search_dir, f"{d / 's1.bin'},,{d / 's3.bin'}", 0, "0")
    assert proc.returncode == 2 and "empty database file name" in proc.stderr


def test_make_run_target_takes_several_shards(search_dir: Path, shard_files: dict, tmp_path: Path) -> None:
    d = shard_files["dir"]
    shards = f"{d / 's1.bin'},{d / 's3.bin'}"
    proc = make(search_dir, "runfacescrub", f"FACESCRUB_BIN={shards}", "RERANK_TOPK=0",
                "SEARCH_ARGS=--num_threads 1")
    assert proc.returncode == 0, proc.stderr
    assert parse(proc.stdout, "shards") == 2 and parse(proc.stdout, "N") == 90
    proc = make(search_dir, "runfacescrub", f"FACESCRUB_BIN={shards},{tmp_path / 'gone.bin'}")
    assert proc.returncode != 0 and f"{tmp_path / 'gone.bin'} not found" in proc.stderr


def gallery_file(path: Path, rows: np.ndarray, labels: np.ndarray | None = None) -> Path:
    labels = np.arange(len(rows)) if labels is None else labels
    names = tuple(f"img{i}.jpg" for i in range(len(rows)))
    embedding_files.write_hdf5(path, embedding_files.Embeddings(rows, labels, names))
    return path


def search_cli(*args: str) -> subprocess.CompletedProcess:
    return run_module("sparse_embed.search", *args)


def query_ids(index: str, queries: Path, out: Path, *extra: str) -> tuple[np.ndarray, np.ndarray]:
    proc = search_cli("query", f"--index={index}", f"--queries={queries}", "--k=6", f"--output={out}", *extra)
    assert proc.returncode == 0, proc.stderr
    result = np.load(out)
    return result["ids"], result["scores"]


def oracle(live: dict[int, np.ndarray], queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force over the live rows in increasing id order, positions mapped to the ids."""
    ids = np.array(sorted(live), np.int64)
    positions, scores = brute_force_search(np.stack([live[i] for i in ids]), queries, k)
    return np.where(positions >= 0, ids[np.maximum(positions, 0)], -1), scores


def test_mutable_index_commands_equal_a_rebuilt_index(tmp_path: Path) -> None:
    """create -> add (next ids, then an ids file) -> remove (--ids and --ids_file) -> query -> compact ->
    query: every result equals brute force over the live rows and a SparseIndex rebuilt from them."""
    rng = np.random.default_rng(11)
    base, _ = identities(rng, 300, 40, 25)
    more, _ = identities(rng, 40, 40, 25)
    named, _ = identities(rng, 10, 40, 25)
    queries, _ = identities(rng, 30, 40, 25)
    gallery_file(tmp_path / "q.hdf5", queries)
    directory = tmp_path / "gallery.mut"
    proc = search_cli("mutable-create", f"--embeddings={gallery_file(tmp_path / 'g.hdf5', base)}",
                      f"--index={directory}", "--zero_threshold=0", "--block_rows=16")
    assert proc.returncode == 0, proc.stderr
    assert "ids 0..299" in proc.stdout
    assert "300 rows, 40 dims (300 base, 0 delta, 0 tombstones)" in proc.stdout
    live = dict(enumerate(base))

    proc = search_cli("add", f"--index={directory}",
                      f"--embeddings={gallery_file(tmp_path / 'm.hdf5', more)}")
    assert proc.returncode == 0, proc.stderr
    assert "added 40 rows (ids 300..339)" in proc.stdout
    live.update(zip(range(300, 340), more, strict=True))
    named_ids = [5000 + 7 * i for i in range(10)]
    (tmp_path / "named.txt").write_text("\n".join(map(str, named_ids)) + "\n")
    proc = search_cli("add", f"--index={directory}",
                      f"--embeddings={gallery_file(tmp_path / 'n.hdf5', named)}",
                      f"--ids_file={tmp_path / 'named.txt'}")
    assert proc.returncode == 0, proc.stderr
    live.update(zip(named_ids, named, strict=True))

    gone = [0, 17, 18, 150, 301, 5007]
    (tmp_path / "gone.txt").write_text("150, 301\n5007")
    proc = search_cli("remove", f"--index={directory}", "--ids=0,17,18",
                      f"--ids_file={tmp_path / 'gone.txt'}")
    assert proc.returncode == 0, proc.stderr
    assert "removed 6 rows" in proc.stdout and "(300 base, 48 delta, 4 tombstones)" in proc.stdout
    for i in gone:
        del live[i]

    want = oracle(live, queries, 6)
    ids, scores = query_ids(str(directory), tmp_path / "q.hdf5", tmp_path / "r0.npz")
    np.testing.assert_array_equal(ids, want[0])
    np.testing.assert_array_equal(scores, want[1])
    # The directory is a MutableIndex for the library too, in the same state.
    assert sorted(MutableIndex.load(directory).ids.tolist()) == sorted(live)

    proc = search_cli("compact", f"--index={directory}")
    assert proc.returncode == 0, proc.stderr
    assert f"{len(live)} rows, 40 dims ({len(live)} base, 0 delta, 0 tombstones)" in proc.stdout
    ordered = np.array(sorted(live), np.int64)
    rebuilt = SparseIndex.from_dense(np.stack([live[i] for i in ordered]), zero_threshold=0.0)
    for mode in (m for m in SEARCH_MODES if m != "approx"):
        ids, scores = query_ids(str(directory), tmp_path / "q.hdf5", tmp_path / f"{mode}.npz",
                                f"--mode={mode}")
        positions, rebuilt_scores = rebuilt.search(queries, 6, mode=mode)
        np.testing.assert_array_equal(ids, ordered[positions])
        np.testing.assert_array_equal(scores, rebuilt_scores)
        np.testing.assert_array_equal(ids, want[0])

    proc = search_cli("info", f"--index={directory}")
    assert proc.returncode == 0, proc.stderr
    assert parse(proc.stdout, "rows") == len(live) and parse(proc.stdout, "tombstones") == 0
    assert parse(proc.stdout, "non-zeros") == sum(int((row != 0).sum()) for row in live.values())
    assert re.search(rf"ids\s+1\.\.{max(live)}$", proc.stdout, re.MULTILINE), proc.stdout


def test_int8_mutable_index_rescores_to_the_float32_result(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    base, _ = identities(rng, 120, 32, 12)
    more, _ = identities(rng, 20, 32, 12)
    queries, _ = identities(rng, 15, 32, 12)
    gallery_file(tmp_path / "q.hdf5", queries)
    directory = tmp_path / "int8.mut"
    proc = search_cli("mutable-create", f"--embeddings={gallery_file(tmp_path / 'g.hdf5', base)}",
                      f"--index={directory}", "--value_type=int8", "--keep_float")
    assert proc.returncode == 0, proc.stderr
    proc = search_cli("add", f"--index={directory}",
                      f"--embeddings={gallery_file(tmp_path / 'm.hdf5', more)}")
    assert proc.returncode == 0, proc.stderr
    live = dict(enumerate(np.concatenate([base, more])))
    ids, scores = query_ids(str(directory), tmp_path / "q.hdf5", tmp_path / "r.npz", "--rescore_k=exact")
    want = oracle(live, queries, 6)
    np.testing.assert_array_equal(ids, want[0])
    np.testing.assert_array_equal(scores, want[1])
    proc = search_cli("info", f"--index={directory}")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"value type\s+int8 \+ float32 rows$", proc.stdout, re.MULTILINE), proc.stdout
    assert_user_error(search_cli("mutable-create", f"--embeddings={tmp_path / 'g.hdf5'}",
                                 f"--index={tmp_path / 'x.mut'}", "--keep_float"),
                      "--keep_float goes with --value_type=int8")


def test_mutable_create_takes_ids_from_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    rows, _ = identities(rng, 50, 24, 6)
    labels = rng.permutation(1000)[:50] + 10
    gallery_file(tmp_path / "q.hdf5", rows[:8])
    proc = search_cli("mutable-create", f"--embeddings={gallery_file(tmp_path / 'g.hdf5', rows, labels)}",
                      f"--index={tmp_path / 'm'}", "--ids_from=label")
    assert proc.returncode == 0, proc.stderr
    ids, scores = query_ids(str(tmp_path / "m"), tmp_path / "q.hdf5", tmp_path / "r.npz")
    want = oracle(dict(zip(labels.tolist(), rows, strict=True)), rows[:8], 6)
    np.testing.assert_array_equal(ids, want[0])
    np.testing.assert_array_equal(scores, want[1])
    # Replacing it needs --overwrite.
    proc = search_cli("mutable-create", f"--embeddings={tmp_path / 'g.hdf5'}", f"--index={tmp_path / 'm'}")
    assert_user_error(proc, "already holds a mutable index", "--overwrite")
    proc = search_cli("mutable-create", f"--embeddings={tmp_path / 'g.hdf5'}", f"--index={tmp_path / 'm'}",
                      "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert MutableIndex.load(tmp_path / "m").ids.tolist() == list(range(50))


def test_mutable_index_commands_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Wrong dimension, unknown ids, missing files and directories, a directory that is not a mutable
    index: one line, exit 2, and the index on disk unchanged (in this process: main(argv))."""
    rng = np.random.default_rng(13)
    rows, _ = identities(rng, 40, 16, 5)
    directory = tmp_path / "m"
    gallery = gallery_file(tmp_path / "g.hdf5", rows, -np.ones(40, np.int64))
    assert search_cli("mutable-create", f"--embeddings={gallery}", f"--index={directory}").returncode == 0
    manifest = (directory / "manifest.json").read_text()
    narrow = gallery_file(tmp_path / "narrow.hdf5", np.ones((3, 12), np.float32))
    (tmp_path / "two.txt").write_text("1 2")
    (tmp_path / "bad.txt").write_text("1, two")
    (tmp_path / "plain").mkdir()
    cases = [
        (("add", f"--index={directory}", f"--embeddings={narrow}"),
         ("narrow.hdf5 has 12 dims, the index 16",)),
        (("remove", f"--index={directory}", "--ids=3,40,77"),
         ("ids not in the index: 40, 77", "nothing was removed")),
        (("remove", f"--index={directory}", "--ids=3,3"), ("duplicate ids in remove: 3",)),
        (("remove", f"--index={directory}", "--ids=3,x"), ("--ids must hold integer ids", "'x'")),
        (("remove", f"--index={directory}", "--ids=-1"), ("ids must be >= 0",)),
        (("remove", f"--index={directory}"), ("remove needs --ids",)),
        (("remove", f"--index={directory}", f"--ids_file={tmp_path / 'bad.txt'}"), ("bad.txt", "'two'")),
        (("remove", f"--index={directory}", f"--ids_file={tmp_path / 'none.txt'}"),
         ("ids file", "none.txt not found")),
        (("add", f"--index={directory}", f"--embeddings={gallery}", f"--ids_file={tmp_path / 'two.txt'}"),
         ("holds 2 ids", "40 rows")),
        (("add", f"--index={directory}", f"--embeddings={gallery}", "--ids_from=label"),
         ("--ids_from=label needs a 'label' dataset of ids >= 0", "row 0 has -1")),
        (("add", f"--index={directory}", f"--embeddings={tmp_path / 'missing.hdf5'}"),
         ("missing.hdf5 not found",)),
        (("add", f"--index={tmp_path / 'absent'}", f"--embeddings={gallery}"),
         ("mutable index directory", "absent not found", "mutable-create")),
        (("compact", f"--index={tmp_path / 'plain'}"), ("plain is not a MutableIndex directory",)),
        (("info", f"--index={gallery}"), ("g.hdf5 is a file, not a mutable index directory",)),
        (("mutable-create", f"--embeddings={gallery}", f"--index={tmp_path / 'n'}", "--block_rows=12"),
         ("--block_rows", "power of two")),
        (("query", f"--index={directory}", f"--queries={narrow}"), ("narrow.hdf5", "[Q, 16]")),
        (("query", f"--index={directory},{directory}", f"--queries={gallery}"), ("queried alone",)),
    ]
    for args, fragments in cases:
        assert_main_user_error(capsys, search_main, args, *fragments)
    assert (directory / "manifest.json").read_text() == manifest
    assert not (tmp_path / "n").exists()


def test_query_refuses_shards_of_different_dimensions(tmp_path: Path) -> None:
    SparseIndex.from_dense(np.eye(4, 8, dtype=np.float32)).save(tmp_path / "a.idx")
    SparseIndex.from_dense(np.eye(4, 6, dtype=np.float32)).save(tmp_path / "b.idx")
    gallery_file(tmp_path / "q.hdf5", np.ones((2, 8), np.float32))
    proc = search_cli("query", f"--index={tmp_path / 'a.idx'},{tmp_path / 'b.idx'}",
                      f"--queries={tmp_path / 'q.hdf5'}")
    assert_user_error(proc, "--index: all shards must have the same dimension", "shard 0: 8, shard 1: 6")
