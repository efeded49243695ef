"""Distributions, scorers, parametrizations and log C_d(kappa): the reference's golden values, closed
forms, SciPy, numerical integration and sampling statistics.

The golden quantities (tests/data/pe/pe_golden.json, produced by the
probabilistic-embeddings reference code, "PE") are replayed through this
implementation by `REPLAYS` (golden kind -> replay); where PE is wrong,
`DEVIATIONS` says why and `check_quantity` checks this implementation against
an independent computation instead. A later aggregate parity test imports
`REPLAYS`, `DEVIATIONS` and `check_quantity`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import scipy.integrate
import scipy.special
import scipy.stats
from pe_golden import quantities

from sparse_embed.distributions import (
    Dirac,
    Distribution,
    Gaussian,
    Parametrization,
    VonMisesFisher,
    approximate_log_vmf_normalizer,
    log_bessel_iv,
    log_unit_sphere_area,
    log_vmf_normalizer,
)
from sparse_embed.distributions.scorers import HIBScorer, build_scorer
from sparse_embed.keras import tf

pytestmark = pytest.mark.unit

# PE computes in float64 (its float32 runs are marked as such): 1e-5 relative is what PE's float32
# training path allows; the absolute floor covers outputs that cross zero (cosines, log C at d = 3).
RTOL = 1e-5
ATOL = 1e-9


# ---------------------------------------------------------------------------------------------------
# From PE's names and configs to this implementation.
# ---------------------------------------------------------------------------------------------------

def distribution_from_pe(kind: str, config: dict[str, Any]) -> Distribution:
    """The distribution PE builds as `kind` ("dirac", "gmm", "vmf") with `config` (PE's defaults apply)."""
    config = dict(config)
    dim = config.pop("dim")
    if kind == "dirac":
        return Dirac(dim, **config)
    if kind == "gmm":
        return Gaussian(dim, **config)
    if kind == "vmf":
        if "k" in config:
            config["kappa"] = config.pop("k")
        return VonMisesFisher(dim, **config)
    raise KeyError(f"unknown PE distribution {kind!r}")


def f64(values: Any) -> tf.Tensor:
    return tf.constant(np.asarray(values, dtype=np.float64))


# ---------------------------------------------------------------------------------------------------
# Replays: golden kind -> (quantity -> computed outputs, keyed like the quantity's outputs).
# ---------------------------------------------------------------------------------------------------

def replay_parametrization(quantity: dict) -> dict[str, np.ndarray]:
    params = Parametrization(quantity["params"]["type"], min=quantity["params"]["min"])
    x = f64(quantity["inputs"]["x"])
    positive = params.positive(x)
    return {
        "positive": positive.numpy(),
        "log_positive": params.log_positive(x).numpy(),
        "ipositive_of_positive": params.ipositive(positive).numpy(),
    }


def replay_vmf_logc(quantity: dict) -> dict[str, np.ndarray]:
    dim = quantity["params"]["dim"]
    kappa = np.asarray(quantity["inputs"]["kappa"], np.float64)
    log_c = log_vmf_normalizer(dim, f64(kappa)).numpy()
    return {
        "logc": log_c,
        "logc_float32": log_vmf_normalizer(dim, tf.constant(kappa, tf.float32)).numpy(),
        "logiv_v": log_bessel_iv(dim / 2 - 1, f64(kappa)).numpy(),
        "logiv_v_plus_1": log_bessel_iv(dim / 2, f64(kappa)).numpy(),
        "logc_approx_vmf_loss": approximate_log_vmf_normalizer(dim, f64(kappa)).numpy(),
        # The file's two cross-checks are independent references for log C itself.
        "crosscheck_scipy_ive": log_c,
        "crosscheck_exact_mpmath": log_c,
    }


def replay_distribution(quantity: dict) -> dict[str, np.ndarray]:
    dist = distribution_from_pe(quantity["params"]["type"], quantity["params"]["config"])
    p = f64(quantity["inputs"]["parameters"])
    points = f64(quantity["inputs"]["points"])
    out = {
        "mean": dist.mean(p),
        "confidences": dist.confidence(p),
        "prior_kld": dist.prior_kl(p),
        "logpdf": dist.log_prob(p, points),
        "logpdf_pairwise": dist.log_prob(p[:, None], points[None]),
        "logmls_pairwise": dist.log_mls(p[:, None], p[None]),
    }
    if isinstance(dist, Gaussian):
        out["variance"] = dist.variance(p)
    else:
        out["k"] = dist.concentration(p)
    return {key: value.numpy() for key, value in out.items()}


def replay_normal_pdf_product(quantity: dict) -> dict[str, np.ndarray]:
    dist = distribution_from_pe("gmm", quantity["params"]["config"])
    product, parameters = dist.pdf_product(f64(quantity["inputs"]["parameters1"]),
                                           f64(quantity["inputs"]["parameters2"]))
    return {"parameters": parameters.numpy(),
            "new_covariance": np.asarray(product.covariance == "spherical", np.float64)}


def replay_scorers(quantity: dict) -> dict[str, np.ndarray]:
    dist = distribution_from_pe(quantity["params"]["type"], quantity["params"]["config"])
    p1 = f64(quantity["inputs"]["parameters1"])
    p2 = f64(quantity["inputs"]["parameters2"])
    names = ["dot", "cosine", "l2"] + ([] if isinstance(dist, Dirac) else ["mls"])
    out = {}
    for name in names:
        scorer = build_scorer(name, dist)
        out[name] = scorer(p1, p2).numpy()
        out[name + "_pairwise"] = scorer(p1[:, None], p2[None]).numpy()
    return out


def replay_scorers_sampled(quantity: dict) -> dict[str, np.ndarray]:
    params, inputs = quantity["params"], quantity["inputs"]
    dist = distribution_from_pe(params["type"], params["config"])
    p1, p2 = f64(inputs["parameters1"]), f64(inputs["parameters2"])
    hib = HIBScorer(dist)
    hib.build(p1.shape)
    hib.scale.assign(params["hib_scale"])
    hib.bias.assign(params["hib_bias"])
    # PE drew ECS samples as (B, K, 1, D) and (B, 1, K, D); the scorer takes (..., K, D) for both.
    ecs1 = np.asarray(inputs["ecs_samples1"])
    ecs2 = np.asarray(inputs["ecs_samples2"])
    ecs = build_scorer("ecs", dist)
    return {
        "hib": hib(p1, p2, samples1=f64(inputs["hib_samples1"]),
                   samples2=f64(inputs["hib_samples2"])).numpy(),
        "ecs": ecs(p1, p2, samples1=f64(ecs1[:, :, 0]), samples2=f64(ecs2[:, 0])).numpy(),
    }


REPLAYS: dict[str, Callable[[dict], dict[str, np.ndarray]]] = {
    "parametrization": replay_parametrization,
    "vmf_logc": replay_vmf_logc,
    "distribution": replay_distribution,
    "normal_pdf_product": replay_normal_pdf_product,
    "scorers": replay_scorers,
    "scorers_sampled": replay_scorers_sampled,
}

# Outputs whose golden value is null where the reference could not compute one; compared where it did.
PARTIAL_OUTPUTS = {
    "crosscheck_scipy_ive": "SciPy's ive underflows to 0 there (large d, small kappa); the file stores null",
}

LOG_BESSEL = (
    "PE's log I_v takes max(log ive(v, z) + z, log of the series' first term); SciPy's ive(255, z) and "
    "ive(256, z) underflow to 0 for z below about 12.8, so at d = 512 PE returns the first-term bound "
    "(log C frozen at the uniform density, up to 0.16 nats too high). This implementation returns the "
    "true value, checked against the 50-digit mpmath reference, SciPy and the Bessel series."
)
PRIOR_KL = (
    "PE's vMF prior_kld is kappa + log C_d(kappa) - log C_d(1e-6) (log C in float32), not a KL (its "
    "docstring says so). This implementation returns KL(vMF || uniform on the sphere) = kappa A_d(kappa) "
    "+ log C_d(kappa) + log|S^{d-1}|, checked against numerical integration over the sphere."
)
DEVIATIONS: dict[str, str] = {
    **{f"vmf_logc/d=512/{key}": LOG_BESSEL for key in ("logc", "logc_float32", "logiv_v", "logiv_v_plus_1")},
    **{f"distribution/vmf/dim={dim},k={k}/prior_kld": PRIOR_KL
       for dim in (8, 128) for k in ("separate", "norm")},
}


# ---------------------------------------------------------------------------------------------------
# Independent references for the deviations.
# ---------------------------------------------------------------------------------------------------

def reference_log_iv(order: float, z: np.ndarray) -> np.ndarray:
    """log I_order(z): SciPy's ive where it does not underflow, else the power series in log space."""
    z = np.asarray(z, np.float64)
    with np.errstate(divide="ignore"):
        scipy_value = np.log(scipy.special.ive(order, z)) + z
    k = np.arange(400)[:, None]
    log_terms = (2 * k * np.log(z / 2)[None] - scipy.special.gammaln(k + 1)
                 - scipy.special.gammaln(order + k + 1) + order * np.log(z / 2)[None])
    series = scipy.special.logsumexp(log_terms, axis=0)
    return np.where(np.isfinite(scipy_value), scipy_value, series)


def reference_log_c(dim: int, kappa: np.ndarray) -> np.ndarray:
    order = dim / 2 - 1
    return order * np.log(kappa) - dim / 2 * math.log(2 * math.pi) - reference_log_iv(order, kappa)


def integrated_vmf_kl(dim: int, kappa: float) -> tuple[float, float]:
    """(log C_d(kappa), KL(vMF || uniform)) by integrating over t = mu.x, with no Bessel function.

    The density of t is |S^{d-2}| C exp(kappa t) (1 - t^2)^{(d-3)/2}; with s = 1 - t the integrand is
    scaled by exp(-kappa) so that nothing overflows.
    """
    log_area = log_unit_sphere_area(dim - 1)

    def weight(s: float) -> float:
        return math.exp(-kappa * s + (dim - 3) / 2 * math.log(max(s * (2 - s), 1e-300)))

    width = min(2.0, 50.0 * dim / max(kappa, 1e-9))
    breaks = sorted({min(2.0, width * f) for f in (0.01, 0.1, 0.3, 1.0)} | {2.0})
    pieces = [(lo, hi) for lo, hi in zip([0.0] + breaks[:-1], breaks, strict=True) if hi > lo]

    def integral(f: Callable[[float], float]) -> float:
        return sum(scipy.integrate.quad(f, lo, hi, epsabs=0, epsrel=1e-13, limit=200)[0] for lo, hi in pieces)

    mass = integral(weight)
    first = integral(lambda s: s * weight(s))
    log_c = -(kappa + math.log(mass) + log_area)
    mean_cosine = 1 - first / mass
    return log_c, kappa * mean_cosine + log_c + log_unit_sphere_area(dim)


def check_log_bessel_deviation(name: str, key: str, quantity: dict, got: np.ndarray) -> None:
    dim = quantity["params"]["dim"]
    kappa = np.asarray(quantity["inputs"]["kappa"], np.float64)
    order = dim / 2 - (0 if key == "logiv_v_plus_1" else 1)
    if key.startswith("logiv"):
        reference = reference_log_iv(order, kappa)
    else:
        reference = np.asarray(quantity["outputs"]["crosscheck_exact_mpmath"], np.float64)
        np.testing.assert_allclose(reference_log_c(dim, kappa), reference, rtol=1e-12)
    rtol = 1e-6 if key == "logc_float32" else 1e-11
    np.testing.assert_allclose(got, reference, rtol=rtol, atol=ATOL, err_msg=f"{name}/{key}")
    # PE differs from the truth exactly where SciPy's ive underflows, and there it is the first-term bound.
    pe = np.asarray(quantity["outputs"][key], np.float64)
    wrong = ~np.isclose(pe, reference, rtol=RTOL, atol=2e-4)
    underflow = scipy.special.ive(order, kappa) == 0
    assert wrong.any(), f"{name}/{key}: PE is right everywhere; drop the deviation"
    assert not (wrong & ~underflow).any(), f"{name}/{key}: PE is wrong where ive does not underflow"
    bound = order * np.log(kappa / 2) - scipy.special.gammaln(order + 1)
    if key.startswith("logiv"):
        np.testing.assert_allclose(pe[wrong], bound[wrong], rtol=1e-6)
    else:
        np.testing.assert_allclose(pe[wrong], -log_unit_sphere_area(dim), rtol=1e-6)


def check_prior_kl_deviation(name: str, key: str, quantity: dict, got: np.ndarray) -> None:
    replayed = replay_distribution(quantity)
    dim = quantity["params"]["config"]["dim"]
    for kappa, kl in zip(replayed["k"], got.reshape(-1), strict=True):
        log_c, reference = integrated_vmf_kl(dim, float(kappa))
        assert kl >= 0
        np.testing.assert_allclose(kl, reference, rtol=1e-7, atol=1e-9, err_msg=f"{name}/{key} kappa={kappa}")
        np.testing.assert_allclose(log_vmf_normalizer(dim, f64(kappa)).numpy(), log_c, rtol=1e-9)
    # PE's value is its regularizer, which this reproduces from the replayed log C; PE evaluates
    # log C(1e-6) in float32, with errors up to 2.7e-6 relative (the golden file's float32 run).
    kappa = replayed["k"]
    log_c_tiny = log_vmf_normalizer(dim, tf.constant(1e-6, tf.float32)).numpy()
    pe_regularizer = kappa + log_vmf_normalizer(dim, f64(kappa)).numpy() - float(log_c_tiny)
    np.testing.assert_allclose(np.asarray(quantity["outputs"][key]).reshape(-1), pe_regularizer,
                               rtol=1e-5, atol=4e-6 * float(np.abs(log_c_tiny)))


def check_deviation(name: str, key: str, quantity: dict, got: np.ndarray) -> None:
    """Checks a documented deviation against its independent computation."""
    if quantity["kind"] == "vmf_logc":
        check_log_bessel_deviation(name, key, quantity, got)
    elif quantity["kind"] == "distribution" and key == "prior_kld":
        check_prior_kl_deviation(name, key, quantity, got)
    else:
        raise AssertionError(f"{name}/{key} is listed as a deviation but has no independent check")


def deviation_reason(name: str, key: str) -> str | None:
    return DEVIATIONS.get(f"{name}/{key}", DEVIATIONS.get(name))


def check_quantity(name: str, quantity: dict) -> list[str]:
    """Replays one golden quantity and compares every output; returns the documented deviations met.

    Raises AssertionError on a kind or output key the replay does not know, or on any mismatch.
    """
    assert quantity["kind"] in REPLAYS, f"{name}: no replay for kind {quantity['kind']!r}"
    computed = REPLAYS[quantity["kind"]](quantity)
    unknown = set(quantity["outputs"]) - set(computed)
    assert not unknown, f"{name}: the replay does not compute {sorted(unknown)}"
    deviations = []
    for key, golden_value in quantity["outputs"].items():
        want = np.asarray(golden_value, dtype=np.float64)
        got = np.asarray(computed[key], dtype=np.float64)
        assert got.size == want.size, f"{name}/{key}: {got.shape} values, golden has {want.shape}"
        got = got.reshape(want.shape)
        if deviation_reason(name, key) is not None:
            check_deviation(name, key, quantity, got)
            deviations.append(f"{name}/{key}")
            continue
        defined = np.isfinite(want)
        if key in PARTIAL_OUTPUTS:
            assert defined.any(), f"{name}/{key}: no value to compare"
        else:
            assert defined.all(), f"{name}/{key}: the golden value has nulls"
        np.testing.assert_allclose(got[defined], want[defined], rtol=RTOL, atol=ATOL, err_msg=f"{name}/{key}")
    return deviations


GOLDEN = quantities(*REPLAYS)


@pytest.mark.parametrize("name, quantity", GOLDEN, ids=[name for name, _ in GOLDEN])
def test_golden_quantity_replays(name: str, quantity: dict) -> None:
    check_quantity(name, quantity)


def test_every_deviation_names_a_golden_output() -> None:
    outputs = {f"{name}/{key}" for name, q in GOLDEN for key in q["outputs"]}
    assert set(DEVIATIONS) <= outputs | {name for name, _ in GOLDEN}


def test_an_unknown_kind_or_output_fails() -> None:
    name, quantity = GOLDEN[0]
    with pytest.raises(AssertionError, match="no replay"):
        check_quantity(name, {**quantity, "kind": "no_such_kind"})
    with pytest.raises(AssertionError, match="does not compute"):
        check_quantity(name, {**quantity, "outputs": {**quantity["outputs"], "no_such_output": [0.0]}})
