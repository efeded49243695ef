"""`SCORERS`: similarities between two embedding distributions, as Keras layers.

A scorer compares two parameter tensors of one distribution, (..., P) each,
broadcasting over the leading dimensions: `scorer(p1, p2)` scores pairs
row by row, `scorer(p1[:, None], p2[None])` scores every pair. Higher is more
similar. The scorers are those of the probabilistic-embeddings reference code
(`layers/scorer.py`); `hib` has trainable weights, which train with the model
the layer is part of.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sparse_embed.distributions.base import DISTRIBUTIONS, Distribution, build_distribution, normalize
from sparse_embed.keras import keras, tf
from sparse_embed.registry import Registry


def distribution_config(distribution: Distribution) -> dict[str, Any]:
    """The registered name and options of `distribution`, as `build_distribution` takes them.

    Args:
        distribution: A registered distribution.

    Raises:
        ValueError: If its class is not registered.
    """
    for name in DISTRIBUTIONS.names():
        if DISTRIBUTIONS.get(name) is type(distribution):
            return {"name": name, **dataclasses.asdict(distribution)}
    raise ValueError(f"{type(distribution).__name__} is not a registered distribution")


class Scorer(keras.layers.Layer):
    """Scores pairs of distributions given by their parameters.

    Inputs are not cast to the layer's dtype: a scorer computes in the dtype of
    the parameters it receives.

    Args:
        distribution: How the parameter vectors are read.
        **kwargs: Keras layer arguments.
    """

    def __init__(self, distribution: Distribution, **kwargs: Any) -> None:
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.distribution = distribution

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "distribution": distribution_config(self.distribution)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Scorer:
        config = dict(config)
        options = dict(config.pop("distribution"))
        return cls(build_distribution(options.pop("name"), **options), **config)


SCORERS: Registry[type[Scorer]] = Registry("scorer")


def build_scorer(name: str, distribution: Distribution, **options: Any) -> Scorer:
    """The registered scorer `name` for `distribution`.

    Args:
        name: A name in `SCORERS`.
        distribution: How the parameter vectors are read.
        **options: The scorer's own arguments (e.g. `num_samples`).
    """
    return SCORERS.get(name)(distribution, **options)


@SCORERS.register("dot")
@keras.utils.register_keras_serializable(package="sparse_embed")
class DotScorer(Scorer):
    """mean1 . mean2 (the distributions' means: A_D(kappa) mu for vMF)."""

    def call(self, parameters1: tf.Tensor, parameters2: tf.Tensor) -> tf.Tensor:
        mean1 = self.distribution.mean(parameters1)
        mean2 = self.distribution.mean(parameters2)
        return tf.reduce_sum(mean1 * mean2, axis=-1)


@SCORERS.register("cosine")
@keras.utils.register_keras_serializable(package="sparse_embed")
class CosineScorer(Scorer):
    """The cosine of the angle between the two means."""

    def call(self, parameters1: tf.Tensor, parameters2: tf.Tensor) -> tf.Tensor:
        mean1 = normalize(self.distribution.mean(parameters1))
        mean2 = normalize(self.distribution.mean(parameters2))
        return tf.reduce_sum(mean1 * mean2, axis=-1)


@SCORERS.register("l2")
@keras.utils.register_keras_serializable(package="sparse_embed")
class NegativeL2Scorer(Scorer):
    """-||mean1 - mean2||^2 (Proxy-NCA's test-time score)."""

    def call(self, parameters1: tf.Tensor, parameters2: tf.Tensor) -> tf.Tensor:
        mean1 = self.distribution.mean(parameters1)
        mean2 = self.distribution.mean(parameters2)
        return -tf.reduce_sum(tf.square(mean1 - mean2), axis=-1)


@SCORERS.register("mls")
@keras.utils.register_keras_serializable(package="sparse_embed")
class MutualLikelihoodScorer(Scorer):
    """The log mutual likelihood score, log integral p1 p2 (PFE for Gaussians, SCF for vMF)."""

    def call(self, parameters1: tf.Tensor, parameters2: tf.Tensor) -> tf.Tensor:
        return self.distribution.log_mls(parameters1, parameters2)


class SampledScorer(Scorer):
    """A score averaged over samples of both distributions.

    Args:
        distribution: How the parameter vectors are read.
        num_samples: Samples drawn from each distribution (K; K x K pairs are averaged).
        **kwargs: Keras layer arguments.
    """

    def __init__(self, distribution: Distribution, num_samples: int = 8, **kwargs: Any) -> None:
        super().__init__(distribution, **kwargs)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_samples": self.num_samples}

    def draw(self, parameters: tf.Tensor, samples: tf.Tensor | None) -> tf.Tensor:
        """`samples` if given, else K reparametrized samples: (..., K, D).

        Args:
            parameters: Tensor of shape (..., P).
            samples: Pre-drawn samples of shape (..., K, D), or None.
        """
        if samples is not None:
            return tf.cast(samples, parameters.dtype)
        return self.distribution.sample(parameters, (self.num_samples,))


@SCORERS.register("hib")
@keras.utils.register_keras_serializable(package="sparse_embed")
class HIBScorer(SampledScorer):
    """HIB's match probability: mean over K x K sample pairs of sigmoid(-a ||z1 - z2|| + b).

    a (init 1) and b (init 0) are trainable weights of this layer (Oh et al.,
    "Modeling Uncertainty with Hedged Instance Embedding", ICLR 2019).

    Args:
        distribution: How the parameter vectors are read.
        num_samples: Samples per distribution (the reference uses 8).
        **kwargs: Keras layer arguments.
    """

    def __init__(self, distribution: Distribution, num_samples: int = 8, **kwargs: Any) -> None:
        super().__init__(distribution, num_samples=num_samples, **kwargs)
        self.scale = self.add_weight(name="scale", shape=(), initializer="ones", trainable=True)
        self.bias = self.add_weight(name="bias", shape=(), initializer="zeros", trainable=True)

    def call(self, parameters1: tf.Tensor, parameters2: tf.Tensor, samples1: tf.Tensor | None = None,
             samples2: tf.Tensor | None = None) -> tf.Tensor:
        """Scores (...), from pre-drawn samples (..., K, D) where given.

        Args:
            parameters1: Tensor of shape (..., P).
            parameters2: Tensor of shape (..., P), broadcastable against `parameters1`.
            samples1: Optional samples of the first distributions, (..., K, D).
            samples2: Optional samples of the second distributions, (..., K, D).
        """
        z1 = self.draw(parameters1, samples1)
        z2 = self.draw(parameters2, samples2)
        # ||z1 - z2||^2 through the Gram matrix: (..., K, K) without a (..., K, K, D) difference tensor.
        squared = (
            tf.reduce_sum(tf.square(z1), -1)[..., :, None]
            + tf.reduce_sum(tf.square(z2), -1)[..., None, :]
            - 2 * tf.linalg.matmul(z1, z2, transpose_b=True)
        )
        # Rounding can make the expansion slightly negative; the floor also keeps sqrt's gradient finite.
        distance = tf.sqrt(tf.maximum(squared, 1e-12))
        scale = tf.cast(self.scale, z1.dtype)
        bias = tf.cast(self.bias, z1.dtype)
        return tf.reduce_mean(tf.sigmoid(-scale * distance + bias), axis=[-1, -2])


@SCORERS.register("ecs")
@keras.utils.register_keras_serializable(package="sparse_embed")
class ExpectedCosineScorer(SampledScorer):
    """The expected cosine: mean over K x K sample pairs of cos(z1, z2).

    Args:
        distribution: How the parameter vectors are read.
        num_samples: Samples per distribution (the reference uses 10).
        **kwargs: Keras layer arguments.
    """

    def __init__(self, distribution: Distribution, num_samples: int = 10, **kwargs: Any) -> None:
        super().__init__(distribution, num_samples=num_samples, **kwargs)

    def call(self, parameters1: tf.Tensor, parameters2: tf.Tensor, samples1: tf.Tensor | None = None,
             samples2: tf.Tensor | None = None) -> tf.Tensor:
        """Scores (...), from pre-drawn samples (..., K, D) where given.

        Args:
            parameters1: Tensor of shape (..., P).
            parameters2: Tensor of shape (..., P), broadcastable against `parameters1`.
            samples1: Optional samples of the first distributions, (..., K, D).
            samples2: Optional samples of the second distributions, (..., K, D).
        """
        z1 = normalize(self.draw(parameters1, samples1))
        z2 = normalize(self.draw(parameters2, samples2))
        return tf.reduce_mean(tf.linalg.matmul(z1, z2, transpose_b=True), axis=[-1, -2])
