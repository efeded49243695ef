"""Tests of sparse_embed.models: every registered model, the embedding layer, the profiler."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import re

import numpy as np
import pytest
from conftest import call_main, run_module

from sparse_embed.config import ModelConfig
from sparse_embed.errors import ConfigError
from sparse_embed.keras import keras, tf
from sparse_embed.models import MODELS, build_model
from sparse_embed.models.__main__ import main as models_main
from sparse_embed.models.common import SE_BACKBONES
from sparse_embed.models.embedding import ACTIVATIONS, SoftThreshold, embedding_block
from sparse_embed.models.iresnet import (
    IRESNET34,
    IRESNET50,
    IRESNET100,
    IRESNET_TINY,
    IResNetSpec,
    build_iresnet,
)
from sparse_embed.models.mobilefacenet import scale_channels
from sparse_embed.models.mobilenet_v2 import MOBILENET_V2, imagenet_classifier
from sparse_embed.models.profile import count_macs, count_params, measure_latency

pytestmark = pytest.mark.unit

EMBEDDING_SIZE = 16
BATCH = 2
TINY = [name for name in MODELS.names() if name.endswith("_tiny")]
FULL = [name for name in MODELS.names() if not name.endswith("_tiny")]
# Full-size networks too deep to build, save, reload and convert quickly even
# at a reduced width (20-60 s each): they share every line of code with their
# family's tiny variant and iresnet18, which are checked, and their size is
# pinned by the size tests below. Every other registered model is checked.
DEEP = {"iresnet34", "iresnet50", "iresnet100", "faceresnet"}
CHECKED = [name for name in MODELS.names() if name not in DEEP]
# Inputs of full-size entries in the contract tests; 32x32 unless the
# architecture takes only its published sizes.
SMALL_INPUTS = {"sphereface20": {}}


def _small_kwargs(name: str) -> dict:
    # Tiny entries are small by their defaults; a full-size entry is checked at
    # a reduced input and width so the suite stays fast on CPU (its real size
    # is pinned by the parameter / MAC tests below).
    if name.endswith("_tiny"):
        return {}
    return {"width": 0.25, **SMALL_INPUTS.get(name, {"input_size": 32})}


def _build(name: str, final_activation: str = "none", **kwargs) -> keras.Model:
    keras.utils.set_random_seed(0)
    return MODELS.get(name)(embedding_size=EMBEDDING_SIZE, final_activation=final_activation,
                            **{**_small_kwargs(name), **kwargs})


def _images(model: keras.Model, seed: int = 0) -> np.ndarray:
    height, width = model.input_shape[1:3]
    return np.random.default_rng(seed).uniform(-1, 1, (BATCH, height, width, 3)).astype(np.float32)


def _randomize_batch_norm(model: keras.Model, seed: int = 0) -> None:
    """Gives every BN non-trivial statistics, so inference-mode checks see real values."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.1, n).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype(np.float32))


@pytest.mark.integration
@pytest.mark.parametrize("name", CHECKED)
def test_model_contract(name: str, tmp_path) -> None:
    """Every registered model: shapes, finite outputs, a gradient on every weight,
    config round trip, save and reload without custom objects."""
    # soft_threshold: its threshold is a trainable weight too, and a custom layer to reload.
    model = _build(name, "soft_threshold")
    assert model.name == name
    height, width = model.input_shape[1:3]
    assert model.input_shape == (None, height, width, 3)
    assert model.output_shape == (None, EMBEDDING_SIZE)
    images = _images(model)

    with tf.GradientTape() as tape:
        out = model(images, training=True)
        loss = tf.reduce_sum(tf.square(out))
    assert out.dtype == tf.float32 and out.shape == (BATCH, EMBEDDING_SIZE)
    assert np.all(np.isfinite(out.numpy()))
    grads = tape.gradient(loss, model.trainable_weights)
    missing = [w.name for w, g in zip(model.trainable_weights, grads, strict=True) if g is None]
    assert not missing
    assert any(float(tf.reduce_max(tf.abs(g))) > 0 for g in grads)

    _randomize_batch_norm(model)
    expected = model(images, training=False).numpy()
    assert expected.shape == (BATCH, EMBEDDING_SIZE) and np.all(np.isfinite(expected))
    clone = keras.Model.from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    clone.set_weights(model.get_weights())
    np.testing.assert_array_equal(clone(images, training=False).numpy(), expected)

    path = tmp_path / f"{name}.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert isinstance(reloaded.get_layer("embedding"), SoftThreshold)
    np.testing.assert_array_equal(reloaded(images, training=False).numpy(), expected)


@pytest.mark.parametrize("final_activation", ACTIVATIONS.names())
@pytest.mark.parametrize("name", TINY)
def test_output_shape_and_finite(name: str, final_activation: str) -> None:
    model = _build(name, final_activation)
    assert model.output_shape == (None, EMBEDDING_SIZE)
    for training in (False, True):
        out = model(_images(model), training=training)
        assert out.dtype == tf.float32
        assert out.shape == (BATCH, EMBEDDING_SIZE)
        assert np.all(np.isfinite(out.numpy()))


# Conversion takes ~10 s for a tiny model and ~20 s for a full-size one even
# at a reduced size: every family converts through its tiny variant (the same
# layers); `make bench-tflite` converts and runs the full-size models.
@pytest.mark.integration
@pytest.mark.parametrize("name", [name for name in CHECKED if name.endswith("_tiny")])
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


CONTRACT_ARGS = ("embedding_size", "final_activation", "input_size", "width", "input_width",
                 "dropout", "se")


def test_build_model_passes_every_model_field() -> None:
    fields = {field.name for field in dataclasses.fields(ModelConfig)}
    # `distribution` is build_model's own: it adds the extra head around any backbone.
    assert fields - {"name", "distribution"} == set(CONTRACT_ARGS)


@pytest.mark.parametrize("name", MODELS.names())
def test_every_builder_takes_the_same_arguments(name: str) -> None:
    parameters = inspect.signature(MODELS.get(name)).parameters
    assert tuple(parameters) == CONTRACT_ARGS
    assert all(p.default is not inspect.Parameter.empty for p in parameters.values())
    assert parameters["final_activation"].default == "none"
    assert parameters["width"].default == 1.0 and parameters["dropout"].default == 0.0
    assert parameters["se"].default is False


@pytest.fixture
def no_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes building a model fail, so a test sees that an error came first."""
    def fail(*args, **kwargs):
        raise AssertionError("a layer was built before the arguments were checked")

    monkeypatch.setattr(keras, "Input", fail)


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.usefixtures("no_layers")
def test_bad_arguments_fail_before_any_layer_is_built(name: str) -> None:
    builder = MODELS.get(name)
    for field, value in (("width", 0.0), ("width", float("nan")), ("dropout", 1.0),
                         ("embedding_size", 0), ("input_width", -1), ("input_size", 2)):
        with pytest.raises(ConfigError, match=f"model.{field}"):
            builder(**{field: value})
    with pytest.raises(ConfigError, match="sigmoid.*none, relu, soft_threshold"):
        builder(final_activation="sigmoid")
    if name not in SE_BACKBONES:
        with pytest.raises(ConfigError, match=f"{name}.*{', '.join(SE_BACKBONES)}"):
            builder(se=True)


@pytest.mark.usefixtures("no_layers")
def test_sphereface20_names_the_sizes_it_takes() -> None:
    with pytest.raises(ConfigError, match=r"sphereface20 takes 112x96 .*, 112x112 .*input_size=32"):
        build_model(ModelConfig(name="sphereface20", input_size=32))
    with pytest.raises(ConfigError, match="112x96"):
        MODELS.get("sphereface20")(input_width=112 + 8)


def test_build_model_passes_input_width_dropout_and_se() -> None:
    model = build_model(ModelConfig(name="sphereface20", embedding_size=8, input_size=112,
                                    input_width=96, dropout=0.25, width=0.25))
    assert model.input_shape == (None, 112, 96, 3)
    assert model.get_layer("embedding_dropout").rate == 0.25
    assert model.get_layer("embedding_flatten").output_shape == (None, 7 * 6 * 128)
    square = build_model(ModelConfig(name="sphereface20_tiny", embedding_size=8, input_size=28))
    assert square.input_shape == (None, 28, 28, 3)
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in square.layers)

    plain = build_model(ModelConfig(name="mobilenet_v2_tiny", input_size=32))
    se = build_model(ModelConfig(name="mobilenet_v2_tiny", input_size=32, se=True))
    blocks = [layer for layer in se.layers if layer.name.endswith("_project_bn")]
    gates = [layer for layer in se.layers if isinstance(layer, keras.layers.Multiply)]
    assert len(gates) == len(blocks) == 7
    # Each SE module: C -> C // 8 -> C 1x1 convolutions with biases.
    extra = sum(2 * c * (c // 8) + c // 8 + c for c in (b.gamma.shape[0] for b in blocks))
    assert count_params(se) - count_params(plain) == extra
    with pytest.raises(ConfigError, match="iresnet_tiny.*mobilenet_v2"):
        build_model(ModelConfig(name="iresnet_tiny", se=True))


@functools.cache
def _size(name: str) -> tuple[int, int]:
    """(parameters, MACs) of a registered model at its defaults (the published size)."""
    model = MODELS.get(name)()
    return count_params(model), count_macs(model)


def _iresnet_closed_form(spec: IResNetSpec, size: int, d: int) -> tuple[int, int]:
    """(parameters, MACs) of an IResNet at width 1 on a square input, counted by hand.

    Parameters as `count_params` counts them: weights, BN gamma and beta, one
    PReLU slope per channel. MACs of the convolutions and the FC output layer.
    """
    prelu = spec.activation == "prelu"
    c = spec.stem_channels
    params = 9 * 3 * c + (2 * c + prelu * c if spec.stem_norm else 0)
    macs = size * size * 9 * 3 * c
    for blocks, out in zip(spec.blocks, spec.channels, strict=True):
        for j in range(blocks):
            half = size // 2 if j == 0 else size
            # bn1, conv1 (stride 1), bn2, activation, conv2 (the block's stride), bn3.
            params += 2 * c + 9 * c * out + 2 * out + prelu * out + 9 * out * out + 2 * out
            macs += size * size * 9 * c * out + half * half * 9 * out * out
            if j == 0:  # 1x1 strided shortcut conv + BN
                params += c * out + 2 * out
                macs += half * half * c * out
            size, c = half, out
    fc = size * size * c * d
    return params + 2 * c + fc + 2 * d, macs + fc  # output BN; FC; embedding BN


def test_iresnet_closed_form_matches_the_built_model() -> None:
    model = MODELS.get("iresnet_tiny")(embedding_size=EMBEDDING_SIZE)
    assert (count_params(model), count_macs(model)) == _iresnet_closed_form(
        IRESNET_TINY, model.input_shape[1], EMBEDDING_SIZE)


@pytest.mark.parametrize(("spec", "params", "gflops"), [
    (IRESNET34, 34.1e6, 8.934),
    (IRESNET50, 43.6e6, 12.637),
    (IRESNET100, 65.1e6, 24.209),
])
def test_iresnet_matches_insightface_size_and_cost(spec: IResNetSpec, params: float,
                                                   gflops: float) -> None:
    """Within 0.2% of InsightFace arcface_torch at 112x112, d = 512 (its FLOPs are 2 x MACs).

    Counted in closed form, which equals the built iresnet_tiny here and the
    built iresnet100 in the faceresnet test, so no deep network is built.
    """
    measured_params, macs = _iresnet_closed_form(spec, 112, 512)
    assert abs(measured_params - params) / params < 0.002, measured_params
    assert abs(2 * macs - gflops * 1e9) / (gflops * 1e9) < 0.002, macs


@pytest.mark.integration
def test_faceresnet_is_iresnet100_with_relu_and_a_bare_stem() -> None:
    """Same convolutions, hence the same MACs; fewer parameters by exactly the PReLU
    slopes (one per channel: stem and one per block) and the stem BN (gamma, beta)."""
    params, macs = _size("faceresnet")
    r100_params, r100_macs = _size("iresnet100")
    assert (r100_params, r100_macs) == _iresnet_closed_form(IRESNET100, 112, 512)
    assert macs == r100_macs
    blocks, channels = (3, 13, 30, 3), (64, 128, 256, 512)
    slopes = 64 + sum(n * c for n, c in zip(blocks, channels, strict=True))
    assert r100_params - params == slopes + 2 * 64


def test_iresnet_block_structure() -> None:
    """Stride on the second convolution, symmetric padding, shortcut convs where the shape changes."""
    keras.utils.set_random_seed(0)
    model = MODELS.get("iresnet_tiny")(embedding_size=EMBEDDING_SIZE)
    assert model.get_layer("stage1_block1_conv1").output_shape == (None, 32, 32, 8)
    assert model.get_layer("stage1_block1_conv2").output_shape == (None, 16, 16, 8)
    assert model.get_layer("stage1_block1_conv2_pad").padding == ((1, 1), (1, 1))
    shortcuts = [layer.name for layer in model.layers if layer.name.endswith("_shortcut_conv")]
    assert shortcuts == [f"stage{i}_block1_shortcut_conv" for i in range(1, 5)]
    assert model.get_layer("embedding_flatten").output_shape == (None, 2 * 2 * 64)
    assert isinstance(model.get_layer("stem_prelu"), keras.layers.PReLU)

    relu = build_iresnet(IResNetSpec(blocks=(2, 1), channels=(8, 16), stem_channels=8,
                                     activation="relu", stem_norm=False),
                         "faceresnet_like", EMBEDDING_SIZE, "none", 16, 1.0)
    names = [layer.name for layer in relu.layers]
    assert "stem_bn" not in names and not any(isinstance(layer, keras.layers.PReLU)
                                              for layer in relu.layers)
    assert "stage1_block2_shortcut_conv" not in names
    assert isinstance(relu.get_layer("stage1_block2_relu"), keras.layers.ReLU)


def _sphereface_closed_form(height: int, width: int, d: int) -> tuple[int, int]:
    params = macs = 0
    channels_in = 3
    for units, c in zip((1, 2, 4, 1), (64, 128, 256, 512), strict=True):
        height, width = (height + 1) // 2, (width + 1) // 2
        # Strided conv (weights + bias) + PReLU, then 2 convs (no bias) + PReLU per unit.
        params += 9 * channels_in * c + c + c + units * 2 * (9 * c * c + c)
        macs += height * width * (9 * channels_in * c + units * 2 * 9 * c * c)
        channels_in = c
    fc = height * width * 512 * d
    return params + fc + 2 * d, macs + fc  # + the embedding BN's gamma and beta


def test_sphereface20_matches_published_size_and_cost() -> None:
    """MLPerf edge (SphereFace-20, 112x96): 21.6M parameters, 1.75 GMACs.

    We measure 22.67M: 21.6M is that count in units of 2^20, and within 5% of
    it in units of 10^6 too; our embedding layer adds a 1024-parameter BN.
    """
    params, macs = _size("sphereface20")
    assert (params, macs) == _sphereface_closed_form(112, 96, 512)
    assert abs(params - 21.6e6) / 21.6e6 < 0.05, params
    assert abs(params - 21.6 * 2**20) / (21.6 * 2**20) < 0.005, params
    assert abs(macs - 1.75e9) / 1.75e9 < 0.05, macs
    model = MODELS.get("sphereface20")(width=0.25, input_width=112)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) and layer.name != "embedding_bn"
                   for layer in model.layers)
    assert sum(isinstance(layer, keras.layers.Add) for layer in model.layers) == 1 + 2 + 4 + 1


def test_nin_matches_closed_form() -> None:
    """32x32, d = 64: mlpconv blocks (conv5x5 192, 160, 96 | 5x5 192, 192, 192 | 3x3 192, 192)."""
    convs = [  # (positions, kernel, in, out); every conv has a bias
        (32 * 32, 25, 3, 192), (32 * 32, 1, 192, 160), (32 * 32, 1, 160, 96),
        (16 * 16, 25, 96, 192), (16 * 16, 1, 192, 192), (16 * 16, 1, 192, 192),
        (8 * 8, 9, 192, 192), (8 * 8, 1, 192, 192),
    ]
    params = sum(k * i * o + o for _, k, i, o in convs) + 192 * 64 + 2 * 64
    macs = sum(p * k * i * o for p, k, i, o in convs) + 192 * 64
    assert _size("nin") == (params, macs)


# keras.applications.MobileNetV2(weights=None, alpha=width).count_params() at every
# published width (tf_keras 2.x; BN statistics included).
KERAS_MOBILENET_V2_PARAMS = {0.35: 1_691_208, 0.5: 1_987_224, 0.75: 2_663_064, 1.0: 3_538_984,
                             1.3: 5_431_048, 1.4: 6_156_712}


def _mobilenet_v2_closed_form(width: float) -> int:
    """Keras' count of `imagenet_classifier(width)`, by hand from the stage table and the width rule."""
    c = scale_channels(32 * width)
    params = 27 * c + 4 * c  # stem conv + BN (gamma, beta, moving mean and variance)
    for stage in MOBILENET_V2.stages:
        out = scale_channels(int(stage.channels * width))
        for _ in range(stage.repeats):
            hidden = stage.expansion * c
            if stage.expansion != 1:
                params += c * hidden + 4 * hidden
            params += 9 * hidden + 4 * hidden + hidden * out + 4 * out
            c = out
    head = scale_channels(1280 * width) if width > 1 else 1280
    return params + c * head + 4 * head + head * 1000 + 1000


@pytest.mark.parametrize("width", sorted(KERAS_MOBILENET_V2_PARAMS))
def test_mobilenet_v2_width_rule_gives_keras_parameter_count(width: float) -> None:
    """Exact at every published width; the test below pins the closed form to the built models."""
    assert _mobilenet_v2_closed_form(width) == KERAS_MOBILENET_V2_PARAMS[width]


@pytest.mark.integration
@pytest.mark.parametrize("width", [0.35, 1.4])  # rounding down and up; the head grows past 1
def test_mobilenet_v2_imagenet_variant_has_keras_parameter_count(width: float) -> None:
    ours = imagenet_classifier(width=width)
    reference = keras.applications.MobileNetV2(weights=None, alpha=width)
    assert ours.count_params() == reference.count_params() == _mobilenet_v2_closed_form(width)
    assert count_params(ours) == count_params(reference)


@pytest.mark.integration
def test_mobilenet_v2_face_variant_is_the_imagenet_trunk_with_a_gdconv_head() -> None:
    d = 512
    classifier = imagenet_classifier()
    assert classifier.count_params() == KERAS_MOBILENET_V2_PARAMS[1.0]
    # Sandler et al. (2018), Table 4: 300M multiply-adds at 224x224.
    assert abs(count_macs(classifier) - 300e6) / 300e6 < 0.05
    trunk = count_params(classifier) - (1280 * 1000 + 1000)
    model = MODELS.get("mobilenet_v2")(embedding_size=d)
    assert model.get_layer("gdconv_dw").input_shape == (None, 4, 4, 1280)
    # GDConv 4x4 depthwise + its BN, the linear projection + the embedding BN.
    assert count_params(model) == trunk + 1280 * 16 + 2 * 1280 + 1280 * d + 2 * d


def test_measure_latency_runs_the_model() -> None:
    model = _build("nin_tiny")
    latency = measure_latency(model, runs=2, warmup=1)
    assert np.isfinite(latency) and latency > 0
    with pytest.raises(ValueError, match="runs"):
        measure_latency(model, runs=0)


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


@pytest.mark.integration
def test_cli_prints_params_and_macs(capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (main(argv)); the command runs as a process in the test below."""
    capsys.readouterr()
    code = call_main(models_main, "mobilefacenet_tiny", "--embedding_size=24",
                     "--final_activation=soft_threshold", "--json")
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    row = json.loads(out)
    model = MODELS.get("mobilefacenet_tiny")(embedding_size=24, final_activation="soft_threshold")
    assert row == {"model": "mobilefacenet_tiny", "params": count_params(model),
                   "macs": count_macs(model), "embedding_size": 24, "input_size": 32,
                   "input_width": 32}

    code = call_main(models_main, "mobilefacenet_tiny", "--input_size=64")
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    model = MODELS.get("mobilefacenet_tiny")(input_size=64)
    assert f"{count_macs(model):,}" in out
    assert f"{count_params(model):,}" in out


@pytest.mark.slow
def test_cli_all_prints_every_full_size_model(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "models.json"
    proc = run_module("sparse_embed.models", "--all", "--json", "--repeats=1", f"--output={output}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()[:-1]]
    assert proc.stdout.splitlines()[-1] == f"wrote {output}"
    assert [row["model"] for row in rows] == FULL
    result = json.loads(output.read_text())
    assert result["command"].startswith("python -m sparse_embed.models --all")
    assert [{k: r[k] for k in rows[0]} for r in result["tables"]["models"]["rows"]] == rows
    by_name = {row["model"]: row for row in rows}
    for name in ("nin", "sphereface20"):
        assert (by_name[name]["params"], by_name[name]["macs"]) == _size(name)
    assert all(row["latency_ms"] > 0 for row in rows)

    # The usage errors in this process (main(argv)).
    capsys.readouterr()
    code = call_main(models_main, "--all", "nin")
    assert code != 0 and "--all takes no model name" in capsys.readouterr().err
    code = call_main(models_main, "nin", f"--output={output}")
    assert code == 2 and "--output needs --all" in capsys.readouterr().err


def test_cli_unknown_model_is_a_one_line_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (main(argv)): TensorFlow's load-time lines are long gone."""
    capsys.readouterr()
    code = call_main(models_main, "mobilefacenet_small")
    out, err = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in err
    lines = _program_stderr(err)
    assert len(lines) == 1, err
    assert all(name in lines[0] for name in MODELS.names())
    assert out == ""
