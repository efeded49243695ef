"""Maps from real numbers to positive ones: how an extra-head output becomes a variance or 1/kappa.

The formulas are those of the probabilistic-embeddings reference code
(Karpukhin et al. 2022, `layers/parametrization.py`), including how the
minimum enters the logarithm, so that a parameter vector means the same thing
here and there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sparse_embed.distributions._tf import tf
from sparse_embed.errors import ConfigError

PARAMETRIZATIONS = ("invlin", "exp")


@dataclass(frozen=True)
class Parametrization:
    """A smooth map from R to (min, inf) with its logarithm and inverse.

    `invlin(h)` is `1 / (1 - h)` for h < 0 and `1 + h` for h >= 0: linear
    growth keeps large variances from exploding the way `exp` does. Both add
    `min` after the map, so the result never falls below it.

    Args:
        type: "invlin" or "exp".
        min: The smallest value the map reaches (its infimum), >= 0.
    """

    type: str = "invlin"
    min: float = 0.0

    def __post_init__(self) -> None:
        if self.type not in PARAMETRIZATIONS:
            raise ConfigError(f"parametrization must be one of {PARAMETRIZATIONS}, got {self.type!r}")
        if not self.min >= 0:
            raise ConfigError(f"parametrization min must be >= 0, got {self.min}")

    def positive(self, hidden: Any) -> tf.Tensor:
        """Maps `hidden` to values > `min`.

        Args:
            hidden: Real tensor of any shape.
        """
        hidden = tf.convert_to_tensor(hidden)
        if self.type == "exp":
            result = tf.exp(hidden)
        else:
            # The clip keeps the unused branch finite, so its gradient is not NaN at h = 1.
            result = tf.where(hidden < 0, 1 / (1 - tf.minimum(hidden, 0)), 1 + hidden)
        return result + self.min if self.min > 0 else result

    def log_positive(self, hidden: Any) -> tf.Tensor:
        """The logarithm of `positive(hidden)`, computed without forming it.

        Args:
            hidden: Real tensor of any shape.
        """
        hidden = tf.convert_to_tensor(hidden)
        if self.type == "exp":
            if self.min == 0:
                return hidden
            log_min = tf.constant(math.log(self.min), hidden.dtype)
            # logaddexp(h, log min), stable for both signs.
            high = tf.maximum(hidden, log_min)
            return high + tf.math.log1p(tf.exp(-tf.abs(hidden - log_min)))
        negative = hidden < 0
        one_minus = 1 - tf.minimum(hidden, 0)
        # For h < 0: log(1/(1-h) + min) = -log(1-h) + log(1 + min (1-h)).
        low = -tf.math.log(one_minus)
        if self.min > 0:
            low += tf.math.log(1 + self.min * one_minus)
        high = tf.math.log(1 + tf.maximum(hidden, 0) + self.min)
        return tf.where(negative, low, high)

    def ipositive(self, value: Any) -> tf.Tensor:
        """The inverse of `positive`: the hidden value that maps to `value` (> `min`).

        Args:
            value: Tensor of values greater than `min`.
        """
        value = tf.convert_to_tensor(value)
        shifted = value - self.min if self.min > 0 else value
        if self.type == "exp":
            return tf.math.log(shifted)
        # 1 - 1/u for u < 1 and u - 1 otherwise; the guard keeps 1/u finite in the unused branch.
        small = shifted < 1
        safe = tf.where(small, shifted, tf.ones_like(shifted))
        return tf.where(small, 1 - 1 / safe, shifted - 1)
