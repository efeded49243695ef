"""Probabilistic metric-learning losses: the classifier and criterion terms of each method.

The methods of Karpukhin, Dereka and Kolesnikov (2022; their code, "the
reference" below, is github tinkoff-ai/probabilistic-embeddings) train an
embedder that predicts a *distribution* per input, a parameter vector
`[mean | extra]` read by a `sparse_embed.distributions` distribution. Each
method is a classifier (logits from parameters) and / or criterion terms:

| method   | distribution              | terms (this module)                                        |
|----------|---------------------------|------------------------------------------------------------|
| HIB      | gaussian in R^D           | `hib_loss` on `hib_match_probabilities` + `prior_kl_loss`  |
| PFE      | gaussian on the sphere    | `pfe_loss` (stage 2 of a deterministic run)                |
| DUL-reg  | gaussian on the sphere    | `LogLikeClassifier` (frozen centres), `use_softmax=False`  |
| DUL-cls  | gaussian on the sphere    | `dul_cls_loss`: a margin head on one sample + prior KL     |
| SCF      | vmf, kappa separate       | `LogLikeClassifier` (frozen centres), `use_softmax=False`  |
| vMF-FL   | vmf, kappa separate       | `LogLikeClassifier` (softmax)                              |
| vMF-loss | vmf, kappa = norm         | `vmf_loss`; `VMFLoss` holds the class vMFs and the scale   |
| SPE      | gaussian in R^D           | `spe_logits` + `nll_loss`; `SPELoss` holds epsilon         |
| DSML     | dirac on the sphere       | `LogLikeClassifier` with vMF (or Gaussian) classes         |

plus the reference's deterministic criterion term that the suite's
`ProxyNCAHead` does not compute (`proxy_nca_loss`, the paper's form without
the positive in the denominator). ArcFace, CosFace, NormSoftmax,
Proxy-Anchor and Multi-Similarity are the suite's existing heads
(`heads.margin`, `heads.proxy`, `heads.pair`).

Every sampled loss draws reparametrized samples (gradients reach the mean and
the variance or concentration) and takes caller-passed noise or samples
instead, which is how the reference's golden values replay. The functions
compute in the dtype of the parameters and broadcast like the distributions.

Where the reference is wrong this module implements the correct formula
(tests/test_pe_losses.py checks each against an independent computation):

- vMF-loss with the approximate log C (the default): the reference subtracts
  the *exact* log C_d(s) from a sum of *approximate* ones, which adds a
  constant (about +6.5 nats at D = 8, +117 at D = 128) to every loss; here
  one normalizer is used throughout, so the scale-only terms cancel.
- SPE: the reference initialises its epsilon as exp(0.01^(2/D)) (about 2.5
  at D = 128) where 0.01^(2/D) was meant; `SPELoss` starts at 0.01^(2/D).
  Its Monte-Carlo denominator also sums, over the prototypes l'', the density
  of prototype l'' at a sample drawn for prototype l'' rather than at the one
  sample z drawn for the class being scored; here it is
  sum_l'' N(z; p_l'') at the same z (Scott et al. 2019, the estimator of
  p(y | x)).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, ClassVar

from sparse_embed.distributions import Distribution, Gaussian, VonMisesFisher, draws
from sparse_embed.distributions.base import build_distribution, normalize
from sparse_embed.distributions.scorers import distribution_config
from sparse_embed.distributions.vmf_normalizer import approximate_log_vmf_normalizer, log_vmf_normalizer
from sparse_embed.keras import keras, tf
from sparse_embed.strategy import SingleProcess, Strategy

if TYPE_CHECKING:
    from sparse_embed.config import HeadConfig

# torch's binary cross-entropy clamps log(p) at -100 (so a probability of 0 costs 100, not inf).
BCE_LOG_FLOOR = -100.0
# The logit SPE gives classes absent from the batch (the reference's LOG_EPS).
SPE_ABSENT_LOGIT = -100.0


# ---------------------------------------------------------------------------------------------------
# Generic terms.
# ---------------------------------------------------------------------------------------------------

def cross_entropy(logits: tf.Tensor, labels: tf.Tensor, smoothing: float = 0.0) -> tf.Tensor:
    """Mean softmax cross-entropy, with label smoothing as torch's `cross_entropy(label_smoothing=)`.

    (1 - e) CE(y) + e mean_c CE(c): the smoothed target puts e / C on every class.

    Args:
        logits: Tensor of shape (B, C).
        labels: Integer tensor of shape (B,).
        smoothing: The smoothing e in [0, 1).
    """
    log_probs = tf.nn.log_softmax(logits, axis=-1)
    target = -tf.gather(log_probs, tf.cast(labels, tf.int32), batch_dims=1)
    if smoothing == 0:
        return tf.reduce_mean(target)
    uniform = -tf.reduce_mean(log_probs, axis=-1)
    return tf.reduce_mean((1 - smoothing) * target + smoothing * uniform)


def nll_loss(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """-mean_i logits[i, y_i]: the loss of classifiers whose logits already are log-likelihoods.

    Args:
        logits: Tensor of shape (B, C).
        labels: Integer tensor of shape (B,).
    """
    return -tf.reduce_mean(tf.gather(logits, tf.cast(labels, tf.int32), batch_dims=1))


def _one_hot(labels: tf.Tensor, num_classes: Any, dtype: Any) -> tf.Tensor:
    return tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=dtype)


def _same_label(labels: tf.Tensor) -> tf.Tensor:
    labels = tf.reshape(labels, [-1])
    return tf.equal(labels[None, :], labels[:, None])


def _masked_mean(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Mean of `values` where `mask` holds; 0 (not NaN) for an empty mask."""
    mask = tf.cast(mask, values.dtype)
    return tf.math.divide_no_nan(tf.reduce_sum(values * mask), tf.reduce_sum(mask))


def prior_kl_loss(distribution: Distribution, parameters: tf.Tensor) -> tf.Tensor:
    """mean_i KL(p_i || prior): the regulariser of HIB and DUL-cls.

    Args:
        distribution: How the parameter vectors are read (a Gaussian's KL is to N(0, I)).
        parameters: Tensor of shape (B, P).
    """
    return tf.reduce_mean(distribution.prior_kl(parameters))


def proxy_nca_loss(proxy_scores: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Proxy-NCA as the paper writes it: mean_i log sum_{c != y_i} exp(s_ic - s_iy_i).

    Movshovitz-Attias et al. (ICCV 2017), Eq. 4, on the scores s = scorer(x, proxy)
    (the reference uses the negative squared L2 distance of the normalised means).
    The positive proxy is not in the denominator (unlike `heads.proxy.ProxyNCAHead`,
    whose per-example loss is softplus of this one's at scale 1); the loss is
    unbounded below.

    Args:
        proxy_scores: Tensor of shape (B, C), similarity of each embedding to each proxy.
        labels: Integer tensor of shape (B,).
    """
    positive = tf.gather(proxy_scores, tf.cast(labels, tf.int32), batch_dims=1)
    is_target = tf.cast(_one_hot(labels, tf.shape(proxy_scores)[-1], tf.float32), tf.bool)
    deltas = tf.where(is_target, tf.cast(-math.inf, proxy_scores.dtype), proxy_scores - positive[:, None])
    return tf.reduce_mean(tf.reduce_logsumexp(deltas, axis=-1))


# ---------------------------------------------------------------------------------------------------
# Pair losses: HIB and PFE.
# ---------------------------------------------------------------------------------------------------

def hib_match_probabilities(scorer: Any, parameters: tf.Tensor, samples1: tf.Tensor | None = None,
                            samples2: tf.Tensor | None = None) -> tf.Tensor:
    """P[i, j] = HIB(p_j, p_i), the (B, B) match probabilities of every pair of the batch.

    Each side draws its own samples, so the diagonal compares two independent
    sample sets of one distribution (the reference's layout: the first argument
    is the batch along columns).

    Args:
        scorer: A `HIBScorer` (its trainable scale and bias train with the loss).
        parameters: Tensor of shape (B, P).
        samples1: Optional samples (1, B, K, D) of the column distributions.
        samples2: Optional samples (B, 1, K, D) of the row distributions.
    """
    return scorer(parameters[None], parameters[:, None], samples1=samples1, samples2=samples2)


def hib_loss(probabilities: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """1/2 (BCE(P_pos, 1) + BCE(P_neg, 0)), each a mean over its own set of pairs.

    Oh et al., "Modeling Uncertainty with Hedged Instance Embedding" (ICLR 2019),
    as the reference computes it: same-label pairs, the diagonal self-pairs
    included, are positives; the logs are clamped at -100 as torch's BCE does.
    A batch without negatives (or positives) has 0 for that half.

    Args:
        probabilities: Tensor of shape (B, B), from `hib_match_probabilities`.
        labels: Integer tensor of shape (B,).
    """
    same = _same_label(labels)
    positive = -_floored_log(probabilities)
    negative = -_floored_log(1 - probabilities)
    return 0.5 * (_masked_mean(positive, same) + _masked_mean(negative, ~same))


def _floored_log(x: tf.Tensor) -> tf.Tensor:
    """max(log x, -100) with a zero (not NaN) gradient where x is 0 (a saturated float32 sigmoid)."""
    positive = x > 0
    log = tf.math.log(tf.where(positive, x, tf.ones_like(x)))
    return tf.maximum(tf.where(positive, log, BCE_LOG_FLOOR * tf.ones_like(x)), BCE_LOG_FLOOR)


def pfe_pair_scores(distribution: Distribution, parameters: tf.Tensor) -> tf.Tensor:
    """M[i, j] = log MLS(p_j, p_i), (B, B).

    Args:
        distribution: A distribution with `log_mls` (Gaussian for PFE).
        parameters: Tensor of shape (B, P).
    """
    return distribution.log_mls(parameters[None], parameters[:, None])


def pfe_loss(distribution: Distribution, parameters: tf.Tensor, labels: tf.Tensor,
             match_self: bool = True) -> tf.Tensor:
    """-mean over same-label pairs (i, j) of log MLS(p_i, p_j) (Shi and Jain, ICCV 2019).

    Args:
        distribution: A distribution with `log_mls`.
        parameters: Tensor of shape (B, P).
        labels: Integer tensor of shape (B,).
        match_self: Count the pairs (i, i) (the reference's default `pfe_match_self`).
    """
    same = _same_label(labels)
    if not match_self:
        same &= ~tf.eye(tf.shape(same)[0], dtype=tf.bool)
    return -_masked_mean(pfe_pair_scores(distribution, parameters), same)


# ---------------------------------------------------------------------------------------------------
# Log-likelihood classifiers: DUL-reg, SCF, vMF-FL, DSML.
# ---------------------------------------------------------------------------------------------------

def loglike_logits(distribution: Distribution, parameters: tf.Tensor, class_points: tf.Tensor,
                   labels: tf.Tensor | None = None, margin: float = 0.0) -> tf.Tensor:
    """logits[i, c] = log p_i(w_c) - margin [c = y_i]: each class centre's likelihood under p_i.

    With a vMF this is log C_D(kappa_i) + kappa_i mu_i.w_c / |w_c| (SCF with
    `nll_loss`, vMF-FL with `cross_entropy`: log C cancels, kappa_i is a
    per-example temperature); with a Gaussian on the sphere it is
    log N(w_c / |w_c|; mu_i, sigma_i^2 I) (DUL-reg with `nll_loss`).

    Args:
        distribution: The embeddings' distribution.
        parameters: Tensor of shape (B, P).
        class_points: Tensor of shape (C, D), the class centres (normalised on the sphere).
        labels: Integer tensor of shape (B,); the margin needs them.
        margin: Log-likelihood taken off the target logit (needs `labels`).
    """
    logits = distribution.log_prob(parameters[..., None, :], tf.cast(class_points, parameters.dtype))
    return _subtract_margin(logits, labels, margin)


def target_loglike_logits(target_distribution: Distribution, class_parameters: tf.Tensor,
                          embeddings: tf.Tensor, labels: tf.Tensor | None = None,
                          margin: float = 0.0) -> tf.Tensor:
    """logits[i, c] = log q_c(x_i): the embedding's likelihood under each class's distribution (DSML).

    With vMF class distributions: log C_D(kappa_c) + kappa_c mu_c.x_i / |x_i|,
    both mu_c and kappa_c learned; with `cross_entropy` this is DSML (the
    reference's LogLike classifier with a target distribution).

    Args:
        target_distribution: The classes' distribution (P' parameters each).
        class_parameters: Tensor of shape (C, P').
        embeddings: Tensor of shape (B, D), points (a Dirac embedding's sample is its mean).
        labels: Integer tensor of shape (B,); the margin needs them.
        margin: Log-likelihood taken off the target logit (needs `labels`).
    """
    class_parameters = tf.cast(class_parameters, embeddings.dtype)
    logits = target_distribution.log_prob(class_parameters, embeddings[..., None, :])
    return _subtract_margin(logits, labels, margin)


@keras.utils.register_keras_serializable(package="sparse_embed")
class LogLikeClassifier(keras.layers.Layer):
    """The log-likelihood classifier with its class weights: `classifier(parameters, labels)` -> mean loss.

    Without a target distribution the weights are class centres W (C, D) and the
    logits `loglike_logits` (DUL-reg and SCF train them frozen, from a
    deterministic run, with `use_softmax=False`; vMF-FL with the softmax).
    With `target_distribution` the weights are class distributions (C, P') and
    the logits `target_loglike_logits` of a sample of each embedding (DSML: a
    Dirac embedding, vMF or Gaussian classes).

    Args:
        num_classes: C.
        distribution: The embeddings' distribution.
        target_distribution: The classes' distribution, or None (class centres).
        margin: Log-likelihood taken off the target logit in training.
        use_softmax: Softmax cross-entropy (vMF-FL, DSML) or the negative log-likelihood of the
            logits themselves (DUL-reg, SCF).
        kernel_initializer: Initializer of the weights (Glorot uniform, as the reference's).
        **kwargs: Keras layer arguments.
    """

    def __init__(self, num_classes: int, distribution: Distribution,
                 target_distribution: Distribution | None = None, margin: float = 0.0,
                 use_softmax: bool = True, kernel_initializer: Any = "glorot_uniform", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
        if target_distribution is not None and (
                target_distribution.dim != distribution.dim
                or target_distribution.is_spherical != distribution.is_spherical):
            raise ValueError("the target distribution must have the embeddings' dimension and sphere")
        self.num_classes = num_classes
        self.distribution = distribution
        self.target_distribution = target_distribution
        self.margin = float(margin)
        self.use_softmax = use_softmax
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        columns = distribution.dim if target_distribution is None else target_distribution.num_parameters
        self.kernel = self.add_weight(name="kernel", shape=(num_classes, columns),
                                      initializer=self.kernel_initializer, trainable=True)

    def logits(self, parameters: tf.Tensor, labels: tf.Tensor | None = None, seed: Any = None) -> tf.Tensor:
        """The (B, C) logits, with the margin where labels are given.

        Args:
            parameters: Tensor of shape (B, P).
            labels: Integer tensor of shape (B,), or None (no margin).
            seed: Stateless seed of the embedding's sample (target-distribution mode).
        """
        kernel = tf.cast(self.kernel, parameters.dtype)
        margin = self.margin if labels is not None else 0.0
        if self.target_distribution is None:
            return loglike_logits(self.distribution, parameters, kernel, labels, margin)
        points = self.distribution.sample(parameters, seed=seed)
        return target_loglike_logits(self.target_distribution, kernel, points, labels, margin)

    def call(self, parameters: tf.Tensor, labels: tf.Tensor, seed: Any = None) -> tf.Tensor:
        """Mean loss of the batch: softmax cross-entropy or NLL of the logits.

        Args:
            parameters: Tensor of shape (B, P).
            labels: Integer tensor of shape (B,).
            seed: Stateless seed of the embedding's sample (target-distribution mode).
        """
        logits = self.logits(parameters, labels, seed=seed)
        return cross_entropy(logits, labels) if self.use_softmax else nll_loss(logits, labels)

    def get_config(self) -> dict[str, Any]:
        target = self.target_distribution
        return {**super().get_config(), "num_classes": self.num_classes,
                "distribution": distribution_config(self.distribution),
                "target_distribution": None if target is None else distribution_config(target),
                "margin": self.margin, "use_softmax": self.use_softmax,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LogLikeClassifier:
        config = dict(config)
        for key in ("distribution", "target_distribution"):
            if config.get(key) is not None:
                options = dict(config[key])
                config[key] = build_distribution(options.pop("name"), **options)
        return cls(**config)


def _subtract_margin(logits: tf.Tensor, labels: tf.Tensor | None, margin: float) -> tf.Tensor:
    if margin == 0:
        return logits
    if labels is None:
        raise ValueError("a margin needs the labels")
    return logits - margin * _one_hot(labels, tf.shape(logits)[-1], logits.dtype)


# ---------------------------------------------------------------------------------------------------
# DUL-cls: a margin head on one sample.
# ---------------------------------------------------------------------------------------------------

def dul_cls_loss(head: keras.layers.Layer, distribution: Gaussian, parameters: tf.Tensor,
                 labels: tf.Tensor, prior_kl_weight: float, noise: tf.Tensor | None = None,
                 seed: Any = None) -> tf.Tensor:
    """DUL-cls (Chang et al., CVPR 2020): head(z) + w mean KL(N(mu, sigma^2) || N(0, I)).

    z = mu + sigma eps is one reparametrized sample per example; the head (ArcFace
    or CosFace of `heads.margin`) normalises it. The KL is the true one (the
    reference notes the paper's formula has an error).

    Args:
        head: A classifier head of `heads.margin` (called as head(z, labels)).
        distribution: The Gaussian of the embeddings (on the sphere in the reference configs).
        parameters: Tensor of shape (B, P).
        labels: Integer tensor of shape (B,).
        prior_kl_weight: w, the weight of the KL term.
        noise: Pre-drawn standard normal noise (B, D); None draws it.
        seed: Stateless seed of the draw (None: TensorFlow's global random state).
    """
    samples = distribution.sample(parameters, noise=noise, seed=seed)
    classification = head(samples, labels)
    kl = tf.cast(prior_kl_loss(distribution, parameters), classification.dtype)
    return classification + prior_kl_weight * kl


# ---------------------------------------------------------------------------------------------------
# vMF-loss.
# ---------------------------------------------------------------------------------------------------

def vmf_loss(distribution: VonMisesFisher, parameters: tf.Tensor, labels: tf.Tensor,
             class_parameters: tf.Tensor, scale: Any, samples: tf.Tensor | None = None,
             num_samples: int = 10, approximate_logc: bool = True, deterministic_target: bool = False,
             seed: Any = None) -> tf.Tensor:
    """Per-example vMF-loss (Scott, Gallagher and Mozer, ICCV 2021), (B,).

    The embedding is vMF(mu_i, kappa_i) with kappa_i = |x_i| (`kappa="norm"`),
    the classes are vMF(mu_c, kappa_c) with parameters w_c (kappa_c = |w_c|), s is
    the scale. With z_k ~ vMF(mu_i, kappa_i), K samples:

        L_i = mean_k log sum_c exp(log C(kappa_c) - log C(|s z_k + w_c|))
              - s (A(kappa_i) mu_i) . (A(kappa_y) mu_y),

    the expected negative log-likelihood of the class under vMF(z, s), its
    numerator in closed form. `approximate_logc` uses the approximation of log C
    of the paper (`approximate_log_vmf_normalizer`) in the denominator; the
    log C(s) terms cancel exactly either way (the reference subtracts the exact
    log C(s) from approximate ones, a constant offset; see the module docstring).
    `deterministic_target`: the classes are directions w_c / |w_c| and
    L_i = mean_k log sum_c exp(s z_k . w_c / |w_c|) - s (A(kappa_i) mu_i) . w_y / |w_y|.

    Args:
        distribution: A `VonMisesFisher` with `kappa="norm"`.
        parameters: Tensor of shape (B, D).
        labels: Integer tensor of shape (B,).
        class_parameters: Tensor of shape (C, D): the class vMFs (directions with
            `deterministic_target`).
        scale: s > 0 (a float or a scalar tensor: the trainable scale).
        samples: Optional pre-drawn samples (B, K, D) (normalised before use); None draws K.
        num_samples: K when drawing.
        approximate_logc: Use the paper's approximation of log C in the denominator.
        deterministic_target: Deterministic class directions (the reference's `vmf-loss-det`).
        seed: Stateless seed of the draw (None: TensorFlow's global random state).
    """
    dtype = parameters.dtype
    # Through a tensor of the parameters' dtype: tf.cast would round a Python float to float32 first.
    scale = tf.cast(tf.convert_to_tensor(scale, dtype_hint=dtype), dtype)
    class_parameters = tf.cast(class_parameters, dtype)
    if samples is None:
        samples = distribution.sample(parameters, (num_samples,), seed=seed)
    z = normalize(tf.cast(samples, dtype))  # (B, K, D).
    means = distribution.mean(parameters)  # (B, D).
    labels = tf.cast(labels, tf.int32)
    if deterministic_target:
        directions = normalize(class_parameters)
        numerator = scale * tf.reduce_sum(means * tf.gather(directions, labels), axis=-1)
        products = scale * tf.einsum("bkd,cd->bkc", z, directions)
        return tf.reduce_mean(tf.reduce_logsumexp(products, axis=-1), axis=-1) - numerator
    log_c = approximate_log_vmf_normalizer if approximate_logc else log_vmf_normalizer
    dim = distribution.dim
    class_kappa = tf.norm(class_parameters, axis=-1)  # (C,).
    joint = tf.norm(scale * z[:, :, None, :] + class_parameters[None, None], axis=-1)  # (B, K, C).
    log_ratio = log_c(dim, class_kappa) - log_c(dim, joint)
    denominator = tf.reduce_mean(tf.reduce_logsumexp(log_ratio, axis=-1), axis=-1)
    target_means = distribution.mean(tf.gather(class_parameters, labels))
    return denominator - scale * tf.reduce_sum(means * target_means, axis=-1)


def vmf_loss_class_initializer(dim: int, kappa_confidence: float) -> keras.initializers.Initializer:
    """The reference's initialisation of the class vMFs: N(0, I) lambda / (1 - lambda^2) (D - 1) / sqrt(D).

    The norm of a row, the class concentration, is then about lambda / (1 - lambda^2) (D - 1),
    where the mean resultant length A_D is about lambda.

    Args:
        dim: D.
        kappa_confidence: lambda in (0, 1).
    """
    stddev = kappa_confidence / (1 - kappa_confidence**2) * (dim - 1) / math.sqrt(dim)
    return keras.initializers.RandomNormal(stddev=stddev)


@keras.utils.register_keras_serializable(package="sparse_embed")
class VMFLoss(keras.layers.Layer):
    """vMF-loss with its trainable class vMFs and scale: `vmf_loss_layer(parameters, labels)` -> mean loss.

    Args:
        num_classes: C.
        dim: D.
        scale: A fixed scale s > 0, or None for a trainable one, exp(log_scale).
        initial_log_scale: The trainable log s at the start (2.773 in the reference).
        kappa_confidence: lambda of the class initialisation (0.7).
        num_samples: K samples per embedding (10).
        approximate_logc: The paper's approximation of log C in the denominator.
        deterministic_target: Deterministic class directions.
        **kwargs: Keras layer arguments.
    """

    def __init__(self, num_classes: int, dim: int, scale: float | None = None,
                 initial_log_scale: float = 2.773, kappa_confidence: float = 0.7, num_samples: int = 10,
                 approximate_logc: bool = True, deterministic_target: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if scale is not None and not scale > 0:
            raise ValueError(f"scale must be > 0 or None (trainable), got {scale!r}")
        if not 0 < kappa_confidence < 1:
            raise ValueError(f"kappa_confidence must be in (0, 1), got {kappa_confidence!r}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples!r}")
        self.num_classes = num_classes
        self.dim = dim
        self.scale = scale
        self.initial_log_scale = initial_log_scale
        self.kappa_confidence = kappa_confidence
        self.num_samples = num_samples
        self.approximate_logc = approximate_logc
        self.deterministic_target = deterministic_target
        self.distribution = VonMisesFisher(dim, kappa="norm")
        self.class_parameters = self.add_weight(
            name="class_parameters", shape=(num_classes, dim),
            initializer=vmf_loss_class_initializer(dim, kappa_confidence), trainable=True)
        self.log_scale = None
        if scale is None:
            self.log_scale = self.add_weight(
                name="log_scale", shape=(), initializer=keras.initializers.Constant(initial_log_scale),
                trainable=True)

    def current_scale(self) -> tf.Tensor:
        """s: exp(log_scale) when trainable, else the fixed value."""
        if self.log_scale is None:
            return tf.constant(self.scale, self.dtype)
        return tf.exp(self.log_scale)

    def call(self, parameters: tf.Tensor, labels: tf.Tensor, samples: tf.Tensor | None = None,
             seed: Any = None) -> tf.Tensor:
        """Mean vMF-loss of the batch.

        Args:
            parameters: Tensor of shape (B, D) (kappa = norm).
            labels: Integer tensor of shape (B,).
            samples: Optional pre-drawn samples (B, K, D).
            seed: Stateless seed of the draw.
        """
        losses = vmf_loss(self.distribution, parameters, labels, self.class_parameters, self.current_scale(),
                          samples=samples, num_samples=self.num_samples,
                          approximate_logc=self.approximate_logc,
                          deterministic_target=self.deterministic_target, seed=seed)
        return tf.reduce_mean(losses)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_classes": self.num_classes, "dim": self.dim, "scale": self.scale,
                "initial_log_scale": self.initial_log_scale, "kappa_confidence": self.kappa_confidence,
                "num_samples": self.num_samples, "approximate_logc": self.approximate_logc,
                "deterministic_target": self.deterministic_target}


# ---------------------------------------------------------------------------------------------------
# SPE: stochastic prototype embeddings.
# ---------------------------------------------------------------------------------------------------

def group_by_class(labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Rows of a batch grouped by class: (indices (n, L), classes (L,)).

    indices[r, j] is the batch row of the r-th example (in batch order) of the
    j-th smallest label, -1 past that class's count; n is the largest count
    (B / L in a class-balanced batch, which has no -1).

    Args:
        labels: Integer tensor of shape (B,).
    """
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    classes = tf.sort(tf.unique(labels)[0])
    index = tf.searchsorted(classes, labels)
    counts = tf.math.bincount(index, minlength=tf.size(classes), dtype=tf.int32)
    order = tf.argsort(labels, stable=True)
    sorted_index = tf.gather(index, order)
    position = tf.range(tf.size(labels)) - tf.gather(tf.cumsum(counts, exclusive=True), sorted_index)
    shape = tf.stack([tf.reduce_max(counts), tf.size(classes)])
    places = tf.stack([position, sorted_index], axis=1)
    grouped = tf.tensor_scatter_nd_update(tf.fill(shape, -1), places, order)
    return grouped, classes


def spe_prototypes(distribution: Gaussian, support: tf.Tensor, epsilon: Any,
                   mask: tf.Tensor | None = None) -> tf.Tensor:
    """The prototypes (L, P) of support examples (n, L, P): the product of their densities.

    With sigma_s^2 + epsilon the support variances, the prototype is
    N(sum_s mu_s / v_s / sum_s 1 / v_s, epsilon + 1 / sum_s 1 / v_s) (epsilon added
    to its variance too, as in the reference).

    Args:
        distribution: The Gaussian of the embeddings.
        support: Tensor of shape (n, L, P).
        epsilon: The variance added to every support and prototype variance.
        mask: Optional boolean (n, L): the supports of each class (at least one each); None: all.
    """
    mu, variance, _ = distribution.unpack(support)
    variance = epsilon + variance
    weights = 1 / variance
    if mask is not None:
        weights *= tf.cast(mask, weights.dtype)[..., None]
    precision = tf.reduce_sum(weights, axis=0)
    new_variance = 1 / precision
    new_mu = new_variance * tf.reduce_sum(mu * weights, axis=0)
    hidden = distribution.positive.ipositive(epsilon + new_variance)
    return tf.concat([new_mu, hidden], axis=-1)


def spe_logits(distribution: Gaussian, parameters: tf.Tensor, labels: tf.Tensor, num_classes: int,
               epsilon: Any, num_samples: int = 16, noise: tuple[tf.Tensor, tf.Tensor] | None = None,
               seed: Any = None) -> tf.Tensor:
    """Stochastic Prototype Embeddings logits, log p(y = c | x_i), (B, C) (Scott et al., 2019).

    Every present class needs at least two examples (a P x K sampler gives K of
    each). The first floor(n_c / 2) examples of class c (in batch order) are
    scored against prototypes made of the second half of every class, and the
    second halves against prototypes of the first ones. A class-balanced batch
    is the reference's setting; classes counted unequally (the batches of
    several workers gathered, a class drawn by two of them) split the same
    way. For a query q and prototype p_l,

        log p(l | q) = log MLS(q, p_l) + log E_{z ~ q p_l} [1 / sum_l'' N(z; p_l'')],

    the expectation over the normalised product density, estimated with
    `num_samples` reparametrized samples (0: at the product's mean). Classes
    absent from the batch get -100. Train with `nll_loss`.

    Args:
        distribution: A `Gaussian` (in R^D in the reference configs).
        parameters: Tensor of shape (B, P).
        labels: Integer tensor of shape (B,).
        num_classes: C.
        epsilon: The variance added to the supports and prototypes (trainable in `SPELoss`).
        num_samples: S, samples per query and class; 0 uses the product's mean.
        noise: Optional pre-drawn standard normal noise of a class-balanced batch's two halves,
            (n1, L, S, L, D) and (n2, L, S, L, D), n1 = floor(n / 2).
        seed: Stateless seed of the draws (None: TensorFlow's global random state).

    Raises:
        tf.errors.InvalidArgumentError: If a class of the batch has a single example.
    """
    grouped, classes = group_by_class(labels)  # (n, L), (L,).
    present = grouped >= 0
    counts = tf.reduce_sum(tf.cast(present, tf.int32), axis=0)
    single = "SPE needs at least two examples of every class in a batch (a P x K sampler)"
    with tf.control_dependencies([tf.debugging.assert_greater_equal(counts, 2, message=single)]):
        by_class = tf.gather(parameters, tf.maximum(grouped, 0))  # (n, L, P); absent rows masked below.
    first = tf.range(tf.shape(grouped)[0])[:, None] < (counts // 2)[None]
    second = present & ~first
    prototypes_of = [spe_prototypes(distribution, by_class, epsilon, mask) for mask in (first, second)]
    # Each query against the prototypes of the other half: (n, L, L', P).
    prototypes = tf.where(first[:, :, None, None], prototypes_of[1][None, None], prototypes_of[0][None, None])
    log_mls = distribution.log_mls(by_class[:, :, None, :], prototypes)  # (n, L, L').
    _, product = distribution.pdf_product(by_class[:, :, None, :], prototypes)  # (n, L, L', P).
    if num_samples > 0:
        if noise is None:
            leading = tf.shape(product)
            shape = tf.concat([leading[:2], [num_samples], leading[2:3], [distribution.dim]], 0)
            noise = draws.normal(shape, product.dtype, seed)
        else:
            noise = tf.concat([tf.cast(noise[0], product.dtype), tf.cast(noise[1], product.dtype)], axis=0)
        z = distribution.sample(product[:, :, None], noise=noise)  # (n, L, S, L', D).
        count = num_samples
    else:
        z = distribution.mean(product)[:, :, None]  # (n, L, 1, L', D).
        count = 1
    # Every prototype l'' (of the query's other half) at every sample z drawn for class l':
    # (n, L, S, L', L'').
    log_densities = distribution.log_prob(prototypes[:, :, None, None], z[..., None, :])
    log_denominator = tf.reduce_logsumexp(log_densities, axis=-1)  # (n, L, S, L').
    logits = log_mls + tf.reduce_logsumexp(-log_denominator, axis=2) - math.log(count)  # (n, L, L').
    # Columns to the batch's classes, the rest at -100; rows back to batch order.
    placed = tf.tensordot(logits - SPE_ABSENT_LOGIT, _one_hot(classes, num_classes, logits.dtype), axes=1)
    placed += SPE_ABSENT_LOGIT
    rows = tf.boolean_mask(grouped, present)
    flat = tf.boolean_mask(placed, present)
    return tf.scatter_nd(rows[:, None], flat, tf.shape(flat))


def spe_initial_log_epsilon(dim: int) -> float:
    """log of SPE's initial epsilon 0.01^(2/D), the variance one hundredth of a unit vector's spread.

    Args:
        dim: D.
    """
    return 2 / dim * math.log(0.01)


@keras.utils.register_keras_serializable(package="sparse_embed")
class SPELoss(keras.layers.Layer):
    """SPE with its trainable epsilon = exp(log_epsilon): `spe(parameters, labels)` -> mean NLL.

    epsilon starts at 0.01^(2/D) (the reference meant this and starts at
    exp(0.01^(2/D)) instead). With `train_epsilon=False`, epsilon is 0.

    Args:
        num_classes: C.
        dim: D.
        train_epsilon: Learn the added variance epsilon (else 0).
        num_samples: S (16 in the reference); 0 uses the product means.
        **kwargs: Keras layer arguments.
    """

    def __init__(self, num_classes: int, dim: int, train_epsilon: bool = True, num_samples: int = 16,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples!r}")
        self.num_classes = num_classes
        self.dim = dim
        self.train_epsilon = train_epsilon
        self.num_samples = num_samples
        self.distribution = Gaussian(dim)
        self.log_epsilon = None
        if train_epsilon:
            self.log_epsilon = self.add_weight(
                name="log_epsilon", shape=(),
                initializer=keras.initializers.Constant(spe_initial_log_epsilon(dim)), trainable=True)

    def epsilon(self, dtype: Any = tf.float32) -> tf.Tensor:
        """The added variance epsilon (0 without `train_epsilon`).

        Args:
            dtype: The dtype to return it in.
        """
        if self.log_epsilon is None:
            return tf.zeros([], dtype)
        return tf.cast(tf.exp(self.log_epsilon), dtype)

    def logits(self, parameters: tf.Tensor, labels: tf.Tensor,
               noise: tuple[tf.Tensor, tf.Tensor] | None = None, seed: Any = None) -> tf.Tensor:
        """`spe_logits` with this layer's epsilon and samples, (B, C).

        Args:
            parameters: Tensor of shape (B, D + 1).
            labels: Integer tensor of shape (B,), at least two examples of each class.
            noise: Optional pre-drawn noise of the two halves.
            seed: Stateless seed of the draws.
        """
        epsilon = self.epsilon(parameters.dtype)
        return spe_logits(self.distribution, parameters, labels, self.num_classes, epsilon,
                          num_samples=self.num_samples, noise=noise, seed=seed)

    def call(self, parameters: tf.Tensor, labels: tf.Tensor, noise: tuple[tf.Tensor, tf.Tensor] | None = None,
             seed: Any = None) -> tf.Tensor:
        """Mean negative log-likelihood of the labels.

        Args:
            parameters: Tensor of shape (B, D + 1).
            labels: Integer tensor of shape (B,), at least two examples of each class.
            noise: Optional pre-drawn noise of the two halves.
            seed: Stateless seed of the draws.
        """
        return nll_loss(self.logits(parameters, labels, noise=noise, seed=seed), labels)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_classes": self.num_classes, "dim": self.dim,
                "train_epsilon": self.train_epsilon, "num_samples": self.num_samples}


# ---------------------------------------------------------------------------------------------------
# The registered methods: head layers with the trainer's contract.
# ---------------------------------------------------------------------------------------------------

# The stateless seed of the draws of a loss evaluated outside training: the same inputs give the
# same loss. In training the draws come from TensorFlow's global random state (seeded per run).
EVALUATION_SEED = (0, 0)


def _seed(training: bool | None) -> Any:
    return None if training else tf.constant(EVALUATION_SEED, tf.int64)


def _accuracy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.reduce_mean(tf.cast(tf.equal(predicted, tf.cast(labels, tf.int32)), tf.float32))


def _recall_at_1(scores: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """The fraction of rows whose best-scoring other row of the (B, B) `scores` has their label."""
    same = _same_label(labels)
    others = tf.where(tf.eye(tf.shape(scores)[0], dtype=tf.bool), tf.cast(-math.inf, scores.dtype), scores)
    nearest = tf.argmax(others, axis=1, output_type=tf.int32)
    return tf.reduce_mean(tf.cast(tf.gather(same, nearest, batch_dims=1), tf.float32))


def default_distribution(requirement: dict[str, Any], width: int) -> Distribution:
    """The distribution a method needs whose parameter vector is `width` wide.

    Args:
        requirement: The method's `HeadParams.distribution` (name and options).
        width: P, the width of the backbone's output.

    Raises:
        ValueError: If no dimension gives that width.
    """
    options = dict(requirement)
    name = options.pop("name")
    extra = build_distribution(name, 2, **options).num_parameters - 2
    if width - extra < 1:
        raise ValueError(f"an output of width {width} is too narrow for a {name} distribution")
    return build_distribution(name, width - extra, **options)


class ProbabilisticHead(keras.layers.Layer):
    """Base of the probabilistic methods: the loss of parameter vectors `[mean | extra]`.

    The contract is the trainer's (`heads.margin.ClassifierHead`), with the
    backbone's parameter vectors (B, P) in place of embeddings:
    `head(parameters, labels)` -> mean loss, `head.loss_and_accuracy(parameters, labels)`
    -> (loss, accuracy). Subclasses implement `loss_and_accuracy`. The head
    computes in float32 whatever the global policy. A sampled loss draws
    from TensorFlow's random state in training and from the fixed
    `EVALUATION_SEED` otherwise, so an evaluation is reproducible.

    A method whose loss couples the examples of a batch (`couples_batch`: the
    pairs of HIB and PFE, SPE's prototypes) can gather the batch over the
    workers first (`gather_batch`, as the pair losses of `heads.pair` do): the
    parameter vectors and labels of all N workers are all-gathered and every
    worker computes the loss of the global batch, so a step equals one
    process's step on the concatenated batch, and the gradient of every
    worker's rows flows back through the gather. A sampled loss then draws its
    samples of the global batch on each worker; the step is the mean of the N
    workers' estimates. The other methods' losses are means over examples,
    whose gradients the workers' average already makes those of the global batch.

    Args:
        num_classes: C, the training identities.
        distribution: How the parameter vectors are read.
        gather_batch: All-gather the batch over the workers first (`couples_batch` methods only).
        strategy: What `gather_batch` gathers over; None is one process. The
            trainer sets it (`head.strategy`); it is not part of the config.
        **kwargs: Keras layer arguments.
    """

    couples_batch: ClassVar[bool] = False

    def __init__(self, num_classes: int, distribution: Distribution, gather_batch: bool = False,
                 strategy: Strategy | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if not isinstance(gather_batch, bool):
            raise ValueError(f"gather_batch must be a bool, got {gather_batch!r}")
        if gather_batch and not self.couples_batch:
            raise ValueError(f"gather_batch does not apply to {type(self).__name__}: its loss is a mean over "
                             f"examples")
        self.num_classes = num_classes
        self.distribution = distribution
        self.gather_batch = gather_batch
        self.strategy = strategy or SingleProcess()

    def batch(self, parameters: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The float32 parameter vectors and int32 labels of the loss: the worker's, or all workers' gathered.

        Args:
            parameters: Tensor of shape (B, P).
            labels: Integer tensor of shape (B,).
        """
        parameters = tf.cast(parameters, tf.float32)
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        if self.gather_batch:
            parameters = self.strategy.all_gather(parameters)
            labels = self.strategy.all_gather(labels)
        return parameters, labels

    def loss_and_accuracy(self, parameters: tf.Tensor, labels: tf.Tensor,
                          training: bool | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """(float32 mean loss, float32 batch accuracy) of parameter vectors (B, P).

        Args:
            parameters: Tensor of shape (B, P).
            labels: Integer tensor of shape (B,).
            training: Keras training flag.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement loss_and_accuracy()")

    def call(self, parameters: tf.Tensor, labels: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        """The mean loss of the batch.

        Args:
            parameters: Tensor of shape (B, P).
            labels: Integer tensor of shape (B,).
            training: Keras training flag.
        """
        return self.loss_and_accuracy(parameters, labels, training=training)[0]

    def compute_output_shape(self, input_shape: Any) -> tf.TensorShape:
        return tf.TensorShape([])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_classes": self.num_classes,
                "distribution": distribution_config(self.distribution), "gather_batch": self.gather_batch}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ProbabilisticHead:
        config = dict(config)
        options = dict(config.pop("distribution"))
        return cls(distribution=build_distribution(options.pop("name"), **options), **config)


@keras.utils.register_keras_serializable(package="sparse_embed")
class HIBHead(ProbabilisticHead):
    """HIB: `hib_loss` of the HIB scorer's match probabilities plus the weighted prior KL.

    The scorer's a and b are weights of this head. Accuracy: the batch Recall@1
    by match probability.

    Args:
        num_classes: C.
        distribution: A Gaussian in R^D.
        num_samples: Samples per distribution.
        prior_kl_weight: Weight of the KL term.
        **kwargs: `ProbabilisticHead` arguments (`gather_batch`, `strategy`) and Keras layer arguments.
    """

    couples_batch: ClassVar[bool] = True

    def __init__(self, num_classes: int, distribution: Distribution, num_samples: int = 8,
                 prior_kl_weight: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(num_classes, distribution, **kwargs)
        from sparse_embed.distributions.scorers import HIBScorer

        self.num_samples = num_samples
        self.prior_kl_weight = float(prior_kl_weight)
        self.scorer = HIBScorer(distribution, num_samples=num_samples, name="scorer")

    def loss_and_accuracy(self, parameters: tf.Tensor, labels: tf.Tensor,
                          training: bool | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        parameters, labels = self.batch(parameters, labels)
        seed = _seed(training)
        samples = (None, None)
        if seed is not None:
            shape = (self.num_samples,)
            samples = (self.distribution.sample(parameters[None], shape, seed=draws.fold_seed(seed, 1)),
                       self.distribution.sample(parameters[:, None], shape, seed=draws.fold_seed(seed, 2)))
        probabilities = hib_match_probabilities(self.scorer, parameters, *samples)
        loss = hib_loss(probabilities, labels)
        if self.prior_kl_weight:
            loss += self.prior_kl_weight * prior_kl_loss(self.distribution, parameters)
        return loss, _recall_at_1(probabilities, labels)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_samples": self.num_samples,
                "prior_kl_weight": self.prior_kl_weight}


@keras.utils.register_keras_serializable(package="sparse_embed")
class PFEHead(ProbabilisticHead):
    """PFE: `pfe_loss`, -mean log MLS of the same-label pairs. No weights of its own.

    Accuracy: the batch Recall@1 by MLS.

    Args:
        num_classes: C.
        distribution: A Gaussian on the sphere.
        match_self: Count the pairs (i, i).
        **kwargs: `ProbabilisticHead` arguments (`gather_batch`, `strategy`) and Keras layer arguments.
    """

    couples_batch: ClassVar[bool] = True

    def __init__(self, num_classes: int, distribution: Distribution, match_self: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(num_classes, distribution, **kwargs)
        self.match_self = match_self

    def loss_and_accuracy(self, parameters: tf.Tensor, labels: tf.Tensor,
                          training: bool | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        parameters, labels = self.batch(parameters, labels)
        scores = pfe_pair_scores(self.distribution, parameters)
        same = _same_label(labels)
        if not self.match_self:
            same &= ~tf.eye(tf.shape(same)[0], dtype=tf.bool)
        return -_masked_mean(scores, same), _recall_at_1(scores, labels)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "match_self": self.match_self}


class LogLikeHead(ProbabilisticHead):
    """A `LogLikeClassifier` as a head: DUL-reg, SCF (frozen centres, NLL), vMF-FL (softmax).

    Accuracy: argmax of the logits without margin. `set_class_centres` takes
    the class centres of a deterministic run's margin head.

    Args:
        num_classes: C.
        distribution: The embeddings' distribution.
        use_softmax: Softmax cross-entropy, or the NLL of the logits themselves.
        frozen_centres: The class centres do not train.
        **kwargs: Keras layer arguments.
    """

    def __init__(self, num_classes: int, distribution: Distribution, use_softmax: bool,
                 frozen_centres: bool, **kwargs: Any) -> None:
        super().__init__(num_classes, distribution, **kwargs)
        self.classifier = LogLikeClassifier(num_classes, distribution, use_softmax=use_softmax,
                                            trainable=not frozen_centres, name="classifier")

    def loss_and_accuracy(self, parameters: tf.Tensor, labels: tf.Tensor,
                          training: bool | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        parameters = tf.cast(parameters, tf.float32)
        logits = self.classifier.logits(parameters, labels)
        loss = cross_entropy(logits, labels) if self.classifier.use_softmax else nll_loss(logits, labels)
        return loss, _accuracy(self.classifier.logits(parameters), labels)

    def set_class_centres(self, kernel: Any) -> None:
        """Sets the class centres from a margin head's kernel W (D, C) (one column per class).

        Args:
            kernel: Array of shape (D, C).

        Raises:
            ValueError: If its shape is not (D, C).
        """
        expected = (self.distribution.dim, self.num_classes)
        if tuple(kernel.shape) != expected:
            raise ValueError(f"class centres of shape {tuple(kernel.shape)}, expected {expected}")
        self.classifier.kernel.assign(tf.transpose(tf.cast(kernel, self.classifier.kernel.dtype)))

    def get_config(self) -> dict[str, Any]:
        # The subclasses fix use_softmax and frozen_centres: they are not arguments of theirs.
        return super().get_config()


@keras.utils.register_keras_serializable(package="sparse_embed")
class DULRegHead(LogLikeHead):
    """DUL-reg: -mean log N(w_y; mu, sigma^2 I) at frozen class centres (no KL term).

    Args:
        num_classes: C.
        distribution: A Gaussian on the sphere.
        **kwargs: Keras layer arguments.
    """

    def __init__(self, num_classes: int, distribution: Distribution, **kwargs: Any) -> None:
        super().__init__(num_classes, distribution, use_softmax=False, frozen_centres=True, **kwargs)


@keras.utils.register_keras_serializable(package="sparse_embed")
class SCFHead(LogLikeHead):
    """SCF: -mean [log C_D(kappa) + kappa mu.w_y] at frozen class centres.

    Args:
        num_classes: C.
        distribution: A vMF with a separate kappa.
        **kwargs: Keras layer arguments.
    """

    def __init__(self, num_classes: int, distribution: Distribution, **kwargs: Any) -> None:
        super().__init__(num_classes, distribution, use_softmax=False, frozen_centres=True, **kwargs)


@keras.utils.register_keras_serializable(package="sparse_embed")
class VMFFLHead(LogLikeHead):
    """vMF-FL: softmax cross-entropy over kappa mu.w_c / |w_c| (log C cancels), trained centres.

    Args:
        num_classes: C.
        distribution: A vMF with a separate kappa.
        **kwargs: Keras layer arguments.
    """

    def __init__(self, num_classes: int, distribution: Distribution, **kwargs: Any) -> None:
        super().__init__(num_classes, distribution, use_softmax=True, frozen_centres=False, **kwargs)


@keras.utils.register_keras_serializable(package="sparse_embed")
class DULClsHead(ProbabilisticHead):
    """DUL-cls: `dul_cls_loss`, a margin head on one reparametrized sample plus the weighted prior KL.

    Accuracy: argmax of the margin head's logits of the means.

    Args:
        num_classes: C.
        distribution: A Gaussian on the sphere.
        classifier: `arcface` or `cosface`.
        scale: Logit scale s.
        margin: The margin m.
        prior_kl_weight: Weight of the KL term.
        **kwargs: Keras layer arguments.
    """

    def __init__(self, num_classes: int, distribution: Distribution, classifier: str = "arcface",
                 scale: float = 64.0, margin: float = 0.5, prior_kl_weight: float = 3.3e-3,
                 **kwargs: Any) -> None:
        super().__init__(num_classes, distribution, **kwargs)
        from sparse_embed.heads.margin import ArcFaceHead, CosFaceHead

        margin_heads = {"arcface": ArcFaceHead, "cosface": CosFaceHead}
        if classifier not in margin_heads:
            raise ValueError(f"classifier must be one of {', '.join(margin_heads)}, got {classifier!r}")
        self.classifier_name = classifier
        self.scale = float(scale)
        self.margin = float(margin)
        self.prior_kl_weight = float(prior_kl_weight)
        self.classifier = margin_heads[classifier](num_classes, scale=scale, margin=margin, name="classifier")
        self.classifier.build((None, distribution.dim))

    def loss_and_accuracy(self, parameters: tf.Tensor, labels: tf.Tensor,
                          training: bool | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        parameters = tf.cast(parameters, tf.float32)
        loss = dul_cls_loss(self.classifier, self.distribution, parameters, labels, self.prior_kl_weight,
                            seed=_seed(training))
        logits = self.classifier.logits(self.distribution.mean(parameters))
        return loss, _accuracy(logits, labels)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "classifier": self.classifier_name, "scale": self.scale,
                "margin": self.margin, "prior_kl_weight": self.prior_kl_weight}


@keras.utils.register_keras_serializable(package="sparse_embed")
class VMFLossHead(ProbabilisticHead):
    """vMF-loss: the mean of `vmf_loss` with trained class vMFs and scale (`VMFLoss`).

    Accuracy: argmax of the cosines of the mean direction and the class directions.

    Args:
        num_classes: C.
        distribution: A vMF with kappa = norm.
        initial_log_scale: log s at the start.
        kappa_confidence: lambda of the class initialisation.
        num_samples: Samples per embedding.
        approximate_logc: The paper's approximation of log C in the denominator.
        deterministic_target: Class directions instead of class vMFs.
        **kwargs: Keras layer arguments.
    """

    def __init__(self, num_classes: int, distribution: Distribution, initial_log_scale: float = 2.773,
                 kappa_confidence: float = 0.7, num_samples: int = 10, approximate_logc: bool = True,
                 deterministic_target: bool = False, **kwargs: Any) -> None:
        super().__init__(num_classes, distribution, **kwargs)
        self.initial_log_scale = float(initial_log_scale)
        self.kappa_confidence = float(kappa_confidence)
        self.num_samples = num_samples
        self.approximate_logc = approximate_logc
        self.deterministic_target = deterministic_target
        self.loss_layer = VMFLoss(num_classes, distribution.dim, initial_log_scale=initial_log_scale,
                                  kappa_confidence=kappa_confidence, num_samples=num_samples,
                                  approximate_logc=approximate_logc,
                                  deterministic_target=deterministic_target, name="vmf_loss")

    def loss_and_accuracy(self, parameters: tf.Tensor, labels: tf.Tensor,
                          training: bool | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        parameters = tf.cast(parameters, tf.float32)
        loss = self.loss_layer(parameters, labels, seed=_seed(training))
        directions = normalize(self.loss_layer.class_parameters)
        logits = tf.matmul(normalize(parameters), directions, transpose_b=True)
        return loss, _accuracy(logits, labels)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "initial_log_scale": self.initial_log_scale,
                "kappa_confidence": self.kappa_confidence, "num_samples": self.num_samples,
                "approximate_logc": self.approximate_logc, "deterministic_target": self.deterministic_target}


@keras.utils.register_keras_serializable(package="sparse_embed")
class SPEHead(ProbabilisticHead):
    """SPE: the NLL of `spe_logits` with a trained epsilon (`SPELoss`), on class-balanced batches.

    Accuracy: argmax of the SPE logits.

    Args:
        num_classes: C.
        distribution: A Gaussian (in R^D in the reference).
        train_epsilon: Learn epsilon (else 0).
        num_samples: Samples per query and class; 0 uses the product's mean.
        **kwargs: `ProbabilisticHead` arguments (`gather_batch`, `strategy`) and Keras layer arguments.
    """

    couples_batch: ClassVar[bool] = True

    def __init__(self, num_classes: int, distribution: Distribution, train_epsilon: bool = True,
                 num_samples: int = 16, **kwargs: Any) -> None:
        super().__init__(num_classes, distribution, **kwargs)
        self.train_epsilon = train_epsilon
        self.num_samples = num_samples
        self.spe = SPELoss(num_classes, distribution.dim, train_epsilon=train_epsilon,
                           num_samples=num_samples, name="spe")
        # The run's own Gaussian (its covariance and parametrization), not SPELoss's default one.
        self.spe.distribution = distribution

    def loss_and_accuracy(self, parameters: tf.Tensor, labels: tf.Tensor,
                          training: bool | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        parameters, labels = self.batch(parameters, labels)
        logits = self.spe.logits(parameters, labels, seed=_seed(training))
        return nll_loss(logits, labels), _accuracy(logits, labels)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "train_epsilon": self.train_epsilon, "num_samples": self.num_samples}


@keras.utils.register_keras_serializable(package="sparse_embed")
class DSMLHead(ProbabilisticHead):
    """DSML: softmax over trained class distributions' log-likelihoods of the normalised embedding.

    Accuracy: argmax of the logits.

    Args:
        num_classes: C.
        distribution: A Dirac on the sphere.
        target: The class distributions, `vmf` (kappa separate) or `gaussian` (on the sphere).
        **kwargs: Keras layer arguments.
    """

    def __init__(self, num_classes: int, distribution: Distribution, target: str = "vmf",
                 **kwargs: Any) -> None:
        super().__init__(num_classes, distribution, **kwargs)
        targets = {"vmf": {"kappa": "separate"}, "gaussian": {"spherical": True}}
        if target not in targets:
            raise ValueError(f"target must be one of {', '.join(targets)}, got {target!r}")
        self.target = target
        self.classifier = LogLikeClassifier(
            num_classes, distribution, target_distribution=build_distribution(target, distribution.dim,
                                                                              **targets[target]),
            use_softmax=True, name="classifier")

    def loss_and_accuracy(self, parameters: tf.Tensor, labels: tf.Tensor,
                          training: bool | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        parameters = tf.cast(parameters, tf.float32)
        loss = self.classifier(parameters, labels, seed=_seed(training))
        return loss, _accuracy(self.classifier.logits(parameters), labels)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "target": self.target}


# Builders, as `sparse_embed.heads.params` names them: (num_classes, P, head config[, distribution]).

def _method(cls: type[ProbabilisticHead], num_classes: int, width: int, config: HeadConfig,
            distribution: Distribution | None) -> ProbabilisticHead:
    """The head `cls` with the config's parameters, reading `distribution` (by default the method's own)."""
    from sparse_embed.heads.params import HEADS

    if distribution is None:
        distribution = default_distribution(HEADS.get(config.name).distribution, width)
    elif distribution.num_parameters != width:
        raise ValueError(f"the distribution takes {distribution.num_parameters} parameters, the "
                         f"backbone gives {width}")
    params = {f.name: getattr(config.params, f.name) for f in dataclasses.fields(config.params)}
    if cls.couples_batch:
        params["gather_batch"] = config.gather_batch
    return cls(num_classes, distribution, name=f"{config.name}_head", **params)


def hib_head(num_classes: int, embedding_size: int, config: HeadConfig,
             distribution: Distribution | None = None) -> HIBHead:
    """HIB (`head.name=hib`).

    Args:
        num_classes: C.
        embedding_size: P, the width of the backbone's output (the parameter vector).
        config: The head section.
        distribution: The run's distribution; None: the method's own, P wide.
    """
    return _method(HIBHead, num_classes, embedding_size, config, distribution)


def pfe_head(num_classes: int, embedding_size: int, config: HeadConfig,
             distribution: Distribution | None = None) -> PFEHead:
    """PFE (`head.name=pfe`); arguments as `hib_head`."""
    return _method(PFEHead, num_classes, embedding_size, config, distribution)


def dul_reg_head(num_classes: int, embedding_size: int, config: HeadConfig,
                 distribution: Distribution | None = None) -> DULRegHead:
    """DUL-reg (`head.name=dul_reg`); arguments as `hib_head`."""
    return _method(DULRegHead, num_classes, embedding_size, config, distribution)


def dul_cls_head(num_classes: int, embedding_size: int, config: HeadConfig,
                 distribution: Distribution | None = None) -> DULClsHead:
    """DUL-cls (`head.name=dul_cls`); arguments as `hib_head`."""
    return _method(DULClsHead, num_classes, embedding_size, config, distribution)


def scf_head(num_classes: int, embedding_size: int, config: HeadConfig,
             distribution: Distribution | None = None) -> SCFHead:
    """SCF (`head.name=scf`); arguments as `hib_head`."""
    return _method(SCFHead, num_classes, embedding_size, config, distribution)


def vmf_fl_head(num_classes: int, embedding_size: int, config: HeadConfig,
                distribution: Distribution | None = None) -> VMFFLHead:
    """vMF-FL (`head.name=vmf_fl`); arguments as `hib_head`."""
    return _method(VMFFLHead, num_classes, embedding_size, config, distribution)


def vmf_loss_head(num_classes: int, embedding_size: int, config: HeadConfig,
                  distribution: Distribution | None = None) -> VMFLossHead:
    """vMF-loss (`head.name=vmf_loss`); arguments as `hib_head`."""
    return _method(VMFLossHead, num_classes, embedding_size, config, distribution)


def spe_head(num_classes: int, embedding_size: int, config: HeadConfig,
             distribution: Distribution | None = None) -> SPEHead:
    """SPE (`head.name=spe`); arguments as `hib_head`."""
    return _method(SPEHead, num_classes, embedding_size, config, distribution)


def dsml_head(num_classes: int, embedding_size: int, config: HeadConfig,
              distribution: Distribution | None = None) -> DSMLHead:
    """DSML (`head.name=dsml`); arguments as `hib_head`."""
    return _method(DSMLHead, num_classes, embedding_size, config, distribution)
