"""The benchmarks run end to end (their figures are not asserted: speed is not a test)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, horovod_available


@pytest.mark.slow
def test_train_throughput_benchmark_prints_its_table() -> None:
    horovod_available()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"),
                           "--models=demo", "--steps=3", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [json.loads(r)["setup"] for r in rows] == [
        "input pipeline", "train step", "train step, horovod"]
    assert "vs 1 process" in proc.stdout


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
