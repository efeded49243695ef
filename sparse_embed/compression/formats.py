"""Export formats: how each `--format` writes a model and loads it back for the parity gate.

Every format writes the serving function (`serving.serving_function`):
`tflite` through the converter (`converter.convert_function`, in each of its
quantization modes) and loaded on the edge runtime (`edge.runtime.TFLiteModel`),
`saved_model` as a SavedModel reloaded by TensorFlow, `onnx` through tf2onnx
and onnxruntime (`onnx`). Each records its input / output spec for export.json.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparse_embed.compression.converter import QUANTIZATIONS, convert_function
from sparse_embed.compression.parity import Embedder
from sparse_embed.compression.serving import CONFIDENCE_NAME, INPUT_NAME, OUTPUT_NAME
from sparse_embed.edge.runtime import TFLiteModel, float_ops_of, quantization
from sparse_embed.errors import ConfigError
from sparse_embed.keras import keras, tf
from sparse_embed.registry import Registry


@dataclass(frozen=True)
class ExportFormat:
    """How one `--format` writes a model and loads it back for the parity gate.

    Attributes:
        name: The `--format` value.
        filename: The model's name in the export folder.
        quantizations: The `--quantize` values it takes.
        write: (serving function, model, quantize, representative, path) -> input / output
            spec; writes the model at `path`.
        load: path -> embedder of the written model.
    """

    name: str
    filename: str
    quantizations: tuple[str, ...]
    write: Callable[[Any, keras.Model, str, np.ndarray | None, Path], dict[str, Any]] = field(repr=False)
    load: Callable[[Path], Embedder] = field(repr=False)


FORMATS: Registry[ExportFormat] = Registry("export format")


def tensor_spec(detail: dict[str, Any]) -> dict[str, Any]:
    """The export.json form of an interpreter input / output detail.

    Args:
        detail: An entry of `get_input_details()` or `get_output_details()`.

    Returns:
        name, shape (-1 = any batch size), dtype and quantization (scale, zero_point;
        null for a float tensor).
    """
    scale, zero_point = quantization(detail)
    return {
        "name": detail["name"],
        "shape": [int(s) for s in detail["shape_signature"]],
        "dtype": np.dtype(detail["dtype"]).name,
        "quantization": ({"scale": scale, "zero_point": zero_point} if scale else None),
    }


def _write_tflite(serve: Any, model: keras.Model, quantize: str, representative: np.ndarray | None,
                  path: Path) -> dict[str, Any]:
    content = convert_function(serve, model, quantize, representative)
    path.write_bytes(content)
    written = TFLiteModel.from_content(content)
    spec: dict[str, Any] = {"input": tensor_spec(written.input), "output": tensor_spec(written.output)}
    if written.has_confidence:
        spec["confidence_output"] = tensor_spec(written.confidence_output)
    if QUANTIZATIONS.get(quantize).integer_ops:
        # Empty here (the conversion checked it); recorded for whoever audits the file.
        spec["float_ops"] = float_ops_of(content, allow_float_io=not QUANTIZATIONS.get(quantize).integer_io)
    return spec


def _load_tflite(path: Path) -> Embedder:
    model = TFLiteModel.from_path(path)
    return model.call_with_confidence if model.has_confidence else model


def _float_spec(shape: Sequence[int | None], name: str) -> dict[str, Any]:
    return {"name": name, "shape": [-1 if s is None else int(s) for s in shape], "dtype": "float32",
            "quantization": None}


def _write_saved_model(serve: Any, model: keras.Model, quantize: str,
                       representative: np.ndarray | None, path: Path) -> dict[str, Any]:
    del quantize, representative
    concrete = serve.get_concrete_function()
    # The serving function and the variables it reads, without the Keras model: saving
    # a Keras model also traces every layer's call for Keras to reload, 4x the time.
    module = tf.Module()
    module.variables_read = list(model.variables)
    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={"serving_default": concrete})
    outputs = concrete.structured_outputs
    spec = {"input": _float_spec([None, *model.input_shape[1:]], INPUT_NAME),
            "output": _float_spec(outputs[OUTPUT_NAME].shape.as_list(), OUTPUT_NAME),
            "signature": "serving_default"}
    if CONFIDENCE_NAME in outputs:
        spec["confidence_output"] = _float_spec(outputs[CONFIDENCE_NAME].shape.as_list(), CONFIDENCE_NAME)
    return spec


def _load_saved_model(path: Path) -> Embedder:
    signature = tf.saved_model.load(str(path)).signatures["serving_default"]

    def run(images: np.ndarray) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        outputs = signature(**{INPUT_NAME: tf.constant(images)})
        if CONFIDENCE_NAME in outputs:
            return outputs[OUTPUT_NAME].numpy(), outputs[CONFIDENCE_NAME].numpy()
        return outputs[OUTPUT_NAME].numpy()

    return run


def _write_onnx(serve: Any, model: keras.Model, quantize: str, representative: np.ndarray | None,
                path: Path) -> dict[str, Any]:
    del model, quantize, representative
    from sparse_embed.compression import onnx

    return onnx.write(serve, path)


def _load_onnx(path: Path) -> Embedder:
    from sparse_embed.compression import onnx

    return onnx.ONNXModel(path)


FORMATS.register("tflite")(ExportFormat("tflite", "model.tflite", tuple(QUANTIZATIONS.names()),
                                        _write_tflite, _load_tflite))
FORMATS.register("saved_model")(ExportFormat("saved_model", "saved_model", ("fp32",),
                                             _write_saved_model, _load_saved_model))
FORMATS.register("onnx")(ExportFormat("onnx", "model.onnx", ("fp32",), _write_onnx, _load_onnx))


def check_format(fmt: str, quantize: str) -> ExportFormat:
    """The format entry, after checking it takes the quantization mode.

    Args:
        fmt: A name in `FORMATS`.
        quantize: A name in `QUANTIZATIONS`.

    Raises:
        ConfigError: If either name is unknown or the format does not take the mode.
    """
    entry = FORMATS.get(fmt)
    QUANTIZATIONS.get(quantize)
    if quantize not in entry.quantizations:
        raise ConfigError(f"--format={fmt} takes --quantize={'|'.join(entry.quantizations)}, got "
                          f"{quantize}; quantized models are --format=tflite")
    return entry


