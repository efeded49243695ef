"""Config tree: packaged configs, overrides, validation, YAML round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import assert_main_user_error

from sparse_embed.config import (
    CONFIG_DIR,
    Config,
    HeadConfig,
    config_from_model_dir,
    head_config,
    load_config,
    save_config,
)
from sparse_embed.errors import ConfigError
from sparse_embed.heads import HEADS
from sparse_embed.train import main as train_main

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]

PACKAGED = sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml"))


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_configs_load_and_document_themselves(name: str) -> None:
    config = load_config(name)
    assert isinstance(config, Config)
    first = (CONFIG_DIR / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith("# "), "every packaged config starts with a comment saying how to run it"


def test_overrides_are_typed() -> None:
    assert load_config(None, ["schedule.base_lr=1e-3"]).schedule.base_lr == 1e-3
    config = load_config("smoke", ["sparsity.weight=3", "schedule.boundaries=[10, 20]",
                                   "model.embedding_size=256", "data.augment=false"])
    assert config.sparsity.weight == 3.0 and isinstance(config.sparsity.weight, float)
    assert config.schedule.boundaries == (10, 20)
    assert config.model.embedding_size == 256
    assert config.data.augment is False
    assert load_config(None) == Config()


@pytest.mark.parametrize("override, message", [
    ("sparsity.wieght=3", "did you mean 'sparsity.weight'"),
    ("modl.name=x", "did you mean 'model'"),
    ("train.steps=1.5", "expects int"),
    ("schedule.base_lr=fast", "expects float"),
    ("model.final_activation=tanh", "must be one of relu, soft_threshold, none"),
    ("train.steps", "key.path=value"),
    ("model=3", "must be a mapping"),
])
def test_bad_overrides_name_the_problem(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", [override])


def test_unknown_config_lists_packaged_names() -> None:
    with pytest.raises(ConfigError, match="smoke"):
        load_config("no/such/config")


def test_save_and_reload_round_trip(tmp_path) -> None:
    config = load_config("smoke", ["schedule.boundaries=[5]"])
    save_config(config, tmp_path / "config.yaml")
    assert config_from_model_dir(tmp_path) == config
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_model_dir_without_config(tmp_path) -> None:
    with pytest.raises(ConfigError, match="config.yaml not found"):
        config_from_model_dir(tmp_path)


@pytest.mark.integration
def test_package_and_config_import_without_tensorflow() -> None:
    import subprocess
    import sys

    code = ("import sys, sparse_embed, sparse_embed.config, sparse_embed.data.checks; "
            "sys.exit('tensorflow' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=-4", "'train.batch_size' must be >= 1; got -4"),
    ("train.steps=0", "'train.steps' must be >= 1; got 0"),
    ("head.sample_rate=1.5", "'head.sample_rate' must be in (0, 1]; got 1.5"),
    ("optimizer.momentum=1", "'optimizer.momentum' must be in [0, 1); got 1.0"),
    ("schedule.boundaries=[10, -1]", "'schedule.boundaries' must be >= 0; got -1"),
    ("sparsity.weight=-1e-3", "'sparsity.weight' must be >= 0; got -0.001"),
])
def test_out_of_range_values_are_config_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config("smoke", [override])
    assert message in str(error.value)


def test_out_of_range_value_on_the_command_line_is_one_line(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (main(argv))."""
    assert_main_user_error(capsys, train_main,
                           ["--config=smoke", f"--data_dir={tmp_path}", f"--model_dir={tmp_path / 'run'}",
                            "--set", "train.batch_size=-4"], "train.batch_size", ">= 1")


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_configs_name_registered_models_and_heads(name: str) -> None:
    from sparse_embed.heads import HEADS
    from sparse_embed.models import MODELS

    config = load_config(name)
    MODELS.get(config.model.name)
    HEADS.get(config.head.name)


# --- head.params: each head's own parameters -----------------------------------------

LEGACY = ROOT / "tests" / "data" / "legacy_configs"


@pytest.mark.parametrize("name", HEADS.names())
def test_head_params_defaults_are_the_layer_defaults(name: str) -> None:
    """One source: the head layer's constructor defaults are its parameter class's defaults,
    and a config with no parameters resolves to exactly them."""
    import inspect

    from sparse_embed.heads import head_builder

    params_class = HEADS.get(name)
    layer = head_builder(name)(5, 8, head_config(name))
    signature = inspect.signature(type(layer).__init__).parameters
    for f in dataclasses.fields(params_class):
        assert signature[f.name].default == f.default, (name, f.name)
        assert layer.get_config()[f.name] == f.default, (name, f.name)
    assert load_config(None, [f"head.name={name}"]).head.params == params_class()


def test_head_defaults_are_each_heads_own() -> None:
    assert load_config("smoke", ["head.name=cosface"]).head.params.margin == 0.35
    assert load_config("smoke", ["head.name=triplet"]).head.params.margin == 0.2
    assert load_config("smoke", ["head.name=sphereface"]).head.params.margin == 4
    config = load_config("smoke", ["head.params.margin=0.45", "head.name=cosface"])
    assert (config.head.name, config.head.params.margin, config.head.params.scale) == ("cosface", 0.45, 64.0)
    # The file's own head keeps the file's parameters under an override of one of them.
    config = load_config("smoke", ["head.params.margin=0.35"])
    assert (config.head.params.scale, config.head.params.margin) == (16.0, 0.35)


@pytest.mark.parametrize("overrides, message", [
    (["head.params.ms_alpha=7"], "unknown config key 'head.params.ms_alpha': head 'arcface' takes "
                                 "scale, margin"),
    (["head.params.margn=0.3"], "did you mean head.params.margin?"),
    (["head.ms_alpha=7"], "config key 'head.ms_alpha' is not a shared head field; the parameters of "
                          "head 'arcface' go under head.params: scale, margin"),
    (["head.margin=0.3"], "the parameters of head 'arcface' go under head.params"),
    (["head.name=triplet", "head.params.mining=hardest"],
     "'head.params.mining' must be one of semi_hard, batch_hard, all; got 'hardest'"),
    (["head.name=sphereface", "head.params.margin=4.5"], "'head.params.margin' expects int, got 4.5"),
    (["head.params.scale=0"], "'head.params.scale' must be > 0; got 0.0"),
    (["head.params=3"], "'head.params' must be a mapping"),
    (["head.name=triplet", "head.sub_centers=3"],
     "head.sub_centers=3 does not apply to head 'triplet'; leave it at 1 (the shared keys triplet "
     "takes: head.gather_batch)"),
    (["head.name=arcfcae"], "unknown head 'arcfcae' (did you mean 'arcface'?)"),
])
def test_bad_head_params_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config("smoke", overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_head_params_on_the_command_line_is_one_line(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (main(argv))."""
    assert_main_user_error(capsys, train_main,
                           ["--config=smoke", f"--data_dir={tmp_path}", f"--model_dir={tmp_path / 'run'}",
                            "--set", "head.params.alpha=7"],
                           "head.params.alpha", "head 'arcface' takes scale, margin")


def test_resolved_config_records_every_head_parameter(tmp_path: Path) -> None:
    import yaml

    save_config(load_config("smoke", ["head.name=combined", "head.params.m3=0.1"]),
                tmp_path / "config.yaml")
    head = yaml.safe_load((tmp_path / "config.yaml").read_text())["head"]
    assert head["params"] == {"scale": 64.0, "m1": 1.0, "m2": 0.5, "m3": 0.1}
    assert set(head) == {*HeadConfig.__dataclass_fields__}


@pytest.mark.parametrize("file, name, params, shared", [
    ("smoke", "arcface", {"scale": 16.0, "margin": 0.3}, {}),
    ("face_dense_mobilenet_v2_cosface_focal", "cosface", {"scale": 30.0, "margin": 0.35},
     {"loss": "focal", "focal_gamma": 2.0}),
    # The old flat margin was a float, 4.0; SphereFace's multiplier is the integer 4.
    ("face_sphereface20_casia", "sphereface", {"margin": 4, "lambda_base": 1000.0,
                                               "lambda_gamma": 0.12, "lambda_power": 1.0,
                                               "lambda_min": 5.0}, {}),
    ("cifar_sparse_nin_triplet_flops", "triplet",
     {"margin": 0.1, "mining": "semi_hard", "distance": "squared_euclidean"}, {}),
    ("retrieval_cars_multi_similarity", "multi_similarity",
     {"alpha": 2.0, "beta": 50.0, "base": 0.5, "epsilon": 0.1}, {}),
    # The old configs' proxy_lr_multiplier reached the proxy heads; their unused flat scale did not.
    ("retrieval_cub_proxy_anchor", "proxy_anchor", {"alpha": 32.0, "delta": 0.1, "lr_multiplier": 100.0},
     {}),
])
def test_old_flat_run_configs_are_mapped_on_load(tmp_path: Path, file: str, name: str, params: dict,
                                                 shared: dict) -> None:
    """config.yaml files written before head.params (committed as the old code wrote them, every
    flat head field recorded) load from a run directory with the values that trained them."""
    (tmp_path / "config.yaml").write_text((LEGACY / f"{file}.yaml").read_text())
    config = config_from_model_dir(tmp_path)
    assert config.head == head_config(name, params, **shared)
    # As a config file to train from (not a run directory), the old layout is one line saying where
    # the parameters go now.
    with pytest.raises(ConfigError, match=f"the parameters of head '{name}' go under head.params"):
        load_config(str(LEGACY / f"{file}.yaml"))


@pytest.mark.parametrize("overrides, message", [
    (["compression.type=qat", "compression.target_sparsity=0.8"],
     "compression.target_sparsity=0.8 does not apply to compression.type=qat; leave it at 0.5 "
     "(compression.type=qat takes: bits, activation_bits)"),
    (["compression.type=prune", "compression.bits=4"], "compression.bits=4 does not apply to "
                                                       "compression.type=prune"),
    (["compression.frequency=3"], "compression.type=none takes: nothing"),
])
def test_compression_fields_of_another_type_are_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config("smoke", overrides)
    assert message in str(error.value)
    assert load_config("smoke", ["compression.type=prune", "compression.m_by_n=[2, 4]"]).compression.m_by_n \
        == (2, 4)


def test_config_choices_are_their_registries() -> None:
    """Every name list the config checks before TensorFlow starts is exactly the registry (or
    tuple) the library dispatches on, so neither can gain a name the other lacks."""
    from sparse_embed import compression, inference, sparsity
    from sparse_embed.compression import prune
    from sparse_embed.config import _CHOICES
    from sparse_embed.data import augment, pipeline
    from sparse_embed.heads import margin
    from sparse_embed.models import embedding
    from sparse_embed.training import distributed, schedules, trainer

    sources = {
        "data.sampler": pipeline.SAMPLERS.names(),
        "data.augmentation": augment.AUGMENTATIONS.names(),
        "model.final_activation": embedding.ACTIVATIONS.names(),
        "sparsity.type": sparsity.REGULARIZERS.names(),
        "sparsity.schedule": sparsity.WEIGHT_SCHEDULES.names(),
        "optimizer.name": trainer.OPTIMIZERS.names(),
        "schedule.name": schedules.DECAYS.names(),
        "eval.flip": inference.FLIP_MODES.names(),
        "distributed.backend": ["auto", *distributed.STRATEGIES.names()],
        "head.loss": margin.HEAD_LOSSES,
        "compression.type": compression.COMPRESSIONS.names(),
        "compression.schedule": prune.SCHEDULES.names(),
    }
    assert set(sources) == set(_CHOICES)
    for key, names in sources.items():
        assert sorted(_CHOICES[key]) == sorted(names), key
