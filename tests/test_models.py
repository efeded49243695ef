"""Tests of sparse_embed.models: every registered model, the embedding layer, the profiler."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tensorflow as tf
from conftest import run_module

from sparse_embed.config import ModelConfig
from sparse_embed.errors import ConfigError
from sparse_embed.keras import keras
from sparse_embed.models import MODELS, build_model
from sparse_embed.models.embedding import ACTIVATIONS, SoftThreshold, embedding_block
from sparse_embed.models.mobilefacenet import scale_channels
from sparse_embed.models.profile import count_macs, count_params

EMBEDDING_SIZE = 16
BATCH = 2


def _small_kwargs(name: str) -> dict:
    # Tiny entries are small by their defaults; a full-size entry is checked at
    # a reduced input and width so the suite stays fast on CPU (its real size
    # is pinned by the parameter / MAC tests below).
    return {} if name.endswith("_tiny") else {"input_size": 32, "width": 0.25}


def _build(name: str, final_activation: str = "none") -> keras.Model:
    keras.utils.set_random_seed(0)
    return MODELS.get(name)(embedding_size=EMBEDDING_SIZE, final_activation=final_activation,
                            **_small_kwargs(name))


def _images(model: keras.Model, seed: int = 0) -> np.ndarray:
    size = model.input_shape[1]
    return np.random.default_rng(seed).uniform(-1, 1, (BATCH, size, size, 3)).astype(np.float32)


def _randomize_batch_norm(model: keras.Model, seed: int = 0) -> None:
    """Gives every BN non-trivial statistics, so inference-mode checks see real values."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.1, n).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype(np.float32))


@pytest.mark.parametrize("final_activation", ACTIVATIONS.names())
@pytest.mark.parametrize("name", MODELS.names())
def test_output_shape_and_finite(name: str, final_activation: str) -> None:
    model = _build(name, final_activation)
    assert model.name == name
    size = model.input_shape[1]
    assert model.input_shape == (None, size, size, 3)
    assert model.output_shape == (None, EMBEDDING_SIZE)
    for training in (False, True):
        out = model(_images(model), training=training)
        assert out.dtype == tf.float32
        assert out.shape == (BATCH, EMBEDDING_SIZE)
        assert np.all(np.isfinite(out.numpy()))


@pytest.mark.parametrize("name", MODELS.names())
def test_gradient_on_every_trainable_weight(name: str) -> None:
    # soft_threshold: its threshold is a trainable weight too.
    model = _build(name, "soft_threshold")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(model(_images(model), training=True)))
    grads = tape.gradient(loss, model.trainable_weights)
    missing = [w.name for w, g in zip(model.trainable_weights, grads, strict=True) if g is None]
    assert not missing
    assert any(float(tf.reduce_max(tf.abs(g))) > 0 for g in grads)


@pytest.mark.parametrize("name", MODELS.names())
def test_config_round_trip(name: str) -> None:
    model = _build(name, "soft_threshold")
    _randomize_batch_norm(model)
    clone = keras.Model.from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    clone.set_weights(model.get_weights())
    images = _images(model)
    np.testing.assert_array_equal(clone(images, training=False).numpy(),
                                  model(images, training=False).numpy())


@pytest.mark.parametrize("name", MODELS.names())
def test_save_and_reload_without_custom_objects(name: str, tmp_path) -> None:
    model = _build(name, "soft_threshold")
    _randomize_batch_norm(model)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert isinstance(reloaded.get_layer("embedding"), SoftThreshold)
    images = _images(model)
    np.testing.assert_array_equal(reloaded(images, training=False).numpy(),
                                  model(images, training=False).numpy())


# Conversion takes ~10 s for a tiny model and ~30 s for a full-size one even
# at a reduced size, so only tiny models convert in `make test-fast`.
@pytest.mark.parametrize("name", [
    pytest.param(name, marks=() if name.endswith("_tiny") else pytest.mark.slow)
    for name in MODELS.names()
])
@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning")
def test_tflite_matches_keras(name: str) -> None:
    model = _build(name, "soft_threshold")
    _randomize_batch_norm(model)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    interpreter = tf.lite.Interpreter(model_content=converter.convert())
    images = _images(model)
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], images)
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(out, model(images, training=False).numpy(), rtol=1e-4, atol=1e-4)


def test_mixed_precision_keeps_a_float32_embedding() -> None:
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _build("mobilefacenet_tiny", "soft_threshold")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("stem_conv").compute_dtype == "float16"
    out = model(_images(model), training=False)
    assert out.dtype == tf.float32
    assert np.all(np.isfinite(out.numpy()))


def _pre_activation(model: keras.Model) -> keras.Model:
    """images -> (linear BN output, embedding): what the final activation sees and gives."""
    return keras.Model(model.input, [model.get_layer("embedding_bn").output, model.output])


def test_relu_output_is_non_negative() -> None:
    model = _build("mobilefacenet_tiny", "relu")
    _randomize_batch_norm(model)
    pre, out = (t.numpy() for t in _pre_activation(model)(_images(model), training=False))
    assert np.all(out >= 0)
    np.testing.assert_array_equal(out, np.maximum(pre, 0))
    assert np.any(pre < 0) and np.any(out > 0)


def test_none_is_the_linear_batch_norm_output() -> None:
    model = _build("mobilefacenet_tiny", "none")
    _randomize_batch_norm(model)
    pre, out = (t.numpy() for t in _pre_activation(model)(_images(model), training=False))
    np.testing.assert_array_equal(out, pre)
    assert np.any(out < 0)


def _soft_threshold_oracle(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.maximum(np.abs(x) - t, 0)


def test_soft_threshold_in_model_matches_numpy() -> None:
    model = _build("mobilefacenet_tiny", "soft_threshold")
    _randomize_batch_norm(model)
    t = np.linspace(0.1, 1.5, EMBEDDING_SIZE).astype(np.float32)
    model.get_layer("embedding").threshold.assign(t)
    pre, out = (v.numpy() for v in _pre_activation(model)(_images(model), training=False))
    inside = np.abs(pre) <= t
    assert inside.any() and (~inside).any()
    assert np.all(out[inside] == 0)
    np.testing.assert_allclose(out, _soft_threshold_oracle(pre, t), rtol=1e-6, atol=0)


def test_soft_threshold_layer() -> None:
    t = np.array([0.0, 0.5, 1.0], np.float32)
    layer = SoftThreshold(initial_threshold=0.25)
    layer.build((None, 3))
    np.testing.assert_array_equal(layer.threshold.numpy(), [0.25] * 3)
    layer.threshold.assign(t)
    # Values at exactly +-t must give exact zeros; the rest sign(x)(|x| - t).
    x = np.array([[0.0, 0.5, -1.0], [-0.3, -0.7, 2.5], [1e-3, 0.49, -0.999]], np.float32)
    x = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = layer(x)
    expected = _soft_threshold_oracle(x.numpy(), t)
    np.testing.assert_array_equal(y.numpy(), expected)
    assert np.all(y.numpy()[np.abs(x.numpy()) <= t] == 0)
    # dy/dx is 1 on active entries, 0 elsewhere; dL/dt sums -sign(y).
    np.testing.assert_array_equal(tape.gradient(y, x).numpy(), (expected != 0).astype(np.float32))
    np.testing.assert_array_equal(tape.gradient(y, layer.threshold).numpy(),
                                  -np.sign(expected).sum(axis=0))


def test_soft_threshold_clips_negative_thresholds_and_validates() -> None:
    layer = SoftThreshold()
    layer.build((None, 2))
    # An optimizer that skips constraints can push t below 0; it must act as 0.
    layer.threshold.assign([-1.0, 0.5])
    x = np.array([[0.3, 0.3]], np.float32)
    np.testing.assert_array_equal(layer(x).numpy(), np.array([[0.3, 0.0]], np.float32))
    assert isinstance(layer.threshold.constraint, keras.constraints.NonNeg)
    config = SoftThreshold(initial_threshold=0.2, name="st").get_config()
    restored = SoftThreshold.from_config(config)
    assert restored.initial_threshold == 0.2 and restored.name == "st"
    for bad in (-0.1, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="initial_threshold"):
            SoftThreshold(initial_threshold=bad)


def test_embedding_block_validates_and_flattens() -> None:
    features = keras.Input((2, 2, 8))
    out = embedding_block(features, 4, "relu", name="emb")
    model = keras.Model(features, out)
    assert model.output_shape == (None, 4)
    assert model.get_layer("emb_dense").kernel.shape == (32, 4)
    with pytest.raises(ConfigError, match="soft_threshold"):
        embedding_block(features, 4, "sigmoid")
    with pytest.raises(ConfigError, match="embedding_size"):
        embedding_block(features, 0, "relu")


def test_mobilefacenet_matches_paper_size_and_cost() -> None:
    """Chen et al. (2018): 0.99M parameters and 221M MAdds at d = 128, 112x112 input."""
    model = MODELS.get("mobilefacenet")(embedding_size=128)
    assert model.input_shape == (None, 112, 112, 3)
    assert model.get_layer("gdconv_dw").output_shape == (None, 1, 1, 512)
    params, macs = count_params(model), count_macs(model)
    assert abs(params - 0.99e6) / 0.99e6 < 0.05, params
    assert abs(macs - 221e6) / 221e6 < 0.05, macs


def test_mobilefacenet_structure() -> None:
    model = MODELS.get("mobilefacenet")(embedding_size=128)
    adds = [layer for layer in model.layers if isinstance(layer, keras.layers.Add)]
    # Residuals where stride 1 and channels match: 4 + 0 + 6 + 0 + 2 blocks.
    assert len(adds) == 12
    prelus = [layer for layer in model.layers if isinstance(layer, keras.layers.PReLU)]
    assert all(layer.alpha.shape[:2] == (1, 1) for layer in prelus)
    # The last non-linearity is the head conv's PReLU: GDConv and projection are linear.
    names = [layer.name for layer in model.layers]
    assert names.index("head_prelu") < names.index("gdconv_dw")
    assert not any("prelu" in n for n in names[names.index("gdconv_dw"):])


@pytest.mark.parametrize(("width", "expected"), [(1.0, 64), (0.5, 32), (0.3, 24), (0.1, 8),
                                                 (0.2, 16), (1.3, 80)])
def test_scale_channels(width: float, expected: int) -> None:
    assert scale_channels(64, width) == expected


def test_width_scales_channels_in_multiples_of_eight() -> None:
    model = MODELS.get("mobilefacenet_tiny")(embedding_size=EMBEDDING_SIZE, width=0.3)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)
             and not isinstance(layer, keras.layers.DepthwiseConv2D)]
    assert all(layer.filters % 8 == 0 for layer in convs)
    assert count_params(model) < count_params(MODELS.get("mobilefacenet_tiny")(EMBEDDING_SIZE))


def test_build_model_uses_config() -> None:
    model = build_model(ModelConfig(name="mobilefacenet_tiny", embedding_size=24,
                                    final_activation="relu", input_size=48, width=0.5))
    assert model.name == "mobilefacenet_tiny"
    assert model.input_shape == (None, 48, 48, 3)
    assert model.output_shape == (None, 24)
    assert isinstance(model.get_layer("embedding"), keras.layers.ReLU)
    with pytest.raises(ConfigError, match="mobilefacenet_tiny"):
        build_model(ModelConfig(name="mobilefacenet_tni"))
    with pytest.raises(ConfigError, match="input_size"):
        build_model(ModelConfig(name="mobilefacenet_tiny", input_size=8))
    with pytest.raises(ConfigError, match="width"):
        build_model(ModelConfig(name="mobilefacenet_tiny", width=0.0))


def test_count_macs_and_params_of_a_hand_computed_model() -> None:
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False)(inputs)  # 4x4x4
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.DepthwiseConv2D(3, padding="valid", depth_multiplier=2)(x)  # 2x2x8
    x = keras.layers.SeparableConv2D(6, 1)(x)  # 2x2x6
    x = keras.layers.Conv2D(6, 1, groups=2)(x)  # 2x2x6
    x = keras.layers.Flatten()(x)
    dense = keras.layers.Dense(5)
    backbone = keras.Model(inputs, keras.layers.Add()([dense(x), dense(x * 2.0)]))
    macs = (16 * 27 * 4        # conv: 16 positions x 3x3x3 x 4
            + 4 * 9 * 4 * 2    # depthwise: 4 positions x 3x3 x 4 channels x multiplier 2
            + 4 * (8 + 8 * 6)  # separable: depthwise 1x1x8 + pointwise 8x6
            + 4 * 3 * 6        # grouped: 4 positions x (6 / 2 groups) inputs x 6
            + 2 * 24 * 5)      # dense, called twice
    assert count_macs(backbone) == macs
    # A backbone nested in another model (as in training) costs the same.
    images = keras.Input((8, 8, 3))
    assert count_macs(keras.Model(images, backbone(images))) == macs

    bn_params = 2 * 4  # gamma, beta; the moving statistics are not parameters
    params = 27 * 4 + bn_params + (9 * 8 + 8) + (8 + 48 + 6) + (18 + 6) + (24 * 5 + 5)
    assert count_params(backbone) == params
    assert backbone.count_params() == params + 2 * 4

    # Transposed convolution: every input position meets the whole kernel.
    small = keras.Input((4, 4, 2))
    upsample = keras.Model(small, keras.layers.Conv2DTranspose(4, 3, strides=2)(small))
    assert count_macs(upsample) == 16 * 3 * 3 * 2 * 4


def test_count_macs_needs_a_defined_input_size() -> None:
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs))
    with pytest.raises(ValueError, match="not fully defined"):
        count_macs(model)


# TensorFlow's native libraries log to stderr when they load (before Python
# runs any of our code); those lines are not the program's output.
_NATIVE_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IWEF]\d{4} )")


def _program_stderr(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not _NATIVE_LOG.match(line)]


def test_cli_prints_params_and_macs() -> None:
    proc = run_module("sparse_embed.models", "mobilefacenet_tiny", "--embedding_size=24",
                      "--final_activation=soft_threshold", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout)
    model = MODELS.get("mobilefacenet_tiny")(embedding_size=24, final_activation="soft_threshold")
    assert row == {"model": "mobilefacenet_tiny", "params": count_params(model),
                   "macs": count_macs(model), "embedding_size": 24, "input_size": 32}

    table = run_module("sparse_embed.models", "mobilefacenet_tiny", "--input_size=64")
    assert table.returncode == 0, table.stderr[-3000:]
    model = MODELS.get("mobilefacenet_tiny")(input_size=64)
    assert f"{count_macs(model):,}" in table.stdout
    assert f"{count_params(model):,}" in table.stdout


def test_cli_unknown_model_is_a_one_line_user_error() -> None:
    proc = run_module("sparse_embed.models", "mobilefacenet_small")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = _program_stderr(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert all(name in lines[0] for name in MODELS.names())
    assert proc.stdout == ""
