"""Magnitude pruning of a backbone with TF-MOT (`prune_low_magnitude`)."""

from __future__ import annotations

import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.sparsity.keras import pruning_wrapper

from sparse_embed.keras import keras


def has_pruning_wrappers(model: keras.Model) -> bool:
    """Whether any layer of `model` is a `prune_low_magnitude` wrapper.

    Args:
        model: A Keras model.
    """
    return any(isinstance(layer, pruning_wrapper.PruneLowMagnitude) for layer in model.layers)


def strip(model: keras.Model) -> keras.Model:
    """Returns a copy of `model` with every pruning wrapper replaced by its masked layer.

    Args:
        model: A functional model with `prune_low_magnitude` wrappers.
    """
    return tfmot.sparsity.keras.strip_pruning(model)
