"""Quantization-aware training of a backbone with TF-MOT."""

from __future__ import annotations

from tensorflow_model_optimization.python.core.quantization.keras import quantize_layer, quantize_wrapper

from sparse_embed.keras import keras


def has_quantize_layers(model: keras.Model) -> bool:
    """Whether `model` carries TF-MOT fake-quant (quantize wrappers or input quantize layers).

    Args:
        model: A Keras model.
    """
    kinds = (quantize_wrapper.QuantizeWrapper, quantize_layer.QuantizeLayer)
    return any(isinstance(layer, kinds) for layer in model.layers)
