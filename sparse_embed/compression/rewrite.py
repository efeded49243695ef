"""PReLU rewritten, for the integer TFLite modes, as ops that XNNPACK runs in int8.

The int8 PRELU op has no XNNPACK kernel: each one falls back to the reference
kernel and splits the delegated graph, which made int8 MobileFaceNet (33
PReLUs) 6x slower than fp32 (24 ms against 4 ms on one thread). Each PReLU
`f(x) = x if x > 0 else alpha * x` (one slope per channel) is replaced, for
the int8 conversions only, by an identity that is exact in float and that
the converter turns into faster int8 ops. The first form whose condition
holds for the layer's slopes is used (`PRELU_FORMS`):

- `leaky`, every slope equal (an untrained layer): `leaky_relu(x, alpha)`,
  one LEAKY_RELU op, delegated.
- `maximum`, every slope in [0, 1] (what trained face models learn):
  `maximum(x, alpha * x)`, as `alpha * x <= x` exactly when `x >= 0`.
  MUL is delegated; MAXIMUM is not, but its builtin int8 kernel is a plain
  element-wise loop, and the two ops measured faster than the fully
  delegated form below (MobileFaceNet 112x112, 1 thread: 3.1-3.5 ms against
  4.2-4.7 ms).
- `leaky_residual`, any slopes: with `b` the mean slope clipped to
  [0.01, 0.99] and `l = leaky_relu(x, b)`, `l + (b - alpha) / (1 - b) * (l - x)`
  (for `x < 0`, `l - x = (b - 1) x`). LEAKY_RELU, SUB, MUL and ADD, all delegated.

The float export keeps PRELU, which XNNPACK runs in float. A
quantization-aware model is not rewritten (`rewrite_prelu` returns it as
is): its PReLU carries one output fake-quant and the new intermediate tensor
(`alpha * x`) would have no trained range.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sparse_embed.compression import is_quantized
from sparse_embed.keras import keras, tf

# Bounds of the leaky slope of `leaky_residual`: 1 would divide by zero, and
# XNNPACK's int8 LEAKY_RELU is only taken with a positive slope.
_RESIDUAL_SLOPE_RANGE = (0.01, 0.99)


@dataclass(frozen=True)
class PReLUForm:
    """One float-exact way to write a PReLU.

    Attributes:
        name: The form's name (`IntegerPReLU.form`).
        applies: slopes -> whether the identity holds for them.
        compute: (x, slopes) -> the PReLU of x, slopes broadcast against x.
    """

    name: str
    applies: Callable[[np.ndarray], bool] = field(repr=False)
    compute: Callable[[tf.Tensor, np.ndarray], tf.Tensor] = field(repr=False)


def _leaky(x: tf.Tensor, alpha: np.ndarray) -> tf.Tensor:
    return tf.nn.leaky_relu(x, float(alpha.flat[0]))


def _maximum(x: tf.Tensor, alpha: np.ndarray) -> tf.Tensor:
    return tf.maximum(x, tf.constant(alpha, x.dtype) * x)


def _leaky_residual(x: tf.Tensor, alpha: np.ndarray) -> tf.Tensor:
    b = float(np.clip(alpha.mean(), *_RESIDUAL_SLOPE_RANGE))
    leaky = tf.nn.leaky_relu(x, b)
    return leaky + tf.constant((b - alpha) / (1 - b), x.dtype) * (leaky - x)


# In order of preference: the first that applies is used.
PRELU_FORMS: tuple[PReLUForm, ...] = (
    PReLUForm("leaky", lambda a: bool(np.all(a == a.flat[0])), _leaky),
    PReLUForm("maximum", lambda a: bool(np.all((a >= 0) & (a <= 1))), _maximum),
    PReLUForm("leaky_residual", lambda a: True, _leaky_residual),
)


def prelu_form(alpha: np.ndarray) -> PReLUForm:
    """The first form of `PRELU_FORMS` that is exact for these slopes.

    Args:
        alpha: A PReLU's slopes.
    """
    return next(form for form in PRELU_FORMS if form.applies(alpha))


@keras.utils.register_keras_serializable(package="sparse_embed")
class IntegerPReLU(keras.layers.Layer):
    """A PReLU with fixed slopes, computed by the first exact form of `PRELU_FORMS`.

    Args:
        alpha: The slopes, shaped as a PReLU layer's `alpha` (broadcast against the input
            without its batch axis).
        **kwargs: Layer arguments (name, dtype).
    """

    def __init__(self, alpha: np.ndarray | list, **kwargs) -> None:
        super().__init__(**kwargs)
        self.alpha = np.asarray(alpha, np.float32)
        if self.alpha.size == 0:
            raise ValueError(f"alpha must hold at least one slope, got shape {self.alpha.shape}")
        self.form = prelu_form(self.alpha)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        """The PReLU of `inputs`."""
        return self.form.compute(inputs, self.alpha)

    def get_config(self) -> dict:
        """Layer config: the slopes as nested lists."""
        return {**super().get_config(), "alpha": self.alpha.tolist()}


def rewrite_prelu(model: keras.Model) -> keras.Model:
    """The model with every PReLU layer replaced by an `IntegerPReLU` of its current slopes.

    The other layers are shared with `model` (same weights, no copy), so the
    result computes the same function and is meant to be converted at once.

    Args:
        model: A functional float backbone (pruning wrappers stripped).

    Returns:
        `model` itself when it has no PReLU or is quantization-aware, otherwise a new functional model.
    """
    if is_quantized(model) or not any(isinstance(layer, keras.layers.PReLU) for layer in model.layers):
        return model

    def replace(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, keras.layers.PReLU):
            return IntegerPReLU(layer.get_weights()[0], name=layer.name)
        return layer

    return keras.models.clone_model(model, clone_function=replace)
