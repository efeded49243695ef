"""The demo's orchestration end to end, scaled down (the full run is `make demo`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_main_user_error, call_main, run_module

from sparse_embed.demo import RESULT_KEYS, main


@pytest.mark.slow
def test_demo_small(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    args = ("sparse_embed.demo", f"--output={out}", "--identities=12", "--images_per_identity=6",
            "--test_identities=6", "--set", "train.steps=6", "--set", "train.batch_size=16",
            "--set", "eval.batch_size=32")
    proc = run_module(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"dense", "sparse"}
    for run in results.values():
        assert set(run) == set(RESULT_KEYS)
    assert results["dense"]["embedding_size"] == 512 and results["sparse"]["embedding_size"] == 1024
    assert results["dense"]["mean_nnz"] == pytest.approx(512, abs=1)
    for row in ("untrained", "dense", "sparse"):
        assert any(line.startswith(row) for line in proc.stdout.splitlines()), proc.stdout

    # A second run finds every stage done: no data regeneration, no training steps. In this
    # process: the first run was the real command line.
    assert call_main(main, *args[1:]) == 0
    rerun = json.loads((out / "results.json").read_text())
    for name, run in results.items():
        for key in set(RESULT_KEYS) - {"search_ms_per_query"}:
            assert rerun[name][key] == pytest.approx(run[key], rel=1e-5), (name, key)


@pytest.mark.unit
def test_bad_override_is_one_line_before_any_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_main_user_error(capsys, main, [f"--output={tmp_path / 'demo'}", "--set", "bogus=1"],
                           "unknown config key 'bogus'")
    assert not (tmp_path / "demo").exists()
