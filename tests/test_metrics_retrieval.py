"""Open-set retrieval metrics: hand-computed cases, a brute-force reference, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, assert_main_user_error, call_main

from sparse_embed.data.embeddings import Embeddings, write_hdf5
from sparse_embed.errors import ConfigError, DataError
from sparse_embed.evaluate import main as evaluate_main
from sparse_embed.metrics.retrieval import AUTO_SPARSE_ZERO_FRACTION, retrieval_metrics

pytestmark = pytest.mark.unit

PATHS = ["dense", "sparse"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _windows(positions: list[int], width: int = 6) -> np.ndarray:
    """Points on a line as 0/1 windows: row i is 1 on dims [t_i, t_i + width).

    Two windows overlap in max(0, width - |t_i - t_j|) dims, so the inner
    product ranks neighbours exactly by distance on the line, and equal
    distances are exact float ties.
    """
    x = np.zeros((len(positions), max(positions) + width), np.float32)
    for i, t in enumerate(positions):
        x[i, t:t + width] = 1
    return x


def _reference(x: np.ndarray, labels: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """The definitions, one query at a time: sort all other rows by (-score, id)."""
    scores = x.astype(np.float64) @ x.astype(np.float64).T
    recall = {k: [] for k in ks}
    average_precision, r_precision, precision1 = [], [], []
    for i in range(len(x)):
        if labels[i] < 0:
            continue
        r = sum(1 for j in range(len(x)) if j != i and labels[j] == labels[i])
        if r == 0:
            continue
        ranked = sorted((j for j in range(len(x)) if j != i), key=lambda j: (-scores[i, j], j))
        rel = [labels[j] == labels[i] for j in ranked]
        for k in ks:
            recall[k].append(any(rel[:k]))
        r_precision.append(sum(rel[:r]) / r)
        average_precision.append(sum(sum(rel[:n]) / n for n in range(1, r + 1) if rel[n - 1]) / r)
        precision1.append(rel[0])
    out = {f"recall@{k}": float(np.mean(v)) for k, v in recall.items()}
    out.update({"map@r": float(np.mean(average_precision)), "r_precision": float(np.mean(r_precision)),
                "precision@1": float(np.mean(precision1)), "queries": len(precision1)})
    return out


@pytest.mark.parametrize("search", PATHS)
def test_six_points_on_a_line(search: str) -> None:
    """Positions 0..5, labels A A B A B B; ties (query 1: rows 0 and 2; 2: 1 and 3; ...) to the lower id.

    Neighbours (self excluded) and relevance, R = 2 for every query:
      q0 A: 1 2 3 4 5 -> 1 0 1 0 0   AP = (1/2)(1)       = 1/2, RP = 1/2
      q1 A: 0 2 3 4 5 -> 1 0 1 0 0   AP = 1/2,                  RP = 1/2
      q2 B: 1 3 0 4 5 -> 0 0 0 1 1   AP = 0,                    RP = 0
      q3 A: 2 4 1 5 0 -> 0 0 1 0 1   AP = 0,                    RP = 0
      q4 B: 3 5 2 1 0 -> 0 1 1 0 0   AP = (1/2)(1/2)     = 1/4, RP = 1/2
      q5 B: 4 3 2 1 0 -> 1 0 1 0 0   AP = 1/2,                  RP = 1/2
    Recall@1 = 3/6, @2 = 4/6, @4 = @8 = 1; MAP@R = 1.75 / 6; R-precision = 2/6.
    A seventh item far away (no overlap, score 0) with a class of its own is a
    distractor ranked last: it changes nothing and is counted as unanswerable.
    """
    x = _windows([0, 1, 2, 3, 4, 5, 20])
    labels = np.array([0, 0, 1, 0, 1, 1, 2])
    got = retrieval_metrics(x, labels, search=search, zero_threshold=0.0)
    expected = {"recall@1": 3 / 6, "recall@2": 4 / 6, "recall@4": 1.0, "recall@8": 1.0,
                "map@r": 1.75 / 6, "r_precision": 2 / 6, "precision@1": 3 / 6}
    assert {k: got[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    assert (got["queries"], got["queries_without_match"], got["search"]) == (6, 1, search)


@pytest.mark.parametrize("search", PATHS)
def test_query_removed_by_row_id_not_position(search: str) -> None:
    """Rows 0, 1 are the same vector e1 (labels 0, 1), rows 2, 3 are e2 (labels 1, 0).

    Query 1 ties with row 0 and itself; the tie goes to row 0, so its nearest
    other item is row 0 (wrong class): dropping the first result instead of
    the query itself would keep row 1 and count a hit. By id, every query's
    nearest other item is of the other class: Recall@1 = 0, Recall@2 = 1/2
    (queries 1 and 3 find their match second), Recall@4 = 1, MAP@R = 0.
    """
    x = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], np.float32)
    got = retrieval_metrics(x, np.array([0, 1, 1, 0]), search=search, zero_threshold=0.0)
    assert (got["recall@1"], got["recall@2"], got["recall@4"], got["map@r"]) == (0.0, 0.5, 1.0, 0.0)


def _random_case(seed: int, n: int = 90, d: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Small-integer embeddings (exact float32 scores, many ties, a few all-zero rows and
    duplicates), 8 classes plus a singleton class and unlabelled distractors."""
    rng = np.random.default_rng(seed)
    x = (rng.integers(0, 3, (n, d)) * (rng.random((n, d)) < 0.3)).astype(np.float32)
    x[:4] = 0
    x[10:13] = x[20]
    labels = rng.integers(0, 8, n)
    labels[5] = 99
    labels[6:9] = -1
    return x, labels


@pytest.mark.parametrize("search", PATHS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force_reference(search: str, seed: int) -> None:
    x, labels = _random_case(seed)
    ks = (1, 2, 4, 8, 16)
    got = retrieval_metrics(x, labels, ks=ks, search=search, zero_threshold=0.0, num_threads=2)
    expected = _reference(x, labels, ks)
    assert {k: got[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    assert got["queries_without_match"] == 1


def test_dense_real_values_match_reference() -> None:
    """Continuous values (no ties) through both paths: the same neighbours as float64 ranking."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(70, 16)) * (rng.random((70, 16)) < 0.4)
    x = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    labels = rng.integers(0, 6, 70)
    expected = _reference(x, labels, (1, 2, 4, 8))
    for search in PATHS:
        got = retrieval_metrics(x, labels, search=search, zero_threshold=0.0)
        assert {k: got[k] for k in expected} == pytest.approx(expected, abs=1e-12), search


def test_auto_picks_the_path_by_zero_fraction_and_reports_its_cost() -> None:
    x, labels = _random_case(0)
    nonzero = x != 0
    sparse = retrieval_metrics(x, labels, zero_threshold=0.0)
    assert sparse["zero_fraction"] == pytest.approx(1 - nonzero.mean())
    assert sparse["zero_fraction"] >= AUTO_SPARSE_ZERO_FRACTION
    assert sparse["search"] == "sparse"
    # Postings: each query visits the full posting list of each of its non-zero dimensions.
    queries = np.flatnonzero(np.array([labels[i] >= 0 and (labels == labels[i]).sum() > 1
                                       for i in range(len(x))]))
    postings = nonzero[queries].astype(np.int64) @ nonzero.sum(axis=0)
    assert sparse["postings_per_query"] == pytest.approx(postings.mean())
    dense_x = x + 1.0
    dense = retrieval_metrics(dense_x, labels, zero_threshold=0.0)
    assert (dense["search"], dense["zero_fraction"]) == ("dense", 0.0)
    assert dense["postings_per_query"] == x.size
    assert dense["ms_per_query"] > 0 and sparse["ms_per_query"] > 0


@pytest.mark.parametrize(("kwargs", "error", "fragment"), [
    ({"ks": (0, 1)}, ConfigError, "ks must be integers >= 1"),
    ({"search": "hnsw"}, ConfigError, "search must be one of auto, dense, sparse"),
    ({"zero_threshold": -1.0}, ConfigError, "zero_threshold"),
    ({"num_threads": -2}, ConfigError, "num_threads"),
])
def test_bad_arguments(kwargs: dict, error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        retrieval_metrics(_windows([0, 1, 2]), np.array([0, 0, 1]), **kwargs)


@pytest.mark.parametrize(("x", "labels", "fragment"), [
    (np.zeros(4, np.float32), np.zeros(4, np.int64), "real [N, D] array"),
    (np.zeros((3, 2), np.float32), np.zeros(2, np.int64), "labels must be integers of shape [3]"),
    (np.full((2, 2), np.nan, np.float32), np.zeros(2, np.int64), "finite"),
    (np.ones((3, 2), np.float32), np.full(3, -1), "no labels"),
    (np.ones((1, 2), np.float32), np.zeros(1, np.int64), "no item shares its label"),
    (np.ones((3, 2), np.float32), np.arange(3), "3 classes"),
])
def test_bad_data(x: np.ndarray, labels: np.ndarray, fragment: str) -> None:
    with pytest.raises(DataError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        retrieval_metrics(x, labels)


# --- the command line ----------------------------------------------------------------


def _write(path: Path, x: np.ndarray, labels: np.ndarray) -> Path:
    write_hdf5(path, Embeddings(x, labels.astype(np.int64), tuple(f"{i}.jpg" for i in range(len(x)))))
    return path


@pytest.mark.integration
def test_cli_compares_runs_in_one_table_json_and_chart(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (main(argv)); `python -m sparse_embed.evaluate` runs as a process elsewhere."""
    x, labels = _random_case(0)
    first = _write(tmp_path / "sparse_run.hdf5", x, labels)
    second = _write(tmp_path / "dense_run.hdf5", x + 1.0, labels)
    output = tmp_path / "out" / "retrieval.json"
    capsys.readouterr()
    code = call_main(evaluate_main, "retrieval", f"--embeddings={first},{second}", f"--output={output}",
                     "--num_threads=1", "--zero_threshold=0")
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["run", "recall@1", "recall@2", "recall@4", "recall@8"]
    assert lines[2].startswith("sparse_run ") and lines[3].startswith("dense_run ")
    assert "sparse_run search: sparse" in lines and "dense_run search: dense" in lines
    records = json.loads(output.read_text())
    assert list(records) == ["sparse_run", "dense_run"]
    for name, data in (("sparse_run", x), ("dense_run", x + 1.0)):
        expected = retrieval_metrics(data, labels, zero_threshold=0.0, num_threads=1)
        assert records[name]["file"] == str(first if name == "sparse_run" else second)
        for key in ("recall@1", "recall@8", "map@r", "r_precision", "queries", "search"):
            assert records[name][key] == expected[key], key
    assert output.with_suffix(".recall.png").read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.name for p in output.parent.iterdir()) == ["retrieval.json", "retrieval.recall.png"]


@pytest.mark.integration
def test_cli_does_not_import_tensorflow(tmp_path: Path) -> None:
    path = _write(tmp_path / "e.hdf5", _windows([0, 1, 2, 3]), np.array([0, 0, 1, 1]))
    code = ("import sys; from sparse_embed.metrics.retrieval import main; "
            f"main(['--embeddings={path}', '--plot={tmp_path / 'r.png'}']); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG_SIGNATURE


def _bad_files(tmp_path: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    one = _write(tmp_path / "one.hdf5", np.ones((1, 4), np.float32), np.zeros(1))
    flat = tmp_path / "flat.hdf5"
    with h5py.File(flat, "w") as f:
        f.create_dataset("embedding", data=np.ones(5, np.float32))
    unlabelled = tmp_path / "unlabelled.hdf5"
    with h5py.File(unlabelled, "w") as f:
        f.create_dataset("embedding", data=np.ones((5, 3), np.float32))
    good = _write(tmp_path / "good.hdf5", _windows([0, 1, 2, 3]), np.array([0, 0, 1, 1]))
    short, nan = tmp_path / "short.hdf5", tmp_path / "nan.hdf5"
    for path, confidence in ((short, [0.5, 0.2, 0.1]), (nan, [0.5, np.nan, 0.1, 0.3])):
        with h5py.File(path, "w") as f:
            f.create_dataset("embedding", data=_windows([0, 1, 2, 3]))
            f.create_dataset("label", data=np.array([0, 0, 1, 1]))
            f.create_dataset("confidence", data=np.array(confidence, np.float32))
    return {
        "missing": ([f"--embeddings={tmp_path / 'nope.hdf5'}"], ("nope.hdf5", "not found")),
        "shape": ([f"--embeddings={flat}"], ("flat.hdf5", "[N, D]")),
        "labels": ([f"--embeddings={unlabelled}"], ("unlabelled.hdf5", "no labels")),
        "single": ([f"--embeddings={good},{one}"], ("one.hdf5", "no item shares its label")),
        "search": ([f"--embeddings={good}", "--search=hnsw"], ("--search", "auto, dense, sparse")),
        "ks": ([f"--embeddings={good}", "--ks=1,x"], ("--ks",)),
        "confidence_length": ([f"--embeddings={short}"], ("short.hdf5", "'confidence'", "(4)", "(3,)",
                                                         "sparse_embed.embed")),
        "confidence_nan": ([f"--embeddings={nan}"], ("nan.hdf5", "1 non-finite")),
    }


@pytest.mark.parametrize("case", ["missing", "shape", "labels", "single", "search", "ks",
                                  "confidence_length", "confidence_nan"])
def test_cli_bad_input_is_one_line(tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    args, fragments = _bad_files(tmp_path)[case]
    out = tmp_path / "r.json"
    assert_main_user_error(capsys, evaluate_main, ["retrieval", *args, f"--output={out}"], *fragments)
    assert not out.exists()


def _erc_reference(x: np.ndarray, labels: np.ndarray, confidences: np.ndarray) -> dict[str, float]:
    """PE's error-versus-reject areas from the definitions: per-query errors of the brute-force
    ranking (sort by -score, then id), queries sorted by -confidence (stable), mean over k of the
    mean error of the k most confident."""
    scores = x.astype(np.float64) @ x.astype(np.float64).T
    errors_r1, errors_ap, conf = [], [], []
    for i in range(len(x)):
        r = sum(1 for j in range(len(x)) if j != i and labels[j] == labels[i])
        if labels[i] < 0 or r == 0:
            continue
        ranked = sorted((j for j in range(len(x)) if j != i), key=lambda j: (-scores[i, j], j))
        rel = [labels[j] == labels[i] for j in ranked]
        errors_r1.append(1.0 - rel[0])
        errors_ap.append(1.0 - sum(sum(rel[:n]) / n for n in range(1, r + 1) if rel[n - 1]) / r)
        conf.append(confidences[i])
    order = sorted(range(len(conf)), key=lambda q: -conf[q])

    def area(errors: list[float]) -> float:
        ordered = [errors[q] for q in order]
        return float(np.mean([np.mean(ordered[:k]) for k in range(1, len(ordered) + 1)]))

    return {"erc_recall@1": area(errors_r1), "erc_map@r": area(errors_ap)}


@pytest.mark.parametrize("search", PATHS)
def test_confidences_add_the_error_versus_reject_areas(search: str) -> None:
    x, labels = _random_case(1)
    confidences = np.random.default_rng(5).uniform(size=len(x))
    got = retrieval_metrics(x, labels, search=search, num_threads=1, confidences=confidences)
    expected = _erc_reference(x, labels, confidences)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    # Confidence that knows which first neighbours are right (right ones first) beats its reverse.
    scores = x @ x.T
    np.fill_diagonal(scores, -np.inf)
    right = (labels[np.argmax(scores, axis=1)] == labels).astype(float)
    informed = retrieval_metrics(x, labels, search=search, num_threads=1, confidences=right)
    reverse = retrieval_metrics(x, labels, search=search, num_threads=1, confidences=-right)
    assert 0 < informed["recall@1"] < 1
    assert informed["erc_recall@1"] < reverse["erc_recall@1"]
    plain = retrieval_metrics(x, labels, search=search, num_threads=1)
    assert "erc_recall@1" not in plain and "erc_map@r" not in plain
    with pytest.raises(DataError, match="one per embedding"):
        retrieval_metrics(x, labels, confidences=confidences[:-1])


def test_confidence_round_trips_through_the_file_and_the_cli(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from sparse_embed.data.embeddings import read_hdf5

    x, labels = _random_case(0)
    confidences = np.linspace(1.0, 0.0, len(x)).astype(np.float32)
    path = tmp_path / "probabilistic.hdf5"
    write_hdf5(path, Embeddings(x, labels, (), confidences))
    np.testing.assert_array_equal(read_hdf5(path).confidence, confidences)
    assert read_hdf5(_write(tmp_path / "plain.hdf5", x, labels)).confidence is None
    output = tmp_path / "retrieval.json"
    capsys.readouterr()
    assert call_main(evaluate_main, "retrieval", f"--embeddings={path}", f"--output={output}",
                     "--num_threads=1") == 0
    assert "erc_recall@1" in capsys.readouterr().out
    record = json.loads(output.read_text())["probabilistic"]
    expected = _erc_reference(x, labels, confidences)
    assert record["erc_recall@1"] == pytest.approx(expected["erc_recall@1"], rel=1e-6)
    assert record["erc_map@r"] == pytest.approx(expected["erc_map@r"], rel=1e-6)
