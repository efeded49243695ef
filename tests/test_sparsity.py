"""Sparsity regularizers, weight schedules and statistics (Paria et al. 2020)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from sparse_embed.config import _CHOICES, SparsityConfig
from sparse_embed.errors import ConfigError
from sparse_embed.keras import tf
from sparse_embed.sparsity import (
    REGULARIZERS,
    WEIGHT_SCHEDULES,
    SparsityAccumulator,
    flops_regularizer,
    l1_regularizer,
    sparsity_stats,
    sparsity_stats_np,
    sparsity_weight,
)

pytestmark = pytest.mark.unit

D = 8


@pytest.fixture(params=["eager", "function"])
def run(request: pytest.FixtureRequest) -> Callable[[Callable], Callable]:
    """Wraps a TF computation to run eagerly or traced inside tf.function."""
    return (lambda fn: fn) if request.param == "eager" else tf.function


def _np_stats(e: np.ndarray, zero_threshold: float) -> dict[str, float]:
    """Brute force: count every non-zero entry one by one."""
    n, d = e.shape
    p = [sum(abs(e[i, j]) > zero_threshold for i in range(n)) / n for j in range(d)]
    nnz = sum(p)
    flops = sum(pj * pj for pj in p)
    return {"nnz": nnz, "flops": flops, "r_sub": d * flops / nnz**2 if nnz else 0.0}


def _both_stats(e: np.ndarray, zero_threshold: float, run: Callable) -> list[dict[str, float]]:
    tf_stats = run(lambda x: sparsity_stats(x, zero_threshold))(tf.constant(e))
    tf_floats = {k: float(v.numpy()) for k, v in tf_stats.items()}
    return [tf_floats, sparsity_stats_np(e, zero_threshold)]


def _random_sparse(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Unit rows with dimension-dependent sparsity (dimension j zero with probability j / d)."""
    e = rng.normal(size=(n, d)) * (rng.random((n, d)) > np.arange(d) / d)
    e[:, 0] += 1.0  # no all-zero row, so every row can be normalised
    return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)


# --- regularizers -------------------------------------------------------------------


def test_registries_cover_the_config_choices() -> None:
    assert REGULARIZERS.names() == sorted(_CHOICES["sparsity.type"])
    assert WEIGHT_SCHEDULES.names() == sorted(_CHOICES["sparsity.schedule"])


def test_regularizers_on_one_hot_embeddings_spread_evenly(run: Callable) -> None:
    """B = 3d one-hot rows, row i on axis i mod d (unit norm already).

    Each dimension's mean |e_ij| is 1/d, so FLOPs = d (1/d)^2 = 1/d; every row
    has L1 norm 1, so L1 = 1.
    """
    e = tf.constant(np.eye(D, dtype=np.float32)[np.arange(3 * D) % D])
    np.testing.assert_allclose(run(flops_regularizer)(e).numpy(), 1 / D, rtol=1e-6)
    np.testing.assert_allclose(run(l1_regularizer)(e).numpy(), 1.0, rtol=1e-6)


def test_regularizers_on_dense_embeddings(run: Callable) -> None:
    """Every row (1, ..., 1) / sqrt(d): mean |e_ij| = 1/sqrt(d) in every dimension.

    FLOPs = d (1/sqrt(d))^2 = 1; L1 = d / sqrt(d) = sqrt(d).
    """
    e = tf.fill([5, D], 1 / math.sqrt(D))
    np.testing.assert_allclose(run(flops_regularizer)(e).numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(run(l1_regularizer)(e).numpy(), math.sqrt(D), rtol=1e-6)


def test_regularizers_match_numpy(run: Callable) -> None:
    """sum_j (mean_i |e_ij|)^2 and mean_i sum_j |e_ij| on random signed embeddings."""
    e = _random_sparse(np.random.default_rng(0), 16, D) * np.where(np.arange(D) % 2, 1, -1)
    a = np.abs(e.astype(np.float64))
    np.testing.assert_allclose(run(flops_regularizer)(tf.constant(e)).numpy(),
                               np.sum(a.mean(axis=0) ** 2), rtol=1e-6)
    np.testing.assert_allclose(run(l1_regularizer)(tf.constant(e)).numpy(),
                               a.sum(axis=1).mean(), rtol=1e-6)
    assert float(run(REGULARIZERS.get("none"))(tf.constant(e))) == 0.0


@pytest.mark.parametrize("name", REGULARIZERS.names())
def test_regularizer_gradients_are_finite(name: str, run: Callable) -> None:
    """Finite everywhere, including exact zeros (where |x| has no derivative)."""
    e = _random_sparse(np.random.default_rng(1), 6, D)
    e[0] = 0.0

    @run
    def value_and_grad(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = REGULARIZERS.get(name)(x)
        return value, tape.gradient(value, x, unconnected_gradients="zero")

    value, grad = value_and_grad(tf.constant(e))
    assert value.dtype == tf.float32 and value.shape == ()
    assert np.all(np.isfinite(grad.numpy()))


def test_flops_gradient_matches_closed_form(run: Callable) -> None:
    """d/de_ij sum_k (mean_i |e_ik|)^2 = 2 a_j sign(e_ij) / B with a_j = mean_i |e_ij|."""
    e = _random_sparse(np.random.default_rng(2), 6, D) * np.where(np.arange(D) % 3, 1, -1)

    @run
    def grad(x: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = flops_regularizer(x)
        return tape.gradient(value, x)

    a = np.abs(e).mean(axis=0)
    np.testing.assert_allclose(grad(tf.constant(e)).numpy(), 2 * a * np.sign(e) / len(e),
                               rtol=1e-5, atol=1e-7)


def test_regularizers_return_float32_for_float16_input() -> None:
    e = tf.fill([4, D], tf.constant(0.25, tf.float16))
    for name in REGULARIZERS.names():
        assert REGULARIZERS.get(name)(e).dtype == tf.float32


# --- weight schedules ---------------------------------------------------------------


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [2.0, 2.0, 2.0, 2.0, 2.0]),
    # w * min(1, (t / 100)^2) at t = 0, 10, 50, 100, 400.
    ("quadratic_warmup", [0.0, 0.02, 0.5, 2.0, 2.0]),
])
def test_schedules_follow_the_step_variable(schedule: str, expected: list[float],
                                            run: Callable) -> None:
    """The step is a tf.Variable read inside tf.function: one trace, every value."""
    config = SparsityConfig(type="flops", weight=2.0, schedule=schedule, warmup_steps=100)
    step = tf.Variable(0, dtype=tf.int64)
    weight = run(lambda: sparsity_weight(config, step))
    values = []
    for t in (0, 10, 50, 100, 400):
        step.assign(t)
        values.append(weight())
    assert all(v.dtype == tf.float32 and v.shape == () for v in values)
    np.testing.assert_allclose([v.numpy() for v in values], expected, rtol=1e-6)


def test_quadratic_warmup_without_warmup_is_constant() -> None:
    schedule = WEIGHT_SCHEDULES.get("quadratic_warmup")
    assert float(schedule(0, 3.0, 0)) == 3.0
    assert float(schedule(tf.constant(7, tf.int32), 3.0, 0)) == 3.0


def test_sparsity_weight_rejects_bad_configs() -> None:
    with pytest.raises(ConfigError, match="sparsity.weight must be a finite number >= 0, got -1"):
        sparsity_weight(SparsityConfig(weight=-1.0), 0)
    with pytest.raises(ConfigError, match="sparsity.warmup_steps must be >= 0, got -5"):
        sparsity_weight(SparsityConfig(weight=1.0, warmup_steps=-5), 0)
    with pytest.raises(ConfigError, match="unknown sparsity weight schedule 'linear'"):
        sparsity_weight(SparsityConfig(weight=1.0, schedule="linear"), 0)
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 0, got -1"):
        WEIGHT_SCHEDULES.get("constant")(0, 1.0, -1)


# --- statistics ---------------------------------------------------------------------


def test_stats_one_hot_spread_evenly(run: Callable) -> None:
    """B = 3d one-hot rows, row i on axis i mod d: p_j = 1/d for every j.

    nnz = d (1/d) = 1; FLOPs = d (1/d)^2 = 1/d; R_sub = d (1/d) / 1^2 = 1 (optimal).
    """
    e = np.eye(D, dtype=np.float32)[np.arange(3 * D) % D]
    for stats in _both_stats(e, 0.0, run):
        np.testing.assert_allclose([stats["nnz"], stats["flops"], stats["r_sub"]],
                                   [1.0, 1 / D, 1.0], rtol=1e-6)


def test_stats_all_dense(run: Callable) -> None:
    """No zero anywhere: p_j = 1, nnz = d, FLOPs = d, R_sub = d * d / d^2 = 1."""
    e = np.full((5, D), 1 / math.sqrt(D), np.float32)
    for stats in _both_stats(e, 1e-6, run):
        np.testing.assert_allclose([stats["nnz"], stats["flops"], stats["r_sub"]],
                                   [D, D, 1.0], rtol=1e-6)


def test_stats_skewed(run: Callable) -> None:
    """Every row non-zero only on axis 0: p = (1, 0, ..., 0).

    nnz = 1 and FLOPs = 1 (every pair collides on axis 0, d times the even
    spread's 1/d), so R_sub = d * 1 / 1^2 = d.
    """
    e = np.zeros((4, D), np.float32)
    e[:, 0] = 1.0
    for stats in _both_stats(e, 0.0, run):
        np.testing.assert_allclose([stats["nnz"], stats["flops"], stats["r_sub"]],
                                   [1.0, 1.0, D], rtol=1e-6)


def test_stats_all_zero_define_r_sub_as_zero(run: Callable) -> None:
    for stats in _both_stats(np.zeros((3, D), np.float32), 0.0, run):
        assert stats == {"nnz": 0.0, "flops": 0.0, "r_sub": 0.0}


def test_stats_threshold_is_exclusive(run: Callable) -> None:
    """|e| at or below the threshold is zero: of 0.1, 0.2, 0.3 only 0.3 exceeds 0.2."""
    e = np.array([[0.1, -0.2, 0.3]], np.float32)
    for stats in _both_stats(e, 0.2, run):
        np.testing.assert_allclose(stats["nnz"], 1.0)


def test_stats_match_brute_force(run: Callable) -> None:
    e = _random_sparse(np.random.default_rng(3), 40, D)
    e[np.abs(e) < 0.05] = 0.0
    expected = _np_stats(e, 0.01)
    for stats in _both_stats(e, 0.01, run):
        for key, value in expected.items():
            np.testing.assert_allclose(stats[key], value, rtol=1e-6, err_msg=key)
    assert _np_stats(e, 0.01)["r_sub"] > 1.0


def test_accumulator_over_chunks_equals_one_pass() -> None:
    e = _random_sparse(np.random.default_rng(4), 50, D)
    accumulator = SparsityAccumulator(zero_threshold=0.0)
    for start in range(0, 50, 16):
        accumulator.update(e[start:start + 16])
    accumulator.update(e[:0])
    assert accumulator.count == 50
    assert accumulator.result() == sparsity_stats_np(e, 0.0)


def test_accumulator_errors() -> None:
    accumulator = SparsityAccumulator(zero_threshold=0.0)
    with pytest.raises(ValueError, match="no embeddings were added"):
        accumulator.result()
    with pytest.raises(ValueError, match=r"must be a 2-D \[n, d\] array, got shape \(8,\)"):
        accumulator.update(np.zeros(8))
    accumulator.update(np.zeros((2, 8)))
    with pytest.raises(ValueError, match="chunk has d=4, earlier chunks d=8"):
        accumulator.update(np.zeros((2, 4)))
