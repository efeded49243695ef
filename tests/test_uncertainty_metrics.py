"""Confidence metrics: the reference code's golden values, brute-force oracles, ties, bad input.

`REPLAYS`, `TIE_RANGES` and `DEVIATIONS` are what a test replaying the whole
golden file imports for the metric kinds: `REPLAYS[kind](quantity)` computes
the quantity's outputs with sparse_embed (keyed like its "outputs"),
`TIE_RANGES[kind](quantity)` gives (lowest, highest) over every order of tied
confidences for each output the golden file marks `tie_dependent`, and
`DEVIATIONS` says why those outputs are compared as a range.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from pe_golden import quantities

from sparse_embed.errors import DataError
from sparse_embed.metrics.retrieval import retrieval_metrics
from sparse_embed.metrics.uncertainty import (
    aurcc,
    average_precision_at_r,
    confidence_order,
    error_reject_area,
    neighbour_confidence_metrics,
    risk_coverage_curve,
    verification_confidence_metrics,
)
from sparse_embed.metrics.verification import verification_metrics

pytestmark = pytest.mark.unit

RTOL = 1e-5
VERIFICATION_OUTPUTS = ("pr", "max_accuracy", "auc", "tpr", "fpr", "eer",
                        "confidence_auroc", "confidence_aupr", "confidence_aurcc")
# The reference's retrieval metric names -> ours (recall@K is spelled alike).
NEIGHBOUR_NAMES = {"erc-recall@1": "erc_recall@1", "mapr": "map@r", "mapr-ms": "map@r_match_self",
                   "erc-mapr": "erc_map@r", "confidence-accuracy": "confidence_accuracy"}


def _replay_verification(q: dict) -> dict[str, np.ndarray]:
    inputs = q["inputs"]
    result = verification_confidence_metrics(inputs["scores"], inputs["targets"], inputs["confidences"],
                                             fpr=q["params"]["fpr"])
    return {name: np.asarray(result[name]) for name in VERIFICATION_OUTPUTS}


def _replay_risk_coverage(q: dict) -> dict[str, np.ndarray]:
    risk, coverage, thresholds = risk_coverage_curve(q["inputs"]["loss"], q["inputs"]["confidence"])
    return {"risk": risk, "coverage": coverage, "thresholds": thresholds}


def _replay_neighbours(q: dict) -> dict[str, np.ndarray]:
    inputs = q["inputs"]
    same = np.asarray(inputs["nearest_same"])
    # Every K the table allows, so any recall@K the file holds is computed.
    result = neighbour_confidence_metrics(same, np.asarray(inputs["class_sizes"]), inputs["confidences"],
                                          ks=range(1, same.shape[1] + 1))
    names = {f"recall@{k}": f"recall@{k}" for k in range(1, same.shape[1] + 1)} | NEIGHBOUR_NAMES
    return {theirs: np.asarray(result[ours]) for theirs, ours in names.items()}


REPLAYS: dict[str, Callable[[dict], dict[str, np.ndarray]]] = {
    "verification": _replay_verification,
    "risk_coverage_curve": _replay_risk_coverage,
    "nearest_classes": _replay_neighbours,
}


def _tie_extremes(errors: np.ndarray, confidences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permutations putting, within each group of equal confidences, the smallest errors first / last.

    Our tie order is the input order, so the metrics of the permuted inputs are
    the lowest and highest that any order of tied confidences gives (every
    prefix sum of errors is then least / greatest at once).
    """
    confidences = np.asarray(confidences, np.float64)
    return np.lexsort((errors, -confidences)), np.lexsort((-errors, -confidences))


def _tie_range_verification(q: dict) -> dict[str, tuple[float, float]]:
    inputs = q["inputs"]
    scores, targets = np.asarray(inputs["scores"]), np.asarray(inputs["targets"]).astype(bool)
    confidences = np.asarray(inputs["confidences"])
    threshold = verification_confidence_metrics(scores, targets, confidences,
                                                fpr=q["params"]["fpr"])["threshold"]
    loss = ((scores >= threshold) != targets).astype(np.float64)
    low, high = (aurcc(loss[p], confidences[p]) for p in _tie_extremes(loss, confidences))
    return {"confidence_aurcc": (low, high)}


def _tie_range_risk_coverage(q: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    loss, confidences = np.asarray(q["inputs"]["loss"]), np.asarray(q["inputs"]["confidence"])
    low, high = (risk_coverage_curve(loss[p], confidences[p])[0] for p in _tie_extremes(loss, confidences))
    return {"risk": (low, high)}


def _tie_range_neighbours(q: dict) -> dict[str, tuple[float, float]]:
    inputs = q["inputs"]
    same, sizes = np.asarray(inputs["nearest_same"]), np.asarray(inputs["class_sizes"])
    confidences = np.asarray(inputs["confidences"])
    answerable = sizes > 1
    errors = {"erc-recall@1": (1.0 - same[answerable, 0], confidences[answerable]),
              "erc-mapr": (1.0 - average_precision_at_r(same, sizes), confidences)}
    ranges = {}
    for name, (e, c) in errors.items():
        low, high = (error_reject_area(e[p], c[p]) for p in _tie_extremes(e, c))
        ranges[name] = (low, high)
    return ranges


TIE_RANGES: dict[str, Callable[[dict], dict[str, tuple]]] = {
    "verification": _tie_range_verification,
    "risk_coverage_curve": _tie_range_risk_coverage,
    "nearest_classes": _tie_range_neighbours,
}

TIE_REASON = ("tied confidences of mixed outcome: the reference orders them by an unstable sort "
              "(NumPy argsort / torch.argsort), so its value is not defined by the inputs; ours keeps "
              "them in input order; both are checked to lie within the range any tie order gives")
# Quantity name or "name/output" -> why it is not compared for equality.
DEVIATIONS: dict[str, str] = {
    f"{name}/{output}": TIE_REASON
    for name, q in quantities(*REPLAYS) for output in q.get("tie_dependent", [])
}


def test_every_kind_has_golden_quantities() -> None:
    assert {q["kind"] for _, q in quantities(*REPLAYS)} == set(REPLAYS)


def check_quantity(name: str, quantity: dict) -> list[str]:
    """Replays one golden quantity: every output within 1e-5 relative (counts exactly), tie-dependent
    ones within the tie range; returns the documented deviations met (AssertionError otherwise)."""
    assert name not in DEVIATIONS, f"{name} is a listed deviation as a whole: {DEVIATIONS.get(name)}"
    assert quantity["kind"] in REPLAYS, f"{name}: no replay for kind {quantity['kind']!r}"
    computed = REPLAYS[quantity["kind"]](quantity)
    tied = set(quantity.get("tie_dependent", []))
    ranges = TIE_RANGES[quantity["kind"]](quantity) if tied else {}
    missing = sorted(set(quantity["outputs"]) - set(computed))
    assert not missing, f"{name}: the replay does not compute {missing}"
    deviations = []
    for key, expected in quantity["outputs"].items():
        actual = computed[key]
        if key in tied:
            assert f"{name}/{key}" in DEVIATIONS
            low, high = ranges[key]
            slack = RTOL * np.abs(high)
            pe_value = np.asarray(expected)
            assert np.all(low - slack <= pe_value) and np.all(pe_value <= high + slack), \
                f"{name}/{key}: the reference's {expected} outside the tie range [{low}, {high}]"
            assert np.all(low <= actual) and np.all(actual <= high)
            deviations.append(f"{name}/{key}")
        elif isinstance(expected, int) and not isinstance(expected, bool):
            assert actual == expected, f"{name}/{key}"
        else:
            np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=0, err_msg=f"{name}/{key}")
    return deviations


def _random_pairs(seed: int, n: int, ties: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    issame = rng.random(n) < 0.45
    scores = rng.normal(size=n) + 1.1 * issame
    confidences = rng.random(n) + 0.3 * np.abs(scores)
    if ties:
        scores, confidences = np.round(scores, 1), np.round(confidences * 3) / 3
    return scores, issame, confidences


@pytest.mark.parametrize("ties", [False, True])
def test_confidence_auroc_and_aupr_against_brute_force(ties: bool) -> None:
    """AUROC = Mann-Whitney over all (correct, wrong) pairs, ties 1/2; AUPR = trapezoid over the PR points."""
    scores, issame, confidences = _random_pairs(3, 160, ties)
    result = verification_confidence_metrics(scores, issame, confidences)
    correct = (scores >= result["threshold"]) == issame
    right, wrong = confidences[correct], confidences[~correct]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in right for b in wrong)
    assert result["confidence_auroc"] == pytest.approx(wins / (len(right) * len(wrong)), rel=1e-12)

    # Precision and recall of "correct" when keeping confidence >= t, t over the distinct
    # confidences from high to low, from (recall 0, precision 1).
    points = [(0.0, 1.0)]
    for t in np.unique(confidences)[::-1]:
        kept = confidences >= t
        points.append((np.sum(correct & kept) / correct.sum(), np.sum(correct & kept) / kept.sum()))
    area = sum((r1 - r0) * (p0 + p1) / 2 for (r0, p0), (r1, p1) in zip(points, points[1:], strict=False))
    assert result["confidence_aupr"] == pytest.approx(area, rel=1e-12)


def test_verification_figures_against_brute_force() -> None:
    """Accuracy, AUC, TPR at FPR and EER from the ROC points counted one threshold at a time."""
    scores, issame, confidences = _random_pairs(4, 200, ties=True)
    fpr_target = 0.05
    result = verification_confidence_metrics(scores, issame, confidences, fpr=fpr_target)
    thresholds = [np.inf, *np.unique(scores)[::-1]]
    tprs = np.array([np.mean(scores[issame] >= t) for t in thresholds])
    fprs = np.array([np.mean(scores[~issame] >= t) for t in thresholds])
    accuracies = [np.mean((scores >= t) == issame) for t in thresholds]
    assert result["max_accuracy"] == pytest.approx(max(accuracies), rel=1e-12)
    assert np.mean((scores >= result["threshold"]) == issame) == pytest.approx(max(accuracies), rel=1e-12)
    # The trapezoid ROC area with ties as one step is the Mann-Whitney AUC of the verification module.
    assert result["auc"] == pytest.approx(verification_metrics(scores, issame)["auc"], rel=1e-12)
    assert result["auc"] == pytest.approx(np.trapezoid(tprs, fprs), rel=1e-12)
    closest = np.flatnonzero(np.abs(fprs - fpr_target) == np.abs(fprs - fpr_target).min())[-1]
    assert (result["tpr"], result["fpr"]) == (tprs[closest], fprs[closest])
    gaps = np.abs(fprs - (1 - tprs))
    candidates = np.flatnonzero(gaps == gaps.min())
    assert result["eer"] == pytest.approx(min((fprs[i] + 1 - tprs[i]) / 2 for i in candidates[[0, -1]]))
    assert result["pr"] == pytest.approx(np.mean(issame)) and result["dropped_pairs"] == 0


@pytest.mark.parametrize("ties", [False, True])
def test_risk_coverage_against_a_direct_loop(ties: bool) -> None:
    """Point k: the mean loss of the k most confident items (ties in input order); AURCC by trapezoids."""
    rng = np.random.default_rng(5)
    n = 37
    loss = rng.random(n) * (rng.random(n) < 0.5)
    confidences = np.round(rng.random(n) * 4) / 4 if ties else rng.random(n)
    ranked = sorted(range(n), key=lambda i: (-confidences[i], i))
    risk, coverage, thresholds = risk_coverage_curve(loss, confidences)
    expected_risk = [0.0] + [sum(loss[ranked[:k]]) / k for k in range(1, n + 1)]
    np.testing.assert_allclose(risk, expected_risk, rtol=1e-12)
    np.testing.assert_allclose(coverage, [k / n for k in range(n + 1)], rtol=1e-12)
    np.testing.assert_array_equal(thresholds[1:], confidences[ranked])
    assert thresholds[0] == thresholds[1] + 1
    area = sum((expected_risk[k] + expected_risk[k + 1]) / (2 * n) for k in range(n))
    assert aurcc(loss, confidences) == pytest.approx(area, rel=1e-12)
    errors = (loss > 0).astype(float)
    erc = np.mean([np.mean(errors[ranked[:k]]) for k in range(1, n + 1)])
    assert error_reject_area(errors, confidences) == pytest.approx(erc, rel=1e-12)


def test_all_equal_confidences() -> None:
    """One tie group: input order decides AURCC and ERC, within the range of every order; AUROC is 1/2."""
    scores, issame, _ = _random_pairs(6, 120, ties=False)
    confidences = np.full(scores.size, 0.7)
    result = verification_confidence_metrics(scores, issame, confidences)
    correct = (scores >= result["threshold"]) == issame
    accuracy = correct.mean()
    assert result["max_accuracy"] == pytest.approx(accuracy)
    assert result["confidence_auroc"] == 0.5
    # Two PR points: everything kept (recall 1, precision = accuracy) and nothing (0, 1).
    assert result["confidence_aupr"] == pytest.approx((1 + accuracy) / 2, rel=1e-12)
    loss = (~correct).astype(float)
    assert result["confidence_aurcc"] == pytest.approx(aurcc(loss, confidences), rel=1e-12)
    np.testing.assert_array_equal(confidence_order(confidences), np.arange(scores.size))
    best, worst = (aurcc(np.sort(loss)[::s], confidences) for s in (1, -1))
    assert best <= result["confidence_aurcc"] <= worst and best < worst
    # Reordering the pairs changes only the tie-order-dependent AURCC.
    shuffled = np.random.default_rng(0).permutation(scores.size)
    again = verification_confidence_metrics(scores[shuffled], issame[shuffled], confidences)
    for key in ("max_accuracy", "threshold", "auc", "tpr", "fpr", "eer", "confidence_auroc",
                "confidence_aupr"):
        assert again[key] == pytest.approx(result[key], rel=1e-12)
    assert best <= again["confidence_aurcc"] <= worst

    errors = np.array([1.0, 0.0, 0.0, 1.0])
    assert error_reject_area(errors, np.ones(4)) == pytest.approx((1 + 1 / 2 + 1 / 3 + 2 / 4) / 4)
    assert error_reject_area(errors[::-1], np.ones(4)) == error_reject_area(errors, np.ones(4))
    assert error_reject_area(np.sort(errors), np.ones(4)) < error_reject_area(errors, np.ones(4)) \
        < error_reject_area(np.sort(errors)[::-1], np.ones(4))


def _neighbour_table(labels: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """nearest_same [N, N - 1] by brute force: every other item by score descending, ties to the lower id."""
    scores = embeddings @ embeddings.T
    table = []
    for i in range(len(labels)):
        others = sorted((j for j in range(len(labels)) if j != i), key=lambda j: (-scores[i, j], j))
        table.append(labels[others] == labels[i])
    return np.array(table)


def test_neighbour_metrics_against_loops_and_retrieval() -> None:
    """Recall@K and MAP@R as loops and as the retrieval module computes them (no singleton classes)."""
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(8), [2, 3, 4, 5, 2, 3, 4, 5])
    x = rng.normal(size=(len(labels), 6)) + 0.8 * rng.normal(size=(8, 6))[labels]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    same = _neighbour_table(labels, x)
    sizes = np.bincount(labels)[labels]
    confidences = rng.random(len(labels))
    result = neighbour_confidence_metrics(same, sizes, confidences, ks=(1, 2, 4, 8))
    reference = retrieval_metrics(x, labels, ks=(1, 2, 4, 8), search="dense")
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r"):
        assert result[key] == pytest.approx(reference[key], rel=1e-6), key

    def ap(row: np.ndarray, r: int) -> float:
        hits = [j for j in range(r) if row[j]]
        return sum(row[: j + 1].sum() / (j + 1) for j in hits) / max(r, 1)

    aps = [ap(same[i], sizes[i] - 1) for i in range(len(labels))]
    np.testing.assert_allclose(average_precision_at_r(same, sizes), aps, rtol=1e-12)
    ranked = sorted(range(len(labels)), key=lambda i: (-confidences[i], i))
    e = [1 - aps[i] for i in ranked]
    assert result["erc_map@r"] == pytest.approx(np.mean(np.cumsum(e) / np.arange(1, len(e) + 1)), rel=1e-12)
    first = same[:, 0]
    accuracy = max(np.mean((confidences >= t) == first) for t in [np.inf, *confidences])
    assert result["confidence_accuracy"] == pytest.approx(accuracy, rel=1e-12)


def test_neighbour_metrics_singletons_and_self() -> None:
    """Singletons: out of recall and ERC-recall, AP 0 in MAP@R, error 1 in ERC-MAP@R; match_self: R = size."""
    same = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]], bool)
    sizes = np.array([3, 2, 1, 4])
    confidences = np.array([0.9, 0.2, 0.5, 0.1])
    result = neighbour_confidence_metrics(same, sizes, confidences, ks=(1, 2))
    assert result["recall@1"] == pytest.approx(2 / 3) and result["recall@2"] == 1.0
    # AP@R: R = 2: (1 + 0) / 2; R = 1: 0; singleton: 0; R = 3: 1.
    np.testing.assert_allclose(average_precision_at_r(same, sizes), [0.5, 0.0, 0.0, 1.0])
    assert result["map@r"] == pytest.approx(1.5 / 4)
    # R = 3, 2, 1, min(4, 3): (1 + 2/3) / 3, (1/2) / 2, 0, 1.
    assert result["map@r_match_self"] == pytest.approx(((1 + 2 / 3) / 3 + 0.25 + 0 + 1) / 4)
    # Recall@1 errors by confidence (0.9, 0.2, 0.1 without the singleton): 0, 1, 0.
    assert result["erc_recall@1"] == pytest.approx((0 + 1 / 2 + 1 / 3) / 3)
    # 1 - AP by confidence 0.9, 0.5, 0.2, 0.1: 0.5, 1, 1, 0.
    assert result["erc_map@r"] == pytest.approx((0.5 + 1.5 / 2 + 2.5 / 3 + 2.5 / 4) / 4)
    assert "erc_recall@1" not in neighbour_confidence_metrics(same, sizes)


def test_non_finite_scores_are_dropped_and_counted() -> None:
    scores, issame, confidences = _random_pairs(8, 50, ties=False)
    bad = scores.copy()
    bad[[3, 10]] = [np.nan, -np.inf]
    keep = np.isfinite(bad)
    result = verification_confidence_metrics(bad, issame, confidences)
    expected = verification_confidence_metrics(scores[keep], issame[keep], confidences[keep])
    assert result["dropped_pairs"] == 2
    assert {k: v for k, v in result.items() if k != "dropped_pairs"} == \
        {k: v for k, v in expected.items() if k != "dropped_pairs"}
    assert "confidence_auroc" not in verification_confidence_metrics(scores, issame)


def test_bad_input() -> None:
    scores, issame, confidences = _random_pairs(9, 20, ties=False)
    with pytest.raises(ValueError, match="one length"):
        verification_confidence_metrics(scores, issame[:-1], confidences)
    with pytest.raises(ValueError, match="confidences must be a 1-D array of length 20"):
        verification_confidence_metrics(scores, issame, confidences[:-1])
    with pytest.raises(DataError, match="NaN or infinite"):
        verification_confidence_metrics(scores, issame, np.where(issame, np.nan, confidences))
    with pytest.raises(DataError, match="all 20 pair scores"):
        verification_confidence_metrics(np.full(20, np.nan), issame, confidences)
    with pytest.raises(DataError, match="both same and different"):
        verification_confidence_metrics(scores, np.ones(20, bool), confidences)
    with pytest.raises(ValueError, match="fpr"):
        verification_confidence_metrics(scores, issame, confidences, fpr=2.0)
    with pytest.raises(ValueError, match="length 3"):
        risk_coverage_curve([0, 1, 0], [0.1, 0.2])
    with pytest.raises(DataError, match="no items"):
        risk_coverage_curve([], [])
    with pytest.raises(ValueError, match="non-negative"):
        risk_coverage_curve([0, -1], [0.1, 0.2])
    with pytest.raises(ValueError, match="length 3"):
        error_reject_area([0, 1, 0], [0.1, 0.2])
    same = np.zeros((4, 3), bool)
    with pytest.raises(ValueError, match="class_sizes must be a 1-D array of length 4"):
        neighbour_confidence_metrics(same, np.array([2, 2, 2]))
    with pytest.raises(ValueError, match="confidences must be a 1-D array of length 4"):
        neighbour_confidence_metrics(same, np.full(4, 2), np.ones(3))
    with pytest.raises(ValueError, match=">= 1"):
        neighbour_confidence_metrics(same, np.array([2, 0, 2, 2]))
    with pytest.raises(DataError, match="no query has another item"):
        neighbour_confidence_metrics(same, np.ones(4, int))
    with pytest.raises(ValueError, match="ks"):
        neighbour_confidence_metrics(same, np.full(4, 2), ks=(0,))
