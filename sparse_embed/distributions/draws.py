"""Random draws that are stateless when a seed is given (reproducible in eager mode and in graphs)."""

from __future__ import annotations

from typing import Any

from sparse_embed.distributions._tf import tf


def fold_seed(seed: Any, salt: int) -> Any:
    """A new stateless seed derived from `seed` and `salt` (None stays None).

    Args:
        seed: A stateless seed (shape [2] integers) or None.
        salt: Distinguishes the draws made from one seed.
    """
    if seed is None:
        return None
    return tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), salt)


def normal(shape: Any, dtype: Any, seed: Any = None) -> tf.Tensor:
    """Standard normal draws.

    Args:
        shape: The output shape.
        dtype: A float dtype.
        seed: A stateless seed, or None for TensorFlow's global random state.
    """
    if seed is None:
        return tf.random.normal(shape, dtype=dtype)
    return tf.random.stateless_normal(shape, seed, dtype=dtype)


def uniform(shape: Any, dtype: Any, seed: Any = None) -> tf.Tensor:
    """Uniform draws in [0, 1).

    Args:
        shape: The output shape.
        dtype: A float dtype.
        seed: A stateless seed, or None for TensorFlow's global random state.
    """
    if seed is None:
        return tf.random.uniform(shape, dtype=dtype)
    return tf.random.stateless_uniform(shape, seed, dtype=dtype)


def symmetric_beta(shape: Any, concentration: float, dtype: Any, seed: Any = None) -> tf.Tensor:
    """Beta(a, a) draws, as G1 / (G1 + G2) with G1, G2 ~ Gamma(a).

    Args:
        shape: The output shape.
        concentration: a > 0.
        dtype: A float dtype.
        seed: A stateless seed, or None for TensorFlow's global random state.
    """
    if seed is None:
        g1 = tf.random.gamma(shape, concentration, dtype=dtype)
        g2 = tf.random.gamma(shape, concentration, dtype=dtype)
    else:
        g1 = tf.random.stateless_gamma(shape, fold_seed(seed, 1), concentration, dtype=dtype)
        g2 = tf.random.stateless_gamma(shape, fold_seed(seed, 2), concentration, dtype=dtype)
    return g1 / (g1 + g2)
