"""Verification metrics: hand-computed example, closed forms, brute-force oracles."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sparse_embed.errors import DataError
from sparse_embed.metrics.verification import PROTOCOLS, roc_curve, verification_metrics

pytestmark = pytest.mark.unit

# Fold 0 and fold 1 of the hand-computed example (see test_hand_computed_example).
HAND_SCORES = np.array([0.1, 0.3, 0.5, 0.7, 0.3, 0.5, 0.7, 0.8])
HAND_ISSAME = np.array([False, True, True, False, False, False, True, True])


def test_hand_computed_example() -> None:
    """8 pairs, 2 contiguous folds of 4; "same" when score > t.

    Fold 0: 0.1 F, 0.3 T, 0.5 T, 0.7 F. Candidates (correct of 4): all same 2,
    t=0.2 3, t=0.4 2, t=0.6 1, none 2: the unique best is t0 = 0.2.
    Fold 1: 0.3 F, 0.5 F, 0.7 T, 0.8 T: separable, the unique best is t1 = 0.6.
    Test fold 0 at t1 = 0.6: only 0.7 is called same: 0.1 F right, 0.3 T wrong,
    0.5 T wrong, 0.7 F wrong -> 1/4. Test fold 1 at t0 = 0.2: all called same,
    right for 0.7 T and 0.8 T -> 2/4.
    accuracy = (0.25 + 0.5) / 2 = 0.375, std = 0.125, threshold = (0.2 + 0.6) / 2 = 0.4.

    AUC over all 4 x 4 (same, different) pairs, ties 1/2: positives 0.3, 0.5,
    0.7, 0.8 against negatives 0.1, 0.3, 0.5, 0.7 win 1 + 1/2, 2 + 1/2, 3 + 1/2, 4
    -> 11.5 / 16 = 0.71875.

    ROC (far, tar) by decreasing threshold: none (0, 0); > 0.7 (0, 1/4);
    > 0.5 (1/4, 1/2); > 0.3 (1/2, 3/4); > 0.1 (3/4, 1); all (1, 1).
    1 - far - tar is 1/4 at (1/4, 1/2) and -1/4 at (1/2, 3/4): it crosses 0
    halfway, at far = 3/8 = FRR: EER = 0.375.

    TAR@FAR = 1/4 (4 negatives allow 1 false accept): best FP <= 1 point is
    (1/4, 1/2) -> 0.5. FAR = 0.1 needs 10 negatives: omitted.
    """
    result = verification_metrics(HAND_SCORES, HAND_ISSAME, nfolds=2, far_targets=(0.25, 0.1))
    assert result.keys() == {"accuracy", "accuracy_std", "accuracy_protocol", "threshold", "auc",
                             "eer", "tar_at_far"}
    assert result["accuracy_protocol"] == PROTOCOLS["k-fold"]
    np.testing.assert_allclose(
        [result[k] for k in ("accuracy", "accuracy_std", "threshold", "auc", "eer")],
        [0.375, 0.125, 0.4, 0.71875, 0.375], rtol=1e-12)
    assert result["tar_at_far"] == {0.25: 0.5}

    far, tar, thresholds = roc_curve(HAND_SCORES, HAND_ISSAME)
    np.testing.assert_allclose(far, [0, 0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(tar, [0, 0.25, 0.5, 0.75, 1, 1])
    np.testing.assert_allclose(thresholds[:-1], [0.8, 0.75, 0.6, 0.4, 0.2])
    assert thresholds[-1] < 0.1 and np.all(HAND_SCORES > thresholds[-1])


def test_single_fold_hand_computed() -> None:
    """Fold 0 of the hand example alone (LFW View 1 without training pairs).

    0.1 F, 0.3 T, 0.5 T, 0.7 F; candidates (correct of 4): all same 2, t=0.2 3,
    t=0.4 2, t=0.6 1, none 2. Nothing is held out, so the fold's own best
    threshold 0.2 is applied to it: accuracy 3/4, labelled as chosen on the
    test fold; no spread over one fold.

    AUC: positives 0.3, 0.5 beat negative 0.1 and lose to 0.7 -> 2/4. ROC by
    decreasing threshold: (0, 0), > 0.5 (1/2, 0), > 0.3 (1/2, 1/2), > 0.1
    (1/2, 1), (1, 1): 1 - far - tar is 0 at (1/2, 1/2): EER = 1/2.
    """
    result = verification_metrics(HAND_SCORES[:4], HAND_ISSAME[:4], nfolds=1, far_targets=(0.5,))
    assert result.keys() == {"accuracy", "accuracy_protocol", "threshold", "auc", "eer",
                             "tar_at_far"}
    np.testing.assert_allclose([result[k] for k in ("accuracy", "threshold", "auc", "eer")],
                               [0.75, 0.2, 0.5, 0.5], rtol=1e-12)
    assert result["accuracy_protocol"] == PROTOCOLS["test fold"]
    assert "test fold itself (no held-out fold)" in result["accuracy_protocol"]
    # FAR 1/2 allows 1 of the 2 negatives: best is > 0.1, (1/2, 1).
    assert result["tar_at_far"] == {0.5: 1.0}
    # One fold given per pair is the same protocol.
    assert verification_metrics(HAND_SCORES[:4], HAND_ISSAME[:4], folds=np.full(4, 3),
                                far_targets=(0.5,)) == result


def test_threshold_pairs_hand_computed() -> None:
    """View 1: the threshold comes from the other set of pairs, as a k-fold split would.

    Fold 1 (0.3 F, 0.5 F, 0.7 T, 0.8 T) alone is separable at t = 0.6; applied
    to fold 0 it calls only 0.7 same: 1/4 right. Fold 0's best, t = 0.2, on
    fold 1 calls all same: 2/4 right. These are the two test folds of the
    2-fold example, whose accuracy is their mean 0.375.
    """
    fold0 = HAND_SCORES[:4], HAND_ISSAME[:4]
    fold1 = HAND_SCORES[4:], HAND_ISSAME[4:]
    on0 = verification_metrics(*fold0, nfolds=1, threshold_pairs=fold1)
    on1 = verification_metrics(*fold1, nfolds=1, threshold_pairs=fold0)
    np.testing.assert_allclose([on0["accuracy"], on0["threshold"], on1["accuracy"],
                                on1["threshold"]], [0.25, 0.6, 0.5, 0.2], rtol=1e-12)
    assert on0["accuracy_protocol"] == on1["accuracy_protocol"] == PROTOCOLS["threshold pairs"]
    assert "accuracy_std" not in on0
    kfold = verification_metrics(HAND_SCORES, HAND_ISSAME, nfolds=2)
    assert kfold["accuracy"] == pytest.approx((on0["accuracy"] + on1["accuracy"]) / 2)
    # The threshold-free metrics do not depend on where the threshold comes from.
    alone = verification_metrics(*fold0, nfolds=1)
    assert [on0[k] for k in ("auc", "eer")] == [alone[k] for k in ("auc", "eer")]

    # Test pairs with several folds: the one threshold on every fold, mean and spread.
    both = verification_metrics(HAND_SCORES, HAND_ISSAME, nfolds=2, threshold_pairs=fold1)
    # t = 0.6 on fold 0: 1/4; on fold 1 (separable at 0.6): 4/4.
    np.testing.assert_allclose([both["accuracy"], both["accuracy_std"], both["threshold"]],
                               [0.625, 0.375, 0.6], rtol=1e-12)


def test_explicit_folds_override_contiguous_split() -> None:
    """Folds given per pair select the same pairs however the pairs are ordered."""
    folds = np.repeat([0, 1], 4)
    order = np.random.default_rng(0).permutation(8)
    result = verification_metrics(HAND_SCORES[order], HAND_ISSAME[order], folds=folds[order])
    expected = verification_metrics(HAND_SCORES, HAND_ISSAME, nfolds=2)
    assert result == expected
    # Fold ids need not be 0-based or contiguous.
    assert verification_metrics(HAND_SCORES, HAND_ISSAME, folds=np.repeat([7, 3], 4)) == expected


def test_perfect_separation() -> None:
    """Every same pair scores above every different pair.

    Each training split is separable, so every test fold is classified
    perfectly: accuracy 1, std 0; AUC 1; the ROC passes through (0, 1): EER 0,
    TAR 1 at any FAR.
    """
    rng = np.random.default_rng(1)
    issame = rng.random(200) < 0.5
    scores = np.where(issame, rng.uniform(0.5, 1.0, 200), rng.uniform(-1.0, 0.4, 200))
    result = verification_metrics(scores, issame, far_targets=(1e-2, 0.5))
    assert [result[k] for k in ("accuracy", "accuracy_std", "auc", "eer")] == [1, 0, 1, 0]
    assert 0.4 < result["threshold"] < 0.5
    assert result["tar_at_far"] == {1e-2: 1.0, 0.5: 1.0}


def test_all_ties() -> None:
    """One score for every pair: the only classifiers are "all same" and "all different".

    Every (same, different) comparison is a tie: AUC = 1/2; the ROC is the
    diagonal, so EER = 1/2. With 6 same and 4 different pairs, "all same"
    wins on every training split: accuracy = 6/10 on average.
    """
    issame = np.array([True] * 6 + [False] * 4)
    rng = np.random.default_rng(2)
    order = rng.permutation(10)
    result = verification_metrics(np.full(10, 0.3), issame[order], nfolds=5)
    np.testing.assert_allclose([result["auc"], result["eer"], result["accuracy"]],
                               [0.5, 0.5, 0.6])
    assert result["threshold"] < 0.3
    far, tar, _ = roc_curve(np.full(10, 0.3), issame)
    np.testing.assert_array_equal(far, [0, 1])
    np.testing.assert_array_equal(tar, [0, 1])


def _brute_force_auc(scores: np.ndarray, issame: np.ndarray) -> float:
    """Mann-Whitney: every (same, different) pair, 1 if ordered right, 1/2 if tied."""
    pos, neg = scores[issame], scores[~issame]
    wins = sum(float(p > n) + 0.5 * float(p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_mann_whitney_count(seed: int) -> None:
    """Rounded scores make many ties, within and across the classes."""
    rng = np.random.default_rng(seed)
    issame = rng.random(120) < 0.4
    scores = np.round(rng.normal(size=120) + issame, 1)
    result = verification_metrics(scores, issame)
    np.testing.assert_allclose(result["auc"], _brute_force_auc(scores, issame), rtol=1e-12)


def _brute_force_fold_accuracy(scores: np.ndarray, issame: np.ndarray,
                               folds: np.ndarray) -> tuple[float, float]:
    """LFW protocol, re-thresholding every training pair at every candidate threshold.

    The candidates of a training split are a point below its lowest score, the
    midpoints of its sorted unique scores, and its highest score; a fine grid
    over the whole range checks that no other threshold does better.
    """
    accuracies, thresholds = [], []
    fine = np.linspace(scores.min() - 0.01, scores.max() + 0.01, 2001)
    for fold in np.unique(folds):
        test = folds == fold
        values = np.unique(scores[~test])
        candidates = np.concatenate([[values[0] - 1], (values[:-1] + values[1:]) / 2,
                                     [values[-1]]])
        train_acc = [np.mean((scores[~test] > t) == issame[~test]) for t in candidates]
        best_acc = max(np.mean((scores[~test] > t) == issame[~test]) for t in fine)
        assert best_acc <= max(train_acc)
        k = int(np.argmax(train_acc))
        # "All same" is reported just below the lowest score, not 1 below.
        best = candidates[k] if k else np.nextafter(values[0], -np.inf)
        accuracies.append(np.mean((scores[test] > best) == issame[test]))
        thresholds.append(best)
    return float(np.mean(accuracies)), float(np.mean(thresholds))


@pytest.mark.parametrize("seed", [3, 4])
def test_accuracy_matches_brute_force_threshold_search(seed: int) -> None:
    """Rounded scores (ties) and random fold sizes; best thresholds tie to the lowest."""
    rng = np.random.default_rng(seed)
    issame = rng.random(90) < 0.5
    scores = np.round(rng.normal(size=90) + 1.5 * issame, 1)
    folds = rng.integers(0, 3, size=90)
    accuracy, threshold = _brute_force_fold_accuracy(scores, issame, folds)
    result = verification_metrics(scores, issame, folds=folds)
    np.testing.assert_allclose([result["accuracy"], result["threshold"]], [accuracy, threshold],
                               rtol=1e-12)


def _brute_force_best(scores: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """(highest accuracy of any threshold, the lowest threshold reaching it), by trying them all.

    Every threshold below the lowest score, at each score and between each two
    consecutive scores (a fine grid of the whole range adds more); the lowest
    best one is moved to the candidate the metrics report for its interval.
    """
    values = np.unique(scores)
    fine = np.linspace(values[0] - 0.01, values[-1] + 0.01, 2001)
    tried = np.unique(np.concatenate([fine, values, (values[:-1] + values[1:]) / 2]))
    accuracy = np.array([np.mean((scores > t) == issame) for t in tried])
    best = float(tried[int(np.argmax(accuracy))])
    # The reported threshold of an interval between scores: below all, or its midpoint.
    k = int(np.searchsorted(values, best, side="right"))
    threshold = (np.nextafter(values[0], -np.inf) if k == 0 else
                 values[-1] if k == len(values) else (values[k - 1] + values[k]) / 2)
    return float(accuracy.max()), float(threshold)


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_single_fold_accuracy_is_the_best_of_any_threshold(seed: int) -> None:
    """One fold: the accuracy is the maximum over every threshold (rounded scores: ties)."""
    rng = np.random.default_rng(seed)
    issame = rng.random(80) < 0.5
    scores = np.round(rng.normal(size=80) + issame, 1)
    result = verification_metrics(scores, issame, nfolds=1)
    accuracy, threshold = _brute_force_best(scores, issame)
    np.testing.assert_allclose([result["accuracy"], result["threshold"]], [accuracy, threshold],
                               rtol=1e-12)


@pytest.mark.parametrize("seed", [8, 9])
def test_threshold_pairs_match_brute_force(seed: int) -> None:
    """View 1 with sizes 2 x 1100 / 2 x 500: the training pairs' best threshold, on the test pairs."""
    rng = np.random.default_rng(seed)
    train_same = np.repeat([True, False], 1100)
    test_same = np.repeat([True, False], 500)
    train = np.round(rng.normal(size=2200) + 1.2 * train_same, 2)
    test = np.round(rng.normal(size=1000) + 1.2 * test_same, 2)
    result = verification_metrics(test, test_same, nfolds=1, threshold_pairs=(train, train_same))
    _, threshold = _brute_force_best(train, train_same)
    np.testing.assert_allclose(result["threshold"], threshold, rtol=1e-12)
    assert result["accuracy"] == np.mean((test > threshold) == test_same)
    # No threshold chosen elsewhere beats the test fold's own best one.
    assert result["accuracy"] <= verification_metrics(test, test_same, nfolds=1)["accuracy"]


def test_roc_and_tar_match_brute_force() -> None:
    rng = np.random.default_rng(4)
    issame = rng.random(300) < 0.3
    scores = rng.normal(size=300).astype(np.float32) + issame
    far, tar, thresholds = roc_curve(scores, issame)
    assert np.all(np.diff(thresholds) < 0) and np.all(np.diff(far) >= 0)
    for f, t, threshold in zip(far, tar, thresholds, strict=True):
        accepted = scores > threshold
        assert f == np.mean(accepted[~issame]) and t == np.mean(accepted[issame])
    num_neg = int((~issame).sum())
    target = 5 / num_neg
    best = max(t for f, t in zip(far, tar, strict=True) if f * num_neg <= 5 + 1e-9)
    assert verification_metrics(scores, issame, far_targets=(target,))["tar_at_far"] == {
        target: best}


def test_tar_at_far_needs_enough_negatives() -> None:
    """1e-3 needs >= 1000 different pairs: 999 is one short, 1000 is enough."""
    rng = np.random.default_rng(5)
    for num_neg, supported in ((999, False), (1000, True)):
        issame = np.arange(num_neg + 50) < 50
        scores = rng.normal(size=issame.size) + 2 * issame
        tar = verification_metrics(scores, issame, far_targets=(1e-3, 0.5))["tar_at_far"]
        assert (1e-3 in tar) == supported and 0.5 in tar


@pytest.mark.integration
def test_does_not_import_tensorflow() -> None:
    code = "import sys, sparse_embed.metrics.verification; sys.exit('tensorflow' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0


@pytest.mark.parametrize("kwargs, error, message", [
    ({"issame": np.array([True, False])}, ValueError, "must be 1-D arrays of one length"),
    ({"issame": np.array([1, 2, 0, 1])}, ValueError, "issame must be boolean or 0/1"),
    ({"issame": np.array([1, 1, 1, 1])}, DataError, "got 4 same and 0 different"),
    ({"scores": np.array([0.1, np.nan, 0.3, 0.4])}, DataError, "1 pair scores are NaN"),
    ({"nfolds": 5}, ValueError, r"nfolds must be an integer in \[1, number of pairs = 4\], got 5"),
    ({"nfolds": 0}, ValueError, r"nfolds must be an integer in \[1, number of pairs = 4\], got 0"),
    ({"threshold_pairs": (np.array([0.5, 0.6]), np.array([1, 1]))}, DataError,
     "got 2 same and 0 different"),
    ({"threshold_pairs": (np.array([0.5, np.inf]), np.array([1, 0]))}, DataError,
     "1 pair scores are NaN or infinite"),
    ({"folds": np.zeros(3, int)}, ValueError, "folds must be an integer array of shape"),
    ({"far_targets": (0.0,)}, ValueError, r"far_targets must lie in \(0, 1\], got 0.0"),
])
def test_rejects_bad_input(kwargs: dict, error: type, message: str) -> None:
    args = {"scores": np.array([0.1, 0.2, 0.3, 0.4]), "issame": np.array([0, 1, 0, 1]),
            "nfolds": 2} | kwargs
    with pytest.raises(error, match=message):
        verification_metrics(**args)


def test_empty_input() -> None:
    with pytest.raises(DataError, match="no pairs"):
        roc_curve(np.zeros(0), np.zeros(0, bool))
