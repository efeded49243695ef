"""Classification heads: a plain softmax classifier and normalised margin-based softmax.

Every head is a Keras layer owning one class-weight matrix W [D, C] (one
column per training identity; K columns per identity with sub-centres) with
the contract the trainer relies on:

- ``head(embeddings, labels, training=None)`` -> scalar float32: the mean over
  the batch of the loss (`softmax_ce` or `focal`) of the training logits;
- ``head.logits(embeddings)`` -> float32 [B, C]: the logits without any margin,
  for train accuracy and prediction.

Embeddings arrive as the backbone produces them, not L2-normalised; the
normalised heads normalise embeddings and class weights themselves.

`MarginHead` is the family of normalised heads with a fixed scale (NormFace,
ArcFace, CosFace, InsightFace's combined margin): logits s * cos(theta_j) with
the target class's cosine replaced by a margin-penalised value. A member only
defines `target_logit`, the map cos(theta_y) -> penalised cosine; e.g. CosFace
is ``cosine - margin``. SphereFace shares their normalised class centres
(`CosineHead`) but scales by the embedding's own norm, so it is not a
`MarginHead` and cannot be sharded.

The loss is computed in float32 whatever the layer's dtype policy: under
mixed precision the matmul runs in float16, the cosines are cast to float32
before the margin and the softmax.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import TYPE_CHECKING, Any

from sparse_embed.heads.params import ArcFace, Combined, CosFace, SphereFace
from sparse_embed.keras import keras, tf

if TYPE_CHECKING:
    from sparse_embed.config import HeadConfig

# InsightFace initialises the class centres of its normalised heads with
# N(0, 0.01^2). The logits only see W's direction; its norm sets the effective
# step size of the direction under SGD.
MARGIN_KERNEL_STDDEV = 0.01

# Floor of 1 - cos^2 under the square root of sin(theta): d/dc sqrt(1 - c^2) is
# infinite at |c| = 1, which an embedding equal to its class centre reaches.
# Clipped there, the gradient through the sine is 0 instead. Every positive
# float32 value of 1 - c^2 is >= 1.2e-7, so the floor changes nothing else.
_SIN_SQUARED_FLOOR = 1e-30

# What `loss` selects: the per-example loss computed from the training logits.
HEAD_LOSSES = ("softmax_ce", "focal")

# Floor of 1 - p_t in the focal weight: (1 - p)^gamma has an infinite
# derivative at p = 1 for gamma < 1; floored, it is 0 there (the example is
# learnt), and nothing else changes.
_FOCAL_FLOOR = 1e-30

# Floor of |x|^2 under SphereFace's feature norm, l2_normalize's epsilon: the
# norm's gradient x / |x| is 0 / 0 at an all-zero feature (which a ReLU
# embedding under a sparsity penalty can produce).
_NORM_SQUARED_FLOOR = 1e-12


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


def _check_at_least(name: str, value: Any, low: float) -> float:
    if not _is_real(value) or value < low:
        raise ValueError(f"{name} must be a finite number >= {low:g}, got {value!r}")
    return float(value)


def _check_in(name: str, value: Any, low: float, high: float, high_text: str) -> float:
    """Checks low <= value < high; `high_text` is how the message writes `high`."""
    if not _is_real(value) or not low <= value < high:
        raise ValueError(f"{name} must be in [{low:g}, {high_text}), got {value!r}")
    return float(value)


def focal_loss(cross_entropy: tf.Tensor, gamma: float) -> tf.Tensor:
    """Per-example focal loss from the per-example cross-entropy.

    FL = -(1 - p_t)^gamma log p_t with p_t = softmax(z)_y = exp(-CE): Lin et
    al., "Focal Loss for Dense Object Detection" (ICCV 2017), applied to the
    margin logits as in the OpenVINO training extensions' face-recognition
    recipe (AM-Softmax + focal loss). gamma = 0 is the cross-entropy.

    Args:
        cross_entropy: float32 [B], -log p_t of each example.
        gamma: The focusing parameter gamma >= 0.

    Returns:
        float32 [B].
    """
    # 1 - exp(-CE) as -expm1(-CE): exact for the small CE of learnt examples.
    hard = tf.maximum(-tf.math.expm1(-cross_entropy), _FOCAL_FLOOR)
    return tf.pow(hard, gamma) * cross_entropy


def per_example_loss(cross_entropy: tf.Tensor, loss: str, focal_gamma: float) -> tf.Tensor:
    """The per-example loss a head's `loss` names, from its per-example cross-entropy.

    Args:
        cross_entropy: float32 [B], -log softmax(z_i)[y_i].
        loss: One of `HEAD_LOSSES`.
        focal_gamma: gamma of the `focal` loss.
    """
    return focal_loss(cross_entropy, focal_gamma) if loss == "focal" else cross_entropy


class ClassifierHead(keras.layers.Layer):
    """Base of the heads: a class-weight matrix and the softmax cross-entropy (or focal) loss.

    loss = mean_i l(-log softmax(z_i)[y_i]), with the training logits z of
    `training_logits` (which may depend on the labels, as margins do) and l
    the identity (`softmax_ce`) or the focal weighting (`focal`).
    Subclasses implement `training_logits` and `logits`.

    Args:
        num_classes: Number of training identities C, >= 2.
        embedding_size: Embedding dimension D; None takes it from the first
            input. When given, `build` checks the input against it and uses it
            where the input's last dimension is unknown.
        kernel_initializer: Initializer of W (name, config dict or instance);
            None selects the subclass default.
        loss: `softmax_ce` (cross-entropy) or `focal` (focal loss on the same logits).
        focal_gamma: The focal loss's gamma >= 0; unused by `softmax_ce`.
        **kwargs: Base `keras.layers.Layer` arguments (name, dtype, ...).
    """

    def __init__(self, num_classes: int, embedding_size: int | None = None,
                 kernel_initializer: str | dict | keras.initializers.Initializer | None = None,
                 loss: str = "softmax_ce", focal_gamma: float = 2.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = _check_num_classes(num_classes)
        self.embedding_size = _check_embedding_size(embedding_size)
        self.kernel_initializer = keras.initializers.get(
            self.default_kernel_initializer() if kernel_initializer is None else kernel_initializer
        )
        if loss not in HEAD_LOSSES:
            raise ValueError(f"loss must be one of {', '.join(HEAD_LOSSES)}, got {loss!r}")
        self.loss = loss
        self.focal_gamma = _check_at_least("focal_gamma", focal_gamma, 0.0)

    @classmethod
    def default_kernel_initializer(cls) -> keras.initializers.Initializer:
        """Returns the initializer of W used when none is given."""
        return keras.initializers.GlorotUniform()

    @property
    def kernel_columns(self) -> int:
        """Columns of W: one per class (more with sub-centres)."""
        return self.num_classes

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
            name="kernel", shape=(dim, self.kernel_columns), initializer=self.kernel_initializer,
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
        """Returns the mean loss (`self.loss`) of the batch, float32 scalar.

        Args:
            embeddings: float [B, D] from the backbone, not normalised.
            labels: int32 or int64 [B], class indices in [0, num_classes).
            training: Keras training flag (only SphereFace's annealing counts it).
        """
        labels = tf.reshape(labels, [-1])
        logits = self.training_logits(embeddings, labels)
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        return tf.reduce_mean(per_example_loss(losses, self.loss, self.focal_gamma))

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
            "loss": self.loss,
            "focal_gamma": self.focal_gamma,
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
        **kwargs: `loss` and `focal_gamma` (see `ClassifierHead`) and base
            `keras.layers.Layer` arguments (name, dtype, ...).
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


class CosineHead(ClassifierHead):
    """Base of the heads on cos(theta) between the embedding and normalised class centres.

    cos(theta_ij) = <e_i / |e_i|, w_j / |w_j|>. With K sub-centres per class
    (Deng et al., "Sub-center ArcFace: Boosting Face Recognition by
    Large-scale Noisy Web Faces", ECCV 2020) W has K columns per class, class
    c's in columns c K .. c K + K - 1, and cos(theta_ic) is the largest of the
    K cosines: a noisy sample can join a non-dominant sub-centre instead of
    pulling the class's main one.

    Args:
        num_classes: Number of training identities C, >= 2.
        sub_centers: Sub-centres per class K >= 1; 1 is one centre per class.
        embedding_size: Embedding dimension D; None takes it from the first input.
        kernel_initializer: Initializer of W; None is N(0, 0.01^2) as in InsightFace.
        **kwargs: `loss` and `focal_gamma` (see `ClassifierHead`) and base
            `keras.layers.Layer` arguments (name, dtype, ...).
    """

    def __init__(self, num_classes: int, sub_centers: int = 1, embedding_size: int | None = None,
                 kernel_initializer: str | dict | keras.initializers.Initializer | None = None,
                 **kwargs: Any) -> None:
        super().__init__(num_classes, embedding_size=embedding_size,
                         kernel_initializer=kernel_initializer, **kwargs)
        if not _is_integer(sub_centers) or sub_centers < 1:
            raise ValueError(f"sub_centers must be an integer >= 1, got {sub_centers!r}")
        self.sub_centers = int(sub_centers)

    @classmethod
    def default_kernel_initializer(cls) -> keras.initializers.Initializer:
        return keras.initializers.RandomNormal(stddev=MARGIN_KERNEL_STDDEV)

    @property
    def kernel_columns(self) -> int:
        return self.num_classes * self.sub_centers

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
        if self.sub_centers > 1:
            cos = tf.reduce_max(tf.reshape(cos, [-1, self.num_classes, self.sub_centers]), axis=-1)
        # Rounding can push |cos| slightly above 1, outside the domain of the
        # angle-based margins.
        return tf.clip_by_value(cos, -1.0, 1.0)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"sub_centers": self.sub_centers})
        return config


class MarginHead(CosineHead):
    """Base of the normalised margin heads: s * cos(theta) with a target-class margin.

    Training logits are z_ij = s * cos(theta_ij) for j != y_i and
    z_iy = s * target_logit(cos(theta_iy)); `logits` is s * cos(theta) for
    every class. Normalising both sides puts all embeddings on the unit
    sphere, where the margin is a pure angle or cosine gap (NormFace, Wang et
    al. 2017, with `target_logit` the identity).

    Args:
        num_classes: Number of training identities C, >= 2.
        scale: The logit scale s > 0.
        embedding_size: Embedding dimension D; None takes it from the first input.
        kernel_initializer: Initializer of W; None is N(0, 0.01^2) as in InsightFace.
        **kwargs: `sub_centers` (see `CosineHead`), `loss` and `focal_gamma`
            (see `ClassifierHead`) and base `keras.layers.Layer` arguments.
    """

    def __init__(self, num_classes: int, scale: float = 64.0, embedding_size: int | None = None,
                 kernel_initializer: str | dict | keras.initializers.Initializer | None = None,
                 **kwargs: Any) -> None:
        super().__init__(num_classes, embedding_size=embedding_size,
                         kernel_initializer=kernel_initializer, **kwargs)
        if not _is_real(scale) or scale <= 0:
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.scale = float(scale)

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
        return self.scale * _replace_target(cos, labels, self.target_logit)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"scale": self.scale})
        return config


def _replace_target(cos: tf.Tensor, labels: tf.Tensor, target_fn: Any) -> tf.Tensor:
    """cos [B, C] with each row's label column replaced by target_fn(that cosine)."""
    target = tf.gather(cos, labels, batch_dims=1)
    is_target = tf.equal(tf.range(tf.shape(cos)[1], dtype=tf.int64)[tf.newaxis, :],
                         tf.cast(labels, tf.int64)[:, tf.newaxis])
    # tf.where, not cos + one_hot * (phi - cos): exact, and no gradient of
    # the replaced target cosine leaks through the non-target path.
    return tf.where(is_target, target_fn(target)[:, tf.newaxis], cos)


def _sine(cosine: tf.Tensor) -> tf.Tensor:
    """sin(theta) in [0, 1] from cos(theta), with a finite gradient at |cos| = 1."""
    return tf.sqrt(tf.clip_by_value(1.0 - tf.square(cosine), _SIN_SQUARED_FLOOR, 1.0))


def _feature_norm(embeddings: tf.Tensor) -> tf.Tensor:
    """|x| [B, 1] in float32; floored like l2_normalize, so an all-zero feature has a finite gradient."""
    squared = tf.reduce_sum(tf.square(tf.cast(embeddings, tf.float32)), axis=-1, keepdims=True)
    return tf.sqrt(tf.maximum(squared, _NORM_SQUARED_FLOOR))


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
        **kwargs: `sub_centers` (sub-center ArcFace, see `CosineHead`), `loss`
            and `focal_gamma` (see `ClassifierHead`) and base `keras.layers.Layer` arguments.
    """

    def __init__(self, num_classes: int, scale: float = ArcFace.scale, margin: float = ArcFace.margin,
                 embedding_size: int | None = None,
                 kernel_initializer: str | dict | keras.initializers.Initializer | None = None,
                 **kwargs: Any) -> None:
        super().__init__(num_classes, scale=scale, embedding_size=embedding_size,
                         kernel_initializer=kernel_initializer, **kwargs)
        self.margin = _check_in("margin", margin, 0.0, math.pi / 2, "pi/2")

    def target_logit(self, cosine: tf.Tensor) -> tf.Tensor:
        m = self.margin
        shifted = cosine * math.cos(m) - _sine(cosine) * math.sin(m)
        # theta + m <= pi  <=>  cos(theta) >= cos(pi - m).
        linear = cosine - m * math.sin(math.pi - m)
        return tf.where(cosine > math.cos(math.pi - m), shifted, linear)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"margin": self.margin})
        return config


@keras.utils.register_keras_serializable(package="sparse_embed")
class CosFaceHead(MarginHead):
    """CosFace / AM-Softmax: additive cosine margin, cos(theta_y) - m on the target class.

    Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition"
    (CVPR 2018), Eq. 4, and Wang et al., "Additive Margin Softmax for Face
    Verification" (2018): L = -log e^{s (cos theta_y - m)} /
    (e^{s (cos theta_y - m)} + sum_{j != y} e^{s cos theta_j}). The target logit
    is monotone in theta everywhere, so no branch is needed.

    Args:
        num_classes: Number of training identities C, >= 2.
        scale: The logit scale s > 0 (64 in CosFace, 30 in AM-Softmax).
        margin: The cosine margin m, in [0, 1) (0.35 in both papers).
        embedding_size: Embedding dimension D; None takes it from the first input.
        kernel_initializer: Initializer of W; None is N(0, 0.01^2) as in InsightFace.
        **kwargs: `sub_centers` (see `CosineHead`), `loss` and `focal_gamma`
            (see `ClassifierHead`) and base `keras.layers.Layer` arguments.
    """

    def __init__(self, num_classes: int, scale: float = CosFace.scale, margin: float = CosFace.margin,
                 embedding_size: int | None = None,
                 kernel_initializer: str | dict | keras.initializers.Initializer | None = None,
                 **kwargs: Any) -> None:
        super().__init__(num_classes, scale=scale, embedding_size=embedding_size,
                         kernel_initializer=kernel_initializer, **kwargs)
        self.margin = _check_in("margin", margin, 0.0, 1.0, "1")

    def target_logit(self, cosine: tf.Tensor) -> tf.Tensor:
        return cosine - self.margin

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"margin": self.margin})
        return config


@keras.utils.register_keras_serializable(package="sparse_embed")
class CombinedMarginHead(MarginHead):
    """InsightFace's combined margin: cos(m1 theta_y + m2) - m3 on the target class.

    One formula for the three margins (InsightFace's `CombinedMarginLoss`,
    margins (m1, m2, m3) in its configs): (1, 0.5, 0) is ArcFace, (1, 0, 0.35)
    CosFace, (m, 0, 0) a SphereFace-like multiplicative margin at a fixed
    scale, and mixtures such as (1, 0.3, 0.2). cos(theta_y) is followed by
    theta = atan2(sin theta, cos theta) with the clipped sine of ArcFace, so
    the gradient is finite at cos(theta) = +-1.

    Where m1 theta + m2 > pi the margin no longer decreases in theta. There
    InsightFace's ArcFace and combined loss switched to a linear target (the
    `theta`/`sinmm` branch, not `easy_margin`); this head generalises it to
    m1 >= 1 as the first-order expansion in the extra angle
    d = (m1 - 1) theta + m2, frozen at the threshold theta_t = (pi - m2) / m1:
    cos(theta) - (pi - theta_t) sin(theta_t) - m3, decreasing in theta. With
    m1 = 1 that is InsightFace's cos(theta) - m2 sin(pi - m2) - m3, so (1, m, 0)
    equals `ArcFaceHead(margin=m)` exactly. (InsightFace's current PyTorch code
    evaluates cos(theta + m2) on every theta and back-propagates as if there
    were no margin, and with m3 > 0 applies m3 alone; this head keeps the exact
    gradient and all three margins, as its MXNet code did.)

    Args:
        num_classes: Number of training identities C, >= 2.
        scale: The logit scale s > 0 (64 in InsightFace).
        m1: Multiplicative angular margin, >= 1.
        m2: Additive angular margin in radians, in [0, pi/2).
        m3: Additive cosine margin, in [0, 1).
        embedding_size: Embedding dimension D; None takes it from the first input.
        kernel_initializer: Initializer of W; None is N(0, 0.01^2) as in InsightFace.
        **kwargs: `sub_centers` (see `CosineHead`), `loss` and `focal_gamma`
            (see `ClassifierHead`) and base `keras.layers.Layer` arguments.
    """

    def __init__(self, num_classes: int, scale: float = Combined.scale, m1: float = Combined.m1,
                 m2: float = Combined.m2, m3: float = Combined.m3, embedding_size: int | None = None,
                 kernel_initializer: str | dict | keras.initializers.Initializer | None = None,
                 **kwargs: Any) -> None:
        super().__init__(num_classes, scale=scale, embedding_size=embedding_size,
                         kernel_initializer=kernel_initializer, **kwargs)
        self.m1 = _check_at_least("m1", m1, 1.0)
        self.m2 = _check_in("m2", m2, 0.0, math.pi / 2, "pi/2")
        self.m3 = _check_in("m3", m3, 0.0, 1.0, "1")

    def target_logit(self, cosine: tf.Tensor) -> tf.Tensor:
        m1, m2, m3 = self.m1, self.m2, self.m3
        sine = _sine(cosine)
        if m1 == 1.0:
            # The angle sum without atan2: the same values as ArcFace's.
            margined = cosine * math.cos(m2) - sine * math.sin(m2)
        else:
            margined = tf.cos(m1 * tf.atan2(sine, cosine) + m2)
        threshold = (math.pi - m2) / m1
        linear = cosine - (math.pi - threshold) * math.sin(threshold)
        return tf.where(cosine > math.cos(threshold), margined, linear) - m3

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"m1": self.m1, "m2": self.m2, "m3": self.m3})
        return config


@keras.utils.register_keras_serializable(package="sparse_embed")
class SphereFaceHead(CosineHead):
    """SphereFace (A-Softmax): multiplicative angular margin on the un-normalised feature.

    Liu et al., "SphereFace: Deep Hypersphere Embedding for Face Recognition"
    (CVPR 2017), Eq. 7: the class centres are normalised, the feature is not;
    z_ij = |x_i| cos(theta_ij) for j != y_i and z_iy = |x_i| psi(theta_iy) with

        psi(theta) = (-1)^k cos(m theta) - 2k,   theta in [k pi / m, (k + 1) pi / m],

    which is monotone decreasing on [0, pi] for the integer m (4 in the paper).
    cos(m theta) is the Chebyshev polynomial T_m(cos theta) and k a count of
    thresholds cos(j pi / m) that cos(theta) is at or below, as in the paper's
    code, so neither needs acos. The logit scale is the feature norm |x|, not a
    fixed s: that is the paper's formula, and why this head cannot be sharded.

    Training anneals from softmax to A-Softmax as the paper's code does
    (margin_inner_product_layer): the target logit is
    |x| (lambda cos(theta) + psi(theta)) / (1 + lambda) with
    lambda = max(lambda_min, lambda_base (1 + lambda_gamma t) ^ -lambda_power).
    t is the head's own `step` variable: the number of training calls so far
    (the value before this call is the one used), incremented by every call
    with `training=True` (once per train step), so it is saved and restored with
    the head in the checkpoint and a resumed run continues the schedule.
    Evaluation calls use the current lambda and do not count.

    Args:
        num_classes: Number of training identities C, >= 2.
        margin: The integer angular multiplier m >= 1 (4 in the paper; 1 is
            softmax on normalised centres).
        lambda_base: lambda at t = 0, >= 0 (1000 in the paper's code).
        lambda_gamma: Decay rate gamma >= 0 (0.12).
        lambda_power: Decay power >= 0 (1).
        lambda_min: Floor of lambda, >= 0 (5).
        embedding_size: Embedding dimension D; None takes it from the first input.
        kernel_initializer: Initializer of W; None is N(0, 0.01^2) as the other
            normalised heads (only its direction matters).
        **kwargs: `sub_centers` (see `CosineHead`), `loss` and `focal_gamma`
            (see `ClassifierHead`) and base `keras.layers.Layer` arguments.
    """

    def __init__(self, num_classes: int, margin: int = SphereFace.margin,
                 lambda_base: float = SphereFace.lambda_base,
                 lambda_gamma: float = SphereFace.lambda_gamma,
                 lambda_power: float = SphereFace.lambda_power,
                 lambda_min: float = SphereFace.lambda_min,
                 embedding_size: int | None = None,
                 kernel_initializer: str | dict | keras.initializers.Initializer | None = None,
                 **kwargs: Any) -> None:
        super().__init__(num_classes, embedding_size=embedding_size,
                         kernel_initializer=kernel_initializer, **kwargs)
        # A YAML `margin: 4` may arrive as the float 4.0.
        if not _is_real(margin) or margin < 1 or not float(margin).is_integer():
            raise ValueError(f"margin must be an integer >= 1 (4 in the paper), got {margin!r}")
        self.margin = int(margin)
        self.lambda_base = _check_at_least("lambda_base", lambda_base, 0.0)
        self.lambda_gamma = _check_at_least("lambda_gamma", lambda_gamma, 0.0)
        self.lambda_power = _check_at_least("lambda_power", lambda_power, 0.0)
        self.lambda_min = _check_at_least("lambda_min", lambda_min, 0.0)

    def build(self, input_shape: tf.TensorShape) -> None:
        super().build(input_shape)
        # One count for all replicas: every replica adds the same 1 each step.
        self.step = self.add_weight(
            name="step", shape=(), dtype=tf.int64, initializer="zeros", trainable=False,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )

    def annealing_lambda(self, step: tf.Tensor) -> tf.Tensor:
        """lambda = max(lambda_min, lambda_base (1 + lambda_gamma step) ^ -lambda_power), float32.

        Args:
            step: int or float scalar, training calls so far.
        """
        t = tf.cast(step, tf.float32)
        decayed = self.lambda_base * tf.pow(1.0 + self.lambda_gamma * t, -self.lambda_power)
        return tf.maximum(decayed, self.lambda_min)

    def psi(self, cosine: tf.Tensor) -> tf.Tensor:
        """psi(theta) = (-1)^k cos(m theta) - 2k from cos(theta), float32.

        Args:
            cosine: float32 [...], cos(theta) in [-1, 1].
        """
        m = self.margin
        # T_m(c) = cos(m theta): T_0 = 1, T_1 = c, T_{n+1} = 2 c T_n - T_{n-1}.
        previous, current = tf.ones_like(cosine), cosine
        for _ in range(m - 1):
            previous, current = current, 2.0 * cosine * current - previous
        # k = #{j in 1..m-1 : theta >= j pi / m}; psi is continuous, so the
        # side a boundary falls on does not matter.
        k = tf.zeros_like(cosine)
        for j in range(1, m):
            k += tf.cast(cosine <= math.cos(j * math.pi / m), tf.float32)
        sign = 1.0 - 2.0 * tf.math.floormod(k, 2.0)
        return sign * current - 2.0 * k

    def logits(self, embeddings: tf.Tensor) -> tf.Tensor:
        return _feature_norm(embeddings) * self.cosine(embeddings)

    def training_logits(self, embeddings: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        norm = _feature_norm(embeddings)
        lam = self.annealing_lambda(self.step)

        def target(cosine: tf.Tensor) -> tf.Tensor:
            return (lam * cosine + self.psi(cosine)) / (1.0 + lam)

        return norm * _replace_target(self.cosine(embeddings), labels, target)

    def call(self, embeddings: tf.Tensor, labels: tf.Tensor,
             training: bool | None = None) -> tf.Tensor:
        """Returns the mean loss of the batch; a training call advances the annealing step.

        Args:
            embeddings: float [B, D] from the backbone, not normalised.
            labels: int32 or int64 [B], class indices in [0, num_classes).
            training: True counts the call as a training step (Python or tensor bool).
        """
        loss = super().call(embeddings, labels, training=training)
        if training is not None:
            # After the loss has read the step: it anneals with the count before this call.
            self.step.assign_add(tf.cast(training, tf.int64))
        return loss

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({
            "margin": self.margin,
            "lambda_base": self.lambda_base,
            "lambda_gamma": self.lambda_gamma,
            "lambda_power": self.lambda_power,
            "lambda_min": self.lambda_min,
        })
        return config


def _loss_arguments(config: HeadConfig) -> dict[str, Any]:
    return {"loss": config.loss, "focal_gamma": config.focal_gamma}


def softmax_head(num_classes: int, embedding_size: int, config: HeadConfig) -> SoftmaxHead:
    """Builds the `softmax` head with `config.loss`; it has no parameters of its own.

    Args:
        num_classes: Number of training identities.
        embedding_size: Embedding dimension D.
        config: The run's head section.
    """
    return SoftmaxHead(num_classes, embedding_size=embedding_size, name="softmax_head",
                       **_loss_arguments(config))


def arcface_head(num_classes: int, embedding_size: int, config: HeadConfig) -> ArcFaceHead:
    """Builds the `arcface` head from `config.params` (`ArcFace`), `sub_centers` and `loss`.

    Args:
        num_classes: Number of training identities.
        embedding_size: Embedding dimension D.
        config: The run's head section.
    """
    return ArcFaceHead(num_classes, **dataclasses.asdict(config.params), sub_centers=config.sub_centers,
                       embedding_size=embedding_size, name="arcface_head", **_loss_arguments(config))


def cosface_head(num_classes: int, embedding_size: int, config: HeadConfig) -> CosFaceHead:
    """Builds the `cosface` head from `config.params` (`CosFace`), `sub_centers` and `loss`.

    Args:
        num_classes: Number of training identities.
        embedding_size: Embedding dimension D.
        config: The run's head section.
    """
    return CosFaceHead(num_classes, **dataclasses.asdict(config.params), sub_centers=config.sub_centers,
                       embedding_size=embedding_size, name="cosface_head", **_loss_arguments(config))


def combined_head(num_classes: int, embedding_size: int, config: HeadConfig) -> CombinedMarginHead:
    """Builds the `combined` head from `config.params` (`Combined`), `sub_centers` and `loss`.

    Args:
        num_classes: Number of training identities.
        embedding_size: Embedding dimension D.
        config: The run's head section.
    """
    return CombinedMarginHead(num_classes, **dataclasses.asdict(config.params),
                              sub_centers=config.sub_centers, embedding_size=embedding_size,
                              name="combined_head", **_loss_arguments(config))


def sphereface_head(num_classes: int, embedding_size: int, config: HeadConfig) -> SphereFaceHead:
    """Builds the `sphereface` head from `config.params` (`SphereFace`), `sub_centers` and `loss`.

    The logits are scaled by the feature norm, so there is no scale, and no
    Partial FC (`head.sharded` does not apply to it: the config rejects it).

    Args:
        num_classes: Number of training identities.
        embedding_size: Embedding dimension D.
        config: The run's head section.
    """
    return SphereFaceHead(num_classes, **dataclasses.asdict(config.params),
                          sub_centers=config.sub_centers, embedding_size=embedding_size,
                          name="sphereface_head", **_loss_arguments(config))
