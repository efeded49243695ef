"""The FLOPs-versus-accuracy study: a tiny grid end to end, resuming, and its bad input."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_main_user_error, assert_user_error, run_module

from sparse_embed.errors import ConfigError
from sparse_embed.results import load_result, render_table
from sparse_embed.study import (
    DIMENSION_PLOT,
    RESULT_FILE,
    TABLE_FILE,
    TRADEOFF_PLOT,
    StudySettings,
    claims,
    flops_tradeoff,
    grid,
    main,
    matched_pair,
    write_study_result,
)

pytestmark = pytest.mark.unit

# Smoke-sized models: 32x32 input, batch 16, a few steps (the embedding sizes stay the packaged ones).
TINY = ("model.input_size=32", "train.batch_size=16", "schedule.warmup_steps=1",
        "data.shuffle_buffer=64", "eval.batch_size=64")
STEPS = 3
SETTINGS = StudySettings(distractor_identities=4, distractor_images=3, threshold=0.0, rerank_topk=5)
WEIGHTS_FLOPS, WEIGHTS_L1 = (1.0, 30.0), (0.1, 3.0)
MODELS = ["dense", "flops_w1", "flops_w30", "l1_w0.1", "l1_w3"]


def _run(tiny_data: Path, out: Path, steps: int = STEPS) -> tuple[dict, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        document = flops_tradeoff(tiny_data, out, WEIGHTS_FLOPS, WEIGHTS_L1, steps, SETTINGS, TINY,
                                  results=out / "result.json")
    return document, stdout.getvalue()


@pytest.fixture(scope="module")
def study(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("study")
    document, stdout = _run(tiny_data, out)
    return out, document, stdout


def _oracle_stats(run_dir: Path, zero_threshold: float = 1e-6) -> dict[str, float]:
    """mean nnz, sum p_j^2 and R_sub of a model's probe and distractor embeddings, in NumPy."""
    from sparse_embed.data.embeddings import read_hdf5

    every = np.concatenate([read_hdf5(run_dir / "probes.hdf5").embedding,
                            read_hdf5(run_dir / "distractors.hdf5").embedding])
    p = np.mean(np.abs(every) > zero_threshold, axis=0)
    return {"mean_nnz": p.sum(), "flops_per_pair": (p * p).sum(),
            "r_sub": len(p) * (p * p).sum() / p.sum() ** 2, "p_j": p}


@pytest.mark.slow
def test_study_writes_table_and_plots(tiny_data: Path, study: tuple[Path, dict, str]) -> None:
    out, document, stdout = study
    assert json.loads((out / TABLE_FILE).read_text()) == document
    rows = {row["model"]: row for row in document["models"]}
    assert list(rows) == MODELS
    assert document["settings"]["probes"] == 4 * 6 and document["settings"]["distractors"] == 4 * 3
    for name, row in rows.items():
        assert f"{row['regularizer']} w={row['weight']:g}" in stdout or name == "dense"
        oracle = _oracle_stats(out / name)
        for key in ("mean_nnz", "flops_per_pair", "r_sub"):
            assert row[key] == pytest.approx(oracle[key], rel=1e-9), (name, key)
        saved = json.loads((out / name / RESULT_FILE).read_text())["row"]
        np.testing.assert_allclose(saved["p_j"], oracle["p_j"])
        assert row["r_sub"] >= 1 - 1e-9 and row["flops_per_pair"] <= row["mean_nnz"]
        for key in ("accuracy", "recall@1", "recall@1_rerank"):
            assert 0.0 <= row[key] <= 1.0, (name, key)
        assert row["postings_per_query"] > 0 and math.isfinite(row["search_ms_per_query"])
        assert row["steps"] == STEPS
    dense = rows["dense"]
    assert dense["regularizer"] == "none" and dense["embedding_size"] == 512
    assert dense["mean_nnz"] == pytest.approx(512, rel=1e-3)
    # The dense model re-ranked by itself keeps its own order.
    assert dense["recall@1_rerank"] == dense["recall@1"]
    assert all(rows[m]["embedding_size"] == 1024 for m in MODELS[1:])

    flops_row, l1_row = matched_pair(document["models"])
    gaps = {(f, l1): abs(math.log(rows[f]["mean_nnz"] / rows[l1]["mean_nnz"]))
            for f in ("flops_w1", "flops_w30") for l1 in ("l1_w0.1", "l1_w3")}
    assert gaps[flops_row["model"], l1_row["model"]] == min(gaps.values())
    assert document["matched_nnz"] == {"flops": flops_row["model"], "l1": l1_row["model"]}
    for plot in (TRADEOFF_PLOT, DIMENSION_PLOT):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "R@1 rerank" in stdout and str(out / TABLE_FILE) in stdout
    for name, row in rows.items():
        assert row["max_p_j"] == pytest.approx(_oracle_stats(out / name)["p_j"].max()), name
    result = load_result(out / "result.json")
    assert str(out / "result.json") in stdout
    assert result["tables"]["models"]["rows"] == document["models"]
    assert result["tables"]["r_sub"]["rows"] == claims(document["models"])["r_sub"]
    assert [r["flops"] for r in result["tables"]["curve"]["rows"]] == ["flops_w1", "flops_w30"]


@pytest.mark.slow
def test_second_run_skips_finished_models(tiny_data: Path, study: tuple[Path, dict, str]) -> None:
    out, document, _ = study
    checkpoints = {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoints/*")}
    again, stdout = _run(tiny_data, out)
    lines = [line for line in stdout.splitlines() if line.startswith("[")]
    assert len(lines) == len(MODELS) and all("skipped" in line for line in lines), stdout
    assert again == document
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoints/*")} == checkpoints


@pytest.mark.slow
def test_run_trained_with_another_config_is_refused(tiny_data: Path,
                                                    study: tuple[Path, dict, str]) -> None:
    out, _, _ = study
    with pytest.raises(ConfigError, match=r"train\.steps: 3 there, 4 now"):
        _run(tiny_data, out, steps=STEPS + 1)


def test_grid_is_dense_then_sorted_weights() -> None:
    names = [m.name for m in grid([10.0, 1.0], [0.5])]
    assert names == ["dense", "flops_w1", "flops_w10", "l1_w0.5"]
    with pytest.raises(ConfigError, match="repeats"):
        grid([1.0, 1.0], [])
    with pytest.raises(ConfigError, match="finite"):
        grid([-1.0], [])


def test_matched_pair_by_nnz_ratio() -> None:
    rows = [{"regularizer": "none", "mean_nnz": 512}, {"regularizer": "flops", "mean_nnz": 10},
            {"regularizer": "flops", "mean_nnz": 100}, {"regularizer": "l1", "mean_nnz": 25},
            {"regularizer": "l1", "mean_nnz": 300}]
    # 10 vs 25 is a ratio of 2.5, 100 vs 300 one of 3, 100 vs 25 one of 4.
    assert matched_pair(rows) == (rows[1], rows[3])
    assert matched_pair(rows[:3]) is None


def _row(model: str, regularizer: str, nnz: float, flops: float, r_sub: float, recall: float,
         rerank: float) -> dict:
    return {"model": model, "regularizer": regularizer, "weight": 1.0, "steps": 1,
            "embedding_size": 1024, "accuracy": 0.9, "mean_nnz": nnz, "flops_per_pair": flops,
            "r_sub": r_sub, "postings_per_query": 10.0, "candidates_per_query": 1.0,
            "recall@1": recall, "recall@1_rerank": rerank, "search_ms_per_query": 0.01,
            "max_p_j": 0.1}


CLAIM_ROWS = [_row("dense", "none", 512, 512, 1.0, 0.3, 0.3),
              _row("flops_w10", "flops", 100, 10.0, 1.1, 0.20, 0.25),
              _row("flops_w99", "flops", 5, 0.1, 1.5, 0.01, 0.02),
              _row("l1_w1", "l1", 200, 1.0, 2.0, 0.10, 0.20),
              _row("l1_w0.1", "l1", 40, 100.0, 1.2, 0.30, 0.30)]


def test_claims_pair_each_flops_model_with_the_l1_curve() -> None:
    found = claims(CLAIM_ROWS)
    # (a) flops_w10 (nnz 100) is nearer l1_w1 (200, ratio 2) than l1_w0.1 (40, ratio 2.5);
    # flops_w99 (nnz 5) is nearer l1_w0.1.
    assert [(r["flops"], r["l1"]) for r in found["r_sub"]] == [("flops_w10", "l1_w1"),
                                                               ("flops_w99", "l1_w0.1")]
    assert found["r_sub"][0]["flops_r_sub"] == 1.1 and found["r_sub"][0]["l1_r_sub"] == 2.0
    # (b) 10 FLOPs lies half-way between 1 and 100 in log FLOPs: L1's Recall@1 there is
    # (0.10 + 0.30) / 2 = 0.20, re-ranked (0.20 + 0.30) / 2 = 0.25.
    at_10 = found["curve"][0]
    assert at_10["l1_recall@1"] == pytest.approx(0.20) and at_10["l1_rerank"] == pytest.approx(0.25)
    assert at_10["recall@1_minus_l1"] == pytest.approx(0.0, abs=1e-12)
    # 0.1 FLOPs is below every L1 model: no comparison.
    assert found["curve"][1]["l1_recall@1"] is None and found["curve"][1]["rerank_minus_l1"] is None
    assert claims(CLAIM_ROWS[:3]) == {"r_sub": [], "curve": []}


def test_study_result_file_renders_every_table(tmp_path: Path) -> None:
    document = {"settings": {"data_dir": "runs/demo/data", "probes": 2000, "distractors": 3000,
                             "threshold": 0.25, "rerank_topk": 1000, "steps": 500},
                "models": CLAIM_ROWS, "matched_nnz": None}
    path = write_study_result(document, tmp_path / "study.json",
                              command="python -m sparse_embed.study flops_tradeoff")
    result = load_result(path)
    assert result["command"] == "python -m sparse_embed.study flops_tradeoff"
    assert "500 steps" in result["notes"] and "3000 distractors" in result["notes"]
    assert result["tables"]["models"]["rows"] == CLAIM_ROWS
    models = render_table(result, "models")
    assert models.startswith("| model | nnz | FLOPs/pair |") and "| flops_w10 | 100.0 | 10 |" in models
    curve = render_table(result, "curve")
    assert "| flops_w99 | 0.1 | 0.0100 | – | – |" in curve
    assert "+0.0000" in curve or "-0.0000" in curve


@pytest.mark.integration
def test_cli_bad_input_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert_main_user_error(capsys, main, ["flops_trade"], "invalid choice: 'flops_trade'", "flops_tradeoff")
    assert_main_user_error(capsys, main, [], "required: study")
    assert_main_user_error(capsys, main, ["flops_tradeoff", "--weights_l1=a,1"], "--weights_l1", "numbers")
    # The same, as a real process.
    assert_user_error(run_module("sparse_embed.study", "flops_trade"), "invalid choice")
