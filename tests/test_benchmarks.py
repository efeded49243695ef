"""The training-throughput benchmark runs end to end (its figures are not asserted: speed is not a test)."""

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
