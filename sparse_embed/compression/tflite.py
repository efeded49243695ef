"""Export of a backbone (TFLite, SavedModel, ONNX) and the parity gate every exported model passes.

The library behind `python -m sparse_embed.export`. Every format starts from
one serving function: float32 NHWC RGB images in [-1, 1] at the run's
`model.input_shape`, any batch size, named `images` -> the embedding (not
L2-normalised), named `embedding`. With `flip_concat` the MLPerf face
protocol's test-time flip is part of the graph: the output is
`concat(e(x), e(flip(x)))`, [B, 2d].

TFLite quantization modes (`QUANTIZATIONS`):

- `fp32`: no optimisation; `fp16`: float16 weights, float compute;
- `dynamic`: int8 weights, activations quantized on the fly (no representative set);
- `int8`: full-integer ops (weights and activations int8, calibrated on a
  representative set) with float32 input and output (QUANTIZE / DEQUANTIZE at
  the two ends);
- `int8_full`: integer-only including int8 input and output, the
  "integer-arithmetic-only inference" of Jacob et al. (2018). The input is
  `round(x / scale + zero_point)` with the input tensor's quantization
  parameters, the output `(q - zero_point) * scale` with the output's.

The integer modes convert the model with each PReLU rewritten as an
equivalent graph of ops XNNPACK runs in int8 (`rewrite.rewrite_prelu`): the
int8 PRELU op has no XNNPACK kernel and made int8 MobileFaceNet 6x slower
than fp32. The float modes keep PRELU.

An int8 model is checked after conversion: the converter silently keeps an op
it has no int8 kernel for in float (NEG, CUMSUM, ...), wrapped in
DEQUANTIZE / QUANTIZE, so every op's tensors are read back from the
interpreter, and a float tensor anywhere but the float I/O of `int8` names the
op in a `ConfigError`.

The parity gate runs the written file (TFLite through `ai_edge_litert`, the
runtime of the edge devices; the SavedModel reloaded; ONNX through
onnxruntime) and the Keras model on the same held-out images and
verification pairs, and compares embeddings (mean and minimum cosine),
verification accuracy, and the nnz and FLOPs per pair of sparse models.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from sparse_embed.compression import for_export, is_quantized
from sparse_embed.compression.rewrite import rewrite_prelu
from sparse_embed.config import Config
from sparse_embed.data.pipeline import decode_image, files_dataset, list_files, missing_paths
from sparse_embed.data.tfrecord import parse_example
from sparse_embed.data.verification import IMAGE_EXTENSIONS, Pairs, unique_images
from sparse_embed.errors import ConfigError, DataError
from sparse_embed.fileio import atomic_path, native_stderr_to_file
from sparse_embed.keras import keras, tf
from sparse_embed.metrics.verification import verification_metrics
from sparse_embed.registry import Registry
from sparse_embed.sparsity import sparsity_stats_np

INPUT_NAME = "images"
OUTPUT_NAME = "embedding"
# The 4-byte FlatBuffer file identifier of a TFLite model, after the root offset.
TFLITE_IDENTIFIER = b"TFL3"
# Ops that only move values across the float / int8 boundary of an `int8` model's I/O.
_BOUNDARY_OPS = frozenset({"QUANTIZE", "DEQUANTIZE"})

Embedder = Callable[[np.ndarray], np.ndarray]


def serving_function(model: keras.Model, flip_concat: bool = False) -> tf.types.experimental.GenericFunction:
    """The function every format exports: images -> {"embedding": ...}.

    Args:
        model: A backbone, images -> embeddings (pruning wrappers already stripped).
        flip_concat: Output `concat(e(x), e(flip(x)))` (MLPerf's test-time flip) instead of e(x).

    Returns:
        A `tf.function` with input signature float32 [None, H, W, 3] named `images`.
    """
    shape = [None, *model.input_shape[1:]]

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name=INPUT_NAME)])
    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        embedding = model(images, training=False)
        if flip_concat:
            # Width is axis 2 of NHWC: the mirror image, as tf.image.flip_left_right.
            mirrored = model(tf.reverse(images, axis=[2]), training=False)
            embedding = tf.concat([embedding, mirrored], axis=-1)
        return {OUTPUT_NAME: embedding}

    return serve


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
        serve: `serving_function(model, ...)`.
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


def _interpreter(content: bytes, num_threads: int | None = None,
                 delegates: bool = True) -> Interpreter:
    """An allocated interpreter of a flatbuffer; `delegates=False` keeps the ops as written."""
    resolver = (OpResolverType.AUTO if delegates
                else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    with native_stderr_to_file():
        interpreter = Interpreter(model_content=content, num_threads=num_threads,
                                  experimental_op_resolver_type=resolver)
        interpreter.allocate_tensors()
    return interpreter


def float_ops_of(content: bytes, allow_float_io: bool) -> list[str]:
    """The ops of a TFLite model that read or write a float tensor, as `OP (output tensor name)`.

    Args:
        content: A `.tflite` flatbuffer.
        allow_float_io: Accept float model inputs and outputs and the QUANTIZE /
            DEQUANTIZE ops at them (the `int8` mode's float I/O).

    Returns:
        One description per offending op, the ops that compute in float first (the
        QUANTIZE / DEQUANTIZE around them only move values), each group in
        execution order; empty for an integer-only model.
    """
    # Without the default XNNPACK delegate, which would fold the ops into one DELEGATE node.
    interpreter = _interpreter(content, delegates=False)
    names = {d["index"]: d["name"] for d in interpreter.get_tensor_details()}
    dtypes = {d["index"]: np.dtype(d["dtype"]) for d in interpreter.get_tensor_details()}
    io = {d["index"] for d in (*interpreter.get_input_details(), *interpreter.get_output_details())}
    offending = []
    # `_get_ops_details` is the interpreter's only view of the ops and their tensors.
    for op in interpreter._get_ops_details():
        tensors = [i for i in (*op["inputs"], *op["outputs"]) if i >= 0]
        floats = [i for i in tensors if dtypes[i].kind == "f"]
        if allow_float_io and op["op_name"] in _BOUNDARY_OPS and set(floats) <= io:
            continue
        if floats:
            out = op["outputs"][0] if len(op["outputs"]) else floats[0]
            offending.append((op["op_name"] in _BOUNDARY_OPS, f"{op['op_name']} ({names.get(out, '?')})"))
    return [description for _, description in sorted(offending, key=lambda item: item[0])]


def tensor_spec(detail: dict[str, Any]) -> dict[str, Any]:
    """The export.json form of an interpreter input / output detail.

    Args:
        detail: An entry of `get_input_details()` or `get_output_details()`.

    Returns:
        name, shape (-1 = any batch size), dtype and quantization (scale, zero_point;
        null for a float tensor).
    """
    scale, zero_point = detail["quantization"]
    return {
        "name": detail["name"],
        "shape": [int(s) for s in detail["shape_signature"]],
        "dtype": np.dtype(detail["dtype"]).name,
        "quantization": ({"scale": float(scale), "zero_point": int(zero_point)} if scale else None),
    }


def read_tflite(path: str | os.PathLike) -> bytes:
    """Reads a `.tflite` file, checking that it is one.

    Args:
        path: The file.

    Raises:
        DataError: If it is missing or not a TFLite flatbuffer.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"TFLite model {path} not found")
    content = path.read_bytes()
    if content[4:8] != TFLITE_IDENTIFIER:
        raise DataError(f"{path} is not a TFLite model (no {TFLITE_IDENTIFIER.decode()} identifier); "
                        f"write one with python -m sparse_embed.export --format=tflite")
    return content


class TFLiteModel:
    """A `.tflite` embedding model run by the `ai_edge_litert` interpreter (XNNPACK on CPU).

    Args:
        content: The flatbuffer.
        num_threads: Interpreter threads; None lets the runtime choose.
    """

    def __init__(self, content: bytes, num_threads: int | None = None) -> None:
        self.interpreter = _interpreter(content, num_threads)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    @classmethod
    def from_path(cls, path: str | os.PathLike, num_threads: int | None = None) -> TFLiteModel:
        """Loads a `.tflite` file.

        Args:
            path: The file.
            num_threads: Interpreter threads.

        Raises:
            DataError: If the file is missing or not a TFLite model.
        """
        content = read_tflite(path)
        try:
            return cls(content, num_threads)
        except ValueError as e:
            raise DataError(f"{path} does not load as a TFLite model: {e}") from None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Embeds float32 [N, H, W, 3] images in [-1, 1]; quantizes and dequantizes int8 I/O.

        Args:
            images: The batch.

        Returns:
            float32 [N, D].
        """
        shape = tuple(images.shape)
        if tuple(self.input["shape"]) != shape:
            self.interpreter.resize_tensor_input(self.input["index"], shape)
            self.interpreter.allocate_tensors()
            self.input = self.interpreter.get_input_details()[0]
            self.output = self.interpreter.get_output_details()[0]
        x = images.astype(np.float32)
        dtype = np.dtype(self.input["dtype"])
        if dtype.kind == "i":
            scale, zero_point = self.input["quantization"]
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(dtype)
        self.interpreter.set_tensor(self.input["index"], x)
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self.output["index"])
        if np.dtype(self.output["dtype"]).kind == "i":
            scale, zero_point = self.output["quantization"]
            y = (y.astype(np.float32) - zero_point) * scale
        return y.astype(np.float32)


# --- Images: representative set and held-out images ---------------------------------------------

def _check_aspect(name: str, hw: tuple[int, int], input_shape: tuple[int, int], source: str) -> None:
    """Images are resized to the input like the run's pipeline; a different aspect would squash them."""
    (h, w), (height, width) = hw, input_shape
    if abs(h * width - w * height) > 0.02 * height * w:
        raise DataError(
            f"{source}: image {name} is {h}x{w}, the model takes {height}x{width} (height x width); "
            f"pass images aligned at {height}x{width} or of that aspect ratio")


def _decode(encoded: bytes, name: str, input_shape: tuple[int, int], source: str) -> np.ndarray:
    raw = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    _check_aspect(name, tuple(int(s) for s in raw.shape[:2]), input_shape, source)
    return decode_image(tf.constant(encoded), input_shape).numpy()


def _record_images(pattern: str, start: int, count: int) -> Iterator[tuple[bytes, str]]:
    records = tf.data.TFRecordDataset(list_files(pattern)).skip(start).take(count)
    for serialized in records:
        features = parse_example(serialized)
        yield features["image/encoded"].numpy(), features["image/filename"].numpy().decode()


def _folder_images(root: Path, count: int) -> Iterator[tuple[bytes, str]]:
    paths = sorted(p for p in root.rglob("*")
                   if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if not paths:
        raise DataError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {root}")
    for path in paths[:count]:
        yield path.read_bytes(), str(path)


def _npy_images(path: Path, count: int, input_shape: tuple[int, int]) -> np.ndarray:
    array = np.load(path, mmap_mode="r")
    want = (*input_shape, 3)
    if array.ndim != 4 or tuple(array.shape[1:]) != want:
        raise DataError(f"{path}: representative array has shape {tuple(array.shape)}, the model takes "
                        f"[N, {want[0]}, {want[1]}, 3] float32 RGB in [-1, 1]")
    images = np.asarray(array[:count], np.float32)
    if images.size and (images.min() < -1.0 - 1e-3 or images.max() > 1.0 + 1e-3):
        raise DataError(f"{path}: values span [{images.min():g}, {images.max():g}], the model takes "
                        f"[-1, 1] (x / 127.5 - 1 of 8-bit RGB)")
    return images


def load_images(source: str, count: int, input_shape: tuple[int, int], start: int = 0) -> np.ndarray:
    """Images at a model's input, from TFRecords, an image folder or a `.npy` array.

    Encoded images are decoded and resized as the run's pipelines do
    (`decode_image`), so they are what the model saw in training.

    Args:
        source: A TFRecord glob, a folder of images (searched recursively,
            sorted), or a `.npy` float32 [N, H, W, 3] array in [-1, 1].
        count: At most this many images.
        input_shape: (height, width) of the model input.
        start: Images to skip first (TFRecords: records before the held-out ones).

    Returns:
        float32 [n, H, W, 3], n <= count.

    Raises:
        DataError: If the source is missing or empty, or an image's shape does not fit the model.
    """
    path = Path(source)
    if path.suffix == ".npy":
        if not path.is_file():
            raise DataError(f"representative array {path} not found")
        return _npy_images(path, start + count, input_shape)[start:]
    if path.is_dir():
        encoded = _folder_images(path, start + count)
    elif glob.glob(source):
        encoded = _record_images(source, start, count)
    else:
        raise DataError(f"{source} is neither a .npy array, an image folder nor a TFRecord glob "
                        f"that matches files")
    images = [_decode(data, name, input_shape, source) for data, name in encoded]
    if path.is_dir():
        images = images[start:]
    if not images:
        return np.zeros((0, *input_shape, 3), np.float32)
    return np.stack(images).astype(np.float32)


# --- Parity gate --------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ParityData:
    """What the parity gate embeds with both models.

    Attributes:
        images: float32 [N, H, W, 3] held-out images in [-1, 1].
        pairs: Verification pairs (their images are embedded too), or None.
    """

    images: np.ndarray
    pairs: Pairs | None = None


def _batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size]


def _embed_both(reference: Embedder, exported: Embedder, batches: Iterator[np.ndarray]
                ) -> tuple[np.ndarray, np.ndarray]:
    ref, out = [], []
    for batch in batches:
        ref.append(reference(batch))
        out.append(exported(batch))
    return np.concatenate(ref), np.concatenate(out)


def _normalize(e: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(e, axis=1, keepdims=True)
    return e / np.maximum(norm, 1e-12)


def parity(reference: Embedder, exported: Embedder, data: ParityData, config: Config,
           sparse: bool, batch_size: int = 32) -> dict[str, Any]:
    """Embeds the parity data with both models and compares them.

    Args:
        reference: The Keras serving function, float32 images -> embeddings.
        exported: The exported model, the same contract.
        data: Held-out images and optional pairs.
        config: The run config (input shape, zero threshold, folds).
        sparse: Also report nnz and FLOPs per pair of both.
        batch_size: Images per call.

    Returns:
        `images`, `mean_cosine`, `min_cosine`, `max_abs_diff`, and per model
        (`keras`, `exported`) `accuracy` (null without pairs), and with `sparse`
        `mean_nnz`, `flops_per_pair`.

    Raises:
        DataError: If there is nothing to compare, or an image of the pairs does not decode.
    """
    refs: list[np.ndarray] = []
    outs: list[np.ndarray] = []
    if len(data.images):
        ref, out = _embed_both(reference, exported, _batches(data.images, batch_size))
        refs.append(ref)
        outs.append(out)
    scores: dict[str, np.ndarray] = {}
    if data.pairs is not None:
        paths, left, right = unique_images(data.pairs)
        dataset = files_dataset(list(paths), None, batch_size, config.model.input_shape)
        names: list[str] = []

        def images() -> Iterator[np.ndarray]:
            for batch, _, batch_names in dataset:
                names.extend(n.decode() for n in batch_names.numpy())
                yield batch.numpy()

        pair_ref, pair_out = _embed_both(reference, exported, images())
        unreadable = missing_paths(paths, names)
        if unreadable:
            raise DataError(f"{len(unreadable)} image(s) of the pairs do not decode, first: "
                            f"{unreadable[0]}; replace or re-align them")
        for key, emb in (("keras", pair_ref), ("exported", pair_out)):
            e = _normalize(emb)
            scores[key] = np.sum(e[left] * e[right], axis=1)
        refs.append(pair_ref)
        outs.append(pair_out)
    if not refs:
        raise DataError("the parity gate has no images: pass --data_dir (held-out TFRecords) or --pairs")
    ref, out = np.concatenate(refs), np.concatenate(outs)
    cosine = np.sum(_normalize(ref) * _normalize(out), axis=1)
    figures: dict[str, Any] = {
        "images": int(len(ref)),
        "mean_cosine": float(cosine.mean()),
        "min_cosine": float(cosine.min()),
        "max_abs_diff": float(np.abs(ref - out).max()),
    }
    for key, emb in (("keras", ref), ("exported", out)):
        side: dict[str, Any] = {"accuracy": None}
        if scores:
            side["accuracy"] = float(verification_metrics(scores[key], data.pairs.issame,
                                                          folds=data.pairs.fold)["accuracy"])
        if sparse:
            stats = sparsity_stats_np(emb, config.sparsity.zero_threshold)
            side.update(mean_nnz=float(stats["nnz"]), flops_per_pair=float(stats["flops"]))
        figures[key] = side
    return figures


def gate_failure(figures: dict[str, Any], min_cosine: float, max_accuracy_drop: float) -> str:
    """Why the parity figures fail the gate, or "" when they pass.

    Args:
        figures: What `parity` returned.
        min_cosine: Lowest acceptable mean cosine.
        max_accuracy_drop: Largest acceptable accuracy drop, in percentage points.
    """
    if figures["mean_cosine"] < min_cosine:
        return f"mean cosine to the Keras model {figures['mean_cosine']:.6f} < --min_cosine={min_cosine:g}"
    keras_acc, exported_acc = figures["keras"]["accuracy"], figures["exported"]["accuracy"]
    if keras_acc is not None and 100 * (keras_acc - exported_acc) > max_accuracy_drop:
        return (f"verification accuracy drops {100 * (keras_acc - exported_acc):.2f} points "
                f"({100 * keras_acc:.2f}% -> {100 * exported_acc:.2f}%) > "
                f"--max_accuracy_drop={max_accuracy_drop:g}")
    return ""


def is_sparse(config: Config) -> bool:
    """Whether a run learns sparse embeddings (sparse final activation or a sparsity regularizer).

    Args:
        config: The run config.
    """
    return config.model.final_activation != "none" or config.sparsity.type != "none"


# --- Formats ------------------------------------------------------------------------------------

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


def _write_tflite(serve: Any, model: keras.Model, quantize: str, representative: np.ndarray | None,
                  path: Path) -> dict[str, Any]:
    content = convert_function(serve, model, quantize, representative)
    path.write_bytes(content)
    interpreter = _interpreter(content)
    spec: dict[str, Any] = {
        "input": tensor_spec(interpreter.get_input_details()[0]),
        "output": tensor_spec(interpreter.get_output_details()[0]),
    }
    if QUANTIZATIONS.get(quantize).integer_ops:
        # Empty here (the conversion checked it); recorded for whoever audits the file.
        spec["float_ops"] = float_ops_of(content, allow_float_io=not QUANTIZATIONS.get(quantize).integer_io)
    return spec


def _load_tflite(path: Path) -> Embedder:
    return TFLiteModel.from_path(path)


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
    output = concrete.structured_outputs[OUTPUT_NAME]
    return {"input": _float_spec([None, *model.input_shape[1:]], INPUT_NAME),
            "output": _float_spec(output.shape.as_list(), OUTPUT_NAME),
            "signature": "serving_default"}


def _load_saved_model(path: Path) -> Embedder:
    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    return lambda images: signature(**{INPUT_NAME: tf.constant(images)})[OUTPUT_NAME].numpy()


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


def default_min_cosine(quantize: str) -> float:
    """The parity gate's default threshold for a mode (0.999 float, 0.98 int8 kinds).

    Args:
        quantize: A name in `QUANTIZATIONS`.
    """
    return QUANTIZATIONS.get(quantize).min_cosine


def failed_name(filename: str) -> str:
    """The name a model that failed the gate keeps: `model.failed.tflite`, `saved_model.failed`.

    Args:
        filename: The model's name in a passed export.
    """
    stem, dot, suffix = filename.partition(".")
    return f"{stem}.failed{dot}{suffix}"


@dataclass(frozen=True)
class ExportResult:
    """One export: where it is and what export.json says.

    Attributes:
        folder: The export folder (model + export.json).
        model_path: The model file (or SavedModel directory).
        record: The contents of export.json.
    """

    folder: Path
    model_path: Path
    record: dict[str, Any]

    @property
    def passed(self) -> bool:
        """Whether the parity gate passed."""
        return bool(self.record["passed"])


def _size_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def export_folder(output: str | os.PathLike, fmt: str, quantize: str, flip_concat: bool) -> Path:
    """Where one export goes: `<output>/<format>_<quantize>`, `_flip` appended with flip-concat.

    Args:
        output: The parent folder (`<model_dir>/export` by default).
        fmt: A name in `FORMATS`.
        quantize: A name in `QUANTIZATIONS`.
        flip_concat: Whether the graph has the flip-concat.
    """
    return Path(output) / f"{fmt}_{quantize}{'_flip' if flip_concat else ''}"


def export(model: keras.Model, config: Config, fmt: str, quantize: Sequence[str],
           output: str | os.PathLike, data: ParityData, representative: np.ndarray | None = None,
           flip_concat: bool = False, min_cosine: float | None = None, max_accuracy_drop: float = 0.5,
           provenance: dict[str, Any] | None = None,
           progress: Callable[[str], None] | None = None) -> list[ExportResult]:
    """Writes exported models and their export.json, each after the parity gate ran on the written file.

    Each folder (`export_folder`) is built under a temporary name and renamed
    into place, so it never holds a half-written model; an earlier export in
    the same folder is replaced. A model that fails the gate is kept for
    inspection under `failed_name` (`model.failed.tflite`), next to an
    export.json with `"passed": false` and the reason.

    Args:
        model: The run's backbone (Keras), the parity reference.
        config: The run config.
        fmt: A name in `FORMATS`.
        quantize: Names in `QUANTIZATIONS` that the format takes, one model each.
        output: Parent of the export folders.
        data: Held-out images and pairs of the parity gate.
        representative: Calibration images of the `int8` modes.
        flip_concat: Bake the flip-concat test-time augmentation into the graph.
        min_cosine: Gate threshold on the mean cosine; None is each mode's default.
        max_accuracy_drop: Gate threshold on the accuracy drop, in points.
        provenance: Extra entries for export.json (run directory, data sources).
        progress: Called with a line before each long step (conversion, parity gate).

    Returns:
        One result per mode; `passed` says whether the gate passed.

    Raises:
        ConfigError: If the format does not take a mode, or an integer mode keeps a float op.
    """
    entries = [check_format(fmt, q) for q in quantize]
    say = progress or (lambda line: None)
    model = for_export(model)
    # One trace for the reference and the float conversions, one for the integer ones
    # (PReLU rewritten), traced when first needed.
    serve = serving_function(model, flip_concat)

    @functools.cache
    def integer_serving() -> tuple[Any, keras.Model]:
        rewritten = rewrite_prelu(model)
        return (serve if rewritten is model else serving_function(rewritten, flip_concat)), rewritten

    def converted(mode: str) -> tuple[Any, keras.Model]:
        return integer_serving() if QUANTIZATIONS.get(mode).integer_ops else (serve, model)

    def reference(images: np.ndarray) -> np.ndarray:
        return serve(tf.constant(images))[OUTPUT_NAME].numpy()

    results = []
    for entry, mode in zip(entries, quantize, strict=True):
        threshold = default_min_cosine(mode) if min_cosine is None else min_cosine
        folder = export_folder(output, fmt, mode, flip_concat)
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            written = tmp / entry.filename
            say(f"{fmt} {mode}: converting")
            spec = entry.write(*converted(mode), mode, representative, written)
            say(f"{fmt} {mode}: parity gate on {len(data.images)} held-out images"
                + (f" and {len(data.pairs)} pairs" if data.pairs is not None else ""))
            figures = parity(reference, entry.load(written), data, config, is_sparse(config))
            reason = gate_failure(figures, threshold, max_accuracy_drop)
            name = failed_name(entry.filename) if reason else entry.filename
            written.rename(tmp / name)
            size = _size_bytes(tmp / name)
            record = {
                "format": fmt, "quantize": mode, "file": name,
                "size_bytes": size, "size_mib": size / 2**20,
                "model": config.model.name, "embedding_size": config.model.embedding_size,
                "compression": config.compression.type, "quantization_aware": is_quantized(model),
                "flip_concat": flip_concat,
                "output_is": ("concat(e(x), e(flip(x))), " if flip_concat else "e(x), ")
                + "not L2-normalised",
                "input_is": "RGB NHWC float32 in [-1, 1] (x / 127.5 - 1); an int8 input takes "
                            "round(x / scale + zero_point) with the input's quantization",
                **spec,
                "representative_count": 0 if representative is None else int(len(representative)),
                "parity": figures, "min_cosine": threshold, "max_accuracy_drop": max_accuracy_drop,
                "passed": not reason, "reason": reason,
                **(provenance or {}),
            }
            (tmp / "export.json").write_text(json.dumps(record, indent=2))
            if folder.exists():
                # os.replace cannot put a directory over a non-empty one.
                shutil.rmtree(folder)
        results.append(ExportResult(folder, folder / name, record))
    return results


def format_summary(results: Sequence[ExportResult]) -> str:
    """The closing table of an export: one row per model.

    Args:
        results: The exports, in order.

    Returns:
        The table as text (no trailing newline).
    """
    head = (f"{'format':<12}{'quantize':<10}{'MiB':>8}{'mean cos':>11}{'min cos':>10}"
            f"{'acc keras':>11}{'acc export':>11}{'nnz keras':>11}{'nnz export':>11}  result")
    lines = [head, "-" * len(head)]

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    def nnz(side: dict[str, Any]) -> str:
        return f"{side['mean_nnz']:.1f}" if "mean_nnz" in side else "-"

    for result in results:
        r, p = result.record, result.record["parity"]
        lines.append(
            f"{r['format']:<12}{r['quantize']:<10}{r['size_mib']:>8.3f}{p['mean_cosine']:>11.6f}"
            f"{p['min_cosine']:>10.6f}{pct(p['keras']['accuracy']):>11}{pct(p['exported']['accuracy']):>11}"
            f"{nnz(p['keras']):>11}{nnz(p['exported']):>11}  {'PASS' if result.passed else 'FAIL'}")
    return "\n".join(lines)
