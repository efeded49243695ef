"""The TFLite converter: a backbone to a `.tflite` flatbuffer in each quantization mode.

Quantization modes (`QUANTIZATIONS`):

- `fp32`: no optimisation; `fp16`: float16 weights, float compute;
- `dynamic`: int8 weights, activations quantized on the fly (no representative set);
- `int8`: full-integer ops (weights and activations int8, calibrated on a
  representative set) with float32 input and output (QUANTIZE / DEQUANTIZE at
  the two ends);
- `int8_full`: integer-only including int8 input and output, the
  "integer-arithmetic-only inference" of Jacob et al. (2018). The input is
  `round(x / scale) + zero_point` with the input tensor's quantization
  parameters, the output `(q - zero_point) * scale` with the output's
  (`sparse_embed.edge.runtime`).

The integer modes convert the model with each PReLU rewritten as an
equivalent graph of ops XNNPACK runs in int8 (`rewrite.rewrite_prelu`; the
int8 PRELU op has no XNNPACK kernel). The float modes keep PRELU.

An int8 model is checked after conversion: the converter silently keeps an op
it has no int8 kernel for in float (NEG, CUMSUM, ...), wrapped in
DEQUANTIZE / QUANTIZE, so every op's tensors are read back from the runtime
(`edge.runtime.float_ops_of`), and a float tensor anywhere but the float I/O
of `int8` names the op in a `ConfigError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sparse_embed.compression import for_export, is_quantized
from sparse_embed.compression.rewrite import rewrite_prelu
from sparse_embed.compression.serving import serving_function
from sparse_embed.edge.runtime import float_ops_of
from sparse_embed.errors import ConfigError
from sparse_embed.fileio import native_stderr_to_file
from sparse_embed.keras import keras, tf
from sparse_embed.registry import Registry


@dataclass(frozen=True)
class Quantization:
    """A TFLite conversion mode.

    Attributes:
        name: The `--quantize` value.
        min_cosine: Default parity threshold on the mean cosine to the Keras model.
        integer_ops: Every op must run on int8 / int32 tensors (checked after conversion).
        integer_io: The model's input and output are int8 too.
        representative: Needs a representative set to calibrate activation ranges.
        configure: Sets the converter's options, given the representative images (or None).
    """

    name: str
    min_cosine: float
    integer_ops: bool
    integer_io: bool
    representative: bool
    configure: Callable[[Any, np.ndarray | None], None] = field(repr=False)


QUANTIZATIONS: Registry[Quantization] = Registry("quantization")


def _register(mode: Quantization) -> None:
    QUANTIZATIONS.register(mode.name)(mode)


def _fp32(converter: Any, representative: np.ndarray | None) -> None:
    del converter, representative


def _fp16(converter: Any, representative: np.ndarray | None) -> None:
    del representative
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]


def _dynamic(converter: Any, representative: np.ndarray | None) -> None:
    del representative
    converter.optimizations = [tf.lite.Optimize.DEFAULT]


def _calibrated(converter: Any, representative: np.ndarray | None) -> None:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if representative is not None:
        def batches() -> Iterator[list[np.ndarray]]:
            for image in representative:
                yield [image[None]]

        converter.representative_dataset = batches
        # Without a representative set (a quantization-aware model: its fake-quant
        # ranges are the scales) the converter refuses this option; `float_ops_of`
        # checks the result either way.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]


def _integer_only(converter: Any, representative: np.ndarray | None) -> None:
    _calibrated(converter, representative)
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8


_register(Quantization("fp32", 0.999, False, False, False, _fp32))
_register(Quantization("fp16", 0.999, False, False, False, _fp16))
_register(Quantization("dynamic", 0.98, False, False, False, _dynamic))
_register(Quantization("int8", 0.98, True, False, True, _calibrated))
_register(Quantization("int8_full", 0.98, True, True, True, _integer_only))


def convert(model: keras.Model, quantize: str, representative: np.ndarray | None = None,
            flip_concat: bool = False) -> bytes:
    """Converts a backbone to a TFLite flatbuffer and checks the integer-only modes.

    Args:
        model: A backbone (plain, pruned or quantization-aware).
        quantize: A name in `QUANTIZATIONS`.
        representative: float32 [N, H, W, 3] calibration images in [-1, 1]; needed by
            `int8` / `int8_full` unless the model is quantization-aware (its
            fake-quant ranges are the calibration).
        flip_concat: Bake the flip-concat test-time augmentation into the graph.

    Returns:
        The `.tflite` file contents.

    Raises:
        ConfigError: If a mode needs a representative set and none is given, or an
            op of an integer mode stays float (the message names it).
    """
    model = for_export(model)
    if QUANTIZATIONS.get(quantize).integer_ops:
        model = rewrite_prelu(model)
    return convert_function(serving_function(model, flip_concat), model, quantize, representative)


def convert_function(serve: tf.types.experimental.GenericFunction, model: keras.Model, quantize: str,
                     representative: np.ndarray | None = None) -> bytes:
    """`convert` of a serving function already built (one trace serves several modes).

    Unlike `convert`, this does not rewrite PReLU: the integer modes should be
    given the serving function of `rewrite.rewrite_prelu(model)`.

    Args:
        serve: `serving.serving_function(model, ...)`.
        model: The model it calls (pruning wrappers stripped): its variables are the weights.
        quantize: A name in `QUANTIZATIONS`.
        representative: Calibration images, as for `convert`.

    Returns:
        The `.tflite` file contents.

    Raises:
        ConfigError: As `convert`.
    """
    mode = QUANTIZATIONS.get(quantize)
    if mode.representative and representative is None and not is_quantized(model):
        raise ConfigError(f"--quantize={quantize} needs a representative set: pass --data_dir "
                          f"(the run's TFRecords) or --representative=PATH")
    # The converter saves its trackable object as a SavedModel before freezing, so the variables
    # must be reachable from it. A bare module holding them, not the Keras model: saving a Keras
    # model also traces every layer's call for Keras to reload, two thirds of a conversion's time.
    variables = tf.Module()
    variables.variables_read = list(model.variables)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()], variables)
    mode.configure(converter, representative)
    with native_stderr_to_file():
        content = converter.convert()
    if mode.integer_ops:
        float_ops = float_ops_of(content, allow_float_io=not mode.integer_io)
        if float_ops:
            raise ConfigError(
                f"--quantize={quantize}: {len(float_ops)} op(s) have no int8 kernel and stay float, "
                f"first: {float_ops[0]}; use --quantize=int8 or dynamic, or replace that op in the model")
    return content
