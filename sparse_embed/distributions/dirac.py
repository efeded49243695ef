"""Dirac embeddings: a point, no uncertainty (today's deterministic embeddings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparse_embed.distributions._tf import tf
from sparse_embed.distributions.base import DISTRIBUTIONS, Distribution, normalize
from sparse_embed.errors import ConfigError


@DISTRIBUTIONS.register("dirac")
@dataclass(frozen=True)
class Dirac(Distribution):
    """A point mass at the embedding (the reference code's `dirac`); P = D.

    Args:
        dim: D, the embedding dimension.
        spherical: Whether the point is normalized onto the unit sphere.
    """

    dim: int
    spherical: bool = False

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ConfigError(f"distribution dim must be >= 1, got {self.dim}")

    @property
    def num_parameters(self) -> int:
        return self.dim

    @property
    def is_spherical(self) -> bool:
        return self.spherical

    @property
    def has_confidence(self) -> bool:
        return False

    def mean(self, parameters: Any) -> tf.Tensor:
        parameters = self.check_parameters(parameters)
        return normalize(parameters) if self.spherical else parameters

    def modes(self, parameters: Any) -> tf.Tensor:
        return self.mean(parameters)

    def confidence(self, parameters: Any) -> tf.Tensor:
        # A point carries no uncertainty; `has_confidence` tells callers not to ask.
        raise self._no_density("confidence")

    def sample(self, parameters: Any, sample_shape: tuple[int, ...] = (), seed: Any = None,
               noise: Any = None) -> tf.Tensor:
        """Copies of the mean, (..., *sample_shape, D); `seed` and `noise` are not used.

        Args:
            parameters: Tensor of shape (..., D).
            sample_shape: Samples per distribution.
            seed: Unused (nothing is random).
            noise: Unused (nothing is random).
        """
        mean = self.expand_for_samples(self.mean(parameters), sample_shape)
        return tf.broadcast_to(mean, self.sample_batch_shape(parameters, sample_shape))

    def _no_density(self, what: str) -> ConfigError:
        return ConfigError(f"the dirac distribution has no {what}; use a gaussian or vmf distribution")

    def log_prob(self, parameters: Any, points: Any) -> tf.Tensor:
        raise self._no_density("density (log_prob)")

    def log_mls(self, parameters1: Any, parameters2: Any) -> tf.Tensor:
        raise self._no_density("mutual likelihood score (log_mls)")

    def prior_kl(self, parameters: Any) -> tf.Tensor:
        raise self._no_density("KL divergence to a prior (prior_kl)")

    def pdf_product(self, parameters1: Any, parameters2: Any) -> tuple[Distribution, tf.Tensor]:
        raise self._no_density("density product (pdf_product)")
