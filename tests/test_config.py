"""Config tree: packaged configs, overrides, validation, YAML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_user_error, run_module

from sparse_embed.config import (
    CONFIG_DIR,
    Config,
    config_from_model_dir,
    load_config,
    save_config,
)
from sparse_embed.errors import ConfigError

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


def test_out_of_range_value_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    proc = run_module("sparse_embed.train", "--config=smoke", f"--data_dir={tmp_path}",
                      f"--model_dir={tmp_path / 'run'}", "--set", "train.batch_size=-4")
    assert_user_error(proc, "train.batch_size", ">= 1")


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_configs_name_registered_models_and_heads(name: str) -> None:
    from sparse_embed.heads import HEADS
    from sparse_embed.models import MODELS

    config = load_config(name)
    MODELS.get(config.model.name)
    HEADS.get(config.head.name)
