"""`study pe_confidence`: how each method's config is scaled down and chained, without training."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparse_embed import study
from sparse_embed.config import load_config
from sparse_embed.errors import ConfigError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("method", sorted(study.PE_METHODS))
def test_every_method_loads_at_the_study_scale(method: str) -> None:
    """The overrides apply to every packaged config; a stage 2 starts from the first ArcFace seed
    and a P x K sampler still fills the batch."""
    overrides = study.pe_overrides(method, Path("runs/pe"), 300, 150, 64)
    config = load_config(study.PE_METHODS[method][0], overrides)
    stage2 = study.PE_METHODS[method][1]
    assert config.train.steps == (150 if stage2 else 300) and config.train.batch_size == 64
    assert config.train.init_from == ("runs/pe/arcface/seed-0" if stage2 else "")
    if config.data.sampler == "p_k":
        assert config.data.classes_per_batch * config.data.samples_per_class == 64


def test_a_stage_2_without_its_stage_1_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs arcface"):
        study.pe_confidence(tmp_path, tmp_path, ["pfe"], 1, 1, 1, 8, None)
    with pytest.raises(ConfigError, match="unknown method"):
        study.pe_confidence(tmp_path, tmp_path, ["nope"], 1, 1, 1, 8, None)


def test_rows_are_formatted_with_their_columns() -> None:
    text = study.format_rows([{"method": "pfe", "n": 3, "accuracy": 0.91234}], study.PE_SEEDS_COLUMNS[:3])
    assert text.splitlines()[1].split() == ["pfe", "3", "0.9123"]
