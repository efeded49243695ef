"""Model compression during training: quantization-aware training and pruning (TF-MOT).

`quantize.py` and `prune.py` are the only modules of the package that import
TensorFlow Model Optimization; everything else asks this package:

- `for_export(model)`: the model a converter or an embedding job should see.
  Pruning wrappers are stripped (the masks are already multiplied into the
  kernels); a quantization-aware model is returned as is, its fake-quant
  ranges are what the TFLite converter turns into int8 scales.
- `is_quantized(model)`: whether the model carries fake-quant wrappers, so an
  exporter can pick the conversion that honours them.
"""

from __future__ import annotations

from sparse_embed.keras import keras


def for_export(model: keras.Model) -> keras.Model:
    """Returns the model to convert or embed with: pruning wrappers stripped, QAT kept.

    Args:
        model: A backbone, plain, pruned (wrapped by `prune_low_magnitude`) or
            quantization-aware.

    Returns:
        `model` itself when it has no pruning wrapper, otherwise a copy with
        each wrapper replaced by its layer holding the masked kernel.
    """
    from sparse_embed.compression import prune

    if not prune.has_pruning_wrappers(model):
        return model
    return prune.strip(model)


def is_quantized(model: keras.Model) -> bool:
    """Whether `model` is quantization-aware (has TF-MOT quantize wrappers or layers).

    Args:
        model: A Keras model.
    """
    from sparse_embed.compression import quantize

    return quantize.has_quantize_layers(model)


__all__ = ["for_export", "is_quantized"]
