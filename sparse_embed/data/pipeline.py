"""tf.data input pipelines: TFRecords for training and evaluation, image files for pairs/folders.

Every pipeline yields float32 images in [-1, 1] at a fixed square size:
training yields `(image [B, S, S, 3], label int32 [B])`, evaluation yields
`(image, label, filename)` and keeps every example in file order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from sparse_embed.data.augment import augment as augment_image
from sparse_embed.data.tfrecord import parse_example
from sparse_embed.errors import DataError
from sparse_embed.keras import tf

AUTOTUNE = tf.data.AUTOTUNE
# TFRecord files read concurrently by the training interleave.
CYCLE_LENGTH = 16


def decode_image(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decodes an encoded image (JPEG, PNG, BMP, GIF) to the model's input.

    Args:
        encoded: Scalar string tensor with the file contents.
        image_size: Side S of the square output.

    Returns:
        float32 [S, S, 3] in [-1, 1].
    """
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    return tf.clip_by_value(image / 127.5 - 1.0, -1.0, 1.0)


def list_files(file_pattern: str) -> list[str]:
    """Returns the files matching a glob, sorted.

    Args:
        file_pattern: Glob of TFRecord shards, e.g. `data/tfrecords/train-*`.

    Raises:
        DataError: If nothing matches.
    """
    files = sorted(tf.io.gfile.glob(file_pattern))
    if not files:
        raise DataError(
            f"no TFRecord files match {file_pattern!r}; build them with "
            f"preprocessing/build_tfrecords.py --input=<image folder> --output=<dir>"
        )
    return files


def _check_worker(num_workers: int, worker_index: int) -> None:
    if num_workers < 1 or not 0 <= worker_index < num_workers:
        raise ValueError(f"need 0 <= worker_index < num_workers, got {worker_index}, {num_workers}")


def _worker_seed(seed: int, worker_index: int) -> int:
    # Workers read different examples; distinct augmentation streams keep them independent too.
    return int(np.random.SeedSequence([seed, worker_index]).generate_state(1, np.uint64)[0] >> 1)


def train_dataset(
    file_pattern: str,
    batch_size: int,
    image_size: int,
    *,
    augment: bool = True,
    shuffle_buffer: int = 2048,
    seed: int = 0,
    num_workers: int = 1,
    worker_index: int = 0,
    start_example: int = 0,
) -> tf.data.Dataset:
    """The endless, shuffled, augmented training stream of one worker.

    Each worker reads its own share of the shards (every `num_workers`-th file);
    with fewer files than workers it reads every `num_workers`-th example
    instead. The stream is a pure function of the files and the arguments, so
    `start_example=k * batch_size` continues exactly where a run stopped after
    k batches (it reads, but does not decode, the skipped records). A run
    resumed with a different number of workers passes each worker its share of
    the examples already consumed: every worker continues at the same epoch
    position, over its new share of the files.

    Args:
        file_pattern: Glob of TFRecord shards.
        batch_size: Examples per batch (per worker).
        image_size: Side S of the square images.
        augment: Random flip, scale/crop and colour jitter.
        shuffle_buffer: Examples in the shuffle buffer.
        seed: Seed of the file order, the shuffle and the augmentation.
        num_workers: Number of workers reading the data.
        worker_index: This worker, in [0, num_workers).
        start_example: Examples of this worker's stream to skip, to resume a run.

    Returns:
        Dataset of (float32 [B, S, S, 3] in [-1, 1], int32 [B]) with static shapes.

    Raises:
        DataError: If no file matches `file_pattern`.
        ValueError: On a bad batch size, buffer, worker index or start batch.
    """
    if batch_size < 1 or shuffle_buffer < 1 or start_example < 0:
        raise ValueError(
            f"need batch_size >= 1, shuffle_buffer >= 1, start_example >= 0; got "
            f"{batch_size}, {shuffle_buffer}, {start_example}"
        )
    _check_worker(num_workers, worker_index)
    files = list_files(file_pattern)
    if len(files) >= num_workers:
        own = files[worker_index::num_workers]
        file_ds = (
            tf.data.Dataset.from_tensor_slices(own)
            .shuffle(len(own), seed=seed, reshuffle_each_iteration=True)
            .repeat()
        )
        records = file_ds.interleave(
            tf.data.TFRecordDataset,
            cycle_length=min(len(own), CYCLE_LENGTH),
            num_parallel_calls=AUTOTUNE,
            deterministic=True,
        )
    else:
        records = tf.data.TFRecordDataset(files).shard(num_workers, worker_index).repeat()
    records = records.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    # Number the examples before skipping, so the augmentation seed of an example
    # is the same in a resumed run as in an uninterrupted one.
    records = tf.data.Dataset.zip(records, tf.data.Dataset.counter())
    if start_example:
        records = records.skip(start_example)
    base_seed = tf.constant(_worker_seed(seed, worker_index), tf.int64)

    def load(serialized: tf.Tensor, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        features = parse_example(serialized)
        image = decode_image(features["image/encoded"], image_size)
        if augment:
            image = augment_image(image, tf.stack([base_seed, index]))
        return image, tf.cast(features["image/class/label"], tf.int32)

    dataset = (
        records.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
        .batch(batch_size, drop_remainder=True)
        .prefetch(AUTOTUNE)
    )
    options = tf.data.Options()
    options.deterministic = True
    return dataset.with_options(options)


def _eval_map(image_size: int) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
    def load(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        features = parse_example(serialized)
        image = decode_image(features["image/encoded"], image_size)
        return image, tf.cast(features["image/class/label"], tf.int32), features["image/filename"]

    return load


def eval_dataset(
    file_pattern: str,
    batch_size: int,
    image_size: int,
    *,
    num_workers: int = 1,
    worker_index: int = 0,
) -> tf.data.Dataset:
    """Every example of some TFRecords once, in file order, without augmentation.

    Args:
        file_pattern: Glob of TFRecord shards (read in sorted order).
        batch_size: Examples per batch; the last batch may be smaller.
        image_size: Side S of the square images.
        num_workers: Number of workers sharing the examples.
        worker_index: This worker; it gets every `num_workers`-th example.

    Returns:
        Dataset of (float32 [B, S, S, 3] in [-1, 1], int32 [B], string [B] filenames).

    Raises:
        DataError: If no file matches `file_pattern`.
    """
    _check_worker(num_workers, worker_index)
    records = tf.data.TFRecordDataset(list_files(file_pattern))
    if num_workers > 1:
        records = records.shard(num_workers, worker_index)
    return (
        records.map(_eval_map(image_size), num_parallel_calls=AUTOTUNE, deterministic=True)
        .batch(batch_size)
        .prefetch(AUTOTUNE)
    )


def files_dataset(
    paths: Sequence[str],
    labels: Sequence[int] | None,
    batch_size: int,
    image_size: int,
) -> tf.data.Dataset:
    """Image files on disk, in the given order, without augmentation.

    Args:
        paths: Image files (JPEG, PNG, BMP, GIF).
        labels: One label per path, or None (labels are then -1).
        batch_size: Images per batch; the last batch may be smaller.
        image_size: Side S of the square images.

    Returns:
        Dataset of (float32 [B, S, S, 3] in [-1, 1], int32 [B], string [B] paths).
        Files that exist but do not decode (a text file named `.jpg`, a
        truncated JPEG) are left out instead of stopping the whole job: compare
        the paths that come out with `paths` (`missing_paths`) to report them.

    Raises:
        DataError: If `paths` is empty or some files do not exist (the message names
            the first and counts them).
        ValueError: If `labels` and `paths` differ in length.
    """
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise DataError("no image files given; check the image folder or pairs file")
    if labels is None:
        labels = [-1] * len(paths)
    if len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} paths")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(paths)} image files do not exist, first: {missing[0]}"
        )

    def load(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        return decode_image(tf.io.read_file(path), image_size), label, path

    dataset = tf.data.Dataset.from_tensor_slices(
        (tf.constant(paths, tf.string), tf.constant(labels, tf.int32))
    )
    return (
        dataset.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
        .ignore_errors()
        .batch(batch_size)
        .prefetch(AUTOTUNE)
    )


def bytes_dataset(images: Sequence[bytes], names: Sequence[str], batch_size: int,
                  image_size: int) -> tf.data.Dataset:
    """Encoded images held in memory (an InsightFace `.bin` pack), in the given order.

    Args:
        images: Encoded images (JPEG, PNG, BMP, GIF).
        names: One name per image, carried through as the file name.
        batch_size: Images per batch; the last batch may be smaller.
        image_size: Side S of the square images.

    Returns:
        Dataset of (float32 [B, S, S, 3] in [-1, 1], int32 [B] of -1, string [B] names);
        images that do not decode are left out (compare the names with `missing_paths`).
    """
    if len(images) != len(names) or not images:
        raise ValueError(f"need one name per image and at least one image, got "
                         f"{len(images)} images and {len(names)} names")

    def load(data: tf.Tensor, name: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        return decode_image(data, image_size), tf.constant(-1, tf.int32), name

    dataset = tf.data.Dataset.from_tensor_slices(
        (tf.constant(list(images), tf.string), tf.constant(list(names), tf.string)))
    return (
        dataset.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
        .ignore_errors()
        .batch(batch_size)
        .prefetch(AUTOTUNE)
    )


def missing_paths(paths: Sequence[str], produced: Sequence[str]) -> list[str]:
    """The `paths` a `files_dataset` left out because they did not decode, in order.

    Args:
        paths: What was given to `files_dataset`.
        produced: The paths that came out of it.
    """
    seen = set(produced)
    return [p for p in map(os.fspath, paths) if p not in seen]
