"""`MODELS`, the registry of embedding networks (see `sparse_embed.models` for the builders' contract),
and `LANDMARK_MODELS`, the registry of landmark networks (builder(input_size) -> images -> points).

The registry lives apart from the package's `__init__`, which imports every
family module: each family registers its builders here on import, without
importing the package that imports it.
"""

from __future__ import annotations

from collections.abc import Callable

from sparse_embed.keras import keras
from sparse_embed.registry import Registry

MODELS: Registry[Callable[..., keras.Model]] = Registry("model")

# Landmark regressors (images -> five (x, y) points): their own family, as they
# take none of the embedding builders' arguments.
LANDMARK_MODELS: Registry[Callable[..., keras.Model]] = Registry("landmark model")
