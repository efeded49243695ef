"""Classification heads: registry contract, closed forms, NumPy re-implementations."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import tensorflow as tf

from sparse_embed.config import HeadConfig
from sparse_embed.errors import ConfigError
from sparse_embed.heads import HEADS, ArcFaceHead, SoftmaxHead, build_head
from sparse_embed.keras import keras

C, D = 4, 4


@pytest.fixture(params=["eager", "function"])
def run(request: pytest.FixtureRequest) -> Callable[[Callable], Callable]:
    """Wraps a TF computation to run eagerly or traced inside tf.function."""
    return (lambda fn: fn) if request.param == "eager" else tf.function


def _np_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """mean_i logsumexp(z_i) - z_iy, stable."""
    top = logits.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float(np.mean(lse - logits[np.arange(len(labels)), labels]))


def _arcface(num_classes: int = C, scale: float = 4.0, margin: float = 0.5,
             kernel: np.ndarray | None = None) -> ArcFaceHead:
    head = ArcFaceHead(num_classes, scale=scale, margin=margin)
    head.build((None, D if kernel is None else kernel.shape[0]))
    if kernel is not None:
        head.kernel.assign(kernel)
    return head


# --- every registered head ---------------------------------------------------------


@pytest.mark.parametrize("name", HEADS.names())
def test_registered_head_contract(name: str, run: Callable) -> None:
    head = build_head(5, 8, HeadConfig(name=name, scale=16.0, margin=0.3))
    head.build((None, 8))
    embeddings = tf.random.stateless_normal([6, 8], seed=(1, 2))
    labels = tf.constant([0, 1, 2, 3, 4, 0], tf.int32)

    @run
    def step(e: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, list[tf.Tensor]]:
        with tf.GradientTape() as tape:
            loss = head(e, y, training=True)
        return loss, head.logits(e), tape.gradient(loss, head.trainable_variables)

    loss, logits, grads = step(embeddings, labels)
    assert loss.shape == () and loss.dtype == tf.float32 and np.isfinite(loss.numpy())
    assert logits.shape == (6, 5) and logits.dtype == tf.float32
    assert head.trainable_variables and len(grads) == len(head.trainable_variables)
    for var, grad in zip(head.trainable_variables, grads, strict=True):
        assert grad is not None, var.name
        assert np.all(np.isfinite(grad.numpy())) and np.any(grad.numpy() != 0), var.name
    loss64 = step(embeddings, tf.cast(labels, tf.int64))[0]
    np.testing.assert_allclose(loss64.numpy(), loss.numpy(), rtol=1e-6)


@pytest.mark.parametrize("name", HEADS.names())
def test_registered_head_config_round_trip(name: str) -> None:
    head = build_head(5, 8, HeadConfig(name=name, scale=16.0, margin=0.3))
    config = head.get_config()
    assert type(head).from_config(config).get_config() == config
    restored = keras.layers.deserialize(keras.layers.serialize(head))
    assert type(restored) is type(head) and restored.get_config() == config


@pytest.mark.parametrize("name", HEADS.names())
def test_registered_head_under_mixed_precision(name: str) -> None:
    """float16 compute: the loss and logits stay float32 and close to the float32 head."""
    embeddings = tf.random.stateless_normal([6, 8], seed=(3, 4))
    labels = tf.constant([0, 1, 2, 3, 4, 0])
    config = HeadConfig(name=name, scale=16.0, margin=0.3)
    reference = build_head(5, 8, config)
    reference.build((None, 8))
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        head = build_head(5, 8, config)
        head.build((None, 8))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    head.set_weights(reference.get_weights())
    loss = head(embeddings, labels)
    assert loss.dtype == tf.float32 and head.logits(embeddings).dtype == tf.float32
    np.testing.assert_allclose(loss.numpy(), reference(embeddings, labels).numpy(), rtol=2e-2)


def test_build_head_errors() -> None:
    with pytest.raises(ConfigError, match="unknown head 'arcfcae'.*did you mean 'arcface'"):
        build_head(10, 8, HeadConfig(name="arcfcae"))
    with pytest.raises(ConfigError,
                       match=r"head 'arcface': margin must be in \[0, pi/2\), got 2.0"):
        build_head(10, 8, HeadConfig(name="arcface", margin=2.0))


@pytest.mark.parametrize("kwargs, message", [
    ({"num_classes": 1}, "num_classes must be an integer >= 2, got 1"),
    ({"num_classes": 4.0}, "num_classes must be an integer >= 2, got 4.0"),
    ({"num_classes": 4, "scale": 0.0}, "scale must be a finite number > 0, got 0.0"),
    ({"num_classes": 4, "scale": math.inf}, "scale must be a finite number > 0, got inf"),
    ({"num_classes": 4, "margin": -0.1}, r"margin must be in \[0, pi/2\), got -0.1"),
    ({"num_classes": 4, "margin": math.pi / 2}, r"margin must be in \[0, pi/2\), got 1.57"),
    ({"num_classes": 4, "embedding_size": 0}, "embedding_size must be a positive integer"),
])
def test_arcface_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ArcFaceHead(**kwargs)


def test_num_classes_accepts_numpy_integers() -> None:
    assert SoftmaxHead(np.int64(7)).get_config()["num_classes"] == 7


def test_build_checks_the_embedding_size() -> None:
    with pytest.raises(ValueError, match="expects embeddings of size 8, got input shape"):
        SoftmaxHead(4, embedding_size=8).build((None, 6))
    head = ArcFaceHead(4, embedding_size=8)
    head.build((None, None))
    assert head.kernel.shape == (8, 4)
    with pytest.raises(ValueError, match="needs a known embedding size"):
        ArcFaceHead(4).build((None, None))


# --- softmax -----------------------------------------------------------------------


def _softmax(kernel: np.ndarray, bias: np.ndarray) -> SoftmaxHead:
    head = SoftmaxHead(kernel.shape[1])
    head.build((None, kernel.shape[0]))
    head.kernel.assign(kernel)
    head.bias.assign(bias)
    return head


def test_softmax_perfect_batch(run: Callable) -> None:
    """Each class on its own axis: W = I, b = 0, e_i = a * u_{y_i}.

    z_i = a on the target class and 0 on the C - 1 others, so
    loss = -log(e^a / (e^a + C - 1)) = log(1 + (C - 1) e^{-a}).
    """
    a = 3.0
    head = _softmax(np.eye(D, C, dtype=np.float32), np.zeros(C, np.float32))
    labels = np.array([0, 1, 2, 3, 1])
    embeddings = a * np.eye(D, dtype=np.float32)[labels]
    loss = run(head)(tf.constant(embeddings), tf.constant(labels))
    np.testing.assert_allclose(loss.numpy(), math.log(1 + (C - 1) * math.exp(-a)), rtol=1e-6)
    logits = run(head.logits)(tf.constant(embeddings))
    np.testing.assert_array_equal(np.argmax(logits.numpy(), axis=1), labels)


def test_softmax_worst_batch(run: Callable) -> None:
    """All embeddings identical (zero): z_i = b for every i.

    With b = 0 every class is equally likely, loss = log C; with a bias b,
    loss = mean_i (log sum_j e^{b_j} - b_{y_i}).
    """
    embeddings = tf.zeros([3, D])
    labels = tf.constant([0, 2, 3])
    head = _softmax(np.ones((D, C), np.float32), np.zeros(C, np.float32))
    np.testing.assert_allclose(run(head)(embeddings, labels).numpy(), math.log(C), rtol=1e-6)
    bias = np.array([0.0, 1.0, -1.0, 2.0], np.float32)
    head.bias.assign(bias)
    lse = math.log(np.exp(bias.astype(np.float64)).sum())
    expected = np.mean([lse - bias[y] for y in (0, 2, 3)])
    np.testing.assert_allclose(run(head)(embeddings, labels).numpy(), expected, rtol=1e-6)


def test_softmax_matches_numpy(run: Callable) -> None:
    """loss = mean_i CE(softmax(e_i W + b), y_i) on random inputs."""
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(8, 6)).astype(np.float32)
    bias = rng.normal(size=6).astype(np.float32)
    embeddings = rng.normal(size=(10, 8)).astype(np.float32)
    labels = rng.integers(0, 6, size=10)
    head = _softmax(kernel, bias)
    logits = embeddings.astype(np.float64) @ kernel + bias
    np.testing.assert_allclose(run(head)(tf.constant(embeddings), tf.constant(labels)).numpy(),
                               _np_cross_entropy(logits, labels), rtol=1e-5)
    np.testing.assert_allclose(run(head.logits)(tf.constant(embeddings)).numpy(), logits,
                               rtol=1e-5, atol=1e-5)


# --- arcface -----------------------------------------------------------------------


def test_arcface_perfect_batch(run: Callable) -> None:
    """Each class on its own axis: w_j = u_j, e_i = 3 u_{y_i} (the scale is normalised away).

    cos(theta_iy) = 1, so theta = 0 and the target logit is s cos(m); the
    others are s cos(pi/2) = 0: loss = log(1 + (C - 1) e^{-s cos m}).
    """
    s, m = 4.0, 0.5
    head = _arcface(scale=s, margin=m, kernel=np.eye(D, C, dtype=np.float32))
    labels = np.array([0, 1, 2, 3])
    embeddings = tf.constant(3.0 * np.eye(D, dtype=np.float32)[labels])
    expected = math.log(1 + (C - 1) * math.exp(-s * math.cos(m)))
    np.testing.assert_allclose(run(head)(embeddings, tf.constant(labels)).numpy(), expected,
                               rtol=1e-5)
    # logits() carries no margin: s cos(theta) = s on the target, 0 elsewhere.
    np.testing.assert_allclose(run(head.logits)(embeddings).numpy(), s * np.eye(C)[labels],
                               atol=1e-6)


def test_arcface_known_angle(run: Callable) -> None:
    """e at angle theta = pi/3 from w_0 in the plane of w_0, w_1; label 0.

    cos(theta_0) = 1/2 and theta_0 + m < pi, so the target logit is
    s cos(pi/3 + m); cos(theta_1) = sin(pi/3); cos(theta_2) = cos(theta_3) = 0:
    loss = log(e^{s cos(pi/3 + m)} + e^{s sin(pi/3)} + 2) - s cos(pi/3 + m).
    """
    s, m, theta = 4.0, 0.5, math.pi / 3
    head = _arcface(scale=s, margin=m, kernel=np.eye(D, C, dtype=np.float32))
    embeddings = tf.constant([[math.cos(theta), math.sin(theta), 0.0, 0.0]])
    target = s * math.cos(theta + m)
    expected = math.log(math.exp(target) + math.exp(s * math.sin(theta)) + 2) - target
    np.testing.assert_allclose(run(head)(embeddings, tf.constant([0])).numpy(), expected,
                               rtol=1e-5)


def test_arcface_worst_batch(run: Callable) -> None:
    """Each embedding opposite its class centre: e_i = -u_{y_i}.

    cos(theta_y) = -1 <= cos(pi - m), so the reference's linear branch applies:
    target logit s (cos(theta) - m sin(pi - m)) = -s (1 + m sin m); the others
    are 0: loss = log(e^{-s(1 + m sin m)} + C - 1) + s (1 + m sin m).
    """
    s, m = 4.0, 0.5
    head = _arcface(scale=s, margin=m, kernel=np.eye(D, C, dtype=np.float32))
    labels = np.array([0, 1, 2, 3])
    embeddings = tf.constant(-np.eye(D, dtype=np.float32)[labels])
    penalty = s * (1 + m * math.sin(m))
    expected = math.log(math.exp(-penalty) + C - 1) + penalty
    np.testing.assert_allclose(run(head)(embeddings, tf.constant(labels)).numpy(), expected,
                               rtol=1e-5)


def test_arcface_without_margin_is_normface() -> None:
    """m = 0: z = s cos(theta) for every class, the same as s * logits / s."""
    rng = np.random.default_rng(1)
    head = _arcface(num_classes=5, scale=8.0, margin=0.0,
                    kernel=rng.normal(size=(D, 5)).astype(np.float32))
    embeddings = tf.constant(rng.normal(size=(7, D)).astype(np.float32))
    labels = rng.integers(0, 5, size=7)
    expected = _np_cross_entropy(head.logits(embeddings).numpy().astype(np.float64), labels)
    np.testing.assert_allclose(head(embeddings, tf.constant(labels)).numpy(), expected, rtol=1e-5)


def _np_arcface_loss(embeddings: np.ndarray, kernel: np.ndarray, labels: np.ndarray,
                     s: float, m: float) -> float:
    """Deng et al. 2019, Eq. 3, with InsightFace's cos(theta) - m sin(pi - m) for theta + m > pi."""
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    w = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
    cos = np.clip(e @ w, -1.0, 1.0)
    rows = np.arange(len(labels))
    theta = np.arccos(cos[rows, labels])
    target = np.where(theta + m <= math.pi, np.cos(theta + m),
                      cos[rows, labels] - m * math.sin(math.pi - m))
    logits = cos.copy()
    logits[rows, labels] = target
    return _np_cross_entropy(s * logits, labels)


@pytest.mark.parametrize("margin", [0.2, 0.5, 1.2])
def test_arcface_matches_numpy(margin: float, run: Callable) -> None:
    """Random embeddings and centres; at m = 1.2 many targets take the linear branch."""
    rng = np.random.default_rng(2)
    kernel = rng.normal(size=(6, 9)).astype(np.float32)
    embeddings = rng.normal(size=(32, 6)).astype(np.float32)
    labels = rng.integers(0, 9, size=32)
    head = _arcface(num_classes=9, scale=16.0, margin=margin, kernel=kernel)
    expected = _np_arcface_loss(embeddings.astype(np.float64), kernel.astype(np.float64), labels,
                                16.0, margin)
    loss = run(head)(tf.constant(embeddings), tf.constant(labels, tf.int64))
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-4)


def test_arcface_gradient_finite_at_cos_plus_minus_one(run: Callable) -> None:
    """At |cos(theta)| = 1, d/dc sqrt(1 - c^2) is infinite; the clipped sine keeps it finite."""
    head = _arcface(kernel=np.eye(D, C, dtype=np.float32))
    labels = tf.constant([0, 1, 2, 3])
    embeddings = tf.constant(np.concatenate([np.eye(2, D), -np.eye(4, D)[2:]]).astype(np.float32))

    @run
    def grads(e: tf.Tensor) -> list[tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch(e)
            loss = head(e, labels)
        return tape.gradient(loss, [e, head.kernel])

    for grad in grads(embeddings):
        assert np.all(np.isfinite(grad.numpy()))
