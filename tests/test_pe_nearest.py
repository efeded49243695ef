"""End-to-end retrieval metrics of distributions against the reference code's golden values
(`nearest_e2e`: shortlist by the modes in L2, re-rank by the scorer, drop self, the metrics)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from test_distributions import distribution_from_pe

from sparse_embed.distributions.neighbours import neighbour_metrics
from sparse_embed.distributions.scorers import build_scorer

pytestmark = pytest.mark.unit

# The reference's output names -> ours.
NAMES = {"mapr": "map@r", "mapr-ms": "map@r_match_self", "erc-recall@1": "erc_recall@1",
         "erc-mapr": "erc_map@r", "confidence-accuracy": "confidence_accuracy"}


def replay_nearest_e2e(quantity: dict) -> dict[str, np.ndarray]:
    params = quantity["params"]
    config = dict(params["distribution_config"])
    distribution = distribution_from_pe(params["distribution"], config)
    scorer = build_scorer(params["scorer"], distribution)
    ks = params["metrics_config"]["recall_k_values"]
    got = neighbour_metrics(np.asarray(quantity["inputs"]["parameters"], np.float64),
                            np.asarray(quantity["inputs"]["labels"]), distribution, scorer, ks=ks)
    return {key: np.asarray(got[NAMES.get(key, key)]) for key in quantity["outputs"]}


REPLAYS: dict[str, Callable[[dict], dict[str, np.ndarray]]] = {"nearest_e2e": replay_nearest_e2e}
DEVIATIONS: dict[str, str] = {}


def check_quantity(name: str, quantity: dict) -> list[str]:
    """Replays one golden quantity, every output within 1e-5 relative (the reference computes in
    float32; 1e-6 absolute near 0); returns the documented deviations met (none here)."""
    assert quantity["kind"] in REPLAYS, f"{name}: no replay for kind {quantity['kind']!r}"
    got = REPLAYS[quantity["kind"]](quantity)
    for key, expected in quantity["outputs"].items():
        np.testing.assert_allclose(got[key], expected, rtol=1e-5, atol=1e-6, err_msg=f"{name}/{key}")
    return []


def test_the_query_is_never_its_own_neighbour() -> None:
    """Two classes far apart: every item's neighbours are its class first, never itself."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 4)
    points = np.where(labels[:, None] == 0, 5.0, -5.0) + 0.1 * rng.normal(size=(8, 3))
    distribution = distribution_from_pe("dirac", {"dim": 3, "spherical": False})
    got = neighbour_metrics(points, labels, distribution, build_scorer("dot", distribution), ks=(1, 3))
    assert got["recall@1"] == got["recall@3"] == got["map@r"] == 1.0
