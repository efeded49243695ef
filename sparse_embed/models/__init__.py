"""Embedding networks: images -> embeddings, one registry for every family.

Every entry of `MODELS` is a builder with the same arguments,

    builder(embedding_size: int, final_activation: str = "none", input_size: int,
            width: float = 1.0, input_width: int = 0, dropout: float = 0.0,
            se: bool = False) -> keras.Model

returning a functional model named after the entry, float32
[B, input_size, input_width or input_size, 3] in [-1, 1] -> float32
[B, embedding_size]: the embedding after the final activation (see
embedding.py), not L2-normalised (the trainer normalises). `width` is the
family's channel multiplier (1 is the published network), `dropout` the rate
of a dropout layer before the embedding layer, `se` asks for
squeeze-and-excitation blocks. A builder checks every argument before it
builds a layer and rejects what its family cannot do (se=True without SE
blocks, an input size the architecture does not take) with a `ConfigError`
that names the valid values. Defaults are the published network's (input
size, embedding size); tiny variants (name ending in `_tiny`) default to
small inputs and build in well under a second, for tests.

Families: mobilefacenet.py, iresnet.py (iresnet18/34/50/100, faceresnet),
mobilenet_v2.py, sphereface.py (sphereface20), nin.py (CIFAR); each registers
its builders in `MODELS` (registry.py) when this package imports it.

Landmark networks (images -> five points) are a family of their own,
`LANDMARK_MODELS`: landnet.py (Open Model Zoo's landmarks-regression-retail-0009).

`build_model` adds an extra head when `model.distribution` is not `dirac`:
the model's output is then the parameter vector `[embedding | extra]`
(embedding.py's `with_extra_head`), read by `sparse_embed.distributions`.
"""

from __future__ import annotations

from sparse_embed.config import ModelConfig
from sparse_embed.keras import keras

# Each family module registers its entries in MODELS on import.
from sparse_embed.models import iresnet, landnet, mobilefacenet, mobilenet_v2, nin, sphereface  # noqa: F401
from sparse_embed.models.embedding import with_extra_head
from sparse_embed.models.registry import LANDMARK_MODELS, MODELS


def build_model(config: ModelConfig) -> keras.Model:
    """Builds the model a config names.

    Args:
        config: The run's model section.

    Returns:
        The model `MODELS[config.name]` builds from the config's fields; with a
        distribution that has extra parameters, with an extra head predicting them.

    Raises:
        ConfigError: If the name is unknown or a field is out of range.
    """
    builder = MODELS.get(config.name)
    extra = config.distribution.build(config.embedding_size).num_parameters - config.embedding_size
    model = builder(embedding_size=config.embedding_size, final_activation=config.final_activation,
                    input_size=config.input_size, width=config.width, input_width=config.input_width,
                    dropout=config.dropout, se=config.se)
    return with_extra_head(model, extra) if extra else model


__all__ = ["LANDMARK_MODELS", "MODELS", "build_model"]
