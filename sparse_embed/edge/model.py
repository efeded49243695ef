"""The face embedding model of the edge script: one aligned RGB face crop in, one embedding out."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sparse_embed.edge.runtime import TFLiteModel
from sparse_embed.errors import DataError

# The recognition models' input scaling: RGB pixel p -> p / 127.5 - 1, in [-1, 1] (as in training).
PIXEL_SCALE = 127.5


class EmbeddingModel:
    """A face embedding model in TFLite: one RGB face crop in, one embedding (and a confidence) out.

    A probabilistic run's export has a second output, the confidence of the
    embedding (`has_confidence`; `run_with_confidence` reads both).

    Float models take float32 NHWC RGB in [-1, 1]; integer-only models (int8 or
    uint8 input and output, `sparse_embed.export --quantize=int8_full`) get that
    input quantized and their output dequantized with the scale and zero point
    the file records (`runtime.TFLiteModel`), so both give float embeddings.
    Pre-processing (`prepare`) and inference (`run`) are separate steps, as the
    protocol times them separately.

    Args:
        path: The `.tflite` file.
        num_threads: CPU threads of the interpreter; None: LiteRT's default.

    Raises:
        DataError: If the file is not a TFLite model, or its input is not one
            [1, H, W, 3] image, or its output not one [1, D] embedding (and one [1]
            confidence).
    """

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None) -> None:
        self.path = Path(path)
        self._model = TFLiteModel.from_path(path, num_threads)
        shape = self._model.input_shape
        if len(shape) != 4 or shape[3] != 3:
            raise DataError(f"{path}: input shape {list(shape)} is not an [N, H, W, 3] image batch")
        if shape[0] != 1:
            # One image per inference, as the protocol times it.
            self._model.resize((1, *shape[1:]))
        self.height, self.width = shape[1], shape[2]
        out_shape = self._model.output_shape
        if len(out_shape) != 2 or out_shape[0] != 1:
            raise DataError(f"{path}: output shape {list(out_shape)} is not a [1, D] embedding")
        self.embedding_size = out_shape[1]
        self.input_dtype = self._model.input_dtype
        self.output_dtype = self._model.output_dtype

    @property
    def has_confidence(self) -> bool:
        """Whether the model has a confidence output."""
        return self._model.has_confidence

    @property
    def integer_io(self) -> bool:
        """Whether the model takes and returns integer tensors (quantized I/O)."""
        return self.input_dtype != np.float32

    def prepare(self, face: np.ndarray) -> np.ndarray:
        """The input tensor of one aligned face crop: scaled, and quantized for integer models.

        Args:
            face: [height, width, 3] uint8 RGB crop at the model's input size.

        Returns:
            [1, height, width, 3] in the model's input dtype.
        """
        if face.shape != (self.height, self.width, 3):
            raise ValueError(f"need a {self.height}x{self.width} RGB crop, got shape {face.shape}")
        return self._model.quantize(face[None].astype(np.float32) / PIXEL_SCALE - 1.0)

    def run(self, tensor: np.ndarray) -> np.ndarray:
        """One inference of a prepared input tensor.

        Args:
            tensor: The output of `prepare`.

        Returns:
            The float32 [D] embedding (dequantized for integer models).
        """
        return self._model.invoke(tensor)[0]

    def run_with_confidence(self, tensor: np.ndarray) -> tuple[np.ndarray, float]:
        """One inference: the float32 [D] embedding and the confidence (NaN without a confidence output).

        Args:
            tensor: The output of `prepare`.
        """
        embedding, confidence = self._model.invoke_with_confidence(tensor)
        return embedding[0], float("nan") if confidence is None else float(confidence[0])
