"""The landmarks task's config: one frozen dataclass, a packaged YAML, dotted overrides.

    python -m sparse_embed.landmarks train --config=synthetic_landnet --set steps=500 ...

`--config` takes a packaged name (configs/*.yaml beside this module) or a YAML
path; `--set key=value` is type-checked and an unknown key names the closest
valid one, as for the embedding runs (`sparse_embed.config`). The resolved
config is written to the run directory, which `evaluate`, `compress` and
`real` read.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sparse_embed.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_FILE = "config.yaml"

DATA_FORMATS = ("synthetic", "celeba")
LOSSES = ("wing", "l1")


@dataclass(frozen=True)
class LandmarksConfig:
    """A landmark network's training run.

    Attributes:
        model: A `LANDMARK_MODELS` name.
        input_size: The network's input side in pixels.
        data_format: `synthetic` (the synthetic faces' landmarks.csv) | `celeba`
            (CelebA's landmark list and, optionally, its box list).
        landmarks_file: The landmark list, relative to the data directory
            (celeba: `list_landmarks_align_celeba.txt`; synthetic: landmarks.csv).
        bbox_file: CelebA's box list (`list_bbox_celeba.txt`) relative to the
            data directory, or empty: each image's central square is its crop.
        image_dir: The images' folder relative to the data directory (celeba).
        train_split: Synthetic: the split folder trained on.
        test_split: Synthetic: the split folder evaluated on.
        test_fraction: CelebA: the last fraction of the list held out for evaluation.
        loss: `wing` | `l1` (losses.py).
        wing_width: The wing loss's w, in pixels of the input crop.
        wing_epsilon: The wing loss's eps.
        batch_size: Images per step.
        steps: Training steps.
        learning_rate: Adam's learning rate (cosine decay to zero over `steps`).
        flip: Also train on the mirror images (points mirrored, left and right swapped).
        seed: Seed of the initialisation and the shuffling.
        compress_steps: Fine-tuning steps of each compressed model (`compress`).
        target_sparsity: The pruned models' fraction of zero weights per pruned kernel.
    """

    model: str = "landnet"
    input_size: int = 48
    data_format: str = "synthetic"
    landmarks_file: str = "landmarks.csv"
    bbox_file: str = ""
    image_dir: str = ""
    train_split: str = "train"
    test_split: str = "test"
    test_fraction: float = 0.1
    loss: str = "wing"
    wing_width: float = 10.0
    wing_epsilon: float = 2.0
    batch_size: int = 64
    steps: int = 2000
    learning_rate: float = 2e-3
    flip: bool = True
    seed: int = 0
    compress_steps: int = 500
    target_sparsity: float = 0.52

    def __post_init__(self) -> None:
        for name, choices in (("data_format", DATA_FORMATS), ("loss", LOSSES)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"config key {name!r} must be one of {', '.join(choices)}; "
                                  f"got {getattr(self, name)!r}")
        for name in ("input_size", "batch_size", "steps", "compress_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key {name!r} must be >= 1; got {getattr(self, name)}")
        for name in ("wing_width", "wing_epsilon", "learning_rate"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"config key {name!r} must be > 0; got {getattr(self, name)}")
        for name in ("test_fraction", "target_sparsity"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"config key {name!r} must be in (0, 1); got {getattr(self, name)}")


def _coerce(key: str, value: Any, typ: type) -> Any:
    if typ is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif typ is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif typ is bool and isinstance(value, bool):
        return value
    elif typ is str and isinstance(value, str):
        return value
    elif typ is str and value is None:
        return ""
    raise ConfigError(f"config key {key!r} expects {typ.__name__}, got {value!r}")


def packaged_names() -> list[str]:
    """The packaged landmark configs' names."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_landmarks_config(name_or_path: str | None = None,
                          overrides: typing.Sequence[str] = ()) -> LandmarksConfig:
    """Builds a `LandmarksConfig` from a packaged name or YAML path and `key=value` overrides.

    Args:
        name_or_path: A packaged name (`synthetic_landnet`) or a YAML path; None: the defaults.
        overrides: `key=value` strings, values parsed as YAML scalars.

    Raises:
        ConfigError: On a missing config, bad YAML, an unknown key or a wrong value.
    """
    values: dict[str, Any] = {}
    if name_or_path is not None:
        path = Path(name_or_path)
        if not (path.suffix in (".yaml", ".yml") and path.is_file()):
            path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"landmarks config {name_or_path!r} is neither a YAML file nor a packaged "
                              f"config; packaged: {', '.join(packaged_names())}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path} is not valid YAML: {e}".replace("\n", " ")) from e
        if not isinstance(values, dict):
            raise ConfigError(f"config {path} must be a mapping of keys to values")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value")
        values[key.strip()] = yaml.safe_load(raw)
    types = typing.get_type_hints(LandmarksConfig)
    kwargs = {}
    for key, value in values.items():
        if key not in types:
            close = difflib.get_close_matches(key, types, n=1, cutoff=0.4)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown landmarks config key {key!r}{hint}")
        kwargs[key] = _coerce(key, value, types[key])
    return LandmarksConfig(**kwargs)


def save_landmarks_config(config: LandmarksConfig, model_dir: str | Path) -> Path:
    """Writes the resolved config to `model_dir/config.yaml`.

    Args:
        config: The run's config.
        model_dir: The run directory (created if missing).
    """
    path = Path(model_dir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    return path


def config_from_run(model_dir: str | Path) -> LandmarksConfig:
    """The config a landmarks run directory was trained with.

    Args:
        model_dir: A directory written by `python -m sparse_embed.landmarks train`.

    Raises:
        ConfigError: If it has no config.yaml.
    """
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found: --model_dir must be a run of "
                          f"`python -m sparse_embed.landmarks train`")
    return load_landmarks_config(str(path))
