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
apply to is a config error, never silently ignored. `distribution` says what
the head reads: the `model.distribution` settings it needs (a point for the
deterministic heads; a Gaussian or a vMF for the probabilistic methods of
`heads/probabilistic.py`), checked with the config (`check_head_distribution`).

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
        distribution: The `model.distribution` settings the head needs (keys
            of `DistributionConfig` and their values).
        balanced: The head needs class-balanced batches: every class of a batch
            equally often, at least twice (the `p_k` sampler).
        two_stage: The method trains on top of a deterministic run
            (`train.init_from`), never from scratch.
        scorer: The test-time similarity of two outputs, a name in
            `sparse_embed.distributions.scorers.SCORERS`.
    """

    builder: ClassVar[str] = ""
    shared: ClassVar[tuple[str, ...]] = ()
    pairs: ClassVar[bool] = False
    distribution: ClassVar[dict[str, Any]] = {"name": "dirac"}
    balanced: ClassVar[bool] = False
    two_stage: ClassVar[bool] = False
    scorer: ClassVar[str] = "cosine"


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


# ---------------------------------------------------------------------------------------------------
# Probabilistic methods (Karpukhin et al., "Probabilistic Embeddings Revisited", 2022): the
# classifier, criterion terms, weights, sample counts and test-time scorer of the reference code's
# `configs/reality` templates. Their layers and builders are in heads/probabilistic.py.
# ---------------------------------------------------------------------------------------------------

GAUSSIAN_SPHERE = {"name": "gaussian", "spherical": True}
GAUSSIAN_EUCLIDEAN = {"name": "gaussian", "spherical": False}
VMF_SEPARATE = {"name": "vmf", "kappa": "separate"}


@HEADS.register("hib")
@dataclass(frozen=True)
class HIB(HeadParams):
    """HIB, hedged instance embeddings (Oh et al., ICLR 2019): Gaussians in R^D, a sampled pair loss.

    The match probability of two inputs is the mean of sigmoid(-a |z1 - z2| + b)
    over sample pairs (a, b trained); the loss is the binary cross-entropy of
    same- and different-label pairs, plus a KL term to N(0, I). Scored with `hib`.
    `head.gather_batch` pairs the examples of all workers' batches.

    Attributes:
        num_samples: Samples drawn from each distribution (K; K x K pairs per pair of inputs).
        prior_kl_weight: Weight of mean KL(N(mu, sigma^2) || N(0, I)).
    """

    builder: ClassVar[str] = "probabilistic.hib_head"
    shared: ClassVar[tuple[str, ...]] = PAIR_SHARED
    distribution: ClassVar[dict[str, Any]] = GAUSSIAN_EUCLIDEAN
    scorer: ClassVar[str] = "hib"
    num_samples: int = field(default=8, metadata=check(lambda v: v >= 1, ">= 1"))
    prior_kl_weight: float = field(default=1e-6, metadata=non_negative())


@HEADS.register("pfe")
@dataclass(frozen=True)
class PFE(HeadParams):
    """PFE, probabilistic face embeddings (Shi and Jain, ICCV 2019): stage 2 of a deterministic run.

    Gaussians on the sphere; the loss is -mean log MLS over same-label pairs.
    Trains from `--init_from` with `train.freeze=[backbone, embedding]` (only the
    extra head learns the variance). Scored with `mls`. `head.gather_batch` pairs
    the examples of all workers' batches.

    Attributes:
        match_self: Count each input paired with itself among the same-label pairs.
    """

    builder: ClassVar[str] = "probabilistic.pfe_head"
    shared: ClassVar[tuple[str, ...]] = PAIR_SHARED
    distribution: ClassVar[dict[str, Any]] = GAUSSIAN_SPHERE
    two_stage: ClassVar[bool] = True
    scorer: ClassVar[str] = "mls"
    match_self: bool = True


@HEADS.register("dul_reg")
@dataclass(frozen=True)
class DULReg(HeadParams):
    """DUL-reg (Chang et al., CVPR 2020): stage 2; -log N(w_y; mu, sigma^2) at the frozen class centres.

    Gaussians on the sphere; the class centres are the init run's (`--init_from`
    with an `arcface` or `cosface` head) and stay frozen. Scored with `cosine`.
    """

    builder: ClassVar[str] = "probabilistic.dul_reg_head"
    distribution: ClassVar[dict[str, Any]] = GAUSSIAN_SPHERE
    two_stage: ClassVar[bool] = True


@HEADS.register("dul_cls")
@dataclass(frozen=True)
class DULCls(HeadParams):
    """DUL-cls (Chang et al., CVPR 2020): a margin softmax on one sample, plus a KL term.

    Gaussians on the sphere; ArcFace or CosFace on z = mu + sigma eps, plus
    the weighted mean KL(N(mu, sigma^2) || N(0, I)). Scored with `cosine`.

    Attributes:
        classifier: The margin head on the sample: `arcface` | `cosface`.
        scale: Logit scale s.
        margin: The classifier's margin m (radians for `arcface`).
        prior_kl_weight: Weight of the KL term (the reference's tuned 3.3e-3).
    """

    builder: ClassVar[str] = "probabilistic.dul_cls_head"
    distribution: ClassVar[dict[str, Any]] = GAUSSIAN_SPHERE
    classifier: str = field(default="arcface", metadata=choices("arcface", "cosface"))
    scale: float = field(default=64.0, metadata=positive())
    margin: float = field(default=0.5, metadata=in_range(0.0, 1.0, "[0, 1)"))
    prior_kl_weight: float = field(default=3.3e-3, metadata=non_negative())


@HEADS.register("scf")
@dataclass(frozen=True)
class SCF(HeadParams):
    """SCF, spherical confidence learning (Li et al., CVPR 2021): stage 2; vMF likelihood of frozen centres.

    vMF embeddings with a predicted kappa; the loss is -mean log C_D(kappa) +
    kappa mu.w_y at the init run's frozen class centres. Trains from
    `--init_from` with `train.freeze=[backbone, embedding]`. Scored with `mls`.
    """

    builder: ClassVar[str] = "probabilistic.scf_head"
    distribution: ClassVar[dict[str, Any]] = VMF_SEPARATE
    two_stage: ClassVar[bool] = True
    scorer: ClassVar[str] = "mls"


@HEADS.register("vmf_fl")
@dataclass(frozen=True)
class VMFFL(HeadParams):
    """vMF-FL (Hasnat et al. 2017): softmax over the vMF log-likelihoods of trained class centres.

    vMF embeddings with a predicted kappa, which acts as a per-input softmax
    temperature. Scored with `cosine`.
    """

    builder: ClassVar[str] = "probabilistic.vmf_fl_head"
    distribution: ClassVar[dict[str, Any]] = VMF_SEPARATE


@HEADS.register("vmf_loss")
@dataclass(frozen=True)
class VMFLossParams(HeadParams):
    """vMF-loss (Scott, Gallagher and Mozer, ICCV 2021): class vMFs, a sampled likelihood.

    vMF embeddings with kappa = the mean's norm (`model.distribution.kappa=norm`,
    no extra head); samples of each embedding are classified against trained
    class vMFs at a trained scale. Scored with `cosine`.

    Attributes:
        initial_log_scale: log s at the start (s is trained).
        kappa_confidence: lambda in (0, 1) of the class vMFs' initialisation.
        num_samples: Samples drawn per embedding.
        approximate_logc: The paper's approximation of log C_D in the denominator.
        deterministic_target: Class directions instead of class vMFs (`vmf-loss-det`).
    """

    builder: ClassVar[str] = "probabilistic.vmf_loss_head"
    distribution: ClassVar[dict[str, Any]] = {"name": "vmf", "kappa": "norm"}
    initial_log_scale: float = 2.773
    kappa_confidence: float = field(default=0.7, metadata=check(lambda v: 0 < v < 1, "in (0, 1)"))
    num_samples: int = field(default=10, metadata=check(lambda v: v >= 1, ">= 1"))
    approximate_logc: bool = True
    deterministic_target: bool = False


@HEADS.register("spe")
@dataclass(frozen=True)
class SPE(HeadParams):
    """SPE, stochastic prototype embeddings (Scott et al., 2019): Gaussians in R^D against prototypes.

    Half of each class's examples in the batch form Gaussian prototypes that
    classify the other half, and the reverse. Needs class-balanced batches
    (`data.sampler=p_k`, `data.samples_per_class >= 2`). Scored with `mls`.
    `head.gather_batch` makes the prototypes of all workers' batches together.

    Attributes:
        train_epsilon: Learn the variance epsilon added to supports and prototypes (else 0).
        num_samples: Samples per query and class of the Monte-Carlo term; 0 uses the product's mean.
    """

    builder: ClassVar[str] = "probabilistic.spe_head"
    shared: ClassVar[tuple[str, ...]] = PAIR_SHARED
    distribution: ClassVar[dict[str, Any]] = GAUSSIAN_EUCLIDEAN
    balanced: ClassVar[bool] = True
    scorer: ClassVar[str] = "mls"
    train_epsilon: bool = True
    num_samples: int = field(default=16, metadata=non_negative())


@HEADS.register("dsml")
@dataclass(frozen=True)
class DSML(HeadParams):
    """DSML (the reference's `dsml` template): point embeddings, one trained distribution per class.

    Softmax over each class distribution's log-likelihood of the normalised
    embedding (`model.distribution.spherical=true`). Scored with `cosine`.

    Attributes:
        target: The class distributions: `vmf` | `gaussian` (spherical, one variance).
    """

    builder: ClassVar[str] = "probabilistic.dsml_head"
    distribution: ClassVar[dict[str, Any]] = {"name": "dirac", "spherical": True}
    target: str = field(default="vmf", metadata=choices("vmf", "gaussian"))


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
