"""Pair losses on the batch: triplet, contrastive and Multi-Similarity.

Each is a Keras layer without weights, with the head contract of the trainer:
``head(embeddings, labels, training=None)`` -> scalar float32 loss and
``head.loss_and_accuracy(embeddings, labels)`` -> (loss, batch Recall@1), the
fraction of anchors whose nearest other embedding of the batch (by cosine) has
their label. There are no logits: a pair loss has no class weights.

Every loss is computed on the L2-normalised embeddings, in float32 whatever the
dtype policy (Multi-Similarity's exp(beta (S - lambda)) overflows float16).
The pairs come from the batch, so each class of a batch needs at least two
images: these heads need the `p_k` sampler with `data.samples_per_class >= 2`,
which the trainer checks before it builds anything (their `HeadParams.pairs`).

Under Horovod or tf.distribute each worker's loss sees its local batch. With
`gather_batch`, the embeddings and labels of all N workers are all-gathered
first and every worker computes the loss of the global batch: each anchor gets
N times the negatives (and the positives of the same class drawn by other
workers), at the cost of an all-gather of B x D floats per step, an N-fold
larger B x B similarity matrix on every worker (B^3 for `mining: all`), and a
second collective in the backward pass, since the gradient of every worker's
rows flows back through the gather. The step equals one process's step on the
concatenated batch.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import TYPE_CHECKING, Any

from sparse_embed.heads.params import DISTANCES, MININGS, Contrastive, MultiSimilarity, Triplet
from sparse_embed.keras import keras, tf
from sparse_embed.strategy import SingleProcess, Strategy

if TYPE_CHECKING:
    from sparse_embed.config import HeadConfig

# Stands in for a masked-out distance in a minimum (distances on the unit sphere are <= 4)
# and for a masked-out exponent in a log-sum-exp; finite, so no inf - inf reaches a gradient.
_FAR = 1e4
_NO_TERM = -1e30


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(name: str, value: Any, low: float = 0.0, strict: bool = False) -> float:
    """Returns `value` as a float if it is a finite number >= `low` (> with `strict`); else ValueError."""
    ok = _is_real(value) and math.isfinite(value) and (value > low if strict else value >= low)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}")
    return float(value)


def log1p_sum_exp(exponents: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Returns log(1 + sum_j mask_ij exp(x_ij)) per row: a log-sum-exp with a zero term, no overflow.

    Args:
        exponents: float32 [N, M], the x_ij.
        mask: bool [N, M], the terms of each row's sum.
    """
    x = tf.where(mask, exponents, _NO_TERM)
    return tf.reduce_logsumexp(tf.concat([tf.zeros_like(x[:, :1]), x], axis=1), axis=1)


def _masked_mean(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Mean of `values` where `mask`; 0 when the mask is empty."""
    mask = tf.cast(mask, values.dtype)
    return tf.math.divide_no_nan(tf.reduce_sum(values * mask), tf.reduce_sum(mask))


class PairLossHead(keras.layers.Layer):
    """Base of the pair losses: the (gathered) batch, its similarities and pair masks.

    Subclasses implement `pair_loss` on the cosine similarities S = e e^T of
    the normalised batch and the label masks.

    Args:
        gather_batch: All-gather embeddings and labels over the workers first
            (see the module docstring for the trade-off).
        strategy: What `gather_batch` gathers over; None is one process. The
            trainer sets it (`head.strategy`); it is not part of the config.
        **kwargs: Base `keras.layers.Layer` arguments (name, ...); the dtype
            defaults to float32 under any global policy.
    """

    def __init__(self, gather_batch: bool = False, strategy: Strategy | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if not isinstance(gather_batch, bool):
            raise ValueError(f"gather_batch must be a bool, got {gather_batch!r}")
        self.gather_batch = gather_batch
        self.strategy = strategy or SingleProcess()

    def pair_loss(self, similarity: tf.Tensor, positive: tf.Tensor,
                  negative: tf.Tensor) -> tf.Tensor:
        """Returns the float32 scalar loss of a batch.

        Args:
            similarity: float32 [B, B], cosine similarities of the normalised embeddings.
            positive: bool [B, B], same label and i != j.
            negative: bool [B, B], different labels.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement pair_loss()")

    def _batch(self, embeddings: tf.Tensor, labels: tf.Tensor
               ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """The normalised (gathered) batch: similarities and the positive / negative masks."""
        normalized = tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=-1)
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        if self.gather_batch:
            normalized = self.strategy.all_gather(normalized)
            labels = self.strategy.all_gather(labels)
        similarity = tf.matmul(normalized, normalized, transpose_b=True)
        same = tf.equal(labels[:, tf.newaxis], labels[tf.newaxis, :])
        diagonal = tf.eye(tf.shape(labels)[0], dtype=tf.bool)
        return similarity, same & ~diagonal, ~same

    def call(self, embeddings: tf.Tensor, labels: tf.Tensor,
             training: bool | None = None) -> tf.Tensor:
        """Returns the batch's loss, float32 scalar.

        Args:
            embeddings: float [B, D] from the backbone, not normalised.
            labels: int32 or int64 [B].
            training: Keras training flag (the losses behave the same either way).
        """
        return self.pair_loss(*self._batch(embeddings, labels))

    def loss_and_accuracy(self, embeddings: tf.Tensor, labels: tf.Tensor,
                          training: bool | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """Returns the loss and the batch Recall@1.

        Recall@1 is the fraction of anchors whose most similar other embedding
        of the (gathered) batch has the anchor's label.

        Args:
            embeddings: float [B, D] from the backbone, not normalised.
            labels: int [B].
            training: Keras training flag.

        Returns:
            (float32 loss, float32 Recall@1).
        """
        similarity, positive, negative = self._batch(embeddings, labels)
        loss = self.pair_loss(similarity, positive, negative)
        others = tf.where(positive | negative, similarity, -2.0)
        nearest = tf.argmax(others, axis=1, output_type=tf.int32)
        hit = tf.gather(positive, nearest, batch_dims=1)
        return loss, tf.reduce_mean(tf.cast(hit, tf.float32))

    def compute_output_shape(self, input_shape: tf.TensorShape) -> tf.TensorShape:
        return tf.TensorShape([])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"gather_batch": self.gather_batch})
        return config


class _DistanceLoss(PairLossHead):
    """A pair loss on distances: 1 - cos, or |a - b|^2 = 2 - 2 cos on the unit sphere."""

    def __init__(self, distance: str = "cosine", gather_batch: bool = False,
                 strategy: Strategy | None = None, **kwargs: Any) -> None:
        super().__init__(gather_batch=gather_batch, strategy=strategy, **kwargs)
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
        self.distance = distance

    def distances(self, similarity: tf.Tensor) -> tf.Tensor:
        """Returns the float32 [B, B] distances of the cosine similarities, >= 0.

        Args:
            similarity: float32 [B, B] cosine similarities.
        """
        scale = 1.0 if self.distance == "cosine" else 2.0
        return tf.maximum(scale * (1.0 - similarity), 0.0)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"distance": self.distance})
        return config


@keras.utils.register_keras_serializable(package="sparse_embed")
class TripletHead(_DistanceLoss):
    """Triplet loss max(0, d(a, p) - d(a, n) + m) with in-batch mining.

    Schroff et al., "FaceNet" (CVPR 2015); Hermans et al., "In Defense of the
    Triplet Loss for Person Re-Identification" (2017) for the batch versions.

    - `semi_hard` (FaceNet), exactly as `tfa.losses.TripletSemiHardLoss`: for
      every positive pair (a, p), the negative is the closest n with
      d(a, n) > d(a, p); if there is none, the farthest negative of a. The
      loss is the mean over all positive pairs. Anchors without any negative
      (a batch of one class) are left out, where TF-Addons divides by zero
      or mixes in the anchor itself.
    - `batch_hard`: per anchor, its farthest positive and closest negative;
      the mean over anchors with both.
    - `all`: every valid triplet (a, p, n); the mean over the triplets with a
      non-zero loss (Hermans et al.'s "BA != 0"), 0 if none. Memory B^3.

    Args:
        margin: The margin m >= 0.
        mining: `semi_hard` | `batch_hard` | `all`.
        distance: `cosine` (1 - cos) | `squared_euclidean` (|a - b|^2 = 2 - 2 cos).
        gather_batch: All-gather the batch over the workers first.
        strategy: What `gather_batch` gathers over; None is one process.
        **kwargs: Base `keras.layers.Layer` arguments.
    """

    def __init__(self, margin: float = Triplet.margin, mining: str = Triplet.mining,
                 distance: str = Triplet.distance,
                 gather_batch: bool = False, strategy: Strategy | None = None, **kwargs: Any) -> None:
        super().__init__(distance=distance, gather_batch=gather_batch, strategy=strategy, **kwargs)
        self.margin = check_number("margin", margin)
        if mining not in MININGS:
            raise ValueError(f"mining must be one of {', '.join(MININGS)}, got {mining!r}")
        self.mining = mining

    def pair_loss(self, similarity: tf.Tensor, positive: tf.Tensor,
                  negative: tf.Tensor) -> tf.Tensor:
        d = self.distances(similarity)
        return {"semi_hard": self._semi_hard, "batch_hard": self._batch_hard,
                "all": self._all}[self.mining](d, positive, negative)

    def _semi_hard(self, d: tf.Tensor, positive: tf.Tensor, negative: tf.Tensor) -> tf.Tensor:
        # Each anchor's negative distances in ascending order (non-negatives last, at _FAR):
        # the first one > d(a, p) is a binary search away, in O(B^2) memory instead of B^3.
        num_negatives = tf.reduce_sum(tf.cast(negative, tf.int32), axis=1)
        ascending = tf.sort(tf.where(negative, d, _FAR), axis=1)
        first_farther = tf.searchsorted(ascending, d, side="right", out_type=tf.int32)
        has_farther = first_farther < num_negatives[:, tf.newaxis]
        last = tf.shape(d)[1] - 1
        farther = tf.gather(ascending, tf.minimum(first_farther, last), batch_dims=1)
        farthest = tf.gather(ascending, tf.maximum(num_negatives - 1, 0), batch_dims=1)
        chosen = tf.where(has_farther, farther, farthest[:, tf.newaxis])
        losses = tf.nn.relu(self.margin + d - chosen)
        pairs = positive & (num_negatives > 0)[:, tf.newaxis]
        return _masked_mean(losses, pairs)

    def _batch_hard(self, d: tf.Tensor, positive: tf.Tensor, negative: tf.Tensor) -> tf.Tensor:
        hardest_positive = tf.reduce_max(tf.where(positive, d, 0.0), axis=1)
        hardest_negative = tf.reduce_min(tf.where(negative, d, _FAR), axis=1)
        valid = tf.reduce_any(positive, axis=1) & tf.reduce_any(negative, axis=1)
        return _masked_mean(tf.nn.relu(self.margin + hardest_positive - hardest_negative), valid)

    def _all(self, d: tf.Tensor, positive: tf.Tensor, negative: tf.Tensor) -> tf.Tensor:
        losses = tf.nn.relu(self.margin + d[:, :, tf.newaxis] - d[:, tf.newaxis, :])
        valid = positive[:, :, tf.newaxis] & negative[:, tf.newaxis, :]
        return _masked_mean(losses, valid & (losses > 0))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"margin": self.margin, "mining": self.mining})
        return config


@keras.utils.register_keras_serializable(package="sparse_embed")
class ContrastiveHead(_DistanceLoss):
    """Contrastive loss over every pair of the batch, as pytorch-metric-learning's ContrastiveLoss.

    Hadsell, Chopra and LeCun, "Dimensionality Reduction by Learning an
    Invariant Mapping" (CVPR 2006), in the form of pytorch-metric-learning's
    `ContrastiveLoss` with its default `AvgNonZeroReducer`:
    L = mean_{pos pairs, l > 0} relu(d_ij - pos_margin) + mean_{neg pairs, l > 0} relu(neg_margin - d_ij),
    each mean over the pairs with a non-zero loss (0 if none), so pairs already
    satisfied do not dilute the gradient of the rest.

    Args:
        pos_margin: Positive pairs closer than this cost nothing, >= 0.
        neg_margin: Negative pairs farther than this cost nothing, >= 0.
        distance: `cosine` (1 - cos) | `squared_euclidean` (2 - 2 cos).
        gather_batch: All-gather the batch over the workers first.
        strategy: What `gather_batch` gathers over; None is one process.
        **kwargs: Base `keras.layers.Layer` arguments.
    """

    def __init__(self, pos_margin: float = Contrastive.pos_margin,
                 neg_margin: float = Contrastive.neg_margin, distance: str = Contrastive.distance,
                 gather_batch: bool = False, strategy: Strategy | None = None, **kwargs: Any) -> None:
        super().__init__(distance=distance, gather_batch=gather_batch, strategy=strategy, **kwargs)
        self.pos_margin = check_number("pos_margin", pos_margin)
        self.neg_margin = check_number("neg_margin", neg_margin)

    def pair_loss(self, similarity: tf.Tensor, positive: tf.Tensor,
                  negative: tf.Tensor) -> tf.Tensor:
        d = self.distances(similarity)
        pulls = tf.nn.relu(d - self.pos_margin)
        pushes = tf.nn.relu(self.neg_margin - d)
        return _masked_mean(pulls, positive & (pulls > 0)) + _masked_mean(pushes, negative & (pushes > 0))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"pos_margin": self.pos_margin, "neg_margin": self.neg_margin})
        return config


@keras.utils.register_keras_serializable(package="sparse_embed")
class MultiSimilarityHead(PairLossHead):
    """Multi-Similarity loss with its pair mining, on cosine similarities.

    Wang et al., "Multi-Similarity Loss with General Pair Weighting for Deep
    Metric Learning" (CVPR 2019), Eqs. 10-12, as in the authors' code. For
    anchor i with positives P_i and negatives N_i, mining keeps
    negatives with S_in > min_{P_i} S_ip - epsilon and positives with
    S_ip < max_{N_i} S_in + epsilon (both thresholds from the unmined sets);
    then
    L_i = 1/alpha log(1 + sum_{kept P} e^{-alpha (S_ip - lambda)})
        + 1/beta log(1 + sum_{kept N} e^{beta (S_in - lambda)}).
    An anchor left with no positive or no negative contributes 0, and the loss
    is sum_i L_i / B. A `distance` parameter does not apply: the loss is defined on
    cosine similarities.

    Args:
        alpha: Positive scale alpha > 0 (2 in the paper).
        beta: Negative scale beta > 0 (50 in the paper).
        base: The similarity offset lambda (0.5 in the paper).
        epsilon: The mining margin epsilon >= 0 (0.1 in the paper).
        gather_batch: All-gather the batch over the workers first.
        strategy: What `gather_batch` gathers over; None is one process.
        **kwargs: Base `keras.layers.Layer` arguments.
    """

    def __init__(self, alpha: float = MultiSimilarity.alpha, beta: float = MultiSimilarity.beta,
                 base: float = MultiSimilarity.base, epsilon: float = MultiSimilarity.epsilon,
                 gather_batch: bool = False,
                 strategy: Strategy | None = None, **kwargs: Any) -> None:
        super().__init__(gather_batch=gather_batch, strategy=strategy, **kwargs)
        self.alpha = check_number("alpha", alpha, strict=True)
        self.beta = check_number("beta", beta, strict=True)
        self.base = check_number("base", base, low=-1.0)
        self.epsilon = check_number("epsilon", epsilon)

    def pair_loss(self, similarity: tf.Tensor, positive: tf.Tensor,
                  negative: tf.Tensor) -> tf.Tensor:
        s = similarity
        # Mining selects pairs; it is not differentiated (the authors' boolean indexing).
        hardest_positive = tf.reduce_min(tf.where(positive, s, _FAR), axis=1, keepdims=True)
        hardest_negative = tf.reduce_max(tf.where(negative, s, -_FAR), axis=1, keepdims=True)
        kept_negative = negative & (s > hardest_positive - self.epsilon)
        kept_positive = positive & (s < hardest_negative + self.epsilon)
        pull = log1p_sum_exp(-self.alpha * (s - self.base), kept_positive) / self.alpha
        push = log1p_sum_exp(self.beta * (s - self.base), kept_negative) / self.beta
        valid = tf.reduce_any(kept_positive, axis=1) & tf.reduce_any(kept_negative, axis=1)
        return tf.reduce_mean(tf.where(valid, pull + push, 0.0))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"alpha": self.alpha, "beta": self.beta, "base": self.base,
                       "epsilon": self.epsilon})
        return config


def triplet_head(num_classes: int, embedding_size: int, config: HeadConfig) -> TripletHead:
    """Builds the `triplet` head from `config.params` (`Triplet`) and `gather_batch`.

    Args:
        num_classes: Number of training identities (unused: no class weights).
        embedding_size: Embedding dimension D (unused).
        config: The run's head section.
    """
    return TripletHead(**dataclasses.asdict(config.params), gather_batch=config.gather_batch,
                       name="triplet_head")


def contrastive_head(num_classes: int, embedding_size: int, config: HeadConfig) -> ContrastiveHead:
    """Builds the `contrastive` head from `config.params` (`Contrastive`) and `gather_batch`.

    Args:
        num_classes: Number of training identities (unused: no class weights).
        embedding_size: Embedding dimension D (unused).
        config: The run's head section.
    """
    return ContrastiveHead(**dataclasses.asdict(config.params), gather_batch=config.gather_batch,
                           name="contrastive_head")


def multi_similarity_head(num_classes: int, embedding_size: int,
                          config: HeadConfig) -> MultiSimilarityHead:
    """Builds the `multi_similarity` head from `config.params` (`MultiSimilarity`) and `gather_batch`.

    Args:
        num_classes: Number of training identities (unused: no class weights).
        embedding_size: Embedding dimension D (unused).
        config: The run's head section.
    """
    return MultiSimilarityHead(**dataclasses.asdict(config.params), gather_batch=config.gather_batch,
                               name="multi_similarity_head")
