"""Pair and proxy losses: closed forms, NumPy re-implementations of the papers, training, lr multipliers."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sparse_embed.config import HeadConfig, OptimizerConfig, head_config, load_config
from sparse_embed.errors import ConfigError
from sparse_embed.heads import HEADS, build_head
from sparse_embed.heads.pair import PairLossHead
from sparse_embed.heads.proxy import ProxyHead
from sparse_embed.keras import keras, tf
from sparse_embed.strategy import SingleProcess
from sparse_embed.training.trainer import OPTIMIZERS, apply_gradients, check_sampler, train

pytestmark = pytest.mark.unit

# One case per loss and variant: (id, head config overrides).
CASES: dict[str, dict] = {
    "triplet-semi_hard": {"name": "triplet", "mining": "semi_hard", "margin": 0.3},
    "triplet-semi_hard-sq": {"name": "triplet", "mining": "semi_hard", "margin": 0.5,
                             "distance": "squared_euclidean"},
    "triplet-batch_hard": {"name": "triplet", "mining": "batch_hard", "margin": 0.3},
    "triplet-batch_hard-sq": {"name": "triplet", "mining": "batch_hard", "margin": 0.5,
                              "distance": "squared_euclidean"},
    "triplet-all": {"name": "triplet", "mining": "all", "margin": 0.3},
    "contrastive": {"name": "contrastive", "pos_margin": 0.1, "neg_margin": 0.6},
    "contrastive-sq": {"name": "contrastive", "pos_margin": 0.2, "neg_margin": 1.2,
                       "distance": "squared_euclidean"},
    "multi_similarity": {"name": "multi_similarity", "alpha": 2.0, "beta": 10.0,
                         "base": 0.5, "epsilon": 0.1},
    "proxy_nca": {"name": "proxy_nca", "scale": 3.0},
    "proxy_anchor": {"name": "proxy_anchor", "alpha": 8.0, "delta": 0.1},
}
C, D = 4, 6
PAIR_HEADS = [name for name in HEADS.names() if HEADS.get(name).pairs]
PROXY_HEADS = [name for name in HEADS.names() if HEADS.get(name).builder.startswith("proxy.")]


def _case_config(case: str, **kwargs) -> HeadConfig:
    """A case's head config: its head's name and its parameters, updated by `kwargs`
    (parameters, or shared head fields such as `gather_batch`)."""
    params = {**{k: v for k, v in CASES[case].items() if k != "name"}, **kwargs}
    shared = {k: params.pop(k) for k in list(params) if k in HeadConfig.__dataclass_fields__}
    return head_config(CASES[case]["name"], params, **shared)


@pytest.fixture(params=["eager", "function"])
def run(request: pytest.FixtureRequest) -> Callable[[Callable], Callable]:
    """Wraps a TF computation to run eagerly or traced inside tf.function."""
    return (lambda fn: fn) if request.param == "eager" else tf.function


def _head(case: str, num_classes: int = C, dim: int = D, **kwargs) -> keras.layers.Layer:
    head = build_head(num_classes, dim, _case_config(case, **kwargs))
    head.build((None, dim))
    return head


def _loss(head: keras.layers.Layer, embeddings: np.ndarray, labels: np.ndarray,
          run: Callable = lambda fn: fn) -> float:
    fn = run(lambda e, y: head.loss_and_accuracy(e, y)[0])
    return float(fn(tf.constant(embeddings, tf.float32), tf.constant(labels, tf.int32)))


def test_every_pair_and_proxy_head_has_cases() -> None:
    names = set(PAIR_HEADS) | set(PROXY_HEADS)
    assert names <= set(HEADS.names())
    assert {case["name"] for case in CASES.values()} == names


# --- NumPy re-implementations of the papers' formulas -----------------------------------------


def _np_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _np_distances(e: np.ndarray, distance: str) -> np.ndarray:
    e = _np_normalize(e.astype(np.float64))
    if distance == "cosine":
        return 1.0 - e @ e.T
    return ((e[:, None, :] - e[None, :, :]) ** 2).sum(-1)


def _np_triplet(e: np.ndarray, y: np.ndarray, margin: float, mining: str, distance: str) -> float:
    d = _np_distances(e, distance)
    n = len(y)
    pos = [[p for p in range(n) if p != a and y[p] == y[a]] for a in range(n)]
    neg = [[k for k in range(n) if y[k] != y[a]] for a in range(n)]
    if mining == "semi_hard":
        # tfa.losses.TripletSemiHardLoss: the closest negative farther than the positive,
        # else the farthest negative; the mean over every positive pair.
        losses = []
        for a in range(n):
            if not neg[a]:
                continue
            for p in pos[a]:
                farther = [d[a, k] for k in neg[a] if d[a, k] > d[a, p]]
                chosen = min(farther) if farther else max(d[a, k] for k in neg[a])
                losses.append(max(margin + d[a, p] - chosen, 0.0))
        return float(np.mean(losses)) if losses else 0.0
    if mining == "batch_hard":
        losses = [max(margin + max(d[a, p] for p in pos[a]) - min(d[a, k] for k in neg[a]), 0.0)
                  for a in range(n) if pos[a] and neg[a]]
        return float(np.mean(losses)) if losses else 0.0
    losses = [margin + d[a, p] - d[a, k] for a in range(n) for p in pos[a] for k in neg[a]]
    active = [v for v in losses if v > 0]
    return float(np.mean(active)) if active else 0.0


def _np_contrastive(e: np.ndarray, y: np.ndarray, pos_margin: float, neg_margin: float,
                    distance: str) -> float:
    d = _np_distances(e, distance)
    pulls, pushes = [], []
    for i, j in itertools.permutations(range(len(y)), 2):
        if y[i] == y[j]:
            pulls.append(max(d[i, j] - pos_margin, 0.0))
        else:
            pushes.append(max(neg_margin - d[i, j], 0.0))

    def nonzero_mean(values: list[float]) -> float:
        values = [v for v in values if v > 0]
        return float(np.mean(values)) if values else 0.0

    return nonzero_mean(pulls) + nonzero_mean(pushes)


def _np_multi_similarity(e: np.ndarray, y: np.ndarray, alpha: float, beta: float, base: float,
                         epsilon: float) -> float:
    """The authors' loop: mine each anchor's pairs, skip anchors left without a pair, divide by B."""
    e = _np_normalize(e.astype(np.float64))
    s = e @ e.T
    total = 0.0
    for i in range(len(y)):
        pos = np.array([s[i, j] for j in range(len(y)) if j != i and y[j] == y[i]])
        neg = np.array([s[i, j] for j in range(len(y)) if y[j] != y[i]])
        if len(pos) == 0 or len(neg) == 0:
            continue
        kept_neg = neg[neg + epsilon > pos.min()]
        kept_pos = pos[pos - epsilon < neg.max()]
        if len(kept_neg) == 0 or len(kept_pos) == 0:
            continue
        total += (np.log1p(np.exp(-alpha * (kept_pos - base)).sum()) / alpha
                  + np.log1p(np.exp(beta * (kept_neg - base)).sum()) / beta)
    return total / len(y)


def _np_proxy_nca(e: np.ndarray, y: np.ndarray, proxies: np.ndarray, scale: float) -> float:
    e, p = _np_normalize(e.astype(np.float64)), _np_normalize(proxies.astype(np.float64))
    logits = -scale * ((e[:, None, :] - p[None, :, :]) ** 2).sum(-1)
    logits -= logits.max(axis=1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-np.mean(log_softmax[np.arange(len(y)), y]))


def _np_proxy_anchor(e: np.ndarray, y: np.ndarray, proxies: np.ndarray, alpha: float,
                     delta: float) -> float:
    """Kim et al. 2020, Eq. 4, one proxy at a time."""
    e, p = _np_normalize(e.astype(np.float64)), _np_normalize(proxies.astype(np.float64))
    s = e @ p.T
    with_positives = [c for c in range(len(p)) if np.any(y == c)]
    pull = sum(np.log1p(np.exp(-alpha * (s[y == c, c] - delta)).sum()) for c in with_positives)
    push = sum(np.log1p(np.exp(alpha * (s[y != c, c] + delta)).sum()) for c in range(len(p)))
    return pull / len(with_positives) + push / len(p)


def _np_loss(case: str, head: keras.layers.Layer, e: np.ndarray, y: np.ndarray) -> float:
    config = _case_config(case)
    p = config.params
    if config.name == "triplet":
        return _np_triplet(e, y, p.margin, p.mining, p.distance)
    if config.name == "contrastive":
        return _np_contrastive(e, y, p.pos_margin, p.neg_margin, p.distance)
    if config.name == "multi_similarity":
        return _np_multi_similarity(e, y, p.alpha, p.beta, p.base, p.epsilon)
    proxies = head.proxies.numpy()
    if config.name == "proxy_nca":
        return _np_proxy_nca(e, y, proxies, p.scale)
    return _np_proxy_anchor(e, y, proxies, p.alpha, p.delta)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_numpy_on_random_batches(case: str, seed: int, run: Callable) -> None:
    """P x K batches plus a class seen once (an anchor without positives) and, for the proxy
    losses, a class absent from the batch."""
    rng = np.random.default_rng(seed)
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3] if seed != 2 else [2, 0, 1, 0, 2, 1, 1, 0])
    embeddings = rng.normal(size=(len(labels), D))
    head = _head(case, num_classes=5)
    if isinstance(head, ProxyHead):
        head.proxies.assign(rng.normal(size=(5, D)))
    expected = _np_loss(case, head, embeddings, labels)
    np.testing.assert_allclose(_loss(head, embeddings, labels, run), expected, rtol=1e-5, atol=1e-5)


def _circle(angles: list[float]) -> np.ndarray:
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _arc(angle: float) -> float:
    """1 - cos: the cosine distance of two points `angle` apart on the unit circle."""
    return 1.0 - np.cos(angle)


@pytest.mark.parametrize("margin", [0.05, 0.3, 1.0])
def test_semi_hard_rule_on_designed_distances(margin: float) -> None:
    """Hand-placed on the unit circle, one positive pair (0, 1), one image of each other class.

    At angles 0, 0.6 | 0.3, 0.8, 1.3: from the anchor at 0 the negatives are 0.3 (harder than
    the positive at 0.6), 0.8 and 1.3 away; the semi-hard one is at 0.8. From the anchor at 0.6
    they are 0.3, 0.2 and 0.7 away: the one at 0.7. At angles 0, 1.0 | 0.3, 0.5 no negative is
    farther than the positive from either end, so each takes its farthest negative (0.5, 0.7).
    The loss is the mean of max(0, m + d_ap - d_an) over the two ordered pairs."""
    found = _head("triplet-semi_hard", num_classes=4, dim=2, margin=margin)
    relu = lambda x: max(x, 0.0)  # noqa: E731
    expected = 0.5 * (relu(margin + _arc(0.6) - _arc(0.8)) + relu(margin + _arc(0.6) - _arc(0.7)))
    loss = _loss(found, _circle([0.0, 0.6, 0.3, 0.8, 1.3]), np.array([0, 0, 1, 2, 3]))
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
    expected = 0.5 * (relu(margin + _arc(1.0) - _arc(0.5)) + relu(margin + _arc(1.0) - _arc(0.7)))
    loss = _loss(found, _circle([0.0, 1.0, 0.3, 0.5]), np.array([0, 0, 1, 2]))
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)


def test_multi_similarity_mining_drops_easy_pairs() -> None:
    """Anchor 0 has positives at cos 0.9 and 0.2, negatives at cos 0.15 and -0.5 (epsilon 0.1):
    the negative at -0.5 is below min_pos - eps = 0.1 and is dropped; the positive at 0.9 is
    above max_neg + eps = 0.25 and is dropped. A 2-D layout cannot give these cosines, so the
    similarities are passed to `pair_loss` directly."""
    s = np.array([[1.0, 0.9, 0.2, 0.15, -0.5],
                  [0.9, 1.0, 0.1, 0.05, 0.05],
                  [0.2, 0.1, 1.0, 0.08, 0.02],
                  [0.15, 0.05, 0.08, 1.0, 0.0],
                  [-0.5, 0.05, 0.02, 0.0, 1.0]], np.float32)
    labels = np.array([0, 0, 0, 1, 2])
    head = _head("multi_similarity")
    same = labels[:, None] == labels[None, :]
    positive, negative = same & ~np.eye(5, dtype=bool), ~same
    loss = float(head.pair_loss(tf.constant(s), tf.constant(positive), tf.constant(negative)))
    alpha, beta, base = 2.0, 10.0, 0.5

    def pull(*sims: float) -> float:
        return np.log1p(sum(np.exp(-alpha * (v - base)) for v in sims)) / alpha

    def push(*sims: float) -> float:
        return np.log1p(sum(np.exp(beta * (v - base)) for v in sims)) / beta

    # Anchor 1: positives 0.9, 0.1, negatives 0.05, 0.05: keeps 0.1 (< 0.15) and both
    # negatives (> 0.0). Anchor 2: positives 0.2, 0.1, negatives 0.08, 0.02: keeps 0.1
    # (< 0.18) and both negatives (> 0.0). Anchors 3 and 4 have no positive.
    anchors = [pull(0.2) + push(0.15), pull(0.1) + push(0.05, 0.05), pull(0.1) + push(0.08, 0.02)]
    np.testing.assert_allclose(loss, sum(anchors) / 5, rtol=1e-5)


# --- closed forms ------------------------------------------------------------------------------


def _perfect_batch(k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Each of the C classes on its own axis, K images each."""
    labels = np.repeat(np.arange(C), k)
    return np.eye(C, D)[labels] * 3.0, labels


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c]["name"] in PAIR_HEADS])
def test_pair_losses_perfect_and_worst_batches(case: str, run: Callable) -> None:
    """Perfect (classes on orthogonal axes: d_ap = 0, d_an = 1 for 1 - cos, 2 for |a-b|^2, all
    beyond the margins): 0. Worst (every embedding the same, d = 0, S = 1): triplet gives its
    margin for every mining; contrastive gives neg_margin (every negative pair costs it, positive
    pairs nothing); Multi-Similarity mines every pair, each anchor costs
    1/alpha log(1 + (K-1) e^{-alpha (1 - lambda)}) + 1/beta log(1 + (B-K) e^{beta (1 - lambda)})."""
    head = _head(case)
    embeddings, labels = _perfect_batch(k=3)
    assert _loss(head, embeddings, labels, run) == pytest.approx(0.0, abs=1e-6)
    same = np.ones_like(embeddings)
    config = _case_config(case)
    if config.name == "triplet":
        expected = config.params.margin
    elif config.name == "contrastive":
        expected = config.params.neg_margin
    else:
        a, b, lam, k, n = config.params.alpha, config.params.beta, config.params.base, 3, len(labels)
        expected = (np.log1p((k - 1) * np.exp(-a * (1 - lam))) / a
                    + np.log1p((n - k) * np.exp(b * (1 - lam))) / b)
    assert _loss(head, same, labels, run) == pytest.approx(expected, rel=1e-5)


def test_proxy_losses_perfect_and_worst_batches(run: Callable) -> None:
    """Proxies on the axes, K = 2. Perfect (each embedding on its proxy, cos 1 to it, 0 to the
    others): Proxy-NCA log(1 + (C-1) e^{-2s}), its minimum for this geometry; Proxy-Anchor
    log(1 + K e^{-alpha (1 - delta)}) + log(1 + (B-K) e^{alpha delta}). Worst (each embedding
    opposite its proxy, cos -1): Proxy-NCA log(1 + (C-1) e^{2s}); Proxy-Anchor
    log(1 + K e^{alpha (1 + delta)}) + log(1 + (B-K) e^{alpha delta})."""
    embeddings, labels = _perfect_batch(k=2)
    b, k = len(labels), 2
    nca, anchor = _head("proxy_nca"), _head("proxy_anchor")
    for head in (nca, anchor):
        head.proxies.assign(np.eye(C, D))
    s, a, dl = 3.0, 8.0, 0.1
    assert _loss(nca, embeddings, labels, run) == pytest.approx(np.log1p((C - 1) * np.exp(-2 * s)), rel=1e-5)
    assert _loss(nca, -embeddings, labels, run) == pytest.approx(np.log1p((C - 1) * np.exp(2 * s)), rel=1e-5)
    push = np.log1p((b - k) * np.exp(a * dl))
    assert _loss(anchor, embeddings, labels, run) == pytest.approx(
        np.log1p(k * np.exp(-a * (1 - dl))) + push, rel=1e-5)
    assert _loss(anchor, -embeddings, labels, run) == pytest.approx(
        np.log1p(k * np.exp(a * (1 + dl))) + push, rel=1e-5)
    # Nearest-proxy accuracy: all right, then all wrong.
    assert float(nca.loss_and_accuracy(embeddings, labels)[1]) == 1.0
    assert float(nca.loss_and_accuracy(-embeddings, labels)[1]) == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_pair_accuracy_is_batch_recall_at_1(seed: int) -> None:
    """The fraction of anchors whose most similar other embedding shares their label; 1 on the
    perfect batch."""
    head = _head("triplet-batch_hard")
    embeddings, labels = _perfect_batch(k=3)
    assert float(head.loss_and_accuracy(embeddings, labels)[1]) == 1.0
    embeddings = np.random.default_rng(seed).normal(size=embeddings.shape)
    s = _np_normalize(embeddings) @ _np_normalize(embeddings).T
    np.fill_diagonal(s, -np.inf)
    expected = np.mean(labels[np.argmax(s, axis=1)] == labels)
    assert float(head.loss_and_accuracy(embeddings, labels)[1]) == pytest.approx(expected)


# --- gradients, training, distribution ----------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_gradients_are_finite(case: str, run: Callable) -> None:
    """Random, perfect and degenerate (all equal: distance 0 everywhere) batches."""
    head = _head(case)
    rng = np.random.default_rng(3)
    perfect, labels = _perfect_batch(k=2)
    for embeddings in (rng.normal(size=perfect.shape), perfect, np.ones_like(perfect)):
        e = tf.constant(embeddings, tf.float32)

        @run
        def grads(e: tf.Tensor) -> list[tf.Tensor]:
            with tf.GradientTape() as tape:
                tape.watch(e)
                loss = head(e, tf.constant(labels))
            return tape.gradient(loss, [e, *head.trainable_variables])

        for grad in grads(e):
            assert grad is not None and np.all(np.isfinite(tf.convert_to_tensor(grad).numpy()))


@pytest.mark.parametrize("case", CASES)
def test_training_steps_lower_the_loss(case: str) -> None:
    """4 classes x 4 noisy points around random means, a linear backbone, 40 Adam steps."""
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(C), 4)
    inputs = tf.constant(rng.normal(size=(C, D))[labels] + 0.8 * rng.normal(size=(16, D)), tf.float32)
    labels = tf.constant(labels, tf.int32)
    head = _head(case)
    backbone = keras.layers.Dense(D, kernel_initializer=keras.initializers.Identity())
    backbone.build((None, D))
    variables = backbone.trainable_variables + head.trainable_variables
    optimizer = keras.optimizers.Adam(0.02)

    @tf.function
    def step() -> tf.Tensor:
        with tf.GradientTape() as tape:
            value = head(backbone(inputs), labels, training=True)
        optimizer.apply_gradients(zip(tape.gradient(value, variables), variables, strict=True))
        return value

    before = float(head(backbone(inputs), labels))
    for _ in range(40):
        step()
    after = float(head(backbone(inputs), labels))
    assert np.isfinite(after) and after < 0.7 * before, (before, after)


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c]["name"] in PAIR_HEADS])
def test_gather_batch_on_one_process_is_the_local_loss(case: str, run: Callable) -> None:
    rng = np.random.default_rng(5)
    embeddings, labels = rng.normal(size=(8, D)), np.repeat(np.arange(C), 2)
    local = _head(case)
    gathered = _head(case, gather_batch=True)
    gathered.strategy = SingleProcess()
    assert gathered.gather_batch and not local.gather_batch
    assert _loss(gathered, embeddings, labels, run) == _loss(local, embeddings, labels, run)


class _TwoWorkers(SingleProcess):
    """Worker 0 of two whose peer holds `other` (embeddings) and `other_labels`."""

    num_workers = 2

    def __init__(self, other: tf.Tensor, other_labels: tf.Tensor) -> None:
        self._other = {tf.float32: other, tf.int32: other_labels}

    def all_gather(self, tensor: tf.Tensor) -> tf.Tensor:
        return tf.concat([tensor, self._other[tensor.dtype]], axis=0)


def test_gather_batch_computes_the_loss_of_the_global_batch() -> None:
    """With a peer's rows appended by the all-gather, the loss is the one of the whole batch."""
    rng = np.random.default_rng(6)
    embeddings, labels = rng.normal(size=(8, D)).astype(np.float32), np.tile(np.arange(C), 2)
    head = _head("multi_similarity", gather_batch=True)
    peer = tf.math.l2_normalize(tf.constant(embeddings[4:]), axis=-1)
    head.strategy = _TwoWorkers(peer, tf.constant(labels[4:], tf.int32))
    whole = _loss(_head("multi_similarity"), embeddings, labels)
    assert _loss(head, embeddings[:4], labels[:4]) == pytest.approx(whole, rel=1e-6)


@pytest.mark.parametrize("name", sorted(set(PAIR_HEADS) | set(PROXY_HEADS)))
def test_sharded_is_a_one_line_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match=f"head.sharded=True does not apply to head '{name}'") as error:
        head_config(name, sharded=True)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("case", CASES)
def test_config_round_trip(case: str) -> None:
    head = _head(case)
    config = head.get_config()
    restored = keras.layers.deserialize(keras.layers.serialize(head))
    assert type(restored) is type(head) and restored.get_config() == config
    assert isinstance(head, PairLossHead | ProxyHead) and not hasattr(head, "logits")


@pytest.mark.parametrize("name, params, message, rule", [
    ("triplet", {"margin": -1.0}, "margin must be a finite number >= 0", ">= 0"),
    ("contrastive", {"neg_margin": float("nan")}, "neg_margin must be a finite number", ">= 0"),
    ("multi_similarity", {"beta": 0.0}, "beta must be a finite number > 0", "> 0"),
    ("proxy_anchor", {"lr_multiplier": 0.0}, "lr_multiplier must be a finite number > 0", "> 0"),
])
def test_bad_arguments_are_config_errors(name: str, params: dict, message: str, rule: str) -> None:
    """A config rejects the value before TensorFlow builds anything; the layer rejects it too."""
    (key,) = params
    with pytest.raises(ConfigError, match=f"'head.params.{key}' must be {rule}"):
        head_config(name, params)
    with pytest.raises(ConfigError, match=message):
        build_head(8, D, HeadConfig(name=name, params=HEADS.get(name)(**params)))


def test_pair_losses_need_the_pk_sampler() -> None:
    for overrides in (["head.name=triplet"],
                      ["head.name=contrastive", "data.sampler=p_k", "data.samples_per_class=1"]):
        with pytest.raises(ConfigError, match=r"set data.sampler: p_k \(with data.samples_per_class >= 2\)"):
            check_sampler(load_config("smoke", overrides))
    check_sampler(load_config("smoke", ["head.name=multi_similarity", "data.sampler=p_k"]))
    check_sampler(load_config("smoke", ["head.name=proxy_anchor"]))


# --- the proxies' learning-rate multiplier -----------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_lr_multiplier_steps_like_a_multiplied_learning_rate(name: str) -> None:
    """One variable, the gradient of (w - 3)^2 (so it depends on the trajectory), five steps:
    stepped with multiplier m at rate lr, w follows the optimizer at rate m x lr exactly (SGD with
    momentum and decoupled decay, Adam, AdamW), and each step is m times the step at rate lr."""
    lr, m = 0.01, 4.0
    config = OptimizerConfig(name=name, momentum=0.9, weight_decay=0.01)

    def trajectory(rate: float, multiplier: float) -> np.ndarray:
        w = tf.Variable([1.0, -2.0])
        optimizer = OPTIMIZERS.get(name)(config, rate)
        values = [w.numpy()]
        for _ in range(5):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(w - 3.0))
            apply_gradients(optimizer, [(tape.gradient(loss, w), w)], [(w, multiplier)])
            values.append(w.numpy())
        return np.array(values)

    multiplied = trajectory(lr, m)
    np.testing.assert_allclose(multiplied, trajectory(m * lr, 1.0), rtol=1e-5, atol=1e-6)
    first_step, base_step = (multiplied[1] - multiplied[0]), (trajectory(lr, 1.0)[1] - multiplied[0])
    np.testing.assert_allclose(first_step, m * base_step, rtol=1e-5)
    assert not np.allclose(first_step, base_step)


@pytest.mark.integration
def test_proxy_head_trains_with_its_multiplier_and_resumes(tiny_data: Path, tmp_path: Path) -> None:
    """Proxy-Anchor under Adam with the shuffle sampler: the proxies are in the checkpoint and a
    resume continues from them."""
    overrides = ["train.batch_size=8", "head.name=proxy_anchor", "optimizer.name=adam",
                 "schedule.base_lr=0.001", "head.params.lr_multiplier=10", "sparsity.type=none"]
    first = train(load_config("smoke", overrides + ["train.steps=3"]), tiny_data, tmp_path / "pa",
                  verbose=0)
    assert first.step == 3 and np.isfinite(first.metrics["loss"])
    ((variable, multiplier),) = first.model._lr_multipliers
    assert variable is first.model.head.proxies and multiplier == 10.0
    proxies = first.model.head.proxies.numpy()
    resumed = train(load_config("smoke", overrides + ["train.steps=5"]), tiny_data, tmp_path / "pa",
                    verbose=0)
    assert (resumed.step, resumed.resumed_from) == (5, 3)
    assert not np.allclose(resumed.model.head.proxies.numpy(), proxies)
