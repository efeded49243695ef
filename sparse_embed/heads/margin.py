"""Classification heads: a plain softmax classifier and normalised margin-based softmax.

Every head is a Keras layer owning one class-weight matrix W [D, C] (one
column per training identity) with the contract the trainer relies on:

- ``head(embeddings, labels, training=None)`` -> scalar float32: the mean over
  the batch of the softmax cross-entropy of the training logits;
- ``head.logits(embeddings)`` -> float32 [B, C]: the logits without any margin,
  for train accuracy and prediction.

Embeddings arrive as the backbone produces them, not L2-normalised; the
normalised heads normalise embeddings and class weights themselves.

`MarginHead` is the family of normalised heads (NormFace, ArcFace, CosFace,
SphereFace, InsightFace's combined margin): logits s * cos(theta_j) with the
target class's cosine replaced by a margin-penalised value. A member only
defines `target_logit`, the map cos(theta_y) -> penalised cosine; e.g. CosFace
is ``cosine - margin``.

The loss is computed in float32 whatever the layer's dtype policy: under
mixed precision the matmul runs in float16, the cosines are cast to float32
before the margin and the softmax.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from sparse_embed.config import HeadConfig
from sparse_embed.keras import keras, tf

# InsightFace initialises the class centres of its normalised heads with
# N(0, 0.01^2). The logits only see W's direction; its norm sets the effective
# step size of the direction under SGD.
MARGIN_KERNEL_STDDEV = 0.01

# Floor of 1 - cos^2 under the square root of sin(theta): d/dc sqrt(1 - c^2) is
# infinite at |c| = 1, which an embedding equal to its class centre reaches.
# Clipped there, the gradient through the sine is 0 instead. Every positive
# float32 value of 1 - c^2 is >= 1.2e-7, so the floor changes nothing else.
_SIN_SQUARED_FLOOR = 1e-30


def _is_integer(value: Any) -> bool:
    # numbers.Integral admits NumPy integers (a class count read from data).
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_num_classes(num_classes: Any) -> int:
    if not _is_integer(num_classes) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return int(num_classes)


def _check_embedding_size(embedding_size: Any) -> int | None:
    if embedding_size is None:
        return None
    if not _is_integer(embedding_size) or embedding_size < 1:
        raise ValueError(
            f"embedding_size must be a positive integer or None, got {embedding_size!r}"
        )
    return int(embedding_size)


class ClassifierHead(keras.layers.Layer):
    """Base of the heads: a class-weight matrix and the softmax cross-entropy loss.

    loss = mean_i -log softmax(z_i)[y_i], with the training logits z of
    `training_logits` (which may depend on the labels, as margins do).
    Subclasses implement `training_logits` and `logits`.

    Args:
        num_classes: Number of training identities C, >= 2.
        embedding_size: Embedding dimension D; None takes it from the first
            input. When given, `build` checks the input against it and uses it
            where the input's last dimension is unknown.
        kernel_initializer: Initializer of W (name, config dict or instance);
            None selects the subclass default.
        **kwargs: Base `keras.layers.Layer` arguments (name, dtype, ...).
    """

    def __init__(self, num_classes: int, embedding_size: int | None = None,
                 kernel_initializer: str | dict | keras.initializers.Initializer | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = _check_num_classes(num_classes)
        self.embedding_size = _check_embedding_size(embedding_size)
        self.kernel_initializer = keras.initializers.get(
            self.default_kernel_initializer() if kernel_initializer is None else kernel_initializer
        )

    @classmethod
    def default_kernel_initializer(cls) -> keras.initializers.Initializer:
        """Returns the initializer of W used when none is given."""
        return keras.initializers.GlorotUniform()

    def build(self, input_shape: tf.TensorShape) -> None:
        dim = tf.TensorShape(input_shape)[-1]
        if self.embedding_size is not None and dim is not None and dim != self.embedding_size:
            raise ValueError(
                f"{type(self).__name__} expects embeddings of size {self.embedding_size}, "
                f"got input shape {input_shape}"
            )
        dim = dim if dim is not None else self.embedding_size
        if dim is None:
            raise ValueError(
                f"{type(self).__name__} needs a known embedding size: pass embedding_size or an "
                f"input with a known last dimension, got input shape {input_shape}"
            )
        self.kernel = self.add_weight(
            name="kernel", shape=(dim, self.num_classes), initializer=self.kernel_initializer,
            trainable=True,
        )
        super().build(input_shape)

    def _compute(self, tensor: tf.Tensor) -> tf.Tensor:
        """Casts to the compute dtype (float16 under mixed precision).

        `logits` is called outside `__call__`, where Keras neither autocasts
        inputs nor reads variables in the compute dtype, so it casts itself.
        """
        return tf.cast(tensor, self.compute_dtype)

    def logits(self, embeddings: tf.Tensor) -> tf.Tensor:
        """Returns the float32 [B, C] logits without margin.

        Args:
            embeddings: float [B, D], not normalised.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement logits()")

    def training_logits(self, embeddings: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        """Returns the float32 [B, C] logits the loss is computed on.

        Args:
            embeddings: float [B, D], not normalised.
            labels: int [B], the class of each embedding.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement training_logits()")

    def call(self, embeddings: tf.Tensor, labels: tf.Tensor,
             training: bool | None = None) -> tf.Tensor:
        """Returns the mean softmax cross-entropy of the batch, float32 scalar.

        Args:
            embeddings: float [B, D] from the backbone, not normalised.
            labels: int32 or int64 [B], class indices in [0, num_classes).
            training: Keras training flag (the heads behave the same either way).
        """
        labels = tf.reshape(labels, [-1])
        logits = self.training_logits(embeddings, labels)
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        return tf.reduce_mean(losses)

    def loss_and_accuracy(self, embeddings: tf.Tensor, labels: tf.Tensor,
                          training: bool | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """Returns the loss and the fraction of the batch whose largest logit is its class.

        Args:
            embeddings: float [B, D] from the backbone, not normalised.
            labels: int [B], class indices in [0, num_classes).
            training: Keras training flag.

        Returns:
            (float32 loss, float32 accuracy).
        """
        loss = self(embeddings, labels, training=training)
        predictions = tf.argmax(self.logits(embeddings), axis=-1, output_type=tf.int32)
        correct = tf.equal(predictions, tf.cast(tf.reshape(labels, [-1]), tf.int32))
        return loss, tf.reduce_mean(tf.cast(correct, tf.float32))

    def compute_output_shape(self, input_shape: tf.TensorShape) -> tf.TensorShape:
        return tf.TensorShape([])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({
            "num_classes": self.num_classes,
            "embedding_size": self.embedding_size,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        })
        return config


@keras.utils.register_keras_serializable(package="sparse_embed")
class SoftmaxHead(ClassifierHead):
    """Linear classifier with bias on the raw embeddings and softmax cross-entropy.

    z = e W + b; loss = mean_i -log softmax(z_i)[y_i]. The baseline of the
    sparse-embedding paper (Paria et al. 2020) and of most metric-learning work.

    Args:
        num_classes: Number of training identities C, >= 2.
        embedding_size: Embedding dimension D; None takes it from the first input.
        kernel_initializer: Initializer of W; None is Glorot-uniform.
        **kwargs: Base `keras.layers.Layer` arguments (name, dtype, ...).
    """

    def build(self, input_shape: tf.TensorShape) -> None:
        super().build(input_shape)
        self.bias = self.add_weight(
            name="bias", shape=(self.num_classes,), initializer="zeros", trainable=True
        )

    def logits(self, embeddings: tf.Tensor) -> tf.Tensor:
        z = tf.matmul(self._compute(embeddings), self._compute(self.kernel))
        return tf.cast(z, tf.float32) + tf.cast(self.bias, tf.float32)

    def training_logits(self, embeddings: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        return self.logits(embeddings)


class MarginHead(ClassifierHead):
    """Base of the normalised margin heads: s * cos(theta) with a target-class margin.

    cos(theta_ij) = <e_i / |e_i|, w_j / |w_j|>. Training logits are
    z_ij = s * cos(theta_ij) for j != y_i and z_iy = s * target_logit(cos(theta_iy));
    `logits` is s * cos(theta) for every class. Normalising both sides puts all
    embeddings on the unit sphere, where the margin is a pure angle or cosine
    gap (NormFace, Wang et al. 2017, with `target_logit` the identity).

    Args:
        num_classes: Number of training identities C, >= 2.
        scale: The logit scale s > 0.
        embedding_size: Embedding dimension D; None takes it from the first input.
        kernel_initializer: Initializer of W; None is N(0, 0.01^2) as in InsightFace.
        **kwargs: Base `keras.layers.Layer` arguments (name, dtype, ...).
    """

    def __init__(self, num_classes: int, scale: float = 64.0, embedding_size: int | None = None,
                 kernel_initializer: str | dict | keras.initializers.Initializer | None = None,
                 **kwargs) -> None:
        super().__init__(num_classes, embedding_size=embedding_size,
                         kernel_initializer=kernel_initializer, **kwargs)
        if not _is_real(scale) or scale <= 0:
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.scale = float(scale)

    @classmethod
    def default_kernel_initializer(cls) -> keras.initializers.Initializer:
        return keras.initializers.RandomNormal(stddev=MARGIN_KERNEL_STDDEV)

    def cosine(self, embeddings: tf.Tensor) -> tf.Tensor:
        """Returns cos(theta) [B, C] in float32, clipped to [-1, 1].

        Both sides are normalised in float32 (a float16 sum of squares
        overflows for large activations); only the matmul runs in the compute
        dtype.

        Args:
            embeddings: float [B, D], not normalised.
        """
        e = tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=-1)
        w = tf.math.l2_normalize(tf.cast(self.kernel, tf.float32), axis=0)
        cos = tf.cast(tf.matmul(self._compute(e), self._compute(w)), tf.float32)
        # Rounding can push |cos| slightly above 1, outside the domain of the
        # angle-based margins.
        return tf.clip_by_value(cos, -1.0, 1.0)

    def target_logit(self, cosine: tf.Tensor) -> tf.Tensor:
        """Maps the target class's cos(theta_y) to its margin-penalised value.

        Args:
            cosine: float32 [B], cos(theta_y) in [-1, 1].

        Returns:
            float32 [B], before scaling by s.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement target_logit()")

    def logits(self, embeddings: tf.Tensor) -> tf.Tensor:
        return self.scale * self.cosine(embeddings)

    def training_logits(self, embeddings: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        cos = self.cosine(embeddings)
        target = tf.gather(cos, labels, batch_dims=1)
        is_target = tf.equal(tf.range(self.num_classes, dtype=tf.int64)[tf.newaxis, :],
                             tf.cast(labels, tf.int64)[:, tf.newaxis])
        # tf.where, not cos + one_hot * (phi - cos): exact, and no gradient of
        # the replaced target cosine leaks through the non-target path.
        penalised = tf.where(is_target, self.target_logit(target)[:, tf.newaxis], cos)
        return self.scale * penalised

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"scale": self.scale})
        return config


@keras.utils.register_keras_serializable(package="sparse_embed")
class ArcFaceHead(MarginHead):
    """ArcFace: additive angular margin, cos(theta_y + m) on the target class.

    Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face
    Recognition" (CVPR 2019), Eq. 3:
    L = -log e^{s cos(theta_y + m)} / (e^{s cos(theta_y + m)} + sum_{j != y} e^{s cos theta_j}).

    cos(theta + m) = cos(theta) cos(m) - sin(theta) sin(m) is computed without
    acos, so the gradient is finite at cos(theta) = +-1. cos(theta + m) stops
    decreasing in theta once theta + m > pi; as in the reference InsightFace
    implementation, for cos(theta) <= cos(pi - m) the target logit is instead
    cos(theta) - m sin(pi - m), which keeps decreasing and so keeps pulling a
    badly misclassified embedding towards its class.

    Args:
        num_classes: Number of training identities C, >= 2.
        scale: The logit scale s > 0 (64 in the paper).
        margin: The angular margin m in radians, in [0, pi/2) (0.5 in the paper).
        embedding_size: Embedding dimension D; None takes it from the first input.
        kernel_initializer: Initializer of W; None is N(0, 0.01^2) as in InsightFace.
        **kwargs: Base `keras.layers.Layer` arguments (name, dtype, ...).
    """

    def __init__(self, num_classes: int, scale: float = 64.0, margin: float = 0.5,
                 embedding_size: int | None = None,
                 kernel_initializer: str | dict | keras.initializers.Initializer | None = None,
                 **kwargs) -> None:
        super().__init__(num_classes, scale=scale, embedding_size=embedding_size,
                         kernel_initializer=kernel_initializer, **kwargs)
        if not _is_real(margin) or not 0 <= margin < math.pi / 2:
            raise ValueError(f"margin must be in [0, pi/2), got {margin!r}")
        self.margin = float(margin)

    def target_logit(self, cosine: tf.Tensor) -> tf.Tensor:
        m = self.margin
        sine = tf.sqrt(tf.clip_by_value(1.0 - tf.square(cosine), _SIN_SQUARED_FLOOR, 1.0))
        shifted = cosine * math.cos(m) - sine * math.sin(m)
        # theta + m <= pi  <=>  cos(theta) >= cos(pi - m).
        linear = cosine - m * math.sin(math.pi - m)
        return tf.where(cosine > math.cos(math.pi - m), shifted, linear)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"margin": self.margin})
        return config


def softmax_head(num_classes: int, embedding_size: int, config: HeadConfig) -> SoftmaxHead:
    """Builds the `softmax` head; `config.scale` and `config.margin` do not apply to it.

    Args:
        num_classes: Number of training identities.
        embedding_size: Embedding dimension D.
        config: The run's head section.
    """
    return SoftmaxHead(num_classes, embedding_size=embedding_size, name="softmax_head")


def arcface_head(num_classes: int, embedding_size: int, config: HeadConfig) -> ArcFaceHead:
    """Builds the `arcface` head with `config.scale` and `config.margin`.

    Args:
        num_classes: Number of training identities.
        embedding_size: Embedding dimension D.
        config: The run's head section.
    """
    return ArcFaceHead(num_classes, scale=config.scale, margin=config.margin,
                       embedding_size=embedding_size, name="arcface_head")
