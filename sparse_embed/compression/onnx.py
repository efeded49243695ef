"""ONNX export through tf2onnx, and the onnxruntime session the parity gate runs.

The only module that imports `tf2onnx` and `onnxruntime`. tf2onnx 1.17
converts the serving function of `serving.serving_function` (a `tf.function`
over a tf_keras model) with TensorFlow 2.21 at opset 17; the ONNX graph keeps
the names `images` (float32 [N, H, W, 3], NHWC like the Keras model) and
`embedding` (and `confidence`, for a probabilistic run), and a dynamic batch
dimension.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import tf2onnx

from sparse_embed.compression.serving import CONFIDENCE_NAME, OUTPUT_NAME
from sparse_embed.errors import DataError
from sparse_embed.keras import tf

OPSET = 17


def _spec(value: Any) -> dict[str, Any]:
    """export.json form of an ONNX graph input / output (value_info)."""
    dims = value.type.tensor_type.shape.dim
    return {"name": value.name, "shape": [d.dim_value if d.HasField("dim_value") else -1 for d in dims],
            "dtype": "float32", "quantization": None}


def write(serve: tf.types.experimental.GenericFunction, path: str | os.PathLike) -> dict[str, Any]:
    """Converts a serving function to an ONNX file.

    Args:
        serve: A `tf.function` with an input signature (see `serving.serving_function`).
        path: The `.onnx` file to write.

    Returns:
        `input`, `output` specs (and `confidence_output`'s) and the `opset`.
    """
    proto, _ = tf2onnx.convert.from_function(serve, input_signature=serve.input_signature,
                                             opset=OPSET)
    Path(path).write_bytes(proto.SerializeToString())
    outputs = {value.name: value for value in proto.graph.output}
    spec = {"input": _spec(proto.graph.input[0]),
            "output": _spec(outputs.get(OUTPUT_NAME, proto.graph.output[0])), "opset": OPSET}
    if CONFIDENCE_NAME in outputs:
        spec["confidence_output"] = _spec(outputs[CONFIDENCE_NAME])
    return spec


class ONNXModel:
    """An `.onnx` embedding model run by onnxruntime on the CPU.

    Args:
        path: The file.

    Raises:
        DataError: If it is missing or not an ONNX model.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        if not Path(path).is_file():
            raise DataError(f"ONNX model {path} not found")
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except onnxruntime.capi.onnxruntime_pybind11_state.InvalidProtobuf as e:
            raise DataError(f"{path} is not an ONNX model: {e}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]

    def __call__(self, images: np.ndarray) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Embeds float32 [N, H, W, 3] images in [-1, 1].

        Args:
            images: The batch.

        Returns:
            float32 [N, D]; with a confidence output, (float32 [N, D], float32 [N]).
        """
        feed = {self.input_name: images.astype(np.float32)}
        if CONFIDENCE_NAME not in self.output_names:
            return self.session.run(None, feed)[0]
        embedding, confidence = self.session.run([OUTPUT_NAME, CONFIDENCE_NAME], feed)
        return embedding, confidence
