"""PReLU rewritten, for the integer TFLite modes, as ops that XNNPACK runs in int8.

How export uses it: docs/compression.md (Export with a parity gate).

The int8 PRELU op has no XNNPACK kernel: each one falls back to the reference
kernel and splits the delegated graph, which costs an int8 PReLU network such
as MobileFaceNet more than its int8 convolutions save. Each PReLU
`f(x) = x if x > 0 else alpha * x` (one slope per channel) is replaced, for
the int8 conversions only, by an identity that is exact in float and that
the converter turns into int8 ops XNNPACK runs. The first form of
`PRELU_FORMS` that holds for the layer's slopes and fits the model is used:

- `leaky`, every slope equal (an untrained layer): `leaky_relu(x, alpha)`,
  one LEAKY_RELU op. Calibrated models only.
- `leaky_residual`, any slopes: with `b` the mean slope clipped to
  [0.01, 0.99] and `l = leaky_relu(x, b)`, `l + (b - alpha) / (1 - b) * (l - x)`
  (for `x < 0`, `l - x = (b - 1) x`). LEAKY_RELU, SUB, MUL and ADD, the whole
  graph one XNNPACK partition. Calibrated models only: its intermediate
  tensors get their ranges from the representative set.
- `maximum`, every slope at most 1: `maximum(x, alpha * x)`, as
  `alpha * x <= x` exactly when `x >= 0`. Quantization-aware models only.
- `maximum_minimum`, any slopes: with `a = min(alpha, 1)` and `c = max(alpha, 1) - 1`,
  `maximum(x, a * x) + minimum(c * x, 0)`; the second term is zero in the channels
  of slope at most 1 and adds the rest of `alpha * x` below zero in the others.
  Quantization-aware models only.

Calibrated models do not use `maximum`, though its builtin int8 kernel is fast
(MAXIMUM is not delegated, but the kernel is a plain loop): it takes one scale
for its inputs and output, so x's wider range quantizes the output coarsely
and the file strays further from the Keras model than with `leaky_residual`.

The float export keeps PRELU, which XNNPACK runs in float.

A quantization-aware model's PReLU carries one output fake-quant (TF-MOT's
wrapper with `OutputQuantizeConfig`, quantize.py), whose trained range the
converter turns into the int8 scale of the PRELU output, and a conversion
without a representative set has no range for new tensors. `maximum` has one,
`alpha * x`, and takes the output's range: where `alpha * x` is above it,
`x >= alpha * x` is too and the output is clamped to the same top anyway,
and below zero `alpha * x` is the output. It converts as the fake-quantized
model computes, and is used for equal slopes too: a LEAKY_RELU between the
fake-quant of its input and of its output converts to an int8 model that does
not match the Keras one. Fake-quantization `q` is monotone, so
`q(max(x, q(a x)))` is `max(q(x), q(a x))`, the quantized PReLU itself: the
rewrite is exact to the bit. `maximum_minimum` gives its three intermediate
tensors the output's range too (each lies in it wherever the output is not
clamped) and is exact in the channels of slope at most 1; in the others
(training pushes a few slopes above 1) the output is the sum of two quantized
terms, within one quantization step of the PReLU's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sparse_embed.keras import keras, tf

# Bounds of the leaky slope of `leaky_residual`: 1 would divide by zero, and an int8
# LEAKY_RELU of slope 0 measured outside the XNNPACK graph.
_RESIDUAL_SLOPE_RANGE = (0.01, 0.99)


# The fake-quant of a quantization-aware PReLU's output: (min, max, num_bits), or None.
OutputRange = tuple[float, float, int] | None


@dataclass(frozen=True)
class PReLUForm:
    """One float-exact way to write a PReLU.

    Attributes:
        name: The form's name (`IntegerPReLU.form`).
        applies: slopes -> whether the identity holds for them.
        compute: (x, slopes, quantize) -> the PReLU of x, slopes broadcast against x;
            `quantize` fake-quantizes a new intermediate tensor (the identity without a range).
        calibrated: Used in a float model calibrated on a representative set.
        quantization_aware: Used in a quantization-aware model, its intermediate tensor
            taking the output's trained range.
    """

    name: str
    applies: Callable[[np.ndarray], bool] = field(repr=False)
    compute: Callable[[tf.Tensor, np.ndarray, Callable[[tf.Tensor], tf.Tensor]], tf.Tensor] = field(
        repr=False)
    calibrated: bool
    quantization_aware: bool


def _leaky(x: tf.Tensor, alpha: np.ndarray, quantize: Callable[[tf.Tensor], tf.Tensor]) -> tf.Tensor:
    del quantize
    return tf.nn.leaky_relu(x, float(alpha.flat[0]))


def _maximum(x: tf.Tensor, alpha: np.ndarray, quantize: Callable[[tf.Tensor], tf.Tensor]) -> tf.Tensor:
    return tf.maximum(x, quantize(tf.constant(alpha, x.dtype) * x))


def _maximum_minimum(x: tf.Tensor, alpha: np.ndarray,
                     quantize: Callable[[tf.Tensor], tf.Tensor]) -> tf.Tensor:
    below_one = tf.constant(np.minimum(alpha, 1), x.dtype)
    excess = tf.constant(np.maximum(alpha, 1) - 1, x.dtype)
    return (quantize(tf.maximum(x, quantize(below_one * x)))
            + quantize(tf.minimum(quantize(excess * x), 0.0)))


def _leaky_residual(x: tf.Tensor, alpha: np.ndarray,
                    quantize: Callable[[tf.Tensor], tf.Tensor]) -> tf.Tensor:
    del quantize
    b = float(np.clip(alpha.mean(), *_RESIDUAL_SLOPE_RANGE))
    leaky = tf.nn.leaky_relu(x, b)
    return leaky + tf.constant((b - alpha) / (1 - b), x.dtype) * (leaky - x)


# In order of preference: the first that applies and fits the model is used.
PRELU_FORMS: tuple[PReLUForm, ...] = (
    PReLUForm("leaky", lambda a: bool(np.all(a == a.flat[0])), _leaky, True, False),
    PReLUForm("leaky_residual", lambda a: True, _leaky_residual, True, False),
    PReLUForm("maximum", lambda a: bool(np.all(a <= 1)), _maximum, False, True),
    PReLUForm("maximum_minimum", lambda a: True, _maximum_minimum, False, True),
)


def prelu_form(alpha: np.ndarray, quantized: bool = False) -> PReLUForm:
    """The first form of `PRELU_FORMS` that is exact for these slopes.

    Args:
        alpha: A PReLU's slopes.
        quantized: For a quantization-aware model (else a calibrated float one).

    Returns:
        The form (each kind of model has one that applies to any slopes).
    """
    return next(form for form in PRELU_FORMS if form.applies(alpha)
                and (form.quantization_aware if quantized else form.calibrated))


@keras.utils.register_keras_serializable(package="sparse_embed")
class IntegerPReLU(keras.layers.Layer):
    """A PReLU with fixed slopes, computed by the first exact form of `PRELU_FORMS`.

    Args:
        alpha: The slopes, shaped as a PReLU layer's `alpha` (broadcast against the input
            without its batch axis).
        output_range: (min, max, num_bits) of the output fake-quant of a quantization-aware
            PReLU, applied to the output and to the form's intermediate tensor; None for a
            float one.
        **kwargs: Layer arguments (name, dtype).
    """

    def __init__(self, alpha: np.ndarray | list, output_range: OutputRange | list = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.alpha = np.asarray(alpha, np.float32)
        if self.alpha.size == 0:
            raise ValueError(f"alpha must hold at least one slope, got shape {self.alpha.shape}")
        self.output_range = None if output_range is None else tuple(output_range)
        self.form = prelu_form(self.alpha, quantized=self.output_range is not None)

    def _quantize(self, x: tf.Tensor) -> tf.Tensor:
        if self.output_range is None:
            return x
        low, high, bits = self.output_range
        # As TF-MOT's activation quantizer at inference: asymmetric, full range.
        return tf.quantization.fake_quant_with_min_max_args(x, low, high, num_bits=int(bits),
                                                            narrow_range=False)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        """The PReLU of `inputs` (fake-quantized like the layer it replaces)."""
        return self._quantize(self.form.compute(inputs, self.alpha, self._quantize))

    def get_config(self) -> dict:
        """Layer config: the slopes as nested lists, the output range."""
        return {**super().get_config(), "alpha": self.alpha.tolist(),
                "output_range": None if self.output_range is None else list(self.output_range)}


def _replacement(layer: keras.layers.Layer) -> IntegerPReLU | None:
    """The `IntegerPReLU` for a PReLU layer or a quantization-aware one, or None to keep the layer."""
    if isinstance(layer, keras.layers.PReLU):
        return IntegerPReLU(layer.get_weights()[0], name=layer.name)
    # TF-MOT's QuantizeWrapperV2, recognised by its attributes: TF-MOT is imported in
    # quantize.py only. Its output quantizer and that quantizer's variables are private.
    inner = getattr(layer, "layer", None)
    quantizers = getattr(layer, "_output_quantizers", None)
    if not isinstance(inner, keras.layers.PReLU) or not quantizers:
        return None
    alpha = inner.get_weights()[0]
    variables = layer._output_quantizer_vars
    output_range = (float(variables["min_var"].numpy()), float(variables["max_var"].numpy()),
                    int(quantizers[0].num_bits))
    return IntegerPReLU(alpha, output_range, name=layer.name)


def rewrite_prelu(model: keras.Model) -> keras.Model:
    """The model with every PReLU layer replaced by an `IntegerPReLU` of its current slopes.

    The other layers are shared with
    `model` (same weights, no copy), so the result computes the same function
    and is meant to be converted at once.

    Args:
        model: A functional backbone, float or quantization-aware (pruning wrappers stripped).

    Returns:
        `model` itself when no layer is replaced, otherwise a new functional model.
    """
    replacements = {layer.name: r for layer in model.layers if (r := _replacement(layer)) is not None}
    if not replacements:
        return model
    return keras.models.clone_model(model, clone_function=lambda layer: replacements.get(layer.name, layer))
