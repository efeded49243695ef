"""Confidence metrics of probabilistic embeddings: does a high confidence mean a right answer?

The definitions are those of "Probabilistic Embeddings Revisited" (Karpukhin,
Dereka, Kolesnikov 2022) as its code computes them (its
`metrics/verification.py` and `metrics/nearest.py`), so that our figures can
be compared with the paper's; tests replay that code's outputs on fixed inputs.

Verification (`verification_confidence_metrics`): pairs are scored by the
model's scorer and a pair is predicted "same" when its score is >= a
threshold; the thresholds are the distinct scores (and +inf: nothing
accepted). Besides the ROC figures (`auc`, `tpr` at the operating point whose
FPR is closest to a target, `eer`, `max_accuracy`), the pair confidence, the
smaller of its two items' confidences, is judged against whether the pair is
classified correctly at the best-accuracy threshold:

- `confidence_auroc`: ROC AUC of confidence for "correct" (Mann-Whitney, ties 1/2);
- `confidence_aupr`: trapezoid area under precision versus recall of the same
  (not average precision);
- `confidence_aurcc`: trapezoid area under the risk-coverage curve
  (`risk_coverage_curve`), risk = error rate of the most confident fraction; lower is better.

Retrieval (`neighbour_confidence_metrics`), from precomputed neighbour tables:
Recall@K, MAP@R, and the error-versus-reject areas `erc_recall@1` and
`erc_map@r`: with queries ordered by confidence, most confident first,
mean over k of the mean error of the first k (discrete, no (0, 0) point, no
trapezoid; lower is better).

Tie rule. Where the reference code sorts by confidence (risk-coverage, ERC),
its order of equal confidences is that of an unstable sort, so with tied
confidences of mixed outcome its result is not defined by the inputs. Here
items of equal confidence keep their input order (`confidence_order`, a
stable sort); every tie order gives a value between the one with the right
answers first within each tie group and the one with the wrong answers first.

NumPy only: importing this module does not import TensorFlow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sparse_embed.errors import DataError
from sparse_embed.metrics.verification import _auc, _check_pairs, _operating_points

DEFAULT_FPR = 1e-3


def confidence_order(confidences: np.ndarray) -> np.ndarray:
    """Indices that sort items by confidence, highest first, equal confidences in input order.

    Args:
        confidences: Real [n].

    Returns:
        int64 [n].
    """
    # Negating (rather than flipping an ascending sort) keeps tied items in input order.
    return np.argsort(-np.asarray(confidences, np.float64), kind="stable").astype(np.int64)


def _check_confidences(confidences: Any, n: int, name: str = "confidences") -> np.ndarray:
    """Validates and converts confidences to float64 [n]."""
    values = np.asarray(confidences)
    if values.shape != (n,):
        raise ValueError(f"{name} must be a 1-D array of length {n}, got shape {values.shape}")
    if values.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be real numbers, got dtype {values.dtype}")
    values = values.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise DataError(f"{int(np.sum(~np.isfinite(values)))} {name} are NaN or infinite")
    return values


def risk_coverage_curve(loss: np.ndarray, confidences: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Risk of the most confident items against the fraction kept.

    Items are ordered by `confidence_order` (confidence descending, ties in
    input order); point k keeps the first k.

    Args:
        loss: Non-negative [n], e.g. 1 for a wrong answer and 0 for a right one.
        confidences: Real [n], higher = more confident.

    Returns:
        (risk, coverage, thresholds), float64 [n + 1]: risk[k] is the mean loss
        of the first k items (risk[0] = 0), coverage[k] = k / n, thresholds[k]
        the confidence of the k-th item (thresholds[0] = thresholds[1] + 1),
        non-increasing.

    Raises:
        DataError: If there are no items, or a loss or confidence is not finite.
        ValueError: On inconsistent shapes, a negative loss or non-real values.
    """
    loss = np.asarray(loss)
    if loss.ndim != 1 or loss.dtype.kind not in "fiub":
        raise ValueError(f"loss must be a 1-D array of real numbers, got {loss.dtype} {loss.shape}")
    n = loss.size
    confidences = _check_confidences(confidences, n)
    if n == 0:
        raise DataError("no items for the risk-coverage curve")
    loss = loss.astype(np.float64)
    if not np.all(np.isfinite(loss)):
        raise DataError(f"{int(np.sum(~np.isfinite(loss)))} losses are NaN or infinite")
    if np.any(loss < 0):
        raise ValueError(f"losses must be non-negative, got a minimum of {loss.min()}")
    order = confidence_order(confidences)
    thresholds = np.empty(n + 1)
    thresholds[1:] = confidences[order]
    thresholds[0] = thresholds[1] + 1
    risk = np.zeros(n + 1)
    risk[1:] = np.cumsum(loss[order]) / np.arange(1, n + 1)
    return risk, np.arange(n + 1) / n, thresholds


def aurcc(loss: np.ndarray, confidences: np.ndarray) -> float:
    """Trapezoid area under the risk-coverage curve (`risk_coverage_curve`); lower is better.

    Args:
        loss: Non-negative [n].
        confidences: Real [n], higher = more confident.

    Returns:
        The area, in [0, max loss].
    """
    risk, coverage, _ = risk_coverage_curve(loss, confidences)
    return float(np.sum(np.diff(coverage) * (risk[1:] + risk[:-1])) / 2)


def error_reject_area(errors: np.ndarray, confidences: np.ndarray) -> float:
    """Mean over k of the mean error of the k most confident items (the reference's ERC).

    Args:
        errors: Real [n], e.g. 1 - recall@1 or 1 - AP@R per query.
        confidences: Real [n], higher = more confident; ties in input order.

    Returns:
        (1/n) sum_k (1/k) sum_{j <= k} errors_(j); lower is better.

    Raises:
        DataError: If there are no items or a confidence is not finite.
        ValueError: On inconsistent shapes.
    """
    errors = np.asarray(errors, np.float64)
    if errors.ndim != 1:
        raise ValueError(f"errors must be a 1-D array, got shape {errors.shape}")
    confidences = _check_confidences(confidences, errors.size)
    if errors.size == 0:
        raise DataError("no items for the error-versus-reject curve")
    ordered = errors[confidence_order(confidences)]
    return float(np.mean(np.cumsum(ordered) / np.arange(1, errors.size + 1)))


def _closest(values: np.ndarray, target: np.ndarray | float, last: bool) -> int:
    """Index of the first (or last) minimum of |values - target|."""
    deltas = np.abs(values - target)
    if last:
        return len(deltas) - 1 - int(np.argmin(deltas[::-1]))
    return int(np.argmin(deltas))


def _confidence_of_correctness(correct: np.ndarray, confidences: np.ndarray) -> dict[str, float]:
    """AUROC, AUPR and AURCC of confidences for predicting `correct` (bool [n])."""
    points = _operating_points(confidences, correct)
    num_correct, num_wrong = points.num_pos, points.num_neg
    # Undefined (the reference's scikit-learn raises) when every pair is right or every one wrong.
    auroc = _auc(points) if num_correct and num_wrong else float("nan")
    if num_correct:
        # Precision and recall of "correct" at each distinct confidence from the lowest up,
        # then (recall 0, precision 1) above the highest, as precision_recall_curve ends.
        kept = points.tp[:-1] + points.fp[:-1]
        precision = np.append(points.tp[:-1] / kept, 1.0)
        recall = points.tp / num_correct
        aupr = float(np.sum((recall[:-1] - recall[1:]) * (precision[:-1] + precision[1:])) / 2)
    else:
        aupr = float("nan")
    return {"confidence_auroc": auroc, "confidence_aupr": aupr,
            "confidence_aurcc": aurcc((~correct).astype(np.float64), confidences)}


def verification_confidence_metrics(scores: np.ndarray, issame: np.ndarray,
                                    confidences: np.ndarray | None = None,
                                    fpr: float = DEFAULT_FPR) -> dict[str, Any]:
    """Verification figures of scored pairs and, given confidences, how well they predict errors.

    A pair is predicted "same" when its score is >= the threshold; the ROC
    has one point per distinct score plus (0, 0) at threshold +inf. Pairs
    whose score is not finite are left out and counted, as the reference does.

    Args:
        scores: float [n], higher = more similar (any scorer: cosine, MLS, ...).
        issame: bool [n] (or 0/1), True for pairs of one identity.
        confidences: float [n] pair confidences (the smaller of the two items'
            confidences), higher = more confident; None for no confidence metrics.
        fpr: The target false-positive rate of `tpr`.

    Returns:
        A dict with
        - `pr`: fraction of same pairs;
        - `max_accuracy`: accuracy at the best threshold (over all of them,
            chosen on these pairs); between equally accurate thresholds the
            reference's rule decides (the first maximum of its float32 formula);
        - `threshold`: that threshold (+inf: every pair called different);
        - `auc`: trapezoid area under the ROC (ties as one step);
        - `tpr`, `fpr`: the TPR and actual FPR of the ROC point whose FPR is
            closest to the target (the last such, the highest TPR), not interpolated;
        - `eer`: (FPR + FNR) / 2 at the point where |FPR - FNR| is least (the
            smaller of the first and last such points);
        - `dropped_pairs`: pairs left out for a non-finite score;
        - with confidences, `confidence_auroc`, `confidence_aupr` and
            `confidence_aurcc` of "classified correctly at `threshold`"; AUROC is
            NaN when every pair is right or every one wrong, AUPR when none is right.

    Raises:
        DataError: If no pair has a finite score, only one kind of pair remains,
            or a confidence is not finite.
        ValueError: On inconsistent shapes, a non-boolean issame or an fpr outside [0, 1].
    """
    scores = np.asarray(scores)
    issame = np.asarray(issame)
    if scores.ndim != 1 or issame.shape != scores.shape:
        raise ValueError(f"scores and issame must be 1-D arrays of one length, got shapes "
                         f"{scores.shape} and {issame.shape}")
    if confidences is not None:
        confidences = _check_confidences(confidences, scores.size)
    if not 0 <= fpr <= 1:
        raise ValueError(f"fpr must lie in [0, 1], got {fpr!r}")
    if scores.dtype.kind not in "fiu":
        raise ValueError(f"scores must be real numbers, got dtype {scores.dtype}")
    finite = np.isfinite(scores)
    dropped = int(np.sum(~finite))
    if dropped == scores.size > 0:
        raise DataError(f"all {dropped} pair scores are NaN or infinite: the embeddings are not "
                        "finite (did training diverge?)")
    scores, issame = scores[finite], issame[finite]
    if confidences is not None:
        confidences = confidences[finite]
    scores, issame = _check_pairs(scores, issame)

    points = _operating_points(scores, issame)
    num_pos, num_neg = points.num_pos, points.num_neg
    # The reference's ROC order: threshold decreasing from +inf, (FPR, TPR) rising from (0, 0).
    tp, fp = points.tp[::-1], points.fp[::-1]
    thresholds = np.concatenate([[np.inf], np.unique(scores)[::-1]])
    fprs, tprs = fp / num_neg, tp / num_pos
    auc = float(np.sum(np.diff(fprs) * (tprs[1:] + tprs[:-1])) / 2)
    fpr_index = _closest(fprs, fpr, last=True)
    eer = min(0.5 * (fprs[i] + 1 - tprs[i])
              for i in (_closest(fprs, 1 - tprs, last=True), _closest(fprs, 1 - tprs, last=False)))
    # The best threshold is the first maximum of pr * TPR + (1 - pr) * (1 - FPR) with pr rounded
    # to float32, exactly as the reference computes it: between thresholds of equal accuracy
    # that rounding decides (it does in the reference's own unit-test example), and the choice
    # changes which pairs count as correct for the confidence metrics.
    pr32 = float(np.float32(num_pos) / np.float32(scores.size))
    best = int(np.argmax(pr32 * tprs + (1 - pr32) * (1 - fprs)))
    result: dict[str, Any] = {
        "pr": num_pos / scores.size,
        "max_accuracy": float(tp[best] + num_neg - fp[best]) / scores.size,
        "threshold": float(thresholds[best]),
        "auc": auc,
        "tpr": float(tprs[fpr_index]),
        "fpr": float(fprs[fpr_index]),
        "eer": float(eer),
        "dropped_pairs": dropped,
    }
    if confidences is not None:
        correct = (scores >= thresholds[best]) == issame
        result |= _confidence_of_correctness(correct, confidences)
    return result


def _check_neighbours(nearest_same: Any, class_sizes: Any) -> tuple[np.ndarray, np.ndarray]:
    same = np.asarray(nearest_same)
    sizes = np.asarray(class_sizes)
    if same.ndim != 2 or same.shape[1] == 0:
        raise ValueError(f"nearest_same must be a [queries, neighbours] array with at least one "
                         f"neighbour, got shape {same.shape}")
    if sizes.shape != (same.shape[0],):
        raise ValueError(f"class_sizes must be a 1-D array of length {same.shape[0]} (one per "
                         f"query), got shape {sizes.shape}")
    if same.dtype != np.bool_:
        if not np.issubdtype(same.dtype, np.number) or not np.all((same == 0) | (same == 1)):
            raise ValueError(f"nearest_same must be boolean or 0/1, got dtype {same.dtype}")
        same = same.astype(bool)
    if sizes.dtype.kind not in "iu" or np.any(sizes < 1):
        raise ValueError(f"class_sizes must be integers >= 1, got {sizes.dtype} with minimum "
                         f"{sizes.min() if sizes.size else None}")
    if same.shape[0] == 0:
        raise DataError("no queries")
    return same, sizes.astype(np.int64)


def average_precision_at_r(nearest_same: np.ndarray, class_sizes: np.ndarray,
                           match_self: bool = False) -> np.ndarray:
    """AP@R of every query (Musgrave et al. 2020), R truncated to the neighbours given.

    Args:
        nearest_same: bool [Q, M]: is the j-th neighbour (best first) of the query's class.
        class_sizes: int [Q] size of each query's class, the query included.
        match_self: The lists include the query itself: R = class size (else
            class size - 1).

    Returns:
        float64 [Q], (1/R) sum_{j <= R} same_j * P@j, with 0 for a query with R = 0.

    Raises:
        DataError: If there are no queries.
        ValueError: On inconsistent shapes or values.
    """
    same, sizes = _check_neighbours(nearest_same, class_sizes)
    m = same.shape[1]
    r = np.minimum(sizes if match_self else sizes - 1, m)
    ranks = np.arange(1, m + 1)
    hits = same & (ranks <= r[:, None])
    precision = np.cumsum(same, axis=1) / ranks
    # R = 0 (a singleton without self) divides by 1: AP 0, counted, as the reference does.
    return (hits * precision).sum(axis=1) / np.maximum(r, 1)


def neighbour_confidence_metrics(nearest_same: np.ndarray, class_sizes: np.ndarray,
                                 confidences: np.ndarray | None = None,
                                 ks: Sequence[int] = (1,)) -> dict[str, float]:
    """Recall@K, MAP@R and, given confidences, the error-versus-reject areas of neighbour lists.

    Args:
        nearest_same: bool [Q, M]: is the j-th neighbour of query i (self
            removed, best first) of the query's class; M >= the largest class size - 1
            for an untruncated MAP@R.
        class_sizes: int [Q] size of each query's class, the query included.
        confidences: float [Q] the queries' confidences, higher = more
            confident; None for no confidence metrics.
        ks: The K of Recall@K, each >= 1 (K beyond M counts the M given).

    Returns:
        - `recall@K`: over queries with another item of their class, the fraction
            with one among their first K neighbours;
        - `map@r`: mean AP@R over all queries, those alone in their class
            counting 0 (as the reference computes it);
        - `map@r_match_self`: the same table read as lists that include the query
            (R = class size);
        - with confidences, `erc_recall@1` (over queries with another item of
            their class, error 1 - recall@1), `erc_map@r` (over all queries,
            error 1 - AP@R) and `confidence_accuracy` (the best accuracy of
            predicting "the first neighbour is right" by confidence >= a threshold).

    Raises:
        DataError: If there are no queries or no query has another item of its
            class, or a confidence is not finite.
        ValueError: On inconsistent shapes or values, or a K < 1.
    """
    same, sizes = _check_neighbours(nearest_same, class_sizes)
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be integers >= 1, got {list(ks)}")
    if confidences is not None:
        confidences = _check_confidences(confidences, same.shape[0])
    answerable = sizes > 1
    if not answerable.any():
        raise DataError(f"no query has another item of its class ({same.shape[0]} queries): "
                        "recall needs classes of two or more")
    result = {f"recall@{k}": float(same[answerable, :k].any(axis=1).mean()) for k in ks}
    ap = average_precision_at_r(same, sizes)
    result["map@r"] = float(ap.mean())
    result["map@r_match_self"] = float(average_precision_at_r(same, sizes, match_self=True).mean())
    if confidences is not None:
        first_right = same[answerable, 0]
        result["erc_recall@1"] = error_reject_area(1.0 - first_right, confidences[answerable])
        result["erc_map@r"] = error_reject_area(1.0 - ap, confidences)
        points = _operating_points(confidences[answerable], first_right)
        # Integer counts: where every first neighbour is right (or every one wrong) this is 1,
        # where the reference's ROC divides by zero and returns NaN.
        correct_counts = points.tp + (points.num_neg - points.fp)
        result["confidence_accuracy"] = float(correct_counts.max()) / first_right.size
    return result
