"""The TFLite runtime: `.tflite` files on the LiteRT interpreter (the one `ai_edge_litert` import).

Everything that runs or inspects a `.tflite` file goes through here: the
edge script (`model.EmbeddingModel`, `mtcnn.TFLiteMTCNN`), the export's
parity gate and its integer-only check (`sparse_embed.compression`), and the
latency benchmark. So a file is checked, loaded, quantized at its input and
dequantized at its output in one way, the way the device runs it.

Integer I/O follows TFLite's quantization: a float x enters an int8 (or
uint8) input as `round(x / scale) + zero_point`, clipped to the type's range,
as TFLite's own QUANTIZE kernel computes it; an integer output q leaves as
`(q - zero_point) * scale`, with the scale and zero point the file records.

Only NumPy and the project's TensorFlow-free modules are imported besides
LiteRT, so this runs where TensorFlow is not installed.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from sparse_embed.errors import DataError
from sparse_embed.fileio import native_stderr_to_file

# A TFLite file is a FlatBuffer whose file identifier, bytes 4-8, is this.
TFLITE_IDENTIFIER = b"TFL3"
# Ops that only move values across the float / integer boundary of a model's float I/O.
BOUNDARY_OPS = frozenset({"QUANTIZE", "DEQUANTIZE"})


def quiet_runtime() -> contextlib.AbstractContextManager[None]:
    """Keeps what the LiteRT runtime prints on file descriptor 2 off the terminal.

    The runtime announces its CPU delegate ("INFO: Created TensorFlow Lite
    XNNPACK delegate for CPU.") on stderr when tensors are first allocated,
    and no setting silences it; stderr is where a user error's one line goes.
    Errors still surface: as exceptions, which callers turn into such a line.
    """
    return native_stderr_to_file(replay_on_error=False)


def check_tflite(path: str | os.PathLike) -> Path:
    """Checks that a file exists and is a TFLite model, from its FlatBuffer identifier.

    Args:
        path: The model file.

    Returns:
        The path.

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
    return path


def _resolver(delegates: bool) -> OpResolverType:
    """AUTO applies the default XNNPACK delegate; without it the ops run as the file writes them."""
    return OpResolverType.AUTO if delegates else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES


def load_interpreter(path: str | os.PathLike, num_threads: int | None = None,
                     delegates: bool = True) -> Interpreter:
    """Opens a `.tflite` file with the LiteRT interpreter (tensors not yet allocated).

    Tensors are left unallocated because a model with a dynamic input (MTCNN's
    P-Net) can only be allocated once its input has been given a size.

    Args:
        path: The model file.
        num_threads: CPU threads of the interpreter; None: LiteRT's default.
        delegates: Apply the default XNNPACK delegate; False keeps the ops as written.

    Returns:
        The interpreter.

    Raises:
        DataError: If the file is missing or is not a TFLite model.
    """
    path = check_tflite(path)
    try:
        with quiet_runtime():
            return Interpreter(model_path=str(path), num_threads=num_threads,
                               experimental_op_resolver_type=_resolver(delegates))
    except (ValueError, RuntimeError) as e:
        raise DataError(f"{path}: the TFLite interpreter cannot load it ({_first_line(e)})") from e


def interpreter_of(content: bytes, num_threads: int | None = None, delegates: bool = True) -> Interpreter:
    """The LiteRT interpreter of a flatbuffer in memory, e.g. a converter's output (tensors unallocated).

    Args:
        content: The `.tflite` flatbuffer.
        num_threads: CPU threads of the interpreter; None: LiteRT's default.
        delegates: Apply the default XNNPACK delegate; False keeps the ops as written.

    Returns:
        The interpreter.

    Raises:
        DataError: If the content is not a TFLite model the interpreter loads.
    """
    if content[4:8] != TFLITE_IDENTIFIER:
        raise DataError(f"not a TFLite model (no {TFLITE_IDENTIFIER.decode()} identifier)")
    try:
        with quiet_runtime():
            return Interpreter(model_content=content, num_threads=num_threads,
                               experimental_op_resolver_type=_resolver(delegates))
    except (ValueError, RuntimeError) as e:
        raise DataError(f"the TFLite interpreter cannot load the model ({_first_line(e)})") from e


def allocate(interpreter: Interpreter, source: str) -> None:
    """Allocates an interpreter's tensors, quietly.

    Args:
        interpreter: From `load_interpreter` or `interpreter_of`, inputs sized.
        source: What the interpreter runs (a path), for the error message.

    Raises:
        DataError: If the interpreter cannot prepare the model's ops.
    """
    try:
        with quiet_runtime():
            interpreter.allocate_tensors()
    except RuntimeError as e:
        raise DataError(f"{source}: the TFLite interpreter cannot prepare it ({_first_line(e)})") from e


def _first_line(error: Exception) -> str:
    """The first line of an exception's message, or its type name, for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def quantization(detail: dict[str, Any]) -> tuple[float, int]:
    """(scale, zero_point) of a tensor; scale 0 means the tensor is not quantized.

    Args:
        detail: An entry of the interpreter's `get_input_details()` or `get_output_details()`.
    """
    scale, zero_point = detail["quantization"]
    return float(scale), int(zero_point)


def float_ops_of(content: bytes, allow_float_io: bool) -> list[str]:
    """The ops of a TFLite model that read or write a float tensor, as `OP (output tensor name)`.

    Args:
        content: A `.tflite` flatbuffer.
        allow_float_io: Accept float model inputs and outputs and the QUANTIZE /
            DEQUANTIZE ops at them (the float I/O of a model with integer ops).

    Returns:
        One description per offending op, the ops that compute in float first (the
        QUANTIZE / DEQUANTIZE around them only move values), each group in
        execution order; empty for an integer-only model.

    Raises:
        DataError: If the content is not a TFLite model the interpreter loads.
    """
    # Without the default XNNPACK delegate, which would fold the ops into one DELEGATE node.
    interpreter = interpreter_of(content, delegates=False)
    allocate(interpreter, "the converted model")
    names = {d["index"]: d["name"] for d in interpreter.get_tensor_details()}
    dtypes = {d["index"]: np.dtype(d["dtype"]) for d in interpreter.get_tensor_details()}
    io = {d["index"] for d in (*interpreter.get_input_details(), *interpreter.get_output_details())}
    offending = []
    # `_get_ops_details` is the interpreter's only view of the ops and their tensors.
    for op in interpreter._get_ops_details():
        tensors = [i for i in (*op["inputs"], *op["outputs"]) if i >= 0]
        floats = [i for i in tensors if dtypes[i].kind == "f"]
        if allow_float_io and op["op_name"] in BOUNDARY_OPS and set(floats) <= io:
            continue
        if floats:
            out = op["outputs"][0] if len(op["outputs"]) else floats[0]
            offending.append((op["op_name"] in BOUNDARY_OPS, f"{op['op_name']} ({names.get(out, '?')})"))
    return [description for _, description in sorted(offending, key=lambda item: item[0])]


class TFLiteModel:
    """A one-input `.tflite` model on the LiteRT interpreter (XNNPACK on CPU), float in and out.

    It has one output, or two: an embedding [N, D] and a confidence [N] (a
    probabilistic run's export, `sparse_embed.compression.serving`), told
    apart by their rank. `__call__` and `invoke` give the first output (the
    embedding); `call_with_confidence` and `invoke_with_confidence` both.

    An integer input (int8 or uint8: `--quantize=int8_full`) is given its float
    batch quantized, an integer output is dequantized, with the scale and zero
    point the file records; a float model's tensors pass as they are.

    Args:
        interpreter: From `load_interpreter` or `interpreter_of` (tensors not yet allocated).
        source: What it runs (a path, or a description), for error messages.

    Raises:
        DataError: If the model has other than one input and one output (or an
            embedding and a confidence output), cannot be prepared, or has an
            integer input or output without quantization parameters.
    """

    def __init__(self, interpreter: Interpreter, source: str) -> None:
        self.interpreter = interpreter
        self.source = source
        allocate(interpreter, source)
        inputs = interpreter.get_input_details()
        if len(inputs) != 1 or not self._find_outputs():
            shapes = [list(d["shape"]) for d in interpreter.get_output_details()]
            raise DataError(f"{source}: an embedding model has one input and one output (or an [N, D] "
                            f"embedding and an [N] confidence), this one has {len(inputs)} input(s) and "
                            f"outputs of shapes {shapes}")
        self.input = inputs[0]
        for kind, detail in (("input", self.input), ("output", self.output),
                             ("confidence output", self.confidence_output)):
            if detail is None:
                continue
            dtype = np.dtype(detail["dtype"])
            if dtype != np.float32 and quantization(detail)[0] == 0:
                raise DataError(f"{source}: {dtype} {kind} without quantization parameters (scale, "
                                f"zero point); export integer models with a representative set")

    def _find_outputs(self) -> bool:
        """Sets `output` and `confidence_output` (None for one output); False if they are not that."""
        outputs = self.interpreter.get_output_details()
        if len(outputs) == 1:
            self.output, self.confidence_output = outputs[0], None
            return True
        ranks = sorted((len(d["shape"]), i) for i, d in enumerate(outputs))
        if len(outputs) != 2 or [rank for rank, _ in ranks] != [1, 2]:
            return False
        self.confidence_output, self.output = outputs[ranks[0][1]], outputs[ranks[1][1]]
        return True

    @property
    def has_confidence(self) -> bool:
        """Whether the model has a confidence output besides the embedding."""
        return self.confidence_output is not None

    @classmethod
    def from_path(cls, path: str | os.PathLike, num_threads: int | None = None) -> TFLiteModel:
        """Loads a `.tflite` file.

        Args:
            path: The file.
            num_threads: CPU threads of the interpreter; None: LiteRT's default.

        Raises:
            DataError: If the file is missing, not a TFLite model, or not a model `TFLiteModel` runs.
        """
        return cls(load_interpreter(path, num_threads), str(path))

    @classmethod
    def from_content(cls, content: bytes, num_threads: int | None = None) -> TFLiteModel:
        """Loads a flatbuffer in memory (a converter's output).

        Args:
            content: The `.tflite` flatbuffer.
            num_threads: CPU threads of the interpreter; None: LiteRT's default.

        Raises:
            DataError: If the content is not a TFLite model, or not a model `TFLiteModel` runs.
        """
        return cls(interpreter_of(content, num_threads), "the TFLite model")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The input tensor's current shape (the batch size it is allocated for)."""
        return tuple(int(s) for s in self.input["shape"])

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The output tensor's current shape."""
        return tuple(int(s) for s in self.output["shape"])

    @property
    def input_dtype(self) -> np.dtype:
        """The input tensor's type: float32, or int8 / uint8 for quantized input."""
        return np.dtype(self.input["dtype"])

    @property
    def output_dtype(self) -> np.dtype:
        """The output tensor's type: float32, or int8 / uint8 for quantized output."""
        return np.dtype(self.output["dtype"])

    def resize(self, shape: tuple[int, ...]) -> None:
        """Sizes the input (e.g. another batch size) and reallocates the tensors.

        Args:
            shape: The new input shape.

        Raises:
            DataError: If the interpreter cannot prepare the model at that shape.
        """
        self.interpreter.resize_tensor_input(self.input["index"], shape)
        allocate(self.interpreter, self.source)
        self.input = self.interpreter.get_input_details()[0]
        self._find_outputs()

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """The input tensor of float values: quantized for an integer input, float32 otherwise.

        Args:
            x: Float values at the input's shape.

        Returns:
            `x` in the input's dtype.
        """
        x = np.asarray(x, np.float32)
        if self.input_dtype == np.float32:
            return x
        scale, zero_point = quantization(self.input)
        info = np.iinfo(self.input_dtype)
        return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(self.input_dtype)

    def _read(self, detail: dict[str, Any]) -> np.ndarray:
        """An output tensor as float32 (dequantized for an integer output), a new array."""
        out = self.interpreter.get_tensor(detail["index"])
        if np.dtype(detail["dtype"]) != np.float32:
            scale, zero_point = quantization(detail)
            return ((out.astype(np.float32) - zero_point) * scale).astype(np.float32)
        return out.astype(np.float32, copy=True)

    def invoke(self, tensor: np.ndarray) -> np.ndarray:
        """One inference of an input tensor at the input's current shape.

        Args:
            tensor: The output of `quantize`.

        Returns:
            The float32 output (dequantized for an integer output), a new array.
        """
        self.interpreter.set_tensor(self.input["index"], tensor)
        self.interpreter.invoke()
        return self._read(self.output)

    def invoke_with_confidence(self, tensor: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """`invoke`, and the confidence output (None for a model without one).

        Args:
            tensor: The output of `quantize`.
        """
        embedding = self.invoke(tensor)
        return embedding, None if self.confidence_output is None else self._read(self.confidence_output)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Runs a batch of any size: resized to it, quantized and dequantized as the model needs.

        Args:
            x: Float values, e.g. float32 [N, H, W, 3] images in [-1, 1] for an embedding model.

        Returns:
            float32, e.g. [N, D] embeddings.
        """
        if self.input_shape != tuple(x.shape):
            self.resize(tuple(x.shape))
        return self.invoke(self.quantize(x))

    def call_with_confidence(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """`__call__`, and the confidence output: float32 [N] (None for a model without one).

        Args:
            x: Float values at any batch size, e.g. float32 [N, H, W, 3] images in [-1, 1].
        """
        if self.input_shape != tuple(x.shape):
            self.resize(tuple(x.shape))
        return self.invoke_with_confidence(self.quantize(x))
