"""The sharded (Partial FC) margin head in one process: N = 1 is the unsharded head; sampling."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sparse_embed.config import HeadConfig, head_config
from sparse_embed.errors import ConfigError
from sparse_embed.heads import build_head
from sparse_embed.heads.margin import ArcFaceHead, CosFaceHead
from sparse_embed.heads.partial_fc import ShardedMarginHead, shard_range
from sparse_embed.keras import tf
from sparse_embed.strategy import SingleProcess

pytestmark = pytest.mark.unit

C, D, B = 10, 6, 12


def _batch(seed: int = 0) -> tuple[tf.Tensor, tf.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (tf.constant(rng.normal(size=(B, D)), tf.float32),
            tf.constant(rng.integers(0, C, B), tf.int32),
            rng.normal(size=(C, D)).astype(np.float32))


@pytest.mark.parametrize("classes, workers", [(10, 1), (10, 3), (7, 7), (85742, 8)])
def test_shard_ranges_tile_the_classes(classes: int, workers: int) -> None:
    ranges = [shard_range(classes, workers, r) for r in range(workers)]
    assert ranges[0][0] == 0 and ranges[-1][1] == classes
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    sizes = [end - start for start, end in ranges]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("name, params, shared", [
    ("arcface", {"margin": 0.4}, {}),
    ("cosface", {"margin": 0.35}, {}),
    ("combined", {"m1": 1.2, "m2": 0.3, "m3": 0.2}, {}),
    ("arcface", {"margin": 0.4}, {"loss": "focal", "focal_gamma": 2.0}),
    ("cosface", {"margin": 0.35}, {"sub_centers": 3}),
    ("combined", {"m1": 1.0, "m2": 0.5, "m3": 0.1}, {"sub_centers": 2, "loss": "focal"}),
], ids=["arcface", "cosface", "combined", "arcface-focal", "cosface-subcenters",
        "combined-subcenters-focal"])
def test_one_worker_equals_the_unsharded_head(name: str, params: dict, shared: dict) -> None:
    """N = 1, every class: the unsharded head's loss, accuracy and gradients, for each
    normalised margin, the focal loss and sub-centres (class c's K rows are its K columns)."""
    embeddings, labels, _ = _batch()
    config = head_config(name, {"scale": 16.0, **params}, sharded=True, **shared)
    sharded = build_head(C, D, config)
    assert isinstance(sharded, ShardedMarginHead) and sharded.num_local == C
    sharded.build((None, D))
    k = config.sub_centers
    centres = np.random.default_rng(5).normal(size=sharded.kernel.shape).astype(np.float32)
    sharded.kernel.assign(centres)
    full = build_head(C, D, dataclasses.replace(config, sharded=False))
    full.build((None, D))
    full.kernel.assign(centres.reshape(C * k, D).T)
    for training in (True, False):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(embeddings)
            got, got_acc = sharded.loss_and_accuracy(embeddings, labels, training=training)
            want, want_acc = full.loss_and_accuracy(embeddings, labels, training=training)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        np.testing.assert_allclose(got_acc, want_acc)
        np.testing.assert_allclose(tape.gradient(got, embeddings), tape.gradient(want, embeddings),
                                   atol=1e-6)
        want_grad = tf.transpose(tape.gradient(want, full.kernel)).numpy().reshape(centres.shape)
        np.testing.assert_allclose(tape.gradient(got, sharded.kernel), want_grad, atol=1e-6)


def test_sampling_with_sub_centers_keeps_whole_classes() -> None:
    """K sub-centres: the sampled gradient is IndexedSlices of whole [K, D] class rows."""
    embeddings, labels, _ = _batch(2)
    head = ShardedMarginHead(CosFaceHead(C, scale=16.0, sub_centers=2), SingleProcess(),
                             sample_rate=0.3)
    head.build((None, D))
    assert head.kernel.shape == (C, 2, D)
    few = labels[:3]
    with tf.GradientTape() as tape:
        loss, accuracy = head.loss_and_accuracy(embeddings[:3], few, training=True)
    grad = tape.gradient(loss, head.kernel)
    assert np.isfinite(loss.numpy()) and 0 <= accuracy.numpy() <= 1
    assert isinstance(grad, tf.IndexedSlices) and grad.values.shape[1:] == (2, D)
    assert set(np.unique(few.numpy())) <= set(grad.indices.numpy().tolist())


def test_sampling_keeps_every_positive_and_samples_negatives() -> None:
    embeddings, labels, centres = _batch(1)
    head = ShardedMarginHead(ArcFaceHead(C, scale=16.0), SingleProcess(), sample_rate=0.3)
    head.build((None, D))
    head.kernel.assign(centres)
    few = tf.constant([2, 2, 7], tf.int32)
    index = head._sample(few, tf.ones_like(few, tf.bool)).numpy()
    assert len(index) == 3 and {2, 7} <= set(index.tolist()) and list(index) == sorted(index)
    # More positives than the sample size: the sample grows to hold them all.
    index = head._sample(labels, tf.ones_like(labels, tf.bool)).numpy()
    assert set(index.tolist()) == set(labels.numpy().tolist())

    with tf.GradientTape() as tape:
        loss, _ = head.loss_and_accuracy(embeddings[:3], few, training=True)
    grad = tape.gradient(loss, head.kernel)
    # Only the sampled rows get a gradient: the point of sampling.
    assert isinstance(grad, tf.IndexedSlices) and len(np.unique(grad.indices.numpy())) == 3
    # The sampled loss is the softmax over the sampled classes only, computed in NumPy.
    index = np.sort(np.asarray(grad.indices.numpy()))
    e = embeddings[:3].numpy() / np.linalg.norm(embeddings[:3].numpy(), axis=1, keepdims=True)
    w = centres[index] / np.linalg.norm(centres[index], axis=1, keepdims=True)
    cos = e @ w.T
    cols = np.searchsorted(index, few.numpy())
    target = cos[np.arange(3), cols]
    sine = np.sqrt(1 - target**2)
    z = 16.0 * cos
    z[np.arange(3), cols] = 16.0 * (target * np.cos(0.5) - sine * np.sin(0.5))
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    np.testing.assert_allclose(loss, np.mean(lse - z[np.arange(3), cols]), rtol=1e-5)


def test_sharded_head_config_errors() -> None:
    with pytest.raises(ConfigError, match="head.sharded=True does not apply to head 'softmax'"):
        head_config("softmax", sharded=True)
    with pytest.raises(ConfigError, match="head.sharded=True does not apply to head 'sphereface'; "
                                          "leave it at False"):
        head_config("sphereface", sharded=True)
    with pytest.raises(ConfigError, match=r"'head.sample_rate' must be in \(0, 1\]"):
        head_config(sharded=True, sample_rate=0.0)
    with pytest.raises(ConfigError, match=r"sample_rate must be in \(0, 1\]"):
        build_head(C, D, HeadConfig(sharded=True, sample_rate=0.0))
