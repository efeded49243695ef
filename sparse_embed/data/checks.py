"""Input checks that run before TensorFlow is imported, so a bad path fails fast and plainly."""

from __future__ import annotations

import glob
from pathlib import Path

from sparse_embed.config import Config
from sparse_embed.errors import DataError


def train_inputs(config: Config, data_dir: str | Path) -> tuple[str, Path]:
    """Resolves and checks the training TFRecords and label map of a run.

    Args:
        config: The run config (`data.train_files`, `data.label_map`).
        data_dir: Directory those paths are relative to.

    Returns:
        (TFRecord glob pattern, label-map path).

    Raises:
        DataError: If the directory, the shards or the label map are missing.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data dir {data_dir} does not exist; pass --data_dir=<dir with TFRecords>")
    pattern = str(data_dir / config.data.train_files)
    if not glob.glob(pattern):
        raise DataError(
            f"no TFRecords match {pattern}; build them with preprocessing/build_tfrecords.py "
            f"or set data.train_files"
        )
    label_map = data_dir / config.data.label_map
    if not label_map.is_file():
        raise DataError(f"label map {label_map} not found; build_tfrecords writes it beside the shards")
    return pattern, label_map
