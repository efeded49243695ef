"""Gaussian embeddings (PFE, DUL, HIB, SPE): the reference code's single-component `gmm`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sparse_embed.distributions import draws
from sparse_embed.distributions._tf import tf
from sparse_embed.distributions.base import DISTRIBUTIONS, Distribution, broadcast_pair, normalize
from sparse_embed.distributions.parametrization import PARAMETRIZATIONS, Parametrization
from sparse_embed.errors import ConfigError

COVARIANCES = ("spherical", "diagonal")


@DISTRIBUTIONS.register("gaussian")
@dataclass(frozen=True)
class Gaussian(Distribution):
    """N(mu, diag(sigma^2)) with parameters `[mu (D) | h (1 or D)]`.

    sigma^2 = parametrization(h) + exp(-max_logivar), so the inverse variance
    never exceeds exp(max_logivar). With `spherical`, mu is normalized and so
    are the points a density is evaluated at (a Gaussian "on" the sphere, as
    PFE and DUL use it); the density itself is still the one in R^D.

    Args:
        dim: D, the embedding dimension.
        spherical: Whether mu (and evaluated points) are normalized onto the unit sphere.
        covariance: "spherical" (one variance, P = D + 1) or "diagonal" (one per axis, P = 2D).
        parametrization: How h maps to the variance: "invlin" or "exp".
        max_logivar: The largest log inverse variance (None: no floor on the variance).
    """

    dim: int
    spherical: bool = False
    covariance: str = "spherical"
    parametrization: str = "invlin"
    max_logivar: float | None = 10.0

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ConfigError(f"distribution dim must be >= 1, got {self.dim}")
        if self.covariance not in COVARIANCES:
            raise ConfigError(f"gaussian covariance must be one of {COVARIANCES}, got {self.covariance!r}")
        if self.parametrization not in PARAMETRIZATIONS:
            raise ConfigError(
                f"gaussian parametrization must be one of {PARAMETRIZATIONS}, got {self.parametrization!r}"
            )

    @property
    def positive(self) -> Parametrization:
        """The map from h to sigma^2, with the floor exp(-max_logivar)."""
        floor = 0.0 if self.max_logivar is None else math.exp(-self.max_logivar)
        return Parametrization(self.parametrization, min=floor)

    @property
    def num_parameters(self) -> int:
        return self.dim + (1 if self.covariance == "spherical" else self.dim)

    @property
    def is_spherical(self) -> bool:
        return self.spherical

    def _mu(self, raw: tf.Tensor) -> tf.Tensor:
        return normalize(raw) if self.spherical else raw

    def unpack(self, parameters: Any) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """(mu (..., D), sigma^2 (..., 1 or D), log sigma^2 (..., 1 or D)).

        Args:
            parameters: Tensor of shape (..., P).
        """
        raw, hidden = self.split(parameters)
        return self._mu(raw), self.positive.positive(hidden), self.positive.log_positive(hidden)

    def variance(self, parameters: Any) -> tf.Tensor:
        """sigma^2, (..., 1) for spherical covariance or (..., D) for diagonal.

        Args:
            parameters: Tensor of shape (..., P).
        """
        return self.unpack(parameters)[1]

    def mean(self, parameters: Any) -> tf.Tensor:
        return self.unpack(parameters)[0]

    def modes(self, parameters: Any) -> tf.Tensor:
        return self.mean(parameters)

    def confidence(self, parameters: Any) -> tf.Tensor:
        """-mean_d log sigma^2_d, (...): the negative log-variance, higher when surer.

        Args:
            parameters: Tensor of shape (..., P).
        """
        return -tf.reduce_mean(self.unpack(parameters)[2], axis=-1)

    def sample(self, parameters: Any, sample_shape: tuple[int, ...] = (), seed: Any = None,
               noise: Any = None) -> tf.Tensor:
        """mu + sigma * eps with eps ~ N(0, I): (..., *sample_shape, D), differentiable in mu and sigma.

        Args:
            parameters: Tensor of shape (..., P).
            sample_shape: Samples per distribution.
            seed: A stateless seed, or None for TensorFlow's global random state.
            noise: Pre-drawn eps, broadcastable to (..., *sample_shape, D); replaces the draw.
        """
        parameters = self.check_parameters(parameters)
        shape = self.sample_batch_shape(parameters, sample_shape)
        mu, variance, _ = self.unpack(self.expand_for_samples(parameters, sample_shape))
        if noise is None:
            noise = draws.normal(shape, parameters.dtype, seed)
        return mu + tf.sqrt(variance) * tf.cast(noise, parameters.dtype)

    def log_prob(self, parameters: Any, points: Any) -> tf.Tensor:
        mu, variance, log_variance = self.unpack(parameters)
        points = tf.cast(points, mu.dtype)
        if self.spherical:
            points = normalize(points)
        squared = tf.square(points - mu) / variance
        log_det = self._sum_over_axes(log_variance)
        return -0.5 * (self.dim * math.log(2 * math.pi) + log_det + tf.reduce_sum(squared, axis=-1))

    def _sum_over_axes(self, values: tf.Tensor) -> tf.Tensor:
        """Sum over the D axes of a per-axis quantity stored as (..., 1) (spherical) or (..., D)."""
        total = tf.reduce_sum(values, axis=-1)
        return total * self.dim if self.covariance == "spherical" else total

    def log_mls(self, parameters1: Any, parameters2: Any) -> tf.Tensor:
        """PFE's mutual likelihood score, log N(mu1 - mu2; 0, sigma1^2 + sigma2^2), (...).

        -D/2 log(2 pi) - 1/2 sum_d [(mu1_d - mu2_d)^2 / (s1_d + s2_d) + log(s1_d + s2_d)].

        Args:
            parameters1: Tensor of shape (..., P).
            parameters2: Tensor of shape (..., P), broadcastable against `parameters1`.
        """
        mu1, variance1, log_variance1 = self.unpack(parameters1)
        mu2, variance2, log_variance2 = self.unpack(parameters2)
        total = variance1 + variance2
        # log(s1 + s2) from the log-variances: exact even where s1 or s2 alone underflows.
        log_total = tf.maximum(log_variance1, log_variance2) + tf.math.log1p(
            tf.exp(-tf.abs(log_variance1 - log_variance2))
        )
        squared = tf.reduce_sum(tf.square(mu1 - mu2) / total, axis=-1)
        return -0.5 * (self.dim * math.log(2 * math.pi) + squared + self._sum_over_axes(log_total))

    def prior_kl(self, parameters: Any) -> tf.Tensor:
        """KL(N(mu, sigma^2) || N(0, I)) = 1/2 (sum sigma^2 - sum log sigma^2 - D + ||mu||^2), (...).

        The true KL (the DUL paper's formula has an error; the reference code
        says so and uses this one). With `spherical`, ||mu|| = 1.

        Args:
            parameters: Tensor of shape (..., P).
        """
        mu, variance, log_variance = self.unpack(parameters)
        trace = self._sum_over_axes(variance)
        log_det = self._sum_over_axes(log_variance)
        return 0.5 * (trace - log_det - self.dim + tf.reduce_sum(tf.square(mu), axis=-1))

    def pdf_product(self, parameters1: Any, parameters2: Any) -> tuple[Distribution, tf.Tensor]:
        """N(mu1, s1) N(mu2, s2) normalized: N((s2 mu1 + s1 mu2) / (s1 + s2), s1 s2 / (s1 + s2)).

        Returns this distribution and the product's parameters, `[mu | h]` with h the
        inverse parametrization of the product variance. The product's weight
        (its integral, `log_mls`) is not part of the parameters. The product mu is
        not normalized, even with `spherical`. A product variance below the floor
        exp(-max_logivar) has no parameter that maps to it (as in the reference code).

        Args:
            parameters1: Tensor of shape (..., P).
            parameters2: Tensor of shape (..., P), broadcastable against `parameters1`.
        """
        mu1, variance1, _ = self.unpack(parameters1)
        mu2, variance2, _ = self.unpack(parameters2)
        total = variance1 + variance2
        variance = variance1 / total * variance2
        mu = variance2 / total * mu1 + variance1 / total * mu2
        hidden = self.positive.ipositive(variance)
        mu, hidden = broadcast_pair(mu, hidden)
        return self, tf.concat([mu, hidden], axis=-1)

