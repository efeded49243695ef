"""Every head's own parameters: the schema of `head.params`, one frozen dataclass per head.

A head is registered here, on its parameter class, with the decorator all
registries use:

    @HEADS.register("cosface")
    @dataclass(frozen=True)
    class CosFace(HeadParams):
        builder: ClassVar[str] = "margin.cosface_head"
        shared: ClassVar[tuple[str, ...]] = MARGIN_SHARED
        scale: float = field(default=64.0, metadata=positive())
        margin: float = field(default=0.35, metadata=in_range(0.0, 1.0, "[0, 1)"))

The class's fields are the head layer's own keyword arguments, and their
defaults are the layer's defaults (the layers take them from here: one
source). `builder` names the function, `module.function` under
`sparse_embed.heads`, that builds the layer; it is imported only when a head
is built, so this module and the config validation that reads it run without
TensorFlow. `shared` lists the fields of `head` (besides `name`) that apply
to the head; a shared field set away from its default on a head it does not
apply to is a config error, never silently ignored.

Field metadata holds the value checks the config applies before TensorFlow
starts: `check` (a predicate and the text "must be ..." completes) and
`choices` (the valid strings).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sparse_embed.registry import Registry

# The shared `head` fields each family takes (see `HeadConfig`).
MARGIN_SHARED = ("sharded", "sample_rate", "loss", "focal_gamma", "sub_centers")
PAIR_SHARED = ("gather_batch",)

# The pair losses' distance on the embeddings, and the triplet miners.
DISTANCES = ("cosine", "squared_euclidean")
MININGS = ("semi_hard", "batch_hard", "all")


def check(predicate: Callable[[Any], bool], text: str) -> dict[str, Any]:
    """Field metadata: the value must satisfy `predicate`; `text` completes "must be ...".

    Args:
        predicate: True for valid values.
        text: The rule as the error message states it, e.g. "> 0".
    """
    return {"check": (predicate, text)}


def positive() -> dict[str, Any]:
    """Field metadata: a value > 0."""
    return check(lambda v: v > 0, "> 0")


def non_negative() -> dict[str, Any]:
    """Field metadata: a value >= 0."""
    return check(lambda v: v >= 0, ">= 0")


def in_range(low: float, high: float, text: str) -> dict[str, Any]:
    """Field metadata: low <= value < high.

    Args:
        low: Smallest valid value.
        high: Bound the value stays below.
        text: The interval as the error message writes it, e.g. "[0, pi/2)".
    """
    return check(lambda v: low <= v < high, f"in {text}")


def choices(*names: str) -> dict[str, Any]:
    """Field metadata: one of `names`.

    Args:
        *names: The valid strings.
    """
    return {"choices": names}


@dataclass(frozen=True)
class HeadParams:
    """Base of the per-head parameter classes (`head.params`).

    Attributes:
        builder: `module.function` under `sparse_embed.heads` that builds the
            head layer from `(num_classes, embedding_size, head_config)`.
        shared: The `HeadConfig` fields besides `name` that apply to the head.
        pairs: The head is a pair loss: it needs at least two images of every
            class in a batch (the `p_k` sampler).
    """

    builder: ClassVar[str] = ""
    shared: ClassVar[tuple[str, ...]] = ()
    pairs: ClassVar[bool] = False


HEADS: Registry[type[HeadParams]] = Registry("head")


@HEADS.register("softmax")
@dataclass(frozen=True)
class Softmax(HeadParams):
    """Plain softmax cross-entropy over a dense layer: no scale, no margin, no parameters."""

    builder: ClassVar[str] = "margin.softmax_head"
    shared: ClassVar[tuple[str, ...]] = ("loss", "focal_gamma")


@HEADS.register("arcface")
@dataclass(frozen=True)
class ArcFace(HeadParams):
    """ArcFace, s cos(theta + m) (Deng et al., CVPR 2019).

    Attributes:
        scale: Logit scale s.
        margin: Additive angular margin m, radians.
    """

    builder: ClassVar[str] = "margin.arcface_head"
    shared: ClassVar[tuple[str, ...]] = MARGIN_SHARED
    scale: float = field(default=64.0, metadata=positive())
    margin: float = field(default=0.5, metadata=in_range(0.0, math.pi / 2, "[0, pi/2)"))


@HEADS.register("cosface")
@dataclass(frozen=True)
class CosFace(HeadParams):
    """CosFace, s (cos(theta) - m) (Wang et al., CVPR 2018).

    Attributes:
        scale: Logit scale s.
        margin: Additive cosine margin m.
    """

    builder: ClassVar[str] = "margin.cosface_head"
    shared: ClassVar[tuple[str, ...]] = MARGIN_SHARED
    scale: float = field(default=64.0, metadata=positive())
    margin: float = field(default=0.35, metadata=in_range(0.0, 1.0, "[0, 1)"))


@HEADS.register("combined")
@dataclass(frozen=True)
class Combined(HeadParams):
    """The combined margin of insightface, s (cos(m1 theta + m2) - m3).

    Attributes:
        scale: Logit scale s.
        m1: Multiplicative angular margin, >= 1.
        m2: Additive angular margin, radians.
        m3: Additive cosine margin.
    """

    builder: ClassVar[str] = "margin.combined_head"
    shared: ClassVar[tuple[str, ...]] = MARGIN_SHARED
    scale: float = field(default=64.0, metadata=positive())
    m1: float = field(default=1.0, metadata=check(lambda v: v >= 1, ">= 1"))
    m2: float = field(default=0.5, metadata=non_negative())
    m3: float = field(default=0.0, metadata=non_negative())


@HEADS.register("sphereface")
@dataclass(frozen=True)
class SphereFace(HeadParams):
    """SphereFace (A-Softmax, Liu et al., CVPR 2017) with its annealing schedule.

    The logits are scaled by each feature's norm, so there is no scale and
    no Partial FC; lambda = max(lambda_min, lambda_base * (1 + lambda_gamma *
    step) ** -lambda_power) blends in plain softmax early in training.

    Attributes:
        margin: Integer angular multiplier m (4 in the paper).
        lambda_base: lambda at step 0.
        lambda_gamma: Decay rate of lambda.
        lambda_power: Decay power of lambda.
        lambda_min: Floor of lambda.
    """

    builder: ClassVar[str] = "margin.sphereface_head"
    shared: ClassVar[tuple[str, ...]] = ("loss", "focal_gamma", "sub_centers")
    margin: int = field(default=4, metadata=check(lambda v: v >= 1, ">= 1"))
    lambda_base: float = field(default=1000.0, metadata=non_negative())
    lambda_gamma: float = field(default=0.12, metadata=non_negative())
    lambda_power: float = field(default=1.0, metadata=non_negative())
    lambda_min: float = field(default=5.0, metadata=non_negative())


@HEADS.register("triplet")
@dataclass(frozen=True)
class Triplet(HeadParams):
    """Triplet loss, max(0, d(a, p) - d(a, n) + margin) (Schroff et al., CVPR 2015).

    Attributes:
        margin: Triplet margin.
        mining: Which triplets: `semi_hard` | `batch_hard` | `all`.
        distance: `cosine` | `squared_euclidean`.
    """

    builder: ClassVar[str] = "pair.triplet_head"
    shared: ClassVar[tuple[str, ...]] = PAIR_SHARED
    pairs: ClassVar[bool] = True
    margin: float = field(default=0.2, metadata=non_negative())
    mining: str = field(default="semi_hard", metadata=choices(*MININGS))
    distance: str = field(default="cosine", metadata=choices(*DISTANCES))


@HEADS.register("contrastive")
@dataclass(frozen=True)
class Contrastive(HeadParams):
    """Contrastive loss with a positive and a negative margin (Hadsell et al., CVPR 2006).

    Attributes:
        pos_margin: Positive pairs closer than this cost nothing.
        neg_margin: Negative pairs farther than this cost nothing.
        distance: `cosine` | `squared_euclidean`.
    """

    builder: ClassVar[str] = "pair.contrastive_head"
    shared: ClassVar[tuple[str, ...]] = PAIR_SHARED
    pairs: ClassVar[bool] = True
    pos_margin: float = field(default=0.0, metadata=non_negative())
    neg_margin: float = field(default=0.5, metadata=non_negative())
    distance: str = field(default="cosine", metadata=choices(*DISTANCES))


@HEADS.register("multi_similarity")
@dataclass(frozen=True)
class MultiSimilarity(HeadParams):
    """Multi-Similarity loss (Wang et al., CVPR 2019).

    Attributes:
        alpha: Weight of the positive pairs.
        beta: Weight of the negative pairs.
        base: Similarity offset lambda.
        epsilon: Mining margin.
    """

    builder: ClassVar[str] = "pair.multi_similarity_head"
    shared: ClassVar[tuple[str, ...]] = PAIR_SHARED
    pairs: ClassVar[bool] = True
    alpha: float = field(default=2.0, metadata=positive())
    beta: float = field(default=50.0, metadata=positive())
    base: float = field(default=0.5, metadata=check(lambda v: v >= -1, ">= -1"))
    epsilon: float = field(default=0.1, metadata=non_negative())


@HEADS.register("proxy_nca")
@dataclass(frozen=True)
class ProxyNCA(HeadParams):
    """Proxy-NCA (Movshovitz-Attias et al., ICCV 2017) on normalised embeddings and proxies.

    Attributes:
        scale: Scale of the squared distances in the softmax.
        lr_multiplier: Learning-rate multiplier of the proxies.
    """

    builder: ClassVar[str] = "proxy.proxy_nca_head"
    scale: float = field(default=9.0, metadata=positive())
    lr_multiplier: float = field(default=100.0, metadata=positive())


@HEADS.register("proxy_anchor")
@dataclass(frozen=True)
class ProxyAnchor(HeadParams):
    """Proxy-Anchor (Kim et al., CVPR 2020).

    Attributes:
        alpha: Scale alpha.
        delta: Margin delta.
        lr_multiplier: Learning-rate multiplier of the proxies (100 in the paper).
    """

    builder: ClassVar[str] = "proxy.proxy_anchor_head"
    alpha: float = field(default=32.0, metadata=positive())
    delta: float = field(default=0.1, metadata=non_negative())
    lr_multiplier: float = field(default=100.0, metadata=positive())


# How a `head` section written before `head.params` (every parameter a flat
# field of `head`) maps onto each head's parameters: old field -> parameter.
# Old run directories recorded every flat field, so their values are exactly
# what trained them; fields a head did not read are dropped.
LEGACY_FIELDS: dict[str, dict[str, str]] = {
    "softmax": {},
    "arcface": {"scale": "scale", "margin": "margin"},
    "cosface": {"scale": "scale", "margin": "margin"},
    "combined": {"scale": "scale", "m1": "m1", "m2": "m2", "m3": "m3"},
    "sphereface": {"margin": "margin", "lambda_base": "lambda_base", "lambda_gamma": "lambda_gamma",
                   "lambda_power": "lambda_power", "lambda_min": "lambda_min"},
    "triplet": {"margin": "margin", "mining": "mining", "distance": "distance"},
    "contrastive": {"pos_margin": "pos_margin", "neg_margin": "neg_margin", "distance": "distance"},
    "multi_similarity": {"ms_alpha": "alpha", "ms_beta": "beta", "ms_base": "base",
                         "ms_epsilon": "epsilon"},
    "proxy_nca": {"scale": "scale", "proxy_lr_multiplier": "lr_multiplier"},
    "proxy_anchor": {"proxy_alpha": "alpha", "proxy_delta": "delta",
                     "proxy_lr_multiplier": "lr_multiplier"},
}

# Every flat parameter field the old `head` section had.
LEGACY_FLAT = frozenset(
    {"scale", "margin", "m1", "m2", "m3", "lambda_base", "lambda_gamma", "lambda_power", "lambda_min",
     "mining", "distance", "pos_margin", "neg_margin", "ms_alpha", "ms_beta", "ms_base", "ms_epsilon",
     "proxy_alpha", "proxy_delta", "proxy_lr_multiplier"}
)
