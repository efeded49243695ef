"""Compression during training: QAT (8-bit, n-bit), pruning (unstructured, 2:4), PQAT, init_from, resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_main_user_error, op_determinism, scalars

from sparse_embed import compression
from sparse_embed.checkpoints import CHECKPOINT_DIR, checkpoint_for
from sparse_embed.compression import prune, quantize
from sparse_embed.config import load_config
from sparse_embed.errors import ConfigError, DataError
from sparse_embed.inference import load_backbone
from sparse_embed.keras import keras, tf
from sparse_embed.models import build_model
from sparse_embed.models.embedding import SoftThreshold
from sparse_embed.train import main as train_main
from sparse_embed.training.trainer import build_networks, train

pytestmark = pytest.mark.unit

SMOKE = ["data.augment=false", "train.batch_size=8", "train.log_every=5", "train.checkpoint_every=5"]
# Pruning from step 0 to 50% at step 6, masks recomputed every 2 steps.
PRUNE = ["compression.type=prune", "compression.target_sparsity=0.5", "compression.end_step=6",
         "compression.frequency=2"]


def _images(n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32)


def _kernels(model: keras.Model) -> dict[str, np.ndarray]:
    """Conv2D and Dense kernels by layer name (the layers pruning acts on)."""
    return {layer.name: layer.kernel.numpy() for layer in model.layers
            if type(layer) in (keras.layers.Conv2D, keras.layers.Dense)}


@pytest.fixture(scope="module")
def runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A dense run, a pruned run started from it, PQAT from the pruned run, QAT from the dense run.

    The pruned run is the straight run that test_pruning_resumes_exactly compares its resumed
    run with bit for bit: both train under op determinism."""
    root = tmp_path_factory.mktemp("compression_runs")
    dirs = {name: root / name for name in ("dense", "prune", "pqat", "qat")}
    train(load_config("smoke", SMOKE + ["train.steps=10"]), tiny_data, dirs["dense"], verbose=0)
    with op_determinism():
        train(load_config("smoke", SMOKE + PRUNE + ["train.steps=10", f"train.init_from={dirs['dense']}"]),
              tiny_data, dirs["prune"], verbose=0)
    train(load_config("smoke", SMOKE + ["compression.type=prune_qat", "train.steps=3",
                                        f"train.init_from={dirs['prune']}"]),
          tiny_data, dirs["pqat"], verbose=0)
    train(load_config("smoke", SMOKE + ["compression.type=qat", "train.steps=3",
                                        f"train.init_from={dirs['dense']}"]),
          tiny_data, dirs["qat"], verbose=0)
    return dirs


@pytest.mark.parametrize("final_activation", ["relu", "soft_threshold", "none"])
def test_folding_the_embedding_bn_is_exact(final_activation: str) -> None:
    config = load_config("smoke", [f"model.final_activation={final_activation}"])
    backbone = build_model(config.model)
    bn = backbone.get_layer("embedding_bn")
    rs = np.random.RandomState(1)
    d = bn.moving_mean.shape[0]
    # Statistics far from the initial ones, so a wrong fold cannot pass.
    bn.set_weights([rs.uniform(0.5, 2, d), rs.normal(0, 0.3, d), rs.normal(0, 0.3, d),
                    rs.uniform(0.5, 2, d)])
    if final_activation == "soft_threshold":
        backbone.get_layer("embedding").set_weights([rs.uniform(0, 0.3, d)])
    folded = quantize.fold_embedding(backbone)
    x = _images()
    # Exact up to float32 rounding: the outputs are about 1, the differences a few ulps (1.2e-7 seen).
    np.testing.assert_allclose(folded(x, training=False), backbone(x, training=False), rtol=0, atol=1e-6)
    assert folded.output_shape == backbone.output_shape
    assert "embedding_bn" not in [layer.name for layer in folded.layers]
    dense = folded.get_layer("embedding_dense" if final_activation == "soft_threshold" else "embedding")
    assert isinstance(dense, keras.layers.Dense) and dense.use_bias
    assert dense.get_config()["activation"] == ("relu" if final_activation == "relu" else "linear")


def _wrapper(model: keras.Model, name: str) -> keras.layers.Layer:
    return model.get_layer(f"quant_{name}")


@pytest.mark.integration
def test_qat_fake_quantizes_prelu_and_the_folded_embedding() -> None:
    config = load_config("smoke", ["compression.type=qat"])
    backbone = build_model(config.model)
    qat = compression.compress(backbone, config.compression, 10)
    assert compression.is_quantized(qat) and not compression.is_quantized(backbone)
    prelus = [layer for layer in qat.layers if isinstance(getattr(layer, "layer", None), keras.layers.PReLU)]
    assert len(prelus) == sum(isinstance(layer, keras.layers.PReLU) for layer in backbone.layers) > 0
    for wrapper in prelus:
        assert isinstance(wrapper.quantize_config, quantize.OutputQuantizeConfig)
        assert wrapper._output_quantizers, wrapper.name
    embedding = _wrapper(qat, "embedding")
    assert isinstance(embedding.layer, keras.layers.Dense)
    # The kernel is fake-quantized, and the output (after the merged ReLU) too.
    assert [w.name for w, _, _ in embedding._weight_vars] and embedding._quantize_activations
    assert compression.for_export(qat) is qat


@pytest.mark.integration
def test_soft_threshold_keeps_its_zeros_under_qat() -> None:
    config = load_config("smoke", ["model.final_activation=soft_threshold", "compression.type=qat"])
    qat = compression.compress(build_model(config.model), config.compression, 10)
    wrapper = _wrapper(qat, "embedding")
    assert isinstance(wrapper.layer, SoftThreshold) and wrapper._output_quantizers
    wrapper.layer.threshold.assign(tf.fill(wrapper.layer.threshold.shape, 0.5))
    e = qat(_images(), training=True).numpy()
    assert 0 < np.mean(e == 0) < 1


@pytest.mark.integration
def test_n_bit_qat_builds_and_trains_a_step() -> None:
    config = load_config("smoke", ["compression.type=qat", "compression.bits=4",
                                   "compression.activation_bits=6"])
    qat = compression.compress(build_model(config.model), config.compression, 10)
    kernel_quantizer = _wrapper(qat, "embedding")._weight_vars[0][1]
    assert kernel_quantizer.num_bits == 4
    prelu = next(layer for layer in qat.layers
                 if isinstance(getattr(layer, "layer", None), keras.layers.PReLU))
    assert prelu._output_quantizers[0].num_bits == 6
    optimizer = keras.optimizers.SGD(0.01)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(qat(_images(), training=True)))
    before = [v.numpy() for v in qat.trainable_variables]
    grads = tape.gradient(loss, qat.trainable_variables)
    optimizer.apply_gradients(zip(grads, qat.trainable_variables, strict=True))
    assert np.isfinite(loss.numpy())
    assert any(not np.array_equal(a, v.numpy()) for a, v in zip(before, qat.trainable_variables, strict=True))


def _prune_once(overrides: list[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Prunes a fresh tiny MobileFaceNet by one mask update; returns (kernels before, after strip)."""
    config = load_config("smoke", ["compression.type=prune", "compression.schedule=constant",
                                   "compression.frequency=1", *overrides])
    backbone = build_model(config.model)
    before = _kernels(backbone)
    pruned = compression.compress(backbone, config.compression, 10)
    for wrapper in prune.wrappers(pruned):
        wrapper.pruning_step.assign(0)
    pruned(_images(), training=True)
    stripped = compression.for_export(pruned)
    assert not prune.has_pruning_wrappers(stripped)
    return before, _kernels(stripped)


@pytest.mark.integration
def test_pruning_reaches_the_target_on_the_smallest_weights() -> None:
    before, after = _prune_once(["compression.target_sparsity=0.5"])
    assert set(before) == set(after) and len(after) == 13  # 12 Conv2D and the embedding Dense
    for name, kernel in after.items():
        zeros = kernel == 0
        assert abs(zeros.sum() - round(0.5 * kernel.size)) <= 1, name
        # The pruned weights are the smallest in magnitude; the others are unchanged.
        magnitude = np.abs(before[name])
        assert magnitude[zeros].max() <= magnitude[~zeros].min(), name
        np.testing.assert_array_equal(kernel[~zeros], before[name][~zeros])


@pytest.mark.integration
def test_two_by_four_holds_in_every_group_of_four_input_channels() -> None:
    _, after = _prune_once(["compression.m_by_n=[2,4]"])
    checked = 0
    for name, kernel in after.items():
        # Input channels last: (out, kh, kw, in) for a convolution, (out, in) for a Dense.
        if kernel.shape[-2] % 4:
            continue  # the 3-channel stem: no whole groups of four
        groups = np.moveaxis(kernel, -1, 0).reshape(-1, 4)
        assert np.all((groups != 0).sum(axis=1) <= 2), name
        checked += 1
    assert checked == 12


@pytest.mark.slow
def test_pruned_run_and_tensorboard_sparsity(runs: dict[str, Path]) -> None:
    backbone, config = load_backbone(runs["prune"])
    assert prune.has_pruning_wrappers(backbone)
    stripped = compression.for_export(backbone)
    kernels = _kernels(stripped)
    zeros = sum(int((k == 0).sum()) for k in kernels.values())
    total = sum(k.size for k in kernels.values())
    assert abs(zeros / total - 0.5) < 0.01
    # Wrapped and stripped models embed the same.
    x = _images()
    np.testing.assert_allclose(backbone(x, training=False), stripped(x, training=False), atol=1e-6)
    assert config.compression.type == "prune"
    values = list(scalars(runs["prune"], "compress/weight_sparsity").values())
    assert values and values[-1] == pytest.approx(zeros / total, abs=1e-6)


@pytest.mark.slow
def test_pruning_resumes_exactly(tiny_data: Path, runs: dict[str, Path], tmp_path: Path) -> None:
    init = [f"train.init_from={runs['dense']}"]
    with op_determinism():
        first = train(load_config("smoke", SMOKE + PRUNE + init + ["train.steps=5"]), tiny_data,
                      tmp_path / "resumed", verbose=0)
        second = train(load_config("smoke", SMOKE + PRUNE + init + ["train.steps=10"]), tiny_data,
                       tmp_path / "resumed", verbose=0)
    assert (first.step, second.resumed_from, second.step) == (5, 5, 10)
    straight, _ = load_backbone(runs["prune"])
    resumed, _ = load_backbone(tmp_path / "resumed")
    for a, b in zip(prune.wrappers(straight), prune.wrappers(resumed), strict=True):
        assert int(a.pruning_step.numpy()) == int(b.pruning_step.numpy()) == 10
        for (wa, ma, _), (wb, mb, _) in zip(a.pruning_vars, b.pruning_vars, strict=True):
            np.testing.assert_array_equal(ma.numpy(), mb.numpy())
            np.testing.assert_array_equal(wa.numpy() * ma.numpy(), wb.numpy() * mb.numpy())


@pytest.mark.slow
def test_pqat_keeps_the_zeros_of_the_pruned_run(runs: dict[str, Path]) -> None:
    pruned = _kernels(compression.for_export(load_backbone(runs["prune"])[0]))
    pqat, _ = load_backbone(runs["pqat"])
    assert compression.is_quantized(pqat) and quantize.preserves_sparsity(pqat)
    for name, kernel in pruned.items():
        wrapper = pqat.get_layer(f"quant_{name}" if name != "embedding_dense" else "quant_embedding")
        (weight, _, quantizer_vars), = wrapper._weight_vars
        trained = weight.numpy()
        zeros = kernel == 0
        assert zeros.mean() > 0.4, name
        assert np.all(trained[zeros] == 0), name
        # The masks of the rebuilt model come from the restored weights.
        np.testing.assert_array_equal(quantizer_vars["sparsity_mask"].numpy(),
                                      (trained != 0).astype(np.float32))


@pytest.mark.slow
def test_qat_run_trains_from_the_dense_run(runs: dict[str, Path]) -> None:
    qat, config = load_backbone(runs["qat"])
    assert compression.is_quantized(qat) and config.train.init_from == str(runs["dense"])
    e = qat(_images(), training=False).numpy()
    assert np.all(np.isfinite(e)) and np.all(e >= 0)


@pytest.mark.slow
def test_init_from_restores_backbone_and_head(runs: dict[str, Path]) -> None:
    from sparse_embed.training.trainer import check_init_run, initialize_from

    config = load_config("smoke", SMOKE + [f"train.init_from={runs['dense']}"])
    source, source_head = build_networks(config, 8)
    latest = tf.train.latest_checkpoint(str(runs["dense"] / CHECKPOINT_DIR))
    checkpoint_for(source, source_head).restore(latest).expect_partial()
    backbone, head = build_networks(config, 8)
    restored = initialize_from(backbone, head, config, check_init_run(config))
    for a, b in zip(source.weights + source_head.weights, restored.weights + head.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Another class count: the backbone still comes, the head starts from scratch.
    backbone, head = build_networks(config, 5)
    fresh = [w.numpy() for w in head.weights]
    restored = initialize_from(backbone, head, config, check_init_run(config))
    np.testing.assert_array_equal(restored.weights[0].numpy(), source.weights[0].numpy())
    for a, b in zip(fresh, head.weights, strict=True):
        np.testing.assert_array_equal(a, b.numpy())


@pytest.mark.slow
def test_bad_compression_input(tiny_data: Path, runs: dict[str, Path], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.yaml not found"):
        train(load_config("smoke", SMOKE + [f"train.init_from={tmp_path / 'empty'}"]), tiny_data,
              tmp_path / "a", verbose=0)
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    (untrained / "config.yaml").write_text((runs["dense"] / "config.yaml").read_text())
    with pytest.raises(DataError, match="has no checkpoint"):
        train(load_config("smoke", SMOKE + [f"train.init_from={untrained}"]), tiny_data,
              tmp_path / "b", verbose=0)
    with pytest.raises(ConfigError, match=r"model.embedding_size=32 \(init run: 64\)"):
        train(load_config("smoke", SMOKE + ["model.embedding_size=32", f"train.init_from={runs['dense']}"]),
              tiny_data, tmp_path / "c", verbose=0)
    for kind in ("qat", "prune"):
        with pytest.raises(ConfigError, match=f"compression.type={kind} cannot run with train.mixed"):
            train(load_config("smoke", SMOKE + [f"compression.type={kind}", "train.mixed_precision=true"]),
                  tiny_data, tmp_path / "d", verbose=0)
    with pytest.raises(ConfigError, match="needs a pruned run"):
        train(load_config("smoke", SMOKE + ["compression.type=prune_qat",
                                            f"train.init_from={runs['dense']}"]),
              tiny_data, tmp_path / "e", verbose=0)
    with pytest.raises(ConfigError, match="cannot start another"):
        train(load_config("smoke", SMOKE + [f"train.init_from={runs['qat']}"]), tiny_data,
              tmp_path / "f", verbose=0)
    bad = dataclasses.replace(load_config("smoke").compression, type="prune", m_by_n=(4, 2))
    with pytest.raises(ConfigError, match="m < n"):
        compression.compress(build_model(load_config("smoke").model), bad, 10)
    assert_main_user_error(capsys, train_main, [f"--data_dir={tiny_data}", f"--model_dir={tmp_path / 'g'}",
                                                f"--init_from={untrained}"],
                           "has no checkpoint", str(untrained))


# tf.distribute needs its logical CPUs before TensorFlow starts, and a second strategy in the
# same process would reuse the first one's collective instance keys: one process per run.
_MIRRORED_SCRIPT = """
import json, sys
from pathlib import Path
from sparse_embed.keras import tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from sparse_embed import compression
from sparse_embed.config import load_config
from sparse_embed.inference import load_backbone
from sparse_embed.training.trainer import train
data, out, *settings = sys.argv[1:]
for name, extra in (("prune", ["compression.type=prune", "compression.target_sparsity=0.5",
                               "compression.end_step=4", "compression.frequency=2"]),
                    ("qat", ["compression.type=qat"])):
    model_dir = Path(out) / name
    result = train(load_config("smoke", settings + extra), data, model_dir, verbose=0)
    backbone, config = load_backbone(model_dir)
    kernels = [v.numpy() for v in compression.for_export(backbone).weights
               if v.name.endswith("/kernel:0")]
    print(json.dumps({"run": name, "step": result.step, "strategy": config.distributed.backend,
                      "quantized": compression.is_quantized(backbone),
                      "zeros": sum(float((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels)}))
"""


@pytest.mark.slow
def test_pruning_and_qat_under_mirrored_strategy(tiny_data: Path, runs: dict[str, Path],
                                                 tmp_path: Path) -> None:
    """tf.distribute on 2 logical CPUs: pruning reaches its target, QAT trains (TF-MOT allows both).
    Both train in one process, as an experiment's seeds or trials do: the second training's
    strategy must not reuse the first one's collectives."""
    import json

    from conftest import run_module_script

    script = tmp_path / "mirrored.py"
    script.write_text(_MIRRORED_SCRIPT)
    mirrored = SMOKE + ["distributed.backend=mirrored", "train.steps=6", f"train.init_from={runs['dense']}"]
    proc = run_module_script(str(script), str(tiny_data), str(tmp_path), *mirrored)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {row["run"]: row for row in map(json.loads, proc.stdout.strip().splitlines()[-2:])}
    assert out["prune"]["step"] == out["qat"]["step"] == 6
    assert out["prune"]["strategy"] == out["qat"]["strategy"] == "mirrored"
    assert out["prune"]["zeros"] == pytest.approx(0.5, abs=0.01)
    assert out["qat"]["quantized"] and out["qat"]["zeros"] < 0.01
