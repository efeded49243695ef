"""Retrieval metrics of embedding distributions: shortlist by the modes, re-rank by the scorer.

Every item of a labelled set queries all the others, as the probabilistic-embeddings reference
code does (`metrics/nearest.py::NearestNeighboursMetrics`): the candidates of a query are the
`prefetch_factor` x M nearest modes in L2 (the mode is the normalised mean on the sphere), the
first M of them are re-scored with the scorer (MLS, HIB, cosine, ...) and sorted, and the query
itself is removed from its list. M is the largest number of neighbours a metric reads, plus one for
the query itself. With an MLS or HIB scorer the ranking is therefore "L2 shortlist, then re-rank",
not a full ranking by the scorer. The metrics are `sparse_embed.metrics.uncertainty`'s.

Ties are broken towards the lower index, in both the shortlist and the re-ranking (the reference
sorts unstably there).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sparse_embed.distributions.base import Distribution
from sparse_embed.metrics.uncertainty import average_precision_at_r, neighbour_confidence_metrics


def _stable_descending(values: np.ndarray) -> np.ndarray:
    """Column order of each row by value, highest first, ties to the lower column."""
    return np.argsort(-values, axis=1, kind="stable")


def neighbour_metrics(parameters: np.ndarray, labels: np.ndarray, distribution: Distribution,
                      scorer: object, ks: Sequence[int] = (1,), prefetch_factor: int = 2) -> dict[str, float]:
    """Recall@K, MAP@R (and, with confidences, the error-versus-reject areas) of a labelled set.

    Args:
        parameters: float [N, P] the items' distribution parameters.
        labels: int [N] their classes.
        distribution: How `parameters` are read.
        scorer: A scorer of `sparse_embed.distributions.scorers` (called as `scorer(p1, p2)`,
            broadcasting) that re-ranks the shortlist.
        ks: The K of Recall@K.
        prefetch_factor: The shortlist holds prefetch_factor x M nearest modes in L2.

    Returns:
        `neighbour_confidence_metrics`'s dict (`recall@K`, `map@r`, `map@r_match_self`
        and, for a distribution with a confidence, `erc_recall@1`, `erc_map@r`,
        `confidence_accuracy`), with `map@r_match_self` computed on the lists that
        keep the query itself, where the scorer ranked it.

    Raises:
        ValueError: If the shapes disagree.
    """
    from sparse_embed.keras import tf

    parameters = np.asarray(parameters)
    labels = np.asarray(labels).astype(np.int64)
    if parameters.ndim != 2 or labels.shape != (len(parameters),):
        raise ValueError(f"expected parameters [N, P] and labels [N], got {parameters.shape} and "
                         f"{labels.shape}")
    n = len(labels)
    sizes = np.bincount(labels)[labels]
    # Recall@K reads K neighbours and MAP@R class size - 1, each plus the query itself.
    m = min(max(max(ks), int(sizes.max()) - 1) + 1, n)
    modes = distribution.modes(tf.constant(parameters)).numpy().astype(np.float64)
    squared = (modes ** 2).sum(axis=1)
    distances = squared[:, None] + squared[None, :] - 2.0 * modes @ modes.T
    prefetch = min(m * prefetch_factor, n)
    shortlist = np.argsort(distances, axis=1, kind="stable")[:, :prefetch][:, :m]
    candidates = tf.gather(tf.constant(parameters), shortlist)  # [N, M, P]
    scores = scorer(tf.constant(parameters)[:, None, :], candidates).numpy()
    ranked = np.take_along_axis(shortlist, _stable_descending(scores), axis=1)
    same = labels[ranked] == labels[:, None]
    others = ranked != np.arange(n)[:, None]
    # Drop the query itself, keeping the order; a list the shortlist left the query out of keeps
    # all M entries, the others are padded with a miss past their M - 1 (as the reference pads).
    without_self = np.zeros((n, m), dtype=bool)
    for i, (row, keep) in enumerate(zip(same, others, strict=True)):
        without_self[i, : keep.sum()] = row[keep]
    confidences = (distribution.confidence(tf.constant(parameters)).numpy()
                   if distribution.has_confidence else None)
    result = neighbour_confidence_metrics(without_self, sizes, confidences, ks=ks)
    result["map@r_match_self"] = float(average_precision_at_r(same, sizes, match_self=True).mean())
    return result
