"""`DISTRIBUTIONS`, the registry of embedding distributions, and the interface they share.

A model's embedding layer outputs a flat parameter vector per input, laid
out as `[mean (D) | extra (0, 1 or D)]`; a distribution is a stateless,
frozen description of how to read that vector (the layout and
parametrization of the probabilistic-embeddings reference code, Karpukhin et
al. 2022). Every method broadcasts over the leading dimensions: parameters of
shape (..., P) with P = `num_parameters`, points of shape (..., D).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from sparse_embed.distributions._tf import tf
from sparse_embed.errors import ConfigError
from sparse_embed.registry import Registry

# Below this norm a vector is not scaled up when normalized (the reference's 1e-12).
NORM_EPSILON = 1e-12


def normalize(x: tf.Tensor) -> tf.Tensor:
    """x / max(||x||, 1e-12) along the last axis, with a finite gradient at 0.

    Args:
        x: Tensor of shape (..., D).
    """
    squared = tf.reduce_sum(tf.square(x), axis=-1, keepdims=True)
    return x / tf.sqrt(tf.maximum(squared, NORM_EPSILON**2))


def safe_norm(x: tf.Tensor, keepdims: bool = False) -> tf.Tensor:
    """||x|| along the last axis, with a zero (not NaN) gradient at x = 0.

    Args:
        x: Tensor of shape (..., D).
        keepdims: Keep the last axis (length 1).
    """
    squared = tf.reduce_sum(tf.square(x), axis=-1, keepdims=keepdims)
    positive = squared > 0
    return tf.where(positive, tf.sqrt(tf.where(positive, squared, tf.ones_like(squared))), 0.0 * squared)


def broadcast_pair(first: tf.Tensor, second: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Broadcasts the leading dimensions of a (..., n) and a (..., m) tensor to their common shape.

    Args:
        first: Tensor of shape (..., n).
        second: Tensor of shape (..., m).
    """
    leading = tf.broadcast_dynamic_shape(tf.shape(first)[:-1], tf.shape(second)[:-1])
    first = tf.broadcast_to(first, tf.concat([leading, tf.shape(first)[-1:]], 0))
    second = tf.broadcast_to(second, tf.concat([leading, tf.shape(second)[-1:]], 0))
    return first, second


class Distribution(ABC):
    """What every registered distribution provides (a frozen dataclass holding its options)."""

    dim: int

    @property
    @abstractmethod
    def num_parameters(self) -> int:
        """P, the length of the parameter vector."""

    @property
    @abstractmethod
    def is_spherical(self) -> bool:
        """Whether the distribution lives on the unit sphere (points are normalized)."""

    @property
    def has_confidence(self) -> bool:
        """Whether `confidence` is defined (false for Dirac embeddings: theirs raises)."""
        return True

    def check_parameters(self, parameters: Any) -> tf.Tensor:
        """Returns `parameters` as a float tensor after checking its last dimension is P.

        Args:
            parameters: Tensor of shape (..., P).

        Raises:
            ConfigError: If the last dimension is known and is not `num_parameters`.
        """
        parameters = tf.convert_to_tensor(parameters)
        if not parameters.dtype.is_floating:
            parameters = tf.cast(parameters, tf.float32)
        size = parameters.shape[-1] if parameters.shape.rank else None
        if size is not None and size != self.num_parameters:
            raise ConfigError(
                f"{type(self).__name__} of dimension {self.dim} takes {self.num_parameters} parameters "
                f"per embedding, got {size}"
            )
        return parameters

    def split(self, parameters: Any) -> tuple[tf.Tensor, tf.Tensor]:
        """The raw mean part (..., D) and the extra part (..., P - D) of a parameter vector.

        Args:
            parameters: Tensor of shape (..., P).
        """
        parameters = self.check_parameters(parameters)
        return parameters[..., : self.dim], parameters[..., self.dim :]

    @abstractmethod
    def mean(self, parameters: Any) -> tf.Tensor:
        """The expectation of the distribution, (..., D).

        Args:
            parameters: Tensor of shape (..., P).
        """

    @abstractmethod
    def modes(self, parameters: Any) -> tf.Tensor:
        """The mode of the (single-component) distribution, (..., D): mu, normalized on the sphere.

        Args:
            parameters: Tensor of shape (..., P).
        """

    @abstractmethod
    def confidence(self, parameters: Any) -> tf.Tensor:
        """How sure the embedding is, (...): higher is more confident.

        Args:
            parameters: Tensor of shape (..., P).
        """

    @abstractmethod
    def sample(self, parameters: Any, sample_shape: tuple[int, ...] = (), seed: Any = None,
               noise: Any = None) -> tf.Tensor:
        """Reparametrized samples, (..., *sample_shape, D): gradients reach the parameters.

        Args:
            parameters: Tensor of shape (..., P).
            sample_shape: Samples per distribution, appended after the leading dimensions.
            seed: A stateless seed (shape [2] integers) for reproducible draws; None uses TensorFlow's
                global random state.
            noise: Pre-drawn standard noise, where the distribution documents its form.
        """

    @abstractmethod
    def log_prob(self, parameters: Any, points: Any) -> tf.Tensor:
        """log density at `points` (normalized first on the sphere), (...).

        Args:
            parameters: Tensor of shape (..., P).
            points: Tensor of shape (..., D), broadcastable against the parameters.
        """

    @abstractmethod
    def log_mls(self, parameters1: Any, parameters2: Any) -> tf.Tensor:
        """log of the mutual likelihood score, log integral p1(x) p2(x) dx, (...).

        Args:
            parameters1: Tensor of shape (..., P).
            parameters2: Tensor of shape (..., P), broadcastable against `parameters1`.
        """

    @abstractmethod
    def prior_kl(self, parameters: Any) -> tf.Tensor:
        """KL divergence to the prior (N(0, I) in R^D, uniform on the sphere for vMF), (...).

        Args:
            parameters: Tensor of shape (..., P).
        """

    @abstractmethod
    def pdf_product(self, parameters1: Any, parameters2: Any) -> tuple[Distribution, tf.Tensor]:
        """The normalized product of two densities: its distribution and parameters (..., P').

        Args:
            parameters1: Tensor of shape (..., P).
            parameters2: Tensor of shape (..., P), broadcastable against `parameters1`.
        """

    def expand_for_samples(self, parameters: tf.Tensor, sample_shape: tuple[int, ...]) -> tf.Tensor:
        """(..., P) -> (..., 1 (per sample axis), P), broadcastable to (..., *sample_shape, P).

        Args:
            parameters: Tensor of shape (..., P).
            sample_shape: The sample axes to make room for.
        """
        for _ in sample_shape:
            parameters = tf.expand_dims(parameters, -2)
        return parameters

    def sample_batch_shape(self, parameters: tf.Tensor, sample_shape: tuple[int, ...]) -> tf.Tensor:
        """The shape (..., *sample_shape, D) of the samples of `parameters`.

        Args:
            parameters: Tensor of shape (..., P).
            sample_shape: Samples per distribution.
        """
        leading = tf.shape(parameters)[:-1]
        return tf.concat([leading, tf.constant(list(sample_shape) + [self.dim], tf.int32)], 0)


DISTRIBUTIONS: Registry[type[Distribution]] = Registry("distribution")


def build_distribution(name: str, dim: int, **options: Any) -> Distribution:
    """The registered distribution `name` of dimension `dim` with `options`.

    Args:
        name: A name in `DISTRIBUTIONS` ("dirac", "gaussian", "vmf").
        dim: D, the embedding dimension.
        **options: The distribution's own fields (e.g. `covariance="diagonal"`).

    Raises:
        ConfigError: If the name or an option is unknown or invalid.
    """
    cls = DISTRIBUTIONS.get(name)
    try:
        return cls(dim=dim, **options)
    except TypeError as error:
        raise ConfigError(f"distribution {name!r}: {error}") from error
