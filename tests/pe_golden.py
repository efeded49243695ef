"""The golden values of the probabilistic-embeddings reference code (tests/data/pe/README.md)."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

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
