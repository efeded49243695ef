"""Images at a model's input for an export: the representative set and the parity gate's held-out images.

From the run's TFRecords, a folder of images or a `.npy` array; encoded
images are decoded and resized as the run's pipelines do, so they are what
the model saw in training.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sparse_embed.data.pipeline import decode_image, list_files
from sparse_embed.data.tfrecord import parse_example
from sparse_embed.data.verification import IMAGE_EXTENSIONS
from sparse_embed.errors import DataError
from sparse_embed.keras import tf


def _check_aspect(name: str, hw: tuple[int, int], input_shape: tuple[int, int], source: str) -> None:
    """Images are resized to the input like the run's pipeline; a different aspect would squash them."""
    (h, w), (height, width) = hw, input_shape
    if abs(h * width - w * height) > 0.02 * height * w:
        raise DataError(
            f"{source}: image {name} is {h}x{w}, the model takes {height}x{width} (height x width); "
            f"pass images aligned at {height}x{width} or of that aspect ratio")


def _decode(encoded: bytes, name: str, input_shape: tuple[int, int], source: str) -> np.ndarray:
    raw = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    _check_aspect(name, tuple(int(s) for s in raw.shape[:2]), input_shape, source)
    return decode_image(tf.constant(encoded), input_shape).numpy()


def _record_images(pattern: str, start: int, count: int) -> Iterator[tuple[bytes, str]]:
    records = tf.data.TFRecordDataset(list_files(pattern)).skip(start).take(count)
    for serialized in records:
        features = parse_example(serialized)
        yield features["image/encoded"].numpy(), features["image/filename"].numpy().decode()


def _folder_images(root: Path, count: int) -> Iterator[tuple[bytes, str]]:
    paths = sorted(p for p in root.rglob("*")
                   if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if not paths:
        raise DataError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {root}")
    for path in paths[:count]:
        yield path.read_bytes(), str(path)


def _npy_images(path: Path, count: int, input_shape: tuple[int, int]) -> np.ndarray:
    array = np.load(path, mmap_mode="r")
    want = (*input_shape, 3)
    if array.ndim != 4 or tuple(array.shape[1:]) != want:
        raise DataError(f"{path}: representative array has shape {tuple(array.shape)}, the model takes "
                        f"[N, {want[0]}, {want[1]}, 3] float32 RGB in [-1, 1]")
    images = np.asarray(array[:count], np.float32)
    if images.size and (images.min() < -1.0 - 1e-3 or images.max() > 1.0 + 1e-3):
        raise DataError(f"{path}: values span [{images.min():g}, {images.max():g}], the model takes "
                        f"[-1, 1] (x / 127.5 - 1 of 8-bit RGB)")
    return images


def load_images(source: str, count: int, input_shape: tuple[int, int], start: int = 0) -> np.ndarray:
    """Images at a model's input, from TFRecords, an image folder or a `.npy` array.

    Encoded images are decoded and resized as the run's pipelines do
    (`decode_image`), so they are what the model saw in training.

    Args:
        source: A TFRecord glob, a folder of images (searched recursively,
            sorted), or a `.npy` float32 [N, H, W, 3] array in [-1, 1].
        count: At most this many images.
        input_shape: (height, width) of the model input.
        start: Images to skip first (TFRecords: records before the held-out ones).

    Returns:
        float32 [n, H, W, 3], n <= count.

    Raises:
        DataError: If the source is missing or empty, or an image's shape does not fit the model.
    """
    path = Path(source)
    if path.suffix == ".npy":
        if not path.is_file():
            raise DataError(f"representative array {path} not found")
        return _npy_images(path, start + count, input_shape)[start:]
    if path.is_dir():
        encoded = _folder_images(path, start + count)
    elif glob.glob(source):
        encoded = _record_images(source, start, count)
    else:
        raise DataError(f"{source} is neither a .npy array, an image folder nor a TFRecord glob "
                        f"that matches files")
    images = [_decode(data, name, input_shape, source) for data, name in encoded]
    if path.is_dir():
        images = images[start:]
    if not images:
        return np.zeros((0, *input_shape, 3), np.float32)
    return np.stack(images).astype(np.float32)
