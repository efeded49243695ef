"""Sparse embeddings: FLOPs and L1 regularizers, their weight schedules, sparsity statistics.

Paria et al., "Minimizing FLOPs to Learn Efficient Sparse Representations"
(ICLR 2020). An inverted index scores a query q against a database vector x by
visiting only the dimensions where both are non-zero. If p_j is the
probability that dimension j of an embedding is non-zero, the expected number
of multiply-adds per (query, database vector) pair is

    FLOPs = sum_j p_j^2.

For a given mean number of non-zeros per vector, nnz = sum_j p_j, this is
smallest when the non-zeros are spread evenly over the d dimensions
(p_j = nnz / d, FLOPs = nnz^2 / d), so the paper's sub-optimality ratio

    R_sub = d * sum_j p_j^2 / (sum_j p_j)^2 >= 1

measures how far an embedding is from that ideal (1 = evenly spread).

Training minimises a continuous relaxation of FLOPs on a batch of B
embeddings e [B, d], replacing the indicator of a non-zero by |e_ij|:

    flops_regularizer(e) = sum_j ((1/B) sum_i |e_ij|)^2,

against the L1 baseline l1_regularizer(e) = (1/B) sum_i sum_j |e_ij|. Both are
meant for the L2-normalised embeddings that retrieval uses (callers
normalise), and are weighted by a schedule of the training step.

The statistics have one definition (`_stats_from_fractions`) shared by the
TensorFlow version used in training and the NumPy accumulator used to
evaluate large embedding files chunk by chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from sparse_embed.config import SparsityConfig
from sparse_embed.errors import ConfigError
from sparse_embed.keras import tf
from sparse_embed.registry import Registry

# regularizer(embeddings, cross_replica_mean) -> float32 scalar. The second
# argument maps a per-worker statistic to its average over all workers (None:
# use the local batch alone).
Regularizer = Callable[[tf.Tensor, Callable[[tf.Tensor], tf.Tensor] | None], tf.Tensor]
WeightSchedule = Callable[[Any, float, int], tf.Tensor]

REGULARIZERS: Registry[Regularizer] = Registry("sparsity regularizer")
WEIGHT_SCHEDULES: Registry[WeightSchedule] = Registry("sparsity weight schedule")

# Lower bound of nnz^2 in the R_sub denominator: it only matters when every
# entry is zero (then FLOPs is 0 too and R_sub is defined as 0); any non-zero
# batch of fewer than 1e19 vectors has nnz^2 >= 1 / B^2 far above it.
_TINY = float(np.finfo(np.float32).tiny)


# --- regularizers ---------------------------------------------------------------


@REGULARIZERS.register("flops")
def flops_regularizer(embeddings: tf.Tensor,
                      cross_replica_mean: Callable[[tf.Tensor], tf.Tensor] | None = None
                      ) -> tf.Tensor:
    """The FLOPs regularizer sum_j ((1/B) sum_i |e_ij|)^2 (Paria et al. 2020).

    The continuous relaxation of FLOPs = sum_j p_j^2 (module docstring). The
    square of each dimension's mean activation penalises busy dimensions more
    than quiet ones, which spreads the non-zeros evenly over the dimensions
    instead of merely reducing their number, as L1 does.

    It is a batch statistic, not a sum over examples: N workers with batch B
    each compute it on their own B (the original per-GPU form) unless
    `cross_replica_mean` averages the column means first, which gives exactly
    the value (and gradient) of one batch of N*B.

    Args:
        embeddings: float [B, d], L2-normalised.
        cross_replica_mean: Averages a [d] tensor over workers; None keeps the local batch.

    Returns:
        float32 scalar.
    """
    mean_abs = tf.reduce_mean(tf.abs(tf.cast(embeddings, tf.float32)), axis=0)
    if cross_replica_mean is not None:
        mean_abs = cross_replica_mean(mean_abs)
    return tf.reduce_sum(tf.square(mean_abs))


@REGULARIZERS.register("l1")
def l1_regularizer(embeddings: tf.Tensor,
                   cross_replica_mean: Callable[[tf.Tensor], tf.Tensor] | None = None
                   ) -> tf.Tensor:
    """The L1 regularizer (1/B) sum_i sum_j |e_ij|, the paper's baseline.

    A mean over examples, so averaging workers' gradients already gives the
    global batch's: `cross_replica_mean` is not needed and not used.

    Args:
        embeddings: float [B, d], L2-normalised.
        cross_replica_mean: Unused; accepted so every regularizer has one signature.

    Returns:
        float32 scalar.
    """
    return tf.reduce_mean(tf.reduce_sum(tf.abs(tf.cast(embeddings, tf.float32)), axis=-1))


@REGULARIZERS.register("none")
def no_regularizer(embeddings: tf.Tensor,
                   cross_replica_mean: Callable[[tf.Tensor], tf.Tensor] | None = None
                   ) -> tf.Tensor:
    """No regularizer: a float32 zero, so dense runs log the same metrics.

    Args:
        embeddings: float [B, d]; unused.
        cross_replica_mean: Unused.
    """
    return tf.zeros([], tf.float32)


# --- weight schedules -------------------------------------------------------------


def _check_warmup_steps(warmup_steps: int) -> None:
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")


@WEIGHT_SCHEDULES.register("constant")
def constant_weight(step: tf.Tensor | int, weight: float, warmup_steps: int) -> tf.Tensor:
    """The constant weight w at every step.

    Args:
        step: The global step; unused.
        weight: The regularizer weight w.
        warmup_steps: Unused; accepted so every schedule has one signature.

    Returns:
        float32 scalar.
    """
    _check_warmup_steps(warmup_steps)
    return tf.constant(weight, tf.float32)


@WEIGHT_SCHEDULES.register("quadratic_warmup")
def quadratic_warmup_weight(step: tf.Tensor | int, weight: float, warmup_steps: int) -> tf.Tensor:
    """w * min(1, (t / T)^2): the paper's `dynamic_4` schedule.

    Starting the regularizer at full weight zeroes most activations before the
    metric loss has shaped the embedding, and training stalls; the quadratic
    ramp lets the embedding form first and sparsifies it as training goes on.

    Args:
        step: The global step t (Python int, tensor or tf.Variable, any
            numeric dtype); read inside `tf.function` every call.
        weight: The final weight w.
        warmup_steps: T, the step at which the weight reaches w; 0 means no warm-up.

    Returns:
        float32 scalar.
    """
    _check_warmup_steps(warmup_steps)
    if warmup_steps == 0:
        return tf.constant(weight, tf.float32)
    progress = tf.cast(step, tf.float32) / float(warmup_steps)
    return weight * tf.minimum(1.0, tf.square(progress))


def sparsity_weight(config: SparsityConfig, step: tf.Tensor | int) -> tf.Tensor:
    """The regularizer weight a config schedules at `step`.

    Args:
        config: The run's sparsity section (`schedule`, `weight`, `warmup_steps`).
        step: The global step (tensor or tf.Variable inside `tf.function`).

    Returns:
        float32 scalar.

    Raises:
        ConfigError: If the schedule is unknown, the weight negative or not
            finite, or warmup_steps negative.
    """
    schedule = WEIGHT_SCHEDULES.get(config.schedule)
    if not math.isfinite(config.weight) or config.weight < 0:
        raise ConfigError(f"sparsity.weight must be a finite number >= 0, got {config.weight!r}")
    if config.warmup_steps < 0:
        raise ConfigError(f"sparsity.warmup_steps must be >= 0, got {config.warmup_steps!r}")
    return schedule(step, config.weight, config.warmup_steps)


# --- statistics -------------------------------------------------------------------


def _stats_from_fractions(p: Any, d: Any, reduce_sum: Callable[[Any], Any],
                          maximum: Callable[[Any, Any], Any]) -> dict[str, Any]:
    """nnz, FLOPs and R_sub from the per-dimension non-zero fractions p [d].

    Written once for both backends: `reduce_sum` and `maximum` are NumPy's or
    TensorFlow's.
    """
    nnz = reduce_sum(p)
    flops = reduce_sum(p * p)
    r_sub = d * flops / maximum(nnz * nnz, _TINY)
    return {"nnz": nnz, "flops": flops, "r_sub": r_sub}


def sparsity_stats(embeddings: tf.Tensor, zero_threshold: float) -> dict[str, tf.Tensor]:
    """Sparsity statistics of a batch, in TensorFlow (for training summaries).

    With p_j the fraction of the B vectors whose |e_ij| > zero_threshold:

    - `nnz`: mean non-zeros per vector, sum_j p_j;
    - `flops`: expected multiply-adds per pair, sum_j p_j^2 (Paria et al. 2020);
    - `r_sub`: d * sum_j p_j^2 / (sum_j p_j)^2 >= 1, defined as 0 when every
      entry is zero (no work to spread, and 0 cannot be mistaken for a ratio).

    Args:
        embeddings: float [B, d], B >= 1.
        zero_threshold: Entries with |e_ij| at or below it count as zero.

    Returns:
        float32 scalars keyed `nnz`, `flops`, `r_sub`.
    """
    nonzero = tf.abs(tf.cast(embeddings, tf.float32)) > zero_threshold
    p = tf.reduce_mean(tf.cast(nonzero, tf.float32), axis=0)
    return _stats_from_fractions(p, tf.cast(tf.size(p), tf.float32), tf.reduce_sum, tf.maximum)


class SparsityAccumulator:
    """Sparsity statistics of many embeddings, accumulated chunk by chunk in NumPy.

    Keeps one non-zero count per dimension, so an embedding file far larger
    than memory is measured exactly by streaming it through `update`.

    Args:
        zero_threshold: Entries with |e_ij| at or below it count as zero.
    """

    def __init__(self, zero_threshold: float) -> None:
        self.zero_threshold = zero_threshold
        self.count = 0
        self._nonzero: np.ndarray | None = None

    def update(self, chunk: np.ndarray) -> None:
        """Adds a chunk of embeddings.

        Args:
            chunk: [n, d] array (any real dtype); d must match earlier chunks.

        Raises:
            ValueError: If the chunk is not 2-D or its d differs from earlier chunks'.
        """
        chunk = np.asarray(chunk)
        if chunk.ndim != 2:
            raise ValueError(f"embeddings must be a 2-D [n, d] array, got shape {chunk.shape}")
        if self._nonzero is None:
            self._nonzero = np.zeros(chunk.shape[1], dtype=np.int64)
        elif chunk.shape[1] != self._nonzero.shape[0]:
            raise ValueError(
                f"embedding chunk has d={chunk.shape[1]}, earlier chunks d={self._nonzero.shape[0]}"
            )
        self._nonzero += np.count_nonzero(np.abs(chunk) > self.zero_threshold, axis=0)
        self.count += chunk.shape[0]

    def result(self) -> dict[str, float]:
        """Returns `nnz`, `flops` and `r_sub` of everything added (see `sparsity_stats`).

        Raises:
            ValueError: If no embedding was added.
        """
        if self._nonzero is None or self.count == 0:
            raise ValueError("no embeddings were added to the SparsityAccumulator")
        p = self._nonzero / self.count
        stats = _stats_from_fractions(p, p.size, np.sum, np.maximum)
        return {name: float(value) for name, value in stats.items()}


def sparsity_stats_np(embeddings: np.ndarray, zero_threshold: float) -> dict[str, float]:
    """`sparsity_stats` of an in-memory array, in NumPy (for evaluation).

    Args:
        embeddings: [n, d] array, n >= 1.
        zero_threshold: Entries with |e_ij| at or below it count as zero.

    Returns:
        Floats keyed `nnz`, `flops`, `r_sub`.
    """
    accumulator = SparsityAccumulator(zero_threshold)
    accumulator.update(embeddings)
    return accumulator.result()
