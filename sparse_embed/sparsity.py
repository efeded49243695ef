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

The statistics have one definition (`stats_from_fractions`) shared by the
TensorFlow version used in training and the NumPy ones used to evaluate
embedding files; those live in `sparse_embed.metrics.sparsity`, which imports
no TensorFlow, and are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from sparse_embed.config import SparsityConfig
from sparse_embed.errors import ConfigError
from sparse_embed.keras import tf
from sparse_embed.metrics.sparsity import (  # noqa: F401  (re-exported)
    SparsityAccumulator,
    sparsity_stats_np,
    stats_from_fractions,
)
from sparse_embed.registry import Registry

# regularizer(embeddings, cross_replica_mean) -> float32 scalar. The second
# argument maps a per-worker statistic to its average over all workers (None:
# use the local batch alone).
Regularizer = Callable[[tf.Tensor, Callable[[tf.Tensor], tf.Tensor] | None], tf.Tensor]
WeightSchedule = Callable[[Any, float, int], tf.Tensor]

REGULARIZERS: Registry[Regularizer] = Registry("sparsity regularizer")
WEIGHT_SCHEDULES: Registry[WeightSchedule] = Registry("sparsity weight schedule")

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
    return stats_from_fractions(p, tf.cast(tf.size(p), tf.float32), tf.reduce_sum, tf.maximum)
