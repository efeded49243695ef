"""`tf`, imported on first use.

The distributions' option classes and registry load without TensorFlow, so
that the config can validate a `model.distribution` section before
TensorFlow starts (as it does for `head.params`); the first attribute read
imports TensorFlow through `sparse_embed.keras`, the one place it is imported.
"""

from __future__ import annotations

from typing import Any


class _LazyTensorFlow:
    """Forwards attribute reads to the `tf` module of `sparse_embed.keras`."""

    def __getattr__(self, name: str) -> Any:
        from sparse_embed.keras import tf as module

        return getattr(module, name)


tf: Any = _LazyTensorFlow()
