"""Model compression during training: quantization-aware training and pruning (TF-MOT).

The config keys, the recipes and the export: docs/compression.md.

`quantize.py` and `prune.py` are the only modules of the package that import
TensorFlow Model Optimization; everything else asks this package:

- `compress(backbone, config, total_steps)`: the backbone the trainer trains,
  by `compression.type` (`COMPRESSIONS`). It is applied to the backbone and
  embedding only; the head is never compressed.
- `after_restore(model)`: what a compressed model needs once its weights are
  restored (the pruning-preserving masks of PQAT).
- `for_export(model)`: the model a converter or an embedding job should see.
  Pruning wrappers are stripped (the masks are multiplied into the kernels
  first); a quantization-aware model is returned as is, its fake-quant ranges
  are what the TFLite converter turns into int8 scales.
- `is_quantized(model)`: whether the model carries fake-quant wrappers, so an
  exporter can pick the conversion that honours them.
- `callbacks(model)`: what `fit` needs for it (the pruning step counters).
- `metrics(model)`: `compress/...` scalars for the training logs.
- `identical_on_workers(model)`: state every worker computes alike from the
  same weights (pruning masks), which must not be averaged like BN statistics.

A training run and everything that reads it (`resume`, `load_backbone`)
build the same structure with `compress`, so checkpoints of compressed runs
restore like any other.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from sparse_embed.config import CompressionConfig
from sparse_embed.keras import keras, tf
from sparse_embed.registry import Registry

# compression.type -> (backbone, config, total_steps) -> the model to train.
COMPRESSIONS: Registry[Callable[[keras.Model, CompressionConfig, int], keras.Model]] = Registry(
    "compression.type")


def _tfmot_loaded() -> bool:
    """Whether TF-MOT is imported: a model of this process can hold its wrappers only if it is.

    The questions below are asked of every model the suite trains, embeds or
    exports; answering them for an uncompressed model without importing TF-MOT
    spares each such process its import (a second or more of CPU).
    """
    return "tensorflow_model_optimization" in sys.modules


@COMPRESSIONS.register("none")
def _none(backbone: keras.Model, config: CompressionConfig, total_steps: int) -> keras.Model:
    del config, total_steps
    return backbone


@COMPRESSIONS.register("qat")
def _qat(backbone: keras.Model, config: CompressionConfig, total_steps: int) -> keras.Model:
    from sparse_embed.compression import quantize

    del total_steps
    return quantize.quantize(backbone, config)


@COMPRESSIONS.register("prune")
def _prune(backbone: keras.Model, config: CompressionConfig, total_steps: int) -> keras.Model:
    from sparse_embed.compression import prune

    return prune.prune(backbone, config, total_steps)


@COMPRESSIONS.register("prune_qat")
def _prune_qat(backbone: keras.Model, config: CompressionConfig, total_steps: int) -> keras.Model:
    from sparse_embed.compression import quantize

    del total_steps
    return quantize.quantize(for_export(backbone), config, preserve_sparsity=True)


def compress(backbone: keras.Model, config: CompressionConfig, total_steps: int) -> keras.Model:
    """Returns the backbone to train under `config.type` (the backbone itself for `none`).

    Args:
        backbone: A float backbone from `sparse_embed.models.build_model`, with
            the weights the compressed model starts from; for `prune_qat`, a
            pruned one (wrappers are stripped first).
        config: The `compression` section.
        total_steps: The run's `train.steps` (where pruning ends by default).

    Raises:
        ConfigError: If the section's values do not fit together (see quantize.py, prune.py).
    """
    return COMPRESSIONS.get(config.type)(backbone, config, total_steps)


def after_restore(model: keras.Model) -> None:
    """Brings state that is not checkpointed in line with freshly restored weights.

    Args:
        model: A model returned by `compress`, after its weights were restored.
    """
    if is_quantized(model):
        from sparse_embed.compression import quantize

        quantize.refresh_sparsity_masks(model)


def for_export(model: keras.Model) -> keras.Model:
    """Returns the model to convert or embed with: pruning wrappers stripped, QAT kept.

    Args:
        model: A backbone, plain, pruned (wrapped by `prune_low_magnitude`) or
            quantization-aware.

    Returns:
        `model` itself when it has no pruning wrapper, otherwise a copy with
        each wrapper replaced by its layer holding the masked kernel.
    """
    if not _tfmot_loaded():
        return model
    from sparse_embed.compression import prune

    if not prune.has_pruning_wrappers(model):
        return model
    return prune.strip(model)


def is_quantized(model: keras.Model) -> bool:
    """Whether `model` is quantization-aware (has TF-MOT quantize wrappers or layers).

    Args:
        model: A Keras model.
    """
    if not _tfmot_loaded():
        return False
    from sparse_embed.compression import quantize

    return quantize.has_quantize_layers(model)


def callbacks(model: keras.Model) -> list[keras.callbacks.Callback]:
    """Keras callbacks a `fit` of `model` needs (the pruning step counters), empty when none.

    Args:
        model: A model returned by `compress`.
    """
    if not _tfmot_loaded():
        return []
    from sparse_embed.compression import prune

    return [prune.PruningStep()] if prune.has_pruning_wrappers(model) else []


def identical_on_workers(model: keras.Model) -> list[tf.Variable]:
    """Float state that workers compute alike from the same weights: pruning masks and thresholds.

    Quantizer ranges are not in it: activation ranges are moving averages of
    each worker's own batches (averaged like BN statistics), and weight ranges
    are recomputed from the (identical) weights at every step.

    Args:
        model: A model returned by `compress`.
    """
    if not _tfmot_loaded():
        return []
    from sparse_embed.compression import prune

    return prune.pruning_variables(model)


def metrics(model: keras.Model) -> Callable[[], dict[str, tf.Tensor]]:
    """Returns a function, traceable in the train step, giving `compress/...` scalars of `model`.

    `compress/weight_sparsity` is the fraction of zeros over the pruned
    kernels (masks applied) of a `prune` model, or over the Conv2D and Dense
    kernels of a pruning-preserving QAT model; an empty dict for others.

    Args:
        model: A model returned by `compress`.
    """
    if not _tfmot_loaded():
        return dict
    from sparse_embed.compression import prune, quantize

    if prune.has_pruning_wrappers(model):
        kernels = prune.masked_kernels(model)
    elif quantize.preserves_sparsity(model):
        kernels = quantize.quantized_kernels(model)
    else:
        return dict

    total = float(sum(k().shape.num_elements() for k in kernels))

    def scalars() -> dict[str, tf.Tensor]:
        zeros = tf.add_n([tf.reduce_sum(tf.cast(tf.equal(k(), 0), tf.float32)) for k in kernels])
        return {"compress/weight_sparsity": zeros / total}

    return scalars


__all__ = [
    "COMPRESSIONS",
    "after_restore",
    "callbacks",
    "compress",
    "for_export",
    "identical_on_workers",
    "is_quantized",
    "metrics",
]
