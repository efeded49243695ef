"""A margin head whose class centres are sharded over the workers: Partial FC.

An, Deng et al., "Partial FC: Training 10 Million Identities on a Single
Machine" (ICCV 2021 workshops), as in insightface's `partial_fc_v2`. With C
identities and N workers, the class-centre matrix (C x D, 85k x 512 for MS1M,
2M x 512 for WebFace42M) is the memory problem of a margin head; here worker r
holds only its contiguous block of about C/N centres. Each step:

1. embeddings and labels are all-gathered, so every worker sees the global batch;
2. each worker computes the margin logits of the global batch against its own
   centres - all the positive classes of its block and, when `sample_rate < 1`,
   a random `sample_rate` fraction of its negatives (a new sample every step);
3. the softmax normaliser sum_j exp(z_ij) and the target logit z_iy are
   all-reduced, so every worker holds the exact cross-entropy of the global
   batch (up to the sampled-out negatives).

Gradient convention (see sparse_embed/strategy.py): each collective's backward
pass is its adjoint, so a worker's raw gradient is that of the sum of all
workers' (identical) losses; the trainer averages replicated gradients and
divides the gradients of `sharded_variables` by N. With `sample_rate=1` this is
exactly the step of the unsharded head on the global batch.
"""

from __future__ import annotations

import math
from typing import Any

from sparse_embed.heads.margin import MarginHead, per_example_loss
from sparse_embed.keras import keras, tf


def shard_range(num_classes: int, num_workers: int, worker_index: int) -> tuple[int, int]:
    """The block [start, end) of classes a worker holds: sizes differ by at most one.

    Args:
        num_classes: Number of classes C.
        num_workers: Number of workers N, <= C.
        worker_index: The worker, in [0, N).
    """
    base, extra = divmod(num_classes, num_workers)
    start = base * worker_index + min(worker_index, extra)
    return start, start + base + (worker_index < extra)


class ShardedMarginHead(keras.layers.Layer):
    """A `MarginHead` family member with its class centres split over the workers.

    The class centres are rows: [C/N, D], or [C/N, K, D] with K sub-centres
    per class (the cosine of a class is the largest of its K), so a class's
    centres stay on one worker and a re-split moves whole rows.

    Args:
        margin: The unsharded head whose margin (`target_logit`), scale,
            class count, sub-centres, loss (`softmax_ce` | `focal`) and
            initializer this head uses; its own weights are never built.
        strategy: The distribution strategy (`num_workers`, `worker_index`,
            `all_gather`, `sum`, `max`).
        sample_rate: Fraction of each worker's negative classes in a step's
            logits, in (0, 1]; positives are always kept.
        seed: Seed of the negative sampling.
        **kwargs: Base `keras.layers.Layer` arguments.

    Raises:
        ValueError: If there are fewer classes than workers or the rate is outside (0, 1].
    """

    def __init__(self, margin: MarginHead, strategy: Any, sample_rate: float = 1.0,
                 seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if margin.num_classes < strategy.num_workers:
            raise ValueError(
                f"a sharded head over {strategy.num_workers} workers needs at least that many "
                f"classes, got {margin.num_classes}; use fewer workers or head.sharded=false"
            )
        self.margin = margin
        self.strategy = strategy
        self.sample_rate = float(sample_rate)
        self.num_classes = margin.num_classes
        self.class_start, class_end = shard_range(
            margin.num_classes, strategy.num_workers, strategy.worker_index)
        self.num_local = class_end - self.class_start
        self.num_sample = max(1, math.ceil(self.sample_rate * self.num_local))
        # Every worker samples its own negatives.
        self._rng = tf.random.Generator.from_seed(seed + 1_000_003 * strategy.worker_index)
        # Saved with the centres: how many blocks the classes were split into,
        # so a resume on another number of workers can re-split them.
        self.shards = tf.Variable(strategy.num_workers, dtype=tf.int64, trainable=False,
                                  name="shards")

    def build(self, input_shape: tf.TensorShape) -> None:
        dim = tf.TensorShape(input_shape)[-1] or self.margin.embedding_size
        # Rows are classes, so a sampled subset's gradient is IndexedSlices of
        # those rows, not a dense matrix of the whole shard.
        k = self.margin.sub_centers
        self.kernel = self.add_weight(
            name="kernel", shape=(self.num_local, dim) if k == 1 else (self.num_local, k, dim),
            trainable=True,
            initializer=self.margin.kernel_initializer,
        )
        super().build(input_shape)

    @property
    def sharded_variables(self) -> list[tf.Variable]:
        """Variables that differ per worker: never averaged or broadcast.

        The class centres of this worker's block, and the state of its sampler.
        """
        return [self.kernel, self._rng.state]

    def _sample(self, local_labels: tf.Tensor, in_shard: tf.Tensor) -> tf.Tensor:
        """Sorted local class indices of this step: every positive and random negatives."""
        positive = tf.scatter_nd(tf.boolean_mask(local_labels, in_shard)[:, tf.newaxis],
                                 tf.ones_like(tf.boolean_mask(local_labels, in_shard), tf.float32),
                                 [self.num_local]) > 0
        # Uniform scores in [0, 1) for negatives, 2 for positives: the top k are
        # all the positives plus k - #positives random negatives.
        scores = self._rng.uniform([self.num_local]) + 2.0 * tf.cast(positive, tf.float32)
        k = tf.maximum(self.num_sample, tf.reduce_sum(tf.cast(positive, tf.int32)))
        return tf.sort(tf.math.top_k(scores, k=k).indices)

    def loss_and_accuracy(self, embeddings: tf.Tensor, labels: tf.Tensor,
                          training: bool | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """Loss (cross-entropy or focal) of the global batch and its accuracy, the same on every worker.

        Accuracy counts an example as correct when its class centre is at least
        as close as every other centre in the step's logits (with
        `sample_rate < 1` in training, the sampled ones).

        Args:
            embeddings: float [B, D] of this worker, not normalised.
            labels: int [B], global class indices.
            training: Sample negatives (when `sample_rate < 1`) only in training.

        Returns:
            (float32 loss, float32 accuracy).
        """
        strategy = self.strategy
        e = strategy.all_gather(tf.cast(embeddings, tf.float32))
        y = tf.cast(strategy.all_gather(tf.reshape(labels, [-1])), tf.int32)
        local = y - self.class_start
        in_shard = (local >= 0) & (local < self.num_local)
        kernel = tf.cast(self.kernel, tf.float32)
        if training and self.sample_rate < 1:
            index = self._sample(local, in_shard)
            kernel = tf.gather(kernel, index)
            # Position of each label in the sample (positives are all in it).
            local = tf.searchsorted(index, tf.where(in_shard, local, 0))
        column = tf.where(in_shard, local, -1)

        e = tf.math.l2_normalize(e, axis=-1)
        kernel = tf.math.l2_normalize(kernel, axis=-1)
        if self.margin.sub_centers == 1:
            cos = tf.matmul(e, kernel, transpose_b=True)
        else:
            cos = tf.reduce_max(tf.einsum("bd,ckd->bck", e, kernel), axis=-1)
        cos = tf.clip_by_value(cos, -1.0, 1.0)
        is_target = tf.equal(tf.range(tf.shape(cos)[1])[tf.newaxis, :], column[:, tf.newaxis])
        target_cos = tf.reduce_sum(tf.where(is_target, cos, 0.0), axis=1)
        penalised = tf.where(is_target, self.margin.target_logit(target_cos)[:, tf.newaxis], cos)
        z = self.margin.scale * penalised

        # log-sum-exp over all shards; the max only stabilises, so no gradient.
        row_max = strategy.max(tf.stop_gradient(tf.reduce_max(z, axis=1)))
        normaliser = strategy.sum(tf.reduce_sum(tf.exp(z - row_max[:, tf.newaxis]), axis=1))
        target_z = strategy.sum(tf.reduce_sum(tf.where(is_target, z, 0.0), axis=1))
        # Every worker holds each example's exact cross-entropy, so a focal
        # weighting of it needs no further collective.
        cross_entropy = tf.math.log(normaliser) + row_max - target_z
        loss = tf.reduce_mean(per_example_loss(cross_entropy, self.margin.loss,
                                               self.margin.focal_gamma))

        best = strategy.max(tf.reduce_max(cos, axis=1))
        target_plain = strategy.sum(target_cos)
        accuracy = tf.reduce_mean(tf.cast(target_plain >= best, tf.float32))
        return loss, accuracy

    def call(self, embeddings: tf.Tensor, labels: tf.Tensor,
             training: bool | None = None) -> tf.Tensor:
        """Returns the loss of the global batch (float32 scalar).

        Args:
            embeddings: float [B, D] of this worker, not normalised.
            labels: int [B], global class indices.
            training: Keras training flag; negatives are sampled only in training.
        """
        return self.loss_and_accuracy(embeddings, labels, training=training)[0]

    def compute_output_shape(self, input_shape: tf.TensorShape) -> tf.TensorShape:
        return tf.TensorShape([])
