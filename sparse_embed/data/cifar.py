"""CIFAR-100 from the official Python pickles to the project's TFRecords.

    python -m sparse_embed.preprocessing.build_cifar_tfrecords --root=cifar-100-python \
        --output=data/cifar100 [--labels=fine|coarse] [--shards=8] [--workers=2]

The "python version" archive of Krizhevsky's CIFAR-100 unpacks to a folder
with three pickles (written by Python 2): `train` and `test`, each a dict with
`data` (uint8 [N, 3072]: 1024 red, 1024 green, 1024 blue values of a 32x32
image, row-major), `fine_labels`, `coarse_labels` and `filenames`; and `meta`,
with `fine_label_names` and `coarse_label_names`. Pickles can run code, so they
are loaded by an unpickler that builds NumPy arrays and plain data only.

Output: `<output>/tfrecords/train-*` and `<output>/tfrecords/test-*` with
`labels.txt` (the label names, in label order), in the schema of
sparse_embed/data/tfrecord.py; the 32x32 images are stored as JPEG (quality 95,
the schema's format).
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sparse_embed.errors import DataError

SPLITS = ("train", "test")
LABEL_KINDS = ("fine", "coarse")
_SIDE = 32

# What NumPy needs to rebuild an ndarray from a pickle, under NumPy 1 and 2
# module names, and the str -> bytes codec with which a protocol-2 pickle
# written by Python 3 spells bytes; nothing else may be looked up.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and NumPy arrays; refuses every other class or function."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"it refers to {module}.{name}; only NumPy arrays and plain data are accepted")


def load_pickle(path: str | os.PathLike) -> Any:
    """Loads one CIFAR pickle without running code.

    Args:
        path: `train`, `test` or `meta` of the Python CIFAR-100 archive.

    Raises:
        DataError: If the file is missing or is not a plain-data pickle.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CIFAR-100 file {path} not found; --root must be the unpacked "
                        f"cifar-100-python folder (train, test, meta)")
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the archive was pickled by Python 2.
            return _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError,
            AttributeError, ImportError, KeyError, MemoryError) as e:
        raise DataError(f"{path} is not a CIFAR-100 pickle: {' '.join(str(e).split())}") from e


def _field(table: Any, key: str, path: Path) -> Any:
    if not isinstance(table, dict):
        raise DataError(f"{path} is not a CIFAR-100 pickle: it holds a {type(table).__name__}")
    for candidate in (key.encode(), key):
        if candidate in table:
            return table[candidate]
    found = ", ".join(sorted(k.decode() if isinstance(k, bytes) else str(k) for k in table))
    raise DataError(f"{path} has no {key!r} entry (found: {found}); is it CIFAR-10 or another "
                    f"pickle? Point --root at the cifar-100-python folder")


@dataclass(frozen=True)
class CifarSplit:
    """One split of CIFAR-100.

    Attributes:
        images: uint8 [N, 32, 32, 3].
        labels: int64 [N], fine or coarse labels.
        filenames: N file names from the archive.
    """

    images: np.ndarray
    labels: np.ndarray
    filenames: tuple[str, ...]


def read_split(root: str | os.PathLike, split: str, labels: str = "fine") -> CifarSplit:
    """Reads the `train` or `test` pickle.

    Args:
        root: The unpacked `cifar-100-python` folder.
        split: `train` or `test`.
        labels: `fine` (100 classes) or `coarse` (20 superclasses).

    Raises:
        DataError: If the pickle is missing, unsafe or has other keys or shapes.
    """
    path = Path(root) / split
    table = load_pickle(path)
    data = np.asarray(_field(table, "data", path))
    values = np.asarray(_field(table, f"{labels}_labels", path), dtype=np.int64)
    names = [n.decode() if isinstance(n, bytes) else str(n)
             for n in _field(table, "filenames", path)]
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * _SIDE * _SIDE:
        raise DataError(f"{path}: 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
    if not len(data) == len(values) == len(names):
        raise DataError(f"{path}: {len(data)} images, {len(values)} labels, {len(names)} names")
    # Each row is the red plane, then green, then blue, each 32x32 row-major.
    images = data.reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1)
    return CifarSplit(np.ascontiguousarray(images), values, tuple(names))


def label_names(root: str | os.PathLike, labels: str = "fine") -> list[str]:
    """The class names of the `meta` pickle, in label order.

    Args:
        root: The unpacked `cifar-100-python` folder.
        labels: `fine` or `coarse`.

    Raises:
        DataError: If `meta` is missing, unsafe or lacks the names.
    """
    path = Path(root) / "meta"
    names = _field(load_pickle(path), f"{labels}_label_names", path)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def encode_jpeg(image: np.ndarray) -> bytes:
    """One uint8 [32, 32, 3] image as JPEG bytes (quality 95).

    Args:
        image: The image.
    """
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_cifar_tfrecords(root: str | os.PathLike, output_dir: str | os.PathLike,
                          labels: str = "fine", num_shards: int = 8, num_workers: int = 1,
                          seed: int = 0) -> dict[str, dict[str, object]]:
    """Writes both splits as TFRecords under `output_dir/tfrecords`, with labels.txt.

    Args:
        root: The unpacked `cifar-100-python` folder.
        output_dir: Destination; the shards go to `output_dir/tfrecords`.
        labels: `fine` or `coarse`.
        num_shards: Shards per split.
        num_workers: Processes checking the encoded images.
        seed: Seed of the example order.

    Returns:
        The writer's summary of each split.

    Raises:
        DataError: If a pickle is missing, unsafe or malformed, or a label is out of range.
        ValueError: If `labels` is not `fine` or `coarse`.
    """
    from sparse_embed.data.tfrecord import encode_image, write_examples

    if labels not in LABEL_KINDS:
        raise ValueError(f"labels must be one of {LABEL_KINDS}, got {labels!r}")
    names = label_names(root, labels)
    summaries = {}
    for split in SPLITS:
        data = read_split(root, split, labels)
        if len(data.labels) and (data.labels.min() < 0 or data.labels.max() >= len(names)):
            raise DataError(f"{Path(root) / split}: labels outside [0, {len(names)})")
        jpegs = [encode_jpeg(image) for image in data.images]
        summaries[split] = write_examples(
            jpegs, encode_image, data.labels.tolist(), names, list(data.filenames),
            Path(output_dir) / "tfrecords", name=split, num_shards=num_shards,
            num_workers=num_workers, seed=seed,
        )
    return summaries
