"""Identification with distractors against a brute-force NumPy oracle, and its command line.

The embeddings are small non-negative integers, so every inner product is exact in float32
whatever the order of accumulation: the index, BLAS and the oracle agree to the bit, and the
planted ties (distractors that copy a genuine image) are real ties.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_main_user_error, call_main, run_module

from sparse_embed.data.embeddings import Embeddings, read_hdf5, write_hdf5
from sparse_embed.errors import ConfigError, DataError
from sparse_embed.evaluate import main as evaluate_main
from sparse_embed.metrics.identification import (
    DENSE,
    MISS,
    RERANK,
    SPARSE,
    check_inputs,
    default_distractor_counts,
    distractor_subsets,
    evaluate_identification,
    probe_trials,
)
from sparse_embed.search import brute_force_search

pytestmark = pytest.mark.unit

DIM, DENSE_DIM = 48, 12
RANKS = (1, 2, 5, 10)


def _sparse_rows(rng: np.random.Generator, n: int, density: float = 0.15) -> np.ndarray:
    return (rng.integers(1, 4, (n, DIM)) * (rng.random((n, DIM)) < density)).astype(np.float32)


def _embeddings(x: np.ndarray, labels: np.ndarray, prefix: str) -> Embeddings:
    return Embeddings(np.ascontiguousarray(x, np.float32), np.asarray(labels, np.int64),
                      tuple(f"{prefix}/{i}.jpg" for i in range(len(x))))


@pytest.fixture(scope="module")
def sets() -> dict[str, Embeddings]:
    """12 probe identities (one of a single image), 600 distractors, planted matches and ties.

    Probe images of an identity share a base vector plus noise; a few distractors copy a
    probe image exactly (a tie with that genuine) and a few are near-duplicates of one.
    The dense embeddings are an integer projection of the sparse ones plus integer noise.
    """
    rng = np.random.default_rng(7)
    sizes = [4, 3, 5, 2, 3, 4, 2, 6, 3, 2, 4, 1]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    base = _sparse_rows(rng, len(sizes), 0.3)
    probes = base[labels] + _sparse_rows(rng, len(labels), 0.05)
    distractors = _sparse_rows(rng, 600, 0.3)
    distractors[:6] = probes[[1, 5, 9, 14, 20, 30]]                       # exact ties
    distractors[6:12] = probes[[2, 7, 11, 16, 22, 33]] + (np.arange(DIM) == 3)  # near-duplicates
    projection = rng.integers(-1, 2, (DIM, DENSE_DIM)).astype(np.float32)
    dense_p = probes @ projection + rng.integers(-1, 2, (len(probes), DENSE_DIM))
    dense_d = distractors @ projection + rng.integers(-1, 2, (len(distractors), DENSE_DIM))
    dense_d[:6] = dense_p[[1, 5, 9, 14, 20, 30]]
    return {"probes": _embeddings(probes, labels, "fs"),
            "distractors": _embeddings(distractors, np.full(600, -1), "mf"),
            "dense_probes": _embeddings(dense_p, labels, "fs"),
            "dense_distractors": _embeddings(dense_d, np.full(600, -1), "mf")}


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.astype(np.float64) @ b.astype(np.float64).T).astype(np.float32)


def _oracle_ranks(sets: dict[str, Embeddings], rows: np.ndarray, method: str, threshold: float | None,
                  rerank_topk: int) -> np.ndarray:
    """Every trial's rank, scoring the query against the genuine and all distractors in NumPy."""
    p, d = sets["probes"], sets["distractors"]
    cut = -np.inf if threshold is None else np.float32(threshold)
    out = []
    for q in range(len(p.label)):
        for g in np.flatnonzero(p.label == p.label[q]):
            if g == q:
                continue
            if method == DENSE:
                genuine = _dot(sets["dense_probes"].embedding[q], sets["dense_probes"].embedding[g])
                others = _dot(sets["dense_distractors"].embedding[rows], sets["dense_probes"].embedding[q])
                out.append(1 + int((others > genuine).sum()))
                continue
            genuine = _dot(p.embedding[q], p.embedding[g])
            scores = _dot(d.embedding[rows], p.embedding[q])
            above = np.flatnonzero(scores > cut)
            higher = int((scores[above] > genuine).sum())
            if not genuine > cut:
                out.append(MISS)
            elif method == SPARSE:
                out.append(1 + higher)
            elif higher >= rerank_topk:  # the genuine is not among the best rerank_topk
                out.append(MISS)
            else:
                best = above[np.lexsort((above, -scores[above]))][:rerank_topk - 1]
                dense_q = sets["dense_probes"].embedding[q]
                genuine_dense = _dot(sets["dense_probes"].embedding[g], dense_q)
                others = _dot(sets["dense_distractors"].embedding[rows[best]], dense_q)
                out.append(1 + int((others > genuine_dense).sum()))
    return np.array(out, np.int64)


def _oracle_cmc(ranks: np.ndarray, upto: int) -> list[float]:
    return [float(np.mean(ranks <= r)) for r in range(1, upto + 1)]


@pytest.mark.parametrize("threshold, rerank_topk", [(None, 10), (6.0, 10), (12.0, 3), (6.0, 1)])
def test_cmc_and_recall_match_brute_force(sets: dict[str, Embeddings], threshold: float | None,
                                          rerank_topk: int) -> None:
    result = evaluate_identification(
        sets["probes"], sets["distractors"], dense_probes=sets["dense_probes"],
        dense_distractors=sets["dense_distractors"], threshold=threshold, rerank_topk=rerank_topk,
        ranks=RANKS, distractor_counts=[40, 600], seed=3)
    assert result["methods"] == [SPARSE, DENSE, RERANK]
    assert result["trials"] == sum(n * (n - 1) for n in [4, 3, 5, 2, 3, 4, 2, 6, 3, 2, 4])
    assert (result["probe_identities"], result["skipped_identities"]) == (11, 1)
    subsets = distractor_subsets(600, [40, 600], seed=3)
    for row in result["rows"]:
        expected = _oracle_ranks(sets, subsets[row["distractors"]], row["method"], threshold, rerank_topk)
        for k in RANKS:
            assert row[f"recall@{k}"] == pytest.approx(np.mean(expected <= k), abs=1e-12), (row, k)
        if row["distractors"] == 600:
            assert result["cmc"][row["method"]] == pytest.approx(_oracle_cmc(expected, 10), abs=1e-12)
        if row["method"] == DENSE:
            assert math.isnan(row["ms_per_query"]) and math.isnan(row["postings_per_query"])
        else:
            assert row["ms_per_query"] >= 0 and row["postings_per_query"] > 0
    # The planted ties and near-duplicates put distractors level with or above some genuines.
    sparse_full = next(r for r in result["rows"] if r["method"] == SPARSE and r["distractors"] == 600)
    assert 0 < sparse_full["recall@1"] < 1


def test_rerank_is_the_index_search_with_the_genuine_inserted(sets: dict[str, Embeddings]) -> None:
    """The docstring's equivalence: re-ranking = brute force over [genuine; distractors], genuine first."""
    threshold, topk = 6.0, 8
    result = evaluate_identification(
        sets["probes"], sets["distractors"], dense_probes=sets["dense_probes"],
        dense_distractors=sets["dense_distractors"], threshold=threshold, rerank_topk=topk, ranks=(5,),
        distractor_counts=[600])
    p, d = sets["probes"], sets["distractors"]
    hits = []
    for q in range(len(p.label)):
        for g in np.flatnonzero(p.label == p.label[q]):
            if g == q:
                continue
            database = np.concatenate([p.embedding[g:g + 1], d.embedding])
            dense_db = np.concatenate([sets["dense_probes"].embedding[g:g + 1],
                                       sets["dense_distractors"].embedding])
            ids, _ = brute_force_search(database, p.embedding[q:q + 1], k=5, threshold=threshold,
                                        rerank=(dense_db, sets["dense_probes"].embedding[q:q + 1]),
                                        rerank_k=topk)
            hits.append(0 in ids[0])
    row = next(r for r in result["rows"] if r["method"] == RERANK)
    assert row["recall@5"] == pytest.approx(np.mean(hits), abs=1e-12)


def test_cmc_is_of_the_largest_count_evaluated(sets: dict[str, Embeddings]) -> None:
    result = evaluate_identification(sets["probes"], sets["distractors"], threshold=None, ranks=(3,),
                                     distractor_counts=[100, 20])
    assert result["distractor_counts"] == [20, 100] and result["cmc_distractors"] == 100
    expected = _oracle_ranks(sets, distractor_subsets(600, [100])[100], SPARSE, None, 1)
    assert result["cmc"][SPARSE] == pytest.approx(_oracle_cmc(expected, 3), abs=1e-12)


def test_trials_follow_the_facescrub_protocol() -> None:
    trials = probe_trials(np.array([5, 5, 5, 9, 2, 2]), num_distractors=3)
    assert trials.queries.tolist() == [0, 1, 2, 4, 5]
    pairs = sorted(zip(trials.queries[trials.query].tolist(), trials.genuine.tolist(), strict=True))
    assert pairs == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (4, 5), (5, 4)]
    assert (trials.identities, trials.skipped) == (2, 1)
    with pytest.raises(DataError, match="none of its 3 identities has two or more images"):
        probe_trials(np.array([1, 2, 3]), num_distractors=3)


def test_distractor_subsets_are_seeded_and_nested() -> None:
    assert default_distractor_counts(25000) == [10, 100, 1000, 10000, 25000]
    assert default_distractor_counts(1000) == [10, 100, 1000]
    subsets = distractor_subsets(500, [10, 100, 500], seed=1)
    assert set(subsets[10]) <= set(subsets[100]) and subsets[500].tolist() == list(range(500))
    assert all(np.all(np.diff(s) > 0) for s in subsets.values())
    assert np.array_equal(distractor_subsets(500, [100], seed=1)[100], subsets[100])
    assert not np.array_equal(distractor_subsets(500, [100], seed=2)[100], subsets[100])


def test_threshold_above_every_genuine_reports_recall_zero(sets: dict[str, Embeddings]) -> None:
    result = evaluate_identification(sets["probes"], sets["distractors"], threshold=1e6, ranks=RANKS,
                                     distractor_counts=[600])
    (row,) = result["rows"]
    assert row["method"] == SPARSE and all(row[f"recall@{k}"] == 0 for k in RANKS)
    assert "retrieves no genuine match" in row["note"] and result["notes"] == [row["note"]]
    assert row["candidates_per_query"] == 0


def test_dense_embeddings_alone_are_scored_densely(sets: dict[str, Embeddings]) -> None:
    shift = 100.0  # no zero entry left: the embeddings are dense
    probes = _embeddings(sets["dense_probes"].embedding + shift, sets["probes"].label, "fs")
    distractors = _embeddings(sets["dense_distractors"].embedding + shift, np.full(600, -1), "mf")
    result = evaluate_identification(probes, distractors, ranks=RANKS, distractor_counts=[600])
    assert result["methods"] == [DENSE]
    shifted = {"dense_probes": probes, "dense_distractors": distractors, "probes": probes,
               "distractors": distractors}
    expected = _oracle_ranks(shifted, np.arange(600), DENSE, None, 1)
    assert result["cmc"][DENSE] == pytest.approx(_oracle_cmc(expected, 10), abs=1e-12)


def test_library_rejects_mismatched_inputs(sets: dict[str, Embeddings]) -> None:
    p, d = sets["probes"], sets["distractors"]
    with pytest.raises(DataError, match="48-d embeddings but distractors 12-d"):
        check_inputs(p, sets["dense_distractors"])
    shuffled = Embeddings(sets["dense_probes"].embedding[::-1], p.label[::-1], p.filename[::-1])
    with pytest.raises(DataError, match="do not hold the same images in the same order"):
        check_inputs(p, d, shuffled, sets["dense_distractors"])
    with pytest.raises(ConfigError, match="needs both"):
        check_inputs(p, d, sets["dense_probes"], None)
    for bad in ({"ranks": [0]}, {"distractor_counts": [601]}, {"rerank_topk": 0}):
        with pytest.raises(ConfigError):
            evaluate_identification(p, d, **bad)


# -- Command line ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(sets: dict[str, Embeddings], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sets as the original's file convention: DIR/{facescrub,megaface}_{sparse,dense}.hdf5."""
    root = tmp_path_factory.mktemp("identification")
    for role, e in sets.items():
        prefix = "facescrub" if "probes" in role else "megaface"
        write_hdf5(root / f"{prefix}_{'dense' if 'dense' in role else 'sparse'}.hdf5", e)
    blocker = root / "no_tensorflow" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('identification must not import TensorFlow')\n")
    return root


def _identification(files: Path, *args: str):
    return run_module("sparse_embed.evaluate", "identification", *args,
                      pythonpath=(files / "no_tensorflow",))


@pytest.mark.integration
def test_embeddings_dir_convention_writes_json_and_plot(files: Path, sets: dict[str, Embeddings],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    proc = _identification(files, f"--embeddings_dir={files}", "--sparse_suffix=sparse.hdf5",
                           "--dense_suffix=dense.hdf5", "--score_threshold=6", "--rerank_topk=10",
                           "--ranks=1,2,5,10", "--distractor_counts=40,600", "--seed=3", "--num_threads=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("40 distractors:") and lines[1].startswith("600 distractors:")
    assert lines[2].split()[:3] == ["run", "recall@1", "recall@2"]
    assert [line.split()[:2] for line in lines[4:10]] == [
        [method, count] for count in ("40", "600") for method in (SPARSE, DENSE, RERANK)]
    output = files / "facescrub_sparse.identification.json"
    result = json.loads(output.read_text())
    assert Path(result["files"]["dense_distractors"]) == files / "megaface_dense.hdf5"
    assert (files / "facescrub_sparse.identification.cmc.png").read_bytes()[:4] == b"\x89PNG"
    expected = evaluate_identification(
        sets["probes"], sets["distractors"], dense_probes=sets["dense_probes"],
        dense_distractors=sets["dense_distractors"], threshold=6.0, rerank_topk=10, ranks=RANKS,
        distractor_counts=[40, 600], seed=3)
    assert result["cmc"] == expected["cmc"]  # JSON round-trips floats exactly
    for got, want in zip(result["rows"], expected["rows"], strict=True):
        assert {k: v for k, v in got.items() if k.startswith("recall") or k in ("method", "distractors")} \
            == {k: v for k, v in want.items() if k.startswith("recall") or k in ("method", "distractors")}
    # The explicit flags name the same files and give the same table (in this process: main(argv)).
    capsys.readouterr()
    code = call_main(
        evaluate_main, "identification", f"--probes={files / 'facescrub_sparse.hdf5'}",
        f"--distractors={files / 'megaface_sparse.hdf5'}",
        f"--dense_probes={files / 'facescrub_dense.hdf5'}",
        f"--dense_distractors={files / 'megaface_dense.hdf5'}", "--score_threshold=6", "--rerank_topk=10",
        "--ranks=1,2,5,10", "--distractor_counts=40,600", "--seed=3", f"--output={files / 'x.json'}")
    assert code == 0, capsys.readouterr().err[-3000:]
    assert json.loads((files / "x.json").read_text())["cmc"] == result["cmc"]
    assert (files / "x.cmc.png").is_file()


@pytest.mark.integration
def test_threshold_without_candidates_is_reported_not_fatal(files: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (main(argv)); the test above runs the command as a process."""
    capsys.readouterr()
    code = call_main(evaluate_main, "identification", f"--embeddings_dir={files}",
                     "--sparse_suffix=sparse.hdf5", "--score_threshold=1e6", "--distractor_counts=600",
                     f"--output={files / 'none.json'}")
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert "note: threshold 1e+06 retrieves no genuine match" in out
    assert json.loads((files / "none.json").read_text())["rows"][0]["recall@1"] == 0


def test_bad_inputs_exit_2_with_one_line(files: Path, sets: dict[str, Embeddings],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    p = sets["probes"]
    write_hdf5(files / "short.hdf5", Embeddings(p.embedding[:, :10], p.label, p.filename))
    write_hdf5(files / "reordered.hdf5", Embeddings(sets["dense_probes"].embedding[::-1], p.label[::-1],
                                                     p.filename[::-1]))
    write_hdf5(files / "singles.hdf5", Embeddings(p.embedding[:4], np.arange(4), p.filename[:4]))
    write_hdf5(files / "empty.hdf5", Embeddings(np.zeros((0, DIM), np.float32), np.zeros(0, np.int64), ()))
    d = sets["distractors"]
    broken = d.embedding.copy()
    broken[7, 3] = np.nan
    write_hdf5(files / "nan.hdf5", Embeddings(broken, d.label, d.filename))
    probes, distractors = f"--probes={files / 'facescrub_sparse.hdf5'}", \
        f"--distractors={files / 'megaface_sparse.hdf5'}"
    dense_d = f"--dense_distractors={files / 'megaface_dense.hdf5'}"
    cases = [
        ((f"--probes={files / 'short.hdf5'}", distractors),
         ("short.hdf5 holds 10-d", "megaface_sparse.hdf5")),
        ((probes, distractors, f"--dense_probes={files / 'reordered.hdf5'}", dense_d),
         ("reordered.hdf5 do not hold the same images in the same order", "row 0")),
        ((f"--probes={files / 'singles.hdf5'}", distractors), ("singles.hdf5: none of its 4 identities",)),
        ((probes, f"--distractors={files / 'empty.hdf5'}"), ("empty.hdf5 holds no embeddings",
                                                               "distractor set is empty")),
        ((probes, distractors, dense_d), ("needs both --dense_probes and --dense_distractors",)),
        ((probes, f"--distractors={files / 'nan.hdf5'}"), ("nan.hdf5 holds non-finite embeddings",)),
        ((probes, f"--distractors={files / 'missing.hdf5'}"), ("missing.hdf5 not found",)),
        ((probes, distractors, "--ranks=1,x"), ("--ranks must be a comma-separated list",)),
        ((probes, distractors, "--distractor_counts=10,601"),
         ("--distractor_counts must be integers in [1, 600]",)),
        ((probes, distractors, "--score_threshold=high"), ("--score_threshold must be a number or none",)),
        ((f"--embeddings_dir={files}",), ("needs --sparse_suffix",)),
        ((f"--embeddings_dir={files}", "--sparse_suffix=sparse.hdf5", probes), ("not both",)),
    ]
    # In this process (main(argv)); the commands above run as processes that cannot import TensorFlow.
    for args, fragments in cases:
        assert_main_user_error(capsys, evaluate_main, ["identification", *args], *fragments)
    assert read_hdf5(files / "singles.hdf5").embedding.shape == (4, DIM)
