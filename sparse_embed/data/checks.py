"""Input checks that run before TensorFlow is imported, so a bad path fails fast and plainly."""

from __future__ import annotations

import glob
import os
import struct
from pathlib import Path

import numpy as np

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
            f"no TFRecords match {pattern}; build them with sparse-embed-build-tfrecords "
            f"or set data.train_files"
        )
    label_map = data_dir / config.data.label_map
    if not label_map.is_file():
        raise DataError(f"label map {label_map} not found; build_tfrecords writes it beside the shards")
    return pattern, label_map


def scan_records(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, str]:
    """Locates the records of a TFRecord file from its headers alone, seeking over the payloads.

    A record is a uint64 length, a uint32 CRC of the length, the payload and its
    uint32 CRC. Only the 12-byte headers are read, so even large shards are
    scanned in a moment. Payload CRCs are not verified: this finds truncated or
    overwritten files, the usual damage of a killed copy.

    Args:
        path: A TFRecord file.

    Returns:
        (payload offsets int64 [R], payload lengths int64 [R], what is wrong after
        the R intact records; empty when the file is whole).
    """
    size = os.path.getsize(path)
    offsets: list[int] = []
    lengths: list[int] = []
    problem = ""
    # Unbuffered: a buffered reader would fill its buffer with payload at every seek.
    with open(path, "rb", buffering=0) as f:
        position = 0
        while position < size:
            header = f.read(12)
            if len(header) < 12:
                problem = f"a record header is cut short at byte {position}"
                break
            (length,) = struct.unpack("<Q", header[:8])
            end = position + 12 + length + 4
            if end > size:
                problem = (f"record {len(offsets)} needs {length + 4} bytes at byte {position + 12}, "
                           f"the file ends {size - position - 12} bytes later")
                break
            offsets.append(position + 12)
            lengths.append(length)
            f.seek(end)
            position = end
    return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64), problem


def count_records(path: str | os.PathLike) -> tuple[int, str]:
    """Counts the intact records of a TFRecord file (see `scan_records`).

    Args:
        path: A TFRecord file.

    Returns:
        (intact records, what is wrong after them; empty when the file is whole).
    """
    offsets, _, problem = scan_records(path)
    return len(offsets), problem


def damaged_tfrecords(pattern: str) -> list[tuple[str, int, str]]:
    """Finds TFRecord files whose framing is cut short, without reading their payloads.

    Args:
        pattern: Glob of TFRecord files.

    Returns:
        (path, intact records before the damage, what is wrong) for each damaged file.
    """
    damaged = []
    for path in sorted(glob.glob(pattern)):
        records, problem = count_records(path)
        if problem:
            damaged.append((path, records, problem))
    return damaged
