"""Classification heads / losses, one registry selected by `head.name`.

`HEADS` (heads/params.py) maps every head's name to its parameter class: the
schema and defaults of `head.params`, the builder that makes the layer, and
which shared `head` fields apply. Reading it needs no TensorFlow, so a config
is validated before TensorFlow starts; the family modules (margin.py,
pair.py, proxy.py, partial_fc.py) are imported when a head is built.

Every builder has the signature

    builder(num_classes: int, embedding_size: int, config: HeadConfig) -> keras.layers.Layer

and returns an unbuilt head layer with the contract of `margin.ClassifierHead`:
``head(embeddings, labels, training=None)`` -> scalar float32 mean loss over
the batch (embeddings float32 [B, D] as the backbone produces them, not
normalised; labels int32/int64 [B]), ``head.logits(embeddings)`` -> float32
[B, C] without margin, and ``head.loss_and_accuracy(embeddings, labels)``, what
the trainer calls. `build_head` wraps a margin head in `ShardedMarginHead`
(Partial FC) when `head.sharded` is set; that head has no full [B, C] logits.

The probabilistic methods (`heads/probabilistic.py`) read the backbone's
parameter vectors `[mean | extra]` (B, P) instead of embeddings; their
builders take the run's distribution as a fourth argument,

    builder(num_classes, P, config, distribution=None) -> keras.layers.Layer

and build the method's own distribution, P wide, when it is None.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any

from sparse_embed.errors import ConfigError
from sparse_embed.heads.params import HEADS, HeadParams

if TYPE_CHECKING:
    from sparse_embed.config import HeadConfig
    from sparse_embed.distributions import Distribution
    from sparse_embed.keras import keras


def head_builder(name: str) -> Any:
    """Returns the builder function of a registered head, importing its family module.

    Args:
        name: A name in `HEADS`.

    Raises:
        ConfigError: If the name is unknown.
    """
    module, _, function = HEADS.get(name).builder.rpartition(".")
    return getattr(importlib.import_module(f"sparse_embed.heads.{module}"), function)


def build_head(num_classes: int, embedding_size: int, config: HeadConfig,
               strategy: Any = None, distribution: Distribution | None = None) -> keras.layers.Layer:
    """Builds the head a config names, sharded over the workers with `config.sharded`.

    Args:
        num_classes: Number of training identities.
        embedding_size: Width of the backbone's output: the embedding dimension
            D, or P, the parameter vector's, for a probabilistic method.
        config: The run's head section.
        strategy: The distribution strategy a sharded head splits its classes
            over; None is one process.
        distribution: The run's distribution (`model.distribution`), which a
            probabilistic method reads the backbone's output with; the other
            heads do not take it.

    Returns:
        The unbuilt head layer; its weights are created by `head.build((None, D))`
        or the first call.

    Raises:
        ConfigError: If the name is unknown, an argument is out of range, or a
            sharded head is asked of a head without class-centre margins or
            with fewer classes than workers.
    """
    builder = head_builder(config.name)
    try:
        if "distribution" in inspect.signature(builder).parameters:
            head = builder(num_classes, embedding_size, config, distribution=distribution)
        else:
            head = builder(num_classes, embedding_size, config)
        if not config.sharded:
            return head
        from sparse_embed.heads.margin import MarginHead
        from sparse_embed.heads.partial_fc import ShardedMarginHead
        from sparse_embed.strategy import SingleProcess

        if not isinstance(head, MarginHead):
            raise ValueError("head.sharded needs a normalised margin head (e.g. arcface)")
        return ShardedMarginHead(head, strategy or SingleProcess(), sample_rate=config.sample_rate,
                                 name=f"sharded_{head.name}")
    except ValueError as e:
        raise ConfigError(f"head {config.name!r}: {e}") from e


__all__ = ["HEADS", "HeadParams", "build_head", "head_builder"]
