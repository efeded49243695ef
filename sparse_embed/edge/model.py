"""TFLite models on the LiteRT interpreter: loading with clear errors, and the face embedding model."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from sparse_embed.errors import DataError
from sparse_embed.fileio import native_stderr_to_file

# A TFLite file is a FlatBuffer whose file identifier, bytes 4-8, is this.
TFLITE_IDENTIFIER = b"TFL3"
# The recognition models' input scaling: RGB pixel p -> p / 127.5 - 1, in [-1, 1] (as in training).
PIXEL_SCALE = 127.5


def quiet_runtime() -> contextlib.AbstractContextManager[None]:
    """Keeps what the LiteRT runtime prints on file descriptor 2 off the terminal.

    The runtime announces its CPU delegate ("INFO: Created TensorFlow Lite
    XNNPACK delegate for CPU.") on stderr when tensors are first allocated,
    and no setting silences it; stderr is where a user error's one line goes.
    Errors still surface: as exceptions, which callers turn into such a line.
    """
    return native_stderr_to_file(replay_on_error=False)


def load_interpreter(path: str | os.PathLike, num_threads: int | None = None) -> Interpreter:
    """Opens a `.tflite` file with the LiteRT interpreter (tensors not yet allocated).

    Tensors are left unallocated because a model with a dynamic input (MTCNN's
    P-Net) can only be allocated once its input has been given a size.

    Args:
        path: The model file.
        num_threads: CPU threads of the interpreter; None: LiteRT's default.

    Returns:
        The interpreter.

    Raises:
        DataError: If the file is missing or is not a TFLite model.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"model file {path} not found; pass a .tflite file")
    with path.open("rb") as f:
        header = f.read(8)
    if header[4:8] != TFLITE_IDENTIFIER:
        raise DataError(f"{path} is not a TFLite model (no {TFLITE_IDENTIFIER.decode()} identifier); "
                        f"pass a .tflite file, e.g. one written by sparse_embed.export --format=tflite")
    try:
        with quiet_runtime():
            return Interpreter(model_path=str(path), num_threads=num_threads)
    except (ValueError, RuntimeError) as e:
        raise DataError(f"{path}: the TFLite interpreter cannot load it ({_first_line(e)})") from e


def _first_line(error: Exception) -> str:
    """The first line of an exception's message, or its type name, for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _quantization(detail: dict) -> tuple[float, int]:
    """(scale, zero_point) of a tensor; scale 0 means the tensor is not quantized."""
    scale, zero_point = detail["quantization"]
    return float(scale), int(zero_point)


class EmbeddingModel:
    """A face embedding model in TFLite: one RGB face crop in, one embedding out.

    Float models take float32 NHWC RGB in [-1, 1]; integer-only models (int8 or
    uint8 input and output, `sparse_embed.export --quantize=int8_full`) get that
    input quantized and their output dequantized with the scale and zero point
    the file records, so both give float embeddings.

    Args:
        path: The `.tflite` file.
        num_threads: CPU threads of the interpreter; None: LiteRT's default.

    Raises:
        DataError: If the file is not a TFLite model, or its input is not one
            [1, H, W, 3] image, or its output not one [1, D] embedding.
    """

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None) -> None:
        self.path = Path(path)
        self._interpreter = load_interpreter(path, num_threads)
        self._allocate()
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise DataError(f"{path}: an embedding model has one input and one output, this one has "
                            f"{len(inputs)} and {len(outputs)}")
        self._input, self._output = inputs[0], outputs[0]
        shape = tuple(int(v) for v in self._input["shape"])
        if len(shape) != 4 or shape[3] != 3:
            raise DataError(f"{path}: input shape {list(shape)} is not an [N, H, W, 3] image batch")
        if shape[0] != 1:
            # One image per inference, as the protocol times it.
            self._interpreter.resize_tensor_input(self._input["index"], (1, *shape[1:]))
            self._allocate()
            self._input = self._interpreter.get_input_details()[0]
            self._output = self._interpreter.get_output_details()[0]
        self.height, self.width = shape[1], shape[2]
        out_shape = tuple(int(v) for v in self._output["shape"])
        if len(out_shape) != 2 or out_shape[0] != 1:
            raise DataError(f"{path}: output shape {list(out_shape)} is not a [1, D] embedding")
        self.embedding_size = out_shape[1]
        self.input_dtype = np.dtype(self._input["dtype"])
        self.output_dtype = np.dtype(self._output["dtype"])
        self._input_quantization = _quantization(self._input)
        self._output_quantization = _quantization(self._output)
        for kind, dtype, (scale, _) in (("input", self.input_dtype, self._input_quantization),
                                        ("output", self.output_dtype, self._output_quantization)):
            if dtype != np.float32 and scale == 0:
                raise DataError(f"{path}: {dtype} {kind} without quantization parameters (scale, "
                                f"zero point); export integer models with a representative set")

    def _allocate(self) -> None:
        try:
            with quiet_runtime():
                self._interpreter.allocate_tensors()
        except RuntimeError as e:
            raise DataError(f"{self.path}: the TFLite interpreter cannot prepare it "
                            f"({_first_line(e)})") from e

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
        x = face.astype(np.float32) / PIXEL_SCALE - 1.0
        if self.integer_io:
            scale, zero_point = self._input_quantization
            info = np.iinfo(self.input_dtype)
            x = np.clip(np.round(x / scale) + zero_point, info.min, info.max)
        return x[None].astype(self.input_dtype)

    def run(self, tensor: np.ndarray) -> np.ndarray:
        """One inference of a prepared input tensor.

        Args:
            tensor: The output of `prepare`.

        Returns:
            The float32 [D] embedding (dequantized for integer models).
        """
        self._interpreter.set_tensor(self._input["index"], tensor)
        self._interpreter.invoke()
        out = self._interpreter.get_tensor(self._output["index"])[0]
        if self.output_dtype != np.float32:
            scale, zero_point = self._output_quantization
            return ((out.astype(np.float32) - zero_point) * scale).astype(np.float32)
        return out.astype(np.float32, copy=True)
