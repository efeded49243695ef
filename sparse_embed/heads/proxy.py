"""Proxy losses: one learnable proxy per class, Proxy-NCA and Proxy-Anchor.

Each is a Keras layer owning the proxies P [C, D] (one row per training
class) with the head contract of the trainer: ``head(embeddings, labels,
training=None)`` -> scalar float32 loss, ``head.loss_and_accuracy(embeddings,
labels)`` -> (loss, the fraction of the batch whose most similar proxy is
its class). Embeddings and proxies are L2-normalised inside; the loss is
float32 whatever the dtype policy (Proxy-Anchor's exp(alpha (cos + delta))
with alpha = 32 overflows float16). There are no logits in the sense of the
margin heads. The proxies see every class each step, so these heads work with
any sampler.

Proxies learn faster than the backbone in both papers (100x the learning
rate): `lr_multipliers` tells the trainer which variables to step by how
much more; it scales their *update*, not their gradient, which would not be
the same for Adam and AdamW (see `training/trainer.py`).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import TYPE_CHECKING, Any

from sparse_embed.heads.pair import check_number, log1p_sum_exp
from sparse_embed.heads.params import ProxyAnchor, ProxyNCA
from sparse_embed.keras import keras, tf

if TYPE_CHECKING:
    from sparse_embed.config import HeadConfig


def _check_num_classes(num_classes: Any) -> int:
    if not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return int(num_classes)


class ProxyHead(keras.layers.Layer):
    """Base of the proxy losses: the proxies, their cosines and the nearest-proxy accuracy.

    Subclasses implement `proxy_loss` on the cosines [B, C] between the
    normalised embeddings and proxies.

    Args:
        num_classes: Number of training classes C, >= 2 (one proxy each).
        embedding_size: Embedding dimension D; None takes it from the first input.
        lr_multiplier: The proxies' learning rate is this times the backbone's, > 0.
        proxy_initializer: Initializer of P [C, D]; None is N(0, 2/C), the
            `kaiming_normal_(mode="fan_out")` of the Proxy-Anchor code.
        **kwargs: Base `keras.layers.Layer` arguments (name, ...); the dtype
            defaults to float32 under any global policy.
    """

    def __init__(self, num_classes: int, embedding_size: int | None = None, lr_multiplier: float = 1.0,
                 proxy_initializer: str | dict | keras.initializers.Initializer | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_classes = _check_num_classes(num_classes)
        if embedding_size is not None and (not isinstance(embedding_size, numbers.Integral)
                                           or isinstance(embedding_size, bool) or embedding_size < 1):
            raise ValueError(f"embedding_size must be a positive integer or None, got {embedding_size!r}")
        self.embedding_size = None if embedding_size is None else int(embedding_size)
        self.lr_multiplier = check_number("lr_multiplier", lr_multiplier, strict=True)
        self.proxy_initializer = keras.initializers.get(
            keras.initializers.VarianceScaling(2.0, "fan_in", "untruncated_normal")
            if proxy_initializer is None else proxy_initializer
        )

    def build(self, input_shape: tf.TensorShape) -> None:
        dim = tf.TensorShape(input_shape)[-1]
        if self.embedding_size is not None and dim is not None and dim != self.embedding_size:
            raise ValueError(f"{type(self).__name__} expects embeddings of size {self.embedding_size}, "
                             f"got input shape {input_shape}")
        dim = dim if dim is not None else self.embedding_size
        if dim is None:
            raise ValueError(f"{type(self).__name__} needs a known embedding size: pass embedding_size "
                             f"or an input with a known last dimension, got input shape {input_shape}")
        # Under tf.distribute the trainer rescales the proxies' update inside the replica
        # context, which a mirrored variable only allows with an aggregation; every replica
        # holds the same value after the averaged step, so the first replica's is the value.
        self.proxies = self.add_weight(
            name="proxies", shape=(self.num_classes, dim), initializer=self.proxy_initializer,
            trainable=True, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
        super().build(input_shape)

    @property
    def lr_multipliers(self) -> list[tuple[tf.Variable, float]]:
        """(variable, learning-rate multiplier) pairs the trainer applies: the proxies."""
        return [(self.proxies, self.lr_multiplier)] if self.built else []

    def cosine(self, embeddings: tf.Tensor) -> tf.Tensor:
        """Returns the float32 [B, C] cosines between embeddings and proxies, clipped to [-1, 1].

        Args:
            embeddings: float [B, D], not normalised.
        """
        if not self.built:
            self.build(tf.TensorShape(embeddings.shape))
        e = tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=-1)
        p = tf.math.l2_normalize(tf.cast(self.proxies, tf.float32), axis=-1)
        return tf.clip_by_value(tf.matmul(e, p, transpose_b=True), -1.0, 1.0)

    def proxy_loss(self, cosine: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        """Returns the float32 scalar loss.

        Args:
            cosine: float32 [B, C], cosines of embeddings and proxies.
            labels: int32 [B], class indices in [0, C).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement proxy_loss()")

    def call(self, embeddings: tf.Tensor, labels: tf.Tensor,
             training: bool | None = None) -> tf.Tensor:
        """Returns the batch's loss, float32 scalar.

        Args:
            embeddings: float [B, D] from the backbone, not normalised.
            labels: int32 or int64 [B], class indices in [0, num_classes).
            training: Keras training flag (the losses behave the same either way).
        """
        return self.proxy_loss(self.cosine(embeddings), tf.cast(tf.reshape(labels, [-1]), tf.int32))

    def loss_and_accuracy(self, embeddings: tf.Tensor, labels: tf.Tensor,
                          training: bool | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """Returns the loss and the fraction of the batch whose nearest proxy is its class.

        Args:
            embeddings: float [B, D] from the backbone, not normalised.
            labels: int [B], class indices in [0, num_classes).
            training: Keras training flag.

        Returns:
            (float32 loss, float32 accuracy).
        """
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        cosine = self.cosine(embeddings)
        correct = tf.equal(tf.argmax(cosine, axis=-1, output_type=tf.int32), labels)
        return self.proxy_loss(cosine, labels), tf.reduce_mean(tf.cast(correct, tf.float32))

    def compute_output_shape(self, input_shape: tf.TensorShape) -> tf.TensorShape:
        return tf.TensorShape([])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({
            "num_classes": self.num_classes,
            "embedding_size": self.embedding_size,
            "lr_multiplier": self.lr_multiplier,
            "proxy_initializer": keras.initializers.serialize(self.proxy_initializer),
        })
        return config


@keras.utils.register_keras_serializable(package="sparse_embed")
class ProxyNCAHead(ProxyHead):
    """Proxy-NCA: a softmax over the scaled negative squared distances to the proxies.

    Movshovitz-Attias et al., "No Fuss Distance Metric Learning using Proxies"
    (ICCV 2017), in the form of pytorch-metric-learning's `ProxyNCALoss`
    (normalised embeddings and proxies, squared Euclidean distance, the
    softmax scale s):
    L = mean_i -log( e^{-s |e_i - p_{y_i}|^2} / sum_j e^{-s |e_i - p_j|^2} ).
    The denominator includes the class's own proxy, which the paper's Eq. 4
    leaves out (that form is unbounded below). On the unit sphere
    |e - p|^2 = 2 - 2 cos, so this is a softmax over 2 s cos. ProxyNCA++ (Teh
    et al. 2020) reaches its results with s = 9 (temperature 1/9).

    Args:
        num_classes: Number of training classes C, >= 2.
        scale: The softmax scale s > 0.
        embedding_size: Embedding dimension D; None takes it from the first input.
        lr_multiplier: Learning-rate multiplier of the proxies, > 0.
        proxy_initializer: Initializer of the proxies; None is N(0, 2/C).
        **kwargs: Base `keras.layers.Layer` arguments.
    """

    def __init__(self, num_classes: int, scale: float = ProxyNCA.scale, embedding_size: int | None = None,
                 lr_multiplier: float = ProxyNCA.lr_multiplier,
                 proxy_initializer: str | dict | keras.initializers.Initializer | None = None,
                 **kwargs: Any) -> None:
        super().__init__(num_classes, embedding_size=embedding_size, lr_multiplier=lr_multiplier,
                         proxy_initializer=proxy_initializer, **kwargs)
        self.scale = check_number("scale", scale, strict=True)

    def proxy_loss(self, cosine: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        logits = -self.scale * (2.0 - 2.0 * cosine)
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"scale": self.scale})
        return config


@keras.utils.register_keras_serializable(package="sparse_embed")
class ProxyAnchorHead(ProxyHead):
    """Proxy-Anchor: each proxy is an anchor pulling its class's embeddings and pushing the rest.

    Kim et al., "Proxy Anchor Loss for Deep Metric Learning" (CVPR 2020), Eq. 4:
    L = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} e^{-alpha (s(x, p) - delta)})
      + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} e^{alpha (s(x, p) + delta)}),
    with s the cosine, P all proxies, P+ the proxies with a positive in the
    batch, X_p+ / X_p- the batch's embeddings of p's class / of other classes.

    Args:
        num_classes: Number of training classes C, >= 2.
        alpha: The scale alpha > 0 (32 in the paper).
        delta: The margin delta >= 0 (0.1 in the paper).
        embedding_size: Embedding dimension D; None takes it from the first input.
        lr_multiplier: Learning-rate multiplier of the proxies, > 0 (100 in the paper).
        proxy_initializer: Initializer of the proxies; None is N(0, 2/C).
        **kwargs: Base `keras.layers.Layer` arguments.
    """

    def __init__(self, num_classes: int, alpha: float = ProxyAnchor.alpha, delta: float = ProxyAnchor.delta,
                 embedding_size: int | None = None, lr_multiplier: float = ProxyAnchor.lr_multiplier,
                 proxy_initializer: str | dict | keras.initializers.Initializer | None = None,
                 **kwargs: Any) -> None:
        super().__init__(num_classes, embedding_size=embedding_size, lr_multiplier=lr_multiplier,
                         proxy_initializer=proxy_initializer, **kwargs)
        self.alpha = check_number("alpha", alpha, strict=True)
        self.delta = check_number("delta", delta)

    def proxy_loss(self, cosine: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        # Proxies along the rows: the sums run over the batch.
        by_proxy = tf.transpose(cosine)
        positive = tf.transpose(tf.one_hot(labels, self.num_classes, on_value=True, off_value=False))
        pull = log1p_sum_exp(-self.alpha * (by_proxy - self.delta), positive)
        push = log1p_sum_exp(self.alpha * (by_proxy + self.delta), ~positive)
        with_positives = tf.reduce_sum(tf.cast(tf.reduce_any(positive, axis=1), tf.float32))
        return tf.math.divide_no_nan(tf.reduce_sum(pull), with_positives) + tf.reduce_mean(push)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"alpha": self.alpha, "delta": self.delta})
        return config


def proxy_nca_head(num_classes: int, embedding_size: int, config: HeadConfig) -> ProxyNCAHead:
    """Builds the `proxy_nca` head from `config.params` (`ProxyNCA`).

    Args:
        num_classes: Number of training classes.
        embedding_size: Embedding dimension D.
        config: The run's head section.
    """
    return ProxyNCAHead(num_classes, **dataclasses.asdict(config.params), embedding_size=embedding_size,
                        name="proxy_nca_head")


def proxy_anchor_head(num_classes: int, embedding_size: int, config: HeadConfig) -> ProxyAnchorHead:
    """Builds the `proxy_anchor` head from `config.params` (`ProxyAnchor`).

    Args:
        num_classes: Number of training classes.
        embedding_size: Embedding dimension D.
        config: The run's head section.
    """
    return ProxyAnchorHead(num_classes, **dataclasses.asdict(config.params),
                           embedding_size=embedding_size, name="proxy_anchor_head")
