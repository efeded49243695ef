"""von Mises-Fisher embeddings (SCF, vMF-FL, vMF-loss): a direction and a concentration on the sphere."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from sparse_embed.distributions import draws
from sparse_embed.distributions._tf import tf
from sparse_embed.distributions.base import (
    DISTRIBUTIONS,
    Distribution,
    broadcast_pair,
    normalize,
    safe_norm,
)
from sparse_embed.distributions.parametrization import PARAMETRIZATIONS, Parametrization
from sparse_embed.distributions.vmf_normalizer import (
    log_unit_sphere_area,
    log_vmf_normalizer,
    vmf_mean_resultant_length,
)
from sparse_embed.errors import ConfigError

CONCENTRATIONS = ("separate", "norm")

# Proposals drawn per round of Wood's rejection sampler (most samples accept in the first).
PROPOSALS_PER_ROUND = 4
# Rounds before giving up (a sample never accepted would be mu itself). The acceptance rate per
# proposal, measured for D in [2, 2048] and kappa in [1e-3, 1e4], is above 0.65: 0.35^256 never happens.
MAX_ROUNDS = 64
# Gauss-Legendre nodes of the integral behind the kappa-gradient of a sample.
COSINE_GRADIENT_NODES = 96


@DISTRIBUTIONS.register("vmf")
@dataclass(frozen=True)
class VonMisesFisher(Distribution):
    """vMF(mu, kappa) on S^{D-1}, density C_D(kappa) exp(kappa mu.x).

    `kappa="separate"`: parameters `[m (D) | h (1)]`, mu = m/||m|| and
    1/kappa = parametrization(h) + exp(-max_logk), so kappa <= exp(max_logk).
    `kappa="norm"` (vMF-loss): parameters `[x (D)]`, mu = x/||x||, kappa = ||x||.

    Args:
        dim: D, the embedding dimension (>= 2).
        kappa: "separate" or "norm", where the concentration comes from.
        parametrization: How h maps to 1/kappa ("separate" only): "invlin" or "exp".
        max_logk: The largest log concentration ("separate" only; None: no bound).
    """

    dim: int
    kappa: str = "separate"
    parametrization: str = "invlin"
    max_logk: float | None = 10.0

    def __post_init__(self) -> None:
        if self.dim < 2:
            raise ConfigError(f"vmf dim must be >= 2, got {self.dim}")
        if self.kappa not in CONCENTRATIONS:
            raise ConfigError(f"vmf kappa must be one of {CONCENTRATIONS}, got {self.kappa!r}")
        if self.parametrization not in PARAMETRIZATIONS:
            raise ConfigError(
                f"vmf parametrization must be one of {PARAMETRIZATIONS}, got {self.parametrization!r}"
            )

    @property
    def positive(self) -> Parametrization:
        """The map from h to 1/kappa, with the floor exp(-max_logk) ("separate" only)."""
        floor = 0.0 if self.kappa != "separate" or self.max_logk is None else math.exp(-self.max_logk)
        return Parametrization(self.parametrization, min=floor)

    @property
    def num_parameters(self) -> int:
        return self.dim + (1 if self.kappa == "separate" else 0)

    @property
    def is_spherical(self) -> bool:
        return True

    def unpack(self, parameters: Any) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """(mu (..., D), kappa (..., 1), log kappa (..., 1)).

        Args:
            parameters: Tensor of shape (..., P).
        """
        raw, hidden = self.split(parameters)
        if self.kappa == "norm":
            kappa = safe_norm(raw, keepdims=True)
            return normalize(raw), kappa, tf.math.log(kappa)
        return normalize(raw), 1 / self.positive.positive(hidden), -self.positive.log_positive(hidden)

    def concentration(self, parameters: Any) -> tf.Tensor:
        """kappa, (...).

        Args:
            parameters: Tensor of shape (..., P).
        """
        return self.unpack(parameters)[1][..., 0]

    def mean(self, parameters: Any) -> tf.Tensor:
        """E[x] = A_D(kappa) mu, shorter than 1 (I_{D/2} / I_{D/2-1}).

        Args:
            parameters: Tensor of shape (..., P).
        """
        mu, kappa, _ = self.unpack(parameters)
        return vmf_mean_resultant_length(self.dim, kappa) * mu

    def modes(self, parameters: Any) -> tf.Tensor:
        return self.unpack(parameters)[0]

    def confidence(self, parameters: Any) -> tf.Tensor:
        """log kappa, (...).

        Args:
            parameters: Tensor of shape (..., P).
        """
        return self.unpack(parameters)[2][..., 0]

    def log_prob(self, parameters: Any, points: Any) -> tf.Tensor:
        """log C_D(kappa) + kappa mu.x / ||x||, (...).

        Args:
            parameters: Tensor of shape (..., P).
            points: Tensor of shape (..., D), normalized before use.
        """
        mu, kappa, _ = self.unpack(parameters)
        points = normalize(tf.cast(points, mu.dtype))
        kappa = kappa[..., 0]
        return log_vmf_normalizer(self.dim, kappa) + kappa * tf.reduce_sum(mu * points, axis=-1)

    def log_mls(self, parameters1: Any, parameters2: Any) -> tf.Tensor:
        """SCF's score, log C(kappa1) + log C(kappa2) - log C(||kappa1 mu1 + kappa2 mu2||), (...).

        Args:
            parameters1: Tensor of shape (..., P).
            parameters2: Tensor of shape (..., P), broadcastable against `parameters1`.
        """
        mu1, kappa1, _ = self.unpack(parameters1)
        mu2, kappa2, _ = self.unpack(parameters2)
        joint = safe_norm(kappa1 * mu1 + kappa2 * mu2)
        return (
            log_vmf_normalizer(self.dim, kappa1[..., 0])
            + log_vmf_normalizer(self.dim, kappa2[..., 0])
            - log_vmf_normalizer(self.dim, joint)
        )

    def prior_kl(self, parameters: Any) -> tf.Tensor:
        """KL(vMF(mu, kappa) || uniform on S^{D-1}) = kappa A_D(kappa) + log C_D(kappa) + log |S^{D-1}|.

        The reference code's `prior_kld` is kappa + log C(kappa) - log C(1e-6)
        (its docstring says it is not a KL); this is the KL itself, >= 0 and 0
        only at kappa = 0.

        Args:
            parameters: Tensor of shape (..., P).
        """
        kappa = self.unpack(parameters)[1][..., 0]
        return (
            kappa * vmf_mean_resultant_length(self.dim, kappa)
            + log_vmf_normalizer(self.dim, kappa)
            + log_unit_sphere_area(self.dim)
        )

    def pdf_product(self, parameters1: Any, parameters2: Any) -> tuple[Distribution, tf.Tensor]:
        """vMF(mu1, k1) vMF(mu2, k2) normalized: vMF of kappa mu = k1 mu1 + k2 mu2.

        Returns this distribution and the product's parameters in this layout;
        its weight (`log_mls`) is not part of them. With "separate", a product
        kappa above exp(max_logk) has no parameter that maps to it (as in the
        reference code).

        Args:
            parameters1: Tensor of shape (..., P).
            parameters2: Tensor of shape (..., P), broadcastable against `parameters1`.
        """
        mu1, kappa1, _ = self.unpack(parameters1)
        mu2, kappa2, _ = self.unpack(parameters2)
        joint = kappa1 * mu1 + kappa2 * mu2
        if self.kappa == "norm":
            return self, joint
        kappa = safe_norm(joint, keepdims=True)
        mu, hidden = broadcast_pair(normalize(joint), self.positive.ipositive(1 / kappa))
        return self, tf.concat([mu, hidden], axis=-1)

    def sample(self, parameters: Any, sample_shape: tuple[int, ...] = (), seed: Any = None,
               noise: Any = None) -> tf.Tensor:
        """Samples on the sphere, (..., *sample_shape, D), by Wood's (1994) algorithm.

        The cosine w = mu.x is drawn by rejection (exactly, by the inverse CDF,
        for D = 3); x = w mu + sqrt(1 - w^2) v with v uniform on the tangent
        sphere, placed by the Householder reflection that maps e_1 to mu.
        Gradients reach mu through the reflection and kappa through w: for
        D = 3 by the inverse CDF, otherwise by implicit reparametrization
        (Figurnov et al. 2018), dw/dkappa = -(dF/dkappa)(w) / p(w) with F the CDF
        of w, integrated by Gauss-Legendre quadrature. (The reference code, after
        the s-vae code, differentiates w through the accepted Beta draw instead,
        which leaves out the rejection step's dependence on kappa: its kappa
        gradient is biased, by 8% at D = 8, kappa = 3.)

        Args:
            parameters: Tensor of shape (..., P).
            sample_shape: Samples per distribution.
            seed: A stateless seed, or None for TensorFlow's global random state.
            noise: Not supported (the draw is a rejection loop); scorers take pre-drawn samples.

        Raises:
            ValueError: If `noise` is given.
        """
        if noise is not None:
            raise ValueError("vmf sampling takes no pre-drawn noise; pass samples to the scorer instead")
        parameters = self.check_parameters(parameters)
        shape = self.sample_batch_shape(parameters, sample_shape)
        mu, kappa, _ = self.unpack(self.expand_for_samples(parameters, sample_shape))
        dtype = parameters.dtype
        cosine_shape = tf.concat([shape[:-1], [1]], 0)
        kappa = tf.broadcast_to(kappa, cosine_shape)
        w, one_minus_w = self._sample_cosine(tf.cast(kappa, tf.float64), draws.fold_seed(seed, 11))
        # sqrt(1 - w^2) in float64 from 1 - w (exact near w = 1), floored so that its gradient stays finite.
        radius = tf.cast(tf.sqrt(tf.maximum(one_minus_w * (2 - one_minus_w), 1e-24)), dtype)
        w = tf.cast(w, dtype)
        tangent = draws.normal(tf.concat([shape[:-1], [self.dim - 1]], 0), dtype, draws.fold_seed(seed, 12))
        tangent = normalize(tangent)
        x = tf.concat([w, radius * tangent], axis=-1)
        mu = tf.broadcast_to(mu, shape)
        e1 = tf.one_hot(0, self.dim, dtype=dtype)
        # u = (e1 - mu)/||e1 - mu||; when mu = e1 the reflection is the identity (u = 0).
        u = e1 - mu
        u_norm = safe_norm(u, keepdims=True)
        u = u / tf.maximum(u_norm, 1e-7)
        return x - 2 * tf.reduce_sum(x * u, axis=-1, keepdims=True) * u

    def _sample_cosine(self, kappa: tf.Tensor, seed: Any) -> tuple[tf.Tensor, tf.Tensor]:
        """(w, 1 - w) for w = mu.x of vMF samples (float64, the shape of kappa), differentiable in kappa."""
        if self.dim == 3:
            # Inverse CDF: w = 1 + log(u + (1 - u) exp(-2 kappa)) / kappa.
            u = draws.uniform(tf.shape(kappa), tf.float64, seed)
            u = tf.clip_by_value(u, 1e-300, 1.0)
            log_mix = tf.reduce_logsumexp(tf.stack([tf.math.log(u), tf.math.log1p(-u) - 2 * kappa]), axis=0)
            safe = tf.maximum(kappa, 1e-300)
            # Below ~1e-8 the formula cancels; w = 2u - 1 is the uniform limit.
            one_minus_w = tf.where(kappa < 1e-8, 2 - 2 * u, -log_mix / safe)
            return 1 - one_minus_w, one_minus_w
        m1 = float(self.dim - 1)
        fixed = tf.stop_gradient(kappa)
        # Wood's b = (-2k + sqrt(4k^2 + (m-1)^2)) / (m-1), written without the cancellation at large k.
        b = m1 / (2 * fixed + tf.sqrt(4 * tf.square(fixed) + m1**2))
        epsilon = self._accepted_beta(fixed, b, seed)
        # 1 - w = 2 b eps / (1 - (1 - b) eps): no cancellation when w is close to 1.
        one_minus_w = 2 * b * epsilon / (1 - (1 - b) * epsilon)
        slope = self._cosine_slope(fixed, one_minus_w)
        # The value of w, the gradient of the implicit reparametrization.
        one_minus_w -= (kappa - fixed) * slope
        return 1 - one_minus_w, one_minus_w

    def _cosine_slope(self, kappa: tf.Tensor, one_minus_w: tf.Tensor) -> tf.Tensor:
        """dw/dkappa at a fixed CDF value: integral_w^1 (t - A(kappa)) p(t) / p(w) dt (float64, no gradient).

        The density of t = mu.x is proportional to exp(kappa t) (1 - t^2)^((D-3)/2). With
        1 - t = (1 - w) v^2 the integrand is smooth in v on [0, 1] (the endpoint factor
        (1 - t)^((D-3)/2) becomes v^(D-2)), which Gauss-Legendre integrates well.
        """
        nodes, weights = np.polynomial.legendre.leggauss(COSINE_GRADIENT_NODES)
        v = tf.constant((nodes + 1) / 2, tf.float64)
        weights = tf.constant(weights / 2, tf.float64)
        mean = vmf_mean_resultant_length(self.dim, kappa)
        # Floors keep the logs finite for a draw at exactly w = 1 or w = -1.
        one_minus_w = tf.clip_by_value(one_minus_w, 1e-300, 2 - 1e-16)
        s = one_minus_w * tf.square(v)
        log_ratio = kappa * (one_minus_w - s) + (self.dim - 3) / 2 * (
            tf.math.log(s * (2 - s)) - tf.math.log(one_minus_w * (2 - one_minus_w))
        )
        integrand = (1 - s - mean) * tf.exp(log_ratio) * 2 * one_minus_w * v
        slope = tf.reduce_sum(integrand * weights, axis=-1, keepdims=True)
        return tf.where(tf.math.is_finite(slope), slope, tf.zeros_like(slope))

    def _accepted_beta(self, kappa: tf.Tensor, b: tf.Tensor, seed: Any) -> tf.Tensor:
        """The Beta((D-1)/2, (D-1)/2) draw of Wood's sampler that passes its acceptance test."""
        m1 = float(self.dim - 1)
        x0 = (1 - b) / (1 + b)
        c = kappa * x0 + m1 * tf.math.log(1 - tf.square(x0))
        shape = tf.concat([[PROPOSALS_PER_ROUND], tf.shape(kappa)], 0)

        def body(round_: tf.Tensor, accepted: tf.Tensor, done: tf.Tensor) -> tuple[Any, ...]:
            round_seed = draws.fold_seed(seed, round_)
            epsilon = draws.symmetric_beta(shape, m1 / 2, tf.float64, draws.fold_seed(round_seed, 1))
            u = draws.uniform(shape, tf.float64, draws.fold_seed(round_seed, 2))
            w = (1 - (1 + b) * epsilon) / (1 - (1 - b) * epsilon)
            ok = kappa * w + m1 * tf.math.log(1 - x0 * w) - c >= tf.math.log(u)
            # The first accepted proposal of this round, for the samples still waiting.
            first = tf.argmax(tf.cast(ok, tf.int32), axis=0)
            pick = tf.one_hot(first, PROPOSALS_PER_ROUND, axis=0, dtype=tf.float64)
            chosen = tf.reduce_sum(epsilon * pick, axis=0)
            any_ok = tf.reduce_any(ok, axis=0)
            take = tf.logical_and(any_ok, tf.logical_not(done))
            return round_ + 1, tf.where(take, chosen, accepted), tf.logical_or(done, any_ok)

        def cond(round_: tf.Tensor, accepted: tf.Tensor, done: tf.Tensor) -> tf.Tensor:
            return tf.logical_and(round_ < MAX_ROUNDS, tf.logical_not(tf.reduce_all(done)))

        start = (tf.constant(0), tf.zeros_like(kappa), tf.zeros_like(kappa, dtype=tf.bool))
        _, accepted, _ = tf.while_loop(cond, body, start)
        return accepted
