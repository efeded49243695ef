"""Classification heads: registry contract, closed forms, NumPy re-implementations."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sparse_embed.config import HeadConfig, head_config
from sparse_embed.errors import ConfigError
from sparse_embed.heads import HEADS, build_head
from sparse_embed.heads.margin import (
    ArcFaceHead,
    ClassifierHead,
    CombinedMarginHead,
    CosFaceHead,
    SoftmaxHead,
    SphereFaceHead,
    focal_loss,
)
from sparse_embed.heads.params import ArcFace, SphereFace
from sparse_embed.keras import keras, tf

pytestmark = pytest.mark.unit

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

# Arguments a head needs beyond the shared test config (SphereFace's margin is an integer).
_OVERRIDES: dict[str, dict] = {"sphereface": {"margin": 4}}


def _config(name: str, **kwargs) -> HeadConfig:
    """Scale 16 and margin 0.3, or the parameters in `kwargs`, for the heads that take them;
    the other `kwargs` are shared head fields."""
    takes = {f.name for f in dataclasses.fields(HEADS.get(name))}
    params = {"scale": 16.0, "margin": 0.3, **_OVERRIDES.get(name, {}), **kwargs}
    shared = {k: params.pop(k) for k in list(params) if k in HeadConfig.__dataclass_fields__}
    return head_config(name, {k: v for k, v in params.items() if k in takes}, **shared)


# Heads with class weights and full [B, C] logits; pair and proxy losses have neither.
CLASSIFIER_HEADS = [name for name in HEADS.names()
                    if isinstance(build_head(5, 8, _config(name)), ClassifierHead)]
# Every head of this file's families: the softmax and the normalised margin heads.
MARGIN_HEADS = ["softmax", "arcface", "cosface", "sphereface", "combined"]


def test_margin_heads_are_registered_classifiers() -> None:
    assert set(MARGIN_HEADS) <= set(CLASSIFIER_HEADS)


# The probabilistic heads sample, and some draw from a vMF with a rejection loop: tracing their
# loss and its gradient inside tf.function takes 5 to 15 s each, an integration test's cost.
PROBABILISTIC_HEADS = [n for n in HEADS.names() if HEADS.get(n).builder.startswith("probabilistic.")]
_CONTRACT_CASES = [
    pytest.param(mode, name, marks=pytest.mark.integration)
    if mode == "function" and name in PROBABILISTIC_HEADS else (mode, name)
    for mode in ("eager", "function") for name in HEADS.names()
]


@pytest.mark.parametrize("mode, name", _CONTRACT_CASES)
def test_registered_head_contract(mode: str, name: str) -> None:
    """What the trainer relies on: loss_and_accuracy gives a finite scalar loss and accuracy
    with finite gradients, for int32 and int64 labels (every class twice for a head that needs
    class-balanced batches), run eagerly and traced inside tf.function."""
    run = (lambda fn: fn) if mode == "eager" else tf.function
    head = build_head(5, 8, _config(name))
    head.build((None, 8))
    embeddings = tf.random.stateless_normal([6, 8], seed=(1, 2))
    balanced = HEADS.get(name).balanced
    labels = tf.constant([0, 0, 1, 1, 2, 2] if balanced else [0, 1, 2, 3, 4, 0], tf.int32)

    @run
    def step(e: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, list[tf.Tensor]]:
        with tf.GradientTape() as tape:
            tape.watch(e)
            loss, accuracy = head.loss_and_accuracy(e, y, training=True)
        return loss, accuracy, tape.gradient(loss, [e, *head.trainable_variables])

    loss, accuracy, grads = step(embeddings, labels)
    assert loss.shape == () and loss.dtype == tf.float32 and np.isfinite(loss.numpy())
    assert accuracy.shape == () and 0.0 <= accuracy.numpy() <= 1.0
    assert len(grads) == 1 + len(head.trainable_variables)
    for grad in grads:
        assert grad is not None and np.all(np.isfinite(tf.convert_to_tensor(grad).numpy()))
    # Evaluation calls: the same loss for both label dtypes.
    loss32 = head.loss_and_accuracy(embeddings, labels, training=False)[0]
    loss64 = head.loss_and_accuracy(embeddings, tf.cast(labels, tf.int64), training=False)[0]
    np.testing.assert_allclose(loss64.numpy(), loss32.numpy(), rtol=1e-6)


@pytest.mark.parametrize("name", CLASSIFIER_HEADS)
def test_classifier_head_logits_and_gradients(name: str, run: Callable) -> None:
    head = build_head(5, 8, _config(name))
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


@pytest.mark.parametrize("name", HEADS.names())
def test_registered_head_config_round_trip(name: str) -> None:
    head = build_head(5, 8, _config(name))
    config = head.get_config()
    assert type(head).from_config(config).get_config() == config
    restored = keras.layers.deserialize(keras.layers.serialize(head))
    assert type(restored) is type(head) and restored.get_config() == config


@pytest.mark.parametrize("name", CLASSIFIER_HEADS)
def test_registered_head_under_mixed_precision(name: str) -> None:
    """float16 compute: the loss and logits stay float32 and close to the float32 head."""
    embeddings = tf.random.stateless_normal([6, 8], seed=(3, 4))
    labels = tf.constant([0, 1, 2, 3, 4, 0])
    config = _config(name)
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


@pytest.mark.integration
@pytest.mark.parametrize("name", MARGIN_HEADS)
@pytest.mark.parametrize("loss", ["softmax_ce", "focal"])
def test_training_steps_lower_the_loss(name: str, loss: str) -> None:
    """Tiny synthetic data: 4 classes of noisy points around random means, a linear backbone;
    30 Adam steps on the head and backbone lower the loss well below its start."""
    rng = np.random.default_rng(7)
    means = rng.normal(size=(4, 8)) * 2.0
    labels = np.repeat(np.arange(4), 8)
    inputs = tf.constant(means[labels] + 0.3 * rng.normal(size=(32, 8)), tf.float32)
    labels = tf.constant(labels, tf.int32)
    # A constant lambda: the annealing alone moves SphereFace's loss.
    extra = {"lambda_base": 5.0, "lambda_min": 5.0} if name == "sphereface" else {}
    head = build_head(4, 8, _config(name, loss=loss, **extra))
    backbone = keras.layers.Dense(8, kernel_initializer=keras.initializers.Identity())
    backbone.build((None, 8))
    head.build((None, 8))
    variables = backbone.trainable_variables + head.trainable_variables
    optimizer = keras.optimizers.Adam(0.05)

    @tf.function
    def train_step() -> tf.Tensor:
        with tf.GradientTape() as tape:
            value, _ = head.loss_and_accuracy(backbone(inputs), labels, training=True)
        optimizer.apply_gradients(zip(tape.gradient(value, variables), variables, strict=True))
        return value

    before = head.loss_and_accuracy(backbone(inputs), labels, training=False)[0].numpy()
    for _ in range(30):
        train_step()
    after, accuracy = head.loss_and_accuracy(backbone(inputs), labels, training=False)
    assert np.isfinite(after.numpy()) and after.numpy() < 0.5 * before
    assert accuracy.numpy() == 1.0


def test_build_head_errors() -> None:
    with pytest.raises(ConfigError, match="unknown head 'arcfcae'.*did you mean 'arcface'"):
        build_head(10, 8, HeadConfig(name="arcfcae"))
    with pytest.raises(ConfigError,
                       match=r"head 'arcface': margin must be in \[0, pi/2\), got 2.0"):
        build_head(10, 8, HeadConfig(name="arcface", params=ArcFace(margin=2.0)))
    # From a config, the same value is one line before TensorFlow builds anything.
    with pytest.raises(ConfigError, match=r"'head.params.margin' must be in \[0, pi/2\); got 2.0"):
        head_config("arcface", {"margin": 2.0})


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


def test_combined_margin_reaches_the_linear_branch_like_insightface(run: Callable) -> None:
    """m1 = 1: the combined target is InsightFace's cos(theta) - m2 sin(pi - m2) - m3 past pi - m2."""
    head = CombinedMarginHead(C, scale=4.0, m1=1.0, m2=0.5, m3=0.1)
    head.build((None, D))
    cos = tf.constant([math.cos(math.pi - 0.4), -1.0, 0.5])
    expected = [math.cos(math.pi - 0.4) - 0.5 * math.sin(math.pi - 0.5) - 0.1,
                -1.0 - 0.5 * math.sin(math.pi - 0.5) - 0.1, math.cos(math.pi / 3 + 0.5) - 0.1]
    np.testing.assert_allclose(run(head.target_logit)(cos).numpy(), expected, rtol=1e-6)


# --- cosface -----------------------------------------------------------------------


def _head(cls: type, kernel: np.ndarray, **kwargs) -> ClassifierHead:
    head = cls(kernel.shape[1] // kwargs.get("sub_centers", 1), **kwargs)
    head.build((None, kernel.shape[0]))
    head.kernel.assign(kernel)
    return head


def _np_cosine(embeddings: np.ndarray, kernel: np.ndarray, sub_centers: int = 1) -> np.ndarray:
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    w = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
    cos = np.clip(e @ w, -1.0, 1.0)
    return cos.reshape(len(e), -1, sub_centers).max(axis=2)


def _np_margin_loss(cos: np.ndarray, labels: np.ndarray, scale: np.ndarray | float,
                    target: Callable[[np.ndarray], np.ndarray]) -> float:
    rows = np.arange(len(labels))
    logits = cos.copy()
    logits[rows, labels] = target(cos[rows, labels])
    return _np_cross_entropy(scale * logits, labels)


def test_cosface_perfect_and_worst_batches(run: Callable) -> None:
    """w_j = u_j. Perfect: e_i = 2 u_{y_i}, cos(theta_y) = 1, target s(1 - m), others 0:
    loss = log(1 + (C - 1) e^{-s(1 - m)}). Worst: e_i = -u_{y_i}, target s(-1 - m):
    loss = log(e^{-s(1 + m)} + C - 1) + s(1 + m)."""
    s, m = 4.0, 0.35
    head = _head(CosFaceHead, np.eye(D, C, dtype=np.float32), scale=s, margin=m)
    labels = np.array([0, 1, 2, 3])
    perfect = tf.constant(2.0 * np.eye(D, dtype=np.float32)[labels])
    np.testing.assert_allclose(run(head)(perfect, tf.constant(labels)).numpy(),
                               math.log(1 + (C - 1) * math.exp(-s * (1 - m))), rtol=1e-5)
    worst = tf.constant(-np.eye(D, dtype=np.float32)[labels])
    np.testing.assert_allclose(run(head)(worst, tf.constant(labels)).numpy(),
                               math.log(math.exp(-s * (1 + m)) + C - 1) + s * (1 + m), rtol=1e-5)


@pytest.mark.parametrize("margin", [0.0, 0.35, 0.9])
def test_cosface_matches_numpy(margin: float, run: Callable) -> None:
    """Wang et al. 2018, Eq. 4: target s (cos(theta_y) - m), others s cos(theta_j)."""
    rng = np.random.default_rng(3)
    kernel = rng.normal(size=(6, 9)).astype(np.float32)
    embeddings = rng.normal(size=(32, 6)).astype(np.float32)
    labels = rng.integers(0, 9, size=32)
    head = _head(CosFaceHead, kernel, scale=16.0, margin=margin)
    cos = _np_cosine(embeddings.astype(np.float64), kernel.astype(np.float64))
    expected = _np_margin_loss(cos, labels, 16.0, lambda c: c - margin)
    loss = run(head)(tf.constant(embeddings), tf.constant(labels))
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)


# --- combined ----------------------------------------------------------------------


def _np_combined_target(m1: float, m2: float, m3: float) -> Callable[[np.ndarray], np.ndarray]:
    """cos(m1 theta + m2) - m3 where m1 theta + m2 <= pi, else
    cos(theta) - (pi - theta_t) sin(theta_t) - m3 with theta_t = (pi - m2) / m1."""
    threshold = (math.pi - m2) / m1

    def target(cos: np.ndarray) -> np.ndarray:
        theta = np.arccos(cos)
        linear = cos - (math.pi - threshold) * math.sin(threshold)
        return np.where(m1 * theta + m2 <= math.pi, np.cos(m1 * theta + m2), linear) - m3

    return target


@pytest.mark.parametrize("m1, m2, m3", [
    (1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (1.0, 0.3, 0.2), (1.0, 1.3, 0.0), (2.0, 0.0, 0.0),
    (1.35, 0.25, 0.1),
])
def test_combined_matches_numpy(m1: float, m2: float, m3: float, run: Callable) -> None:
    """InsightFace's combined margin on random inputs; m2 = 1.3 and m1 = 2 put many targets
    past m1 theta + m2 = pi."""
    rng = np.random.default_rng(4)
    kernel = rng.normal(size=(6, 9)).astype(np.float32)
    embeddings = rng.normal(size=(32, 6)).astype(np.float32)
    labels = rng.integers(0, 9, size=32)
    head = _head(CombinedMarginHead, kernel, scale=16.0, m1=m1, m2=m2, m3=m3)
    cos = _np_cosine(embeddings.astype(np.float64), kernel.astype(np.float64))
    theta = np.arccos(cos[np.arange(32), labels])
    if m1 * 1.0 != 1.0 or m2 > 1.0:
        assert np.any(m1 * theta + m2 > math.pi)
    expected = _np_margin_loss(cos, labels, 16.0, _np_combined_target(m1, m2, m3))
    loss = run(head)(tf.constant(embeddings), tf.constant(labels))
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)


def test_combined_perfect_and_worst_batches(run: Callable) -> None:
    """w_j = u_j. Perfect: theta_y = 0, target s (cos m2 - m3), others 0. Worst: theta_y = pi
    (past the threshold): target s (-1 - (pi - theta_t) sin theta_t - m3)."""
    s, m1, m2, m3 = 4.0, 1.2, 0.3, 0.2
    head = _head(CombinedMarginHead, np.eye(D, C, dtype=np.float32), scale=s, m1=m1, m2=m2,
                 m3=m3)
    labels = np.array([0, 1, 2, 3])
    perfect = tf.constant(np.eye(D, dtype=np.float32)[labels])
    target = s * (math.cos(m2) - m3)
    np.testing.assert_allclose(run(head)(perfect, tf.constant(labels)).numpy(),
                               math.log(1 + (C - 1) * math.exp(-target)), rtol=1e-5)
    threshold = (math.pi - m2) / m1
    target = s * (-1 - (math.pi - threshold) * math.sin(threshold) - m3)
    worst = tf.constant(-np.eye(D, dtype=np.float32)[labels])
    np.testing.assert_allclose(run(head)(worst, tf.constant(labels)).numpy(),
                               math.log(math.exp(target) + C - 1) - target, rtol=1e-5)


def test_combined_covers_arcface_and_cosface() -> None:
    """(1, m, 0) is ArcFace and (1, 0, m) CosFace, to float32 rounding."""
    rng = np.random.default_rng(5)
    kernel = rng.normal(size=(6, 9)).astype(np.float32)
    embeddings = tf.constant(rng.normal(size=(32, 6)).astype(np.float32))
    labels = tf.constant(rng.integers(0, 9, size=32))
    arcface = _head(ArcFaceHead, kernel, scale=16.0, margin=1.2)
    combined = _head(CombinedMarginHead, kernel, scale=16.0, m1=1.0, m2=1.2, m3=0.0)
    np.testing.assert_allclose(combined(embeddings, labels), arcface(embeddings, labels), rtol=1e-6)
    cosface = _head(CosFaceHead, kernel, scale=16.0, margin=0.4)
    combined = _head(CombinedMarginHead, kernel, scale=16.0, m1=1.0, m2=0.0, m3=0.4)
    np.testing.assert_allclose(combined(embeddings, labels), cosface(embeddings, labels), rtol=1e-6)


@pytest.mark.parametrize("cls, kwargs", [
    (CosFaceHead, {"margin": 0.35}), (CombinedMarginHead, {"m1": 1.0, "m2": 0.3, "m3": 0.2}),
    (CombinedMarginHead, {"m1": 2.0, "m2": 0.2, "m3": 0.0}), (SphereFaceHead, {"margin": 4}),
])
def test_gradient_finite_at_cos_plus_minus_one(cls: type, kwargs: dict, run: Callable) -> None:
    """Embeddings on and opposite their centres, and an all-zero one: finite gradients."""
    head = _head(cls, np.eye(D, C, dtype=np.float32), **kwargs)
    labels = tf.constant([0, 1, 2, 3, 0])
    embeddings = tf.constant(np.concatenate(
        [np.eye(2, D), -np.eye(4, D)[2:], np.zeros((1, D))]).astype(np.float32))

    @run
    def grads(e: tf.Tensor) -> list[tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch(e)
            loss = head(e, labels, training=True)
        return tape.gradient(loss, [e, head.kernel])

    for grad in grads(embeddings):
        assert np.all(np.isfinite(grad.numpy()))


@pytest.mark.parametrize("kwargs, message", [
    ({"m1": 0.5}, "m1 must be a finite number >= 1, got 0.5"),
    ({"m2": -0.1}, r"m2 must be in \[0, pi/2\), got -0.1"),
    ({"m3": 1.0}, r"m3 must be in \[0, 1\), got 1.0"),
    ({"sub_centers": 0}, "sub_centers must be an integer >= 1, got 0"),
    ({"loss": "hinge"}, "loss must be one of softmax_ce, focal, got 'hinge'"),
    ({"loss": "focal", "focal_gamma": -1.0}, "focal_gamma must be a finite number >= 0, got -1.0"),
])
def test_combined_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CombinedMarginHead(4, **kwargs)


# --- sphereface --------------------------------------------------------------------


def _np_psi(cos: np.ndarray, m: int) -> np.ndarray:
    """Liu et al. 2017, Eq. 6: (-1)^k cos(m theta) - 2k for theta in [k pi/m, (k+1) pi/m]."""
    theta = np.arccos(cos)
    k = np.minimum(np.floor(m * theta / math.pi), m - 1)
    return (-1.0) ** k * np.cos(m * theta) - 2 * k


def _np_lambda(step: int, base: float = 1000.0, gamma: float = 0.12, power: float = 1.0,
               minimum: float = 5.0) -> float:
    return max(minimum, base * (1 + gamma * step) ** -power)


def _np_sphereface_loss(embeddings: np.ndarray, kernel: np.ndarray, labels: np.ndarray, m: int,
                        lam: float) -> float:
    """|x| cos(theta_j) off target, |x| (lam cos(theta_y) + psi(theta_y)) / (1 + lam) on it."""
    norm = np.linalg.norm(embeddings, axis=1, keepdims=True)
    cos = _np_cosine(embeddings, kernel)
    return _np_margin_loss(cos, labels, norm, lambda c: (lam * c + _np_psi(c, m)) / (1 + lam))


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_sphereface_psi_matches_numpy(m: int, run: Callable) -> None:
    """psi from the Chebyshev polynomial and thresholds vs arccos; psi(0) = 1, psi(pi) = 1 - 2m."""
    head = SphereFaceHead(C, margin=m)
    cos = np.concatenate([np.cos(np.linspace(0, math.pi, 181)), [1.0, -1.0]]).astype(np.float32)
    got = run(head.psi)(tf.constant(cos)).numpy()
    np.testing.assert_allclose(got, _np_psi(cos.astype(np.float64), m), atol=1e-5)
    np.testing.assert_allclose(got[-2:], [1.0, 1.0 - 2 * m], atol=1e-6)
    # Monotone decreasing in theta: the property psi exists for.
    assert np.all(np.diff(got[:181]) <= 1e-6)


def test_sphereface_lambda_annealing_matches_numpy() -> None:
    head = SphereFaceHead(C, lambda_base=1000.0, lambda_gamma=0.12, lambda_power=1.0,
                          lambda_min=5.0)
    for step in (0, 1, 10, 100, 1000, 10_000):
        np.testing.assert_allclose(head.annealing_lambda(step).numpy(), _np_lambda(step), rtol=1e-6)
    head = SphereFaceHead(C, lambda_base=100.0, lambda_gamma=0.5, lambda_power=2.0, lambda_min=0.0)
    np.testing.assert_allclose(head.annealing_lambda(7).numpy(),
                               _np_lambda(7, 100.0, 0.5, 2.0, 0.0), rtol=1e-6)


def test_sphereface_perfect_and_worst_batches(run: Callable) -> None:
    """w_j = u_j, e_i = a u_{y_i}: psi(0) = 1, so the target is a (lam + 1) / (1 + lam) = a
    whatever lam, others 0: loss = log(1 + (C - 1) e^{-a}). e_i = -a u_{y_i}: psi(pi) = 1 - 2m,
    target t = a (-lam + 1 - 2m) / (1 + lam): loss = log(e^t + C - 1) - t."""
    a, m = 3.0, 4
    head = _head(SphereFaceHead, np.eye(D, C, dtype=np.float32), margin=m)
    labels = np.array([0, 1, 2, 3])
    perfect = tf.constant(a * np.eye(D, dtype=np.float32)[labels])
    np.testing.assert_allclose(run(head)(perfect, tf.constant(labels)).numpy(),
                               math.log(1 + (C - 1) * math.exp(-a)), rtol=1e-5)
    lam = _np_lambda(0)
    target = a * (-lam + 1 - 2 * m) / (1 + lam)
    worst = tf.constant(-a * np.eye(D, dtype=np.float32)[labels])
    np.testing.assert_allclose(run(head)(worst, tf.constant(labels)).numpy(),
                               math.log(math.exp(target) + C - 1) - target, rtol=1e-5)


@pytest.mark.parametrize("m", [2, 4])
def test_sphereface_matches_numpy_along_the_annealing(m: int, run: Callable) -> None:
    """Each training call uses lambda of the calls before it and counts itself; evaluation
    calls use the current lambda and do not count."""
    rng = np.random.default_rng(6)
    kernel = rng.normal(size=(6, 9)).astype(np.float32)
    embeddings = (3.0 * rng.normal(size=(32, 6))).astype(np.float32)
    labels = rng.integers(0, 9, size=32)
    head = _head(SphereFaceHead, kernel, margin=m, lambda_gamma=1.0, lambda_base=50.0,
                 lambda_min=2.0)
    call = run(lambda e, y, training: head(e, y, training=training))
    e, y = tf.constant(embeddings), tf.constant(labels)
    for step in range(30):
        expected = _np_sphereface_loss(embeddings.astype(np.float64), kernel.astype(np.float64),
                                       labels, m, _np_lambda(step, 50.0, 1.0, 1.0, 2.0))
        np.testing.assert_allclose(call(e, y, False).numpy(), expected, rtol=1e-5)
        np.testing.assert_allclose(call(e, y, True).numpy(), expected, rtol=1e-5)
        assert int(head.step.numpy()) == step + 1
    # The floor: lambda = lambda_min from step 24 on.
    assert _np_lambda(29, 50.0, 1.0, 1.0, 2.0) == 2.0


def test_sphereface_step_is_checkpointed_and_resumes(tmp_path: Path) -> None:
    """The annealing step is a head variable: a restored head continues the schedule."""
    head = _head(SphereFaceHead, np.eye(D, C, dtype=np.float32), margin=4)
    embeddings, labels = tf.ones([2, D]), tf.constant([0, 1])
    for _ in range(5):
        head(embeddings, labels, training=True)
    path = tf.train.Checkpoint(head=head).write(str(tmp_path / "ckpt"))
    restored = _head(SphereFaceHead, np.zeros((D, C), np.float32), margin=4)
    tf.train.Checkpoint(head=restored).read(path).assert_existing_objects_matched()
    assert int(restored.step.numpy()) == 5
    # The same ops on the same restored values: bit for bit.
    np.testing.assert_array_equal(restored(embeddings, labels, training=True).numpy(),
                                  head(embeddings, labels, training=True).numpy())
    assert int(restored.step.numpy()) == 6


@pytest.mark.parametrize("margin, message", [
    (0.5, r"margin must be an integer >= 1 \(4 in the paper\), got 0.5"),
    (0, "margin must be an integer >= 1"),
])
def test_sphereface_rejects_bad_margins(margin: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SphereFaceHead(C, margin=margin)
    with pytest.raises(ConfigError, match="head 'sphereface': " + message):
        build_head(C, D, HeadConfig(name="sphereface", params=SphereFace(margin=margin)))
    assert SphereFaceHead(C, margin=4.0).margin == 4


def test_sphereface_cannot_be_sharded() -> None:
    with pytest.raises(ConfigError, match="head.sharded=True does not apply to head 'sphereface'"):
        head_config("sphereface", sharded=True)


# --- focal loss --------------------------------------------------------------------


def _np_focal(logits: np.ndarray, labels: np.ndarray, gamma: float) -> float:
    """Lin et al. 2017: mean_i -(1 - p_i)^gamma log p_i, p_i = softmax(z_i)[y_i]."""
    top = logits.max(axis=1, keepdims=True)
    log_p = (logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))
    log_pt = log_p[np.arange(len(labels)), labels]
    return float(np.mean(-((1 - np.exp(log_pt)) ** gamma) * log_pt))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("name", ["softmax", "arcface", "cosface", "combined", "sphereface"])
def test_focal_loss_matches_numpy(name: str, gamma: float, run: Callable) -> None:
    """The focal loss on each head's training logits (its cross-entropy at gamma = 0)."""
    rng = np.random.default_rng(8)
    embeddings = tf.constant(rng.normal(size=(16, 8)).astype(np.float32))
    labels = tf.constant(rng.integers(0, 5, size=16))
    head = build_head(5, 8, _config(name, loss="focal", focal_gamma=gamma))
    head.build((None, 8))
    logits = head.training_logits(embeddings, labels).numpy().astype(np.float64)
    loss = run(lambda e, y: head(e, y, training=False))(embeddings, labels)
    np.testing.assert_allclose(loss.numpy(), _np_focal(logits, labels.numpy(), gamma), rtol=1e-5)
    if gamma == 0.0:
        np.testing.assert_allclose(loss.numpy(), _np_cross_entropy(logits, labels.numpy()),
                                   rtol=1e-5)


def test_focal_loss_closed_forms() -> None:
    """CE = 0 (p_t = 1) costs 0 with a finite, vanishing gradient even for gamma < 1 (the true
    one is 0, the floored weight leaves 1e-30^gamma); CE = log 2 (p_t = 1/2)
    costs 2^-gamma log 2; large CE approaches the CE itself."""
    ce = tf.constant([0.0, math.log(2.0), 50.0])
    for gamma in (0.5, 2.0):
        with tf.GradientTape() as tape:
            tape.watch(ce)
            value = focal_loss(ce, gamma)
        np.testing.assert_allclose(value.numpy(), [0.0, 2**-gamma * math.log(2.0), 50.0],
                                   rtol=1e-6)
        grad = tape.gradient(value, ce).numpy()
        assert np.all(np.isfinite(grad)) and 0.0 <= grad[0] < 1e-12


def test_focal_perfect_batch(run: Callable) -> None:
    """CosFace's perfect batch: CE = log(1 + (C - 1) e^{-s(1 - m)}), FL = (1 - e^{-CE})^gamma CE."""
    s, m, gamma = 4.0, 0.35, 2.0
    head = _head(CosFaceHead, np.eye(D, C, dtype=np.float32), scale=s, margin=m, loss="focal",
                 focal_gamma=gamma)
    labels = np.array([0, 1, 2, 3])
    ce = math.log(1 + (C - 1) * math.exp(-s * (1 - m)))
    loss = run(head)(tf.constant(np.eye(D, dtype=np.float32)[labels]), tf.constant(labels))
    np.testing.assert_allclose(loss.numpy(), (1 - math.exp(-ce)) ** gamma * ce, rtol=1e-5)


# --- sub-centres -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["arcface", "cosface", "combined"])
def test_sub_centers_match_numpy(name: str, run: Callable) -> None:
    """cos(theta_c) = max over class c's K centres (columns c K .. c K + K - 1), then the margin."""
    k, classes = 3, 5
    rng = np.random.default_rng(9)
    embeddings = rng.normal(size=(16, 8)).astype(np.float32)
    labels = rng.integers(0, classes, size=16)
    head = build_head(classes, 8, _config(name, sub_centers=k, margin=0.4))
    head.build((None, 8))
    assert head.kernel.shape == (8, classes * k)
    kernel = head.kernel.numpy().astype(np.float64)
    cos = _np_cosine(embeddings.astype(np.float64), kernel, k)
    target = {"arcface": _np_combined_target(1.0, 0.4, 0.0), "cosface": lambda c: c - 0.4,
              "combined": _np_combined_target(1.0, 0.5, 0.0)}[name]
    loss = run(head)(tf.constant(embeddings), tf.constant(labels))
    np.testing.assert_allclose(loss.numpy(), _np_margin_loss(cos, labels, 16.0, target), rtol=1e-5)
    np.testing.assert_allclose(head.logits(tf.constant(embeddings)).numpy(), 16.0 * cos,
                               rtol=1e-5, atol=1e-5)


def test_sub_centers_perfect_batch() -> None:
    """One sub-centre of each class on its axis, the others opposite: the max picks the
    aligned one, so the loss is the one-centre perfect batch's."""
    s, m, k = 4.0, 0.35, 2
    kernel = np.zeros((D, C * k), np.float32)
    for c in range(C):
        kernel[c, c * k] = -1.0
        kernel[c, c * k + 1] = 1.0
    head = _head(CosFaceHead, kernel, scale=s, margin=m, sub_centers=k)
    labels = np.array([0, 1, 2, 3])
    loss = head(tf.constant(np.eye(D, dtype=np.float32)[labels]), tf.constant(labels))
    np.testing.assert_allclose(loss.numpy(), math.log(1 + (C - 1) * math.exp(-s * (1 - m))),
                               rtol=1e-5)


def test_softmax_rejects_sub_centers() -> None:
    with pytest.raises(ConfigError, match="head.sub_centers=2 does not apply to head 'softmax'"):
        head_config("softmax", sub_centers=2)
