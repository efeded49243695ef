"""Classification heads / losses, one registry selected by `head.name`.

Every entry of `HEADS` is a builder

    builder(num_classes: int, embedding_size: int, config: HeadConfig) -> keras.layers.Layer

returning an unbuilt head layer with the contract of `margin.ClassifierHead`:
``head(embeddings, labels, training=None)`` -> scalar float32 mean loss over
the batch (embeddings float32 [B, D] as the backbone produces them, not
normalised; labels int32/int64 [B]), ``head.logits(embeddings)`` -> float32
[B, C] without margin, and ``head.loss_and_accuracy(embeddings, labels)``, what
the trainer calls. `build_head` wraps a margin head in `ShardedMarginHead`
(Partial FC) when `head.sharded` is set; that head has no full [B, C] logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sparse_embed.config import HeadConfig
from sparse_embed.errors import ConfigError
from sparse_embed.heads import margin, pair, proxy
from sparse_embed.heads.margin import ArcFaceHead, ClassifierHead, MarginHead, SoftmaxHead
from sparse_embed.heads.partial_fc import ShardedMarginHead
from sparse_embed.keras import keras
from sparse_embed.registry import Registry
from sparse_embed.strategy import SingleProcess

HeadBuilder = Callable[[int, int, HeadConfig], keras.layers.Layer]

HEADS: Registry[HeadBuilder] = Registry("head")
HEADS.register("softmax")(margin.softmax_head)
HEADS.register("arcface")(margin.arcface_head)
HEADS.register("cosface")(margin.cosface_head)
HEADS.register("sphereface")(margin.sphereface_head)
HEADS.register("combined")(margin.combined_head)
for _name, _builder in {**pair.PAIR_HEADS, **proxy.PROXY_HEADS}.items():
    HEADS.register(_name)(_builder)


def build_head(num_classes: int, embedding_size: int, config: HeadConfig,
               strategy: Any = None) -> keras.layers.Layer:
    """Builds the head a config names, sharded over the workers with `config.sharded`.

    Args:
        num_classes: Number of training identities.
        embedding_size: Embedding dimension D of the backbone.
        config: The run's head section.
        strategy: The distribution strategy a sharded head splits its classes
            over; None is one process.

    Returns:
        The unbuilt head layer; its weights are created by `head.build((None, D))`
        or the first call.

    Raises:
        ConfigError: If the name is unknown, an argument is out of range, or a
            sharded head is asked of a head without class-centre margins or
            with fewer classes than workers.
    """
    builder = HEADS.get(config.name)
    try:
        head = builder(num_classes, embedding_size, config)
        if not config.sharded:
            return head
        if not isinstance(head, MarginHead):
            raise ValueError("head.sharded needs a normalised margin head (e.g. arcface)")
        return ShardedMarginHead(head, strategy or SingleProcess(), sample_rate=config.sample_rate,
                                 name=f"sharded_{head.name}")
    except ValueError as e:
        raise ConfigError(f"head {config.name!r}: {e}") from e


__all__ = [
    "HEADS",
    "ArcFaceHead",
    "ClassifierHead",
    "HeadBuilder",
    "MarginHead",
    "ShardedMarginHead",
    "SoftmaxHead",
    "build_head",
]
