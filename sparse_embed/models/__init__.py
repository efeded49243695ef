"""Embedding networks: images -> embeddings, one registry for every family.

Every entry of `MODELS` is a builder

    builder(embedding_size: int = 128, final_activation: str = "none",
            input_size: int = 112, width: float = 1.0) -> keras.Model

returning a functional model named after the entry, float32
[B, input_size, input_size, 3] in [-1, 1] -> float32 [B, embedding_size]:
the embedding after the final activation, not L2-normalised (the trainer
normalises). Tiny variants (name ending in `_tiny`) default to small inputs.
"""

from __future__ import annotations

from collections.abc import Callable

from sparse_embed.config import ModelConfig
from sparse_embed.keras import keras
from sparse_embed.registry import Registry

MODELS: Registry[Callable[..., keras.Model]] = Registry("model")


def build_model(config: ModelConfig) -> keras.Model:
    """Builds the model a config names.

    Args:
        config: The run's model section.

    Returns:
        The model `MODELS[config.name]` builds from the config's fields.

    Raises:
        ConfigError: If the name is unknown or a field is out of range.
    """
    builder = MODELS.get(config.name)
    return builder(embedding_size=config.embedding_size, final_activation=config.final_activation,
                   input_size=config.input_size, width=config.width)


# Imported after MODELS exists: each family module registers its entries on import.
from sparse_embed.models import mobilefacenet  # noqa: E402, F401
