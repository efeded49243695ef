"""The TFRecord schema of training images, its writer and its parser.

One `tf.train.Example` per image, with the feature keys of TF models'
`build_image_data.py`:

    image/encoded      bytes   JPEG
    image/format       bytes   b"JPEG"
    image/colorspace   bytes   b"RGB"
    image/channels     int64   3
    image/height       int64
    image/width        int64
    image/class/label  int64   0-based; line `label` of labels.txt
    image/class/text   bytes   class (folder) name
    image/filename     bytes   path relative to the input root, e.g. b"id_00042/3.jpg"
                               (from a RecordIO pack: b"<label>/<key>.jpg")

Shards are named `<name>-00000-of-00008` and hold a seeded shuffle of all
examples, so any shard is a random sample of the classes.
"""

from __future__ import annotations

import io
import multiprocessing
import multiprocessing.pool
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from sparse_embed.data import image_folder, recordio
from sparse_embed.errors import DataError
from sparse_embed.fileio import atomic_path
from sparse_embed.keras import tf

LABEL_MAP = "labels.txt"
JPEG_QUALITY = 95
# How many skipped files the summary names; the rest are only counted.
SHOWN_SKIPS = 5

# What `write_examples` reads an image from: a path, a record offset.
T = TypeVar("T")

FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/format": tf.io.FixedLenFeature([], tf.string, default_value="JPEG"),
    "image/colorspace": tf.io.FixedLenFeature([], tf.string, default_value="RGB"),
    "image/channels": tf.io.FixedLenFeature([], tf.int64, default_value=3),
    "image/height": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    "image/width": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    "image/class/text": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "image/filename": tf.io.FixedLenFeature([], tf.string, default_value=""),
}


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parses serialized Examples of this schema.

    Args:
        serialized: A scalar string tensor (one Example) or a vector (a batch).

    Returns:
        Feature key -> tensor, scalars for one Example, vectors for a batch.
    """
    serialized = tf.convert_to_tensor(serialized, dtype=tf.string)
    if serialized.shape.rank == 0:
        return tf.io.parse_single_example(serialized, FEATURES)
    return tf.io.parse_example(serialized, FEATURES)


def make_example(
    jpeg: bytes, label: int, text: str, filename: str, height: int, width: int
) -> bytes:
    """Serializes one image as an Example of this schema.

    Args:
        jpeg: JPEG-encoded RGB image.
        label: 0-based class index.
        text: Class name.
        filename: Source path, relative to the data set root.
        height: Image height in pixels.
        width: Image width in pixels.

    Returns:
        The serialized `tf.train.Example`.
    """

    def as_bytes(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def as_int(value: int) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    feature = {
        "image/encoded": as_bytes(jpeg),
        "image/format": as_bytes(b"JPEG"),
        "image/colorspace": as_bytes(b"RGB"),
        "image/channels": as_int(3),
        "image/height": as_int(height),
        "image/width": as_int(width),
        "image/class/label": as_int(label),
        "image/class/text": as_bytes(text.encode()),
        "image/filename": as_bytes(filename.encode()),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


@dataclass(frozen=True)
class EncodedImage:
    """An image ready for the schema, or the reason it cannot be used.

    Attributes:
        jpeg: RGB JPEG bytes (empty when `error` is set).
        height: Height in pixels.
        width: Width in pixels.
        reencoded: Whether the source was not an RGB JPEG and was re-encoded.
        error: Why the file was skipped; empty for a usable image.
    """

    jpeg: bytes = b""
    height: int = 0
    width: int = 0
    reencoded: bool = False
    error: str = ""


def encode_image(data: bytes) -> EncodedImage:
    """Checks that `data` decodes as an image and returns it as RGB JPEG.

    RGB JPEGs are kept byte for byte; other decodable images (PNG, BMP, grey or
    CMYK JPEG, ...) are converted to RGB and re-encoded as JPEG.

    Args:
        data: Raw file contents.

    Returns:
        The encoded image, or one whose `error` says why it is unusable.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            width, height = image.size
            if image.format == "JPEG" and image.mode == "RGB":
                return EncodedImage(data, height, width)
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
            return EncodedImage(buffer.getvalue(), height, width, reencoded=True)
    except UnidentifiedImageError:
        return EncodedImage(error="not an image (unrecognised format)")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL reports truncated or corrupt data through these.
        return EncodedImage(error=f"corrupt image: {e}")


def _encode_file(path: str) -> EncodedImage:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return EncodedImage(error=f"unreadable: {e.strerror or e}")
    return encode_image(data)


def read_label_map(path: str | os.PathLike) -> list[str]:
    """Reads a label map: one class name per line, line i = label i.

    Args:
        path: The labels.txt written by `build_tfrecords`.

    Raises:
        DataError: If the file is missing or empty.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label map {path} not found; build_tfrecords writes it beside the shards")
    names = path.read_text().splitlines()
    if not names:
        raise DataError(f"label map {path} is empty; rebuild the TFRecords")
    return names


def write_label_map(path: str | os.PathLike, class_names: Sequence[str]) -> None:
    """Writes a label map atomically: line i is the name of label i.

    Args:
        path: Destination file.
        class_names: Class names in label order.
    """
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{name}\n" for name in class_names))


def shard_path(output_dir: str | os.PathLike, name: str, index: int, num_shards: int) -> Path:
    """Path of one shard, `<output_dir>/<name>-<index:05d>-of-<num_shards:05d>`."""
    return Path(output_dir) / f"{name}-{index:05d}-of-{num_shards:05d}"


def _pool_map(
    num_workers: int, load: Callable[[T], EncodedImage], sources: Iterator[T]
) -> tuple[Iterator[EncodedImage], multiprocessing.pool.Pool | None]:
    if num_workers == 1:
        return map(load, sources), None
    # Fork where possible: workers only run PIL, and a fork starts them without
    # re-importing TensorFlow.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(num_workers)
    return pool.imap(load, sources, chunksize=16), pool


class _RecordLoader:
    """Reads and checks one RecordIO image in a worker: record offset -> EncodedImage.

    Args:
        rec_path: The `.rec` file.
    """

    def __init__(self, rec_path: str | os.PathLike) -> None:
        self.reader = recordio.RecordReader(rec_path)

    def __call__(self, offset: int) -> EncodedImage:
        try:
            _, data = recordio.unpack(self.reader.read(offset))
        except recordio.RecordError as e:
            return EncodedImage(error=str(e))
        return encode_image(data)


def build_tfrecords(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    name: str = "train",
    num_shards: int = 8,
    num_workers: int = 1,
    seed: int = 0,
) -> dict[str, object]:
    """Converts a folder-per-class image tree into sharded TFRecords and a label map.

    `image_folder` followed by `write_tfrecords`; see there.

    Args:
        input_dir: Directory with one sub-folder of images per class.
        output_dir: Destination of the shards and labels.txt.
        name: Shard name prefix (`train`, `val`, ...).
        num_shards: Number of shards.
        num_workers: Processes decoding and checking images.
        seed: Seed of the example order.

    Returns:
        The summary of `write_tfrecords`.

    Raises:
        DataError: If the input directory is missing or has no class folders with files.
    """
    paths, labels, class_names = image_folder(input_dir)
    return write_tfrecords(
        paths,
        labels,
        class_names,
        input_dir,
        output_dir,
        name=name,
        num_shards=num_shards,
        num_workers=num_workers,
        seed=seed,
    )


def write_tfrecords(
    paths: Sequence[str],
    labels: Sequence[int],
    class_names: Sequence[str],
    root: str | os.PathLike,
    output_dir: str | os.PathLike,
    name: str = "train",
    num_shards: int = 8,
    num_workers: int = 1,
    seed: int = 0,
) -> dict[str, object]:
    """Writes labelled image files as sharded TFRecords and a label map.

    `write_examples` over the files, each stored under its path relative to
    `root`; files that are not decodable images are skipped and named in the
    summary.

    Args:
        paths: Image files, as listed by `image_folder`.
        labels: Label of each file, an index into `class_names`.
        class_names: Class names in label order; written to labels.txt.
        root: Directory the stored file names are made relative to.
        output_dir: Destination of the shards and labels.txt.
        name: Shard name prefix (`train`, `val`, ...).
        num_shards: Number of shards.
        num_workers: Processes decoding and checking images.
        seed: Seed of the example order.

    Returns:
        Summary: images written, re-encoded, skipped (and the first reasons),
        classes, shards, stale shards removed, output directory.

    Raises:
        ValueError: If `num_shards` or `num_workers` is below 1, or labels and paths differ
            in length.
    """
    if len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} paths")
    root = Path(root)
    filenames = [Path(p).relative_to(root).as_posix() for p in paths]
    return write_examples(
        paths,
        _encode_file,
        labels,
        class_names,
        filenames,
        output_dir,
        name=name,
        num_shards=num_shards,
        num_workers=num_workers,
        seed=seed,
    )


def write_examples(
    sources: Sequence[T],
    load: Callable[[T], EncodedImage],
    labels: Sequence[int],
    class_names: Sequence[str],
    filenames: Sequence[str],
    output_dir: str | os.PathLike,
    name: str = "train",
    num_shards: int = 8,
    num_workers: int = 1,
    seed: int = 0,
) -> dict[str, object]:
    """Writes labelled images from any source as sharded TFRecords and a label map.

    The one writer behind `write_tfrecords` (image files) and
    `write_recordio_tfrecords` (RecordIO packs). Examples are shuffled across
    shards with `seed`; the output depends only on the inputs and the seed, never
    on `num_workers`. Sources that `load` reports unusable are skipped, counted
    and named in the summary. Each shard is written under a temporary name and
    renamed; shards of an earlier build with the same `name` but another shard
    count are removed so the shard glob stays consistent.

    Args:
        sources: One picklable handle per image (a path, a record offset).
        load: Module-level (picklable) function: source -> EncodedImage; runs in the workers.
        labels: Label of each source, an index into `class_names`.
        class_names: Class names in label order; written to labels.txt.
        filenames: Name stored with each example and used to report it when skipped.
        output_dir: Destination of the shards and labels.txt.
        name: Shard name prefix (`train`, `val`, ...).
        num_shards: Number of shards.
        num_workers: Processes decoding and checking images.
        seed: Seed of the example order.

    Returns:
        Summary: images written, re-encoded, skipped (and the first reasons),
        classes, shards, stale shards removed, output directory.

    Raises:
        ValueError: If `num_shards` or `num_workers` is below 1, or sources, labels and
            filenames differ in length.
    """
    if num_shards < 1 or num_workers < 1:
        raise ValueError(
            f"num_shards and num_workers must be >= 1, got {num_shards}, {num_workers}"
        )
    if not len(sources) == len(labels) == len(filenames):
        raise ValueError(
            f"{len(sources)} sources, {len(labels)} labels and {len(filenames)} filenames"
        )
    output_dir = Path(output_dir)
    order = np.random.default_rng(seed).permutation(len(sources))
    shards = np.array_split(order, num_shards)
    output_dir.mkdir(parents=True, exist_ok=True)

    written = reencoded = 0
    skipped: list[tuple[str, str]] = []
    results, pool = _pool_map(num_workers, load, (sources[i] for i in order))
    try:
        with tqdm(total=len(sources), unit="img", desc=f"{name} records", disable=None) as bar:
            for index, shard in enumerate(shards):
                path = shard_path(output_dir, name, index, num_shards)
                with atomic_path(path) as tmp, tf.io.TFRecordWriter(str(tmp)) as writer:
                    for i in shard:
                        encoded = next(results)
                        bar.update()
                        if encoded.error:
                            skipped.append((filenames[i], encoded.error))
                            continue
                        label = labels[i]
                        writer.write(
                            make_example(
                                encoded.jpeg,
                                label,
                                class_names[label],
                                filenames[i],
                                encoded.height,
                                encoded.width,
                            )
                        )
                        written += 1
                        reencoded += encoded.reencoded
    finally:
        if pool is not None:
            pool.terminate()
    write_label_map(output_dir / LABEL_MAP, class_names)

    current = {shard_path(output_dir, name, i, num_shards).name for i in range(num_shards)}
    stale = [p for p in output_dir.glob(f"{name}-?????-of-?????") if p.name not in current]
    for p in stale:
        p.unlink()
    return {
        "output": str(output_dir),
        "images": written,
        "reencoded": reencoded,
        "skipped": len(skipped),
        "skipped_examples": skipped[:SHOWN_SKIPS],
        "classes": len(class_names),
        "shards": num_shards,
        "stale_shards_removed": len(stale),
    }


def write_recordio_tfrecords(
    pack: recordio.RecordIO,
    output_dir: str | os.PathLike,
    name: str = "train",
    num_shards: int = 8,
    num_workers: int = 1,
    seed: int = 0,
) -> dict[str, object]:
    """Converts an InsightFace / MXNet RecordIO pack into sharded TFRecords and a label map.

    The encoded images are copied from the `.rec` as they are (RGB JPEGs byte
    for byte; other formats re-encoded as `encode_image` does), with no folder
    in between. Classes are the packs' integer labels: labels.txt lists them as
    strings, sorted numerically, and label i of the TFRecords is line i
    (so labels 0..C-1 keep their values). Each example's filename is
    `<label>/<key>.jpg`, the path `recordio.extract_images` writes it to.
    Records that cannot be read or decoded are skipped and reported by key.

    Args:
        pack: The opened pack (`recordio.open_recordio`).
        output_dir: Destination of the shards and labels.txt.
        name: Shard name prefix (`train`, `val`, ...).
        num_shards: Number of shards.
        num_workers: Processes reading, checking and decoding images.
        seed: Seed of the example order.

    Returns:
        The summary of `write_examples`, with the records skipped while reading labels
        added to its counts.

    Raises:
        DataError: If no image record of the pack can be read.
    """
    records, unreadable = recordio.scan_labels(pack)
    if not records:
        raise DataError(
            f"no readable image record in {pack.rec} ({len(unreadable)} skipped); "
            f"check that the .rec and .idx belong together"
        )
    classes = sorted({record.label for record in records})
    dense = {label: i for i, label in enumerate(classes)}
    summary = write_examples(
        [record.offset for record in records],
        _RecordLoader(pack.rec),
        [dense[record.label] for record in records],
        [str(label) for label in classes],
        [f"{record.label}/{record.key}.jpg" for record in records],
        output_dir,
        name=name,
        num_shards=num_shards,
        num_workers=num_workers,
        seed=seed,
    )
    shown = [(f"key {key}", reason) for key, reason in unreadable]
    summary["skipped"] += len(unreadable)
    summary["skipped_examples"] = (shown + summary["skipped_examples"])[:SHOWN_SKIPS]
    return summary
