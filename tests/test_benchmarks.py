"""The benchmarks run end to end (their figures are not asserted: speed is not a test)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import ROOT, horovod_available, horovodrun_executable

from sparse_embed.results import load_result, render_table


def _benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py loaded as a module, so a test can call its main() in this process."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table(path: Path, name: str) -> list[dict]:
    """The rows of one table of a result file, after checking the file renders."""
    result = load_result(path)
    assert result["command"].startswith("python benchmarks/")
    assert render_table(result, name).startswith("| ")
    return result["tables"][name]["rows"]


@pytest.mark.slow
def test_train_throughput_benchmark_prints_and_writes_its_table(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    horovod_available()
    out = tmp_path / "throughput.json"
    # The 2-process row through tests/horovod_launch.py (horovodrun without its build probe).
    monkeypatch.setenv("HOROVODRUN", str(horovodrun_executable(tmp_path)))
    # main() in this process (its training rows are subprocesses of their own either way).
    script = ROOT / "benchmarks" / "train_throughput.py"
    args = ["--models=demo", "--steps=2", "--batch_size=16", "--json", f"--output={out}"]
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    _benchmark("train_throughput").main(args)
    stdout = capsys.readouterr().out
    rows = [line for line in stdout.splitlines() if line.startswith("{")]
    assert [json.loads(r)["setup"] for r in rows] == [
        "input pipeline", "train step", "train step, horovod"]
    assert "vs 1 process" in stdout
    written = _table(out, "throughput")
    assert [r["setup"] for r in written] == [json.loads(r)["setup"] for r in rows]
    assert written[1]["vs_1_process"] == 1.0 and all(r["images_per_s"] > 0 for r in written)
    assert all(r["batch_per_process"] == 16 for r in written)


@pytest.mark.slow
def test_partial_fc_memory_benchmark_writes_a_range_per_row(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "partial_fc_memory.py"),
                           "--classes=2000", "--dim=16", "--batch_size=8", "--steps=2", "--repeats=1",
                           "--sample_rates=0.1", f"--output={out}"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _table(out, "memory")
    assert [(r["head"], r["sample_rate"]) for r in rows] == [("arcface", 1.0), ("partial_fc", 0.1)]
    assert rows[0]["vs_arcface"] == 1.0
    assert all(r["step_mib_min"] <= r["step_mib_median"] <= r["step_mib_max"] for r in rows)
    assert "class centres + momentum" in proc.stdout


@pytest.mark.slow
def test_latency_benchmark_runs_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture) -> None:
    # In this process: the script's main() as its command line runs it, without a second TF import.
    script = ROOT / "benchmarks" / "tflite_latency.py"
    benchmark = _benchmark("tflite_latency")
    out = tmp_path / "latency.json"
    monkeypatch.setattr(sys, "argv", [str(script), "--tiny", "--models=sphereface20", "--modes=fp32",
                                      "--repeats=2", f"--output={out}"])
    benchmark.main()
    stdout = capsys.readouterr().out
    rows = _table(out, "latency")
    assert [(r["model"], r["input"], r["mode"]) for r in rows] == [("sphereface20_tiny", "28x24", "fp32")]
    row = rows[0]
    assert row["ms_1_thread"] > 0 and row["ms_all_threads"] > 0 and row["ratio_vs_fp32"] == 1.0
    assert 0 < row["size_mib"] < 1
    # 2400 inferences (600 pairs x 4) at the measured all-thread time.
    (estimate,) = _table(out, "mlperf")
    assert estimate["inferences"] == 2400
    assert estimate["seconds"] == pytest.approx(2.4 * row["ms_all_threads"])
    assert "MLPerf 600-pair protocol" in stdout and "vs fp32" in stdout


@pytest.mark.slow
def test_pipeline_benchmark_prints_its_table() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pipeline_bench.py"),
                           "--num_images=64", "--batch_size=16", "--identities=4",
                           "--images_per_identity=4", "--shards=2", "--workers=2", "--stages", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    setups = [row["setup"] for row in rows]
    assert setups[:5] == ["train_dataset (augmentation=full)", "train_dataset (augmentation=flip)",
                          "tf.data decode_jpeg map (AUTOTUNE)", "cv2.imdecode loop",
                          "cv2.imdecode pool x2"]
    assert any(s.startswith("stage: + random flip") for s in setups)
    assert rows[0]["full_ratio_per_core"] == 1.0 and rows[1]["flip_ratio_per_core"] == 1.0
    for row in rows:
        assert row.keys() == {"setup", "cores", "images_per_s", "images_per_s_per_core",
                              "full_ratio_per_core", "flip_ratio_per_core"}
        assert row["images_per_s"] > 0
    table = proc.stdout.split("\n{", 1)[0]
    assert "flip/this" in table and all(s in table for s in setups)


@pytest.mark.unit
def test_every_compression_recipe_fine_tunes_with_a_valid_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each recipe's overrides load on a trained run's config (a pruning-only key on QAT is refused)."""
    from sparse_embed.config import load_config

    spec = importlib.util.spec_from_file_location("compression_table",
                                                  ROOT / "benchmarks" / "compression_table.py")
    table = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "compression_table", table)  # its dataclasses look it up
    spec.loader.exec_module(table)
    for recipe in table.RECIPES:
        if recipe.compression:
            settings = table.fine_tune_settings(recipe, tmp_path / "run", steps=100, lr=0.01)
            config = load_config("smoke", table._overrides(settings))
            assert config.compression.type == recipe.compression["compression.type"]
            assert config.train.steps == 100


@pytest.mark.integration
def test_identify_benchmark_matches_alike_in_every_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    script = ROOT / "benchmarks" / "app_identify.py"
    benchmark = _benchmark("app_identify")
    out = tmp_path / "identify.json"
    monkeypatch.setattr(sys, "argv", [str(script), "--people=40,300", "--num_images=6", "--faces=3",
                                      "--rerank_k=20", f"--output={out}"])
    benchmark.main()
    assert "identify's matching step, 6 images x 3 face(s)" in capsys.readouterr().out
    rows = _table(out, "identify")
    assert [(r["people"], r["setup"]) for r in rows] == [
        (n, s) for n in (40, 300) for s in ("dense", "sparse", "sparse + re-rank")]
    # Images of enrolled people, every face given a person: the three setups find them alike.
    assert all(r["top1"] >= 0.9 for r in rows), rows
    assert all(r["vs_dense"] == 1.0 for r in rows if r["setup"] == "dense")
    assert all(0 < r["p50_ms"] <= r["p99_ms"] and r["faces_per_s"] > 0 for r in rows)


@pytest.mark.unit
def test_load_benchmark_drains_the_service_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """The load test reads the service's output for the whole run: a service that logs more than a
    pipe holds (uvicorn's access log, a line per request) must not block in that write."""
    benchmark = _benchmark("app_load")
    log = ("import sys\nprint('serving on http://127.0.0.1:4321/', flush=True)\n"
           "for k in range(20000):\n"
           "    print(f'INFO:     127.0.0.1:50000 - \"POST /identify HTTP/1.1\" 200 OK {k}')\n"
           "    print('warning', k, file=sys.stderr)\n"
           "print('done', flush=True)\n")
    server = benchmark.Server([sys.executable, "-c", log])
    assert server.port == 4321
    assert server.proc.wait(60) == 0, "the stand-in service blocked writing its output"
    server.stop()
    assert server.tails["stdout"][-1].startswith("done")
    assert server.tails["stderr"][-1].startswith("warning 19999")
    monkeypatch.setattr(benchmark, "START_TIMEOUT_S", 30.0)
    with pytest.raises(SystemExit, match="did not start:\nno address"):
        benchmark.Server([sys.executable, "-c", "print('no address')"])
