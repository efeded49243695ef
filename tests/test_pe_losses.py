"""The losses of the probabilistic-embeddings reference code ("PE"): every golden `loss_*` quantity replayed.

The deterministic losses (ArcFace, CosFace, NormSoftmax, label smoothing,
Proxy-Anchor, Multi-Similarity) replay through the suite's existing heads;
Proxy-NCA and the probabilistic methods (HIB, PFE, DUL-reg, DUL-cls, SCF,
vMF-FL, vMF-loss, SPE, DSML) through `sparse_embed.heads.probabilistic`.
`REPLAYS` maps a golden kind to its replay; where PE is wrong, `DEVIATIONS`
says why and `check_deviation` checks this implementation against an
independent NumPy / SciPy computation of the correct formula (and that PE's
value is the wrong formula's). Sampled losses replay with the samples PE
drew, turned back into the standard noise of the reparametrization where
the loss takes noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import scipy.special
from pe_golden import golden, quantities, replay_outputs

from sparse_embed.distributions import (
    Dirac,
    Distribution,
    Gaussian,
    VonMisesFisher,
)
from sparse_embed.distributions.scorers import HIBScorer, build_scorer
from sparse_embed.heads.margin import ArcFaceHead, CosFaceHead
from sparse_embed.heads.pair import MultiSimilarityHead
from sparse_embed.heads.probabilistic import (
    LogLikeClassifier,
    SPELoss,
    VMFLoss,
    cross_entropy,
    dul_cls_loss,
    group_by_class,
    hib_loss,
    hib_match_probabilities,
    loglike_logits,
    nll_loss,
    pfe_loss,
    pfe_pair_scores,
    prior_kl_loss,
    proxy_nca_loss,
    spe_logits,
    spe_prototypes,
    target_loglike_logits,
    vmf_loss,
)
from sparse_embed.heads.proxy import ProxyAnchorHead, ProxyNCAHead
from sparse_embed.keras import tf

pytestmark = pytest.mark.unit

# PE's golden values are float64; 1e-5 relative is what PE's float32 training allows.
RTOL = 1e-5
ATOL = 1e-9
# The existing heads compute in float32 (as training does): a logit s cos(theta) carries float32
# rounding relative to s, not to itself, so outputs of kinds replayed through them are also allowed
# an absolute error of 1e-6 of their largest magnitude (logits near 0 would otherwise need 1e-12).
FLOAT32_KINDS = {"loss_margin_softmax", "loss_multi_similarity", "loss_dul_cls"}
FLOAT32_ATOL = 1e-6


def f64(values: Any) -> tf.Tensor:
    return tf.constant(np.asarray(values, dtype=np.float64))


def f32(values: Any) -> tf.Tensor:
    return tf.constant(np.asarray(values, dtype=np.float32))


def labels_of(values: Any) -> tf.Tensor:
    return tf.constant(np.asarray(values, dtype=np.int32))


def distribution_from_pe(kind: str, config: dict[str, Any]) -> Distribution:
    """The distribution PE builds as `kind` ("dirac", "gmm", "vmf") with `config` (PE's defaults apply)."""
    config = dict(config)
    dim = config.pop("dim")
    if "k" in config:
        config["kappa"] = config.pop("k")
    return {"dirac": Dirac, "gmm": Gaussian, "vmf": VonMisesFisher}[kind](dim, **config)


def margin_head(classifier: str, config: dict[str, Any], weight: np.ndarray) -> ArcFaceHead | CosFaceHead:
    """The suite's ArcFace / CosFace head with PE's scale, margin and class weights W (C, D)."""
    cls = ArcFaceHead if classifier == "arcface" else CosFaceHead
    num_classes, dim = weight.shape
    head = cls(num_classes, scale=config["scale"], margin=config["margin"], embedding_size=dim)
    head.build(tf.TensorShape([None, dim]))
    head.kernel.assign(weight.T.astype(np.float32))
    return head


def gaussian_noise(distribution: Gaussian, parameters: tf.Tensor, samples: Any) -> tf.Tensor:
    """The standard noise eps with samples = mu + sigma eps (PE's Gaussian draws)."""
    mu, variance, _ = distribution.unpack(parameters)
    return (f64(samples) - mu) / tf.sqrt(variance)


# ---------------------------------------------------------------------------------------------------
# Replays: golden kind -> (quantity -> computed outputs, keyed like the quantity's outputs).
# ---------------------------------------------------------------------------------------------------

def replay_margin_softmax(quantity: dict) -> dict[str, np.ndarray]:
    params, inputs = quantity["params"], quantity["inputs"]
    config, criterion = params["classifier_config"], params["criterion_config"]
    weight = np.asarray(inputs["weight"], np.float64)
    embeddings, labels = f32(inputs["embeddings"]), labels_of(inputs["labels"])
    head = margin_head(params["classifier"], config, weight)
    logits = head.training_logits(embeddings, labels)
    plain = head.logits(embeddings)
    if config.get("symmetric", False):
        # PE's symmetric CosFace adds s m / 2 to every logit: positives s (cos - m/2), others s (cos + m/2).
        logits += config["scale"] * config["margin"] / 2
        plain += config["scale"] * config["margin"] / 2
    if criterion.get("proxy_anchor_weight", 0):
        # Proxy-Anchor on those logits is the suite's head with alpha = s, delta = m / 2 and proxies W.
        assert config.get("symmetric", False) and criterion.get("xent_weight") == 0
        counts = np.bincount(np.asarray(inputs["labels"]), minlength=len(weight))
        # PE averages the push term over classes with a negative, the head over all: equal here.
        assert (counts < len(inputs["labels"])).all()
        anchor = ProxyAnchorHead(len(weight), alpha=config["scale"], delta=config["margin"] / 2,
                                 embedding_size=weight.shape[1])
        anchor.build(tf.TensorShape([None, weight.shape[1]]))
        anchor.proxies.assign(weight.astype(np.float32))
        loss = criterion["proxy_anchor_weight"] * anchor(embeddings, labels)
    elif criterion.get("xent_smoothing", 0):
        loss = cross_entropy(logits, labels, criterion["xent_smoothing"])
    else:
        loss = head(embeddings, labels)
    return {"logits": logits.numpy(), "logits_no_labels": plain.numpy(), "loss": loss.numpy()}


def replay_multi_similarity(quantity: dict) -> dict[str, np.ndarray]:
    ms, inputs = quantity["params"]["ms_config"], quantity["inputs"]
    head = MultiSimilarityHead(alpha=ms["positive_scale"], beta=ms["negative_scale"], base=ms["threshold"],
                               epsilon=ms["margin"])
    embeddings = f32(inputs["embeddings"])
    return {"loss_balanced": head(embeddings, labels_of(inputs["labels_balanced"])).numpy(),
            "loss_unbalanced": head(embeddings, labels_of(inputs["labels_unbalanced"])).numpy()}


def replay_proxy_nca(quantity: dict) -> dict[str, np.ndarray]:
    inputs = quantity["inputs"]
    dist = Dirac(quantity["params"]["dim"], spherical=True)
    scores = build_scorer(quantity["params"]["scorer"], dist)(f64(inputs["embeddings"])[:, None],
                                                              f64(inputs["weight"])[None])
    return {"scorer_classifier_logits": scores.numpy(),
            "loss": proxy_nca_loss(scores, labels_of(inputs["labels"])).numpy()}


def replay_hib(quantity: dict) -> dict[str, np.ndarray]:
    params, inputs = quantity["params"], quantity["inputs"]
    dist = distribution_from_pe("gmm", params["distribution_config"])
    p, labels = f64(inputs["parameters"]), labels_of(inputs["labels"])
    scorer = HIBScorer(dist)
    scorer.build(p.shape)
    scorer.scale.assign(params["hib_scale"])
    scorer.bias.assign(params["hib_bias"])
    probs = hib_match_probabilities(scorer, p, f64(inputs["samples1"]), f64(inputs["samples2"]))
    loss = (params["hib_weight"] * hib_loss(probs, labels)
            + params["prior_kld_weight"] * prior_kl_loss(dist, p))
    return {"same_probs": probs.numpy(), "prior_kld": dist.prior_kl(p).numpy(), "loss": loss.numpy()}


def replay_pfe(quantity: dict) -> dict[str, np.ndarray]:
    dist = distribution_from_pe("gmm", quantity["params"]["distribution_config"])
    p, labels = f64(quantity["inputs"]["parameters"]), labels_of(quantity["inputs"]["labels"])
    return {"loss_match_self=True": pfe_loss(dist, p, labels, match_self=True).numpy(),
            "loss_match_self=False": pfe_loss(dist, p, labels, match_self=False).numpy(),
            "pair_logmls": pfe_pair_scores(dist, p).numpy()}


def replay_loglike(quantity: dict) -> dict[str, np.ndarray]:
    params, inputs = quantity["params"], quantity["inputs"]
    dist = distribution_from_pe(params["distribution"], params["distribution_config"])
    p, labels = f64(inputs["parameters"]), labels_of(inputs["labels"])
    logits = loglike_logits(dist, p, f64(inputs["weight"]), labels,
                            margin=params["classifier_config"].get("margin", 0.0))
    softmax = params["criterion_config"].get("use_softmax", True)
    loss = cross_entropy(logits, labels) if softmax else nll_loss(logits, labels)
    return {"logits": logits.numpy(), "loss": loss.numpy()}


def replay_dul_cls(quantity: dict) -> dict[str, np.ndarray]:
    params, inputs = quantity["params"], quantity["inputs"]
    dist = distribution_from_pe("gmm", params["distribution_config"])
    p, labels = f64(inputs["parameters"]), labels_of(inputs["labels"])
    head = margin_head(params["classifier"], params["classifier_config"], np.asarray(inputs["weight"]))
    noise = gaussian_noise(dist, p, inputs["samples"])
    logits = head.training_logits(dist.sample(p, noise=noise), labels)
    loss = dul_cls_loss(head, dist, p, labels, params["prior_kld_weight"], noise=noise)
    return {"logits": logits.numpy(), "prior_kld": dist.prior_kl(p).numpy(), "loss": loss.numpy()}


def replay_dsml(quantity: dict) -> dict[str, np.ndarray]:
    params, inputs = quantity["params"], quantity["inputs"]
    target = distribution_from_pe(params["target_distribution"], params["target_distribution_config"])
    # A spherical Dirac embedding's sample is its normalised mean.
    points = Dirac(params["dim"], spherical=True).sample(f64(inputs["embeddings"]))
    labels = labels_of(inputs["labels"])
    logits = target_loglike_logits(target, f64(inputs["weight"]), points)
    return {"logits": logits.numpy(), "loss": cross_entropy(logits, labels).numpy()}


def replay_vmf_loss(quantity: dict) -> dict[str, np.ndarray]:
    params, inputs = quantity["params"], quantity["inputs"]
    config = params["classifier_config"]
    dist = distribution_from_pe("vmf", params["distribution_config"])
    losses = vmf_loss(dist, f64(inputs["parameters"]), labels_of(inputs["labels"]), f64(inputs["weight"]),
                      params["scale"], samples=f64(inputs["samples"]),
                      approximate_logc=config.get("approximate_logc", True),
                      deterministic_target=config.get("deterministic_target", False))
    return {"per_sample_loss": losses.numpy(), "loss": tf.reduce_mean(losses).numpy()}


def spe_noise(dist: Gaussian, p: tf.Tensor, labels: tf.Tensor, epsilon: float,
              samples: tuple[Any, Any]) -> tuple[tf.Tensor, tf.Tensor]:
    """The standard noise of PE's samples of each half's query x prototype product densities."""
    grouped, _ = group_by_class(labels)
    by_class = tf.gather(p, grouped)
    half = int(grouped.shape[0]) // 2
    noise = []
    for query, support, drawn in [(by_class[:half], by_class[half:], samples[0]),
                                  (by_class[half:], by_class[:half], samples[1])]:
        prototypes = spe_prototypes(dist, support, epsilon)
        _, product = dist.pdf_product(query[:, :, None], prototypes[None, None])
        noise.append(gaussian_noise(dist, product[:, :, None], drawn))
    return noise[0], noise[1]


def replay_spe(quantity: dict) -> dict[str, np.ndarray]:
    params, inputs = quantity["params"], quantity["inputs"]
    dist = distribution_from_pe("gmm", params["distribution_config"])
    p, labels = f64(inputs["parameters"]), labels_of(inputs["labels"])
    epsilon = params["epsilon"]
    size = params["classifier_config"]["sample_size"]
    noise = None
    if size > 0:
        noise = spe_noise(dist, p, labels, epsilon, (inputs["samples_half1"], inputs["samples_half2"]))
    logits = spe_logits(dist, p, labels, params["num_classes"], epsilon, num_samples=size, noise=noise)
    return {"logits": logits.numpy(), "loss": nll_loss(logits, labels).numpy()}


REPLAYS: dict[str, Callable[[dict], dict[str, np.ndarray]]] = {
    "loss_margin_softmax": replay_margin_softmax,
    "loss_multi_similarity": replay_multi_similarity,
    "loss_proxy_nca": replay_proxy_nca,
    "loss_hib": replay_hib,
    "loss_pfe": replay_pfe,
    "loss_loglike": replay_loglike,
    "loss_dul_cls": replay_dul_cls,
    "loss_dsml": replay_dsml,
    "loss_vmf_loss": replay_vmf_loss,
    "loss_spe": replay_spe,
}

ARCFACE = (
    "PE's ArcFace drops the margin where theta_y > pi - m (target logit s cos(theta_y), a jump down to "
    "no margin); the suite's ArcFaceHead continues with InsightFace's cos(theta_y) - m sin(pi - m), which "
    "keeps decreasing in theta. Checked against a NumPy ArcFace with that branch; PE's value is the same "
    "formula with PE's rule, and differs only at the target logits past the threshold."
)
VMF_LOSS = (
    "PE's vMF-loss with approximate_logc subtracts the exact log C_d(s) from a logsumexp of approximate "
    "log MLS terms that each hold the approximate log C_d(s): a constant offset C~(s) - C(s) per example "
    "(+6.5 nats at d = 8). This implementation uses the approximation throughout, so the log C(s) terms "
    "cancel. Checked against a NumPy/SciPy re-implementation, and PE's value is it plus that offset."
)
SPE = (
    "PE's SPE denominator, logsumexp_l'' log N(z_l''; p_l''), pairs each prototype with the sample drawn "
    "for the product with that same prototype, so it is one number per query, not per class; SPE's "
    "estimator of p(y = l | q) = MLS(q, p_l) E_{z ~ q p_l}[1 / sum_l'' N(z; p_l'')] evaluates every "
    "prototype at the one z. Checked against a NumPy re-implementation of the estimator on PE's samples; "
    "PE's value is the same re-implementation with PE's pairing."
)
DEVIATIONS: dict[str, str] = {
    **{f"loss/{name}/{key}": ARCFACE for name in ("arcface", "arcface-m0.3") for key in ("logits", "loss")},
    **{f"loss/{name}": VMF_LOSS for name in ("vmf-loss", "vmf-loss-fixed-scale")},
    **{f"loss/{name}": SPE for name in ("spe-mean", "spe-mean-noeps", "spe")},
}


# ---------------------------------------------------------------------------------------------------
# Independent references for the deviations (NumPy / SciPy, float64).
# ---------------------------------------------------------------------------------------------------

def np_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    log_probs = logits - scipy.special.logsumexp(logits, axis=-1, keepdims=True)
    return float(-np.mean(log_probs[np.arange(len(labels)), labels]))


def np_arcface_logits(quantity: dict, pe_rule: bool) -> np.ndarray:
    """ArcFace training logits; past theta_y > pi - m: InsightFace's linear target, or PE's no margin."""
    config, inputs = quantity["params"]["classifier_config"], quantity["inputs"]
    s, m = config["scale"], config["margin"]
    labels = np.asarray(inputs["labels"])
    cos = np_normalize(np.asarray(inputs["embeddings"])) @ np_normalize(np.asarray(inputs["weight"])).T
    rows = np.arange(len(labels))
    target = cos[rows, labels]
    theta = np.arccos(np.clip(target, -1, 1))
    past = theta > math.pi - m
    logits = cos.copy()
    logits[rows, labels] = np.where(past, target if pe_rule else target - m * math.sin(math.pi - m),
                                    np.cos(theta + m))
    return s * logits


def check_arcface(name: str, key: str, quantity: dict, got: np.ndarray) -> None:
    labels = np.asarray(quantity["inputs"]["labels"])
    ours = np_arcface_logits(quantity, pe_rule=False)
    pe = np_arcface_logits(quantity, pe_rule=True)
    want = ours if key == "logits" else np_cross_entropy(ours, labels)
    pe_want = pe if key == "logits" else np_cross_entropy(pe, labels)
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=FLOAT32_ATOL * scale, err_msg=f"{name}/{key}")
    np.testing.assert_allclose(np.asarray(quantity["outputs"][key]), pe_want, rtol=1e-9, atol=1e-9)
    differ = ~np.isclose(ours, pe, rtol=1e-9, atol=1e-9)
    assert differ.any(), f"{name}: no target angle past pi - m; drop the deviation"


def np_log_vmf_c(dim: int, kappa: np.ndarray) -> np.ndarray:
    order = dim / 2 - 1
    kappa = np.asarray(kappa, np.float64)
    return order * np.log(kappa) - dim / 2 * math.log(2 * math.pi) - (np.log(scipy.special.ive(order, kappa))
                                                                       + kappa)


def np_approx_log_vmf_c(dim: int, kappa: np.ndarray) -> np.ndarray:
    """Scott et al.'s approximation of log C_d, as written in the vMF-loss paper (no constant)."""
    low, high = (dim - 1) / 2, (dim + 1) / 2
    root_low, root_high = np.sqrt(low**2 + kappa**2), np.sqrt(high**2 + kappa**2)
    return (dim - 1) / 4 * (np.log(low + root_low) + np.log(low + root_high)) - (root_low + root_high) / 2


def np_vmf_loss(quantity: dict) -> np.ndarray:
    """Per-example vMF-loss with one (the approximate) log C throughout."""
    params, inputs = quantity["params"], quantity["inputs"]
    dim, s = params["distribution_config"]["dim"], params["scale"]
    x, w = np.asarray(inputs["parameters"]), np.asarray(inputs["weight"])
    labels = np.asarray(inputs["labels"])
    z = np_normalize(np.asarray(inputs["samples"]))

    def mean(v: np.ndarray) -> np.ndarray:
        kappa = np.linalg.norm(v, axis=-1, keepdims=True)
        order = dim / 2
        return scipy.special.ive(order, kappa) / scipy.special.ive(order - 1, kappa) * np_normalize(v)

    log_mls = (np_approx_log_vmf_c(dim, s) + np_approx_log_vmf_c(dim, np.linalg.norm(w, axis=-1))[None, None]
               - np_approx_log_vmf_c(dim, np.linalg.norm(s * z[:, :, None] + w[None, None], axis=-1)))
    denominator = scipy.special.logsumexp(log_mls, axis=-1) - np_approx_log_vmf_c(dim, s)
    return denominator.mean(axis=1) - s * np.sum(mean(x) * mean(w[labels]), axis=-1)


def check_vmf_loss(name: str, key: str, quantity: dict, got: np.ndarray) -> None:
    dim, s = quantity["params"]["distribution_config"]["dim"], quantity["params"]["scale"]
    reference = np_vmf_loss(quantity)
    want = reference if key == "per_sample_loss" else reference.mean()
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9, err_msg=f"{name}/{key}")
    offset = np_approx_log_vmf_c(dim, s) - np_log_vmf_c(dim, s)
    assert offset > 1, f"{name}: no offset at d = {dim}"
    # PE evaluates log C(s) of a fixed scale in float32: 1e-6 absolute.
    np.testing.assert_allclose(np.asarray(quantity["outputs"][key]), want + offset, rtol=1e-7, atol=1e-5)


def np_gaussian(p: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma^2 (..., 1)) of PE's gmm in R^D with spherical covariance and invlin + e^-10."""
    h = p[..., dim:]
    variance = np.where(h < 0, 1 / (1 - np.minimum(h, 0)), 1 + np.maximum(h, 0)) + math.exp(-10)
    return p[..., :dim], variance


def np_log_normal(x: np.ndarray, mu: np.ndarray, variance: np.ndarray) -> np.ndarray:
    dim = x.shape[-1]
    variance = variance[..., 0]
    return -0.5 * (dim * np.log(2 * math.pi * variance) + np.sum((x - mu) ** 2, axis=-1) / variance)


def np_spe_logits(quantity: dict, pe_pairing: bool) -> np.ndarray:
    """SPE logits (B, C) from PE's samples: the estimator (every prototype at one z) or PE's pairing."""
    params, inputs = quantity["params"], quantity["inputs"]
    dim, epsilon, num_classes = params["distribution_config"]["dim"], params["epsilon"], params["num_classes"]
    size = params["classifier_config"]["sample_size"]
    p, labels = np.asarray(inputs["parameters"]), np.asarray(inputs["labels"])
    classes = np.unique(labels)
    index = np.stack([np.flatnonzero(labels == c) for c in classes], axis=1)  # (n, L).
    half = len(index) // 2
    out = np.full((len(labels), num_classes), -100.0)
    for rows, support_rows, drawn in [(index[:half], index[half:], inputs.get("samples_half1")),
                                      (index[half:], index[:half], inputs.get("samples_half2"))]:
        mu_s, var_s = np_gaussian(p[support_rows], dim)
        var_s = var_s + epsilon
        proto_var = 1 / np.sum(1 / var_s, axis=0)
        proto_mu = proto_var * np.sum(mu_s / var_s, axis=0)
        proto_var = proto_var + epsilon  # (L, 1).
        mu_q, var_q = np_gaussian(p[rows], dim)  # (n, L, D), (n, L, 1).
        total = var_q[:, :, None] + proto_var[None, None]  # (n, L, L', 1).
        diff = mu_q[:, :, None] - proto_mu[None, None]
        log_mls = -0.5 * (dim * np.log(2 * math.pi * total[..., 0]) + np.sum(diff**2, -1) / total[..., 0])
        if size > 0:
            z = np.asarray(drawn)  # (n, L, S, L', D).
        else:
            weighted = proto_var[None, None] * mu_q[:, :, None] + var_q[:, :, None] * proto_mu[None, None]
            prod_mu = weighted / total
            z = prod_mu[:, :, None]  # (n, L, 1, L', D).
        if pe_pairing:
            log_den = scipy.special.logsumexp(np_log_normal(z, proto_mu, proto_var), axis=-1)[..., None]
        else:
            dens = np_log_normal(z[..., None, :], proto_mu, proto_var)  # (n, L, S, L', L'').
            log_den = scipy.special.logsumexp(dens, axis=-1)  # (n, L, S, L').
        expectation = scipy.special.logsumexp(-log_den, axis=2) - math.log(z.shape[2])
        logits = log_mls + expectation  # (n, L, L').
        for r in range(len(rows)):
            for j in range(len(classes)):
                out[rows[r, j], classes] = logits[r, j]
    return out


def check_spe(name: str, key: str, quantity: dict, got: np.ndarray) -> None:
    labels = np.asarray(quantity["inputs"]["labels"])
    ours, pe = np_spe_logits(quantity, pe_pairing=False), np_spe_logits(quantity, pe_pairing=True)

    def value(logits: np.ndarray) -> np.ndarray:
        return logits if key == "logits" else -np.mean(logits[np.arange(len(labels)), labels])

    np.testing.assert_allclose(got, value(ours), rtol=1e-9, atol=1e-9, err_msg=f"{name}/{key}")
    np.testing.assert_allclose(np.asarray(quantity["outputs"][key]), value(pe), rtol=1e-9, atol=1e-9)
    assert not np.allclose(ours, pe), f"{name}: the pairing makes no difference; drop the deviation"


def check_deviation(name: str, key: str, quantity: dict, got: np.ndarray) -> None:
    """Checks a documented deviation against its independent computation."""
    checks = {"loss_margin_softmax": check_arcface, "loss_vmf_loss": check_vmf_loss, "loss_spe": check_spe}
    if quantity["kind"] not in checks:
        raise AssertionError(f"{name}/{key} is listed as a deviation but has no independent check")
    checks[quantity["kind"]](name, key, quantity, got)


def deviation_reason(name: str, key: str) -> str | None:
    return DEVIATIONS.get(f"{name}/{key}", DEVIATIONS.get(name))


def compare(name: str, key: str, quantity: dict, got: np.ndarray, want: np.ndarray) -> None:
    assert np.isfinite(want).all(), f"{name}/{key}: the golden value has nulls"
    atol = ATOL
    if quantity["kind"] in FLOAT32_KINDS:
        atol = max(atol, FLOAT32_ATOL * float(np.max(np.abs(want))))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=atol, err_msg=f"{name}/{key}")


def check_quantity(name: str, quantity: dict) -> list[str]:
    """Replays one golden quantity (`replay_outputs`); returns the documented deviations met."""
    return replay_outputs(name, quantity, REPLAYS, deviation_reason, check_deviation, compare)


GOLDEN = quantities(*REPLAYS)


def test_every_loss_kind_is_replayed() -> None:
    kinds = {q["kind"] for q in golden().values() if q["kind"].startswith("loss_")}
    assert kinds <= set(REPLAYS), f"golden loss kinds without a replay: {sorted(kinds - set(REPLAYS))}"


def test_every_deviation_names_a_golden_output() -> None:
    outputs = {f"{name}/{key}" for name, q in GOLDEN for key in q["outputs"]}
    assert set(DEVIATIONS) <= outputs | {name for name, _ in GOLDEN}


def test_an_unknown_kind_or_output_fails() -> None:
    name, quantity = GOLDEN[0]
    with pytest.raises(AssertionError, match="no replay"):
        check_quantity(name, {**quantity, "kind": "no_such_kind"})
    with pytest.raises(AssertionError, match="does not compute"):
        check_quantity(name, {**quantity, "outputs": {**quantity["outputs"], "no_such_output": [0.0]}})


# ---------------------------------------------------------------------------------------------------
# Gradients reach the variance / concentration; trainable weights of the losses.
# ---------------------------------------------------------------------------------------------------

BATCH_LABELS = np.repeat(np.arange(4), 3)  # 12 examples, 4 classes x 3 (SPE needs a balance).
SEED = tf.constant([3, 4], tf.int64)


def random_parameters(dim: int, extra: int, seed: int = 0) -> tf.Variable:
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.normal(size=(len(BATCH_LABELS), dim)),
                             rng.normal(size=(len(BATCH_LABELS), extra)) * 0.5 - 1.0], axis=1)
    return tf.Variable(values.astype(np.float32))


def _with_extra_column(dist: Distribution, terms: Callable[[tf.Tensor], tf.Tensor]) -> dict[str, Any]:
    return {"parameters": random_parameters(dist.dim, dist.num_parameters - dist.dim), "loss": terms,
            "extra": lambda grad, p: grad[:, dist.dim:]}


def gradient_case(method: str) -> dict[str, Any]:
    """parameters, loss(parameters), extra(grad, parameters) (the variance/concentration part), weights."""
    labels = labels_of(BATCH_LABELS)
    classes = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
    if method == "hib":
        dist = Gaussian(8)
        scorer = HIBScorer(dist)
        case = _with_extra_column(dist, lambda p: hib_loss(hib_match_probabilities(scorer, p), labels)
                                  + 1e-3 * prior_kl_loss(dist, p))
        scorer.build(tf.TensorShape([None, dist.num_parameters]))
        return {**case, "weights": [scorer.scale, scorer.bias]}
    if method == "pfe":
        dist = Gaussian(8, spherical=True)
        return _with_extra_column(dist, lambda p: pfe_loss(dist, p, labels))
    if method in ("dul_reg", "scf", "vmf_fl"):
        dist = Gaussian(8, spherical=True) if method == "dul_reg" else VonMisesFisher(8)
        criterion = cross_entropy if method == "vmf_fl" else nll_loss
        return _with_extra_column(dist, lambda p: criterion(loglike_logits(dist, p, classes, labels), labels))
    if method == "dul_cls":
        dist = Gaussian(8, spherical=True)
        head = margin_head("arcface", {"scale": 32.0, "margin": 0.4}, classes)
        return _with_extra_column(dist, lambda p: dul_cls_loss(head, dist, p, labels, 1e-2, seed=SEED))
    if method == "vmf_loss":
        layer = VMFLoss(5, 8)
        parameters = random_parameters(8, 0)
        # kappa = |x|: the concentration's gradient is the radial component.
        return {"parameters": parameters, "loss": lambda p: layer(p * 3.0, labels, seed=SEED),
                "extra": lambda grad, p: tf.reduce_sum(grad * p, axis=-1), "weights": [layer.log_scale]}
    if method == "spe":
        layer = SPELoss(5, 8)
        case = _with_extra_column(layer.distribution, lambda p: layer(p, labels, seed=SEED))
        return {**case, "weights": [layer.log_epsilon]}
    if method == "dsml":
        target = VonMisesFisher(8)
        class_parameters = tf.Variable(np.concatenate([classes, np.zeros((5, 1), np.float32)], axis=1))
        embeddings = tf.Variable(classes[BATCH_LABELS] + np.random.default_rng(2).normal(
            size=(len(BATCH_LABELS), 8)).astype(np.float32))
        # DSML's embeddings are points; its concentrations are the classes'.
        return {"parameters": class_parameters,
                "loss": lambda p: cross_entropy(target_loglike_logits(target, p, embeddings), labels),
                "extra": lambda grad, p: grad[:, 8:]}
    raise KeyError(method)


GRADIENT_METHODS = ["hib", "pfe", "dul_reg", "dul_cls", "scf", "vmf_fl", "vmf_loss", "spe", "dsml"]


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_gradients_reach_the_variance_or_concentration(method: str) -> None:
    case = gradient_case(method)
    parameters = case["parameters"]
    with tf.GradientTape(persistent=True) as tape:
        loss = case["loss"](parameters)
    assert np.isfinite(loss.numpy()), method
    grad = tf.convert_to_tensor(tape.gradient(loss, parameters))
    extra = np.asarray(case["extra"](grad, parameters))
    assert np.isfinite(grad.numpy()).all(), method
    assert np.abs(extra).max() > 1e-6, f"{method}: no gradient reaches the variance / concentration"
    for weight in case.get("weights", []):
        value = tape.gradient(loss, weight)
        assert value is not None and np.isfinite(value.numpy()).all() and abs(float(value)) > 0, weight.name


def test_gradients_in_a_graph_equal_eager() -> None:
    case = gradient_case("spe")
    parameters = case["parameters"]

    def gradient() -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = case["loss"](parameters)
        return tf.convert_to_tensor(tape.gradient(loss, parameters))

    np.testing.assert_allclose(tf.function(gradient)().numpy(), gradient().numpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Contracts and closed forms.
# ---------------------------------------------------------------------------------------------------

def test_spe_refuses_a_class_with_one_example() -> None:
    layer = SPELoss(5, 8)
    parameters = random_parameters(8, 1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="at least two examples of every class"):
        layer(parameters, labels_of(np.r_[BATCH_LABELS[:-1], 4]))


def test_spe_splits_unequally_counted_classes_into_halves() -> None:
    """Classes counted 4, 3 and 2 (workers' batches gathered): each query against the other half.

    The oracle scores every row one at a time: its class's first floor(n_c / 2)
    examples in batch order are one half, the prototypes of the other half of
    every class are products of those supports, and the expectation is taken at
    the product's mean (no samples).
    """
    dist = Gaussian(3)
    rng = np.random.default_rng(2)
    labels = np.array([4, 1, 4, 1, 0, 4, 1, 0, 4])
    parameters = f64(np.concatenate([rng.normal(size=(9, 3)), rng.normal(size=(9, 1)) * 0.3 - 0.5], axis=1))
    epsilon = 0.3
    got = spe_logits(dist, parameters, labels_of(labels), 6, epsilon, num_samples=0).numpy()

    classes = np.unique(labels)
    rank = np.array([np.sum(labels[:i] == y) for i, y in enumerate(labels)])
    first = rank < np.array([np.sum(labels == y) // 2 for y in labels])
    for i in range(len(labels)):
        support = first != first[i]
        supports = [tf.gather(parameters, np.flatnonzero(support & (labels == c)))[:, None] for c in classes]
        prototypes = tf.concat([spe_prototypes(dist, s, epsilon) for s in supports], axis=0)  # (L, P).
        query = parameters[i][None]
        _, product = dist.pdf_product(query, prototypes)
        z = dist.mean(product)  # (L, D).
        denominator = tf.reduce_logsumexp(dist.log_prob(prototypes, z[:, None, :]), axis=-1)
        expected = np.full(6, -100.0)
        expected[classes] = (dist.log_mls(query, prototypes) - denominator).numpy()
        np.testing.assert_allclose(got[i], expected, rtol=1e-10, atol=1e-10, err_msg=f"row {i}")


def test_spe_epsilon_starts_at_its_intended_value() -> None:
    """0.01^(2/D): the reference meant this and starts at exp(0.01^(2/D)) (2.54 at D = 128)."""
    for dim in (8, 128):
        assert float(SPELoss(5, dim).epsilon()) == pytest.approx(0.01 ** (2 / dim), rel=1e-6)
    assert float(SPELoss(5, 8, train_epsilon=False).epsilon()) == 0.0


def test_spe_class_probabilities_sum_to_one() -> None:
    """sum_l MLS(q, p_l) E_{z ~ q p_l}[1 / sum_l'' p_l''(z)] = integral q = 1: the estimate's exp sums to ~1.

    (PE's pairing of the denominator does not have this property.) Prototype variances above the
    queries' keep the Monte-Carlo variance finite; 4000 samples give about 1% error.
    """
    dist = Gaussian(4)
    rng = np.random.default_rng(5)
    labels = np.repeat([0, 1, 3], 4)
    parameters = np.concatenate([rng.normal(size=(12, 4)) * 0.7, np.full((12, 1), -1.0)], axis=1)
    logits = spe_logits(dist, f64(parameters), labels_of(labels), 5, 2.0, num_samples=4000, seed=SEED)
    probabilities = np.exp(logits.numpy())
    # PE's pairing gives 0.90 to 0.95 on this batch.
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=0.02)
    np.testing.assert_allclose(logits.numpy()[:, [2, 4]], -100.0)


def test_vmf_loss_approximate_and_exact_normalizers_agree() -> None:
    """The approximation's error drifts by < 0.1 nats over kappa in [1, 1000], so the losses nearly agree."""
    dist = VonMisesFisher(8, kappa="norm")
    rng = np.random.default_rng(6)
    parameters = f64(rng.normal(size=(12, 8)) * 3)
    classes = f64(rng.normal(size=(5, 8)) * 4)
    samples = dist.sample(parameters, (10,), seed=SEED)
    args = (dist, parameters, labels_of(BATCH_LABELS), classes, 10.0)
    approximate = vmf_loss(*args, samples=samples).numpy()
    exact = vmf_loss(*args, samples=samples, approximate_logc=False).numpy()
    np.testing.assert_allclose(approximate, exact, atol=0.1)


def test_proxy_nca_head_is_softplus_of_the_paper_form() -> None:
    """ProxyNCAHead (scale 1) has the positive in the denominator: its loss is softplus of the paper's."""
    rng = np.random.default_rng(7)
    embeddings, proxies = rng.normal(size=(6, 8)), rng.normal(size=(5, 8))
    labels = np.array([0, 1, 2, 3, 4, 0])
    head = ProxyNCAHead(5, scale=1.0, embedding_size=8)
    head.build(tf.TensorShape([None, 8]))
    head.proxies.assign(proxies.astype(np.float32))
    scores = build_scorer("l2", Dirac(8, spherical=True))(f64(embeddings)[:, None], f64(proxies)[None])
    for i in range(len(labels)):
        paper = proxy_nca_loss(scores[i:i + 1], labels_of(labels[i:i + 1])).numpy()
        ours = head(f32(embeddings[i:i + 1]), labels_of(labels[i:i + 1])).numpy()
        np.testing.assert_allclose(ours, np.logaddexp(0, paper), rtol=1e-5)


def test_hib_loss_closed_form() -> None:
    """P = 1 on positives and 0 on negatives is a perfect batch (loss 0); P = 1/2 everywhere costs log 2."""
    labels = labels_of([0, 0, 1])
    same = np.equal.outer([0, 0, 1], [0, 0, 1])
    assert float(hib_loss(f64(same.astype(float)), labels)) == pytest.approx(0.0, abs=1e-12)
    assert float(hib_loss(f64(np.full((3, 3), 0.5)), labels)) == pytest.approx(math.log(2))
    # torch's BCE floor: a certain mistake costs 100, half of the loss.
    wrong = f64(1.0 - same)
    assert float(hib_loss(wrong, labels)) == pytest.approx(100.0)
    # Saturated probabilities (a float32 sigmoid rounds to exactly 0 or 1) keep a finite gradient.
    saturated = tf.Variable(np.where(same, 0.0, 1.0).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = hib_loss(saturated, labels)
    assert np.isfinite(tape.gradient(loss, saturated).numpy()).all()


def test_cross_entropy_smoothing_is_torch_label_smoothing() -> None:
    rng = np.random.default_rng(8)
    logits, labels = rng.normal(size=(5, 4)), np.array([0, 3, 1, 1, 2])
    log_probs = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
    target = np.full((5, 4), 0.1 / 4)
    target[np.arange(5), labels] += 0.9
    want = -np.mean(np.sum(target * log_probs, axis=1))
    assert float(cross_entropy(f64(logits), labels_of(labels), 0.1)) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("name, quantity", quantities("loss_loglike", "loss_dsml"),
                         ids=[name for name, _ in quantities("loss_loglike", "loss_dsml")])
def test_loglike_classifier_layer_replays(name: str, quantity: dict) -> None:
    """The layer holding the class weights gives the golden loss, and survives a config round trip."""
    params, inputs = quantity["params"], quantity["inputs"]
    if quantity["kind"] == "loss_dsml":
        dist = Dirac(params["dim"], spherical=True)
        target = distribution_from_pe(params["target_distribution"], params["target_distribution_config"])
        options = {"target_distribution": target}
        parameters = f64(inputs["embeddings"])
    else:
        dist = distribution_from_pe(params["distribution"], params["distribution_config"])
        options = {"margin": params["classifier_config"].get("margin", 0.0),
                   "use_softmax": params["criterion_config"].get("use_softmax", True)}
        parameters = f64(inputs["parameters"])
    weight = np.asarray(inputs["weight"])
    layer = LogLikeClassifier(len(weight), dist, dtype="float64", **options)
    layer.kernel.assign(weight)
    loss = layer(parameters, labels_of(inputs["labels"]))
    np.testing.assert_allclose(loss.numpy(), quantity["outputs"]["loss"], rtol=RTOL)
    copy = LogLikeClassifier.from_config(layer.get_config())
    assert copy.get_config() == layer.get_config()


VMF_LOSSES = quantities("loss_vmf_loss")


@pytest.mark.parametrize("name, quantity", VMF_LOSSES, ids=[name for name, _ in VMF_LOSSES])
def test_vmf_loss_layer_replays(name: str, quantity: dict) -> None:
    """The layer with the reference's class vMFs and scale gives the replayed loss (golden or deviation)."""
    params, inputs = quantity["params"], quantity["inputs"]
    config = params["classifier_config"]
    weight = np.asarray(inputs["weight"])
    fixed = config.get("scale")
    layer = VMFLoss(len(weight), weight.shape[1], scale=fixed, dtype="float64",
                    approximate_logc=config.get("approximate_logc", True),
                    deterministic_target=config.get("deterministic_target", False))
    layer.class_parameters.assign(weight)
    if fixed is None:
        layer.log_scale.assign(math.log(params["scale"]))
    loss = layer(f64(inputs["parameters"]), labels_of(inputs["labels"]), samples=f64(inputs["samples"]))
    want = np_vmf_loss(quantity).mean() if deviation_reason(name, "loss") else quantity["outputs"]["loss"]
    np.testing.assert_allclose(loss.numpy(), want, rtol=1e-9)


@pytest.mark.parametrize("name, quantity", quantities("loss_spe"), ids=[n for n, _ in quantities("loss_spe")])
def test_spe_layer_replays(name: str, quantity: dict) -> None:
    """The layer with the reference's epsilon (exp(log_epsilon)) gives the replayed SPE estimator's loss."""
    params, inputs = quantity["params"], quantity["inputs"]
    config = params["classifier_config"]
    layer = SPELoss(params["num_classes"], params["distribution_config"]["dim"], dtype="float64",
                    train_epsilon=config["train_epsilon"], num_samples=config["sample_size"])
    if config["train_epsilon"]:
        layer.log_epsilon.assign(math.log(params["epsilon"]))
    p, labels = f64(inputs["parameters"]), labels_of(inputs["labels"])
    noise = None
    if config["sample_size"] > 0:
        noise = spe_noise(layer.distribution, p, labels, params["epsilon"],
                          (inputs["samples_half1"], inputs["samples_half2"]))
    logits = np_spe_logits(quantity, pe_pairing=False)
    want = -np.mean(logits[np.arange(len(logits)), np.asarray(inputs["labels"])])
    np.testing.assert_allclose(layer(p, labels, noise=noise).numpy(), want, rtol=1e-9)
