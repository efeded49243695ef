"""The golden values of the probabilistic-embeddings reference code (tests/data/pe/README.md)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).resolve().parent / "data" / "pe" / "pe_golden.json"
GOLDEN_ENV = "SPARSE_EMBED_PE_GOLDEN"


@cache
def golden() -> dict[str, dict]:
    """Name -> quantity ({"kind", "params", "inputs", "outputs"}) of the golden file in use."""
    path = Path(os.environ.get(GOLDEN_ENV) or GOLDEN)
    return json.loads(path.read_text())["quantities"]


def quantities(*kinds: str) -> list[tuple[str, dict]]:
    """(name, quantity) of every golden quantity whose kind is one of `kinds`, in file order."""
    return [(name, q) for name, q in golden().items() if q["kind"] in kinds]


def replay_outputs(name: str, quantity: dict, replays: dict[str, Callable[[dict], dict]],
                   deviation: Callable[[str, str], str | None],
                   check_deviation: Callable[[str, str, dict, np.ndarray], None],
                   compare: Callable[[str, str, dict, np.ndarray, np.ndarray], None]) -> list[str]:
    """Replays one golden quantity and checks every output; returns the documented deviations met.

    An output listed as a deviation goes to `check_deviation` (its independent computation), every
    other one to `compare(name, key, quantity, got, want)`. Raises AssertionError on a kind or
    output key the replay does not know, or on any mismatch.
    """
    assert quantity["kind"] in replays, f"{name}: no replay for kind {quantity['kind']!r}"
    computed = replays[quantity["kind"]](quantity)
    unknown = set(quantity["outputs"]) - set(computed)
    assert not unknown, f"{name}: the replay does not compute {sorted(unknown)}"
    deviations = []
    for key, golden_value in quantity["outputs"].items():
        want = np.asarray(golden_value, dtype=np.float64)
        got = np.asarray(computed[key], dtype=np.float64)
        assert got.size == want.size, f"{name}/{key}: {got.shape} values, golden has {want.shape}"
        got = got.reshape(want.shape)
        if deviation(name, key) is not None:
            check_deviation(name, key, quantity, got)
            deviations.append(f"{name}/{key}")
        else:
            compare(name, key, quantity, got, want)
    return deviations
