"""What every backbone family shares: argument checks, channel rounding, PReLU.

Every builder in `MODELS` takes the same arguments (see `sparse_embed.models`)
and checks them here first, before it creates a layer, so a bad config fails
at once with a `ConfigError` that names the field and its valid values.
"""

from __future__ import annotations

import math
import numbers

from sparse_embed.errors import ConfigError
from sparse_embed.keras import keras, tf
from sparse_embed.models.embedding import check_embedding_args

# Initial PReLU slope of He et al. (2015) and of the reference face-recognition
# implementations (MobileFaceNet, InsightFace, SphereFace's Caffe PReLU);
# Keras' default of 0 would start out as a plain ReLU.
PRELU_INIT = 0.25
CHANNEL_DIVISOR = 8

# The backbones with squeeze-and-excitation blocks (`model.se`); the others
# reject se=True with this list in the message.
SE_BACKBONES = ("mobilenet_v2", "mobilenet_v2_tiny")


def scale_channels(channels: float, width: float = 1.0) -> int:
    """Scales a channel count by `width`, rounded to a multiple of 8 (at least 8).

    As in MobileNetV2: round to the nearest multiple, but never more than 10%
    below the exact value, so a small width does not lose a whole group.

    Args:
        channels: Channel count at width 1.
        width: Width multiplier.
    """
    exact = channels * width
    rounded = int(exact + CHANNEL_DIVISOR / 2) // CHANNEL_DIVISOR * CHANNEL_DIVISOR
    rounded = max(CHANNEL_DIVISOR, rounded)
    if rounded < 0.9 * exact:
        rounded += CHANNEL_DIVISOR
    return rounded


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_input_shape(name: str, input_size: int, input_width: int, min_size: int = 1) -> tuple[int, int]:
    """Checks the input resolution a config asks for and returns it as (height, width).

    Args:
        name: The model's registered name, for the message.
        input_size: Input height (and width when `input_width` is 0).
        input_width: Input width; 0 means square.
        min_size: Smallest height and width the network takes (its total stride).

    Returns:
        (height, width) as Python ints.

    Raises:
        ConfigError: If either is not an integer or is below `min_size`.
    """
    if not _is_int(input_size) or input_size < min_size:
        raise ConfigError(f"model.input_size must be an integer >= {min_size} (the total stride of "
                          f"{name}), got {input_size!r}")
    if not _is_int(input_width) or (input_width != 0 and input_width < min_size):
        raise ConfigError(f"model.input_width must be 0 (square) or an integer >= {min_size} (the "
                          f"total stride of {name}), got {input_width!r}")
    return int(input_size), int(input_width or input_size)


def check_width(width: float) -> float:
    """Checks a channel width multiplier.

    Args:
        width: The multiplier, a finite number > 0.

    Raises:
        ConfigError: If it is not.
    """
    if isinstance(width, bool) or not (isinstance(width, numbers.Real) and math.isfinite(width)
                                       and width > 0):
        raise ConfigError(f"model.width must be a finite number > 0, got {width!r}")
    return float(width)


def check_no_se(name: str, se: bool) -> None:
    """Rejects se=True for a backbone without squeeze-and-excitation blocks.

    Args:
        name: The model's registered name, for the message.
        se: The config's `model.se`.

    Raises:
        ConfigError: If `se` is true.
    """
    if se:
        raise ConfigError(f"model.se=true is not supported by {name}, which has no squeeze-and-"
                          f"excitation blocks; set model.se=false, or use one of {', '.join(SE_BACKBONES)}")


def check_common(embedding_size: int, final_activation: str, width: float, dropout: float) -> None:
    """Checks the arguments whose meaning does not depend on the family.

    Args:
        embedding_size: Embedding dimension d, a positive integer.
        final_activation: A name in `sparse_embed.models.embedding.ACTIVATIONS`.
        width: Channel width multiplier.
        dropout: Dropout rate before the embedding layer.

    Raises:
        ConfigError: If one is out of range or unknown.
    """
    check_embedding_args(embedding_size, final_activation, dropout)
    check_width(width)


def prelu(x: tf.Tensor, name: str) -> tf.Tensor:
    """Applies a PReLU with one learned slope per channel, initialised at `PRELU_INIT`.

    The slope is shared over the spatial axes, as in the papers, so the
    parameter count does not depend on the input size.

    Args:
        x: A [B, H, W, C] feature map.
        name: Layer name.
    """
    return keras.layers.PReLU(alpha_initializer=keras.initializers.Constant(PRELU_INIT),
                              shared_axes=[1, 2], name=name)(x)
