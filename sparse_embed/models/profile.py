"""Model cost: parameter and multiply-accumulate counts, CPU latency.

Counts follow the convention of the MobileNet / MobileFaceNet papers' MAdds:
only the layers that multiply inputs by weights count (convolutions, depthwise
and separable convolutions, dense layers); batch norm (foldable into the
preceding convolution), PReLU, additions, pooling and reshapes count zero.
MACs are derived from each layer's kernel and its actual output shape in the
model's graph, so they follow the input size, strides and padding exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import numpy as np

from sparse_embed.keras import keras, tf
from sparse_embed.registry import Registry

Counter = Callable[[keras.layers.Layer, tuple, tuple], int]

# MAC counters, keyed by layer class name: counter(layer, input_shape,
# output_shape) -> MACs of one call. A layer uses the counter of the first
# class in its MRO that has one, so subclasses (Conv1D/2D/3D of Conv,
# QAT/pruning wrappers of Wrapper) are covered; a family with its own
# multiplying layer registers it here.
MAC_COUNTERS: Registry[Counter] = Registry("MAC counter")


def _size(shape: tuple) -> int:
    return int(np.prod([int(d) for d in shape], dtype=np.int64))


def _positions(layer: keras.layers.Layer, shape: tuple) -> int:
    """Output positions per example: every axis but batch and channels."""
    channels_first = getattr(layer, "data_format", "channels_last") == "channels_first"
    return _size(shape[2:] if channels_first else shape[1:-1])


@MAC_COUNTERS.register("Conv")
@MAC_COUNTERS.register("DepthwiseConv2D")
def _conv_macs(layer: keras.layers.Layer, input_shape: tuple, output_shape: tuple) -> int:
    # Kernel [k..., in / groups, filters]: each of the `filters` outputs of a
    # position takes prod(k) * in / groups MACs, kernel.size per position in all.
    # Depthwise kernel [k..., in, multiplier]: prod(k) MACs for each of the
    # in * multiplier outputs, again kernel.size per position.
    kernel = layer.depthwise_kernel if hasattr(layer, "depthwise_kernel") else layer.kernel
    return _positions(layer, output_shape) * _size(kernel.shape)


@MAC_COUNTERS.register("SeparableConv")
def _separable_macs(layer: keras.layers.Layer, input_shape: tuple, output_shape: tuple) -> int:
    return _positions(layer, output_shape) * (
        _size(layer.depthwise_kernel.shape) + _size(layer.pointwise_kernel.shape)
    )


@MAC_COUNTERS.register("Conv2DTranspose")
@MAC_COUNTERS.register("Conv3DTranspose")
@MAC_COUNTERS.register("Conv1DTranspose")
def _transpose_macs(layer: keras.layers.Layer, input_shape: tuple, output_shape: tuple) -> int:
    # Every input position is multiplied by the whole kernel [k..., filters, in].
    return _positions(layer, input_shape) * _size(layer.kernel.shape)


@MAC_COUNTERS.register("Dense")
def _dense_macs(layer: keras.layers.Layer, input_shape: tuple, output_shape: tuple) -> int:
    return _size(output_shape[1:-1]) * _size(layer.kernel.shape)


@MAC_COUNTERS.register("Wrapper")
def _wrapper_macs(layer: keras.layers.Layer, input_shape: tuple, output_shape: tuple) -> int:
    # Quantization / pruning wrappers compute what the wrapped layer computes.
    counter = _counter(layer.layer)
    return counter(layer.layer, input_shape, output_shape) if counter is not None else 0


def _counter(layer: keras.layers.Layer) -> Counter | None:
    for cls in type(layer).__mro__:
        if cls.__name__ in MAC_COUNTERS:
            return MAC_COUNTERS.get(cls.__name__)
    return None


def _layers(model: keras.Model, seen: set[int] | None = None) -> Iterator[keras.layers.Layer]:
    """The model's layers, nested models expanded, each layer once."""
    seen = set() if seen is None else seen
    for layer in model.layers:
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, keras.Model):
            yield from _layers(layer, seen)
        else:
            yield layer


def count_params(model: keras.Model) -> int:
    """Returns the number of parameters of `model`.

    Every weight counts, trainable or frozen, except batch-norm moving
    statistics: they are state, not parameters (PyTorch's `parameters()`
    convention, which the papers' counts follow). A weight shared by several
    layers counts once.

    Args:
        model: A built Keras model.
    """
    statistics = {
        id(getattr(module, attr))
        for module in model.submodules
        for attr in ("moving_mean", "moving_variance")
        if getattr(module, attr, None) is not None
    }
    return sum(_size(w.shape) for w in model.weights if id(w) not in statistics)


def count_macs(model: keras.Model) -> int:
    """Returns the multiply-accumulates of one forward pass of one example.

    Each call of a multiplying layer in a graph counts, with that call's
    output shape; nested functional models are expanded (their layers count
    their calls inside the nested graph, so a nested model called twice counts
    once).

    Args:
        model: A functional or sequential Keras model built on a fully defined
            input shape (batch aside).

    Raises:
        ValueError: If a multiplying layer was never called in a graph (a
            subclassed model) or its output shape is not fully defined.
    """
    total = 0
    for layer in _layers(model):
        counter = _counter(layer)
        if counter is None:
            continue
        if not layer.inbound_nodes:
            raise ValueError(f"cannot count the MACs of layer {layer.name!r}: it was never called "
                             "in a functional graph (subclassed models are not supported)")
        for node in range(len(layer.inbound_nodes)):
            shape = tuple(layer.get_output_shape_at(node))
            if any(d is None for d in shape[1:]):
                raise ValueError(f"cannot count the MACs of layer {layer.name!r}: its output shape "
                                 f"{shape} is not fully defined; build the model on a fixed input "
                                 "size")
            total += counter(layer, tuple(layer.get_input_shape_at(node)), shape)
    return total


def format_count(n: int) -> str:
    """Formats a count as in papers: 1234567 -> '1.23M'.

    Args:
        n: A non-negative count.
    """
    for divisor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= divisor:
            return f"{n / divisor:.{max(0, 2 - int(math.log10(n / divisor)))}f}{suffix}"
    return str(n)


def measure_latency(model: keras.Model, runs: int = 10, warmup: int = 2, seed: int = 0) -> float:
    """Returns the median seconds of one inference of one example (batch 1).

    The model runs inside one `tf.function` (traced during the warm-up runs)
    on a fixed random image in [-1, 1]. The thread pools are whatever the
    process set up before TensorFlow's first op: for a one-thread figure call
    `tf.config.threading.set_{intra,inter}_op_parallelism_threads(1)` first.

    Args:
        model: A model with a fully defined input shape (batch aside).
        runs: Timed runs, >= 1; the median is returned.
        warmup: Untimed runs before them, >= 1 (the first traces the function).
        seed: Seed of the input image.

    Raises:
        ValueError: If `runs` or `warmup` is < 1.
    """
    if runs < 1 or warmup < 1:
        raise ValueError(f"runs and warmup must be >= 1, got runs={runs}, warmup={warmup}")
    shape = (1, *(int(d) for d in model.input_shape[1:]))
    images = tf.constant(np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32))
    forward = tf.function(lambda x: model(x, training=False), autograph=False)
    for _ in range(warmup):
        forward(images).numpy()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        forward(images).numpy()
        times.append(time.perf_counter() - start)
    return float(np.median(times))
