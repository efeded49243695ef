"""Sparsity statistics of embedding files (nnz, FLOPs per pair, R_sub), their table and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import assert_main_user_error, call_main

from sparse_embed.cli import format_results
from sparse_embed.data.embeddings import Embeddings, write_hdf5
from sparse_embed.errors import ConfigError, DataError
from sparse_embed.evaluate import main as evaluate_main
from sparse_embed.metrics.sparsity import (
    sparsity_profile,
    sparsity_stats_np,
)

pytestmark = pytest.mark.unit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Rows 0..3 hold 1, 2, 3, 0 non-zeros (the 0.5 entries sit exactly at the threshold: zero).
STAIRCASE = np.array([[0.9, 0.5, 0.0, 0.0],
                      [0.7, -0.7, 0.5, 0.0],
                      [0.6, 0.6, -0.6, 0.0],
                      [0.0, 0.5, 0.0, 0.0]], np.float32)


def test_staircase_closed_form() -> None:
    """p = (3/4, 2/4, 1/4, 0): nnz = 3/2, FLOPs = (9 + 4 + 1) / 16 = 7/8,
    R_sub = 4 * (7/8) / (3/2)^2 = 14/9, one embedding of four all zero."""
    profile = sparsity_profile(STAIRCASE, zero_threshold=0.5)
    assert profile.nnz_per_embedding.tolist() == [1, 2, 3, 0]
    assert profile.nonzero_fraction.tolist() == [0.75, 0.5, 0.25, 0.0]
    assert profile.stats() == pytest.approx({"nnz": 1.5, "flops": 7 / 8, "r_sub": 14 / 9,
                                             "zero_embeddings": 0.25, "dim": 4, "embeddings": 4})


@pytest.mark.parametrize(("n", "d", "s"), [(8, 16, 2), (12, 24, 6)])
def test_even_spread_is_the_optimum(n: int, d: int, s: int) -> None:
    """Each row has s consecutive non-zeros, rows cycle over the d dims (n * s a multiple of d)
    so every dim is used equally often: p_j = s / d, FLOPs = nnz^2 / d, R_sub = 1."""
    x = np.zeros((n, d), np.float32)
    for i in range(n):
        x[i, (i * s + np.arange(s)) % d] = 1.0
    stats = sparsity_profile(x, 0.0).stats()
    assert stats["nnz"] == pytest.approx(s)
    assert stats["flops"] == pytest.approx(s * s / d)
    assert stats["r_sub"] == pytest.approx(1.0)
    assert stats["zero_embeddings"] == 0.0


def test_one_busy_dimension_is_worst() -> None:
    """Every row non-zero in dim 0 only: p = (1, 0, ..., 0), FLOPs = 1, R_sub = d."""
    x = np.zeros((5, 7), np.float32)
    x[:, 0] = 1
    assert sparsity_profile(x, 0.0).stats()["r_sub"] == pytest.approx(7.0)


def test_all_zero_embeddings() -> None:
    stats = sparsity_profile(np.zeros((3, 4), np.float32), 0.0).stats()
    assert (stats["nnz"], stats["flops"], stats["r_sub"], stats["zero_embeddings"]) == (0, 0, 0, 1)


def test_agrees_with_the_streaming_accumulator() -> None:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(200, 32)) * (rng.random((200, 32)) < np.linspace(0.05, 0.9, 32))).astype(np.float32)
    stats = sparsity_profile(x, 1e-3).stats()
    assert {k: stats[k] for k in ("nnz", "flops", "r_sub")} == pytest.approx(sparsity_stats_np(x, 1e-3))
    nonzero = np.abs(x) > 1e-3
    assert stats["nnz"] == pytest.approx(nonzero.sum() / 200)
    assert stats["flops"] == pytest.approx(((nonzero.sum(axis=0) / 200) ** 2).sum())


@pytest.mark.parametrize(("x", "threshold", "error", "fragment"), [
    (np.ones(4), 0.0, DataError, "non-empty real"),
    (np.ones((0, 4)), 0.0, DataError, "non-empty real"),
    (np.ones((2, 4)), -1.0, ConfigError, "--zero_threshold"),
])
def test_bad_input(x: np.ndarray, threshold: float, error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        sparsity_profile(x, threshold)


def test_format_results_numbers_and_notes() -> None:
    table = format_results({"a": {"nnz": 1.5, "search": "dense"}, "bb": {"nnz": 12345.0, "search": "sparse"}})
    lines = table.splitlines()
    assert lines[0].split() == ["run", "nnz"]
    assert lines[2].split() == ["a", "1.5"] and lines[3].split() == ["bb", "1.234e+04"]
    assert lines[4:] == ["a search: dense", "bb search: sparse"]
    assert format_results({"a": {"x": 1.0, "note": "same"}, "b": {"x": 2.0, "note": "same"}}
                        ).splitlines()[-1] == "note: same"


# --- the command line ----------------------------------------------------------------


def _write(path: Path, x: np.ndarray) -> Path:
    write_hdf5(path, Embeddings(x, np.arange(len(x), dtype=np.int64), ("a",) * len(x)))
    return path


@pytest.mark.integration
def test_cli_writes_table_json_and_two_panel_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (main(argv)); `python -m sparse_embed.evaluate` runs as a process elsewhere."""
    stairs = _write(tmp_path / "stairs.hdf5", STAIRCASE)
    dense = _write(tmp_path / "dense.hdf5", np.ones((3, 4), np.float32))
    output = tmp_path / "sparsity.json"
    plot = tmp_path / "fig" / "sparsity.png"
    capsys.readouterr()
    code = call_main(evaluate_main, "sparsity", f"--embeddings={stairs},{dense}", "--zero_threshold=0.5",
                     f"--output={output}", f"--plot={plot}")
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["run", "nnz", "flops", "r_sub", "zero_embeddings", "dim", "embeddings"]
    assert lines[2].split() == ["stairs", "1.5", "0.875", "1.556", "0.25", "4", "4"]
    assert lines[3].split() == ["dense", "4", "4", "1", "0", "4", "3"]
    records = json.loads(output.read_text())
    assert records["stairs"]["r_sub"] == pytest.approx(14 / 9)
    assert records["stairs"]["file"] == str(stairs) and records["dense"]["zero_threshold"] == 0.5
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    assert not output.with_suffix(".sparsity.png").exists()


@pytest.mark.parametrize("case", ["missing", "shape", "threshold"])
def test_cli_bad_input_is_one_line(tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    flat = tmp_path / "flat.hdf5"
    with h5py.File(flat, "w") as f:
        f.create_dataset("embedding", data=np.ones(5, np.float32))
    good = _write(tmp_path / "good.hdf5", STAIRCASE)
    args, fragments = {
        "missing": ([f"--embeddings={good},{tmp_path / 'nope.hdf5'}"], ("nope.hdf5", "not found")),
        "shape": ([f"--embeddings={flat}"], ("flat.hdf5", "[N, D]")),
        "threshold": ([f"--embeddings={good}", "--zero_threshold=-1"], ("--zero_threshold", ">= 0")),
    }[case]
    output = tmp_path / "s.json"
    assert_main_user_error(capsys, evaluate_main, ["sparsity", *args, f"--output={output}"], *fragments)
    assert not output.exists() and not output.with_suffix(".sparsity.png").exists()
