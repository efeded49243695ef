"""Landmark regression losses (`LANDMARK_LOSSES`): wing and L1.

Wing loss (Feng et al., "Wing Loss for Robust Facial Landmark Localisation
with Convolutional Neural Networks", CVPR 2018), per coordinate error x:

    wing(x) = w ln(1 + |x| / eps)   if |x| < w
              |x| - C               otherwise,  C = w - w ln(1 + w / eps)

C makes the two pieces meet at |x| = w. The OpenVINO toolkit's loss of this
name compares the error with a threshold in other units than the error, so
its log branch is never taken and it trains with L1; this one is the paper's.
Errors are in pixels of the network's input crop (the normalised outputs
times the input size), the units the paper's w and eps are given in. The loss
of a batch is the mean over images and coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from sparse_embed.keras import tf
from sparse_embed.registry import Registry

Loss = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]

LANDMARK_LOSSES: Registry[Callable[..., Loss]] = Registry("landmarks loss")


@LANDMARK_LOSSES.register("wing")
def wing_loss(scale: float, width: float = 10.0, epsilon: float = 2.0) -> Loss:
    """Returns the wing loss of normalised points, measured in `scale` units.

    Args:
        scale: Multiplies the coordinates (the input side in pixels) before the loss.
        width: w, the half-width of the log region, in scaled units.
        epsilon: eps, the curvature of the log region.

    Raises:
        ValueError: If `width` or `epsilon` is not positive.
    """
    if width <= 0 or epsilon <= 0:
        raise ValueError(f"wing loss needs width > 0 and epsilon > 0, got {width}, {epsilon}")
    c = width - width * math.log1p(width / epsilon)

    def loss(true: tf.Tensor, predicted: tf.Tensor) -> tf.Tensor:
        x = tf.abs(tf.cast(predicted, tf.float32) - tf.cast(true, tf.float32)) * scale
        return tf.reduce_mean(tf.where(x < width, width * tf.math.log1p(x / epsilon), x - c))

    return loss


@LANDMARK_LOSSES.register("l1")
def l1_loss(scale: float, width: float = 10.0, epsilon: float = 2.0) -> Loss:
    """Returns the mean absolute error of normalised points, in `scale` units.

    Args:
        scale: Multiplies the coordinates (the input side in pixels) before the loss.
        width: Not used (the wing loss's; the loss registry has one signature).
        epsilon: Not used.
    """
    del width, epsilon

    def loss(true: tf.Tensor, predicted: tf.Tensor) -> tf.Tensor:
        return tf.reduce_mean(tf.abs(tf.cast(predicted, tf.float32) - tf.cast(true, tf.float32))) * scale

    return loss
