"""Input checks that run before TensorFlow is imported, so a bad path fails fast and plainly."""

from __future__ import annotations

import glob
import os
import struct
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


def damaged_tfrecords(pattern: str) -> list[tuple[str, int, str]]:
    """Finds TFRecord files whose framing is cut short, without reading their payloads.

    Walks each file's record headers (uint64 length, uint32 CRC of the length,
    then the payload and its uint32 CRC), seeking over the payloads, so even
    large shards are checked in a moment. Payload CRCs are not verified: this
    finds truncated or overwritten files, the usual damage of a killed copy.

    Args:
        pattern: Glob of TFRecord files.

    Returns:
        (path, intact records before the damage, what is wrong) for each damaged file.
    """
    damaged = []
    for path in sorted(glob.glob(pattern)):
        size = os.path.getsize(path)
        records, problem = 0, ""
        with open(path, "rb") as f:
            while f.tell() < size:
                header = f.read(12)
                if len(header) < 12:
                    problem = f"a record header is cut short at byte {f.tell() - len(header)}"
                    break
                (length,) = struct.unpack("<Q", header[:8])
                end = f.tell() + length + 4
                if end > size:
                    problem = (f"record {records} needs {length + 4} bytes at byte {f.tell()}, "
                               f"the file ends {size - f.tell()} bytes later")
                    break
                f.seek(end)
                records += 1
        if problem:
            damaged.append((path, records, problem))
    return damaged
