"""Verification metrics of scored pairs: k-fold accuracy (LFW protocol), ROC, AUC, EER, TAR@FAR.

Scores are similarities (higher = more alike, e.g. the cosine of two
embeddings); a pair is predicted "same" when its score is > threshold.

Accuracy needs a threshold chosen on pairs other than those it is measured
on. `PROTOCOLS` lists the three ways `verification_metrics` chooses it: on
the other folds (LFW View 2, `pairs.txt`: 10 folds), on separate threshold
pairs (LFW View 1: chosen on `pairsDevTrain.txt`, measured on
`pairsDevTest.txt`), or, for a single fold with nothing held out, on the
test pairs themselves, which is an optimistic figure and labelled as one.

Every threshold search is exact: the distinct classifiers `score > t` on a
set of scores are one per gap between consecutive distinct scores, plus "all
same" and "all different", so the candidates are the midpoints of the sorted
unique scores and the two ends. Their true- and false-positive counts are
cumulative sums over the sorted unique scores, computed for all candidates at
once in O(n log n).

NumPy only: importing this module does not import TensorFlow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from sparse_embed.errors import DataError


@dataclass(frozen=True)
class _OperatingPoints:
    """Every distinct classifier `score > threshold` on a set of scored pairs.

    Attributes:
        thresholds: float64 [m + 1], ascending: just below the lowest score
            (all pairs predicted same), the midpoints of consecutive unique
            scores, and the highest score (none predicted same).
        tp: int64 [m + 1], positive pairs with score > threshold.
        fp: int64 [m + 1], negative pairs with score > threshold.
        pos_per_value: int64 [m], positive pairs at each unique score (ascending).
        neg_per_value: int64 [m], negative pairs at each unique score.
    """

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    pos_per_value: np.ndarray
    neg_per_value: np.ndarray

    @property
    def num_pos(self) -> int:
        return int(self.tp[0])

    @property
    def num_neg(self) -> int:
        return int(self.fp[0])

    def roc(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(far, tar, thresholds) by decreasing threshold; see `roc_curve`."""
        far = self.fp[::-1] / self.num_neg
        tar = self.tp[::-1] / self.num_pos
        return far, tar, self.thresholds[::-1].copy()


def _operating_points(scores: np.ndarray, issame: np.ndarray) -> _OperatingPoints:
    values, inverse = np.unique(scores, return_inverse=True)
    pos = np.bincount(inverse[issame], minlength=len(values)).astype(np.int64)
    neg = np.bincount(inverse[~issame], minlength=len(values)).astype(np.int64)
    # Candidate k predicts "same" for values[k:]; the trailing 0 is "none".
    zero = np.zeros(1, np.int64)
    tp = np.concatenate([np.cumsum(pos[::-1])[::-1], zero])
    fp = np.concatenate([np.cumsum(neg[::-1])[::-1], zero])
    thresholds = np.concatenate([
        [np.nextafter(values[0], -np.inf)],
        (values[:-1] + values[1:]) / 2,
        [values[-1]],
    ])
    return _OperatingPoints(thresholds, tp, fp, pos, neg)


def _best_threshold(scores: np.ndarray, issame: np.ndarray) -> float:
    """The threshold of highest accuracy on these pairs; ties go to the lowest threshold."""
    points = _operating_points(scores, issame)
    correct = points.tp + (points.num_neg - points.fp)
    return float(points.thresholds[int(np.argmax(correct))])


def _check_pairs(scores: Any, issame: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validates and converts scores to float64 [n] and issame to bool [n]."""
    scores = np.asarray(scores)
    issame = np.asarray(issame)
    if scores.ndim != 1 or issame.shape != scores.shape:
        raise ValueError(
            f"scores and issame must be 1-D arrays of one length, got shapes {scores.shape} "
            f"and {issame.shape}"
        )
    if scores.size == 0:
        raise DataError("no pairs to evaluate")
    if not (np.issubdtype(scores.dtype, np.integer) or np.issubdtype(scores.dtype, np.floating)):
        raise ValueError(f"scores must be real numbers, got dtype {scores.dtype}")
    # float64: the midpoints of float32 scores are then exact.
    scores = scores.astype(np.float64)
    if not np.all(np.isfinite(scores)):
        raise DataError(
            f"{int(np.sum(~np.isfinite(scores)))} pair scores are NaN or infinite: "
            "the embeddings are not finite (did training diverge?)"
        )
    if issame.dtype != np.bool_:
        if not np.issubdtype(issame.dtype, np.number) or not np.all((issame == 0) | (issame == 1)):
            raise ValueError(f"issame must be boolean or 0/1, got dtype {issame.dtype}")
        issame = issame.astype(bool)
    num_pos = int(issame.sum())
    if num_pos == 0 or num_pos == issame.size:
        raise DataError(
            f"verification needs both same and different pairs, got {num_pos} same and "
            f"{issame.size - num_pos} different"
        )
    return scores, issame


def roc_curve(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact ROC curve: one point per distinct classifier `score > threshold`.

    Args:
        scores: float [n], higher = more similar.
        issame: bool [n] (or 0/1), True for pairs of one identity.

    Returns:
        (far, tar, thresholds), float64 [m + 1] for m unique scores, ordered by
        decreasing threshold: far = false-accept rate (fraction of different
        pairs with score > threshold) rises from 0 to 1, tar = true-accept rate
        (fraction of same pairs with score > threshold) likewise. The first
        threshold is the highest score (nothing accepted), the last lies just
        below the lowest score (everything accepted).

    Raises:
        DataError: If there are no pairs, only one kind of pair, or non-finite scores.
        ValueError: If the arrays have different or non-1-D shapes, or issame is not boolean.
    """
    scores, issame = _check_pairs(scores, issame)
    return _operating_points(scores, issame).roc()


def _auc(points: _OperatingPoints) -> float:
    """Mann-Whitney AUC: P(s_pos > s_neg) + P(s_pos == s_neg) / 2, exactly.

    For the negatives at each unique score v, the positives above v count 1
    and those at v count 1/2; 2U sums both in integers.
    """
    pos_above = points.tp[1:]
    twice_u = np.sum(points.neg_per_value * (2 * pos_above + points.pos_per_value))
    return float(twice_u) / (2.0 * points.num_pos * points.num_neg)


def _eer(far: np.ndarray, tar: np.ndarray) -> float:
    """Equal error rate: where FAR = FRR = 1 - TAR on the piecewise-linear ROC.

    g = 1 - far - tar falls from 1 at (0, 0) to -1 at (1, 1) along the curve,
    so it crosses 0 exactly once; the crossing is interpolated on its segment.
    """
    gap = 1.0 - far - tar
    k = int(np.argmax(gap <= 0))
    if gap[k] == 0:
        return float(far[k])
    alpha = gap[k - 1] / (gap[k - 1] - gap[k])
    return float(far[k - 1] + alpha * (far[k] - far[k - 1]))


def _tar_at_far(points: _OperatingPoints, far_targets: tuple[float, ...]) -> dict[float, float]:
    """Highest TAR at an operating point with FAR <= target, for supported targets.

    A target f is supported when at least 1 / f negatives exist, i.e. at
    least one false accept is allowed; below that the estimate is always the
    FAR = 0 point and says nothing about f.
    """
    result = {}
    for far in far_targets:
        # The tolerance keeps f * N whole where it is whole in real numbers
        # (0.29 * 100 = 28.999999999999996 in floating point).
        max_fp = math.floor(far * points.num_neg + 1e-9)
        if max_fp < 1:
            continue
        result[far] = float(points.tp[points.fp <= max_fp].max()) / points.num_pos
    return result


def _contiguous_folds(num_pairs: int, nfolds: int) -> np.ndarray:
    """Fold index per pair: nfolds contiguous folds, sizes differing by at most one."""
    if isinstance(nfolds, bool) or not isinstance(nfolds, int) or not 1 <= nfolds <= num_pairs:
        raise ValueError(f"nfolds must be an integer in [1, number of pairs = {num_pairs}], "
                         f"got {nfolds!r}")
    folds = np.empty(num_pairs, np.int64)
    for index, part in enumerate(np.array_split(np.arange(num_pairs), nfolds)):
        folds[part] = index
    return folds


# How the accuracy threshold was chosen -> the note that goes with the accuracy
# (`accuracy_protocol` of the results).
PROTOCOLS = {
    "k-fold": "threshold chosen on the other folds (k-fold cross-validation)",
    "threshold pairs": "threshold chosen on separate threshold pairs (LFW View 1: pairsDevTrain)",
    "test fold": "threshold chosen on the test fold itself (no held-out fold): optimistic",
}


def _protocol(num_folds: int, has_threshold_pairs: bool) -> str:
    if has_threshold_pairs:
        return "threshold pairs"
    return "k-fold" if num_folds > 1 else "test fold"


def verification_metrics(scores: np.ndarray, issame: np.ndarray, folds: np.ndarray | None = None,
                         nfolds: int = 10, far_targets: tuple[float, ...] = (1e-3,),
                         threshold_pairs: tuple[np.ndarray, np.ndarray] | None = None
                         ) -> dict[str, Any]:
    """Verification accuracy (LFW protocols), AUC, EER and TAR@FAR of scored pairs.

    The accuracy threshold is chosen by one of the `PROTOCOLS`, every search
    exact over all candidate thresholds, ties to the lowest:

    - `threshold pairs` (LFW View 1), when `threshold_pairs` is given: the
      threshold of highest accuracy on those pairs (`pairsDevTrain.txt`) is
      applied to every fold of these pairs (`pairsDevTest.txt`: one fold);
    - `k-fold` (LFW View 2, Huang et al. 2007, as face-recognition code
      evaluates it), with 2 or more folds: for each fold k, the threshold that
      maximises accuracy on the other folds is applied to fold k;
    - `test fold`, a single fold and nothing else: the best threshold of the
      fold itself, i.e. the highest accuracy any threshold reaches on these
      pairs; an optimistic figure, and `accuracy_protocol` says so.

    The reported accuracy is the mean of the test-fold accuracies. AUC, EER
    and TAR@FAR need no threshold and use all pairs at once.

    Args:
        scores: float [n], higher = more similar.
        issame: bool [n] (or 0/1), True for pairs of one identity.
        folds: int [n], the fold of each pair (from the pairs file); None
            splits the pairs into `nfolds` contiguous folds, the layout of the
            LFW-style pairs files and .bin exports.
        nfolds: Number of contiguous folds when `folds` is None (1 or more).
        far_targets: False-accept rates at which to report TAR.
        threshold_pairs: (scores [m], issame [m]) of separate pairs that choose
            the threshold, as `scores` and `issame`; None chooses it on `scores`.

    Returns:
        A dict with
        - `accuracy`: mean test-fold accuracy;
        - `accuracy_std`: standard deviation of the fold accuracies (ddof=0),
            only with 2 or more folds;
        - `accuracy_protocol`: the sentence of `PROTOCOLS` saying how the
            threshold was chosen;
        - `threshold`: the threshold applied (k-fold: the mean of the folds' ones);
        - `auc`: area under the ROC, ties counted 1/2 (Mann-Whitney);
        - `eer`: equal error rate (FAR = FRR, interpolated on the ROC);
        - `tar_at_far`: {far: highest TAR at an operating point with FAR <= far},
            only for the targets with at least 1/far different pairs.

    Raises:
        DataError: If there are no pairs, only one kind of pair, or non-finite
            scores (in either set of pairs).
        ValueError: On inconsistent shapes, a non-boolean issame, nfolds out
            of range, or a far target outside (0, 1].
    """
    scores, issame = _check_pairs(scores, issame)
    for far in far_targets:
        if not 0 < far <= 1:
            raise ValueError(f"far_targets must lie in (0, 1], got {far!r}")
    if folds is None:
        folds = _contiguous_folds(scores.size, nfolds)
    else:
        folds = np.asarray(folds)
        if folds.shape != scores.shape or not np.issubdtype(folds.dtype, np.integer):
            raise ValueError(f"folds must be an integer array of shape {scores.shape}, "
                             f"got {folds.dtype} {folds.shape}")
    fold_ids = np.unique(folds)
    protocol = _protocol(fold_ids.size, threshold_pairs is not None)
    fixed = None
    if threshold_pairs is not None:
        fixed = _best_threshold(*_check_pairs(*threshold_pairs))

    accuracies, thresholds = [], []
    for fold in fold_ids:
        test = folds == fold
        if fixed is not None:
            threshold = fixed
        elif protocol == "test fold":
            threshold = _best_threshold(scores, issame)
        else:
            threshold = _best_threshold(scores[~test], issame[~test])
        accuracies.append(np.mean((scores[test] > threshold) == issame[test]))
        thresholds.append(threshold)

    points = _operating_points(scores, issame)
    far, tar, _ = points.roc()
    result: dict[str, Any] = {"accuracy": float(np.mean(accuracies))}
    if fold_ids.size > 1:
        result["accuracy_std"] = float(np.std(accuracies))
    return result | {
        "accuracy_protocol": PROTOCOLS[protocol],
        "threshold": float(np.mean(thresholds)),
        "auc": _auc(points),
        "eer": _eer(far, tar),
        "tar_at_far": _tar_at_far(points, tuple(far_targets)),
    }
