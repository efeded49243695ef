"""The probabilistic methods train in the suite: each registered method a few steps on tiny data,
its confidence output, the gradient of its extra head, two-stage runs from a deterministic one,
and the one-line errors of a method with the wrong distribution, sampler or no init run."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import assert_main_user_error, scalars

from sparse_embed.checkpoints import CHECKPOINT_DIR, variable_key
from sparse_embed.config import Config, config_to_dict, load_config
from sparse_embed.heads import HEADS
from sparse_embed.inference import confidence_function, embedding_function, load_backbone
from sparse_embed.keras import tf
from sparse_embed.models.embedding import EXTRA_LAYER, mean_network
from sparse_embed.train import main as train_main
from sparse_embed.training import trainer
from sparse_embed.training.trainer import TrainResult, train

pytestmark = pytest.mark.integration

METHODS = ["dsml", "dul_cls", "dul_reg", "hib", "pfe", "scf", "spe", "vmf_fl", "vmf_loss"]
# The smoke config's FLOPs-regularised ReLU embedding on the smallest backbone: 16-d, 16x16 input.
MODEL = ["model.name=nin_tiny", "model.input_size=16", "model.embedding_size=16"]
# Two steps of batch 8, a checkpoint after each (4 classes x 2 images where a method needs
# class-balanced batches); two samples where a method draws them.
TINY = [*MODEL, "train.steps=2", "train.batch_size=8", "train.checkpoint_every=1", "data.augment=false"]
BALANCED = ["data.sampler=p_k", "data.classes_per_batch=4", "data.samples_per_class=2"]
SAMPLES = {"hib": 2, "spe": 2, "vmf_loss": 2}
# One method also verifies the run's pairs during training (with the means' cosine).
EVALUATED = "vmf_fl"


def _yaml(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def method_overrides(name: str, init_run: Path) -> list[str]:
    """The overrides of the smoke config that train method `name` on `TINY`: its distribution,
    its sampler, and for a two-stage method the deterministic run it starts from, with the backbone
    and the embedding layer frozen (the reference's PFE and SCF stage 2)."""
    params = HEADS.get(name)
    overrides = [*TINY, f"head.name={name}"]
    overrides += [f"model.distribution.{k}={_yaml(v)}" for k, v in params.distribution.items()]
    if name in SAMPLES:
        overrides.append(f"head.params.num_samples={SAMPLES[name]}")
    if params.balanced:
        overrides += BALANCED
    if name == EVALUATED:
        overrides.append("eval.every_steps=2")
    if params.two_stage:
        overrides += [f"train.init_from={init_run}", "train.freeze=[backbone, embedding]"]
    return overrides


@pytest.fixture(scope="module")
def init_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The deterministic run (ArcFace, a point per image) the two-stage methods start from."""
    out = tmp_path_factory.mktemp("pe_init") / "run"
    train(load_config("smoke", TINY), tiny_data, out, verbose=0)
    return out


@pytest.fixture(scope="module")
def method_run(tiny_data: Path, init_run: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Callable[[str], tuple[Config, TrainResult, Path]]:
    """Trains a method once per module: name -> (config, result, run directory)."""
    runs: dict[str, tuple[Config, TrainResult, Path]] = {}

    def get(name: str) -> tuple[Config, TrainResult, Path]:
        if name not in runs:
            config = load_config("smoke", method_overrides(name, init_run))
            out = tmp_path_factory.mktemp(f"pe_{name}") / "run"
            runs[name] = config, train(config, tiny_data, out, verbose=0), out
        return runs[name]

    return get


def _checkpoint(run: Path, step: int) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(run / CHECKPOINT_DIR / f"ckpt-{step}"))
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
            if key.startswith(("backbone/", "head/")) and "OPTIMIZER_SLOT" not in key}


def test_every_method_is_covered() -> None:
    probabilistic = [n for n in HEADS.names() if HEADS.get(n).builder.startswith("probabilistic.")]
    assert sorted(probabilistic) == METHODS


@pytest.mark.parametrize("name", METHODS)
def test_method_trains_and_gives_a_confidence(name: str, method_run: Callable) -> None:
    """Two steps keep the loss finite and the second changes the weights; the run records its
    distribution and head parameters; the trained backbone's embedding is the normalised mean and
    its confidence is finite; the head's loss has a non-zero gradient at the extra head."""
    config, result, run = method_run(name)
    distribution = config.model.distribution.build(config.model.embedding_size)
    assert result.step == 2 and np.isfinite(result.metrics["loss"]), result.metrics
    first, second = _checkpoint(run, 1), _checkpoint(run, 2)
    assert first.keys() == second.keys()
    assert any(not np.array_equal(first[k], second[k]) for k in first)

    if name == EVALUATED:
        assert 0 <= scalars(run, "eval/lfw/accuracy")[2] <= 1
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["distribution"] == config_to_dict(config)["model"]["distribution"]
    assert saved["head"]["params"] == dataclasses.asdict(config.head.params)

    model = result.model
    images = tf.random.stateless_uniform([8, 16, 16, 3], seed=(1, 2), minval=-1.0, maxval=1.0)
    embeddings = embedding_function(model.backbone)(images).numpy()
    assert embeddings.shape == (8, config.model.embedding_size)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    if distribution.has_confidence:
        assert np.isfinite(result.metrics["confidence"])
        confidence = confidence_function(model.backbone, distribution)(images).numpy()
        assert confidence.shape == (8,) and np.all(np.isfinite(confidence))

    # The gradient of the head's loss reaches the layer that predicts the extra parameters (the
    # embedding layer where the mean carries them: vMF-loss's kappa is its norm; DSML has none).
    labels = tf.constant([0, 0, 1, 1, 2, 2, 3, 3])
    layer = EXTRA_LAYER if distribution.num_parameters > distribution.dim else "embedding_dense"
    kernel = model.backbone.get_layer(layer).kernel
    with tf.GradientTape() as tape:
        loss, _ = model.head.loss_and_accuracy(model.backbone(images, training=True), labels, training=True)
    gradient = tape.gradient(loss, kernel)
    assert gradient is not None and np.all(np.isfinite(gradient.numpy()))
    assert np.any(gradient.numpy() != 0)


def test_two_stage_run_keeps_the_frozen_backbone_and_resumes_itself(
        method_run: Callable, init_run: Path, tiny_data: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """PFE from the deterministic run with backbone and embedding frozen: every weight of the
    mean's network (batch-norm statistics included) stays the init run's, and only the extra head
    trains. Resuming the run restores its own checkpoint and never loads the init run again."""
    config, result, run = method_run("pfe")
    init_backbone, _ = load_backbone(init_run)
    mean = mean_network(result.model.backbone)
    assert [w.name for w in mean.weights] == [w.name for w in init_backbone.weights]
    for a, b in zip(mean.weights, init_backbone.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)

    def never(*args: object) -> None:
        raise AssertionError("a resumed run loaded train.init_from again")

    resumed_dir = tmp_path / "run"
    shutil.copytree(run, resumed_dir)
    monkeypatch.setattr(trainer, "initialize_from", never)
    monkeypatch.setattr(trainer, "check_init_run", never)
    longer = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=3))
    resumed = train(longer, tiny_data, resumed_dir, verbose=0)
    assert (resumed.resumed_from, resumed.step) == (2, 3)
    saved = load_backbone(resumed_dir)[0].get_layer(EXTRA_LAYER).kernel.numpy()
    np.testing.assert_array_equal(saved, resumed.model.backbone.get_layer(EXTRA_LAYER).kernel.numpy())
    assert not np.array_equal(saved, result.model.backbone.get_layer(EXTRA_LAYER).kernel.numpy())


def test_two_stage_loglike_method_takes_the_init_runs_class_centres(method_run: Callable,
                                                                     init_run: Path) -> None:
    """SCF's frozen class centres are the init run's ArcFace centres (one column per class)."""
    _, result, _ = method_run("scf")
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(init_run / CHECKPOINT_DIR)))
    centres = reader.get_tensor(variable_key("head/kernel"))
    np.testing.assert_array_equal(result.model.head.classifier.kernel.numpy(), centres.T)
    assert not result.model.head.trainable_variables


def test_reinit_starts_the_embedding_layer_fresh_and_loads_the_rest(init_run: Path) -> None:
    """DUL-reg as the reference trains it, `train.reinit=[embedding]`: the init run's backbone and
    class centres, this run's own initialisation of the embedding layer (batch norm included), and
    nothing frozen. Without `head` in reinit the centres load; with it they stay fresh."""
    overrides = [o for o in method_overrides("dul_reg", init_run) if not o.startswith("train.freeze")]
    init_backbone, _ = load_backbone(init_run)
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(init_run / CHECKPOINT_DIR)))
    centres = reader.get_tensor(variable_key("head/kernel")).T
    for reinit, loads_centres in (("[embedding]", True), ("[embedding, head]", False)):
        config = load_config("smoke", [*overrides, f"train.reinit={reinit}"])
        backbone, head = trainer.build_networks(config, centres.shape[0])
        fresh = {layer.name: layer.get_weights() for layer in backbone.layers}
        fresh_centres = head.classifier.kernel.numpy()
        backbone = trainer.initialize_from(backbone, head, config, trainer.check_init_run(config))
        embedding_layers = [layer.name for layer in backbone.layers if layer.name.startswith("embedding")]
        assert "embedding_dense" in embedding_layers
        for layer in mean_network(backbone).layers:
            init_weights = init_backbone.get_layer(layer.name).get_weights()
            expected = fresh[layer.name] if layer.name in embedding_layers else init_weights
            for got, want in zip(layer.get_weights(), expected, strict=True):
                np.testing.assert_array_equal(got, want, err_msg=layer.name)
        assert any(not np.array_equal(a, b) for name in embedding_layers
                   for a, b in zip(fresh[name], init_backbone.get_layer(name).get_weights(), strict=True))
        want_centres = centres if loads_centres else fresh_centres
        np.testing.assert_array_equal(head.classifier.kernel.numpy(), want_centres)


# --- one-line errors --------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("overrides, fragments", [
    (["head.name=pfe"], ["head.name=pfe needs model.distribution.name=gaussian, "
                         "model.distribution.spherical=true", "--set model.distribution.name=gaussian"]),
    (["head.name=arcface", "model.distribution.name=vmf"],
     ["head.name=arcface needs model.distribution.name=dirac"]),
    (["head.name=vmf_loss", "model.distribution.name=vmf"],
     ["head.name=vmf_loss needs", "model.distribution.kappa=norm (got model.distribution.kappa=separate)"]),
    (["head.name=pfe", "model.distribution.name=gaussian", "model.distribution.spherical=true"],
     ["head.name=pfe trains on top of a deterministic run: pass --init_from=RUN"]),
    (["head.name=spe", "model.distribution.name=gaussian"],
     ["head.name=spe needs class-balanced batches", "data.sampler=shuffle", "set data.sampler: p_k"]),
    (["model.distribution.name=gausian"], ["did you mean 'gaussian'?"]),
    (["model.distribution.covariance=diagonal"],
     ["model.distribution.covariance='diagonal' does not apply to model.distribution.name=dirac"]),
    (["model.distribution.name=vmf", "model.distribution.kappa=fixed"],
     ["'model.distribution.kappa' must be one of separate, norm"]),
    (["train.freeze=[stem]"], ["'train.freeze' must be one of backbone, embedding, head"]),
    (["train.reinit=[embedding]"], ["train.reinit=[embedding] re-initialises parts of the run "
                                    "train.init_from loads; pass --init_from=RUN"]),
    (["train.init_from=runs/x", "train.reinit=[embedding, head]", "train.freeze=[head]"],
     ["train.reinit and train.freeze both name head: a re-initialised part must train"]),
    (["train.reinit=[neck]"], ["'train.reinit' must be one of backbone, embedding, head"]),
])
def test_bad_method_settings_are_one_line(overrides: list[str], fragments: list[str], tiny_data: Path,
                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--config=smoke", f"--data_dir={tiny_data}", f"--model_dir={tmp_path / 'run'}"]
    for override in overrides:
        args += ["--set", override]
    assert_main_user_error(capsys, train_main, args, *fragments)
    assert not (tmp_path / "run").exists()


@pytest.mark.unit
def test_init_run_with_another_probabilistic_distribution_is_one_line(
        init_run: Path, tmp_path: Path) -> None:
    """A run with a distribution starts from a dirac run or one with the same distribution."""
    from sparse_embed.config import save_config
    from sparse_embed.errors import ConfigError

    other = tmp_path / "vmf_run"
    (other / "checkpoints").mkdir(parents=True)
    for path in (init_run / CHECKPOINT_DIR).iterdir():
        (other / "checkpoints" / path.name).write_bytes(path.read_bytes())
    save_config(load_config("smoke", [*MODEL, "model.distribution.name=vmf", "head.name=vmf_fl"]),
                other / "config.yaml")
    config = load_config("smoke", method_overrides("pfe", other))
    with pytest.raises(ConfigError, match="was trained with model.distribution.name=vmf"):
        trainer.check_init_run(config)
